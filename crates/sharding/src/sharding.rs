//! [`Sharding`]: the entry point of a sharded controller. It holds the process's identity,
//! home shard, Lease timings and clients, and [`Sharding::run`] serves shards (the home
//! shard and any taken over) by calling the user's function with a [`ShardScope`] for each.

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use crate::client::{ClientError, ClientFactory, fence_client};
use crate::duration::parse_positive_duration;
use crate::lease::{LeaseError, LeaseGuard, LeaseSettings};
use crate::metrics::ShardMetrics;
use crate::names::{InvalidOperatorName, OperatorNames};
use crate::protocol::home_shard_of;
use crate::scope::ShardScope;
use crate::shard_index::ShardIndex;
use crate::strategy::{AssignmentStrategy, LabelAssignment};
use crate::supervisor::{Serve, Supervisor};

/// Why sharding could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ShardingError {
    /// A setting is missing or makes no sense.
    #[error("sharding settings: {0}")]
    Settings(String),
    /// The operator name is not a valid DNS label.
    #[error(transparent)]
    OperatorName(#[from] InvalidOperatorName),
    /// A client could not be built.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A shard Lease request failed.
    #[error(transparent)]
    Lease(#[from] LeaseError),
}

/// Identity, home shard and timings of one sharded process. The defaults are the
/// DatabaseCluster worker's (lease 15 s, renew deadline 10 s, retry period 2 s, shutdown
/// timeout 20 s, streaming lists where served).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardingSettings {
    /// The operator's names (label keys, Lease names, field managers).
    pub names: OperatorNames,
    /// Holder identity in the shard Leases: the pod name.
    pub identity: String,
    /// The shard this process serves first and keeps (its StatefulSet ordinal).
    pub home: ShardIndex,
    /// Namespace of the shard Leases and Shard objects (the operator's namespace).
    pub namespace: String,
    /// How long others wait after the last renew before a shard Lease counts as expired.
    pub lease_duration: Duration,
    /// How long after its last successful renew the holder keeps writing (less than the
    /// lease duration).
    pub renew_deadline: Duration,
    /// How often the holder renews; also the unit of the takeover stagger.
    pub retry_period: Duration,
    /// How long in-flight reconciles may run after a shutdown signal before they are
    /// abandoned and the Leases released (hand-backs get at most half a lease duration).
    /// Abandoned reconciles may leave writes on the wire: their Leases are then released
    /// only after the fencing margin, `lease_duration − renew_deadline`.
    pub shutdown_timeout: Duration,
    /// Use streaming lists (WatchList) for initial lists where the API server serves them.
    pub streaming_lists: bool,
    /// How often freed memory is given back to the system while shards are served (see
    /// [`crate::memory`]): a slice that shrank (a rebalance, a hand-back) otherwise leaves
    /// the process at its peak. `None`: never.
    pub memory_return_interval: Option<Duration>,
}

/// Environment variables read by [`ShardingSettings::from_env`].
pub mod env {
    /// Holder identity (the pod name, from the downward API). Required.
    pub const IDENTITY: &str = "POD_NAME";
    /// Home shard: `auto` (default) takes the ordinal at the end of the identity.
    pub const SHARD: &str = "SHARDOP_SHARD";
    /// Namespace of the shard Leases and Shard objects.
    pub const OPERATOR_NAMESPACE: &str = "SHARDOP_OPERATOR_NAMESPACE";
    /// Fallback for [`OPERATOR_NAMESPACE`]: the pod's namespace (downward API).
    pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
    /// Lease duration (`15s`).
    pub const LEASE_DURATION: &str = "SHARDOP_LEASE_DURATION";
    /// Renew deadline (`10s`).
    pub const RENEW_DEADLINE: &str = "SHARDOP_RENEW_DEADLINE";
    /// Retry period (`2s`).
    pub const RETRY_PERIOD: &str = "SHARDOP_RETRY_PERIOD";
    /// Shutdown timeout (`20s`).
    pub const SHUTDOWN_TIMEOUT: &str = "SHARDOP_SHUTDOWN_TIMEOUT";
    /// Streaming lists (`true`).
    pub const STREAMING_LISTS: &str = "SHARDOP_STREAMING_LISTS";
    /// How often freed memory is given back to the system (`10s`; `off` never).
    pub const MEMORY_RETURN_INTERVAL: &str = "SHARDOP_MEMORY_RETURN_INTERVAL";
}

/// How often [`ShardingSettings::memory_return_interval`] gives freed memory back by default.
pub const DEFAULT_MEMORY_RETURN_INTERVAL: Duration = Duration::from_secs(10);

/// Parses a memory return interval: a positive duration (`10s`), or `off` for never.
pub fn parse_memory_return_interval(value: &str) -> Result<Option<Duration>, String> {
    match value {
        "off" => Ok(None),
        value => parse_positive_duration(value)
            .map(Some)
            .map_err(|e| format!("{e} (or `off`)")),
    }
}

impl ShardingSettings {
    /// Settings of operator `operator` for process `identity` (a StatefulSet pod name whose
    /// ordinal is the home shard) with Leases in `namespace`, and the default timings.
    pub fn new(operator: &str, identity: &str, namespace: &str) -> Result<Self, ShardingError> {
        let home = home_shard_of(identity).ok_or_else(|| {
            ShardingError::Settings(format!(
                "identity {identity:?} does not end in an ordinal below {}",
                crate::constants::MAX_SHARDS
            ))
        })?;
        Ok(Self {
            names: OperatorNames::new(operator)?,
            identity: identity.to_owned(),
            home,
            namespace: namespace.to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(20),
            streaming_lists: true,
            memory_return_interval: Some(DEFAULT_MEMORY_RETURN_INTERVAL),
        })
    }

    /// Settings from the environment (see [`env`]); `default_namespace` is used when neither
    /// `SHARDOP_OPERATOR_NAMESPACE` nor `POD_NAMESPACE` is set.
    pub fn from_env(operator: &str, default_namespace: &str) -> Result<Self, ShardingError> {
        Self::from_lookup(operator, default_namespace, |key| std::env::var(key).ok())
    }

    /// [`from_env`](Self::from_env) reading variables through `lookup`.
    pub fn from_lookup(
        operator: &str,
        default_namespace: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ShardingError> {
        let identity = lookup(env::IDENTITY)
            .ok_or_else(|| ShardingError::Settings(format!("{} is not set", env::IDENTITY)))?;
        let namespace = lookup(env::OPERATOR_NAMESPACE)
            .or_else(|| lookup(env::POD_NAMESPACE))
            .unwrap_or_else(|| default_namespace.to_owned());
        let mut settings = Self {
            home: ShardIndex(0),
            ..Self::new(operator, "x-0", &namespace)?
        };
        settings.identity = identity;
        settings.home = match lookup(env::SHARD).as_deref() {
            None | Some("auto") => home_shard_of(&settings.identity).ok_or_else(|| {
                ShardingError::Settings(format!(
                    "{} {:?} does not end in an ordinal; set {}",
                    env::IDENTITY,
                    settings.identity,
                    env::SHARD
                ))
            })?,
            Some(value) => value
                .parse()
                .map_err(|e| ShardingError::Settings(format!("{}: {e}", env::SHARD)))?,
        };
        let duration = |key: &str, default: Duration| match lookup(key) {
            None => Ok(default),
            Some(value) => parse_positive_duration(&value)
                .map_err(|e| ShardingError::Settings(format!("{key}: {e}"))),
        };
        settings.lease_duration = duration(env::LEASE_DURATION, settings.lease_duration)?;
        settings.renew_deadline = duration(env::RENEW_DEADLINE, settings.renew_deadline)?;
        settings.retry_period = duration(env::RETRY_PERIOD, settings.retry_period)?;
        settings.shutdown_timeout = duration(env::SHUTDOWN_TIMEOUT, settings.shutdown_timeout)?;
        if let Some(value) = lookup(env::STREAMING_LISTS) {
            settings.streaming_lists = bool::from_str(&value)
                .map_err(|e| ShardingError::Settings(format!("{}: {e}", env::STREAMING_LISTS)))?;
        }
        if let Some(value) = lookup(env::MEMORY_RETURN_INTERVAL) {
            settings.memory_return_interval =
                parse_memory_return_interval(&value).map_err(|e| {
                    ShardingError::Settings(format!("{}: {e}", env::MEMORY_RETURN_INTERVAL))
                })?;
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the timings: the lease duration is a whole number of seconds, and retry
    /// period < renew deadline < lease duration.
    pub fn validate(&self) -> Result<(), ShardingError> {
        // A Lease holds `leaseDurationSeconds`, an integer: a fractional duration would be
        // written shorter than the one the renew deadline is compared with, and others
        // could take over while this holder still writes.
        if self.lease_duration.subsec_nanos() != 0
            || self.lease_duration.is_zero()
            || i32::try_from(self.lease_duration.as_secs()).is_err()
        {
            return Err(ShardingError::Settings(format!(
                "the lease duration must be a whole number of seconds (at least 1s), not {:?}",
                self.lease_duration
            )));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(ShardingError::Settings(
                "the renew deadline must be shorter than the lease duration".into(),
            ));
        }
        if self.retry_period >= self.renew_deadline {
            return Err(ShardingError::Settings(
                "the retry period must be shorter than the renew deadline".into(),
            ));
        }
        Ok(())
    }

    /// The Lease holder settings.
    pub fn lease_settings(&self) -> LeaseSettings {
        LeaseSettings {
            namespace: self.namespace.clone(),
            identity: self.identity.clone(),
            lease_duration: self.lease_duration,
            renew_deadline: self.renew_deadline,
            retry_period: self.retry_period,
        }
    }
}

/// Where the runtime's clients come from.
#[derive(Clone)]
pub(crate) enum Clients {
    /// A factory: shared rate limits, user agents, request metrics.
    Factory(Box<ClientFactory>),
    /// The user's client, used as is (fenced clients wrap it).
    Plain(kube::Client),
}

impl Clients {
    pub(crate) fn lease_client(&self, agent: &str) -> Result<kube::Client, ClientError> {
        match self {
            Self::Factory(factory) => factory.lease_client(agent),
            Self::Plain(client) => Ok(client.clone()),
        }
    }

    pub(crate) fn fenced(
        &self,
        agent: &str,
        guard: LeaseGuard,
    ) -> Result<kube::Client, ClientError> {
        match self {
            Self::Factory(factory) => factory.fenced_client(agent, guard),
            Self::Plain(client) => Ok(fence_client(client.clone(), guard)),
        }
    }

    pub(crate) fn is_reachable(&self) -> bool {
        match self {
            Self::Factory(factory) => factory.reachability().is_reachable(),
            Self::Plain(_) => true,
        }
    }
}

type ReadinessHook = Arc<dyn Fn(bool) + Send + Sync>;

/// What the supervisor and the scopes share.
pub(crate) struct Runtime {
    pub settings: ShardingSettings,
    pub strategy: Arc<dyn AssignmentStrategy>,
    pub metrics: ShardMetrics,
    pub streaming_lists: bool,
    on_readiness: Option<ReadinessHook>,
}

impl Runtime {
    /// User agent of everything done as `shard`: `shardop-worker/shard-3 (shardop-worker-1)`.
    pub fn agent(&self, shard: ShardIndex) -> String {
        format!(
            "{}/shard-{shard} ({})",
            self.settings.names.worker_field_manager(),
            self.settings.identity
        )
    }

    /// User agent of the watch over all shard Leases.
    pub fn leases_agent(&self) -> String {
        format!(
            "{}/leases ({})",
            self.settings.names.worker_field_manager(),
            self.settings.identity
        )
    }

    pub fn set_ready(&self, ready: bool) {
        if let Some(hook) = &self.on_readiness {
            hook(ready);
        }
    }
}

/// A sharded controller process: serves its home shard, takes over shards of dead
/// processes and hands them back, each through the user's function (see
/// [`run`](Self::run)).
pub struct Sharding {
    settings: ShardingSettings,
    clients: Clients,
    strategy: Arc<dyn AssignmentStrategy>,
    metrics: Option<ShardMetrics>,
    shutdown: Option<CancellationToken>,
    on_readiness: Option<ReadinessHook>,
}

impl std::fmt::Debug for Sharding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sharding")
            .field("settings", &self.settings)
            .field("strategy", &self.strategy)
            .finish_non_exhaustive()
    }
}

impl Sharding {
    /// Sharding of operator `operator` with settings from the environment (see
    /// [`env`]: the identity from `POD_NAME`, the home shard from its ordinal, the
    /// namespace from `SHARDOP_OPERATOR_NAMESPACE`, `POD_NAMESPACE` or the client's default
    /// namespace), the label strategy, and `client` for every request. Stops on SIGTERM or
    /// SIGINT.
    pub async fn from_env(client: kube::Client, operator: &str) -> Result<Self, ShardingError> {
        let settings = ShardingSettings::from_env(operator, client.default_namespace())?;
        Ok(Self::new(client, settings))
    }

    /// Sharding with explicit settings, the label strategy, and `client` for every request
    /// (fenced per shard).
    pub fn new(client: kube::Client, settings: ShardingSettings) -> Self {
        Self::with_clients(Clients::Plain(client), settings)
    }

    /// Sharding whose clients come from `factory`: shared rate limits, a user agent per
    /// shard (`<operator>-worker/shard-<i> (<identity>)`) and request metrics.
    pub fn with_client_factory(factory: ClientFactory, settings: ShardingSettings) -> Self {
        Self::with_clients(Clients::Factory(Box::new(factory)), settings)
    }

    fn with_clients(clients: Clients, settings: ShardingSettings) -> Self {
        Self {
            strategy: Arc::new(LabelAssignment::new(settings.names.clone())),
            settings,
            clients,
            metrics: None,
            shutdown: None,
            on_readiness: None,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &ShardingSettings {
        &self.settings
    }

    /// Uses `metrics` (registered in the process's registry) for the per-shard metrics;
    /// without it they go to a registry nobody serves.
    pub fn with_metrics(mut self, metrics: ShardMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Stops (gracefully: controllers finish, Leases are released) when `shutdown` is
    /// cancelled instead of on SIGTERM/SIGINT.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    /// Uses another assignment strategy (see [`crate::strategy`]).
    pub fn with_strategy(mut self, strategy: impl AssignmentStrategy) -> Self {
        self.strategy = Arc::new(strategy);
        self
    }

    /// Calls `hook` after every supervisor tick with whether the process is ready: each of
    /// its home shards (its ordinal's, or those whose Leases name it home; not the retired
    /// ones) is served and its scope [reported synced](ShardScope::report_synced).
    pub fn on_readiness(mut self, hook: impl Fn(bool) + Send + Sync + 'static) -> Self {
        self.on_readiness = Some(Arc::new(hook));
        self
    }

    /// Serves shards until shutdown: for every shard Lease this process acquires (its home
    /// shard, and shards of dead processes after their Lease expired), `serve` is called
    /// with the shard's [`ShardScope`] and its future is run until it ends. When the shard
    /// is lost, handed back or the process shuts down, the scope's
    /// [`stopped`](ShardScope::stopped) completes; the future then has up to the stop grace
    /// (none for a lost Lease, half a lease duration for a hand-back, the shutdown timeout
    /// at shutdown) before it is aborted and the Lease released: at once after a clean
    /// stop, and after the fencing margin (`lease_duration − renew_deadline`) when a write
    /// may still be on the wire (the future was aborted, or a write was given up without
    /// an answer).
    pub async fn run<F, Fut>(self, serve: F) -> Result<(), ShardingError>
    where
        F: Fn(ShardScope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.settings.validate()?;
        let shutdown = self.shutdown.clone().unwrap_or_else(shutdown_on_signal);
        let streaming_lists = match self.resolve_streaming_lists(&shutdown).await? {
            Some(streaming_lists) => streaming_lists,
            // Shut down before the API server ever answered.
            None => return Ok(()),
        };
        let metrics = self.metrics.unwrap_or_else(|| {
            ShardMetrics::register(&mut prometheus_client::registry::Registry::default())
        });
        let runtime = Arc::new(Runtime {
            settings: self.settings,
            strategy: self.strategy,
            metrics,
            streaming_lists,
            on_readiness: self.on_readiness,
        });
        // Ends with this call (the guard), whether it stops by shutdown or by an error.
        let memory_return = shutdown.child_token();
        let _memory_return_ends = memory_return.clone().drop_guard();
        if let Some(every) = runtime.settings.memory_return_interval {
            tokio::spawn(crate::memory::return_freed_memory(every, memory_return));
        }
        let serve: Serve = Arc::new(move |scope| serve(scope).boxed());
        let supervisor = Supervisor {
            runtime,
            clients: self.clients,
            serve,
        };
        supervisor.run(shutdown).await
    }

    /// Whether streaming lists are used: asked for and served by the API server. `None`
    /// when shut down before the API server answered.
    async fn resolve_streaming_lists(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<bool>, ShardingError> {
        if !self.settings.streaming_lists {
            return Ok(Some(false));
        }
        let probe = match &self.clients {
            Clients::Factory(factory) => factory.client(&format!(
                "{}/probe ({})",
                self.settings.names.worker_field_manager(),
                self.settings.identity
            ))?,
            Clients::Plain(client) => client.clone(),
        };
        Ok(crate::watch_list::resolve_streaming_lists(
            probe,
            &self.settings.namespace,
            true,
            shutdown,
        )
        .await)
    }
}

/// A token cancelled on the first SIGTERM or SIGINT.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received, stopping gracefully");
        cancel.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |key| vars.get(key).cloned()
    }

    #[test]
    fn settings_from_the_environment() {
        let settings = ShardingSettings::from_lookup(
            "tenants",
            "default",
            lookup(&[("POD_NAME", "tenants-worker-2"), ("POD_NAMESPACE", "ops")]),
        )
        .unwrap();
        assert_eq!(settings.home, ShardIndex(2));
        assert_eq!(settings.namespace, "ops");
        assert_eq!(settings.names.shard_label(), "tenants.shardop.dev/shard");
        assert_eq!(settings.lease_duration, Duration::from_secs(15));
        assert_eq!(
            settings.memory_return_interval,
            Some(DEFAULT_MEMORY_RETURN_INTERVAL)
        );

        let settings = ShardingSettings::from_lookup(
            "tenants",
            "default",
            lookup(&[
                ("POD_NAME", "laptop"),
                ("SHARDOP_SHARD", "5"),
                ("SHARDOP_LEASE_DURATION", "30s"),
                ("SHARDOP_RENEW_DEADLINE", "20s"),
                ("SHARDOP_STREAMING_LISTS", "false"),
                ("SHARDOP_MEMORY_RETURN_INTERVAL", "off"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.home, ShardIndex(5));
        assert_eq!(settings.namespace, "default");
        assert_eq!(settings.lease_duration, Duration::from_secs(30));
        assert!(!settings.streaming_lists);
        assert_eq!(settings.memory_return_interval, None);
    }

    #[test]
    fn settings_that_make_no_sense_are_rejected() {
        for vars in [
            &[][..],
            &[("POD_NAME", "no-ordinal")],
            &[("POD_NAME", "w-0"), ("SHARDOP_SHARD", "1024")],
            &[("POD_NAME", "w-0"), ("SHARDOP_RENEW_DEADLINE", "15s")],
            &[("POD_NAME", "w-0"), ("SHARDOP_RETRY_PERIOD", "0s")],
            // The Lease would say 10 s while the holder writes until 10.2 s.
            &[
                ("POD_NAME", "w-0"),
                ("SHARDOP_LEASE_DURATION", "10.5s"),
                ("SHARDOP_RENEW_DEADLINE", "10.2s"),
            ],
            &[
                ("POD_NAME", "w-0"),
                ("SHARDOP_LEASE_DURATION", "1500ms"),
                ("SHARDOP_RENEW_DEADLINE", "1s"),
                ("SHARDOP_RETRY_PERIOD", "500ms"),
            ],
            &[
                ("POD_NAME", "w-0"),
                ("SHARDOP_MEMORY_RETURN_INTERVAL", "0s"),
            ],
        ] {
            assert!(
                ShardingSettings::from_lookup("tenants", "default", lookup(vars)).is_err(),
                "{vars:?} accepted"
            );
        }
        assert!(
            ShardingSettings::from_lookup("Bad", "default", lookup(&[("POD_NAME", "w-0")]))
                .is_err()
        );
    }
}
