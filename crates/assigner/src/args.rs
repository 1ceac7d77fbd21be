//! Command-line flags, each with an environment fallback so the chart can set them.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use shardop::OperatorNames;
use shardop_runtime::{KubeClientArgs, LogFormat, parse_positive_duration};

use crate::resources::{DEFAULT_RESOURCE, ResourceName};

/// Decides which shard owns each object of the sharded kinds and moves objects between
/// shards when the shard count changes, without ever letting two shards reconcile the same
/// object.
#[derive(Parser, Debug)]
#[command(name = "shardop-assigner", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the assigner (one leader at a time; other replicas stand by).
    Run(Box<RunArgs>),
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The operator this assigner serves: every label key, Lease name, Shard object name and
    /// field manager derives from it (`shardop` keeps the DatabaseCluster operator's names).
    #[arg(long, env = "SHARDOP_OPERATOR_NAME", default_value = shardop::names::DEFAULT_OPERATOR, value_parser = parse_operator_name)]
    pub operator_name: OperatorNames,
    /// A kind to shard, `<resource>.<version>.<group>` (`<resource>.<version>` for the core
    /// group, e.g. `configmaps.v1`); repeatable, comma-separated in the environment.
    /// Namespaced or cluster-scoped, as API discovery says.
    #[arg(
        long = "resource",
        env = "SHARDOP_RESOURCES",
        value_delimiter = ',',
        default_value = DEFAULT_RESOURCE
    )]
    pub resources: Vec<ResourceName>,
    /// Namespace of the shard Leases, the Shard objects, the worker StatefulSet and the
    /// assigner's own leader-election Lease.
    #[arg(
        long,
        env = "SHARDOP_OPERATOR_NAMESPACE",
        default_value = "shardop-system"
    )]
    pub operator_namespace: String,
    /// Worker StatefulSet whose `spec.replicas` is the desired shard count N; with
    /// `--shards`, the worker count the fixed shards are spread over instead.
    #[arg(
        long,
        env = "SHARDOP_WORKER_STATEFULSET",
        required_unless_present = "shards"
    )]
    pub worker_statefulset: Option<String>,
    /// A fixed desired shard count N (1 to `MAX_SHARDS`, 1024). Alone, workers
    /// `0..N` are each home for the shard of their ordinal; with `--worker-statefulset`,
    /// the N shards are spread over the StatefulSet's replicas, and a rescale moves whole
    /// shards between workers (no object is relabelled).
    #[arg(long, env = "SHARDOP_SHARDS", value_parser = shardop_api::parse_shard_count)]
    pub shards: Option<NonZeroU32>,
    /// Objects being moved at once (between the drain request and the new label).
    #[arg(long, env = "SHARDOP_MAX_CONCURRENT_MOVES", default_value_t = 1000, value_parser = parse_at_least_one)]
    pub max_concurrent_moves: usize,
    /// Label writes in flight at once (assignments, moves, cancellations).
    #[arg(long, env = "SHARDOP_MAX_CONCURRENT_WRITES", default_value_t = 256, value_parser = parse_at_least_one)]
    pub max_concurrent_writes: usize,
    /// Comma-separated namespaces to watch for objects of the namespaced kinds; all
    /// namespaces when empty. Cluster-scoped kinds are watched cluster-wide.
    #[arg(long, env = "SHARDOP_WATCH_NAMESPACES", value_delimiter = ',', num_args = 0..)]
    pub watch_namespaces: Vec<String>,
    /// Holder identity in the leader-election Lease; the pod name.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Leader-election Lease duration (whole seconds).
    #[arg(long, env = "SHARDOP_LEADER_LEASE_DURATION", default_value = "15s", value_parser = parse_positive_duration)]
    pub leader_lease_duration: Duration,
    /// The leader renews this long before its Lease would expire (whole seconds): every
    /// duration minus grace.
    #[arg(long, env = "SHARDOP_LEADER_LEASE_GRACE", default_value = "10s", value_parser = parse_positive_duration)]
    pub leader_lease_grace: Duration,
    /// The leader stops leading once no renewal has succeeded for this long: more than
    /// the renewal interval (duration minus grace), less than the duration, so it has
    /// stopped before a standby may take the Lease over. Default: duration minus half the
    /// grace (10s with the default duration and grace).
    #[arg(long, env = "SHARDOP_LEADER_RENEW_DEADLINE", value_parser = parse_positive_duration)]
    pub leader_renew_deadline: Option<Duration>,
    /// Minimum interval between two status writes to the same Shard object.
    #[arg(long, env = "SHARDOP_STATUS_INTERVAL", default_value = "10s", value_parser = parse_positive_duration)]
    pub status_interval: Duration,
    /// Full re-evaluation period even without any change (Lease expiry is a change of
    /// time, not of an object).
    #[arg(long, env = "SHARDOP_RESYNC_PERIOD", default_value = "2s", value_parser = parse_positive_duration)]
    pub resync_period: Duration,
    #[command(flatten)]
    pub kube: KubeClientArgs,
    #[command(flatten)]
    pub webhook: crate::webhook::WebhookArgs,
    /// Address of `/metrics` (port 0 = any free port, logged at start-up).
    #[arg(long, env = "SHARDOP_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Address of `/healthz` and `/readyz`; may equal the metrics address.
    #[arg(long, env = "SHARDOP_HEALTH_ADDR", default_value = "0.0.0.0:8081")]
    pub health_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "SHARDOP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

impl RunArgs {
    /// The identity: `--identity`/`POD_NAME`, else the host name.
    pub fn identity(&self) -> String {
        self.identity
            .clone()
            .filter(|i| !i.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .unwrap_or_else(|| "shardop-assigner".to_owned())
    }

    /// The sharded kinds, each once, in the order given.
    pub fn resources(&self) -> Vec<ResourceName> {
        let mut unique: Vec<ResourceName> = Vec::with_capacity(self.resources.len());
        for resource in &self.resources {
            if !unique.contains(resource) {
                unique.push(resource.clone());
            }
        }
        unique
    }

    /// The watched namespaces, blanks removed; empty = all namespaces.
    pub fn namespaces(&self) -> Vec<String> {
        self.watch_namespaces
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect()
    }
}

fn parse_operator_name(value: &str) -> Result<OperatorNames, String> {
    OperatorNames::new(value.trim()).map_err(|e| e.to_string())
}

/// A count where 0 would stop all progress (concurrency limits): at least 1.
fn parse_at_least_one(value: &str) -> Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(0) => Err("0 would stop all progress: use at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{value:?} is not a whole number ≥ 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_statefulset_or_both() {
        let parse = |args: &[&str]| Cli::try_parse_from(args.iter().copied());
        let cli = parse(&["a", "run", "--shards", "3", "--watch-namespaces", "x, y"]).unwrap();
        let Command::Run(args) = cli.command;
        assert_eq!(args.shards, NonZeroU32::new(3));
        assert_eq!(args.namespaces(), ["x", "y"]);
        assert_eq!(args.max_concurrent_moves, 1000);
        assert_eq!(args.max_concurrent_writes, 256);
        assert!(parse(&["a", "run"]).is_err(), "N must come from somewhere");
        let both = parse(&["a", "run", "--shards", "12", "--worker-statefulset", "w"]).unwrap();
        let Command::Run(both) = both.command;
        assert_eq!(both.shards, NonZeroU32::new(12));
        assert_eq!(both.worker_statefulset.as_deref(), Some("w"));
        assert!(parse(&["a", "run", "--worker-statefulset", "shardop-worker"]).is_ok());
        let max = parse(&["a", "run", "--shards", "1024"]).unwrap();
        let Command::Run(args) = max.command;
        assert_eq!(args.shards, NonZeroU32::new(1024));
        for count in ["0", "1025", "4294967295", "4294967296"] {
            assert!(
                parse(&["a", "run", "--shards", count]).is_err(),
                "--shards {count} must be rejected"
            );
        }
    }

    #[test]
    fn knobs_that_would_stop_progress_are_rejected() {
        let parse = |extra: &[&str]| {
            let args = ["a", "run", "--shards", "1"].iter().chain(extra).copied();
            Cli::try_parse_from(args)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert!(parse(&["--max-concurrent-writes", "1"]).is_ok());
        for bad in [
            &["--max-concurrent-moves", "0"][..],
            &["--max-concurrent-writes=0"],
            &["--resync-period", "0s"],
            &["--status-interval=0"],
            &["--leader-lease-duration", "0ms"],
            &["--kube-qps=-1"],
            &["--kube-qps", "NaN"],
            &["--kube-burst", "0"],
        ] {
            let err = parse(bad).expect_err(&format!("{bad:?} must be rejected"));
            assert!(err.contains(bad[0].split('=').next().unwrap()), "{err}");
        }
    }

    #[test]
    fn the_default_is_the_database_cluster_operator() {
        let cli = Cli::try_parse_from(["a", "run", "--shards", "1"]).unwrap();
        let Command::Run(args) = cli.command;
        assert!(args.operator_name.is_default());
        assert_eq!(
            args.resources(),
            [DEFAULT_RESOURCE.parse::<ResourceName>().unwrap()]
        );
    }

    #[test]
    fn several_resources_and_another_operator() {
        let cli = Cli::try_parse_from([
            "a",
            "run",
            "--shards",
            "1",
            "--operator-name",
            "tenants",
            "--resource",
            "configmaps.v1",
            "--resource=widgets.v1.example.com,configmaps.v1",
        ])
        .unwrap();
        let Command::Run(args) = cli.command;
        assert_eq!(args.operator_name.operator(), "tenants");
        let resources: Vec<String> = args.resources().iter().map(ToString::to_string).collect();
        assert_eq!(resources, ["configmaps.v1", "widgets.v1.example.com"]);
        for bad in [
            &["--operator-name", "Tenants"][..],
            &["--resource", "widgets"],
            &["--resource", ""],
        ] {
            let args = ["a", "run", "--shards", "1"].iter().chain(bad).copied();
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?} accepted");
        }
    }
}
