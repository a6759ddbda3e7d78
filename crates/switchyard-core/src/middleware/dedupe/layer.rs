use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use super::{Dedupe, DedupeStore};

/// Applies [`Dedupe`] to a service.
#[derive(Clone)]
pub struct DedupeLayer {
    store: Option<Arc<dyn DedupeStore>>,
    busy_retry: Duration,
    busy_wait: Duration,
}

impl std::fmt::Debug for DedupeLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupeLayer")
            .field("busy_retry", &self.busy_retry)
            .finish_non_exhaustive()
    }
}

impl DedupeLayer {
    /// Deduplicates through `store`.
    pub fn new(store: impl DedupeStore) -> Self {
        DedupeLayer {
            store: Some(Arc::new(store)),
            busy_retry: Duration::from_secs(1),
            busy_wait: Duration::from_secs(30),
        }
    }

    /// A layer that passes every delivery through (no deduplication).
    pub fn disabled() -> Self {
        DedupeLayer {
            store: None,
            busy_retry: Duration::from_secs(1),
            busy_wait: Duration::from_secs(30),
        }
    }

    /// The delay set with [`busy_retry`](Self::busy_retry).
    pub fn busy_retry_delay(&self) -> Duration {
        self.busy_retry
    }

    /// How long a copy waits, in process, for another delivery of its id
    /// that is being handled. Default 30 s.
    pub fn busy_wait(mut self, wait: Duration) -> Self {
        self.busy_wait = wait;
        self
    }

    /// How long to hold back a delivery whose id is being handled by
    /// another one (and one that met an unreachable store). Default 1 s.
    pub fn busy_retry(mut self, delay: Duration) -> Self {
        self.busy_retry = delay;
        self
    }
}

impl<S> Layer<S> for DedupeLayer {
    type Service = Dedupe<S>;

    fn layer(&self, inner: S) -> Dedupe<S> {
        Dedupe::new(inner, self.store.clone(), self.busy_retry, self.busy_wait)
    }
}
