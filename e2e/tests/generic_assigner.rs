//! End-to-end tests of the generic assigner: `shardop-assigner --operator-name tenants`
//! sharding two kinds at once — ConfigMaps (namespaced, selected by namespace) and the
//! cluster-scoped test kind `Widget` — against the real control plane, next to an assigner
//! of the default operator that shards the very same objects with its own labels, Leases
//! and Shard objects. Workers are stand-ins that hold their shard's Lease, acknowledge
//! drains and release a retired shard's Lease when asked (the protocol's worker half,
//! nothing else).

// Tests fail by panicking; the workspace lints forbid unwrap/expect only in production code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{
    Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams, ResourceExt,
};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use shardop::names::OperatorNames;
use shardop::{Shard, ShardCount, shard_for};
use shardop_e2e::process::{ProcessSpec, ShardopProcess};
use shardop_e2e::test_kinds::{self, TEST_LABEL, WIDGET_RESOURCE};
use shardop_e2e::{Cluster, TestNamespace, cluster, wait_for};

const OBJECTS_PER_KIND: usize = 24;
const TIMEOUT: Duration = Duration::from_secs(120);

/// Which of the two kinds an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    ConfigMap,
    Widget,
}

/// The labels one operator keeps on an object: shard label value, drain label present.
type Placement = (Option<String>, bool);

/// Every label state of every object, per operator, as the test's own watches saw them.
type Timeline = Arc<Mutex<HashMap<(Kind, String), Vec<[Placement; 2]>>>>;

struct Env {
    cluster: &'static Cluster,
    client: Client,
    test: String,
    operator: TestNamespace,
    objects: TestNamespace,
    /// `[tenants, default]`.
    names: [OperatorNames; 2],
    timeline: Timeline,
}

impl Env {
    async fn new(test: &str) -> Self {
        let cluster = cluster();
        let client = cluster.client().await.unwrap();
        test_kinds::install_widget_crd(cluster).await.unwrap();
        let operator = TestNamespace::create(&client, &format!("{test}-op"))
            .await
            .unwrap();
        let objects = TestNamespace::create(&client, test).await.unwrap();
        let env = Self {
            cluster,
            client,
            test: objects.name.clone(),
            operator,
            objects,
            names: [
                OperatorNames::new("tenants").unwrap(),
                OperatorNames::default(),
            ],
            timeline: Timeline::default(),
        };
        env.record_timeline(Kind::ConfigMap);
        env.record_timeline(Kind::Widget);
        env
    }

    fn api(&self, kind: Kind) -> Api<DynamicObject> {
        match kind {
            Kind::ConfigMap => Api::namespaced_with(
                self.client.clone(),
                &self.objects.name,
                &ApiResource::erase::<ConfigMap>(&()),
            ),
            Kind::Widget => Api::all_with(self.client.clone(), &test_kinds::widget_api_resource()),
        }
    }

    /// The test's own objects of `kind` (widgets are global: selected by the test label).
    fn selector(&self, kind: Kind) -> Option<String> {
        (kind == Kind::Widget).then(|| format!("{TEST_LABEL}={}", self.test))
    }

    fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.operator.name)
    }

    fn record_timeline(&self, kind: Kind) {
        let timeline = self.timeline.clone();
        let mut config = watcher::Config::default();
        if let Some(selector) = self.selector(kind) {
            config = config.labels(&selector);
        }
        let names = self.names.clone();
        let stream = watcher(self.api(kind), config).applied_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(object)) = stream.next().await {
                let seen = names.clone().map(|n| {
                    let labels = object.labels();
                    (
                        labels.get(&n.shard_label()).cloned(),
                        labels.contains_key(&n.drain_label()),
                    )
                });
                let mut timeline = timeline.lock().unwrap();
                let entries = timeline.entry((kind, object.name_any())).or_default();
                if entries.last() != Some(&seen) {
                    entries.push(seen);
                }
            }
        });
    }

    async fn create_objects(&self) {
        let configmaps = self.api(Kind::ConfigMap);
        let widgets = self.api(Kind::Widget);
        for i in 0..OBJECTS_PER_KIND {
            let name = format!("cm-{i:03}");
            let cm = DynamicObject::new(&name, &ApiResource::erase::<ConfigMap>(&()))
                .within(&self.objects.name)
                .data(json!({ "data": { "i": i.to_string() } }));
            configmaps
                .create(&PostParams::default(), &cm)
                .await
                .unwrap();
            // Cluster-scoped: unique per test run.
            let widget = test_kinds::widget(&format!("{}-w-{i:03}", self.test), &self.test);
            widgets
                .create(&PostParams::default(), &widget)
                .await
                .unwrap();
        }
    }

    async fn list(&self, kind: Kind) -> Vec<DynamicObject> {
        let mut params = ListParams::default();
        if let Some(selector) = self.selector(kind) {
            params = params.labels(&selector);
        }
        self.api(kind)
            .list(&params)
            .await
            .map(|l| l.items)
            .unwrap_or_default()
    }

    /// The shard an object belongs on with `n` shards: a cluster-scoped object hashes with
    /// an empty namespace.
    fn desired(&self, kind: Kind, name: &str, n: u32) -> String {
        let namespace = match kind {
            Kind::ConfigMap => self.objects.name.as_str(),
            Kind::Widget => "",
        };
        shard_for(namespace, name, ShardCount::new(n).unwrap()).to_string()
    }

    /// Waits until every object of both kinds carries operator `names`' desired shard label
    /// for `n` shards and no drain label.
    async fn wait_labelled(&self, names: &OperatorNames, n: u32) {
        let what = format!(
            "every object labelled by {} for {n} shards",
            names.operator()
        );
        let result = wait_for(&what, TIMEOUT, || async {
            let mut total = 0;
            for kind in [Kind::ConfigMap, Kind::Widget] {
                let list = self.list(kind).await;
                if list.len() < OBJECTS_PER_KIND {
                    return None;
                }
                for object in &list {
                    let labels = object.labels();
                    let want = self.desired(kind, &object.name_any(), n);
                    if labels.get(&names.shard_label()) != Some(&want)
                        || labels.contains_key(&names.drain_label())
                    {
                        return None;
                    }
                }
                total += list.len();
            }
            Some(total)
        })
        .await;
        if let Err(err) = result {
            panic!("{err}\nlast labels seen: {:?}", self.last_seen());
        }
    }

    fn last_seen(&self) -> BTreeMap<String, [Placement; 2]> {
        self.timeline
            .lock()
            .unwrap()
            .iter()
            .filter_map(|((kind, name), e)| Some((format!("{kind:?}/{name}"), e.last()?.clone())))
            .collect()
    }

    /// Operator `which`'s label history of every object, checked against the two-phase
    /// handover: the shard label never changes from one shard to another directly, and is
    /// removed only after a drain was requested (every stand-in stays live, so no direct
    /// move is ever allowed). Returns how many handovers completed.
    fn assert_two_phase_moves(&self, which: usize) -> usize {
        let timeline = self.timeline.lock().unwrap();
        let mut violations = Vec::new();
        let mut handovers = 0;
        for ((kind, name), entries) in timeline.iter() {
            let states: Vec<&Placement> = entries.iter().map(|e| &e[which]).collect();
            // The owner that acknowledged the last drain, until the next label.
            let mut drained_from: Option<&String> = None;
            for window in states.windows(2) {
                let ((before, drain_before), (after, _)) = (window[0], window[1]);
                match (before, after) {
                    (Some(a), Some(b)) if a != b => {
                        violations.push(format!("{kind:?}/{name}: relabelled {a} -> {b} directly"));
                    }
                    (Some(a), None) if !drain_before => {
                        violations.push(format!(
                            "{kind:?}/{name}: label {a} removed without a drain"
                        ));
                    }
                    (Some(a), None) => drained_from = Some(a),
                    (None, Some(b)) => {
                        if drained_from.is_some_and(|a| a != b) {
                            handovers += 1;
                        }
                        drained_from = None;
                    }
                    _ => {}
                }
            }
        }
        assert!(
            violations.is_empty(),
            "dual ownership risk in {}'s labels:\n{}",
            self.names[which].operator(),
            violations.join("\n")
        );
        handovers
    }

    /// Operator `which`'s labels never changed after the first assignment.
    fn assert_never_moved(&self, which: usize) {
        let timeline = self.timeline.lock().unwrap();
        let moved: Vec<String> = timeline
            .iter()
            .filter(|(_, entries)| {
                let labels: BTreeSet<&Placement> = entries
                    .iter()
                    .map(|e| &e[which])
                    .filter(|p| p.0.is_some())
                    .collect();
                labels.len() > 1
            })
            .map(|((kind, name), entries)| format!("{kind:?}/{name}: {entries:?}"))
            .collect();
        assert!(
            moved.is_empty(),
            "{}'s labels moved although its shard count did not change:\n{}",
            self.names[which].operator(),
            moved.join("\n")
        );
    }

    /// Every object's shard label of each operator is owned by that operator's assigner
    /// (the other assigner never wrote it).
    async fn assert_label_owners(&self) {
        for kind in [Kind::ConfigMap, Kind::Widget] {
            for object in self.list(kind).await {
                let fields = object.metadata.managed_fields.as_deref();
                for names in &self.names {
                    assert!(
                        shardop::label_trust::shard_label_written_by(fields, names),
                        "{kind:?}/{}: {} not owned by {}: {fields:?}",
                        object.name_any(),
                        names.shard_label(),
                        names.assigner_field_manager()
                    );
                }
            }
        }
    }

    fn assigner(&self, name: &str, args: &[&str]) -> ShardopProcess {
        let mut spec = ProcessSpec::assigner(&self.test, name, &self.operator.name)
            .arg("--watch-namespaces")
            .arg(&self.objects.name)
            .arg("--resource")
            .arg("configmaps.v1")
            .arg("--resource")
            .arg(WIDGET_RESOURCE)
            .arg("--status-interval")
            .arg("1s");
        for arg in args {
            spec = spec.arg(*arg);
        }
        spec.spawn(self.cluster).unwrap()
    }

    async fn shard_objects(&self) -> BTreeSet<String> {
        Api::<Shard>::namespaced(self.client.clone(), &self.operator.name)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(ResourceExt::name_any)
            .collect()
    }
}

impl Drop for Env {
    /// Widgets are cluster-scoped: the namespace guards do not take them along, and a
    /// later run's assigner would keep sharding them.
    fn drop(&mut self) {
        let selector = format!("{TEST_LABEL}={}", self.test);
        let _ = self.cluster.kubectl(&[
            "delete",
            &format!("widgets.{}", test_kinds::GROUP),
            "-l",
            &selector,
            "--wait=false",
        ]);
    }
}

/// A stand-in for operator `names`' worker of `shard`: holds the shard's Lease, acknowledges
/// drains of both kinds (removing both labels, conditional on the resourceVersion) and
/// releases the Lease when the assigner asks (retirement).
struct StandIn {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl StandIn {
    async fn start(env: &Env, names: &OperatorNames, shard: u32) -> Self {
        let leases = env.leases();
        let index = shardop::ShardIndex(shard);
        let name = names.shard_lease_name(index);
        let holder = format!("{}-worker-{shard}", names.operator());
        let now = MicroTime(Timestamp::now());
        let spec = json!({
            "holderIdentity": holder,
            "acquireTime": now,
            "renewTime": now,
            "leaseDurationSeconds": 15,
        });
        let lease: Lease = serde_json::from_value(json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": { "name": name, "labels": { names.shard_lease_label(): shard.to_string() } },
            "spec": spec,
        }))
        .unwrap();
        leases.create(&PostParams::default(), &lease).await.unwrap();
        let release = names.release_requested_annotation();
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let Ok(current) = leases.get(&name).await else {
                    continue;
                };
                let patch = if current.annotations().contains_key(&release) {
                    json!({ "metadata": { "resourceVersion": current.resource_version() },
                            "spec": { "holderIdentity": null } })
                } else {
                    json!({ "metadata": { "resourceVersion": current.resource_version() },
                            "spec": { "renewTime": MicroTime(Timestamp::now()) } })
                };
                let released = current.annotations().contains_key(&release);
                let written = leases
                    .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await;
                if released && written.is_ok() {
                    return;
                }
            }
        });
        let mut tasks = vec![renew];
        for kind in [Kind::ConfigMap, Kind::Widget] {
            let api = env.api(kind);
            let mut selector = format!("{}={shard},{}", names.shard_label(), names.drain_label());
            if let Some(test) = env.selector(kind) {
                selector = format!("{selector},{test}");
            }
            let (shard_label, drain_label) = (names.shard_label(), names.drain_label());
            tasks.push(tokio::spawn(async move {
                watcher(api.clone(), watcher::Config::default().labels(&selector))
                    .applied_objects()
                    .for_each_concurrent(8, |object| {
                        let api = api.clone();
                        let (shard_label, drain_label) = (shard_label.clone(), drain_label.clone());
                        async move {
                            let Ok(object) = object else { return };
                            let mut labels = serde_json::Map::new();
                            labels.insert(shard_label, serde_json::Value::Null);
                            labels.insert(drain_label, serde_json::Value::Null);
                            let patch = json!({ "metadata": {
                                "resourceVersion": object.resource_version(),
                                "labels": labels,
                            }});
                            let _ = api
                                .patch(
                                    &object.name_any(),
                                    &PatchParams::default(),
                                    &Patch::Merge(patch),
                                )
                                .await;
                        }
                    })
                    .await;
            }));
        }
        Self { tasks }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The tenants assigner shards a namespaced and a cluster-scoped kind with its own names,
/// moves them 2 -> 3 -> 2 through the two-phase drain, and retires its own shard; the
/// default operator's assigner shards the same objects with its own labels, Leases and
/// Shard objects in the same namespace, and neither disturbs the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_shard_two_kinds_each_with_its_own_names() {
    let env = Env::new("generic-assigner").await;
    let [tenants, default] = env.names.clone();
    let tenants_sts = "tenants-worker";
    let mut sts = shardop_e2e::worker_stateful_set(2);
    sts.metadata.name = Some(tenants_sts.to_owned());
    Api::<k8s_openapi::api::apps::v1::StatefulSet>::namespaced(
        env.client.clone(),
        &env.operator.name,
    )
    .create(&PostParams::default(), &sts)
    .await
    .unwrap();
    let mut stand_ins: BTreeMap<(usize, u32), StandIn> = BTreeMap::new();
    for shard in 0..2 {
        stand_ins.insert((0, shard), StandIn::start(&env, &tenants, shard).await);
        stand_ins.insert((1, shard), StandIn::start(&env, &default, shard).await);
    }
    env.create_objects().await;

    let _tenants_assigner = env.assigner(
        "tenants-assigner-0",
        &[
            "--operator-name",
            "tenants",
            "--worker-statefulset",
            tenants_sts,
        ],
    );
    let _default_assigner = env.assigner("shardop-assigner-0", &["--shards", "2"]);
    env.wait_labelled(&tenants, 2).await;
    env.wait_labelled(&default, 2).await;

    // Grow the tenants operator to 3 shards: its objects move once shard 2 is served, the
    // default's stay. Shard 2's worker starts once the assigner counts it in (it creates the
    // Shard object): a Lease seen while N is still 2 would be retired at once.
    env.cluster
        .kubectl_ok(&[
            "-n",
            &env.operator.name,
            "scale",
            "statefulset",
            tenants_sts,
            "--replicas=3",
        ])
        .unwrap();
    wait_for("tenants shard 2 counted in", TIMEOUT, || async {
        env.shard_objects()
            .await
            .contains("tenants-shard-2")
            .then_some(())
    })
    .await
    .unwrap();
    stand_ins.insert((0, 2), StandIn::start(&env, &tenants, 2).await);
    env.wait_labelled(&tenants, 3).await;
    // Shrink back to 2: shard 2 drains, releases its Lease when asked, and is retired.
    env.cluster
        .kubectl_ok(&[
            "-n",
            &env.operator.name,
            "scale",
            "statefulset",
            tenants_sts,
            "--replicas=2",
        ])
        .unwrap();
    env.wait_labelled(&tenants, 2).await;
    wait_for("tenants shard 2 retired", TIMEOUT, || async {
        let shards = env.shard_objects().await;
        let lease = env.leases().get_opt("tenants-shard-2").await.ok()?;
        (lease.is_none() && !shards.contains("tenants-shard-2")).then_some(())
    })
    .await
    .unwrap();

    let handovers = env.assert_two_phase_moves(0);
    assert!(
        handovers > 0,
        "some objects must have moved through a drain"
    );
    env.assert_two_phase_moves(1);
    env.assert_never_moved(1);
    env.wait_labelled(&default, 2).await;
    env.assert_label_owners().await;

    // Each operator has exactly its own Shard objects and Leases.
    let shards = env.shard_objects().await;
    let expected: BTreeSet<String> = ["shard-0", "shard-1", "tenants-shard-0", "tenants-shard-1"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(shards, expected);
    let leases = env
        .leases()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    for lease in &leases {
        let annotations = lease.annotations();
        let name = lease.name_any();
        if name.starts_with("shardop-shard-") {
            assert!(
                !annotations.contains_key(&default.retired_annotation())
                    && !annotations.keys().any(|k| k.starts_with("tenants.")),
                "the default operator's Lease {name} was touched: {annotations:?}"
            );
        }
    }
    assert!(
        leases.iter().any(|l| l.name_any() == "tenants-assigner")
            && leases.iter().any(|l| l.name_any() == "shardop-assigner"),
        "each assigner elects its leader on its own Lease"
    );
    drop(stand_ins);
}

/// A kind the API server does not serve (its CRD not installed yet) keeps the assigner
/// waiting, not crashing: it names the kind and retries with backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_not_served_yet_is_named_and_retried() {
    let cluster = cluster();
    let client = cluster.client().await.unwrap();
    let operator = TestNamespace::create(&client, "unserved-kind-op")
        .await
        .unwrap();
    let mut assigner = ProcessSpec::assigner(&operator.name, "gizmos-assigner-0", &operator.name)
        .arg("--operator-name")
        .arg("gizmos")
        .arg("--shards")
        .arg("1")
        .arg("--resource")
        .arg("configmaps.v1")
        .arg("--resource")
        .arg("gizmos.v1.e2e.shardop.dev")
        .spawn(cluster)
        .unwrap();
    let reason = "the API server does not serve gizmos.v1.e2e.shardop.dev";
    let retries = wait_for("two attempts naming the kind", TIMEOUT, || async {
        let attempts = assigner.log().matches(reason).count();
        (attempts >= 2).then_some(attempts)
    })
    .await
    .unwrap_or_else(|err| panic!("{err}\n{}", assigner.log()));
    assert!(retries >= 2);
    assert!(assigner.is_running(), "waits instead of exiting");
    // It never planned: no Shard object, no label.
    let shards = Api::<Shard>::namespaced(client.clone(), &operator.name)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(shards.items.is_empty());
}
