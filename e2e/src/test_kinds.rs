//! Test-only kinds for sharding anything but DatabaseClusters: `Widget`, a cluster-scoped
//! custom resource with no schema beyond an open `spec` (group `e2e.shardop.dev`). Its
//! objects are global, so each test labels its own with [`TEST_LABEL`] and selects them by
//! it.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject};
use serde_json::json;

use crate::Cluster;

/// The API group of the test kinds.
pub const GROUP: &str = "e2e.shardop.dev";
/// The `--resource` name of the cluster-scoped `Widget` kind.
pub const WIDGET_RESOURCE: &str = "widgets.v1.e2e.shardop.dev";
/// A label with the creating test's name on every test object, to tell tests apart.
pub const TEST_LABEL: &str = "e2e.shardop.dev/test";

/// The `Widget` CustomResourceDefinition: cluster-scoped, `v1`, any `spec`.
pub fn widget_crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": format!("widgets.{GROUP}") },
        "spec": {
            "group": GROUP,
            "scope": "Cluster",
            "names": { "plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList" },
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "schema": { "openAPIV3Schema": {
                    "type": "object",
                    "properties": { "spec": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } }
                } }
            }]
        }
    }))
    .expect("a valid CustomResourceDefinition")
}

/// The `Widget` kind for dynamic requests.
pub fn widget_api_resource() -> ApiResource {
    ApiResource {
        group: GROUP.to_owned(),
        version: "v1".to_owned(),
        api_version: format!("{GROUP}/v1"),
        kind: "Widget".to_owned(),
        plural: "widgets".to_owned(),
    }
}

/// Installs the `Widget` CRD and waits until it is served.
pub async fn install_widget_crd(cluster: &Cluster) -> anyhow::Result<()> {
    crate::apply_crds(cluster, [widget_crd()]).await
}

/// A `Widget` named `name`, labelled as `test`'s.
pub fn widget(name: &str, test: &str) -> DynamicObject {
    let mut widget = DynamicObject::new(name, &widget_api_resource()).data(json!({ "spec": {} }));
    widget
        .metadata
        .labels
        .get_or_insert_default()
        .insert(TEST_LABEL.to_owned(), test.to_owned());
    widget
}
