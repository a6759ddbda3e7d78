//! The shared conformance suite against the memory transport.

use std::time::Duration;

use switchyard_memory::MemoryTransport;
use switchyard_testkit::{run_conformance, Harness, SuiteConfig};

struct Memory(MemoryTransport);

impl Harness for Memory {
    type Transport = MemoryTransport;

    async fn connect(&self) -> MemoryTransport {
        self.0.clone()
    }

    fn config(&self) -> SuiteConfig {
        SuiteConfig::default()
            .lease(Duration::from_millis(300))
            .retry_delay(Duration::from_millis(300))
            .quiet_period(Duration::from_millis(200))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_transport_passes_the_conformance_suite() {
    let report = run_conformance(&Memory(MemoryTransport::new())).await;
    report.assert_passed();
    assert!(
        report.skipped().is_empty(),
        "the memory transport declares every capability, so no case may be skipped: {:?}",
        report.skipped()
    );
}
