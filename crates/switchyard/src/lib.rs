//! switchyard: typed, broker-agnostic message consumers for Rust.
//!
//! Write handlers as plain `async fn`s, compose middleware as tower layers,
//! and let the runtime own settlement: acknowledge only after the handler's
//! durable work, retry transient failures within a bounded budget,
//! dead-letter with a reason, bound in-flight work, and drain on shutdown.
//!
//! This crate re-exports [`switchyard_core`] and, behind cargo features, the
//! broker adapters (`memory`, on by default; `rabbitmq`; `nats`; `sqs`), plus
//! `opentelemetry` for OpenTelemetry span parents.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use switchyard::{Consumer, Context, HandleError, Message, Publisher, QueueSpec, Router, Topology, Transport};
//! use switchyard::memory::MemoryTransport;
//!
//! #[derive(Serialize, Deserialize)]
//! struct OrderPlaced { order_id: String }
//! impl Message for OrderPlaced { const TYPE: &'static str = "orders.order-placed"; }
//!
//! async fn on_order_placed(msg: OrderPlaced, cx: Context) -> Result<(), HandleError> {
//!     println!("order {} placed (attempt {})", msg.order_id, cx.attempt());
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let broker = MemoryTransport::new();
//! broker.declare(&Topology::new().queue(QueueSpec::new("orders"))).await.unwrap();
//!
//! let consumer = Consumer::builder(broker.clone(), "orders")
//!     .serve(Router::builder().route(on_order_placed).build())
//!     .spawn();
//!
//! let publisher = Publisher::new(std::sync::Arc::new(broker));
//! publisher.publish("orders", &OrderPlaced { order_id: "o-1".into() }).await.unwrap();
//! # while consumer.stats().acked() < 1 { tokio::task::yield_now().await; }
//! let report = consumer.shutdown().await.unwrap();
//! assert_eq!(report.acked, 1);
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub use switchyard_core::*;

mod app;
pub mod config;

pub use app::{run, shutdown_signal, start, start_on, App};
pub use config::{Config, ConfigError};

/// The in-process memory transport (feature `memory`).
#[cfg(feature = "memory")]
pub mod memory {
    pub use switchyard_memory::*;
}

/// The RabbitMQ transport (feature `rabbitmq`).
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq {
    pub use switchyard_rabbitmq::*;
}

/// The NATS JetStream transport (feature `nats`).
#[cfg(feature = "nats")]
pub mod nats {
    pub use switchyard_nats::*;
}

/// The Amazon SQS transport (feature `sqs`).
#[cfg(feature = "sqs")]
pub mod sqs {
    pub use switchyard_sqs::*;
}

/// The README's code, compiled and run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

/// The middleware guide's code, compiled and run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/middleware.md")]
pub struct MiddlewareDoctests;

/// The architecture guide's code, compiled and run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/architecture.md")]
pub struct ArchitectureDoctests;
