//! The consumer runtime: pulls deliveries with bounded concurrency, runs the
//! pipeline, settles from its outcome, extends leases and drains on shutdown.

mod consumer;
mod publisher;

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::envelope::{Envelope, TraceContext};

pub use consumer::{Consumer, ConsumerBuilder, ConsumerHandle, ConsumerStats, ShutdownReport};
pub use publisher::Publisher;

/// The request that flows through the middleware pipeline to the router:
/// one delivery, without its settlement handle (the runtime keeps that).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Incoming {
    /// The message.
    pub envelope: Arc<Envelope>,
    /// Which attempt this is, starting at 1.
    pub attempt: u32,
    /// The attempt budget of the consumer.
    pub max_attempts: u32,
    /// When the delivery was received from the broker.
    pub received_at: Instant,
    /// Cancelled when the handler should stop; layers may replace it with a
    /// child token of their own.
    pub cancel: CancellationToken,
    /// Publishes on the consumer's transport.
    pub publisher: Publisher,
    /// The source the delivery came from.
    pub source: Arc<str>,
    /// The trace context that messages published while handling this
    /// delivery carry: the envelope's own, until a trace layer replaces it
    /// with the context of the delivery's span.
    pub trace: TraceContext,
}

impl Incoming {
    /// The first attempt of `envelope` from `source`, with a budget of five
    /// attempts and a fresh cancellation token (for tests and benchmarks;
    /// the runtime builds its own).
    pub fn new(envelope: Arc<Envelope>, publisher: Publisher, source: impl Into<Arc<str>>) -> Self {
        let trace = envelope.trace.clone();
        Incoming {
            envelope,
            attempt: 1,
            max_attempts: 5,
            received_at: Instant::now(),
            cancel: CancellationToken::new(),
            publisher,
            source: source.into(),
            trace,
        }
    }
}
