//! Which children are a DatabaseCluster's own: those whose controller owner reference names
//! it. A same-named object somebody else created (a Helm release's StatefulSet, a Service
//! made by hand) is never taken over by an apply nor deleted by the cleanup: a name
//! collision ends in a `Degraded` condition, not in another workload's loss.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use shardop_api::DatabaseCluster;

/// Whether `child`'s controller owner reference is `cluster` (by uid, so a former object of
/// the same name does not count).
pub fn is_controlled_by(child: &ObjectMeta, cluster: &DatabaseCluster) -> bool {
    cluster
        .metadata
        .uid
        .as_deref()
        .is_some_and(|uid| controller_uid(child) == Some(uid))
}

/// Whether `actual` has the controller `desired` names (a desired child carries its
/// parent's controller reference).
pub fn same_controller(desired: &ObjectMeta, actual: &ObjectMeta) -> bool {
    controller_uid(desired).is_some_and(|uid| controller_uid(actual) == Some(uid))
}

fn controller_uid(meta: &ObjectMeta) -> Option<&str> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true))
        .map(|owner| owner.uid.as_str())
}

/// The `Degraded` message of a `kind` child that exists under the name the object needs
/// but is not its own; `detail` is the API server's account of the conflict.
pub fn not_owned_message(kind: &str, detail: &str) -> String {
    format!(
        "a {kind} of this name exists and is not controlled by this DatabaseCluster; shardop \
         leaves it alone: delete or rename it, or give the DatabaseCluster another name \
         ({detail})"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn cluster(uid: &str) -> DatabaseCluster {
        let mut cluster: DatabaseCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "shardop.dev/v1alpha1",
            "kind": "DatabaseCluster",
            "metadata": { "name": "db", "namespace": "ns" },
            "spec": { "replicas": 1, "image": "postgres:17", "storage": { "size": "1Gi" } },
        }))
        .unwrap();
        cluster.metadata.uid = Some(uid.to_owned());
        cluster
    }

    fn owned_by(uid: &str, controller: Option<bool>) -> ObjectMeta {
        ObjectMeta {
            owner_references: Some(vec![OwnerReference {
                uid: uid.to_owned(),
                controller,
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_controller_reference_to_this_object_counts() {
        let db = cluster("u-1");
        assert!(is_controlled_by(&owned_by("u-1", Some(true)), &db));
        assert!(
            !is_controlled_by(&ObjectMeta::default(), &db),
            "made by hand"
        );
        assert!(
            !is_controlled_by(&owned_by("u-0", Some(true)), &db),
            "a former object of the same name"
        );
        assert!(
            !is_controlled_by(&owned_by("u-1", None), &db),
            "an owner, not the controller"
        );
        let mut without_uid = db.clone();
        without_uid.metadata.uid = None;
        assert!(!is_controlled_by(&owned_by("", Some(true)), &without_uid));
        let desired = owned_by("u-1", Some(true));
        assert!(same_controller(&desired, &owned_by("u-1", Some(true))));
        assert!(!same_controller(&desired, &ObjectMeta::default()));
        assert!(!same_controller(
            &ObjectMeta::default(),
            &ObjectMeta::default()
        ));
    }
}
