//! The oracle on small synthetic audit logs.

use super::synthetic::Line;
use super::*;

const OP: &str = "op";
const NS: &str = "objs";
const ASSIGNER: &str = "shardop-assigner (shardop-assigner-0)";
const GC: &str = "kube-controller-manager/v1.36.3 (linux/amd64) kubernetes/abc/system:serviceaccount:kube-system:generic-garbage-collector";
const NS_CONTROLLER: &str = "kube-controller-manager/v1.36.3 (linux/amd64) kubernetes/abc/system:serviceaccount:kube-system:namespace-controller";

fn worker(shard: u32, pod: u32) -> String {
    format!("shardop-worker/shard-{shard} (shardop-worker-{pod})")
}

/// A Lease write by `agent` leaving `holder`, committed at `revision`, at `ms`.
fn lease(agent: &str, shard: u32, holder: Option<u32>, revision: u64, ms: i64) -> Line {
    let holder = holder.map(|pod| format!("shardop-worker-{pod}"));
    Line::new(
        "update",
        agent,
        "leases",
        OP,
        &format!("shardop-shard-{shard}"),
    )
    .lease(holder.as_deref(), revision)
    .at(ms, ms + 5)
}

/// A write by `agent` to `resource` `name` in the objects' namespace, answered with the
/// object at `revision`, received at `ms` and complete 5 ms later.
fn write(agent: &str, resource: &str, name: &str, revision: u64, ms: i64) -> Line {
    Line::new("patch", agent, resource, NS, name)
        .response("DatabaseCluster", revision)
        .at(ms, ms + 5)
}

fn check(lines: &[Line]) -> Ownership {
    let events: Vec<AuditEvent> = lines.iter().map(|l| l.event().unwrap()).collect();
    Ownership::check(
        &events,
        Scope {
            leases_namespace: OP,
            objects_namespace: NS,
        },
    )
}

#[test]
fn a_worker_writing_as_its_shard_after_another_process_took_the_lease_is_foreign() {
    let frozen = worker(1, 1);
    let taker = worker(1, 2);
    let lines = [
        lease(&frozen, 1, Some(1), 5, 0),
        write(&frozen, "statefulsets", "db", 6, 100),
        // worker-1 freezes; worker-2 takes Lease 1 over and serves the shard.
        lease(&taker, 1, Some(2), 20, 20_000),
        write(&taker, "databaseclusters/status", "db", 22, 20_100),
        // worker-1 resumes and sends the write it had prepared before the freeze.
        write(&frozen, "statefulsets", "db", 25, 27_800),
    ];
    let ownership = check(&lines);
    assert_eq!(ownership.writes.len(), 3);
    assert_eq!(ownership.foreign.len(), 1, "{:?}", ownership.violations());
    let late = ownership.foreign_writes().next().unwrap();
    assert_eq!(
        (late.pod.as_str(), late.position.revision),
        ("shardop-worker-1", 25)
    );
    assert_eq!(late.holder.as_deref(), Some("shardop-worker-2"));
    // Both processes wrote as shard 1: there is no second shard.
    assert!(ownership.cross_shard.is_empty());
    assert_eq!(ownership.dual_ownership(), 1);
}

#[test]
fn a_late_write_that_changed_nothing_is_placed_by_its_request_time() {
    let frozen = worker(1, 1);
    let taker = worker(1, 2);
    let lines = [
        lease(&frozen, 1, Some(1), 5, 0),
        write(&frozen, "statefulsets", "db", 6, 100),
        lease(&taker, 1, Some(2), 20, 20_000),
        write(&taker, "databaseclusters/status", "db", 22, 20_100),
        // The resumed worker's apply is identical to what is stored: the API server
        // answers with the StatefulSet's old revision 6, when worker-1 still held the Lease.
        write(&frozen, "statefulsets", "db", 6, 27_800),
    ];
    let ownership = check(&lines);
    let late: Vec<&ShardWrite> = ownership.foreign_writes().collect();
    assert_eq!(late.len(), 1, "{:?}", ownership.violations());
    assert_eq!(late[0].basis, Basis::NoOp);
    assert_eq!(late[0].position.revision, 22);
    assert_eq!(ownership.ordered_by_request_time(), 1);
}

#[test]
fn a_write_received_before_the_hand_back_but_committed_after_it_is_foreign() {
    let taker = worker(1, 2);
    let home = worker(1, 1);
    let lines = [
        lease(&taker, 1, Some(2), 5, 0),
        write(&taker, "statefulsets", "db", 6, 100),
        // The taker's status write arrives at 1.000 s but is slow to commit (revision 42)...
        write(&taker, "databaseclusters/status", "db", 42, 1_000).at(1_000, 1_400),
        // ...while it releases (40) and the home worker acquires (41) and writes (43).
        lease(&taker, 1, None, 40, 1_050),
        lease(&home, 1, Some(1), 41, 1_100),
        write(&home, "statefulsets", "db", 43, 1_200),
    ];
    let ownership = check(&lines);
    let foreign: Vec<String> = ownership
        .foreign_writes()
        .map(|w| w.request.clone())
        .collect();
    assert_eq!(foreign, ["patch databaseclusters/status db"]);
}

#[test]
fn a_clean_takeover_and_hand_back_is_no_dual_ownership() {
    let taker = worker(1, 2);
    let home = worker(1, 1);
    let lines = [
        lease(&home, 1, Some(1), 3, 0),
        write(&home, "statefulsets", "db", 4, 50),
        lease(&taker, 1, Some(2), 5, 15_000),
        write(&taker, "statefulsets", "db", 6, 15_100),
        // The home worker asks for its shard back: the response still names the taker.
        Line::new("patch", &home, "leases", OP, "shardop-shard-1")
            .lease(Some("shardop-worker-2"), 7)
            .at(16_000, 16_010),
        write(&taker, "services", "db-headless", 8, 16_100),
        lease(&taker, 1, None, 9, 16_200),
        lease(&home, 1, Some(1), 10, 16_300),
        write(&home, "databaseclusters/status", "db", 11, 16_400),
        write(&home, "persistentvolumeclaims", "data-db-0", 12, 16_500),
    ];
    let ownership = check(&lines);
    assert_eq!(ownership.writes.len(), 5);
    assert_eq!(
        ownership.dual_ownership(),
        0,
        "{:?}",
        ownership.violations()
    );
    assert_eq!(ownership.holder_unknown(), 0);
}

#[test]
fn a_request_whose_client_was_killed_is_checked_at_its_request_time_and_flagged() {
    let frozen = worker(1, 1);
    let taker = worker(1, 2);
    let lines = [
        lease(&frozen, 1, Some(1), 5, 0),
        // Audited as 504 without a response object: it may have been applied. Received
        // while worker-1 held the Lease: not foreign.
        Line::new("patch", &frozen, "statefulsets", NS, "db")
            .code(504)
            .at(100, 60_100),
        lease(&taker, 1, Some(2), 20, 20_000),
        // Received after the taker's acquire completed: foreign, whatever became of it.
        Line::new("patch", &frozen, "databaseclusters/status", NS, "db")
            .no_status()
            .at(27_800, 87_800),
        // Refused (409): never applied, not a write at all.
        Line::new("update", &frozen, "databaseclusters", NS, "db")
            .code(409)
            .at(27_900, 27_910),
    ];
    let ownership = check(&lines);
    assert_eq!(ownership.writes.len(), 2);
    assert_eq!(ownership.possibly_applied(), 2);
    assert_eq!(ownership.ordered_by_request_time(), 2);
    let foreign: Vec<&ShardWrite> = ownership.foreign_writes().collect();
    assert_eq!(foreign.len(), 1);
    assert_eq!(foreign[0].request, "patch databaseclusters/status db");
    assert!(foreign[0].possibly_applied);
    assert_eq!(foreign[0].basis, Basis::RequestTime);
    assert!(ownership.violations()[0].contains("possibly applied"));
}

#[test]
fn a_label_write_of_a_killed_assigner_separates_the_handover_at_its_request_time() {
    let old = worker(2, 2);
    let new = worker(3, 3);
    // Seen in an e2e run: the leader was killed while its relabel was in flight; the
    // request is audited as 504 without a response, yet the label landed and the new owner
    // acted on it.
    let lines = [
        lease(&old, 2, Some(2), 1, 0),
        lease(&new, 3, Some(3), 2, 0),
        write(&old, "databaseclusters", "db", 31_126, 1_541).at(1_541, 2_186),
        Line::new("patch", ASSIGNER, "databaseclusters", NS, "db")
            .code(504)
            .at(2_747, 2_976),
        write(&new, "services", "db-headless", 31_211, 3_282),
    ];
    let ownership = check(&lines);
    assert_eq!(ownership.writes.len(), 2);
    assert_eq!(
        ownership.dual_ownership(),
        0,
        "{:?}",
        ownership.violations()
    );
    // A refused label write separates nothing.
    let mut refused = lines.to_vec();
    refused[3] = refused[3].clone().code(409);
    assert_eq!(check(&refused).cross_shard.len(), 1);
}

#[test]
fn label_writes_answered_with_partial_object_metadata_order_the_handover() {
    let old = worker(2, 2);
    let new = worker(3, 3);
    let label = |revision, received, completed| {
        Line::new("patch", ASSIGNER, "databaseclusters", NS, "db")
            .response("PartialObjectMetadata", revision)
            .at(received, completed)
    };
    let lines = [
        lease(&old, 2, Some(2), 1, 0),
        lease(&new, 3, Some(3), 2, 0),
        // The old owner acknowledges the drain (10), then its slow status write is received
        // at 1.0 s and completes at 1.4 s; the assigner's label write is received at 1.3 s.
        // By revision the status write (11) committed before the new label (12): no overlap.
        write(&old, "databaseclusters", "db", 10, 0),
        write(&old, "databaseclusters/status", "db", 11, 1_000).at(1_000, 1_400),
        label(12, 1_300, 1_800),
        write(&new, "statefulsets", "db", 20, 1_900),
    ];
    let event = lines[4].event().unwrap();
    assert_eq!(event.resource_version(), Some(12));
    assert!(event.is_assigner_label_write());
    let ownership = check(&lines);
    assert_eq!(
        ownership.writes.len(),
        3,
        "label writes are not shard writes"
    );
    assert_eq!(
        ownership.dual_ownership(),
        0,
        "{:?}",
        ownership.violations()
    );

    // The old owner writing again after the new label, before the new owner: cross-shard,
    // though it still holds its own Lease.
    let mut late = lines.to_vec();
    late.push(write(&old, "statefulsets", "db", 15, 1_850));
    let ownership = check(&late);
    assert_eq!(ownership.foreign.len(), 0);
    assert_eq!(
        ownership.cross_shard.len(),
        1,
        "{:?}",
        ownership.violations()
    );
}

#[test]
fn a_namespace_deletion_does_not_make_the_last_finalizer_removals_foreign() {
    let owner = worker(0, 0);
    let lines = [
        lease(&owner, 0, Some(0), 5, 0),
        write(&owner, "statefulsets", "db", 6, 100),
        // The test deletes both namespaces: the namespace controller deletes every Lease
        // and marks every DatabaseCluster, one deletecollection each.
        Line::new("deletecollection", NS_CONTROLLER, "leases", OP, "")
            .response("LeaseList", 30)
            .at(1_000, 1_010),
        Line::new(
            "deletecollection",
            NS_CONTROLLER,
            "databaseclusters",
            NS,
            "",
        )
        .response("DatabaseClusterList", 31)
        .at(1_020, 1_030),
        // The owner, still running, removes its finalizer; the garbage collector deletes
        // the children.
        write(&owner, "databaseclusters", "db", 32, 1_100),
        Line::new("delete", GC, "statefulsets", NS, "db")
            .status_answer()
            .at(1_200, 1_210),
        Line::new("delete", GC, "services", NS, "db-headless")
            .status_answer()
            .at(1_200, 1_210),
    ];
    let ownership = check(&lines);
    assert_eq!(ownership.writes.len(), 2);
    assert_eq!(
        ownership.dual_ownership(),
        0,
        "{:?}",
        ownership.violations()
    );

    // A delete by the assigner (a retired shard's Lease) does leave the Lease without a
    // holder: a later write by its last holder is foreign.
    let retired = [
        lease(&owner, 0, Some(0), 5, 0),
        Line::new("delete", ASSIGNER, "leases", OP, "shardop-shard-0")
            .status_answer()
            .at(1_000, 1_010),
        write(&owner, "databaseclusters", "db", 32, 1_100),
    ];
    assert_eq!(check(&retired).foreign.len(), 1);
}

#[test]
fn writes_before_any_lease_write_of_their_shard_have_an_unknown_holder() {
    let lines = [write(&worker(0, 0), "statefulsets", "db", 6, 100)];
    let ownership = check(&lines);
    assert_eq!(ownership.holder_unknown(), 1);
    assert_eq!(ownership.dual_ownership(), 0);
}

#[test]
fn the_revision_clock_places_requests_after_what_had_completed() {
    let lines = [
        write(&worker(0, 0), "statefulsets", "a", 10, 0).at(0, 100),
        write(&worker(0, 0), "statefulsets", "b", 12, 50).at(50, 300),
    ];
    let events: Vec<AuditEvent> = lines.iter().map(|l| l.event().unwrap()).collect();
    let clock = RevisionClock::new(&events);
    let at = |ms| jiff::Timestamp::from_millisecond(ms).unwrap();
    assert_eq!(clock.committed_before(at(100)), 0);
    assert_eq!(clock.committed_before(at(101)), 10);
    assert_eq!(clock.committed_before(at(301)), 12);
    let noop = write(&worker(0, 0), "statefulsets", "a", 10, 200)
        .event()
        .unwrap();
    let (position, basis) = clock.place(&noop);
    assert_eq!(
        (position.revision, position.after, basis),
        (10, true, Basis::NoOp)
    );
}

#[test]
fn lines_of_other_stages_and_garbage_are_skipped() {
    let line = Line::new("patch", &worker(0, 0), "statefulsets", NS, "db").to_json();
    assert!(parse_line(&line).is_some());
    let received = line.replace("ResponseComplete", "RequestReceived");
    assert!(parse_line(&received).is_none());
    assert!(parse_line("{\"verb\":").is_none());
}

/// The oracle for another operator (`tenants`, a cluster-scoped kind whose children live in
/// the objects' namespace): its user agents, Lease names and owner mapping.
mod other_operator {
    use super::*;

    fn tenants() -> Operated {
        Operated {
            names: shardop::OperatorNames::new("tenants").unwrap(),
            resource: "tenants".to_owned(),
            cluster_scoped: true,
            owner: |event| match event.resource() {
                "tenants" => Some(event.name().to_owned()),
                "configmaps" => event.name().strip_prefix("tenant-").map(str::to_owned),
                _ => None,
            },
        }
    }

    fn worker(shard: u32, pod: u32) -> String {
        format!("tenants-worker/shard-{shard} (tenants-worker-{pod})")
    }

    fn lease(shard: u32, holder: u32, revision: u64, ms: i64) -> Line {
        Line::new(
            "update",
            &worker(shard, holder),
            "leases",
            OP,
            &format!("tenants-shard-{shard}"),
        )
        .lease(Some(&format!("tenants-worker-{holder}")), revision)
        .at(ms, ms + 5)
    }

    fn tenant_write(agent: &str, resource: &str, name: &str, revision: u64, ms: i64) -> Line {
        let namespace = if resource.starts_with("tenants") {
            ""
        } else {
            NS
        };
        Line::new("patch", agent, resource, namespace, name)
            .response("Tenant", revision)
            .at(ms, ms + 5)
    }

    fn check(lines: &[Line]) -> Ownership {
        let events: Vec<AuditEvent> = lines.iter().map(|l| l.event().unwrap()).collect();
        Ownership::check_operated(
            &events,
            Scope {
                leases_namespace: OP,
                objects_namespace: NS,
            },
            &tenants(),
        )
    }

    #[test]
    fn two_shards_writing_one_cluster_scoped_object_without_a_relabel_is_dual_ownership() {
        let lines = [
            lease(0, 0, 1, 0),
            lease(1, 1, 2, 0),
            tenant_write(&worker(0, 0), "tenants/status", "acme", 5, 100),
            tenant_write(&worker(1, 1), "configmaps", "tenant-acme", 6, 200),
        ];
        let ownership = check(&lines);
        assert_eq!(ownership.writes.len(), 2, "both writes are the tenant's");
        assert_eq!(
            ownership.cross_shard.len(),
            1,
            "{:?}",
            ownership.violations()
        );
        assert_eq!(ownership.writes[1].object, "acme");
    }

    #[test]
    fn a_relabel_by_the_operators_assigner_separates_two_shards() {
        let lines = [
            lease(0, 0, 1, 0),
            lease(1, 1, 2, 0),
            tenant_write(&worker(0, 0), "tenants/status", "acme", 5, 100),
            tenant_write(
                "tenants-assigner (tenants-assigner-0)",
                "tenants",
                "acme",
                6,
                150,
            ),
            tenant_write(&worker(1, 1), "configmaps", "tenant-acme", 7, 200),
        ];
        assert_eq!(check(&lines).dual_ownership(), 0);
        // The DatabaseCluster operator's oracle sees none of it.
        let events: Vec<AuditEvent> = lines.iter().map(|l| l.event().unwrap()).collect();
        let default = Ownership::check(
            &events,
            Scope {
                leases_namespace: OP,
                objects_namespace: NS,
            },
        );
        assert!(default.writes.is_empty());
    }

    #[test]
    fn a_write_by_a_process_not_holding_the_other_operators_lease_is_foreign() {
        let lines = [
            lease(2, 2, 1, 0),
            tenant_write(&worker(2, 3), "tenants", "acme", 5, 100),
        ];
        let ownership = check(&lines);
        assert_eq!(ownership.foreign.len(), 1, "{:?}", ownership.violations());
    }
}
