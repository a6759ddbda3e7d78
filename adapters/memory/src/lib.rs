//! An in-process broker for switchyard: the embedded default for demos and
//! tests.
//!
//! **A development and test broker, not a production one**: it keeps messages
//! in memory only, so everything is lost when the process exits. It does
//! implement the whole contract, so code written against it behaves the same
//! on RabbitMQ, NATS JetStream or SQS:
//!
//! - **queues** with competing consumers, and **topics** that fan out to
//!   every queue bound to them;
//! - **delayed redelivery** (`Retry { delay }`) without blocking other
//!   messages;
//! - **dead-letter queues** that keep the reason metadata (a queue declared
//!   without one gets `<name>.dlq`);
//! - **delivery counts** (the attempt number), and **redelivery** of
//!   deliveries that were dropped unsettled or whose lease ran out;
//! - **leases** and their extension, for queues declared with a lease;
//! - **bounded capacity**: a publisher waits while a queue is full, so a fast
//!   producer is slowed rather than buffered without bound. Dead-lettering
//!   never waits (a full dead-letter queue must not stop settlement).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use futures_util::StreamExt;
//! use switchyard_core::{Envelope, QueueSpec, SubscribeOptions, Topology, Transport};
//! use switchyard_memory::MemoryTransport;
//!
//! let broker = MemoryTransport::new();
//! broker.declare(&Topology::new().queue(QueueSpec::new("jobs"))).await.unwrap();
//! broker.publish("jobs", Envelope::new("jobs.run", "{}")).await.unwrap();
//!
//! let mut deliveries = broker.subscribe("jobs", SubscribeOptions::default()).await.unwrap();
//! let delivery = deliveries.next().await.unwrap().unwrap();
//! assert_eq!(delivery.attempt(), 1);
//! delivery.ack().await.unwrap();
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod broker;

pub use broker::{MemoryConfig, MemoryTransport};
