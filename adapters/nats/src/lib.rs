//! NATS transports for switchyard, on async-nats: JetStream
//! ([`NatsTransport`]) as the durable, at-least-once transport, and core
//! NATS ([`NatsCoreTransport`]) as the fast, **at-most-once** one.
//!
//! - **Topology**: a queue is a stream (named after the queue, with `.`
//!   and other characters streams may not contain replaced by `_`)
//!   capturing the subject of the same name, consumed through one durable
//!   pull consumer (`switchyard`) that competing subscribers share. Its
//!   dead-letter queue is another stream (`<queue>.dlq` unless named). A
//!   topic is a stream on the topic's subject; each subscription queue
//!   *sources* it, so every subscription gets every message.
//! - **Publish** waits for the PubAck and sets `Nats-Msg-Id` to the envelope
//!   id, so the server's duplicate window drops a republished copy.
//! - **Settle**: `Ack` is an ack; `Retry { delay }` a nak with delay;
//!   `DeadLetter` publishes to the dead-letter stream (PubAck awaited) with
//!   the reason headers, then terminates the original; `Release` and an
//!   unsettled drop are a nak; lease extension is `in-progress`.
//! - **Attempts** come from the server's delivery count.
//!
//! See `docs/adapters/nats.md` for the mapping and what is not done yet.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod core;
mod pull;
mod transport;
mod wire;

pub use self::core::NatsCoreTransport;
pub use transport::{NatsConfig, NatsTransport};
