//! RabbitMQ transport for switchyard, on lapin.
//!
//! - **Publish**: publisher confirms always, `mandatory` (an unroutable
//!   message is a `NotFound` error, not a silent drop), persistent delivery,
//!   the envelope mapped onto AMQP properties and headers as
//!   `docs/wire-format.md` states.
//! - **Topology**: per consumer queue a quorum queue (classic as an option),
//!   its dead-letter queue (`<queue>.dlq` unless named), and delay-tier
//!   queues `<queue>.retry.<ms>ms` whose messages expire back into the queue
//!   (no plugin; one queue per tier, so no head-of-line blocking: a delay is
//!   rounded up to the next tier). Topics are topic exchanges; their
//!   subscriptions are queues bound with `#`.
//! - **Consume**: manual acknowledgements, `basic.qos` prefetch = the
//!   consumer's concurrency; the attempt number is the retries recorded in
//!   the message (`switchyard-attempt`, set by the adapter, never taken from
//!   producers) plus the quorum queue's `x-delivery-count`, so a message that
//!   kills its consumer every time still reaches its budget.
//! - **Settle**: `Ack` is `basic.ack`; `Retry` publishes to the delay tier
//!   (confirmed) then acks; `DeadLetter` publishes to the dead-letter queue
//!   with reason headers (confirmed) then acks; `Release` and an unsettled
//!   drop are `basic.nack` with requeue. Settling on a dead channel is a
//!   `StaleDelivery` error: RabbitMQ redelivers.
//!
//! See `docs/adapters/rabbitmq.md` for what is not done yet.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod acks;
mod config;
mod transport;
mod wire;

pub use config::{QueueKind, RabbitConfig};
pub use transport::RabbitTransport;
