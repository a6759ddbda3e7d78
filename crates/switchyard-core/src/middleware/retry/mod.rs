//! The one retry mechanism. A transient failure becomes `Retry { delay }`
//! with exponential backoff and full jitter (never less than the error's
//! `retry_after` hint) until the attempt budget is spent, then a dead-letter
//! with reason `max-attempts` and the last error. Permanent failures are
//! dead-lettered at once; rejections are acknowledged.
//!
//! The delay is held by the broker through settlement, never slept inside
//! the handler's future: one slow retry never blocks other messages, and
//! because attempts come from the delivery's attempt number (the broker's
//! delivery count), the budget survives consumer restarts.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use switchyard_core::middleware::retry::{ExponentialBackoff, RetryLayer};
//! use switchyard_core::{Context, HandleError, Message, Router};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Ping;
//! # impl Message for Ping { const TYPE: &'static str = "ping"; }
//!
//! let router = Router::builder().route(|_: Ping, _: Context| async { Ok::<_, HandleError>(()) }).build();
//! let retry = RetryLayer::new()
//!     .policy(ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(60)))
//!     .on_retry(|event, delay| println!("{} retries in {delay:?}", event.message_id))
//!     .on_dead_letter(|event, reason| eprintln!("{} dead-lettered: {reason}", event.message_id));
//! let pipeline = tower::ServiceBuilder::new().layer(retry).service(router);
//! # let _ = pipeline;
//! ```

mod layer;
mod policy;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

pub use layer::RetryLayer;
pub use policy::{ExponentialBackoff, OnDeadLetter, OnRetry, RetryEvent, RetryPolicy};

use crate::envelope::Envelope;
use crate::outcome::{DeadLetterReason, Outcome};
use crate::runtime::Incoming;

#[derive(Clone)]
pub(crate) struct RetryShared {
    pub(crate) policy: Arc<dyn RetryPolicy>,
    pub(crate) on_retry: Arc<dyn OnRetry>,
    pub(crate) on_dead_letter: Arc<dyn OnDeadLetter>,
}

/// The retry middleware; see the [module docs](self).
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<RetryShared>,
}

impl<S> std::fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retry").finish_non_exhaustive()
    }
}

impl<S> Retry<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the wrapped service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> tower::Service<Incoming> for Retry<S>
where
    S: tower::Service<Incoming, Response = Outcome>,
{
    type Response = Outcome;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, incoming: Incoming) -> Self::Future {
        let envelope = Arc::clone(&incoming.envelope);
        let attempt = incoming.attempt;
        let max_attempts = incoming.max_attempts;
        ResponseFuture {
            inner: self.inner.call(incoming),
            envelope,
            attempt,
            max_attempts,
            shared: Arc::clone(&self.shared),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Retry`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        envelope: Arc<Envelope>,
        attempt: u32,
        max_attempts: u32,
        shared: Arc<RetryShared>,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Outcome, E>>,
{
    type Output = Result<Outcome, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let outcome = match std::task::ready!(this.inner.poll(cx)) {
            Ok(outcome) => outcome,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let event = |detail| RetryEvent {
            envelope: this.envelope,
            message_id: &this.envelope.id,
            kind: &this.envelope.kind,
            attempt: *this.attempt,
            detail,
        };
        let outcome = match outcome {
            Outcome::Retry {
                delay: hint,
                detail,
            } if *this.attempt < *this.max_attempts => {
                let delay = this.shared.policy.backoff(*this.attempt).max(hint);
                this.shared.on_retry.on_retry(&event(&detail), delay);
                Outcome::Retry { delay, detail }
            }
            Outcome::Retry { detail, .. } => {
                let reason = DeadLetterReason::MaxAttempts;
                this.shared
                    .on_dead_letter
                    .on_dead_letter(&event(&detail), &reason);
                Outcome::DeadLetter { reason, detail }
            }
            Outcome::DeadLetter { reason, detail } => {
                this.shared
                    .on_dead_letter
                    .on_dead_letter(&event(&detail), &reason);
                Outcome::DeadLetter { reason, detail }
            }
            ack @ Outcome::Ack(_) => ack,
        };
        Poll::Ready(Ok(outcome))
    }
}
