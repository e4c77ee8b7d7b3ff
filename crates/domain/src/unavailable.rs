//! A storage failure the caller may retry: the store is unreachable, out of connections,
//! or asked for the work to be retried (a deadlock, a lock-wait or statement timeout).
//!
//! Adapters put it into an error's cause chain; the HTTP layer answers a chain holding it
//! with `503 SERVICE_UNAVAILABLE` and `Retry-After` instead of a 500. Nothing the failed
//! transaction did was committed. A failed *commit* is the exception: when its answer is
//! lost, the outcome is unknown, and adapters mark it [`OutcomeUnknown`] instead.

/// The store could not do the work now; retrying later may succeed.
#[derive(Debug, thiserror::Error)]
#[error("the store is unavailable: {reason}")]
pub struct Unavailable {
    /// What kind of failure, for logs: `unreachable`, `deadlock`, ...
    pub reason: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// A commit whose answer never came (the connection dropped while COMMIT was under way):
/// the transaction may or may not have been applied. Unlike [`Unavailable`], retrying the
/// request blindly could apply it twice; retrying with its idempotency key is safe.
#[derive(Debug, thiserror::Error)]
#[error("the commit was sent but not confirmed; its outcome is unknown")]
pub struct OutcomeUnknown {
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Whether `error` or any of its causes is [`OutcomeUnknown`].
#[must_use]
pub fn is_outcome_unknown(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.is::<OutcomeUnknown>())
}

/// Whether `error` or any of its causes is [`Unavailable`].
#[must_use]
pub fn is_unavailable(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.is::<Unavailable>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unavailable_cause_is_found_under_context() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let error = anyhow::Error::new(Unavailable { reason: "unreachable", source: Box::new(io) })
            .context("failed to read the user")
            .context("get balance");
        assert!(is_unavailable(&error));
        assert!(!is_unavailable(&anyhow::anyhow!("a bug")));
    }
}
