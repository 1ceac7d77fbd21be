//! Which sharded operator the ownership oracle checks: its names (user agents, shard Lease
//! names, from [`OperatorNames`]), the plural of its sharded kind, and how an audited write
//! maps to the object it belongs to. [`Operated::default`] is the DatabaseCluster operator.

use shardop::OperatorNames;

use super::event::{AuditEvent, Outcome};

/// One sharded operator, as the audit log shows it.
#[derive(Debug, Clone)]
pub struct Operated {
    /// The operator's names; its workers' user agents are
    /// `<worker field manager>/shard-<i> (<pod>)`, its assigner's `<assigner field manager> (<pod>)`.
    pub names: OperatorNames,
    /// Plural of the sharded kind, e.g. `databaseclusters`.
    pub resource: String,
    /// Whether the sharded kind is cluster-scoped (its objects have no namespace; their
    /// children live in the objects namespace of the [`super::Scope`]).
    pub cluster_scoped: bool,
    /// The sharded object a write belongs to: the object itself or the owner of a child.
    pub owner: fn(&AuditEvent) -> Option<String>,
}

impl Default for Operated {
    fn default() -> Self {
        Self {
            names: OperatorNames::default(),
            resource: "databaseclusters".to_owned(),
            cluster_scoped: false,
            owner: AuditEvent::database_cluster,
        }
    }
}

impl Operated {
    /// The shard in a `<operator>-worker/shard-<i> (<pod>)` user agent.
    pub fn worker_shard(&self, event: &AuditEvent) -> Option<u32> {
        let prefix = format!("{}/shard-", self.names.worker_field_manager());
        let rest = event.user_agent.strip_prefix(&prefix)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    /// The pod in a `<operator>-worker/shard-<i> (<pod>)` user agent.
    pub fn worker_pod<'a>(&self, event: &'a AuditEvent) -> Option<&'a str> {
        self.worker_shard(event)?;
        let (_, rest) = event.user_agent.split_once('(')?;
        rest.split_once(')').map(|(pod, _)| pod)
    }

    /// Whether the operator's assigner made this request.
    pub fn by_assigner(&self, event: &AuditEvent) -> bool {
        event
            .user_agent
            .strip_prefix(&self.names.assigner_field_manager())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
    }

    /// Whether one of the operator's processes (assigner or worker) made this request.
    pub fn by_operator(&self, event: &AuditEvent) -> bool {
        self.by_assigner(event)
            || event
                .user_agent
                .starts_with(&format!("{}/", self.names.worker_field_manager()))
    }

    /// A label request by the assigner on a sharded object that was applied or may have
    /// been (see [`AuditEvent::is_assigner_label_request`]).
    pub fn is_assigner_label_request(&self, event: &AuditEvent) -> bool {
        self.by_assigner(event)
            && event.resource() == self.resource
            && event.subresource().is_none()
            && event.is_write()
            && event.outcome() != Outcome::Rejected
    }

    /// Whether the event is about an object the oracle looks at: in `objects_namespace`,
    /// or a cluster-scoped object of the sharded kind.
    pub fn in_scope(&self, event: &AuditEvent, objects_namespace: &str) -> bool {
        event.in_namespace(objects_namespace)
            || (self.cluster_scoped
                && event.resource() == self.resource
                && event
                    .object_ref
                    .as_ref()
                    .is_some_and(|o| o.namespace.is_none()))
    }

    /// The shard of one of the operator's shard Leases.
    pub fn shard_of_lease(&self, name: &str) -> Option<u32> {
        self.names.shard_of_lease(name).map(|shard| shard.0)
    }
}
