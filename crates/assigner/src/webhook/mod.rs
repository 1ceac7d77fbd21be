//! Creation-time assignment: a mutating admission webhook that stamps the shard label on
//! CREATE of an unlabelled object of a sharded kind, with the watch path's own decision
//! ([`shardop::protocol::admission`]), so most new objects never need a label write.
//! `failurePolicy: Ignore` and the watch path as fallback: a down webhook never blocks a
//! user and never leaves an object unassigned.
//!
//! Every replica (leader or standby) serves the webhook from its own watches of the shard
//! Leases and the shard count, and the same certificate (read from one Secret). The leader
//! renews the certificate and keeps the configuration's `caBundle` in step.

mod admission;
mod config;
mod metrics;
mod secret;
mod server;
mod tls;
mod view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use futures::future::BoxFuture;
use jiff::Timestamp;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use shardop::OperatorNames;
use shardop::lease::watch_operator_shard_leases;
use shardop_runtime::parse_positive_duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::admission::Reviewer;
use self::config::Registration;
pub use self::metrics::WebhookMetrics;
use self::secret::Renewer;
use self::server::CertSlot;
use self::tls::{Lifetimes, Material};
use self::view::ShardView;
use crate::resources::ResourceName;
use crate::shard_count::ShardCountRx;

/// A failed certificate or configuration write is retried after this long.
const RETRY: Duration = Duration::from_secs(5);

/// The webhook's flags.
#[derive(Args, Debug, Clone)]
pub struct WebhookArgs {
    /// Serve the mutating admission webhook (HTTPS, `POST /mutate`) on this address; off
    /// when unset. Port 0 = any free port (see `--webhook-url`).
    #[arg(long, env = "SHARDOP_WEBHOOK_ADDR")]
    pub webhook_addr: Option<SocketAddr>,
    /// Register the webhook by URL and write the whole MutatingWebhookConfiguration
    /// (`{port}` is replaced by the bound port): for control planes without Service
    /// routing. Without it the configuration is the chart's, and only its caBundle is kept.
    #[arg(long, env = "SHARDOP_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// Name of the MutatingWebhookConfiguration (default `<operator>-assigner`).
    #[arg(long, env = "SHARDOP_WEBHOOK_CONFIGURATION")]
    pub webhook_configuration: Option<String>,
    /// Service in front of the webhook port, in the operator namespace: its DNS names go
    /// into the certificate (default `<operator>-assigner-webhook`).
    #[arg(long, env = "SHARDOP_WEBHOOK_SERVICE")]
    pub webhook_service: Option<String>,
    /// Secret holding the certificates (default `<operator>-assigner-webhook-tls`).
    #[arg(long, env = "SHARDOP_WEBHOOK_SECRET")]
    pub webhook_secret: Option<String>,
    /// cert-manager issues the certificate and injects the caBundle: only read the Secret.
    #[arg(long, env = "SHARDOP_WEBHOOK_CERT_MANAGER")]
    pub webhook_cert_manager: bool,
    /// Lifetime of the webhook's self-signed CA; renewed with a third of it left.
    #[arg(long, env = "SHARDOP_WEBHOOK_CA_LIFETIME", default_value = "8760h", value_parser = parse_positive_duration)]
    pub webhook_ca_lifetime: Duration,
    /// Lifetime of the serving certificate; renewed with a third of it left.
    #[arg(long, env = "SHARDOP_WEBHOOK_CERT_LIFETIME", default_value = "2160h", value_parser = parse_positive_duration)]
    pub webhook_cert_lifetime: Duration,
    /// How often the leader checks the certificate's age and the configuration's caBundle.
    #[arg(long, env = "SHARDOP_WEBHOOK_CHECK_INTERVAL", default_value = "1m", value_parser = parse_positive_duration)]
    pub webhook_check_interval: Duration,
    /// Finalizers the webhook adds to every object it stamps (comma-separated), owned by
    /// the workers' field manager (`<operator>-worker`) as if a worker had applied them:
    /// the worker's first reconcile finds its finalizer in place and skips that write. Name
    /// only finalizers your workers add on their first reconcile and remove themselves.
    #[arg(long, env = "SHARDOP_WEBHOOK_FINALIZERS", value_delimiter = ',', value_parser = admission::parse_finalizer)]
    pub webhook_finalizers: Vec<String>,
}

/// Where the webhook runs and what it serves for.
pub struct Setup<'a> {
    pub args: &'a WebhookArgs,
    pub client: &'a Client,
    pub names: &'a OperatorNames,
    pub operator_namespace: &'a str,
    pub watch_namespaces: Vec<String>,
    pub kinds: Vec<ResourceName>,
    pub count: (ShardCountRx, BoxFuture<'static, ()>),
    pub metrics: WebhookMetrics,
}

/// The running webhook; the leader's duties are [`Webhook::lead`]. Cheap to clone.
#[derive(Clone)]
pub struct Webhook(Arc<Inner>);

struct Inner {
    client: Client,
    names: OperatorNames,
    kinds: Vec<ResourceName>,
    watch_namespaces: Vec<String>,
    configuration: String,
    url: Option<String>,
    cert_manager: bool,
    check_interval: Duration,
    renewer: Renewer,
    material: watch::Receiver<Option<Material>>,
    metrics: WebhookMetrics,
}

/// Spawns `driver` into `tasks`, stopped by `stop`.
fn spawn_until(tasks: &mut JoinSet<()>, stop: &CancellationToken, driver: BoxFuture<'static, ()>) {
    let stop = stop.clone();
    tasks.spawn(async move {
        tokio::select! {
            () = driver => {}
            () = stop.cancelled() => {}
        }
    });
}

/// Starts the webhook server and its watches (into `tasks`, until `stop`); `None` when
/// `--webhook-addr` is unset.
pub async fn start(
    setup: Setup<'_>,
    tasks: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> anyhow::Result<Option<Webhook>> {
    let args = setup.args;
    let Some(addr) = args.webhook_addr else {
        return Ok(None);
    };
    let names = setup.names.clone();
    let operator = names.operator().to_owned();
    let view = watch_shards(
        setup.client,
        setup.operator_namespace,
        &names,
        setup.count,
        tasks,
        stop,
    );
    let reviewer = Reviewer {
        names: names.clone(),
        kinds: setup.kinds.clone(),
        finalizers: args.webhook_finalizers.clone(),
    };
    let handler = review_handler(view, reviewer, setup.metrics.clone());
    let slot = CertSlot::new();
    let (bound, server) = server::serve(
        addr,
        slot.clone(),
        handler,
        setup.metrics.clone(),
        server::Limits::default(),
        stop.clone(),
    )
    .await?;
    tasks.spawn(server);
    let url = args
        .webhook_url
        .as_ref()
        .map(|u| u.replace("{port}", &bound.port().to_string()));
    tracing::info!(%bound, ?url, "serving the mutating admission webhook");

    let (material, renewer) = certificate(
        (args, setup.client, setup.operator_namespace),
        &operator,
        slot,
        tasks,
        stop,
    );
    let webhook = Webhook(Arc::new(Inner {
        client: setup.client.clone(),
        names,
        kinds: setup.kinds,
        watch_namespaces: setup.watch_namespaces,
        configuration: args
            .webhook_configuration
            .clone()
            .unwrap_or_else(|| format!("{operator}-assigner")),
        url,
        cert_manager: args.webhook_cert_manager,
        check_interval: args.webhook_check_interval,
        renewer,
        material,
        metrics: setup.metrics,
    }));
    if !webhook.0.cert_manager {
        spawn_until(tasks, stop, Box::pin(webhook.clone().create_secret()));
    }
    Ok(Some(webhook))
}

/// The serving certificate: the Secret's material, watched and swapped into `slot` by
/// tasks of `tasks` until `stop`, and the renewer the leader checks it with.
fn certificate(
    (args, client, operator_namespace): (&WebhookArgs, &Client, &str),
    operator: &str,
    slot: Arc<CertSlot>,
    tasks: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> (watch::Receiver<Option<Material>>, Renewer) {
    let secret_name = args
        .webhook_secret
        .clone()
        .unwrap_or_else(|| format!("{operator}-assigner-webhook-tls"));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), operator_namespace);
    let (material, secret_driver) = secret::watch_material(secrets.clone(), &secret_name);
    spawn_until(tasks, stop, secret_driver);
    spawn_until(
        tasks,
        stop,
        Box::pin(serve_material(material.clone(), slot)),
    );
    let renewer = renewer(args, operator, secrets, secret_name, operator_namespace);
    (material, renewer)
}

/// The replica's own view of the shards the webhook stamps toward: the shard Leases and
/// the shard count, each kept by a task of `tasks` until `stop`.
fn watch_shards(
    client: &Client,
    operator_namespace: &str,
    names: &OperatorNames,
    (count, count_driver): (ShardCountRx, BoxFuture<'static, ()>),
    tasks: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> ShardView {
    let (leases, lease_driver) =
        watch_operator_shard_leases(client.clone(), operator_namespace, false, names.clone());
    spawn_until(tasks, stop, lease_driver);
    spawn_until(tasks, stop, count_driver);
    ShardView {
        names: names.clone(),
        leases,
        count,
    }
}

/// Answers one AdmissionReview from the replica's current view of the shards, and counts
/// the verdict.
fn review_handler(view: ShardView, reviewer: Reviewer, metrics: WebhookMetrics) -> server::Handler {
    Arc::new(move |body: &[u8]| {
        let now = Timestamp::now();
        let table = view.table(now);
        let (answer, verdict) = reviewer.review(body, table.as_ref(), now);
        metrics
            .reviews
            .get_or_create(&metrics::VerdictLabel {
                verdict: verdict.as_str(),
            })
            .inc();
        tracing::debug!(verdict = verdict.as_str(), "webhook review");
        answer
    })
}

/// What the leader renews: the serving certificate for the webhook Service's names, kept
/// in `secret_name`.
fn renewer(
    args: &WebhookArgs,
    operator: &str,
    secrets: Api<Secret>,
    secret_name: String,
    operator_namespace: &str,
) -> Renewer {
    let service = args
        .webhook_service
        .clone()
        .unwrap_or_else(|| format!("{operator}-assigner-webhook"));
    Renewer {
        api: secrets,
        name: secret_name,
        sans: tls::subject_alt_names(&service, operator_namespace),
        lifetimes: Lifetimes {
            ca: args.webhook_ca_lifetime,
            serving: args.webhook_cert_lifetime,
        },
    }
}

/// Loads every new material from the Secret into the server.
async fn serve_material(mut material: watch::Receiver<Option<Material>>, slot: Arc<CertSlot>) {
    loop {
        let current = material.borrow_and_update().clone();
        if let Some(current) = current {
            match slot.load(&current) {
                Ok(()) => tracing::info!("webhook serving certificate loaded"),
                Err(err) => {
                    tracing::warn!(error = %err, "the webhook Secret's certificate is unusable")
                }
            }
        }
        if material.changed().await.is_err() {
            return;
        }
    }
}

impl Webhook {
    /// Whichever replica comes first creates the Secret; the others read it.
    async fn create_secret(self) {
        loop {
            match self.0.renewer.create_if_absent(Timestamp::now()).await {
                Ok(created) => {
                    if created {
                        self.0.metrics.certificate_writes.inc();
                        tracing::info!(secret = %self.0.renewer.name, "created the webhook certificate Secret");
                    }
                    return;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "creating the webhook certificate Secret failed");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// The leader's duties until `term` ends: renew the certificate when due and keep the
    /// configuration's caBundle equal to the Secret's CA bundle.
    pub async fn lead(self, term: CancellationToken) {
        let mut material = self.0.material.clone();
        loop {
            let wait = match self.check().await {
                Ok(()) => self.0.check_interval,
                Err(err) => {
                    tracing::warn!(
                        error = format!("{err:#}"),
                        "webhook certificate or configuration upkeep failed"
                    );
                    RETRY
                }
            };
            tokio::select! {
                () = term.cancelled() => return,
                _ = material.changed() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One check: renews what is due, then makes the live configuration trust the
    /// Secret's CA bundle. The configuration is read every time, since anyone (a
    /// `helm upgrade --force`, a `kubectl replace`) may have dropped the caBundle.
    async fn check(&self) -> anyhow::Result<()> {
        let read = if self.0.cert_manager {
            None
        } else {
            self.renew_due().await?
        };
        // The Secret as this check read or wrote it beats the watched copy, which may
        // still hold the bundle a rotation just replaced.
        let current = read.or_else(|| self.0.material.borrow().clone());
        if let Some(current) = current {
            self.write_configuration(&current.ca_pem).await?;
        }
        Ok(())
    }

    /// Renews the certificate when due; the Secret's material as read or written.
    async fn renew_due(&self) -> anyhow::Result<Option<Material>> {
        let checked = self
            .0
            .renewer
            .renew_due(Timestamp::now(), |next| async move {
                // Trust the new CA before any replica serves a certificate from it.
                self.write_configuration(&next.ca_pem).await
            })
            .await?;
        if checked.written {
            self.0.metrics.certificate_writes.inc();
        }
        Ok(checked.material)
    }

    /// Makes the live configuration trust `ca_pem`: one read, and a write only where it
    /// differs.
    async fn write_configuration(&self, ca_pem: &str) -> anyhow::Result<()> {
        let api: Api<MutatingWebhookConfiguration> = Api::all(self.0.client.clone());
        let webhook = config::webhook_name(&self.0.names);
        match &self.0.url {
            Some(url) => {
                let registration = Registration {
                    names: &self.0.names,
                    kinds: &self.0.kinds,
                    namespaces: &self.0.watch_namespaces,
                    url,
                };
                let live = api.get_opt(&self.0.configuration).await?;
                if live.is_some_and(|c| config::registers_url(&c, &webhook, url, ca_pem)) {
                    return Ok(());
                }
                config::apply_url_configuration(&api, &self.0.configuration, &registration, ca_pem)
                    .await?;
                tracing::info!(configuration = %self.0.configuration, %url, "registered the webhook by URL");
            }
            // cert-manager injects the caBundle of the chart's configuration.
            None if self.0.cert_manager => {}
            None => {
                let synced =
                    config::sync_ca_bundle(&api, &self.0.configuration, &webhook, ca_pem).await?;
                if synced == config::Synced::Written {
                    tracing::info!(configuration = %self.0.configuration, "updated the webhook caBundle");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::Value;

    use super::*;

    const CONFIGURATION: &str = "shardop-assigner";
    const DAY: Duration = Duration::from_secs(86_400);

    /// What the mock API server holds: the certificate Secret and the configuration.
    #[derive(Default)]
    struct Cluster {
        secret: Value,
        configuration: Value,
        /// Every JSON patch sent to the configuration.
        patches: Vec<Value>,
    }

    type Shared = Arc<Mutex<Cluster>>;

    fn api_server(cluster: Shared) -> Client {
        let service = tower::service_fn(move |request: Request<Body>| {
            let cluster = Arc::clone(&cluster);
            async move {
                let (parts, body) = request.into_parts();
                let body = body.collect_bytes().await?;
                let path = parts.uri.path();
                let mut cluster = cluster.lock().unwrap();
                let answer = match (parts.method, path.contains("/secrets/")) {
                    (Method::GET, true) => cluster.secret.clone(),
                    (Method::PUT, true) => {
                        cluster.secret = serde_json::from_slice(&body).unwrap();
                        cluster.secret.clone()
                    }
                    (Method::GET, false) => cluster.configuration.clone(),
                    (Method::PATCH, false) => {
                        let patch: Value = serde_json::from_slice(&body).unwrap();
                        let ops: json_patch::Patch = serde_json::from_value(patch.clone()).unwrap();
                        json_patch::patch(&mut cluster.configuration, &ops).unwrap();
                        cluster.patches.push(patch);
                        cluster.configuration.clone()
                    }
                    (method, _) => panic!("unexpected {method} {path}"),
                };
                let mut response = Response::new(Body::from(serde_json::to_vec(&answer).unwrap()));
                *response.status_mut() = StatusCode::OK;
                Ok::<_, tower::BoxError>(response)
            }
        });
        Client::new(service, "ns")
    }

    fn lifetimes() -> Lifetimes {
        Lifetimes {
            ca: 365 * DAY,
            serving: 90 * DAY,
        }
    }

    fn sans() -> Vec<rcgen::SanType> {
        tls::subject_alt_names("shardop-assigner-webhook", "ns")
    }

    /// Fresh material, as if created `ago` before now.
    fn material(ago: Duration) -> Material {
        let now = Timestamp::now() - jiff::SignedDuration::try_from(ago).unwrap();
        tls::renew(tls::Renewal::Create, None, &sans(), lifetimes(), now)
            .unwrap()
            .unwrap()
    }

    fn secret_json(material: &Material) -> Value {
        serde_json::to_value(Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("tls".to_owned()),
                namespace: Some("ns".to_owned()),
                resource_version: Some("1".to_owned()),
                ..Default::default()
            },
            data: Some(secret::data(material)),
            ..Secret::default()
        })
        .unwrap()
    }

    /// The chart's configuration, trusting `ca_pem`.
    fn configuration_json(ca_pem: &str) -> Value {
        let names = OperatorNames::default();
        let registration = Registration {
            names: &names,
            kinds: &[],
            namespaces: &[],
            url: "https://unused",
        };
        config::url_configuration(CONFIGURATION, &registration, ca_pem)
    }

    fn webhook(client: &Client, watched: Option<Material>) -> Webhook {
        let mut registry = prometheus_client::registry::Registry::default();
        Webhook(Arc::new(Inner {
            client: client.clone(),
            names: OperatorNames::default(),
            kinds: Vec::new(),
            watch_namespaces: Vec::new(),
            configuration: CONFIGURATION.to_owned(),
            url: None,
            cert_manager: false,
            check_interval: Duration::from_secs(60),
            renewer: Renewer {
                api: Api::namespaced(client.clone(), "ns"),
                name: "tls".to_owned(),
                sans: sans(),
                lifetimes: lifetimes(),
            },
            material: watch::channel(watched).1,
            metrics: WebhookMetrics::register(&mut registry),
        }))
    }

    fn trusted(cluster: &Shared) -> Option<String> {
        let configuration = cluster.lock().unwrap().configuration.clone();
        let configuration: MutatingWebhookConfiguration =
            serde_json::from_value(configuration).unwrap();
        let bundle = configuration.webhooks?[0].client_config.ca_bundle.clone()?;
        Some(String::from_utf8(bundle.0).unwrap())
    }

    #[tokio::test]
    async fn a_dropped_ca_bundle_is_put_back_at_the_next_check() {
        let material = material(Duration::ZERO);
        let cluster = Shared::new(Mutex::new(Cluster {
            secret: secret_json(&material),
            configuration: configuration_json(&material.ca_pem),
            ..Cluster::default()
        }));
        let webhook = webhook(&api_server(Arc::clone(&cluster)), Some(material.clone()));
        webhook.check().await.unwrap();
        assert!(cluster.lock().unwrap().patches.is_empty(), "nothing to fix");
        // `kubectl replace` of the chart's configuration, which has no caBundle.
        let dropped = cluster.lock().unwrap().configuration["webhooks"][0]["clientConfig"]
            .as_object_mut()
            .unwrap()
            .remove("caBundle");
        assert!(dropped.is_some());
        webhook.check().await.unwrap();
        assert_eq!(cluster.lock().unwrap().patches.len(), 1);
        assert_eq!(trusted(&cluster), Some(material.ca_pem));
    }

    #[tokio::test]
    async fn a_rotation_in_a_terms_first_check_leaves_the_new_ca_trusted() {
        // Created 300 days ago: the 365-day CA has less than a third left.
        let old = material(300 * DAY);
        let cluster = Shared::new(Mutex::new(Cluster {
            secret: secret_json(&old),
            configuration: configuration_json(&old.ca_pem),
            ..Cluster::default()
        }));
        // The watched copy still shows the old material (the watch lags the write).
        let webhook = webhook(&api_server(Arc::clone(&cluster)), Some(old.clone()));
        webhook.check().await.unwrap();
        let secret: Secret =
            serde_json::from_value(cluster.lock().unwrap().secret.clone()).unwrap();
        let rotated = secret::material(&secret).unwrap();
        assert_ne!(rotated.ca_pem, old.ca_pem, "the CA was rotated");
        assert!(
            rotated.ca_pem.ends_with(&old.ca_pem),
            "the old CA stays trusted"
        );
        assert_eq!(trusted(&cluster), Some(rotated.ca_pem));
    }
}
