//! The CustomResourceDefinitions, generated from the Rust types.
//!
//! `charts/shardop/crds/` holds the same YAML; a test fails when they drift apart
//! (`make crds` regenerates them).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{DatabaseCluster, Shard};

/// Every CRD shardop installs.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![DatabaseCluster::crd(), Shard::crd()]
}

/// The file name a CRD is kept under in `charts/shardop/crds/`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// One CRD as the YAML document committed to the chart.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    Ok(format!(
        "# Generated from crates/api by `make crds`. Do not edit.\n{}",
        serde_yaml::to_string(crd)?
    ))
}

/// All CRDs as one multi-document YAML stream.
pub fn all_to_yaml() -> Result<String, serde_yaml::Error> {
    let docs = all().iter().map(to_yaml).collect::<Result<Vec<_>, _>>()?;
    Ok(docs.join("---\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn chart_crd_dir() -> PathBuf {
        // Cargo sets the variable when it runs the test too; the run-time value follows the
        // checkout even when a shared target directory reuses a binary built elsewhere.
        let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
        PathBuf::from(manifest_dir).join("../../charts/shardop/crds")
    }

    #[test]
    fn chart_crds_match_the_rust_types() {
        let dir = chart_crd_dir();
        let mut expected_files = Vec::new();
        for crd in all() {
            let name = file_name(&crd);
            let generated = to_yaml(&crd).unwrap();
            let committed = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
            assert!(
                committed == generated,
                "charts/shardop/crds/{name} differs from the CRD generated from crates/api: run `make crds` and commit the result"
            );
            expected_files.push(name);
        }
        let mut present: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        present.sort();
        expected_files.sort();
        assert_eq!(
            present, expected_files,
            "stale files in charts/shardop/crds"
        );
    }

    /// Every `format` in a schema with the type it applies to.
    fn formats(schema: &serde_json::Value, found: &mut Vec<(Option<String>, String)>) {
        match schema {
            serde_json::Value::Object(object) => {
                if let Some(format) = object.get("format").and_then(|f| f.as_str()) {
                    let type_ = object.get("type").and_then(|t| t.as_str());
                    found.push((type_.map(str::to_owned), format.to_owned()));
                }
                object.values().for_each(|v| formats(v, found));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| formats(v, found)),
            _ => {}
        }
    }

    #[test]
    fn no_crd_schema_carries_a_format_the_api_server_does_not_know() {
        for crd in all() {
            let mut found = Vec::new();
            for version in &crd.spec.versions {
                let schema = serde_json::to_value(&version.schema).unwrap();
                formats(&schema, &mut found);
            }
            assert!(
                !found.is_empty(),
                "the walk finds formats (int32, date-time)"
            );
            for (type_, format) in found {
                assert!(
                    crate::schema::is_known_format(type_.as_deref(), &format),
                    "{}: format {format:?} on type {type_:?} makes kubectl warn `unrecognized format`",
                    file_name(&crd)
                );
            }
        }
    }

    #[test]
    fn database_cluster_crd_has_the_promised_shape() {
        let crd = DatabaseCluster::crd();
        assert_eq!(crd.spec.group, "shardop.dev");
        assert_eq!(crd.spec.names.short_names, Some(vec!["dbc".to_owned()]));
        let version = &crd.spec.versions[0];
        let columns: Vec<&str> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Shard", "Replicas", "Ready", "Available", "Age"]);
        assert!(version.subresources.as_ref().unwrap().status.is_some());
    }

    #[test]
    fn shard_crd_has_the_promised_columns() {
        let crd = Shard::crd();
        let columns: Vec<&str> = crd.spec.versions[0]
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            ["Index", "Holder", "State", "Objects", "Queue", "Age"]
        );
    }

    #[test]
    fn shard_index_is_bounded_by_the_maximum_shard_count() {
        let crd = serde_json::to_value(Shard::crd()).unwrap();
        let index = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["index"];
        assert_eq!(
            index["maximum"].as_f64(),
            Some(f64::from(crate::constants::MAX_SHARDS - 1)),
            "{index}"
        );
    }
}
