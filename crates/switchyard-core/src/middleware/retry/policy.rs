//! How long to wait before the next attempt, and what to tell about it.

use std::time::Duration;

use crate::envelope::{Envelope, MessageId};
use crate::outcome::DeadLetterReason;

/// Decides the delay before the next attempt.
///
/// ```
/// use std::time::Duration;
/// use switchyard_core::middleware::retry::{ExponentialBackoff, RetryPolicy};
///
/// /// Always one second.
/// struct Fixed;
/// impl RetryPolicy for Fixed {
///     fn backoff(&self, _failed_attempt: u32) -> Duration {
///         Duration::from_secs(1)
///     }
/// }
///
/// let policies: Vec<Box<dyn RetryPolicy>> = vec![Box::new(Fixed), Box::new(ExponentialBackoff::default())];
/// assert_eq!(policies[0].backoff(3), Duration::from_secs(1));
/// assert!(policies[1].backoff(1) <= Duration::from_millis(200));
/// ```
pub trait RetryPolicy: Send + Sync + 'static {
    /// The delay after attempt `failed_attempt` (starting at 1) failed
    /// transiently. The retry layer never waits less than the error's own
    /// `retry_after` hint.
    fn backoff(&self, failed_attempt: u32) -> Duration;
}

/// Exponential backoff with full jitter: after attempt `n`, a random delay
/// between zero and `min(max, base * 2^(n-1))`. Jitter spreads the retries
/// of messages that failed together (a downstream outage), so that they do
/// not come back together.
#[derive(Clone, Copy, Debug)]
pub struct ExponentialBackoff {
    base: Duration,
    max: Duration,
    jitter: bool,
}

impl Default for ExponentialBackoff {
    /// 200 ms doubling up to 5 minutes, with full jitter.
    fn default() -> Self {
        ExponentialBackoff {
            base: Duration::from_millis(200),
            max: Duration::from_secs(300),
            jitter: true,
        }
    }
}

impl ExponentialBackoff {
    /// Backoff starting at `base`, capped at `max`, with full jitter.
    pub fn new(base: Duration, max: Duration) -> Self {
        ExponentialBackoff {
            base,
            max,
            jitter: true,
        }
    }

    /// Without jitter: exactly `min(max, base * 2^(n-1))`.
    pub fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// The delay before jitter.
    pub fn ceiling(&self, failed_attempt: u32) -> Duration {
        let exp = failed_attempt.saturating_sub(1).min(32);
        self.base.saturating_mul(1u32 << exp.min(31)).min(self.max)
    }
}

impl RetryPolicy for ExponentialBackoff {
    fn backoff(&self, failed_attempt: u32) -> Duration {
        let ceiling = self.ceiling(failed_attempt);
        if !self.jitter || ceiling.is_zero() {
            return ceiling;
        }
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }
}

/// What the retry layer tells its hooks.
#[derive(Clone, Copy, Debug)]
pub struct RetryEvent<'a> {
    /// The whole envelope (correlation id, headers, ...).
    pub envelope: &'a Envelope,
    /// The message id.
    pub message_id: &'a MessageId,
    /// Its type.
    pub kind: &'a str,
    /// The attempt that failed.
    pub attempt: u32,
    /// The error text.
    pub detail: &'a str,
}

/// Called when a delivery is scheduled for another attempt.
///
/// Implemented for `()` (nothing) and for closures
/// `Fn(&RetryEvent<'_>, Duration)`.
pub trait OnRetry: Send + Sync + 'static {
    /// `event` failed and comes back after `delay`.
    fn on_retry(&self, event: &RetryEvent<'_>, delay: Duration);
}

impl OnRetry for () {
    fn on_retry(&self, _: &RetryEvent<'_>, _: Duration) {}
}

impl<T: OnRetry + ?Sized> OnRetry for std::sync::Arc<T> {
    fn on_retry(&self, event: &RetryEvent<'_>, delay: Duration) {
        (**self).on_retry(event, delay)
    }
}

impl<F> OnRetry for F
where
    F: Fn(&RetryEvent<'_>, Duration) + Send + Sync + 'static,
{
    fn on_retry(&self, event: &RetryEvent<'_>, delay: Duration) {
        self(event, delay)
    }
}

/// Called when a delivery is dead-lettered (permanent failure, or attempts
/// exhausted).
///
/// Implemented for `()` (nothing) and for closures
/// `Fn(&RetryEvent<'_>, &DeadLetterReason)`.
pub trait OnDeadLetter: Send + Sync + 'static {
    /// `event` is dead-lettered for `reason`.
    fn on_dead_letter(&self, event: &RetryEvent<'_>, reason: &DeadLetterReason);
}

impl OnDeadLetter for () {
    fn on_dead_letter(&self, _: &RetryEvent<'_>, _: &DeadLetterReason) {}
}

impl<T: OnDeadLetter + ?Sized> OnDeadLetter for std::sync::Arc<T> {
    fn on_dead_letter(&self, event: &RetryEvent<'_>, reason: &DeadLetterReason) {
        (**self).on_dead_letter(event, reason)
    }
}

impl<F> OnDeadLetter for F
where
    F: Fn(&RetryEvent<'_>, &DeadLetterReason) + Send + Sync + 'static,
{
    fn on_dead_letter(&self, event: &RetryEvent<'_>, reason: &DeadLetterReason) {
        self(event, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(1))
            .without_jitter();
        let delays: Vec<_> = (1..=6).map(|n| b.backoff(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.backoff(u32::MAX), Duration::from_secs(1), "no overflow");
    }

    #[test]
    fn full_jitter_stays_under_the_ceiling_and_varies() {
        let b = ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let delays: Vec<_> = (0..50).map(|_| b.backoff(4)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(800)));
        assert!(delays.iter().any(|d| *d != delays[0]), "jittered");
    }

    #[test]
    fn hooks_are_object_safe() {
        fn _check(_: &dyn RetryPolicy, _: &dyn OnRetry, _: &dyn OnDeadLetter) {}
    }
}
