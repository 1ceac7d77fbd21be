//! The CRDs on a real API server: installation, printer columns and admission-time validation.

// Tests fail by panicking; the workspace lints forbid unwrap/expect only in production code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;
use shardop_e2e::{TestNamespace, cluster, database_cluster_json, valid_spec, wait_for};

fn dbc_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("shardop.dev", "v1alpha1", "DatabaseCluster"),
        "databaseclusters",
    )
}

async fn create_raw(
    client: &kube::Client,
    namespace: &str,
    manifest: serde_json::Value,
) -> Result<DynamicObject, kube::Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &dbc_resource());
    let object: DynamicObject = serde_json::from_value(manifest).expect("valid DynamicObject JSON");
    api.create(&PostParams::default(), &object).await
}

#[tokio::test]
async fn crds_are_established_with_their_short_names() {
    let cluster = cluster();
    let client = cluster.client().await.unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    for name in ["databaseclusters.shardop.dev", "shards.shardop.dev"] {
        let crd = crds.get(name).await.unwrap();
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} is not Established");
    }
    let resources = cluster
        .kubectl_ok(&["api-resources", "--api-group=shardop.dev"])
        .unwrap();
    assert!(
        resources.contains("dbc"),
        "short name dbc missing:\n{resources}"
    );
}

#[tokio::test]
async fn valid_database_cluster_shows_printer_columns() {
    let cluster = cluster();
    let client = cluster.client().await.unwrap();
    let ns = TestNamespace::create(&client, "e2e-api").await.unwrap();
    let mut manifest = database_cluster_json("orders", valid_spec(3));
    manifest["metadata"]["labels"] = json!({ "shardop.dev/shard": "2" });
    create_raw(&client, &ns.name, manifest).await.unwrap();

    let table = cluster.kubectl_ok(&["get", "dbc", "-n", &ns.name]).unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "SHARD", "REPLICAS", "READY", "AVAILABLE", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..3], ["orders", "2", "3"], "{table}");

    // The defaulted reclaimPolicy is visible in the stored object.
    let policy = cluster
        .kubectl_ok(&[
            "get",
            "dbc",
            "orders",
            "-n",
            &ns.name,
            "-o",
            "jsonpath={.spec.storage.reclaimPolicy}",
        ])
        .unwrap();
    assert_eq!(policy, "Retain");
}

#[tokio::test]
async fn invalid_specs_are_rejected_naming_the_field() {
    let cluster = cluster();
    let client = cluster.client().await.unwrap();
    let ns = TestNamespace::create(&client, "e2e-api").await.unwrap();
    let with = |patch: serde_json::Value| {
        let mut spec = valid_spec(1);
        json_merge(&mut spec, patch);
        spec
    };
    let cases = [
        (
            "replicas-zero",
            with(json!({"replicas": 0})),
            "spec.replicas",
        ),
        (
            "replicas-ten",
            with(json!({"replicas": 10})),
            "spec.replicas",
        ),
        ("empty-image", with(json!({"image": ""})), "spec.image"),
        (
            "spaced-image",
            with(json!({"image": "postgres 17"})),
            "spec.image",
        ),
        (
            "bad-size",
            with(json!({"storage": {"size": "ten gigs"}})),
            "spec.storage.size",
        ),
        (
            "zero-size",
            with(json!({"storage": {"size": "0"}})),
            "spec.storage.size",
        ),
        (
            "bad-policy",
            with(json!({"storage": {"size": "1Gi", "reclaimPolicy": "Shred"}})),
            "spec.storage.reclaimPolicy",
        ),
        (
            "no-storage",
            json!({"replicas": 1, "image": "postgres:17"}),
            "spec.storage",
        ),
        (
            "cpu-lots",
            with(json!({"resources": {"requests": {"cpu": "lots"}}})),
            "spec.resources.requests[cpu]",
        ),
        (
            "memory-lots",
            with(json!({"resources": {"limits": {"memory": "a lot"}}})),
            "spec.resources.limits[memory]",
        ),
        (
            "negative-cpu",
            with(json!({"resources": {"limits": {"cpu": "-1"}}})),
            "spec.resources.limits[cpu]",
        ),
    ];
    for (name, spec, field) in cases {
        let err = create_raw(&client, &ns.name, database_cluster_json(name, spec))
            .await
            .expect_err(&format!("{name} must be rejected"));
        let kube::Error::Api(status) = err else {
            panic!("{name}: expected an API error, got {err}");
        };
        assert_eq!(status.code, 422, "{name}: {status:?}");
        assert!(
            status.message.contains(field),
            "{name}: message does not name {field}: {}",
            status.message
        );
    }
}

#[tokio::test]
async fn resource_quantities_in_any_spelling_are_admitted() {
    let cluster = cluster();
    let client = cluster.client().await.unwrap();
    let ns = TestNamespace::create(&client, "e2e-api").await.unwrap();
    let mut spec = valid_spec(1);
    spec["resources"] = json!({
        "requests": { "cpu": "0.5", "memory": "1024Mi" },
        "limits": { "cpu": 2, "memory": "1e9" },
    });
    create_raw(&client, &ns.name, database_cluster_json("spelled", spec))
        .await
        .unwrap();
}

/// A name whose derived names cannot exist is rejected with the limit and the reason; the
/// longest admitted name does run (e2e/tests/worker.rs
/// `the_longest_admitted_name_gets_its_children_and_its_pod`).
#[tokio::test]
async fn names_whose_children_cannot_exist_are_rejected_saying_why() {
    let cluster = cluster();
    let client = cluster.client().await.unwrap();
    let ns = TestNamespace::create(&client, "e2e-api").await.unwrap();
    let create = |metadata: serde_json::Value| {
        let mut manifest = database_cluster_json("unused", valid_spec(1));
        manifest["metadata"] = metadata;
        create_raw(&client, &ns.name, manifest)
    };
    let longest = "n".repeat(52);
    create(json!({ "name": longest })).await.unwrap();
    create(json!({ "generateName": "g".repeat(47) }))
        .await
        .unwrap();

    let cases = [
        (
            json!({ "name": "n".repeat(53) }),
            "metadata.name must be at most 52 characters",
        ),
        (
            json!({ "name": "orders.eu" }),
            "metadata.name must start with a lowercase letter",
        ),
        (
            json!({ "name": "1orders" }),
            "metadata.name must start with a lowercase letter",
        ),
        (
            json!({ "generateName": "g".repeat(48) }),
            "metadata.generateName must be at most 47 characters",
        ),
        (
            json!({ "generateName": "9-" }),
            "metadata.name must start with a lowercase letter",
        ),
    ];
    for (metadata, expected) in cases {
        let err = create(metadata.clone())
            .await
            .expect_err(&format!("{metadata} must be rejected"));
        let kube::Error::Api(status) = err else {
            panic!("{metadata}: expected an API error, got {err}");
        };
        assert_eq!(status.code, 422, "{metadata}: {status:?}");
        assert!(
            status.message.contains(expected),
            "{metadata}: {}",
            status.message
        );
    }
    // The message says why.
    let err = create(json!({ "name": "n".repeat(53) })).await.unwrap_err();
    assert!(
        err.to_string().contains("controller-revision-hash"),
        "{err}"
    );
}

/// `kubectl` prints no warning for the chart's CRDs (it used to print
/// `Warning: unrecognized format "uint32"`). Each is created under another group with a
/// server-side dry run, so that the API server runs the create path, where it warns.
#[test]
fn the_chart_crds_install_without_warnings() {
    let cluster = cluster();
    let dir = shardop_e2e::repo_root().join("charts/shardop/crds");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let yaml = std::fs::read_to_string(&path).unwrap();
        let renamed = yaml
            .replace(".shardop.dev\n", ".formats.e2e.shardop.dev\n")
            .replace("group: shardop.dev", "group: formats.e2e.shardop.dev");
        assert_ne!(renamed, yaml);
        let output = cluster
            .kubectl_with_input(&["create", "--dry-run=server", "-f", "-"], &renamed)
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{}: {stderr}", path.display());
        assert!(
            !stderr.contains("Warning"),
            "{}: kubectl warned: {stderr}",
            path.display()
        );
        checked += 1;
    }
    assert_eq!(checked, 2);
}

#[tokio::test]
async fn immutability_rules_are_enforced_on_update() {
    let cluster = cluster();
    let client = cluster.client().await.unwrap();
    let ns = TestNamespace::create(&client, "e2e-api").await.unwrap();
    let mut spec = valid_spec(1);
    spec["storage"] = json!({"size": "10Gi", "storageClassName": "fast"});
    create_raw(&client, &ns.name, database_cluster_json("inventory", spec))
        .await
        .unwrap();

    let patch = |body: &str| {
        cluster.kubectl(&[
            "patch",
            "dbc",
            "inventory",
            "-n",
            &ns.name,
            "--type=merge",
            "-p",
            body,
        ])
    };
    let shrink = patch(r#"{"spec":{"storage":{"size":"5Gi"}}}"#).unwrap();
    assert!(!shrink.status.success());
    assert!(String::from_utf8_lossy(&shrink.stderr).contains("size cannot be decreased"));

    let class = patch(r#"{"spec":{"storage":{"storageClassName":"slow"}}}"#).unwrap();
    assert!(!class.status.success());
    assert!(String::from_utf8_lossy(&class.stderr).contains("storageClassName is immutable"));

    let grow = patch(r#"{"spec":{"storage":{"size":"20Gi"},"replicas":3}}"#).unwrap();
    assert!(
        grow.status.success(),
        "{}",
        String::from_utf8_lossy(&grow.stderr)
    );
}

#[tokio::test]
async fn shards_show_their_columns() {
    let cluster = cluster();
    let client = cluster.client().await.unwrap();
    let ns = TestNamespace::create(&client, "e2e-api").await.unwrap();
    let manifest = json!({
        "apiVersion": "shardop.dev/v1alpha1",
        "kind": "Shard",
        "metadata": { "name": "shard-0", "namespace": ns.name },
        "spec": { "index": 0 },
    });
    let output = cluster
        .kubectl_with_input(&["apply", "-f", "-"], &manifest.to_string())
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status = json!({"status": {"holder": "shardop-worker-0", "state": "Active", "objects": 12, "queueDepth": 3}});
    cluster
        .kubectl_ok(&[
            "patch",
            "shard",
            "shard-0",
            "-n",
            &ns.name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ])
        .unwrap();
    let table = wait_for("shard status visible", Duration::from_secs(5), || async {
        let table = cluster
            .kubectl_ok(&["get", "shards", "-n", &ns.name])
            .ok()?;
        table.contains("Active").then_some(table)
    })
    .await
    .unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "INDEX", "HOLDER", "STATE", "OBJECTS", "QUEUE", "AGE"
        ],
        "{table}"
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..6],
        ["shard-0", "0", "shardop-worker-0", "Active", "12", "3"],
        "{table}"
    );
}

fn json_merge(target: &mut serde_json::Value, patch: serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(target), serde_json::Value::Object(patch)) => {
            for (key, value) in patch {
                json_merge(target.entry(key).or_insert(serde_json::Value::Null), value);
            }
        }
        (target, patch) => *target = patch,
    }
}
