//! The Tenant reconcile: render the settings ConfigMap, write it and the status only when
//! they differ from the cluster, and remove the ConfigMap (waiting until it is gone) before a
//! deleted Tenant's finalizer goes.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event, finalizer};
use kube::{Api, Client, ResourceExt};

use crate::desired::{self, Outcome};
use crate::tenant::Tenant;

/// The finalizer that keeps a Tenant until its settings ConfigMap is gone.
pub const FINALIZER: &str = "example.shardop.dev/settings";
/// Field manager of the operator's writes.
pub const FIELD_MANAGER: &str = "tenants-operator";
/// How often a converged Tenant is looked at again without any event (level-triggered
/// safety net; a converged look costs one read and no write).
const RESYNC: Duration = Duration::from_secs(3600);
/// How soon a failed reconcile is retried.
const RETRY: Duration = Duration::from_secs(5);

/// What every reconcile needs.
pub struct Context {
    /// Client of the operator's writes.
    pub client: Client,
    /// Namespace of the settings ConfigMaps.
    pub namespace: String,
    /// The shard being served: its labels go on every child.
    pub scope: shardop::ShardScope, // sharding:
}

/// Why a reconcile failed (retried by [`error_policy`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API request failed.
    #[error("{action}: {source}")]
    Api {
        /// What the request was for.
        action: &'static str,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The settings ConfigMap is being deleted; the finalizer stays until it is gone.
    #[error("settings ConfigMap {0} is still being deleted")]
    ChildStillPresent(String),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    /// The shard may not act (Lease lost) or a drain acknowledgement failed.
    #[error(transparent)] // sharding:
    Shard(#[from] shardop::ScopeError), // sharding:
}

fn api_error(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Api { action, source }
}

/// Reconciles one Tenant (of this shard: the library admits it first).
pub async fn reconcile(tenant: Arc<Tenant>, ctx: Arc<Context>) -> Result<Action, Error> {
    let tenants: Api<Tenant> = Api::all(ctx.client.clone());
    finalizer(&tenants, FINALIZER, tenant, |event| async {
        match event {
            Event::Apply(tenant) => apply(&tenant, &ctx).await,
            Event::Cleanup(tenant) => cleanup(&tenant, &ctx).await,
        }
    })
    .await
    .map_err(|err| Error::Finalizer(Box::new(err)))
}

/// Retries a failed reconcile after a pause.
pub fn error_policy(tenant: Arc<Tenant>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(tenant = tenant.name_any(), error = %error, "reconcile failed");
    Action::requeue(RETRY)
}

/// Brings the settings ConfigMap and the status in line with the spec.
async fn apply(tenant: &Tenant, ctx: &Context) -> Result<Action, Error> {
    let outcome = match desired::desired_config_map(tenant, &ctx.namespace) {
        Ok(mut config_map) => {
            // The child carries its Tenant's shard label, so it moves with it.
            ctx.scope.label_child(&mut config_map); // sharding:
            apply_config_map(&config_map, ctx).await?;
            Outcome::Rendered
        }
        Err(invalid) => Outcome::Invalid(invalid),
    };
    write_status(tenant, &outcome, ctx).await?;
    Ok(match outcome {
        Outcome::Rendered => Action::requeue(RESYNC),
        // Terminal: nothing changes until the spec does, which is an event.
        Outcome::Invalid(_) => Action::await_change(),
    })
}

/// Server-side applies `desired` if the live ConfigMap differs from it.
async fn apply_config_map(desired: &ConfigMap, ctx: &Context) -> Result<(), Error> {
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let name = desired.name_any();
    let live = config_maps
        .get_opt(&name)
        .await
        .map_err(api_error("reading the settings ConfigMap"))?;
    if !desired::config_map_differs(live.as_ref(), desired) {
        return Ok(());
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    config_maps
        .patch(&name, &params, &Patch::Apply(desired))
        .await
        .map_err(api_error("applying the settings ConfigMap"))?;
    tracing::info!(config_map = name, "settings ConfigMap applied");
    Ok(())
}

/// Writes the status `outcome` calls for, if it differs from the live one.
async fn write_status(tenant: &Tenant, outcome: &Outcome, ctx: &Context) -> Result<(), Error> {
    // Whole seconds, as the API server stores a condition's time: a second write of the same
    // status from a stale cache is then a no-op on the server.
    let now = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())
        .unwrap_or_else(|_| jiff::Timestamp::now());
    let status = desired::desired_status(tenant, outcome, now);
    if !desired::status_differs(tenant, &status) {
        return Ok(());
    }
    let tenants: Api<Tenant> = Api::all(ctx.client.clone());
    let patch = serde_json::json!({ "status": status });
    tenants
        .patch_status(
            &tenant.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(api_error("writing the Tenant's status"))?;
    Ok(())
}

/// Deletes the Tenant's settings ConfigMap (only if this Tenant controls it) and succeeds
/// once it is gone, so the finalizer goes last.
async fn cleanup(tenant: &Tenant, ctx: &Context) -> Result<Action, Error> {
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let name = desired::config_map_name(&tenant.name_any());
    let Some(live) = config_maps
        .get_opt(&name)
        .await
        .map_err(api_error("reading the settings ConfigMap"))?
    else {
        return Ok(Action::await_change());
    };
    let controlled_by_tenant = live
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == tenant.metadata.uid.as_ref());
    if !controlled_by_tenant {
        // Someone else's ConfigMap of that name: not ours to delete.
        return Ok(Action::await_change());
    }
    if live.metadata.deletion_timestamp.is_none() {
        let params = DeleteParams {
            preconditions: live.uid().map(|uid| kube::api::Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match config_maps.delete(&name, &params).await {
            Ok(either) if either.is_right() => return Ok(Action::await_change()),
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => {
                return Ok(Action::await_change());
            }
            Err(source) => return Err(api_error("deleting the settings ConfigMap")(source)),
        }
    }
    Err(Error::ChildStillPresent(name))
}
