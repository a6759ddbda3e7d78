use std::sync::Arc;

use tower::Layer;

use std::time::Duration;

use super::{
    ExponentialBackoff, OnDeadLetter, OnRetry, Retry, RetryEvent, RetryPolicy, RetryShared,
};
use crate::outcome::DeadLetterReason;

/// Applies [`Retry`] to a service.
///
/// The attempt budget is the consumer's
/// ([`ConsumerBuilder::max_attempts`](crate::ConsumerBuilder::max_attempts)):
/// one budget, which the runtime also enforces.
#[derive(Clone)]
pub struct RetryLayer {
    shared: RetryShared,
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryLayer").finish_non_exhaustive()
    }
}

impl RetryLayer {
    /// Exponential backoff with full jitter ([`ExponentialBackoff::default`]),
    /// the consumer's attempt budget, no hooks.
    pub fn new() -> Self {
        RetryLayer {
            shared: RetryShared {
                policy: Arc::new(ExponentialBackoff::default()),
                on_retry: Arc::new(()),
                on_dead_letter: Arc::new(()),
            },
        }
    }

    /// Sets the backoff policy.
    pub fn policy(mut self, policy: impl RetryPolicy) -> Self {
        self.shared.policy = Arc::new(policy);
        self
    }

    /// Calls `hook` for each retry, with the delay chosen.
    pub fn on_retry<F>(self, hook: F) -> Self
    where
        F: Fn(&RetryEvent<'_>, Duration) + Send + Sync + 'static,
    {
        let on_dead_letter = Arc::clone(&self.shared.on_dead_letter);
        self.hooks(hook, on_dead_letter)
    }

    /// Calls `hook` for each dead-letter, with its reason.
    pub fn on_dead_letter<F>(self, hook: F) -> Self
    where
        F: Fn(&RetryEvent<'_>, &DeadLetterReason) + Send + Sync + 'static,
    {
        let on_retry = Arc::clone(&self.shared.on_retry);
        self.hooks(on_retry, hook)
    }

    /// Sets both hooks from types implementing the hook traits (closures
    /// work too, or `()` for none).
    pub fn hooks(mut self, on_retry: impl OnRetry, on_dead_letter: impl OnDeadLetter) -> Self {
        self.shared.on_retry = Arc::new(on_retry);
        self.shared.on_dead_letter = Arc::new(on_dead_letter);
        self
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            shared: Arc::new(self.shared.clone()),
        }
    }
}
