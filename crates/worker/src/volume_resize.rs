//! Volume expansion: a larger `spec.storage.size`.
//!
//! A StatefulSet's `volumeClaimTemplates` are immutable, so the new size cannot simply be
//! applied (the API server answers 422). Instead, derived every pass from what the cluster
//! shows (so a crash at any point resumes where it stopped):
//!
//! 1. the template asks for less than the spec (phase [`Phase::Behind`]): check that the
//!    claims' StorageClass allows expansion (else `StorageResizing=False`,
//!    `ExpansionNotAllowed`, and Degraded; the template keeps its size, so every other
//!    change still applies), patch the request of every bound claim below the size;
//! 2. make the StatefulSet let go of its claims: apply it with `whenDeleted: Retain` and
//!    wait until the StatefulSet controller has seen that ([`claims_released`]). With
//!    `whenDeleted: Delete` the controller owns every claim, and a sync it runs from a
//!    lagging cache while the StatefulSet is deleted can put its owner reference back after
//!    the garbage collector took it off: the collector then deletes the claim (and, with a
//!    `Delete` volume reclaim policy, the data);
//! 3. delete the StatefulSet with `propagationPolicy: Orphan`: its pods and claims stay.
//!    Only once a dry-run create of its replacement passes the API server's validation
//!    ([`replacement_rejection`]): a spec error made together with the size change (say
//!    requests above limits, which the CRD does not check) would otherwise leave the pods
//!    without a StatefulSet until the spec is fixed. A rejected replacement keeps the old
//!    StatefulSet and ends `StorageResizing=False`, `ReplacementRejected`;
//! 4. while it is being deleted ([`Phase::Replacing`]) it is not applied at all: an apply
//!    landing after the deletion completed would create it again with the old template;
//! 5. once it is gone the normal apply creates it with the new template; it adopts the
//!    pods back (the pod template is unchanged, so is the revision hash: no pod rolls);
//! 6. while `StorageResizing` is `True`, claims that were not bound yet (the API server
//!    expands only bound claims) are patched once bound (looked at every
//!    [`BINDING_POLL`]); with none left the condition ends `False`, `Resized`.
//!
//! The decisions ([`phase`], [`claim_plan`], [`claims_released`]) are pure; [`advance`]
//! does the I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{
    Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions, PropagationPolicy,
};
use kube::{Client, ResourceExt};
use serde_json::json;
use shardop_api::constants::WORKER_FIELD_MANAGER;
use shardop_api::constants::condition::{DEGRADED, STORAGE_RESIZING};
use shardop_api::{DatabaseCluster, DatabaseClusterStatus, ShardIndex};
use shardop_runtime::LeaseGuard;

use crate::children::{DATA_VOLUME, desired_stateful_set};
use crate::claims;
use crate::condition_set::{ConditionValue, keep_condition, set_condition};
use crate::error::ReconcileError;
use crate::status::TerminalProblem;

/// Look again this soon while the old StatefulSet lets go of its claims or is being deleted
/// (its status or deletion event usually comes first).
const REPLACE_POLL: Duration = Duration::from_secs(2);
/// Look again this soon while claims wait to be bound before they can be expanded.
pub const BINDING_POLL: Duration = Duration::from_secs(30);
/// Degraded reason when a claim's StorageClass does not allow expansion.
pub const NOT_ALLOWED_REASON: &str = "StorageExpansionNotAllowed";

/// Where a StatefulSet stands relative to the spec's storage size.
#[derive(Clone, Debug, PartialEq)]
pub enum Phase {
    /// No StatefulSet yet, or its template asks for at least the spec's size.
    InSync,
    /// Its template asks for less (`template`): expand the claims, then replace it.
    Behind {
        /// The size its template asks for.
        template: Quantity,
    },
    /// Its template asks for less and it is being deleted (our replacement, or someone's).
    Replacing {
        /// The size its template asks for.
        template: Quantity,
    },
}

/// The phase of `stateful_set` for a spec asking for `desired`. A size that is not a
/// quantity counts as in sync (the apply then reports what the API server thinks of it).
pub fn phase(desired: &Quantity, stateful_set: Option<&StatefulSet>) -> Phase {
    let Some(stateful_set) = stateful_set else {
        return Phase::InSync;
    };
    let Some(template) = template_size(stateful_set) else {
        return Phase::InSync;
    };
    match (size_millis(&desired.0), size_millis(&template.0)) {
        (Some(want), Some(have)) if have < want => {
            let template = template.clone();
            if stateful_set.metadata.deletion_timestamp.is_some() {
                Phase::Replacing { template }
            } else {
                Phase::Behind { template }
            }
        }
        _ => Phase::InSync,
    }
}

/// The storage request of the StatefulSet's `data` claim template.
pub fn template_size(stateful_set: &StatefulSet) -> Option<&Quantity> {
    stateful_set
        .spec
        .as_ref()?
        .volume_claim_templates
        .as_ref()?
        .iter()
        .find(|t| t.metadata.name.as_deref() == Some(DATA_VOLUME))?
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
}

/// Sets the storage request of `stateful_set`'s `data` claim template.
pub fn set_template_size(stateful_set: &mut StatefulSet, size: &Quantity) {
    let requests = stateful_set
        .spec
        .as_mut()
        .and_then(|s| s.volume_claim_templates.as_mut())
        .and_then(|t| {
            t.iter_mut()
                .find(|t| t.metadata.name.as_deref() == Some(DATA_VOLUME))
        })
        .and_then(|t| t.spec.as_mut())
        .and_then(|s| s.resources.as_mut())
        .and_then(|r| r.requests.as_mut());
    if let Some(requests) = requests {
        requests.insert("storage".to_owned(), size.clone());
    }
}

/// Whether the StatefulSet controller no longer owns the claims of `stateful_set`: its
/// `whenDeleted` policy is `Retain` (the default when unset) and the controller has seen the
/// generation that says so. From then on no sync of the controller adds an owner reference
/// to a claim, so deleting the StatefulSet cannot leave a claim owned by a StatefulSet that
/// no longer exists (which the garbage collector would delete).
pub fn claims_released(stateful_set: &StatefulSet) -> bool {
    let retains = stateful_set
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_claim_retention_policy.as_ref())
        .and_then(|p| p.when_deleted.as_deref())
        .is_none_or(|when| when == RETAIN);
    let observed = stateful_set
        .status
        .as_ref()
        .and_then(|s| s.observed_generation);
    retains && observed.is_some() && observed >= stateful_set.metadata.generation
}

/// The `whenDeleted` policy under which the StatefulSet controller owns no claim.
const RETAIN: &str = "Retain";

/// Sets the StatefulSet's `whenDeleted` claim retention policy to `Retain`.
fn retain_claims(stateful_set: &mut StatefulSet) {
    if let Some(spec) = stateful_set.spec.as_mut() {
        spec.persistent_volume_claim_retention_policy
            .get_or_insert_with(Default::default)
            .when_deleted = Some(RETAIN.to_owned());
    }
}

/// A quantity in thousandths of its unit (`1Gi` → 1073741824000), `None` when it is not a
/// plain non-negative quantity. Thousandths keep `m` and fractional values exact.
pub fn size_millis(quantity: &str) -> Option<u128> {
    let quantity = quantity.trim();
    let quantity = quantity.strip_prefix('+').unwrap_or(quantity);
    let split = quantity
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(split);
    let (integer, fraction) = number.split_once('.').unwrap_or((number, ""));
    if integer.is_empty() && fraction.is_empty() {
        return None;
    }
    let digits: u128 = format!("{integer}{fraction}").parse().ok()?;
    let fraction_scale = 10_u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    let (multiplier, divisor) = suffix_scale(suffix)?;
    Some(digits.checked_mul(multiplier)? / fraction_scale.checked_mul(divisor)?)
}

/// (multiplier, divisor) from units to thousandths for a quantity suffix.
fn suffix_scale(suffix: &str) -> Option<(u128, u128)> {
    let binary = |power: u32| Some((1000 * (1_u128 << power), 1));
    let decimal = |power: u32| Some((10_u128.checked_pow(power + 3)?, 1));
    match suffix {
        "" => decimal(0),
        "m" => Some((1, 1)),
        "k" => decimal(3),
        "M" => decimal(6),
        "G" => decimal(9),
        "T" => decimal(12),
        "P" => decimal(15),
        "E" => decimal(18),
        "Ki" => binary(10),
        "Mi" => binary(20),
        "Gi" => binary(30),
        "Ti" => binary(40),
        "Pi" => binary(50),
        "Ei" => binary(60),
        _ => {
            let exponent: i32 = suffix.strip_prefix(['e', 'E'])?.parse().ok()?;
            let shifted = exponent.checked_add(3)?;
            if shifted >= 0 {
                Some((10_u128.checked_pow(shifted.unsigned_abs())?, 1))
            } else {
                Some((1, 10_u128.checked_pow(shifted.unsigned_abs())?))
            }
        }
    }
}

/// What the resize needs to know about one existing claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimView {
    /// `data-<name>-<ordinal>`.
    pub name: String,
    /// Bound to a volume (only bound claims can be expanded).
    pub bound: bool,
    /// Its storage request in thousandths.
    pub request_millis: Option<u128>,
    /// Its StorageClass (set by the API server's default-class admission when the spec
    /// names none).
    pub storage_class: Option<String>,
}

impl ClaimView {
    /// The view of a claim read from the API server.
    pub fn of(claim: &PersistentVolumeClaim) -> Self {
        let spec = claim.spec.as_ref();
        Self {
            name: claim.name_any(),
            bound: claim
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|phase| phase == "Bound"),
            request_millis: spec
                .and_then(|s| s.resources.as_ref())
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage"))
                .and_then(|q| size_millis(&q.0)),
            storage_class: spec
                .and_then(|s| s.storage_class_name.clone())
                .filter(|class| !class.is_empty()),
        }
    }

    fn below(&self, want: u128) -> bool {
        self.request_millis.is_none_or(|request| request < want)
    }
}

/// What to do with the existing claims.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimPlan {
    /// Bound claims below the size whose class allows expansion: patch their request.
    pub expand: Vec<String>,
    /// Claims below the size that are not bound yet: the API server refuses to expand
    /// them; they are expanded once bound.
    pub unbound: Vec<String>,
    /// A bound claim below the size whose StorageClass (if any) does not allow expansion:
    /// nothing is patched.
    pub not_allowed: Option<(String, Option<String>)>,
}

/// The StorageClasses to look up: those of the bound claims below the size.
pub fn classes_to_check(want: u128, claims: &[ClaimView]) -> BTreeSet<String> {
    claims
        .iter()
        .filter(|c| c.bound && c.below(want))
        .filter_map(|c| c.storage_class.clone())
        .collect()
}

/// The plan for claims `claims` when the spec asks for `want` thousandths; `expandable`
/// says which StorageClasses have `allowVolumeExpansion: true` (a missing one does not).
pub fn claim_plan(
    want: u128,
    claims: &[ClaimView],
    expandable: &BTreeMap<String, bool>,
) -> ClaimPlan {
    let mut plan = ClaimPlan::default();
    for claim in claims.iter().filter(|c| c.below(want)) {
        if !claim.bound {
            plan.unbound.push(claim.name.clone());
            continue;
        }
        let allowed = claim
            .storage_class
            .as_ref()
            .and_then(|class| expandable.get(class))
            .copied()
            .unwrap_or(false);
        if !allowed {
            plan.not_allowed = Some((claim.name.clone(), claim.storage_class.clone()));
            plan.expand.clear();
            return plan;
        }
        plan.expand.push(claim.name.clone());
    }
    plan
}

/// What a pass does with the StatefulSet.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum StatefulSetPlan {
    /// Apply it as the spec says.
    #[default]
    Apply,
    /// Apply it keeping its claim template at this size: the template is immutable and the
    /// StatefulSet is not being replaced (expansion not allowed, or a known problem).
    KeepTemplate(Quantity),
    /// Apply it keeping its claim template at this size and with `whenDeleted: Retain`, so
    /// that it owns no claim when it is deleted (see [`claims_released`]).
    ReleaseClaims(Quantity),
    /// Do not apply it: it is being deleted to be replaced. An apply landing after the
    /// deletion completed would create it again with the old template.
    LeaveAlone,
}

/// What the resize decided for this pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resize {
    /// What the apply does with the StatefulSet.
    pub stateful_set: StatefulSetPlan,
    /// The `StorageResizing` condition; `None` keeps the one the object has (if any).
    pub condition: Option<ConditionValue>,
    /// Why the size cannot be carried out (shown as Degraded).
    pub problem: Option<TerminalProblem>,
    /// Look again after this long (a step in progress that produces no event on the
    /// object or its children).
    pub requeue: Option<Duration>,
}

impl Resize {
    /// The resize held where it stands (no I/O): while the StatefulSet's template asks for
    /// less than the spec, the apply keeps it; while it is being replaced, it is left alone.
    pub fn hold(size: &Quantity, stateful_set: Option<&StatefulSet>) -> Self {
        let stateful_set = match phase(size, stateful_set) {
            Phase::Behind { template } => StatefulSetPlan::KeepTemplate(template),
            Phase::Replacing { .. } => StatefulSetPlan::LeaveAlone,
            Phase::InSync => StatefulSetPlan::Apply,
        };
        Self {
            stateful_set,
            ..Self::default()
        }
    }

    /// The StatefulSet to apply this pass, from the one the spec asks for; `None`: apply
    /// none.
    pub fn stateful_set_to_apply(&self, mut desired: StatefulSet) -> Option<StatefulSet> {
        match &self.stateful_set {
            StatefulSetPlan::Apply => {}
            StatefulSetPlan::KeepTemplate(size) => set_template_size(&mut desired, size),
            StatefulSetPlan::ReleaseClaims(size) => {
                set_template_size(&mut desired, size);
                retain_claims(&mut desired);
            }
            StatefulSetPlan::LeaveAlone => return None,
        }
        Some(desired)
    }

    /// Sets the `StorageResizing` condition in `status` (or keeps the previous one), and
    /// Degraded when the size cannot be carried out and nothing else is wrong.
    pub fn annotate(
        &self,
        status: &mut DatabaseClusterStatus,
        previous: &[Condition],
        now: jiff::Timestamp,
    ) {
        let generation = status.observed_generation;
        match &self.condition {
            Some(value) => set_condition(
                &mut status.conditions,
                previous,
                STORAGE_RESIZING,
                value.clone(),
                generation,
                now,
            ),
            None => keep_condition(&mut status.conditions, previous, STORAGE_RESIZING),
        }
        let degraded_already = status
            .conditions
            .iter()
            .any(|c| c.type_ == DEGRADED && c.status == "True");
        if let Some(problem) = &self.problem
            && !degraded_already
        {
            set_condition(
                &mut status.conditions,
                previous,
                DEGRADED,
                ConditionValue {
                    status: "True",
                    reason: NOT_ALLOWED_REASON,
                    message: problem.message.clone(),
                },
                generation,
                now,
            );
        }
    }
}

fn resizing(reason: &'static str, message: String) -> Option<ConditionValue> {
    Some(ConditionValue {
        status: "True",
        reason,
        message,
    })
}

fn not_allowed(
    size: &Quantity,
    template: Option<Quantity>,
    claim: &str,
    class: Option<&str>,
) -> Resize {
    let message = match class {
        Some(class) => format!(
            "cannot grow the volumes to {}: claim {claim} has StorageClass {class}, which does not allow volume expansion (allowVolumeExpansion)",
            size.0
        ),
        None => format!(
            "cannot grow the volumes to {}: claim {claim} has no StorageClass, so it cannot be expanded",
            size.0
        ),
    };
    Resize {
        stateful_set: template.map_or(StatefulSetPlan::Apply, StatefulSetPlan::KeepTemplate),
        condition: Some(ConditionValue {
            status: "False",
            reason: "ExpansionNotAllowed",
            message: message.clone(),
        }),
        problem: Some(TerminalProblem {
            reason: NOT_ALLOWED_REASON.to_owned(),
            message,
        }),
        requeue: None,
    }
}

/// The client and fence the resize writes with.
pub struct ResizeIo<'a> {
    /// Client acting as the shard.
    pub client: &'a Client,
    /// The shard's Lease fence.
    pub guard: &'a LeaseGuard,
    /// The shard, whose label the replacement StatefulSet carries.
    pub shard: ShardIndex,
}

/// Whether `status` shows a resize under way.
fn under_way(status: Option<&DatabaseClusterStatus>) -> bool {
    status.is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == STORAGE_RESIZING && c.status == "True")
    })
}

/// Carries the resize one step further (see the module documentation) and says what the
/// apply and the status must show. `status` is the status the object has (see
/// [`crate::status::known_status`]: the reconcile's snapshot may be older than our last
/// write).
/// Reads nothing while the template matches the spec and no resize is under way.
pub async fn advance(
    io: &ResizeIo<'_>,
    cluster: &DatabaseCluster,
    stateful_set: Option<&StatefulSet>,
    status: Option<&DatabaseClusterStatus>,
) -> Result<Resize, ReconcileError> {
    let size = &cluster.spec.storage.size;
    match phase(size, stateful_set) {
        Phase::InSync if !under_way(status) => Ok(Resize::default()),
        Phase::Replacing { .. } => Ok(replacing(
            "waiting for the StatefulSet to be deleted; its pods and claims are kept".into(),
        )),
        Phase::Behind { template } => {
            let plan = plan_claims(io, cluster, status, stateful_set).await?;
            if let Some((claim, class)) = &plan.not_allowed {
                return Ok(not_allowed(size, Some(template), claim, class.as_deref()));
            }
            expand_claims(io, cluster, &plan.expand).await?;
            if let Some(stateful_set) = stateful_set {
                let step = replace_step(size, template.clone(), stateful_set);
                if step.stateful_set == StatefulSetPlan::LeaveAlone {
                    if let Some(reason) = replacement_rejection(io, cluster).await? {
                        return Ok(replacement_rejected(size, template, &reason));
                    }
                    delete_orphaning(io, stateful_set).await?;
                }
                return Ok(step);
            }
            // `phase` says Behind only of an existing StatefulSet.
            Ok(Resize::hold(size, None))
        }
        Phase::InSync if stateful_set.is_none() => Ok(Resize {
            condition: resizing(
                "ReplacingStatefulSet",
                "creating the StatefulSet with the new claim template".into(),
            ),
            requeue: Some(REPLACE_POLL),
            ..Resize::default()
        }),
        Phase::InSync => {
            let plan = plan_claims(io, cluster, status, stateful_set).await?;
            if let Some((claim, class)) = &plan.not_allowed {
                return Ok(not_allowed(size, None, claim, class.as_deref()));
            }
            expand_claims(io, cluster, &plan.expand).await?;
            Ok(finishing(size, &plan.unbound))
        }
    }
}

/// The pass that replaces a StatefulSet whose claims are expanded already: first it lets
/// go of its claims ([`claims_released`]); once it has, it is deleted (the caller deletes it
/// when the plan is [`StatefulSetPlan::LeaveAlone`]) and left alone until it is gone.
pub fn replace_step(size: &Quantity, template: Quantity, stateful_set: &StatefulSet) -> Resize {
    if !claims_released(stateful_set) {
        return Resize {
            stateful_set: StatefulSetPlan::ReleaseClaims(template),
            condition: resizing(
                "ReleasingClaims",
                format!(
                    "claims expanded to {}; the StatefulSet lets go of its claims (whenDeleted: Retain) before it is replaced",
                    size.0
                ),
            ),
            requeue: Some(REPLACE_POLL),
            ..Resize::default()
        };
    }
    replacing(format!(
        "claims expanded to {}; replacing the StatefulSet around the new claim template, its pods are kept",
        size.0
    ))
}

/// A pass while the StatefulSet is deleted to be replaced: not applied, looked at again.
fn replacing(message: String) -> Resize {
    Resize {
        stateful_set: StatefulSetPlan::LeaveAlone,
        condition: resizing("ReplacingStatefulSet", message),
        requeue: Some(REPLACE_POLL),
        ..Resize::default()
    }
}

/// The condition once the StatefulSet has the new template: done, or waiting for claims
/// to be bound.
fn finishing(size: &Quantity, unbound: &[String]) -> Resize {
    if unbound.is_empty() {
        return Resize {
            condition: Some(ConditionValue {
                status: "False",
                reason: "Resized",
                message: format!(
                    "every claim and the StatefulSet's claim template request {}",
                    size.0
                ),
            }),
            ..Resize::default()
        };
    }
    Resize {
        condition: resizing(
            "WaitingForClaimBinding",
            format!(
                "claims not bound yet are expanded to {} once bound: {}",
                size.0,
                unbound.join(", ")
            ),
        ),
        requeue: Some(BINDING_POLL),
        ..Resize::default()
    }
}

/// Reads the claims that may exist (by name, from the ordinals `status` records) and the
/// StorageClasses of those to expand.
async fn plan_claims(
    io: &ResizeIo<'_>,
    cluster: &DatabaseCluster,
    status: Option<&DatabaseClusterStatus>,
    stateful_set: Option<&StatefulSet>,
) -> Result<ClaimPlan, ReconcileError> {
    let want = size_millis(&cluster.spec.storage.size.0).unwrap_or_default();
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(io.client.clone(), &cluster.namespace().unwrap_or_default());
    let mut claims = Vec::new();
    let ordinals = claims::ordinals_to_record(cluster, status, stateful_set);
    for name in claims::claim_names(&cluster.name_any(), ordinals) {
        let claim = api
            .get_opt(&name)
            .await
            .map_err(ReconcileError::kube("reading a volume claim"))?;
        claims.extend(claim.as_ref().map(ClaimView::of));
    }
    let classes: Api<StorageClass> = Api::all(io.client.clone());
    let mut expandable = BTreeMap::new();
    for class in classes_to_check(want, &claims) {
        let allowed = classes
            .get_opt(&class)
            .await
            .map_err(ReconcileError::kube("reading a StorageClass"))?
            .and_then(|c| c.allow_volume_expansion)
            .unwrap_or(false);
        expandable.insert(class, allowed);
    }
    Ok(claim_plan(want, &claims, &expandable))
}

/// Patches the storage request of each named claim to the spec's size.
async fn expand_claims(
    io: &ResizeIo<'_>,
    cluster: &DatabaseCluster,
    names: &[String],
) -> Result<(), ReconcileError> {
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(io.client.clone(), &cluster.namespace().unwrap_or_default());
    let patch = json!({
        "spec": { "resources": { "requests": { "storage": cluster.spec.storage.size } } }
    });
    let params = PatchParams {
        field_manager: Some(WORKER_FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    for name in names {
        io.guard.check()?;
        api.patch(name, &params, &Patch::Merge(&patch))
            .await
            .map_err(ReconcileError::kube("expanding a volume claim"))?;
    }
    if !names.is_empty() {
        tracing::info!(claims = names.len(), size = %cluster.spec.storage.size.0, "volume claims expanded");
    }
    Ok(())
}

/// Why the API server would refuse the StatefulSet that replaces the old one, if it would:
/// a dry-run create of it. The old StatefulSet still holds the name, and the API server
/// validates an object (and runs validating admission) before it looks the name up, so
/// 409 AlreadyExists says the replacement passed; 422 or 400 says why it would not.
async fn replacement_rejection(
    io: &ResizeIo<'_>,
    cluster: &DatabaseCluster,
) -> Result<Option<String>, ReconcileError> {
    let replacement = desired_stateful_set(cluster, io.shard);
    let api: Api<StatefulSet> =
        Api::namespaced(io.client.clone(), &cluster.namespace().unwrap_or_default());
    let params = PostParams {
        dry_run: true,
        field_manager: Some(WORKER_FIELD_MANAGER.to_owned()),
    };
    io.guard.check()?;
    match api.create(&params, &replacement).await {
        // Gone meanwhile: nothing to delete, the next pass creates it (and learns why not).
        Ok(_) => Ok(None),
        Err(kube::Error::Api(status)) if status.code == 409 && status.reason == "AlreadyExists" => {
            Ok(None)
        }
        Err(kube::Error::Api(status)) if status.code == 422 || status.code == 400 => {
            Ok(Some(status.message.clone()))
        }
        Err(err) => Err(ReconcileError::kube("checking the replacement StatefulSet")(err)),
    }
}

/// The pass that finds the replacement StatefulSet rejected: the old one stays (its
/// template keeps its size, the rest of the spec is applied and rejected as usual, so the
/// object shows Degraded for the spec error) until the spec changes.
fn replacement_rejected(size: &Quantity, template: Quantity, reason: &str) -> Resize {
    Resize {
        stateful_set: StatefulSetPlan::KeepTemplate(template),
        condition: Some(ConditionValue {
            status: "False",
            reason: "ReplacementRejected",
            message: format!(
                "claims expanded to {}, but the API server would reject the StatefulSet that replaces the old one ({reason}); the old StatefulSet and its pods are kept until the spec is fixed",
                size.0
            ),
        }),
        problem: Some(TerminalProblem {
            reason: "StatefulSetReplacementRejected".to_owned(),
            message: format!(
                "the StatefulSet with the {} claim template would be rejected: {reason}",
                size.0
            ),
        }),
        requeue: None,
    }
}

/// Deletes the StatefulSet we saw (uid precondition) and nothing else: its pods and claims
/// are orphaned, and adopted by the StatefulSet the next apply creates.
async fn delete_orphaning(
    io: &ResizeIo<'_>,
    stateful_set: &StatefulSet,
) -> Result<(), ReconcileError> {
    let api: Api<StatefulSet> = Api::namespaced(
        io.client.clone(),
        &stateful_set.namespace().unwrap_or_default(),
    );
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Orphan),
        preconditions: Some(Preconditions {
            uid: stateful_set.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    io.guard.check()?;
    match api.delete(&stateful_set.name_any(), &params).await {
        Ok(_) => {
            tracing::info!("StatefulSet deleted with orphan propagation, to be recreated");
            Ok(())
        }
        // Gone already, or already replaced: the next pass sees which.
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
        Err(err) => Err(ReconcileError::kube("replacing the StatefulSet")(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use shardop_api::{DatabaseClusterSpec, ReclaimPolicy, ShardIndex, StorageSpec};

    fn cluster(size: &str) -> DatabaseCluster {
        let mut c = DatabaseCluster::new(
            "db",
            DatabaseClusterSpec {
                replicas: 2,
                image: "postgres:17".into(),
                resources: None,
                storage: StorageSpec {
                    storage_class_name: Some("fast".into()),
                    size: Quantity(size.into()),
                    reclaim_policy: ReclaimPolicy::Delete,
                },
            },
        );
        c.metadata.namespace = Some("ns".into());
        c
    }

    fn sts(size: &str) -> StatefulSet {
        crate::children::desired_stateful_set(&cluster(size), ShardIndex(0))
    }

    fn deleting(mut sts: StatefulSet) -> StatefulSet {
        sts.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        sts
    }

    fn q(size: &str) -> Quantity {
        Quantity(size.into())
    }

    #[test]
    fn sizes_compare_across_units() {
        assert_eq!(size_millis("1Gi"), Some(1_073_741_824_000));
        assert_eq!(size_millis("1024Mi"), size_millis("1Gi"));
        assert_eq!(size_millis("1.5Gi"), size_millis("1536Mi"));
        assert_eq!(size_millis("1G"), size_millis("1e9"));
        assert_eq!(size_millis("1000M"), size_millis("1G"));
        assert_eq!(size_millis("500m"), Some(500));
        assert_eq!(size_millis("+2Ki"), Some(2_048_000));
        assert!(size_millis("2Gi") > size_millis("2G"));
        for invalid in ["", "Gi", "lots", "-1Gi", "1.2.3Gi", "1Qi"] {
            assert_eq!(size_millis(invalid), None, "{invalid}");
        }
    }

    #[test]
    fn a_larger_spec_size_puts_the_stateful_set_behind() {
        assert_eq!(phase(&q("1Gi"), None), Phase::InSync);
        assert_eq!(phase(&q("1Gi"), Some(&sts("1Gi"))), Phase::InSync);
        assert_eq!(phase(&q("1024Mi"), Some(&sts("1Gi"))), Phase::InSync);
        // Never shrink (the CRD forbids it, a hand-edited StatefulSet may be larger).
        assert_eq!(phase(&q("1Gi"), Some(&sts("2Gi"))), Phase::InSync);
        assert_eq!(
            phase(&q("2Gi"), Some(&sts("1Gi"))),
            Phase::Behind { template: q("1Gi") }
        );
        assert_eq!(
            phase(&q("2Gi"), Some(&deleting(sts("1Gi")))),
            Phase::Replacing { template: q("1Gi") }
        );
    }

    #[test]
    fn the_apply_keeps_the_old_template_until_the_stateful_set_is_replaced() {
        let held = Resize::hold(&q("2Gi"), Some(&sts("1Gi")));
        let desired = held.stateful_set_to_apply(sts("2Gi")).unwrap();
        assert_eq!(template_size(&desired), Some(&q("1Gi")));
        assert!(
            crate::children::is_subset(&desired, &sts("1Gi")),
            "no apply of the immutable field"
        );
        // Gone: the new StatefulSet is created with the spec's size.
        let created = Resize::hold(&q("2Gi"), None)
            .stateful_set_to_apply(sts("2Gi"))
            .unwrap();
        assert_eq!(template_size(&created), Some(&q("2Gi")));
    }

    /// `stateful_set` as the StatefulSet controller has seen it (or not) at `generation`.
    fn observed(mut stateful_set: StatefulSet, generation: i64, seen: i64) -> StatefulSet {
        stateful_set.metadata.generation = Some(generation);
        stateful_set.status = Some(k8s_openapi::api::apps::v1::StatefulSetStatus {
            observed_generation: Some(seen),
            ..Default::default()
        });
        stateful_set
    }

    fn when_deleted(stateful_set: &StatefulSet) -> Option<&str> {
        stateful_set
            .spec
            .as_ref()?
            .persistent_volume_claim_retention_policy
            .as_ref()?
            .when_deleted
            .as_deref()
    }

    #[test]
    fn the_stateful_set_lets_go_of_its_claims_before_it_is_deleted() {
        // The spec's policy is Delete: the StatefulSet controller owns the claims.
        let owning = observed(sts("1Gi"), 1, 1);
        assert_eq!(when_deleted(&owning), Some("Delete"));
        assert!(!claims_released(&owning));
        let step = replace_step(&q("2Gi"), q("1Gi"), &owning);
        assert_eq!(
            step.stateful_set,
            StatefulSetPlan::ReleaseClaims(q("1Gi")),
            "not deleted yet"
        );
        assert_eq!(step.requeue, Some(REPLACE_POLL));
        let applied = step.stateful_set_to_apply(sts("2Gi")).unwrap();
        assert_eq!(when_deleted(&applied), Some("Retain"));
        assert_eq!(template_size(&applied), Some(&q("1Gi")), "template kept");

        // Applied, but the controller has not seen it yet: a sync from its cache may
        // still put an owner reference on a claim.
        let unseen = observed(applied.clone(), 2, 1);
        assert!(!claims_released(&unseen));
        assert!(matches!(
            replace_step(&q("2Gi"), q("1Gi"), &unseen).stateful_set,
            StatefulSetPlan::ReleaseClaims(_)
        ));

        // Seen: delete it, and leave it alone from then on.
        let released = observed(applied, 2, 2);
        assert!(claims_released(&released));
        let step = replace_step(&q("2Gi"), q("1Gi"), &released);
        assert_eq!(step.stateful_set, StatefulSetPlan::LeaveAlone);
        assert_eq!(step.stateful_set_to_apply(sts("2Gi")), None);
        assert_eq!(step.condition.unwrap().reason, "ReplacingStatefulSet");
    }

    #[test]
    fn a_stateful_set_being_replaced_is_never_applied() {
        // Once its deletion completes an apply would create it again with the old
        // template (and a StatefulSet created and deleted in a hurry is what the
        // controller's claim adoption races with).
        let held = Resize::hold(&q("2Gi"), Some(&deleting(sts("1Gi"))));
        assert_eq!(held.stateful_set, StatefulSetPlan::LeaveAlone);
        assert_eq!(held.stateful_set_to_apply(sts("2Gi")), None);
        let waiting = replacing("waiting".into());
        assert_eq!(waiting.stateful_set_to_apply(sts("2Gi")), None);
        assert_eq!(waiting.requeue, Some(REPLACE_POLL));
    }

    #[test]
    fn a_retain_policy_needs_no_release_step_once_seen() {
        let mut retaining = sts("1Gi");
        retain_claims(&mut retaining);
        assert!(!claims_released(&retaining), "no status: not seen");
        let seen = observed(retaining, 3, 3);
        assert!(claims_released(&seen));
        assert_eq!(
            replace_step(&q("2Gi"), q("1Gi"), &seen).stateful_set,
            StatefulSetPlan::LeaveAlone
        );
    }

    fn claim(name: &str, bound: bool, size: &str, class: Option<&str>) -> ClaimView {
        ClaimView {
            name: name.into(),
            bound,
            request_millis: size_millis(size),
            storage_class: class.map(str::to_owned),
        }
    }

    #[test]
    fn bound_claims_below_the_size_are_expanded_and_unbound_ones_wait() {
        let want = size_millis("2Gi").unwrap();
        let claims = [
            claim("data-db-0", true, "1Gi", Some("fast")),
            claim("data-db-1", false, "1Gi", Some("fast")),
            claim("data-db-2", true, "2Gi", Some("slow")),
        ];
        assert_eq!(
            classes_to_check(want, &claims),
            BTreeSet::from(["fast".to_owned()]),
            "only classes of claims to expand are read"
        );
        let plan = claim_plan(want, &claims, &BTreeMap::from([("fast".into(), true)]));
        assert_eq!(
            plan,
            ClaimPlan {
                expand: vec!["data-db-0".into()],
                unbound: vec!["data-db-1".into()],
                not_allowed: None,
            }
        );
    }

    #[test]
    fn a_class_without_expansion_blocks_every_claim_patch() {
        let want = size_millis("2Gi").unwrap();
        let claims = [
            claim("data-db-0", true, "1Gi", Some("fast")),
            claim("data-db-1", true, "1Gi", Some("slow")),
        ];
        let expandable = BTreeMap::from([("fast".into(), true), ("slow".into(), false)]);
        let plan = claim_plan(want, &claims, &expandable);
        assert!(plan.expand.is_empty(), "nothing patched: {plan:?}");
        assert_eq!(
            plan.not_allowed,
            Some(("data-db-1".into(), Some("slow".into())))
        );
        // No class at all, or a class that does not exist: not expandable either.
        let classless = [claim("data-db-0", true, "1Gi", None)];
        assert!(
            claim_plan(want, &classless, &BTreeMap::new())
                .not_allowed
                .is_some()
        );
        let unknown = [claim("data-db-0", true, "1Gi", Some("gone"))];
        assert!(
            claim_plan(want, &unknown, &BTreeMap::new())
                .not_allowed
                .is_some()
        );
    }

    #[test]
    fn a_rejected_replacement_keeps_the_old_template_ends_the_resize_and_says_why() {
        let why = "spec.template.spec.containers[0].resources.requests: Invalid value: \"2\": must be less than or equal to cpu limit of 1";
        let resize = replacement_rejected(&q("2Gi"), q("1Gi"), why);
        // Applied with the old template (never left alone: that is the deletion's plan).
        assert_eq!(resize.stateful_set, StatefulSetPlan::KeepTemplate(q("1Gi")));
        assert_eq!(resize.requeue, None, "waits for a spec change, no polling");
        let condition = resize.condition.as_ref().unwrap();
        assert_eq!(
            (condition.status, condition.reason),
            ("False", "ReplacementRejected")
        );
        assert!(condition.message.contains(why), "{}", condition.message);
        let problem = resize.problem.as_ref().unwrap();
        assert_eq!(problem.reason, "StatefulSetReplacementRejected");
        assert!(problem.message.contains("2Gi") && problem.message.contains(why));
    }

    #[test]
    fn not_allowed_is_degraded_but_keeps_the_template_and_the_other_conditions() {
        let resize = not_allowed(&q("2Gi"), Some(q("1Gi")), "data-db-0", Some("slow"));
        assert_eq!(resize.stateful_set, StatefulSetPlan::KeepTemplate(q("1Gi")));
        let now = jiff::Timestamp::from_second(100).unwrap();
        let mut status = DatabaseClusterStatus {
            observed_generation: Some(2),
            ..Default::default()
        };
        set_condition(
            &mut status.conditions,
            &[],
            DEGRADED,
            ConditionValue {
                status: "False",
                reason: "Reconciled",
                message: String::new(),
            },
            Some(2),
            now,
        );
        resize.annotate(&mut status, &[], now);
        let find = |type_: &str| {
            status
                .conditions
                .iter()
                .find(|c| c.type_ == type_)
                .unwrap()
                .clone()
        };
        let degraded = find(DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", NOT_ALLOWED_REASON)
        );
        assert!(degraded.message.contains("slow"), "{}", degraded.message);
        let resizing = find(STORAGE_RESIZING);
        assert_eq!(
            (resizing.status.as_str(), resizing.reason.as_str()),
            ("False", "ExpansionNotAllowed")
        );
    }

    #[test]
    fn the_resize_finishes_once_no_claim_waits() {
        let done = finishing(&q("2Gi"), &[]);
        let condition = done.condition.unwrap();
        assert_eq!((condition.status, condition.reason), ("False", "Resized"));
        assert_eq!(done.requeue, None);
        let waiting = finishing(&q("2Gi"), &["data-db-1".to_owned()]);
        let condition = waiting.condition.unwrap();
        assert_eq!(
            (condition.status, condition.reason),
            ("True", "WaitingForClaimBinding")
        );
        assert!(condition.message.contains("data-db-1"));
        assert_eq!(waiting.requeue, Some(BINDING_POLL));
    }

    #[test]
    fn a_pass_that_computes_no_condition_keeps_the_previous_one() {
        let now = jiff::Timestamp::from_second(5).unwrap();
        let mut previous = Vec::new();
        set_condition(
            &mut previous,
            &[],
            STORAGE_RESIZING,
            finishing(&q("2Gi"), &[]).condition.unwrap(),
            Some(1),
            now,
        );
        let mut status = DatabaseClusterStatus::default();
        Resize::default().annotate(&mut status, &previous, now);
        assert_eq!(status.conditions, previous);
    }
}
