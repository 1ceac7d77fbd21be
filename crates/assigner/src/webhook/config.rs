//! The MutatingWebhookConfiguration: the leader keeps its `caBundle` equal to the CA
//! bundle in the Secret; on a local control plane (`--webhook-url`) it also writes the
//! whole configuration, since no chart rendered one.

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use shardop::OperatorNames;

use crate::resources::ResourceName;

/// The webhook's name inside the configuration (`assign.shardop.dev`).
pub fn webhook_name(names: &OperatorNames) -> String {
    format!("assign.{}", names.label_prefix())
}

/// What a full configuration contains.
pub struct Registration<'a> {
    pub names: &'a OperatorNames,
    pub kinds: &'a [ResourceName],
    /// Namespaces the assigner watches (all when empty).
    pub namespaces: &'a [String],
    pub url: &'a str,
}

/// The full configuration for a URL client (local control planes), in the chart's terms:
/// CREATE of the sharded kinds only, objects without the shard label only, never blocking.
pub fn url_configuration(name: &str, registration: &Registration<'_>, ca_pem: &str) -> Value {
    let names = registration.names;
    let rules: Vec<Value> = registration
        .kinds
        .iter()
        .map(|k| {
            json!({
                "apiGroups": [k.group],
                "apiVersions": [k.version],
                "resources": [k.resource],
                "operations": ["CREATE"],
                "scope": "*",
            })
        })
        .collect();
    let mut webhook = json!({
        "name": webhook_name(names),
        "admissionReviewVersions": ["v1"],
        "clientConfig": {
            "url": registration.url,
            "caBundle": ByteString(ca_pem.as_bytes().to_vec()),
        },
        "rules": rules,
        "failurePolicy": "Ignore",
        "matchPolicy": "Equivalent",
        "sideEffects": "None",
        "timeoutSeconds": 2,
        "reinvocationPolicy": "Never",
        "objectSelector": {
            "matchExpressions": [{ "key": names.shard_label(), "operator": "DoesNotExist" }],
        },
    });
    if !registration.namespaces.is_empty() {
        webhook["namespaceSelector"] = json!({
            "matchExpressions": [{
                "key": "kubernetes.io/metadata.name",
                "operator": "In",
                "values": registration.namespaces,
            }],
        });
    }
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": name },
        "webhooks": [webhook],
    })
}

/// Writes the whole URL configuration (server-side apply, the assigner's field manager).
pub async fn apply_url_configuration(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    registration: &Registration<'_>,
    ca_pem: &str,
) -> kube::Result<()> {
    let body = url_configuration(name, registration, ca_pem);
    let params = PatchParams::apply(&registration.names.assigner_field_manager()).force();
    api.patch(name, &params, &Patch::Apply(body)).await?;
    Ok(())
}

/// Whether `config` has webhook `webhook` calling `url` and trusting exactly `ca_pem`.
pub fn registers_url(
    config: &MutatingWebhookConfiguration,
    webhook: &str,
    url: &str,
    ca_pem: &str,
) -> bool {
    let want = ByteString(ca_pem.as_bytes().to_vec());
    config.webhooks.iter().flatten().any(|w| {
        w.name == webhook
            && w.client_config.url.as_deref() == Some(url)
            && w.client_config.ca_bundle.as_ref() == Some(&want)
    })
}

/// The JSON patch that sets `ca_pem` as the caBundle of every webhook of `config` named
/// `webhook` whose bundle differs (each guarded by a `test` of its name, so a concurrent
/// reorder fails the patch instead of writing the wrong entry); `None` when all match.
pub fn ca_bundle_patch(
    config: &MutatingWebhookConfiguration,
    webhook: &str,
    ca_pem: &str,
) -> Option<Value> {
    let want = ByteString(ca_pem.as_bytes().to_vec());
    let ops: Vec<Value> = config
        .webhooks
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, w)| w.name == webhook && w.client_config.ca_bundle.as_ref() != Some(&want))
        .flat_map(|(i, _)| {
            [
                json!({ "op": "test", "path": format!("/webhooks/{i}/name"), "value": webhook }),
                json!({
                    "op": "add",
                    "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                    "value": want,
                }),
            ]
        })
        .collect();
    (!ops.is_empty()).then_some(Value::Array(ops))
}

/// What [`sync_ca_bundle`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Synced {
    /// No such configuration (yet): looked at again on the next check.
    Missing,
    Unchanged,
    Written,
}

/// Sets the caBundle of the chart's configuration `name` to `ca_pem` where it differs.
pub async fn sync_ca_bundle(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    webhook: &str,
    ca_pem: &str,
) -> anyhow::Result<Synced> {
    let Some(config) = api.get_opt(name).await? else {
        return Ok(Synced::Missing);
    };
    let Some(patch) = ca_bundle_patch(&config, webhook, ca_pem) else {
        return Ok(Synced::Unchanged);
    };
    let patch: json_patch::Patch = serde_json::from_value(patch)?;
    api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await?;
    Ok(Synced::Written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration<'a>(
        names: &'a OperatorNames,
        kinds: &'a [ResourceName],
        ns: &'a [String],
    ) -> Registration<'a> {
        Registration {
            names,
            kinds,
            namespaces: ns,
            url: "https://127.0.0.1:1234/mutate",
        }
    }

    #[test]
    fn the_url_configuration_never_blocks_and_matches_only_unlabelled_creates() {
        let names = OperatorNames::default();
        let kinds = ["databaseclusters.v1alpha1.shardop.dev".parse().unwrap()];
        let config = url_configuration(
            "shardop-assigner",
            &registration(&names, &kinds, &[]),
            "PEM",
        );
        let typed: MutatingWebhookConfiguration = serde_json::from_value(config).unwrap();
        let webhook = &typed.webhooks.unwrap()[0];
        assert_eq!(webhook.name, "assign.shardop.dev");
        assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"));
        assert_eq!(webhook.timeout_seconds, Some(2));
        assert_eq!(webhook.side_effects, "None");
        assert_eq!(webhook.client_config.ca_bundle.as_ref().unwrap().0, b"PEM");
        let rule = &webhook.rules.as_ref().unwrap()[0];
        assert_eq!(rule.operations.as_ref().unwrap(), &["CREATE"]);
        assert_eq!(rule.resources.as_ref().unwrap(), &["databaseclusters"]);
        let selector = webhook.object_selector.as_ref().unwrap();
        let expression = &selector.match_expressions.as_ref().unwrap()[0];
        assert_eq!(expression.key, "shardop.dev/shard");
        assert_eq!(expression.operator, "DoesNotExist");
        assert!(webhook.namespace_selector.is_none());
        let ns = ["a".to_owned()];
        let scoped = url_configuration("x", &registration(&names, &kinds, &ns), "PEM");
        assert_eq!(
            scoped["webhooks"][0]["namespaceSelector"]["matchExpressions"][0]["values"],
            json!(["a"])
        );
    }

    #[test]
    fn only_a_differing_ca_bundle_is_patched() {
        let names = OperatorNames::default();
        let kinds = ["databaseclusters.v1alpha1.shardop.dev".parse().unwrap()];
        let mut config = url_configuration("c", &registration(&names, &kinds, &[]), "OLD");
        let other = json!({"name": "other.example.com", "clientConfig": {}, "sideEffects": "None", "admissionReviewVersions": ["v1"]});
        config["webhooks"].as_array_mut().unwrap().insert(0, other);
        let config: MutatingWebhookConfiguration = serde_json::from_value(config).unwrap();
        assert_eq!(ca_bundle_patch(&config, "assign.shardop.dev", "OLD"), None);
        let patch = ca_bundle_patch(&config, "assign.shardop.dev", "NEW").unwrap();
        assert_eq!(
            patch[0],
            json!({"op": "test", "path": "/webhooks/1/name", "value": "assign.shardop.dev"})
        );
        assert_eq!(patch[1]["path"], "/webhooks/1/clientConfig/caBundle");
        let mut value = serde_json::to_value(&config).unwrap();
        json_patch::patch(
            &mut value,
            &serde_json::from_value::<json_patch::Patch>(patch).unwrap(),
        )
        .unwrap();
        let patched: MutatingWebhookConfiguration = serde_json::from_value(value).unwrap();
        let hooks = patched.webhooks.unwrap();
        assert_eq!(hooks[1].client_config.ca_bundle.as_ref().unwrap().0, b"NEW");
        assert!(hooks[0].client_config.ca_bundle.is_none());
    }

    #[test]
    fn a_url_registration_is_current_only_with_its_url_and_bundle() {
        let names = OperatorNames::default();
        let config = url_configuration("c", &registration(&names, &[], &[]), "PEM");
        let config: MutatingWebhookConfiguration = serde_json::from_value(config).unwrap();
        let url = "https://127.0.0.1:1234/mutate";
        assert!(registers_url(&config, "assign.shardop.dev", url, "PEM"));
        assert!(!registers_url(&config, "assign.shardop.dev", url, "NEW"));
        assert!(!registers_url(
            &config,
            "assign.shardop.dev",
            "https://x/mutate",
            "PEM"
        ));
        assert!(!registers_url(&config, "other.example.com", url, "PEM"));
    }
}
