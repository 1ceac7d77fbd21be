//! The Secret that holds the webhook's certificates: read by every replica (and watched,
//! so a rotation is served without a restart), created by whichever replica comes first,
//! renewed by the leader.

use std::collections::BTreeMap;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use rcgen::SanType;
use tokio::sync::watch;

use super::tls::{self, CA_CRT, CA_KEY, Lifetimes, Material, Renewal, TLS_CRT, TLS_KEY};

/// The material of `secret`, if it has a certificate, key and CA bundle.
pub fn material(secret: &Secret) -> Option<Material> {
    let data = secret.data.as_ref()?;
    let text = |key: &str| {
        data.get(key)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|s| !s.trim().is_empty())
    };
    Some(Material {
        cert_pem: text(TLS_CRT)?,
        key_pem: text(TLS_KEY)?,
        ca_pem: text(CA_CRT)?,
        ca_key_pem: text(CA_KEY),
    })
}

pub(super) fn data(material: &Material) -> BTreeMap<String, ByteString> {
    let mut data = BTreeMap::from([
        (
            TLS_CRT.to_owned(),
            ByteString(material.cert_pem.clone().into_bytes()),
        ),
        (
            TLS_KEY.to_owned(),
            ByteString(material.key_pem.clone().into_bytes()),
        ),
        (
            CA_CRT.to_owned(),
            ByteString(material.ca_pem.clone().into_bytes()),
        ),
    ]);
    if let Some(key) = &material.ca_key_pem {
        data.insert(CA_KEY.to_owned(), ByteString(key.clone().into_bytes()));
    }
    data
}

/// What the leader checks and renews.
pub struct Renewer {
    pub api: Api<Secret>,
    pub name: String,
    pub sans: Vec<SanType>,
    pub lifetimes: Lifetimes,
}

impl Renewer {
    /// Creates the Secret if it does not exist; a replica that loses the race (409
    /// AlreadyExists) leaves it to the winner and reads it through the watch.
    pub async fn create_if_absent(&self, now: Timestamp) -> anyhow::Result<bool> {
        if self.api.get_opt(&self.name).await?.is_some() {
            return Ok(false);
        }
        let Some(material) = tls::renew(Renewal::Create, None, &self.sans, self.lifetimes, now)?
        else {
            return Ok(false);
        };
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".to_owned()),
            data: Some(data(&material)),
            ..Secret::default()
        };
        match self.api.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(err) => Err(err.into()),
        }
    }

    /// Renews what is due at `now` (with a resourceVersion precondition: a concurrent
    /// writer wins and the next check looks again). `before_write` runs with the new
    /// material before the Secret changes, so the CA bundle can be trusted before any
    /// replica serves a certificate of a new CA. Returns the material now in the Secret
    /// as this call read or wrote it (fresher than the watched copy, which may still
    /// show what a rotation replaced) and whether it wrote the Secret.
    pub async fn renew_due<F, Fut>(
        &self,
        now: Timestamp,
        before_write: F,
    ) -> anyhow::Result<Checked>
    where
        F: FnOnce(Material) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let Some(mut secret) = self.api.get_opt(&self.name).await? else {
            let written = self.create_if_absent(now).await?;
            return Ok(Checked {
                material: None,
                written,
            });
        };
        let current = material(&secret);
        let observed = current.as_ref().and_then(|m| tls::observe(m).ok());
        let renewal = tls::renewal(observed.as_ref(), now);
        let Some(renewed) = tls::renew(renewal, current.as_ref(), &self.sans, self.lifetimes, now)?
        else {
            return Ok(Checked {
                material: current,
                written: false,
            });
        };
        tracing::info!(secret = %self.name, ?renewal, "renewing the webhook certificate");
        before_write(renewed.clone()).await?;
        secret.data = Some(data(&renewed));
        self.api
            .replace(&self.name, &PostParams::default(), &secret)
            .await?;
        Ok(Checked {
            material: Some(renewed),
            written: true,
        })
    }
}

/// What [`Renewer::renew_due`] found in, or wrote to, the Secret.
pub struct Checked {
    /// The Secret's material after the check; `None` when absent, incomplete or just
    /// created (the watch brings it).
    pub material: Option<Material>,
    /// Whether the Secret was written.
    pub written: bool,
}

/// Watches Secret `name` and publishes its material (`None` while absent or incomplete).
pub fn watch_material(
    api: Api<Secret>,
    name: &str,
) -> (
    watch::Receiver<Option<Material>>,
    futures::future::BoxFuture<'static, ()>,
) {
    let (tx, rx) = watch::channel(None);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let driver = watcher(api, config)
        .default_backoff()
        .for_each(move |event| {
            match event {
                Ok(watcher::Event::Apply(secret) | watcher::Event::InitApply(secret)) => {
                    let material = material(&secret);
                    tx.send_if_modified(|current| {
                        let changed = *current != material;
                        *current = material;
                        changed
                    });
                }
                Ok(watcher::Event::Delete(_)) => {
                    tx.send_replace(None);
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                Err(err) => {
                    shardop_runtime::reachability::log_watch_error(
                        "webhook certificate Secret",
                        &err,
                    );
                }
            }
            futures::future::ready(())
        });
    (rx, Box::pin(driver))
}
