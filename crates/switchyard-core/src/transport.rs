//! What a broker adapter provides: publishing, subscribing, settlement and a
//! truthful statement of what the broker can do.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::stream::BoxStream;

use crate::envelope::{Envelope, Headers};
use crate::header_names;
use crate::outcome::DeadLetterReason;

/// A type-erased error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A boxed, sendable future; the trait methods below return it so that
/// `Arc<dyn Transport>` works.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The deliveries of one subscription.
pub type DeliveryStream = BoxStream<'static, Result<Delivery, TransportError>>;

/// What went wrong in a transport operation, for callers to match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportErrorKind {
    /// The connection to the broker failed or was lost.
    Connection,
    /// The destination or source does not exist (or a publish was unroutable).
    NotFound,
    /// The message is larger than the broker accepts.
    TooLarge,
    /// The broker refused the operation (e.g. a negative publisher confirm).
    Rejected,
    /// The delivery's channel, receipt or lease is gone: it cannot be
    /// settled any more, and the broker will redeliver it.
    StaleDelivery,
    /// The broker cannot do this (see [`Capabilities`]).
    Unsupported,
    /// The message could not be encoded.
    Encode,
    /// The configuration or topology is invalid.
    Config,
    /// The transport was shut down.
    Closed,
    /// The operation did not finish in time.
    Timeout,
    /// Anything else.
    Other,
}

/// An error from a transport operation: a kind to match on, a message, and
/// the underlying error. Messages never include credentials.
pub struct TransportError {
    kind: TransportErrorKind,
    message: Cow<'static, str>,
    source: Option<BoxError>,
}

impl TransportError {
    /// An error of `kind` with a lowercase message.
    pub fn new(kind: TransportErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        TransportError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The kind.
    pub fn kind(&self) -> TransportErrorKind {
        self.kind
    }

    /// The message, without the source.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// How far a broker supports a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Support {
    /// The broker does it itself.
    Native,
    /// The adapter builds it from other broker features (documented per adapter).
    Emulated,
    /// Not available: the conformance suite skips the matching cases.
    Unsupported,
}

impl Support {
    /// Native or emulated.
    pub fn is_supported(self) -> bool {
        !matches!(self, Support::Unsupported)
    }
}

/// The delivery guarantee of a transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryGuarantee {
    /// Every message is delivered until settled; duplicates are possible.
    AtLeastOnce,
    /// A message may be lost (e.g. when no subscriber is connected or a
    /// handler fails); never redelivered.
    AtMostOnce,
}

/// What ordering a transport preserves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OrderingSupport {
    /// None.
    None,
    /// Messages of one source arrive in publish order when one consumer
    /// handles one message at a time (so per-key order holds too).
    PerSource,
    /// Messages with the same partition key arrive in publish order, even
    /// with many in flight.
    PerKey,
}

/// What a broker does natively, what the adapter emulates, and what it
/// cannot do. The conformance suite holds each adapter to its declaration.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// At-least-once or at-most-once.
    pub guarantee: DeliveryGuarantee,
    /// Whether a message may be delivered twice even when nothing fails
    /// (e.g. SQS standard queues).
    pub duplicates_without_failure: bool,
    /// Unsettled deliveries (dropped, or their consumer gone) come back.
    pub redelivery: Support,
    /// `Settlement::Retry { delay }` holds the message back for `delay`.
    pub delayed_retry: Support,
    /// `Settlement::DeadLetter` moves the message to a dead-letter destination.
    pub dead_letter: Support,
    /// A delivery's lease can be extended while its handler runs.
    pub lease_extension: Support,
    /// The attempt number comes from the broker's own delivery count (or
    /// the adapter's emulation of one). A transport that redelivers must
    /// count, or retries could not be bounded: the consumer refuses to start.
    pub delivery_count: Support,
    /// Whether `Settlement::Release` counts as a delivery on the broker (the
    /// next delivery's attempt is one higher). Where it does, the runtime
    /// allows one release per attempt before it calls a message poison.
    pub release_counts_attempt: bool,
    /// The longest delay `Settlement::Retry` can hold a message back; the
    /// runtime caps retry delays at it.
    pub max_retry_delay: Option<Duration>,
    /// What ordering is preserved.
    pub ordering: OrderingSupport,
    /// Topics with several subscriptions, each getting every message.
    pub fan_out: bool,
    /// The largest payload the broker accepts, if it has a limit.
    pub max_payload: Option<usize>,
    /// Whether the broker drops a publish whose message id it saw recently
    /// (JetStream's duplicate window, SQS FIFO deduplication): a message
    /// published twice with one id is then delivered once.
    pub deduplicates_publishes: bool,
    /// Where the broker holds deliveries back until earlier ones are
    /// settled (RabbitMQ's prefetch window), and a task of the adapter's
    /// sends the settlements: how many batches it sends those of one window
    /// in (RabbitMQ: 4, a quarter of the window at a time). 0 (the default)
    /// where deliveries do not wait for settlements (JetStream pulls ahead
    /// up to its much larger `max_ack_pending`; SQS; memory).
    ///
    /// The task the consumer wakes to send settlements waits on the
    /// consumer's thread until the consumer yields. Where deliveries wait
    /// for it, the consumer yields after `prefetch / this` deliveries in a
    /// row (at least 16), so that the task runs before the window is used
    /// up. Elsewhere it does not yield on purpose: each yield lets the
    /// client write the few settlements queued so far, and many small
    /// writes cost client and broker alike (tokio's cooperative budget
    /// still makes the consumer yield now and then, and it yields after
    /// 1,024 in a row in any case).
    pub settlement_batches_per_window: u32,
}

impl Capabilities {
    /// A transport that supports everything natively: at-least-once, no
    /// spurious duplicates, per-source ordering, fan-out, no size limit.
    /// Adapters start from this and switch off what they lack.
    pub fn full() -> Self {
        Capabilities {
            guarantee: DeliveryGuarantee::AtLeastOnce,
            duplicates_without_failure: false,
            redelivery: Support::Native,
            delayed_retry: Support::Native,
            dead_letter: Support::Native,
            lease_extension: Support::Native,
            delivery_count: Support::Native,
            release_counts_attempt: false,
            max_retry_delay: None,
            ordering: OrderingSupport::PerSource,
            fan_out: true,
            max_payload: None,
            deduplicates_publishes: false,
            settlement_batches_per_window: 0,
        }
    }
}

/// How a delivery is settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Done: remove it.
    Ack,
    /// Redeliver after `delay`; counts as an attempt.
    Retry {
        /// How long to hold the message back.
        delay: Duration,
    },
    /// Publish to the dead-letter destination with reason metadata (confirmed
    /// by the broker), then remove the original.
    DeadLetter {
        /// The classified reason.
        reason: DeadLetterReason,
        /// The error text.
        detail: String,
        /// Handler attempts made.
        attempts: u32,
    },
    /// Give it back for redelivery without counting an attempt (shutdown).
    Release,
}

/// The adapter's side of a delivery: how to settle it.
///
/// Rules every adapter keeps (the conformance suite checks them):
/// - a delivery stays settleable after the stream that yielded it is
///   dropped (the runtime drains in-flight work after it stops pulling);
/// - a delivery dropped unsettled comes back, at once or when its lease
///   runs out;
/// - `settle` may resolve once the settlement is queued, in order, for the
///   wire (so that acknowledgements can be coalesced, e.g. RabbitMQ
///   `multiple=true` or SQS `DeleteMessageBatch`); a settlement lost after
///   that shows up as a redelivery, never as a loss;
/// - dead-lettering publishes to the dead-letter destination, confirmed by
///   the broker, before it removes the original.
pub trait Settler: Send + 'static {
    /// Settles the delivery. Errors of kind
    /// [`StaleDelivery`](TransportErrorKind::StaleDelivery) mean the broker
    /// will redeliver it.
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), TransportError>>;

    /// Starts settling from within a task's poll (the runtime calls it as
    /// soon as the handler is done, with its own task context): done at once
    /// where the settlement only has to be queued to the broker's client, or
    /// a future to drive to the end. The default calls
    /// [`settle`](Self::settle) and polls the future once; a transport
    /// overrides it to settle without allocating a future, and then must
    /// behave exactly as `settle` would (the same guarantees, the same
    /// bytes on the wire).
    fn begin_settle(
        self: Box<Self>,
        settlement: Settlement,
        cx: &mut std::task::Context<'_>,
    ) -> Settling {
        Settling::poll_once(self.settle(settlement), cx)
    }

    /// Extends the lease to at least `lease` from now, rounded up to what
    /// the broker supports (a broker that can only reset its lease to a
    /// fixed length resets it); afterwards [`lease_deadline`](Self::lease_deadline)
    /// reports the broker's real deadline.
    fn extend(&mut self, lease: Duration) -> BoxFuture<'_, Result<(), TransportError>> {
        let _ = lease;
        Box::pin(async {
            Err(TransportError::new(
                TransportErrorKind::Unsupported,
                "this transport has no lease extension",
            ))
        })
    }

    /// When the lease runs out if nothing extends it; `None` when deliveries
    /// have no lease.
    fn lease_deadline(&self) -> Option<Instant> {
        None
    }
}

/// How far [`Settler::begin_settle`] got.
#[must_use = "a pending settlement must be driven to the end"]
pub enum Settling {
    /// Settled, or failed, without waiting.
    Done(Result<(), TransportError>),
    /// Under way: poll it to the end.
    Pending(BoxFuture<'static, Result<(), TransportError>>),
}

impl Settling {
    /// Polls `settling` once: `Done` if that finished it.
    pub fn poll_once(
        mut settling: BoxFuture<'static, Result<(), TransportError>>,
        cx: &mut std::task::Context<'_>,
    ) -> Settling {
        match settling.as_mut().poll(cx) {
            std::task::Poll::Ready(result) => Settling::Done(result),
            std::task::Poll::Pending => Settling::Pending(settling),
        }
    }
}

impl fmt::Debug for Settling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Settling::Done(result) => f.debug_tuple("Done").field(result).finish(),
            Settling::Pending(_) => f.write_str("Pending"),
        }
    }
}

/// A prefetch slot from `slots` for the next delivery, for adapters that
/// bound their unsettled deliveries with a semaphore: taken at once when
/// one is free, awaited only when none is. Awaiting `acquire` every time
/// spends the consuming task's cooperative budget on every delivery, and
/// tokio then makes the consumer yield more often than the broker's own
/// client alone would (on NATS, acks went out in smaller writes).
pub async fn prefetch_slot(
    slots: &Arc<tokio::sync::Semaphore>,
) -> tokio::sync::OwnedSemaphorePermit {
    match Arc::clone(slots).try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => Arc::clone(slots)
            .acquire_owned()
            .await
            .expect("a prefetch semaphore is never closed"),
    }
}

/// One message received from a broker, with the handle that settles it.
///
/// A delivery dropped without being settled is given back to the broker by
/// the adapter (as after a consumer crash, it counts as an attempt).
pub struct Delivery {
    envelope: Arc<Envelope>,
    attempt: u32,
    received_at: Instant,
    settler: Box<dyn Settler>,
}

impl Delivery {
    /// A delivery of `envelope`, received now; `attempt` starts at 1.
    pub fn new(envelope: Arc<Envelope>, attempt: u32, settler: Box<dyn Settler>) -> Self {
        Self::received(envelope, attempt, Instant::now(), settler)
    }

    /// A delivery of `envelope` that the broker handed over at
    /// `received_at` (leases count from then): for an adapter that read the
    /// clock already, e.g. for the lease's deadline.
    pub fn received(
        envelope: Arc<Envelope>,
        attempt: u32,
        received_at: Instant,
        settler: Box<dyn Settler>,
    ) -> Self {
        Delivery {
            envelope,
            attempt,
            received_at,
            settler,
        }
    }

    /// Sets when the broker handed the delivery over, if earlier than its
    /// construction (leases count from broker receipt).
    pub fn with_received_at(mut self, at: Instant) -> Self {
        self.received_at = at;
        self
    }

    /// The envelope.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Which attempt this is, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// When the delivery was received from the broker.
    pub fn received_at(&self) -> Instant {
        self.received_at
    }

    /// When the lease runs out if nothing extends it.
    pub fn lease_deadline(&self) -> Option<Instant> {
        self.settler.lease_deadline()
    }

    /// Extends the lease to `lease` from now.
    pub async fn extend(&mut self, lease: Duration) -> Result<(), TransportError> {
        self.settler.extend(lease).await
    }

    /// Settles the delivery.
    pub async fn settle(self, settlement: Settlement) -> Result<(), TransportError> {
        self.settler.settle(settlement).await
    }

    /// Shorthand for `settle(Settlement::Ack)`.
    pub async fn ack(self) -> Result<(), TransportError> {
        self.settle(Settlement::Ack).await
    }

    /// Splits the delivery into envelope, attempt, receipt time and settler.
    pub fn into_parts(self) -> (Arc<Envelope>, u32, Instant, Box<dyn Settler>) {
        (self.envelope, self.attempt, self.received_at, self.settler)
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("envelope", &self.envelope)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// Options of one subscription.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// How many unsettled deliveries the subscription may hold at once;
    /// the broker sends no more until some are settled.
    pub prefetch: usize,
    /// The consumer's attempt budget, so that an adapter can check that
    /// the broker's own redelivery limit does not cut it short.
    pub max_attempts: Option<u32>,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            prefetch: 64,
            max_attempts: None,
        }
    }
}

impl SubscribeOptions {
    /// Sets the prefetch (at least 1).
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n.max(1);
        self
    }

    /// Tells the adapter the consumer's attempt budget.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }
}

/// A queue: competing consumers share its messages.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueSpec {
    /// Its name.
    pub name: String,
    /// Where dead-lettered messages go (declared with it).
    pub dead_letter: Option<String>,
    /// How long a delivery may stay unsettled before the broker takes it
    /// back, where the broker has such a lease.
    pub lease: Option<Duration>,
    /// The most messages it holds; publishers wait beyond that, where the
    /// broker bounds queues this way.
    pub capacity: Option<usize>,
}

impl QueueSpec {
    /// A queue named `name`, with no dead-letter destination.
    pub fn new(name: impl Into<String>) -> Self {
        QueueSpec {
            name: name.into(),
            dead_letter: None,
            lease: None,
            capacity: None,
        }
    }

    /// Sets the dead-letter destination.
    pub fn dead_letter(mut self, destination: impl Into<String>) -> Self {
        self.dead_letter = Some(destination.into());
        self
    }

    /// Sets the lease.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Sets the capacity.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity);
        self
    }
}

/// A topic: every subscription (a queue) gets every message published to it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicSpec {
    /// Its name.
    pub name: String,
    /// The queues bound to it; declare them as queues too.
    pub subscriptions: Vec<String>,
}

impl TopicSpec {
    /// A topic named `name` with no subscriptions.
    pub fn new(name: impl Into<String>) -> Self {
        TopicSpec {
            name: name.into(),
            subscriptions: Vec::new(),
        }
    }

    /// Binds the queue `queue` to this topic.
    pub fn subscription(mut self, queue: impl Into<String>) -> Self {
        self.subscriptions.push(queue.into());
        self
    }
}

/// What consumers need declared on the broker. Declaring is idempotent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// Queues (and, through them, their dead-letter queues).
    pub queues: Vec<QueueSpec>,
    /// Topics and their subscriptions.
    pub topics: Vec<TopicSpec>,
}

impl Topology {
    /// Nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a queue.
    pub fn queue(mut self, queue: QueueSpec) -> Self {
        self.queues.push(queue);
        self
    }

    /// Adds a topic.
    pub fn topic(mut self, topic: TopicSpec) -> Self {
        self.topics.push(topic);
        self
    }
}

/// The reason metadata a dead-lettered message carries in its headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterInfo {
    /// The classified reason.
    pub reason: DeadLetterReason,
    /// The error text.
    pub detail: String,
    /// Handler attempts made.
    pub attempts: u32,
    /// The source it was consumed from.
    pub source: String,
    /// When it was dead-lettered.
    pub at: SystemTime,
}

impl DeadLetterInfo {
    /// Longest detail kept; longer ones are cut at a character boundary.
    pub const MAX_DETAIL: usize = 4096;

    /// Writes the metadata into `headers`, replacing any a producer set.
    pub fn write_to(&self, headers: &mut Headers) {
        let mut detail = self.detail.as_str();
        if detail.len() > Self::MAX_DETAIL {
            let mut end = Self::MAX_DETAIL;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail = &detail[..end];
        }
        headers.insert(header_names::DEAD_LETTER_REASON, self.reason.as_str());
        headers.insert(header_names::DEAD_LETTER_DETAIL, detail);
        headers.insert(
            header_names::DEAD_LETTER_ATTEMPTS,
            self.attempts.to_string(),
        );
        headers.insert(header_names::DEAD_LETTER_SOURCE, self.source.as_str());
        headers.insert(
            header_names::DEAD_LETTER_AT,
            crate::envelope::display_time(self.at),
        );
    }

    /// Reads the metadata back; `None` if the reason header is missing.
    pub fn read_from(headers: &Headers) -> Option<Self> {
        let reason = DeadLetterReason::parse(headers.get(header_names::DEAD_LETTER_REASON)?);
        Some(DeadLetterInfo {
            reason,
            detail: headers
                .get(header_names::DEAD_LETTER_DETAIL)
                .unwrap_or_default()
                .to_owned(),
            attempts: headers
                .get(header_names::DEAD_LETTER_ATTEMPTS)
                .and_then(|a| a.parse().ok())
                .unwrap_or(0),
            source: headers
                .get(header_names::DEAD_LETTER_SOURCE)
                .unwrap_or_default()
                .to_owned(),
            at: headers
                .get(header_names::DEAD_LETTER_AT)
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                .unwrap_or(SystemTime::UNIX_EPOCH),
        })
    }
}

/// What a broker reports about one queue; `None` where it does not say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Messages waiting for a consumer (delayed ones included where the
    /// broker counts them).
    pub depth: Option<u64>,
    /// Messages delivered and not yet settled.
    pub in_flight: Option<u64>,
    /// Consumers attached.
    pub consumers: Option<u64>,
    /// How long the oldest waiting message has been in the queue.
    pub oldest_age: Option<Duration>,
}

/// A message broker, as switchyard sees it.
///
/// Object safe: the runtime holds an `Arc<dyn Transport>`.
pub trait Transport: Send + Sync + 'static {
    /// What the broker does natively, emulates, or cannot do.
    fn capabilities(&self) -> Capabilities;

    /// Declares queues, topics and dead-letter destinations (idempotent).
    fn declare<'a>(&'a self, topology: &'a Topology) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Publishes `envelope` to `destination` (a queue or topic). Returns only
    /// once the broker holds the message.
    ///
    /// An adapter may hand the message to its connection before the future
    /// is first polled (the JetStream adapter does, as async-nats' own
    /// publish does); dropping the future then does not take it back.
    fn publish<'a>(
        &'a self,
        destination: &'a str,
        envelope: Envelope,
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Starts consuming `source`. Dropping the stream stops consuming and
    /// gives every delivery not yet yielded back to the broker.
    fn subscribe<'a>(
        &'a self,
        source: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<DeliveryStream, TransportError>>;

    /// Waits until every settlement queued so far (acks coalesced for the
    /// wire, releases sent without waiting) has been handed to the broker.
    /// Call it before a short-lived process (a CLI, a job) exits; a
    /// settlement lost at exit shows up as a redelivery, never as a loss,
    /// but a process that exits right after acknowledging should not make
    /// the broker redeliver.
    fn flush(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async { Ok(()) })
    }

    /// The dead-letter destination of `queue`: the one it was declared with
    /// here, else the adapter's default (`<queue>.dlq` unless the adapter
    /// says otherwise).
    fn dead_letter_of(&self, queue: &str) -> String {
        format!("{queue}.dlq")
    }

    /// Depth, in-flight count, consumers and oldest message age of `queue`,
    /// as far as the broker exposes them. `NotFound` if it does not exist.
    fn queue_stats<'a>(
        &'a self,
        queue: &'a str,
    ) -> BoxFuture<'a, Result<QueueStats, TransportError>> {
        let _ = queue;
        Box::pin(async {
            Err(TransportError::new(
                TransportErrorKind::Unsupported,
                "this transport reports no queue statistics",
            ))
        })
    }
}

impl<T: Transport + ?Sized> Transport for Arc<T> {
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn declare<'a>(&'a self, topology: &'a Topology) -> BoxFuture<'a, Result<(), TransportError>> {
        (**self).declare(topology)
    }
    fn publish<'a>(
        &'a self,
        destination: &'a str,
        envelope: Envelope,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        (**self).publish(destination, envelope)
    }
    fn subscribe<'a>(
        &'a self,
        source: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<DeliveryStream, TransportError>> {
        (**self).subscribe(source, options)
    }
    fn dead_letter_of(&self, queue: &str) -> String {
        (**self).dead_letter_of(queue)
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        (**self).flush()
    }
    fn queue_stats<'a>(
        &'a self,
        queue: &'a str,
    ) -> BoxFuture<'a, Result<QueueStats, TransportError>> {
        (**self).queue_stats(queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn _object_safe(_: &dyn Transport, _: &dyn Settler) {}

    #[test]
    fn dead_letter_info_round_trips_and_caps_detail() {
        let info = DeadLetterInfo {
            reason: DeadLetterReason::MaxAttempts,
            detail: "é".repeat(3000),
            attempts: 5,
            source: "orders".into(),
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        };
        let mut h = Headers::new();
        h.insert(header_names::DEAD_LETTER_ATTEMPTS, "999");
        info.write_to(&mut h);
        let back = DeadLetterInfo::read_from(&h).unwrap();
        assert_eq!(back.reason, info.reason);
        assert_eq!(back.attempts, 5, "producer-set header is overwritten");
        assert_eq!(back.source, "orders");
        assert_eq!(back.at, info.at);
        assert!(back.detail.len() <= DeadLetterInfo::MAX_DETAIL);
        assert!(info.detail.starts_with(&back.detail));
    }

    #[test]
    fn error_display_includes_source() {
        let e = TransportError::new(TransportErrorKind::Connection, "connection lost")
            .with_source(std::io::Error::other("reset"));
        assert_eq!(e.to_string(), "connection lost: reset");
        assert_eq!(e.kind(), TransportErrorKind::Connection);
    }
}
