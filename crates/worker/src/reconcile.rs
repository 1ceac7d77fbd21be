//! The DatabaseCluster reconcile: the protocol decides (`worker_action`), this module carries
//! it out with as few writes as possible, each one fenced by the shard's Lease.
//!
//! Writes of a new object: finalizer, Service and StatefulSet (server-side apply), status
//! (merge patch on the status subresource). A converged object costs none: children are
//! compared with the cache before applying, status before writing.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions, PropagationPolicy,
};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use shardop::Admission;
use shardop::protocol::{WorkerAction, worker_action};
use shardop_api::constants::condition::CLEANUP;
use shardop_api::constants::{FINALIZER, MANAGED_BY_LABEL, MANAGED_BY_VALUE, WORKER_FIELD_MANAGER};
use shardop_api::{DatabaseCluster, DatabaseClusterStatus, ReclaimPolicy};
use tracing::Instrument;

use crate::backoff::jitter_unit;
use crate::book::{AppliedMemo, AppliedObject, Bookkeeping, key_of, numeric_resource_version};
use crate::child_cache::Projected;
use crate::child_store::ChildStore;
use crate::children::{self, desired_service, desired_stateful_set, is_subset};
use crate::claims::{self, ClaimDeletionError, DeletionPass};
use crate::cluster_cache::CachedCluster;
use crate::condition_set::{ConditionValue, set_condition};
use crate::context::ScopeContext;
pub use crate::error::ReconcileError;
use crate::ownership;
use crate::status::{
    Observed, TerminalProblem, WrittenStatus, desired_status, is_newer, known_status,
};
use crate::volume_resize::{self, Resize, ResizeIo};

/// Requeue of an object whose spec cannot be applied: it waits for a spec change.
const TERMINAL_RESYNC: Duration = Duration::from_secs(10 * 60);
/// First requeue while deleted claims are still terminating; it doubles with every pass
/// that still finds some, up to [`CLEANUP_POLL_CAP`].
const CLEANUP_POLL: Duration = Duration::from_secs(1);
/// Longest wait between two cleanup passes of one object.
const CLEANUP_POLL_CAP: Duration = Duration::from_secs(30);

/// The wait before cleanup pass `passes + 1` of an object whose claims are still going:
/// 1 s, 2 s, 4 s, ... up to 30 s. Every pass sends a request per claim (a DELETE in the
/// first, a GET in the later ones), so a fixed 1 s poll would cost a request per claim per
/// second for as long as the pods take to stop.
fn cleanup_poll(passes: u32) -> Duration {
    shardop_runtime::retry::doubling_delay(CLEANUP_POLL, CLEANUP_POLL_CAP, passes)
}

/// A terminal problem in an apply error: the API server will never accept this child for
/// this spec. That is a 409 of an apply that would have taken over somebody else's
/// same-named object ([`apply_child`]), a 422 Invalid (e.g. an immutable StatefulSet field), a 400 Bad
/// Request, or a 500 that says our own object could not be decoded: the API server answers
/// `cpu: lots` in a container's resources with 500 "failed to convert new object ...:
/// quantities must match the regular expression ...", and retrying it as a server error
/// would loop forever without a condition saying why.
fn terminal_problem(err: &kube::Error, child: &'static str) -> Option<TerminalProblem> {
    match err {
        // An apply that found the child's name taken by somebody else's object.
        kube::Error::Api(status) if is_field_manager_conflict(status) => Some(TerminalProblem {
            reason: format!("{child}NotOwned"),
            message: ownership::not_owned_message(child, &status.message),
        }),
        kube::Error::Api(status)
            if status.code == 422 || status.code == 400 || is_undecodable_object(status) =>
        {
            Some(TerminalProblem {
                reason: format!("{child}Rejected"),
                message: status.message.clone(),
            })
        }
        _ => None,
    }
}

/// Whether `status` is a server-side apply's conflict with fields another manager owns
/// (not a resourceVersion conflict, which is retried).
fn is_field_manager_conflict(status: &kube::core::Status) -> bool {
    status.code == 409
        && status.details.as_ref().is_some_and(|details| {
            details
                .causes
                .iter()
                .any(|cause| cause.reason == "FieldManagerConflict")
        })
}

/// Messages of a 500 with which the API server rejects the object in the request itself
/// (decoding or converting it, or building the apply patch from it) rather than failing
/// on its own side (etcd, timeouts, webhooks): the same request fails the same way again.
const UNDECODABLE_OBJECT_MESSAGES: [&str; 3] = [
    "failed to convert new object",
    "unable to convert unstructured object",
    "failed to create typed patch object",
];

fn is_undecodable_object(status: &kube::core::Status) -> bool {
    status.code == 500
        && UNDECODABLE_OBJECT_MESSAGES
            .iter()
            .any(|m| status.message.contains(m))
}

/// kube-runtime's reconcile entry point.
pub async fn reconcile(
    cluster: Arc<CachedCluster>,
    ctx: Arc<ScopeContext>,
) -> Result<Action, ReconcileError> {
    let shared = ctx.shared.clone();
    let key = key_of(cluster.as_ref());
    let shard = shared.shard;
    let span = tracing::info_span!(
        "reconcile",
        object = %key,
        shard = %shard,
        generation = cluster.meta().generation,
        action = tracing::field::Empty,
        result = tracing::field::Empty,
    );
    let started = std::time::Instant::now();
    let outcome = reconcile_cached(&cluster, &ctx, &key)
        .instrument(span.clone())
        .await;
    let result = match &outcome {
        Ok(Outcome::Done) => "success",
        Ok(Outcome::Terminal) => "terminal",
        Ok(Outcome::Skipped) => "skipped",
        Ok(Outcome::CleanupPending) => "cleanup_pending",
        Ok(Outcome::Waiting(_)) => "waiting",
        Err(_) => "error",
    };
    span.record("result", result);
    shared.scope.finished(cluster.as_ref());
    shared
        .metrics
        .record_reconcile(shard, result, started.elapsed());
    match outcome {
        Ok(Outcome::Done) => {
            shared.failures.reset(&key);
            // The periodic resync is the controller's (`crate::resync`), not a requeue.
            Ok(Action::await_change())
        }
        Ok(Outcome::Terminal) => {
            shared.failures.reset(&key);
            Ok(Action::requeue(TERMINAL_RESYNC))
        }
        Ok(Outcome::Skipped) => Ok(Action::await_change()),
        Ok(Outcome::CleanupPending) => {
            let passes = shared.cleanup_passes.record_failure(key.clone());
            Ok(Action::requeue(cleanup_poll(passes)))
        }
        Ok(Outcome::Waiting(after)) => {
            shared.failures.reset(&key);
            Ok(Action::requeue(after))
        }
        Err(err) => {
            span.in_scope(|| tracing::warn!(error = %err, "reconcile failed"));
            Err(err)
        }
    }
}

/// kube-runtime's error policy: per-object exponential backoff.
pub fn error_policy(
    cluster: Arc<CachedCluster>,
    err: &ReconcileError,
    ctx: Arc<ScopeContext>,
) -> Action {
    let shared = &ctx.shared;
    let lease_lost = matches!(err, ReconcileError::LeaseLost(_));
    shared
        .metrics
        .record_error(shared.shard, err.reason(), !lease_lost);
    if lease_lost {
        // Not the object's fault; the controller is being stopped anyway.
        return Action::requeue(shared.retry_period);
    }
    let failures = shared.failures.record_failure(key_of(cluster.as_ref()));
    Action::requeue(shared.backoff.jittered(failures, jitter_unit()))
}

enum Outcome {
    /// Converged (or cleaned up, or drained).
    Done,
    /// The spec cannot be applied; Degraded is set.
    Terminal,
    /// Not this shard's business (or nothing left to do for it).
    Skipped,
    /// Deleted claims are still terminating; look again shortly (their deletion produces
    /// no event on the DatabaseCluster).
    CleanupPending,
    /// A step in progress that produces no event (a volume resize); look again then.
    Waiting(Duration),
}

/// Reconciles the object the cache holds in its compact form.
async fn reconcile_cached(
    cached: &CachedCluster,
    ctx: &ScopeContext,
    key: &str,
) -> Result<Outcome, ReconcileError> {
    let cluster = match cached.object() {
        Some(cluster) => cluster,
        None => match read_cluster(cached, ctx).await? {
            Some(cluster) => cluster,
            // Deleted meanwhile: its watch event tells the cache.
            None => return Ok(Outcome::Skipped),
        },
    };
    reconcile_inner(&cluster, ctx, key).await
}

/// The object from the API server, as the cache would hold it, for a cached form that
/// does not read back (see [`CachedCluster::object`]).
async fn read_cluster(
    cached: &CachedCluster,
    ctx: &ScopeContext,
) -> Result<Option<DatabaseCluster>, ReconcileError> {
    let namespace = cached.namespace().unwrap_or_default();
    let found = api(ctx, &namespace)
        .get_opt(&cached.name_any())
        .await
        .map_err(ReconcileError::kube("reading the DatabaseCluster"))?;
    Ok(found.map(|mut cluster| {
        ctx.shared.scope.trim_cached(&mut cluster);
        cluster
    }))
}

async fn reconcile_inner(
    cluster: &DatabaseCluster,
    ctx: &ScopeContext,
    key: &str,
) -> Result<Outcome, ReconcileError> {
    // The library decides whether this shard may act: Lease held, trusted label of this
    // shard, and a drain acknowledged (W2) before this code could see it.
    let admission = ctx.shared.scope.admit(cluster).await?;
    tracing::Span::current().record("action", tracing::field::debug(admission));
    match admission {
        Admission::Skip => Ok(Outcome::Skipped),
        Admission::Cleanup => cleanup(cluster, ctx, key).await,
        Admission::Reconcile => converge(cluster, ctx, key).await,
    }
}

fn api(ctx: &ScopeContext, namespace: &str) -> Api<DatabaseCluster> {
    Api::namespaced(ctx.client.clone(), namespace)
}

fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(WORKER_FIELD_MANAGER.to_owned()),
        ..Default::default()
    }
}

/// Adds our finalizer by server-side apply: `metadata.finalizers` is a set, so the apply
/// adds our entry and leaves everyone else's alone without needing the latest version. A
/// merge patch would replace the whole list and so needs a resourceVersion precondition,
/// which a spec change racing the first reconcile turns into a conflict and a backoff (a
/// quarter of all creates in `churn`, where objects are changed a minute after creation).
async fn add_finalizer(
    cluster: &DatabaseCluster,
    ctx: &ScopeContext,
) -> Result<DatabaseCluster, ReconcileError> {
    let name = cluster.name_any();
    let patch = json!({
        "apiVersion": DatabaseCluster::api_version(&()),
        "kind": DatabaseCluster::kind(&()),
        "metadata": { "name": name, "finalizers": [FINALIZER] },
    });
    ctx.shared.guard.check()?;
    api(ctx, &cluster.namespace().unwrap_or_default())
        .patch(
            &name,
            &PatchParams::apply(WORKER_FIELD_MANAGER),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(ReconcileError::kube("adding the finalizer"))
}

/// Removes our finalizer with a resourceVersion precondition: the cleanup was done for the
/// version we saw, and nothing may have changed since (a merge patch replaces the whole
/// list, so it must be based on the list we saw).
async fn remove_finalizer(
    cluster: &DatabaseCluster,
    ctx: &ScopeContext,
) -> Result<DatabaseCluster, ReconcileError> {
    let finalizers: Vec<&String> = cluster
        .finalizers()
        .iter()
        .filter(|f| f.as_str() != FINALIZER)
        .collect();
    let patch = json!({
        "metadata": {
            "resourceVersion": cluster.resource_version(),
            "finalizers": finalizers,
        }
    });
    ctx.shared.guard.check()?;
    api(ctx, &cluster.namespace().unwrap_or_default())
        .patch(&cluster.name_any(), &params(), &Patch::Merge(&patch))
        .await
        .map_err(ReconcileError::kube("removing the finalizer"))
}

/// The cached child `namespace/name`, with the fields a reconcile reads.
fn cached<K: Projected>(store: &ChildStore<K>, namespace: &str, name: &str) -> Option<Arc<K>> {
    store.get(namespace, name).map(Arc::new)
}

/// Server-side applies `desired` unless the server already has it. Returns the object as
/// the server has it (cached, as last applied, or freshly applied).
async fn apply_if_changed<K>(
    ctx: &ScopeContext,
    desired: &K,
    store: &ChildStore<K>,
    ownership_changed: bool,
    action: &'static str,
) -> Result<K, ReconcileError>
where
    K: Projected<Scope = k8s_openapi::NamespaceResourceScope> + std::fmt::Debug,
{
    let namespace = desired.meta().namespace.clone().unwrap_or_default();
    let name = desired.meta().name.clone().unwrap_or_default();
    let memo_key = Bookkeeping::applied_key(&K::kind(&()), &namespace, &name);
    let fingerprint = fingerprint(desired);
    // The memo before the cache: the child watch updates the cache *before* it forgets the
    // memo of the version it delivered, so a memo that is gone by now means the cache read
    // next already holds our write. Read the other way round, a delivery on another thread
    // between the two reads left neither, and the same child was applied twice.
    let memo = ctx.shared.book().applied_memo(&memo_key);
    let cached = cached(store, &namespace, &name);
    if let Some(current) = already_applied(
        desired,
        fingerprint,
        memo.as_ref(),
        cached.as_deref(),
        ownership_changed,
    ) {
        return Ok(current);
    }
    ctx.shared.guard.check()?;
    tracing::debug!(child = %children::describe(desired), "applying");
    let known_own = cached
        .as_deref()
        .is_some_and(|c| ownership::same_controller(desired.meta(), c.meta()));
    let applied = apply_child(ctx, desired, known_own)
        .await
        .map_err(ReconcileError::kube(action))?;
    crate::fault::after_write();
    let mut memo = applied.clone();
    memo.meta_mut().managed_fields = None;
    ctx.shared.book().remember_applied(
        memo_key,
        (
            fingerprint,
            numeric_resource_version(&applied),
            Arc::new(memo) as AppliedObject,
        ),
    );
    Ok(applied)
}

/// Server-side applies `desired`, taking over fields other managers set (drift, a hand
/// edit) only on a child this object controls: known from the cache (`known_own`), or read
/// back after a conflict. A same-named child somebody else made is left alone and the
/// conflict returned (409: the object ends `Degraded`, see [`terminal_problem`]).
async fn apply_child<K>(ctx: &ScopeContext, desired: &K, known_own: bool) -> Result<K, kube::Error>
where
    K: Projected<Scope = k8s_openapi::NamespaceResourceScope> + std::fmt::Debug,
{
    let namespace = desired.meta().namespace.clone().unwrap_or_default();
    let name = desired.meta().name.clone().unwrap_or_default();
    let api = Api::<K>::namespaced(ctx.client.clone(), &namespace);
    let force = PatchParams::apply(WORKER_FIELD_MANAGER).force();
    if known_own {
        return api.patch(&name, &force, &Patch::Apply(desired)).await;
    }
    let unforced = PatchParams::apply(WORKER_FIELD_MANAGER);
    match api.patch(&name, &unforced, &Patch::Apply(desired)).await {
        Err(kube::Error::Api(status)) if is_field_manager_conflict(&status) => {
            let current = api.get_opt(&name).await?;
            if current.is_some_and(|c| ownership::same_controller(desired.meta(), c.meta())) {
                api.patch(&name, &force, &Patch::Apply(desired)).await
            } else {
                Err(kube::Error::Api(status))
            }
        }
        other => other,
    }
}

/// The child as the server has it when no apply is needed: the cached object if it already
/// contains `desired`, or the object of our last apply of the same desired child
/// (`fingerprint`) while the cache has not caught up with that write yet (the watch lags
/// our own writes by a few milliseconds, and a reconcile triggered in that window must not
/// apply the same object again). `None`: apply.
///
/// After a change of ownership (`ownership_changed`) neither answers: the previous owner
/// may have relabelled the child after our last apply, and a child carrying another
/// shard's label is invisible to this shard's label-filtered cache (or still cached here
/// if the child watch lags) — only an apply puts the owner's label back for sure.
fn already_applied<K>(
    desired: &K,
    fingerprint: u64,
    memo: Option<&AppliedMemo>,
    cached: Option<&K>,
    ownership_changed: bool,
) -> Option<K>
where
    K: Resource + Clone + serde::Serialize + 'static,
{
    if ownership_changed {
        return None;
    }
    if let Some(actual) = cached
        && is_subset(desired, actual)
    {
        return Some(actual.clone());
    }
    let (applied_fingerprint, applied_version, applied) = memo?;
    let cached_version = cached.and_then(numeric_resource_version);
    let cache_behind =
        cached_version.is_none_or(|cached| applied_version.is_some_and(|a| cached < a));
    (*applied_fingerprint == fingerprint && cache_behind)
        .then(|| applied.downcast_ref::<K>().cloned())
        .flatten()
}

/// A hash of an object's JSON form.
fn fingerprint<T: serde::Serialize>(object: &T) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(object)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

/// Splits an apply error into a terminal problem (recorded as Degraded) or a real error.
fn classify(err: ReconcileError, child: &'static str) -> Result<TerminalProblem, ReconcileError> {
    match &err {
        ReconcileError::Kube { source, .. } => terminal_problem(source, child).ok_or(err),
        ReconcileError::LeaseLost(_) => Err(err),
    }
}

/// W1: converge the children and the status.
async fn converge(
    cluster: &DatabaseCluster,
    ctx: &ScopeContext,
    key: &str,
) -> Result<Outcome, ReconcileError> {
    let shared = &ctx.shared;
    let shard = shared.shard;
    let namespace = cluster.namespace().unwrap_or_default();
    let name = cluster.name_any();
    let uid = cluster.uid().unwrap_or_default();
    let generation = cluster.metadata.generation;

    crate::fault::before_writes(&name).await;
    let mut cluster = cluster.clone();
    if !cluster.finalizers().iter().any(|f| f == FINALIZER) {
        cluster = add_finalizer(&cluster, ctx).await?;
        // The apply had no precondition, so it returns the latest version: if that one has
        // left the shard or is being drained meanwhile, its own watch event decides.
        let placement = shared.scope.placement(&cluster);
        let deleting = cluster.metadata.deletion_timestamp.is_some();
        if worker_action(&placement, shard, deleting) != WorkerAction::Reconcile {
            return Ok(Outcome::Skipped);
        }
    }

    let known_problem = shared.book().known_problem(&uid, generation);
    let cached_sts = current_stateful_set(ctx, &cluster, &namespace, &name).await?;
    let resize = match known_problem {
        // Never take the StatefulSet down for a spec whose apply is known to fail.
        Some(_) => Resize::hold(&cluster.spec.storage.size, cached_sts.as_deref()),
        None => {
            let io = ResizeIo {
                client: &ctx.client,
                guard: &shared.guard,
                shard: shared.shard,
            };
            // The status as it is, including our own write the cache has not delivered yet.
            let status = status_known(ctx, &cluster, key);
            volume_resize::advance(&io, &cluster, cached_sts.as_deref(), status.as_ref()).await?
        }
    };
    let (stateful_set, problem) = match known_problem {
        // The same spec was rejected before: do not hammer the API server with it.
        Some(problem) => (cached_sts.as_deref().cloned(), Some(problem)),
        None => apply_children(ctx, &cluster, &resize, cached_sts.as_deref()).await?,
    };
    if let Some(problem) = &problem {
        tracing::warn!(reason = %problem.reason, detail = %problem.message, "spec cannot be applied");
    }

    write_status(
        ctx,
        &cluster,
        key,
        stateful_set.as_ref(),
        problem.as_ref(),
        &resize,
    )
    .await?;

    if problem.is_some() || resize.problem.is_some() {
        // Degraded: it waits for its owner to change the spec, not for this shard, so
        // neither the lag histogram nor the oldest-unconverged gauge counts it.
        shared.book().converged(key);
        return Ok(Outcome::Terminal);
    }
    if let Some(after) = resize.requeue {
        // The change is not carried out yet: its lag keeps running.
        return Ok(Outcome::Waiting(after));
    }
    // The status now describes the current generation: the change is converged.
    let seen = shared.book().converged(key);
    if let Some(seen) = seen {
        shared.metrics.record_lag(shard, seen.elapsed());
    }
    Ok(Outcome::Done)
}

/// Writes the status the object should have (conditions, observed generation, resize
/// progress) unless the server has it already.
async fn write_status(
    ctx: &ScopeContext,
    cluster: &DatabaseCluster,
    key: &str,
    stateful_set: Option<&StatefulSet>,
    problem: Option<&TerminalProblem>,
    resize: &Resize,
) -> Result<(), ReconcileError> {
    let shared = &ctx.shared;
    let namespace = cluster.namespace().unwrap_or_default();
    let name = cluster.name_any();
    let current_status = status_known(ctx, cluster, key);
    let current_status = current_status.as_ref();
    let now = jiff::Timestamp::now();
    let mut status = desired_status(&Observed {
        cluster,
        current_status,
        stateful_set,
        problem,
        now,
    });
    let previous_conditions = current_status.map(|s| s.conditions.as_slice());
    resize.annotate(&mut status, previous_conditions.unwrap_or_default(), now);
    if current_status != Some(&status) {
        shared.guard.check()?;
        let updated = api(ctx, &namespace)
            .patch_status(&name, &params(), &Patch::Merge(json!({ "status": status })))
            .await
            .map_err(ReconcileError::kube("writing the status"))?;
        remember_status(ctx, key, updated);
    }
    Ok(())
}

/// Applies the Service and the StatefulSet (as `resize` plans it: shaped, or not at all
/// while it is being replaced) where they differ from the server's, or all of them after the
/// object moved in. Returns the StatefulSet as the server has it (the cached one when it was
/// not applied) and the terminal problem of this spec, if an apply was rejected for good
/// (the cached StatefulSet is returned then).
async fn apply_children(
    ctx: &ScopeContext,
    cluster: &DatabaseCluster,
    resize: &Resize,
    cached_sts: Option<&StatefulSet>,
) -> Result<(Option<StatefulSet>, Option<TerminalProblem>), ReconcileError> {
    let shared = &ctx.shared;
    let shard = shared.shard;
    let join = shared.scope.moved_in(cluster);
    let ownership_changed = join.is_some();
    let service = desired_service(cluster, shard);
    let sts = resize.stateful_set_to_apply(desired_stateful_set(cluster, shard));
    // The two applies do not depend on each other (the StatefulSet names its Service, it
    // does not need it to exist), so they share one round trip: a moved-in object's first
    // reconcile relabels both children, and that bounds how fast a rebalance completes.
    let (service_applied, sts_applied) = tokio::join!(
        apply_if_changed(
            ctx,
            &service,
            &ctx.services,
            ownership_changed,
            "applying the Service",
        ),
        async {
            match &sts {
                Some(sts) => apply_if_changed(
                    ctx,
                    sts,
                    &ctx.stateful_sets,
                    ownership_changed,
                    "applying the StatefulSet",
                )
                .await
                .map(Some),
                None => Ok(None),
            }
        },
    );
    let mut problem = match service_applied {
        Ok(_) => None,
        Err(err) => Some(classify(err, "Service")?),
    };
    let stateful_set = match sts_applied {
        Ok(Some(applied)) => Some(applied),
        Ok(None) => cached_sts.cloned(),
        Err(err) => {
            let terminal = classify(err, "StatefulSet")?;
            problem.get_or_insert(terminal);
            cached_sts.cloned()
        }
    };
    shared.guard.check()?;
    // Both children were applied: they carry our label. A child rejected for good, or a
    // StatefulSet left alone while it is replaced, may still carry another shard's: a
    // later reconcile relabels it.
    if problem.is_none()
        && sts.is_some()
        && let Some(join) = join
    {
        shared.scope.children_relabelled(cluster, join);
    }
    let uid = cluster.uid().unwrap_or_default();
    shared
        .book()
        .record_problem(&uid, cluster.metadata.generation, problem.as_ref());
    Ok((stateful_set, problem))
}

/// The object's StatefulSet: from the cache, or read by name when the cache cannot show it
/// although it may exist. Once the object has a status it was reconciled before, and its
/// StatefulSet may still carry another shard's label after a move (this shard's
/// label-filtered cache cannot see it until the apply relabels it) or be on its way out in
/// a volume resize; the resize decision and a terminal hold must see the real one, or a
/// grown size is written into the immutable claim template.
async fn current_stateful_set(
    ctx: &ScopeContext,
    cluster: &DatabaseCluster,
    namespace: &str,
    name: &str,
) -> Result<Option<Arc<StatefulSet>>, ReconcileError> {
    if let Some(cached) = cached(&ctx.stateful_sets, namespace, name) {
        return Ok(Some(cached));
    }
    if cluster.status.is_none() {
        // Never reconciled: nothing of ours can exist yet.
        return Ok(None);
    }
    let found = Api::<StatefulSet>::namespaced(ctx.client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(ReconcileError::kube("reading the StatefulSet"))?;
    Ok(found.map(|mut sts| {
        sts.metadata.managed_fields = None;
        Arc::new(sts)
    }))
}

/// The status the server holds as far as this shard knows (see [`known_status`]), from
/// `cluster` (the version the reconcile started from), the cache and our status memo. The
/// memo and the cache are read together under the bookkeeping lock, which the watch takes
/// after storing a version to drop the memo it delivers: one of the two shows our last
/// write.
fn status_known(
    ctx: &ScopeContext,
    cluster: &DatabaseCluster,
    key: &str,
) -> Option<DatabaseClusterStatus> {
    let (latest, written) = {
        let mut book = ctx.shared.book();
        // The object we read may already hold that write: the cache answers again then.
        book.forget_status_once_seen(cluster);
        (ctx.cached_cluster(cluster), book.written_status(key))
    };
    // Decompressed only when the cache moved on since the reconcile started.
    let latest = latest
        .filter(|latest| is_newer(latest.as_ref(), cluster))
        .and_then(|latest| latest.object());
    known_status(cluster, latest.as_ref(), written.as_ref()).cloned()
}

/// Keeps the status just written until the watch delivers it (see [`known_status`]),
/// unless the cache holds it already (the watch beat the response). The cache is read
/// under the bookkeeping lock, which the watch takes after storing a version to drop the
/// memo it delivers: either the cache read sees the write, or the drop comes after the
/// insert. No entry outlives its delivery.
fn remember_status(ctx: &ScopeContext, key: &str, updated: DatabaseCluster) {
    let Some(resource_version) = numeric_resource_version(&updated) else {
        return;
    };
    let mut book = ctx.shared.book();
    let cached = ctx.cached_cluster(&updated);
    let Some(status) = updated.status else {
        return;
    };
    let written = WrittenStatus {
        resource_version,
        status,
    };
    if cached.is_some_and(|cached| written.is_seen_in(cached.as_ref())) {
        return;
    }
    book.remember_status(key, written);
}

/// Finalizer cleanup: with reclaimPolicy Delete, delete the StatefulSet (so it cannot
/// recreate claims) and then the claims by name (every ordinal that may exist, see
/// [`claims`]); then remove the finalizer. Every step is idempotent; a claim deletion the
/// API server refuses returns an error and is retried with backoff, without blocking other
/// objects. Progress and failures are shown in the `Cleanup` condition.
async fn cleanup(
    cluster: &DatabaseCluster,
    ctx: &ScopeContext,
    key: &str,
) -> Result<Outcome, ReconcileError> {
    let shared = &ctx.shared;
    if !cluster.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Outcome::Skipped);
    }
    let namespace = cluster.namespace().unwrap_or_default();
    let name = cluster.name_any();
    let sts = cached(&ctx.stateful_sets, &namespace, &name);
    // An earlier pass of this cleanup (one that left it pending) dealt with the
    // StatefulSet and deleted the claims; see `claims::CleanupPass`.
    let pass_index = shared.cleanup_passes.count(&key.to_owned());
    if claims::CleanupPass::after(pass_index) == claims::CleanupPass::First {
        match settle_stateful_set(cluster, ctx, sts.as_deref()).await {
            Ok(StatefulSetCleanup::NotOwned) => {
                // This object never had it (its apply found the name taken), so neither it
                // nor the claims named after it are this object's to delete.
                tracing::info!(
                    "the StatefulSet of this name is not this object's; left alone with its claims"
                );
                return finish_cleanup(cluster, ctx, key).await;
            }
            Ok(_) => {}
            Err((what, err)) => {
                if let Some(refusal) = cleanup_refusal(&err, what) {
                    write_cleanup_condition(cluster, ctx, key, refusal).await?;
                }
                return Err(err);
            }
        }
    }
    if cluster.spec.storage.reclaim_policy == ReclaimPolicy::Delete
        && let Some(pending) = delete_claims(cluster, ctx, key, pass_index, sts.as_deref()).await?
    {
        return Ok(pending);
    }
    finish_cleanup(cluster, ctx, key).await
}

/// The claim deletion pass of a cleanup: `Some(CleanupPending)` while claims are left.
async fn delete_claims(
    cluster: &DatabaseCluster,
    ctx: &ScopeContext,
    key: &str,
    pass_index: u32,
    sts: Option<&StatefulSet>,
) -> Result<Option<Outcome>, ReconcileError> {
    let namespace = cluster.namespace().unwrap_or_default();
    // Our own newer status write counts too (see `ordinals_to_record`).
    let known = status_known(ctx, cluster, key);
    let ordinals = claims::ordinals_to_record(cluster, known.as_ref(), sts);
    let shows_progress = shows_cleanup_progress(pass_index, known.as_ref());
    let names = claims::claim_names(&cluster.name_any(), ordinals);
    let pass = claims::delete_claims(
        &ctx.client,
        &ctx.shared.guard,
        &namespace,
        &names,
        claims::CleanupPass::after(pass_index),
        shows_progress,
    )
    .await;
    if let Some(progress) = cleanup_progress(&pass, shows_progress) {
        write_cleanup_condition(cluster, ctx, key, progress).await?;
    }
    match pass {
        Err(ClaimDeletionError::LeaseLost(lost)) => Err(lost.into()),
        Err(ClaimDeletionError::Refused { source, .. }) => {
            Err(ReconcileError::kube("deleting a volume claim")(source))
        }
        Ok(pass) if pass.deleted > 0 || !pass.remaining.is_empty() => {
            tracing::info!(
                deleted = pass.deleted,
                terminating = pass.remaining.len(),
                "volume claims deleted or still terminating"
            );
            // Look again shortly: a claim created by a StatefulSet sync that raced the
            // deletion is caught then, and only a pass finding none finishes.
            Ok(Some(Outcome::CleanupPending))
        }
        Ok(_) => Ok(None),
    }
}

/// The last step of a cleanup: the finalizer goes, and with it this shard's memory of the
/// object.
async fn finish_cleanup(
    cluster: &DatabaseCluster,
    ctx: &ScopeContext,
    key: &str,
) -> Result<Outcome, ReconcileError> {
    remove_finalizer(cluster, ctx).await?;
    let shared = &ctx.shared;
    {
        shared
            .book()
            .forget_deleted(key, &cluster.uid().unwrap_or_default(), cluster);
    }
    shared.failures.reset(&key.to_owned());
    shared.cleanup_passes.reset(&key.to_owned());
    tracing::info!("cleanup finished, finalizer removed");
    Ok(Outcome::Skipped)
}

/// What the first cleanup pass does about the object's StatefulSet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatefulSetCleanup {
    /// Somebody else's object of that name: it and the claims named after it are left
    /// alone, and the cleanup ends.
    NotOwned,
    /// The object's, live: deleted with its pods (with `reclaimPolicy: Retain` the
    /// garbage collector does it once the object is gone).
    Delete,
    /// The object's, being deleted with its pods: nothing to do.
    BeingDeleted,
    /// Gone, or being deleted with its pods kept (`orphan`, as a volume resize replaces
    /// it): pods it left have no controller any more, and nothing else would delete them
    /// (with `reclaimPolicy: Delete` their claims would stay terminating, and the
    /// finalizer with them). They are deleted by the object's pod labels.
    SweepPods,
}

/// Decides [`StatefulSetCleanup`] from the StatefulSet `found` (its metadata; `None`: it
/// does not exist).
fn stateful_set_cleanup(
    found: Option<&ObjectMeta>,
    cluster: &DatabaseCluster,
) -> StatefulSetCleanup {
    let Some(found) = found else {
        return StatefulSetCleanup::SweepPods;
    };
    if !ownership::is_controlled_by(found, cluster) {
        return StatefulSetCleanup::NotOwned;
    }
    if found.deletion_timestamp.is_none() {
        return StatefulSetCleanup::Delete;
    }
    let orphaning = found.finalizers.iter().flatten().any(|f| f == "orphan");
    if orphaning {
        StatefulSetCleanup::SweepPods
    } else {
        StatefulSetCleanup::BeingDeleted
    }
}

/// Finds the object's StatefulSet (the cached one, or, not in this shard's cache — e.g.
/// still labelled for the previous shard — the one the API server has) and carries out
/// [`stateful_set_cleanup`]. The DELETE is conditional on its uid, so a same-named one
/// created meanwhile by somebody else is not deleted either. An error says what failed.
async fn settle_stateful_set(
    cluster: &DatabaseCluster,
    ctx: &ScopeContext,
    cached: Option<&StatefulSet>,
) -> Result<StatefulSetCleanup, (&'static str, ReconcileError)> {
    let name = cluster.name_any();
    let namespace = cluster.namespace().unwrap_or_default();
    let stateful_sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &namespace);
    let found = match cached {
        Some(cached) => Some(cached.metadata.clone()),
        None => read_stateful_set(ctx, &stateful_sets, &name)
            .await
            .map_err(|err| ("StatefulSet", err))?,
    };
    let decision = stateful_set_cleanup(found.as_ref(), cluster);
    match decision {
        StatefulSetCleanup::Delete
            if cluster.spec.storage.reclaim_policy == ReclaimPolicy::Delete =>
        {
            let uid = found.and_then(|meta| meta.uid);
            delete_stateful_set(ctx, &stateful_sets, &name, uid)
                .await
                .map_err(|err| ("StatefulSet", err))?;
        }
        StatefulSetCleanup::SweepPods => delete_orphaned_pods(ctx, &namespace, &name)
            .await
            .map_err(|err| ("pods", err))?,
        _ => {}
    }
    Ok(decision)
}

async fn read_stateful_set(
    ctx: &ScopeContext,
    stateful_sets: &Api<StatefulSet>,
    name: &str,
) -> Result<Option<ObjectMeta>, ReconcileError> {
    ctx.shared.guard.check()?;
    let found = stateful_sets
        .get_opt(name)
        .await
        .map_err(ReconcileError::kube("reading the StatefulSet"))?;
    Ok(found.map(|sts| sts.metadata))
}

async fn delete_stateful_set(
    ctx: &ScopeContext,
    stateful_sets: &Api<StatefulSet>,
    name: &str,
    uid: Option<String>,
) -> Result<(), ReconcileError> {
    ctx.shared.guard.check()?;
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        preconditions: Some(Preconditions {
            uid,
            resource_version: None,
        }),
        ..Default::default()
    };
    match stateful_sets.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(err) => Err(ReconcileError::kube("deleting the StatefulSet")(err)),
    }
}

/// Deletes the pods of DatabaseCluster `name` whose StatefulSet is gone (see
/// [`StatefulSetCleanup::SweepPods`]), by the labels the worker puts on its pods; one
/// request, which matches nothing in the usual case of an object deleted before its
/// StatefulSet was created.
async fn delete_orphaned_pods(
    ctx: &ScopeContext,
    namespace: &str,
    name: &str,
) -> Result<(), ReconcileError> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let mut labels = children::selector_labels(name);
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned());
    let selector = labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",");
    ctx.shared.guard.check()?;
    pods.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels(&selector),
    )
    .await
    .map_err(ReconcileError::kube(
        "deleting the pods its StatefulSet left behind",
    ))?;
    Ok(())
}

/// The `Cleanup` condition of a deletion of `what` (the StatefulSet, its pods) the API
/// server refused (a policy, a webhook, a missing permission): shown at once, like a
/// refused claim deletion.
fn cleanup_refusal(err: &ReconcileError, what: &str) -> Option<ConditionValue> {
    let ReconcileError::Kube { source, action } = err else {
        return None;
    };
    let detail = match source {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    };
    let reason = if what == "pods" {
        POD_DELETION_FAILED
    } else {
        STATEFUL_SET_DELETION_FAILED
    };
    Some(ConditionValue {
        status: "True",
        reason,
        message: format!("{action} failed, retrying with backoff: {detail}"),
    })
}

/// Cleanup passes whose progress is not written: the first deletes the claims, and the
/// next ones, 1 s and 3 s after it, usually find them gone and remove the finalizer. A
/// `DeletingVolumeClaims` condition written in between cost a status write per deleted
/// object that nobody saw; a cleanup still waiting on the pass after them (≈ 7 s in)
/// shows it, and a refused deletion shows at once. A young pass also stops reading claims
/// at the first one still terminating ([`claims::delete_claims`]).
const QUIET_CLEANUP_PASSES: u32 = 3;

/// The `Cleanup` reason of a StatefulSet deletion (or read) the API server refused.
const STATEFUL_SET_DELETION_FAILED: &str = "StatefulSetDeletionFailed";
/// The `Cleanup` reason of a deletion of pods left without their StatefulSet the API
/// server refused.
const POD_DELETION_FAILED: &str = "PodDeletionFailed";
/// The `Cleanup` reason of a claim deletion the API server refused.
const CLAIM_DELETION_FAILED: &str = "VolumeClaimDeletionFailed";
/// The `Cleanup` reason while deleted claims are still there.
const DELETING_VOLUME_CLAIMS: &str = "DeletingVolumeClaims";

/// Whether cleanup pass `pass_index` (0 = the first) of an object with `status` shows its
/// progress: once the cleanup is no longer young, or to replace a refusal the object still
/// shows. A pass that shows it names every claim left; a young one needs only to know
/// whether any is.
fn shows_cleanup_progress(pass_index: u32, status: Option<&DatabaseClusterStatus>) -> bool {
    let shows_refusal = status
        .and_then(|status| status.condition(CLEANUP))
        .is_some_and(|c| c.status == "True" && c.reason == CLAIM_DELETION_FAILED);
    pass_index >= QUIET_CLEANUP_PASSES || shows_refusal
}

/// The `Cleanup` condition after a claim deletion pass: a refusal always; the progress
/// only if `shows_progress` (the cleanup is no longer young, [`QUIET_CLEANUP_PASSES`], or
/// the object still shows an earlier refusal that the progress replaces). `None` when
/// nothing is left either way: the finalizer removal follows, a condition write would be
/// wasted.
fn cleanup_progress(
    pass: &Result<DeletionPass, ClaimDeletionError>,
    shows_progress: bool,
) -> Option<ConditionValue> {
    match pass {
        Err(ClaimDeletionError::LeaseLost(_)) => None,
        Ok(_) if !shows_progress => None,
        Err(ClaimDeletionError::Refused { claim, source }) => {
            let detail = match source {
                kube::Error::Api(status) => status.message.clone(),
                other => other.to_string(),
            };
            Some(ConditionValue {
                status: "True",
                reason: CLAIM_DELETION_FAILED,
                message: format!(
                    "deleting volume claim {claim} failed, retrying with backoff: {detail}"
                ),
            })
        }
        Ok(pass) if !pass.remaining.is_empty() => Some(ConditionValue {
            status: "True",
            reason: DELETING_VOLUME_CLAIMS,
            message: format!(
                "waiting for volume claims to be deleted: {}",
                pass.remaining.join(", ")
            ),
        }),
        Ok(pass) if pass.deleted > 0 => Some(ConditionValue {
            status: "True",
            reason: DELETING_VOLUME_CLAIMS,
            message: "volume claims deleted, checking that none is left".to_owned(),
        }),
        Ok(_) => None,
    }
}

/// Writes the `Cleanup` condition unless the object already shows it.
async fn write_cleanup_condition(
    cluster: &DatabaseCluster,
    ctx: &ScopeContext,
    key: &str,
    progress: ConditionValue,
) -> Result<(), ReconcileError> {
    let current = status_known(ctx, cluster, key);
    let previous = current
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let mut conditions = previous.to_vec();
    set_condition(
        &mut conditions,
        previous,
        CLEANUP,
        progress,
        cluster.metadata.generation,
        jiff::Timestamp::now(),
    );
    if conditions == previous {
        return Ok(());
    }
    ctx.shared.guard.check()?;
    let patch = json!({ "status": { "conditions": conditions } });
    let updated = api(ctx, &cluster.namespace().unwrap_or_default())
        .patch_status(&cluster.name_any(), &params(), &Patch::Merge(&patch))
        .await
        .map_err(ReconcileError::kube("writing the cleanup condition"))?;
    remember_status(ctx, key, updated);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Service, ServiceSpec};
    use shardop_runtime::LeaseLost;

    fn service(cluster_ip: &str, resource_version: Option<&str>) -> Service {
        Service {
            metadata: kube::api::ObjectMeta {
                name: Some("db-headless".into()),
                namespace: Some("ns".into()),
                resource_version: resource_version.map(str::to_owned),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn memo(fingerprint: u64, version: u64, object: Service) -> (u64, Option<u64>, AppliedObject) {
        (
            fingerprint,
            Some(version),
            Arc::new(object) as AppliedObject,
        )
    }

    fn version(object: Option<Service>) -> Option<String> {
        object?.metadata.resource_version
    }

    fn api_error(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure(message, "")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn a_child_the_api_server_cannot_decode_is_terminal_and_quotes_the_server() {
        // What the API server answers to a StatefulSet apply with `cpu: lots`.
        let message = "failed to convert new object (ns/db; apps/v1, Kind=StatefulSet) to proper version: \
            unable to convert unstructured object to apps/v1, Kind=StatefulSet: \
            quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'";
        let problem = terminal_problem(&api_error(500, message), "StatefulSet").unwrap();
        assert_eq!(problem.reason, "StatefulSetRejected");
        assert_eq!(problem.message, message);
        for code in [400, 422] {
            assert!(terminal_problem(&api_error(code, "invalid"), "Service").is_some());
        }
    }

    #[test]
    fn the_first_cleanup_pass_deletes_only_its_own_stateful_set_and_sweeps_pods_it_left() {
        let mut cluster: DatabaseCluster = serde_json::from_value(json!({
            "apiVersion": "shardop.dev/v1alpha1",
            "kind": "DatabaseCluster",
            "metadata": { "name": "db", "namespace": "ns", "uid": "u-1" },
            "spec": { "replicas": 1, "image": "postgres:17", "storage": { "size": "1Gi" } },
        }))
        .unwrap();
        cluster.metadata.uid = Some("u-1".into());
        let ours = |deleting: bool, finalizers: &[&str]| ObjectMeta {
            owner_references: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    uid: "u-1".into(),
                    controller: Some(true),
                    ..Default::default()
                },
            ]),
            deletion_timestamp: deleting.then_some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
            ),
            finalizers: Some(finalizers.iter().map(|f| (*f).to_owned()).collect()),
            ..Default::default()
        };
        let decide = |found: Option<&ObjectMeta>| stateful_set_cleanup(found, &cluster);
        assert_eq!(decide(Some(&ours(false, &[]))), StatefulSetCleanup::Delete);
        assert_eq!(
            decide(Some(&ObjectMeta::default())),
            StatefulSetCleanup::NotOwned
        );
        assert_eq!(
            decide(Some(&ours(true, &["foregroundDeletion"]))),
            StatefulSetCleanup::BeingDeleted
        );
        // A volume resize deleted it keeping its pods, or it is gone already: the pods
        // have no controller left.
        assert_eq!(
            decide(Some(&ours(true, &["orphan"]))),
            StatefulSetCleanup::SweepPods
        );
        assert_eq!(decide(None), StatefulSetCleanup::SweepPods);
    }

    #[test]
    fn an_apply_conflicting_with_another_managers_object_is_terminal() {
        let status: kube::core::Status = serde_json::from_value(json!({
            "code": 409, "reason": "Conflict",
            "message": "Apply failed with 1 conflict: conflict with \"helm\": .spec.selector",
            "details": { "causes": [{
                "reason": "FieldManagerConflict",
                "message": "conflict with \"helm\"", "field": ".spec.selector"
            }] },
        }))
        .unwrap();
        let problem = terminal_problem(&kube::Error::Api(Box::new(status)), "Service").unwrap();
        assert_eq!(problem.reason, "ServiceNotOwned");
        assert!(
            problem
                .message
                .contains("not controlled by this DatabaseCluster")
        );
        assert!(
            problem.message.contains(".spec.selector"),
            "{}",
            problem.message
        );
    }

    #[test]
    fn server_trouble_stays_transient() {
        for (code, message) in [
            (
                500,
                "Internal error occurred: etcdserver: request timed out",
            ),
            (503, "failed to convert new object"),
            (409, "the object has been modified"),
            (429, "too many requests"),
            (504, "timeout"),
        ] {
            assert!(
                terminal_problem(&api_error(code, message), "StatefulSet").is_none(),
                "{code} {message}"
            );
        }
    }

    #[test]
    fn cleanup_polls_back_off_to_thirty_seconds() {
        let waits: Vec<u64> = (1..=8).map(|n| cleanup_poll(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(cleanup_poll(u32::MAX), CLEANUP_POLL_CAP);
    }

    fn refused(message: &str) -> Result<DeletionPass, ClaimDeletionError> {
        let status: kube::core::Status =
            serde_json::from_value(json!({ "code": 422, "message": message, "reason": "Invalid" }))
                .unwrap();
        Err(ClaimDeletionError::Refused {
            claim: "data-db-1".into(),
            source: kube::Error::Api(Box::new(status)),
        })
    }

    #[test]
    fn the_cleanup_condition_names_what_is_left_and_what_failed() {
        let cleanup_progress = |pass: &_| cleanup_progress(pass, true);
        let failed = cleanup_progress(&refused("storage backend is down")).unwrap();
        assert_eq!(
            (failed.status, failed.reason),
            ("True", "VolumeClaimDeletionFailed")
        );
        assert!(failed.message.contains("data-db-1"), "{}", failed.message);
        assert!(
            failed.message.contains("storage backend is down"),
            "{}",
            failed.message
        );

        let terminating = cleanup_progress(&Ok(DeletionPass {
            deleted: 2,
            remaining: vec!["data-db-0".into()],
        }))
        .unwrap();
        assert_eq!(terminating.reason, "DeletingVolumeClaims");
        assert!(terminating.message.contains("data-db-0"));

        let deleted = cleanup_progress(&Ok(DeletionPass {
            deleted: 1,
            remaining: Vec::new(),
        }))
        .unwrap();
        assert_eq!(deleted.reason, "DeletingVolumeClaims");

        // Nothing left: the finalizer goes next, a condition write would be wasted.
        assert_eq!(cleanup_progress(&Ok(DeletionPass::default())), None);
        let lost = Err(ClaimDeletionError::LeaseLost(LeaseLost(
            shardop_api::ShardIndex(0),
        )));
        assert_eq!(cleanup_progress(&lost), None, "nothing may be written");

        // A young cleanup writes only a refusal: the next passes usually remove the
        // finalizer.
        let waiting = Ok(DeletionPass {
            deleted: 3,
            remaining: vec!["data-db-0".into()],
        });
        assert_eq!(super::cleanup_progress(&waiting, false), None);
        let failed = super::cleanup_progress(&refused("denied"), false).unwrap();
        assert_eq!(failed.reason, "VolumeClaimDeletionFailed");
    }

    #[test]
    fn a_young_cleanup_shows_progress_only_to_replace_a_refusal() {
        let condition = |reason: &str, status: &str| {
            serde_json::from_value(json!({
                "type": CLEANUP, "status": status, "reason": reason, "message": "",
                "lastTransitionTime": "2026-12-04T00:00:00Z",
            }))
            .unwrap()
        };
        let mut status = DatabaseClusterStatus::default();
        for young in 0..QUIET_CLEANUP_PASSES {
            assert!(!shows_cleanup_progress(young, None), "{young}");
            assert!(!shows_cleanup_progress(young, Some(&status)), "{young}");
        }
        assert!(shows_cleanup_progress(QUIET_CLEANUP_PASSES, None));
        assert!(shows_cleanup_progress(
            QUIET_CLEANUP_PASSES + 5,
            Some(&status)
        ));
        status.conditions = vec![condition("DeletingVolumeClaims", "True")];
        assert!(!shows_cleanup_progress(1, Some(&status)));
        // A refusal shown earlier is replaced as soon as a pass goes through.
        status.conditions = vec![condition(CLAIM_DELETION_FAILED, "True")];
        assert!(shows_cleanup_progress(0, Some(&status)));
        assert!(shows_cleanup_progress(2, Some(&status)));
        status.conditions = vec![condition(CLAIM_DELETION_FAILED, "False")];
        assert!(!shows_cleanup_progress(2, Some(&status)));
    }

    #[test]
    fn a_write_fenced_out_by_the_client_is_a_lost_lease() {
        let fenced = kube::Error::Service(Box::new(LeaseLost(shardop_api::ShardIndex(3))));
        let err = ReconcileError::kube("applying the StatefulSet")(fenced);
        assert_eq!(err.reason(), "lease_lost");
        assert!(matches!(
            err,
            ReconcileError::LeaseLost(LeaseLost(shardop_api::ShardIndex(3)))
        ));
        let other = kube::Error::Service("connection reset".into());
        let err = ReconcileError::kube("applying the StatefulSet")(other);
        assert_eq!(err.reason(), "transport");
    }

    #[test]
    fn a_cached_child_that_contains_the_desired_one_is_not_applied() {
        let desired = service("None", None);
        let cached = service("None", Some("12"));
        let found = already_applied(&desired, 1, None, Some(&cached), false);
        assert_eq!(version(found), Some("12".into()));
    }

    #[test]
    fn after_a_change_of_owner_every_child_is_applied_whatever_memo_and_cache_say() {
        let desired = service("None", None);
        let applied = memo(1, 20, service("None", Some("20")));
        // The memo of our apply before the object left us, the child invisible now (it
        // carries the other shard's label), or still cached as we left it.
        for cached in [None, Some(service("None", Some("20")))] {
            assert!(already_applied(&desired, 1, Some(&applied), cached.as_ref(), false).is_some());
            assert!(already_applied(&desired, 1, Some(&applied), cached.as_ref(), true).is_none());
        }
    }

    #[test]
    fn our_own_write_is_not_applied_again_while_the_cache_lags_it() {
        let desired = service("None", None);
        let applied = memo(1, 20, service("None", Some("20")));
        // Not cached yet, or cached at an older version.
        for cached in [None, Some(service("10.0.0.9", Some("19")))] {
            let found = already_applied(&desired, 1, Some(&applied), cached.as_ref(), false);
            assert_eq!(version(found), Some("20".into()));
        }
    }

    #[test]
    fn apply_when_the_spec_changed_or_someone_else_wrote_after_us() {
        let desired = service("None", None);
        // The memo is of another desired child (the spec changed since).
        let other = memo(2, 20, service("None", Some("20")));
        assert!(already_applied(&desired, 1, Some(&other), None, false).is_none());
        // The cache is newer than our write and no longer matches: someone changed it.
        let ours = memo(1, 20, service("None", Some("20")));
        let drifted = service("10.0.0.9", Some("21"));
        assert!(already_applied(&desired, 1, Some(&ours), Some(&drifted), false).is_none());
        // Never applied and not cached.
        assert!(already_applied(&desired, 1, None, None, false).is_none());
    }
}
