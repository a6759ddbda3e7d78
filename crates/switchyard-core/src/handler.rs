//! What users write: handlers, the context they receive, and the error
//! classification that decides settlement.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::envelope::{Envelope, MessageId};
use crate::message::Message;
use crate::outcome::DeadLetterReason;
use crate::runtime::{Incoming, Publisher};
use crate::transport::{BoxError, TransportError};

/// How a failure is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Might succeed later: retry with backoff, within a bounded budget.
    Transient,
    /// Will never succeed (malformed, incompatible, a reproducible defect):
    /// dead-letter now.
    Permanent,
    /// A business rejection: settled and recorded, not retried.
    Rejected,
}

impl ErrorClass {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Rejected => "rejected",
        }
    }
}

/// A classified handler failure.
///
/// Any `std::error::Error` converts into a *transient* `HandleError` with
/// `?`, so an unclassified error is retried (within the attempt budget).
/// Classify explicitly with [`ResultExt`] or the constructors:
///
/// ```
/// use switchyard_core::{HandleError, ResultExt, ErrorClass};
///
/// fn parse(s: &str) -> Result<u32, HandleError> {
///     s.parse::<u32>().permanent()
/// }
/// assert_eq!(parse("x").unwrap_err().class(), ErrorClass::Permanent);
/// assert_eq!(HandleError::rejected("out of stock").class(), ErrorClass::Rejected);
/// ```
///
/// `HandleError` deliberately does not implement `std::error::Error`, like
/// `anyhow::Error`, so that the blanket conversion above can exist.
pub struct HandleError {
    class: ErrorClass,
    source: BoxError,
    retry_after: Option<Duration>,
    reason: Option<DeadLetterReason>,
}

impl HandleError {
    /// A failure of the given class.
    pub fn new(class: ErrorClass, source: impl Into<BoxError>) -> Self {
        HandleError {
            class,
            source: source.into(),
            retry_after: None,
            reason: None,
        }
    }

    /// A failure that may succeed if retried later.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self::new(ErrorClass::Transient, source)
    }

    /// A failure that will never succeed: dead-letter now.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self::new(ErrorClass::Permanent, source)
    }

    /// A business rejection: acknowledged, recorded, not retried.
    pub fn rejected(source: impl Into<BoxError>) -> Self {
        Self::new(ErrorClass::Rejected, source)
    }

    /// Asks for the next attempt no sooner than `delay` from now
    /// (e.g. from a `Retry-After` of a downstream service).
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// Sets the dead-letter reason used if this error dead-letters the
    /// message (by default `permanent`, or `max-attempts`).
    pub fn with_reason(mut self, reason: DeadLetterReason) -> Self {
        self.reason = Some(reason);
        self
    }

    /// The class.
    pub fn class(&self) -> ErrorClass {
        self.class
    }

    /// The requested retry delay, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The dead-letter reason set with [`with_reason`](Self::with_reason).
    pub fn reason(&self) -> Option<&DeadLetterReason> {
        self.reason.as_ref()
    }

    /// The underlying error.
    pub fn source(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// The underlying error and its sources, joined by `: `; this is the
    /// dead-letter detail.
    pub fn detail(&self) -> String {
        let mut out = self.source.to_string();
        let mut next = self.source.source();
        while let Some(e) = next {
            out.push_str(": ");
            out.push_str(&e.to_string());
            next = e.source();
        }
        out
    }
}

impl<E> From<E> for HandleError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(e: E) -> Self {
        HandleError::transient(e)
    }
}

impl fmt::Display for HandleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class.as_str(), self.detail())
    }
}

impl fmt::Debug for HandleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandleError")
            .field("class", &self.class)
            .field("source", &self.source)
            .field("retry_after", &self.retry_after)
            .field("reason", &self.reason)
            .finish()
    }
}

/// Classifies the error of a `Result` in one call.
pub trait ResultExt<T> {
    /// Classifies the error as transient.
    fn transient(self) -> Result<T, HandleError>;
    /// Classifies the error as permanent.
    fn permanent(self) -> Result<T, HandleError>;
    /// Classifies the error as a business rejection.
    fn rejected(self) -> Result<T, HandleError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn transient(self) -> Result<T, HandleError> {
        self.map_err(HandleError::transient)
    }
    fn permanent(self) -> Result<T, HandleError> {
        self.map_err(HandleError::permanent)
    }
    fn rejected(self) -> Result<T, HandleError> {
        self.map_err(HandleError::rejected)
    }
}

/// Handles messages of type `M`.
///
/// Plain `async fn(M, Context) -> Result<(), HandleError>` functions and
/// closures are handlers too, so most code never implements this trait:
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use switchyard_core::{Context, HandleError, Message, Router};
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderPlaced { order_id: String }
/// impl Message for OrderPlaced { const TYPE: &'static str = "orders.order-placed"; }
///
/// async fn on_order_placed(msg: OrderPlaced, cx: Context) -> Result<(), HandleError> {
///     println!("order {} (attempt {})", msg.order_id, cx.attempt());
///     Ok(())
/// }
///
/// let router = Router::builder().route(on_order_placed).build();
/// # let _ = router;
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot handle messages of type `{M}`",
    label = "not a handler for `{M}`",
    note = "a handler is an `async fn(M, Context) -> Result<(), HandleError>`, a closure of that shape, or a type implementing `Handler<M>`",
    note = "`M` must implement `switchyard::Message`"
)]
pub trait Handler<M>: Send + Sync + 'static {
    /// Handles one message. Return only once the durable work is done: the
    /// runtime acknowledges the message when this future completes with `Ok`.
    fn handle(&self, msg: M, cx: &Context) -> impl Future<Output = Result<(), HandleError>> + Send;
}

impl<F, Fut, M> Handler<M> for F
where
    F: Fn(M, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandleError>> + Send,
    M: Message,
{
    fn handle(&self, msg: M, cx: &Context) -> impl Future<Output = Result<(), HandleError>> + Send {
        self(msg, cx.clone())
    }
}

/// What a handler knows about the delivery it is handling. Cheap to clone.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Incoming>,
}

impl Context {
    pub(crate) fn new(incoming: Incoming) -> Self {
        Context {
            inner: Arc::new(incoming),
        }
    }

    /// The envelope (metadata and raw payload).
    pub fn envelope(&self) -> &Envelope {
        &self.inner.envelope
    }

    /// The message id.
    pub fn message_id(&self) -> &MessageId {
        &self.inner.envelope.id
    }

    /// The correlation id, if the message carries one.
    pub fn correlation_id(&self) -> Option<&str> {
        self.inner.envelope.correlation_id.as_deref()
    }

    /// The causation id, if the message carries one.
    pub fn causation_id(&self) -> Option<&str> {
        self.inner.envelope.causation_id.as_deref()
    }

    /// Which attempt this is, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// The source the message was consumed from.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// When the runtime received the delivery from the broker.
    pub fn received_at(&self) -> Instant {
        self.inner.received_at
    }

    /// The message's deadline, if it has one.
    pub fn deadline(&self) -> Option<SystemTime> {
        self.inner.envelope.deadline
    }

    /// Time left before the deadline: `None` without a deadline, zero once
    /// it has passed.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline().map(|d| {
            d.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
    }

    /// Cancelled when the handler should stop: the runtime's drain deadline
    /// passed, or a timeout layer gave up on it. Long handlers should select
    /// on [`CancellationToken::cancelled`].
    pub fn cancellation(&self) -> &CancellationToken {
        &self.inner.cancel
    }

    /// The trace context messages published from this handler carry.
    pub fn trace(&self) -> &crate::envelope::TraceContext {
        &self.inner.trace
    }

    /// The publisher, without the stamping that [`publish`](Self::publish) does.
    pub fn publisher(&self) -> &Publisher {
        &self.inner.publisher
    }

    /// An envelope for `msg` that continues this message's conversation:
    /// same correlation id (this message's id if it has none), this
    /// message's id as causation id, and the same deadline, tenant and
    /// trace context.
    pub fn envelope_for<M: Message>(&self, msg: &M) -> Result<Envelope, TransportError> {
        let incoming = &self.inner.envelope;
        let mut env = self.inner.publisher.envelope_for(msg)?;
        env.correlation_id = Some(
            incoming
                .correlation_id
                .clone()
                .unwrap_or_else(|| incoming.id.as_str().to_owned()),
        );
        env.causation_id = Some(incoming.id.as_str().to_owned());
        env.deadline = incoming.deadline;
        env.tenant.clone_from(&incoming.tenant);
        env.trace.clone_from(&self.inner.trace);
        Ok(env)
    }

    /// Publishes `msg` to `destination` as part of this message's
    /// conversation (see [`envelope_for`](Self::envelope_for)). Returns once
    /// the broker holds it.
    pub async fn publish<M: Message>(
        &self,
        destination: &str,
        msg: &M,
    ) -> Result<MessageId, TransportError> {
        self.inner
            .publisher
            .publish_envelope(destination, self.envelope_for(msg)?)
            .await
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("message_id", self.message_id())
            .field("kind", &self.envelope().kind)
            .field("attempt", &self.attempt())
            .field("source", &self.source())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn unclassified_errors_are_transient() {
        fn f() -> Result<(), HandleError> {
            Err(std::io::Error::other("disk"))?;
            Ok(())
        }
        assert_eq!(f().unwrap_err().class(), ErrorClass::Transient);
    }

    #[test]
    fn detail_includes_the_source_chain() {
        let e = HandleError::permanent(Outer(std::io::Error::other("inner")));
        assert_eq!(e.detail(), "outer: inner");
        assert_eq!(e.to_string(), "permanent: outer: inner");
    }

    #[test]
    fn result_ext_classifies() {
        let r: Result<(), &str> = Err("nope");
        assert_eq!(r.rejected().unwrap_err().class(), ErrorClass::Rejected);
        let r: Result<(), String> = Err("nope".into());
        assert_eq!(r.transient().unwrap_err().class(), ErrorClass::Transient);
    }
}
