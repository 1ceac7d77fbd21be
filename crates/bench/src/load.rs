//! The load generator's objects.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use shardop_api::{DatabaseCluster, DatabaseClusterSpec, ReclaimPolicy, StorageSpec};

/// An unlabelled DatabaseCluster as a user would create it.
pub fn database_cluster(name: &str, replicas: i32) -> DatabaseCluster {
    DatabaseCluster {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        spec: DatabaseClusterSpec {
            replicas,
            image: "postgres:17".to_owned(),
            resources: None,
            storage: StorageSpec {
                storage_class_name: None,
                size: Quantity("1Gi".to_owned()),
                reclaim_policy: ReclaimPolicy::Delete,
            },
        },
        status: None,
    }
}
