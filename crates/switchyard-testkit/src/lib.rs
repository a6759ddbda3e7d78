//! Test support for switchyard adapters: the one transport conformance suite
//! that every adapter runs, and a TCP fault proxy for connection-loss tests.
//!
//! An adapter's test implements [`Harness`] (how to connect to the broker
//! under test) and calls [`run_conformance`]. Every case runs unless the
//! transport's [`Capabilities`](switchyard_core::Capabilities) declare that
//! it lacks what the case needs; skipped cases are reported with the reason,
//! never counted as passed.
//!
//! ```no_run
//! use switchyard_memory::MemoryTransport;
//! use switchyard_testkit::{run_conformance, Harness};
//!
//! struct Memory(MemoryTransport);
//!
//! impl Harness for Memory {
//!     type Transport = MemoryTransport;
//!     async fn connect(&self) -> MemoryTransport {
//!         self.0.clone()
//!     }
//! }
//!
//! # #[tokio::main] async fn main() {
//! run_conformance(&Memory(MemoryTransport::new())).await.assert_passed();
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod conformance;
pub mod fault_proxy;
pub mod support;
pub mod tls;

pub use conformance::{run_case, run_conformance, Case, CaseResult, Harness, Report, SuiteConfig};
pub use fault_proxy::FaultProxy;
pub use support::{failing_router, next_delivery, TempFile};
pub use tls::{TestCertificates, TlsProxy};
