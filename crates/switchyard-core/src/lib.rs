//! The transport-neutral contract and consumer runtime of switchyard.
//!
//! This crate names no broker. It defines what a message is on the way
//! through ([`Envelope`]), what a user writes ([`Message`], [`Handler`]),
//! how failures are classified ([`HandleError`]), what a broker adapter must
//! provide ([`Transport`], [`Delivery`], [`Capabilities`]), what the handler
//! pipeline decides ([`Outcome`]) and the runtime that settles each delivery
//! from that decision ([`Consumer`]).
//!
//! The life of a delivery is described in `docs/architecture.md`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod envelope;
pub mod handler;
pub mod message;
pub mod middleware;
pub mod outcome;
mod redact;
pub mod router;
pub mod runtime;
pub mod transport;

#[cfg(test)]
pub(crate) mod testing {
    //! Test doubles for unit tests inside this crate.
    use crate::transport::BoxFuture;
    use crate::{
        Capabilities, DeliveryStream, Envelope, SubscribeOptions, Topology, Transport,
        TransportError, TransportErrorKind,
    };

    /// A transport that accepts every publish and has nothing to consume.
    pub(crate) const NO_TRANSPORT: TestTransport = TestTransport(None);

    /// A transport that accepts every publish; its subscriptions get the
    /// stream the function makes, or fail where there is none.
    pub(crate) struct TestTransport(pub(crate) Option<fn() -> DeliveryStream>);

    impl Transport for TestTransport {
        fn capabilities(&self) -> Capabilities {
            Capabilities::full()
        }
        fn declare<'a>(&'a self, _: &'a Topology) -> BoxFuture<'a, Result<(), TransportError>> {
            Box::pin(async { Ok(()) })
        }
        fn publish<'a>(
            &'a self,
            _: &'a str,
            _: Envelope,
        ) -> BoxFuture<'a, Result<(), TransportError>> {
            Box::pin(async { Ok(()) })
        }
        fn subscribe<'a>(
            &'a self,
            _: &'a str,
            _: SubscribeOptions,
        ) -> BoxFuture<'a, Result<DeliveryStream, TransportError>> {
            let deliveries = self.0.map(|make| make()).ok_or_else(|| {
                TransportError::new(TransportErrorKind::Unsupported, "nothing to consume")
            });
            Box::pin(async move { deliveries })
        }
    }
}

pub use envelope::{rfc3339_millis, Envelope, Headers, MessageId, TraceContext};
pub use handler::{Context, ErrorClass, HandleError, Handler, ResultExt};
pub use message::{Codec, DecodeError, JsonCodec, Message};
pub use outcome::{AckReason, DeadLetterReason, Outcome};
pub use redact::redact;
pub use router::{Router, RouterBuilder};
pub use runtime::{Consumer, ConsumerBuilder, ConsumerHandle, Incoming, Publisher, ShutdownReport};
pub use transport::{
    BoxError, Capabilities, DeadLetterInfo, Delivery, DeliveryGuarantee, DeliveryStream,
    OrderingSupport, QueueSpec, QueueStats, Settlement, Settler, Settling, SubscribeOptions,
    Support, TopicSpec, Topology, Transport, TransportError, TransportErrorKind,
};

/// Header names switchyard itself writes; adapters map them onto the wire.
///
/// An adapter that reads a standard field it cannot parse (a deadline that
/// is not a timestamp, say) leaves the envelope's field empty and keeps the
/// raw value in the headers under the field's name below; the validate
/// middleware dead-letters such a message as `malformed`.
pub mod header_names {
    /// The schema version, where the broker has no property for it.
    pub const SCHEMA_VERSION: &str = "switchyard-schema-version";
    /// When the message occurred (RFC 3339).
    pub const OCCURRED_AT: &str = "switchyard-occurred-at";
    /// The deadline (RFC 3339).
    pub const DEADLINE: &str = "switchyard-deadline";
    /// Standard fields whose presence among the extra headers means the
    /// adapter could not parse them.
    pub const PARSED_FIELDS: [&str; 3] = [SCHEMA_VERSION, OCCURRED_AT, DEADLINE];

    /// Why a message was dead-lettered (a [`DeadLetterReason`](crate::DeadLetterReason) string).
    pub const DEAD_LETTER_REASON: &str = "switchyard-dead-letter-reason";
    /// The error text that led to dead-lettering.
    pub const DEAD_LETTER_DETAIL: &str = "switchyard-dead-letter-detail";
    /// How many handler attempts were made before dead-lettering.
    pub const DEAD_LETTER_ATTEMPTS: &str = "switchyard-dead-letter-attempts";
    /// The source (queue or subscription) the message was dead-lettered from.
    pub const DEAD_LETTER_SOURCE: &str = "switchyard-dead-letter-source";
    /// When the message was dead-lettered (RFC 3339).
    pub const DEAD_LETTER_AT: &str = "switchyard-dead-letter-at";
    /// What every dead-letter header's name starts with, the ones above and
    /// an adapter's own (JetStream's subject and stream sequence): a replay
    /// removes them all.
    pub const DEAD_LETTER_PREFIX: &str = "switchyard-dead-letter-";
    /// Set on a message replayed from a dead-letter queue (RFC 3339): it
    /// keeps its id, so brokers that deduplicate on publish (JetStream's
    /// `Nats-Msg-Id`, SQS FIFO) derive their deduplication id from the id and
    /// this value instead, or the replay would be dropped as a duplicate.
    pub const REPLAYED_AT: &str = "switchyard-replayed-at";
}
