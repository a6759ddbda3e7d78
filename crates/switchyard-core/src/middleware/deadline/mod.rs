//! Does not start work whose deadline has passed. The policy chooses
//! between dead-lettering it (reason `expired`, the default) and dropping it
//! (acknowledged, and counted in `switchyard_messages_expired_total`).
//!
//! The remaining budget is visible to handlers through
//! [`Context::remaining`](crate::Context::remaining), and messages published
//! from a handler inherit the deadline.
//!
//! # Example
//!
//! ```
//! use switchyard_core::middleware::deadline::{DeadlineLayer, DeadlinePolicy};
//! use switchyard_core::{Context, HandleError, Message, Router};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Ping;
//! # impl Message for Ping { const TYPE: &'static str = "ping"; }
//!
//! let router = Router::builder().route(|_: Ping, _: Context| async { Ok::<_, HandleError>(()) }).build();
//! let pipeline = tower::ServiceBuilder::new()
//!     .layer(DeadlineLayer::new(DeadlinePolicy::Drop))
//!     .service(router);
//! # let _ = pipeline;
//! ```

mod layer;

use std::task::{Context as TaskContext, Poll};
use std::time::SystemTime;

use futures_util::future::{Either, Ready};

pub use layer::DeadlineLayer;

use crate::outcome::{AckReason, DeadLetterReason, Outcome};
use crate::runtime::Incoming;

/// What to do with a delivery past its deadline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeadlinePolicy {
    /// Dead-letter it with reason `expired` (the default).
    #[default]
    DeadLetter,
    /// Acknowledge it without handling, and count it.
    Drop,
}

/// The deadline middleware; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
    policy: DeadlinePolicy,
}

impl<S> Deadline<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, policy: DeadlinePolicy) -> Self {
        Deadline { inner, policy }
    }

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

impl<S> tower::Service<Incoming> for Deadline<S>
where
    S: tower::Service<Incoming, Response = Outcome>,
{
    type Response = Outcome;
    type Error = S::Error;
    type Future = Either<Ready<Result<Outcome, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, incoming: Incoming) -> Self::Future {
        let Some(deadline) = incoming.envelope.deadline else {
            return Either::Right(self.inner.call(incoming));
        };
        let now = SystemTime::now();
        let Ok(late) = now.duration_since(deadline) else {
            return Either::Right(self.inner.call(incoming));
        };
        let policy = match self.policy {
            DeadlinePolicy::DeadLetter => "dead-letter",
            DeadlinePolicy::Drop => "drop",
        };
        metrics::counter!(
            "switchyard_messages_expired_total",
            "source" => incoming.source.to_string(),
            "policy" => policy,
        )
        .increment(1);
        tracing::debug!(message_id = %incoming.envelope.id, ?late, policy, "deadline passed");
        let outcome = match self.policy {
            DeadlinePolicy::DeadLetter => Outcome::DeadLetter {
                reason: DeadLetterReason::Expired,
                detail: format!(
                    "deadline {} passed {late:.3?} before handling",
                    crate::envelope::display_time(deadline)
                ),
            },
            DeadlinePolicy::Drop => Outcome::Ack(AckReason::Expired),
        };
        Either::Left(futures_util::future::ready(Ok(outcome)))
    }
}
