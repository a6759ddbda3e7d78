//! Amazon SQS transport for switchyard, on aws-sdk-sqs.
//!
//! - **Publish**: `SendMessage`, returning once SQS accepted the message;
//!   [`SqsTransport::publish_batch`] sends ten to a request and retries only
//!   the entries that failed. The envelope travels in at most ten message
//!   attributes (see `docs/wire-format.md`); sizes are checked against the
//!   queue's maximum before sending.
//! - **Consume**: long polling (20 s by default), up to ten messages a
//!   receive, never more unsettled than the prefetch; the attempt is
//!   `ApproximateReceiveCount`.
//! - **Settle**: acks become `DeleteMessageBatch`, retries and releases
//!   `ChangeMessageVisibilityBatch` (coalesced per queue); dead-lettering
//!   sends to the dead-letter queue with the reason attributes, then deletes.
//!   Leases are the visibility timeout, extended while a handler runs.
//! - **FIFO**: in [`SqsConfig::fifo`] mode queues are FIFO queues, the
//!   partition key is the message group and the message id the
//!   deduplication id.
//!
//! Standard queues may deliver a message twice even when nothing fails:
//! [`Capabilities::duplicates_without_failure`](switchyard_core::Capabilities)
//! says so, and the dedupe middleware absorbs it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), switchyard_core::TransportError> {
//! use switchyard_sqs::{SqsConfig, SqsTransport};
//! let transport = SqsTransport::connect(
//!     SqsConfig::new()
//!         .endpoint("http://127.0.0.1:4566")
//!         .region("us-east-1")
//!         .static_credentials("test", "test"),
//! )
//! .await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod batch;
mod config;
mod transport;
mod wire;

pub use config::{SqsConfig, ATTRIBUTE_ROOM, MAX_VISIBILITY, MAX_WAIT};
pub use transport::{
    default_dead_letter, BatchPublishError, RequestCounts, SqsTransport, DEAD_LETTER_TAG,
};
