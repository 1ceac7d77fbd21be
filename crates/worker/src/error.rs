//! Why a reconcile step failed, shared by every module that writes for a reconcile
//! (children, volume resizing, claim cleanup), so that a write the shard's fenced client
//! refused is a lost Lease everywhere, never an API error with a backoff.

use shardop::{LeaseLost, ScopeError};

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The shard's Lease is not held: nothing was written.
    #[error(transparent)]
    LeaseLost(#[from] LeaseLost),
    /// A request failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: &'static str,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

impl From<ScopeError> for ReconcileError {
    fn from(err: ScopeError) -> Self {
        match err {
            ScopeError::LeaseLost(lost) => Self::LeaseLost(lost),
            ScopeError::Drain(source) => Self::Kube {
                action: "acknowledging the drain",
                source,
            },
        }
    }
}

impl ReconcileError {
    /// A failed request; one the shard's fenced client refused or abandoned because the
    /// Lease was gone is a lost Lease, not an API error (no backoff).
    pub fn kube(action: &'static str) -> impl FnOnce(kube::Error) -> Self {
        move |source| match shardop::client::fenced_out(&source) {
            Some(lost) => Self::LeaseLost(lost),
            None => Self::Kube { action, source },
        }
    }

    /// Every value [`reason`](Self::reason) can return.
    pub const REASONS: [&'static str; 8] = [
        "lease_lost",
        "conflict",
        "not_found",
        "throttled",
        "invalid",
        "server",
        "api",
        "transport",
    ];

    /// A short class for the errors metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::LeaseLost(_) => "lease_lost",
            Self::Kube { source, .. } => match source {
                kube::Error::Api(status) => match status.code {
                    409 => "conflict",
                    404 => "not_found",
                    429 => "throttled",
                    400 | 422 => "invalid",
                    500..=599 => "server",
                    _ => "api",
                },
                _ => "transport",
            },
        }
    }
}
