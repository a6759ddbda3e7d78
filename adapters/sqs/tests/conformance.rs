//! The shared conformance suite against the local SQS-compatible server,
//! with standard queues and in FIFO mode.

mod common;

use std::time::Duration;

use switchyard_sqs::SqsTransport;
use switchyard_testkit::{run_conformance, Harness, SuiteConfig};

struct Sqs {
    fifo: bool,
}

impl Harness for Sqs {
    type Transport = SqsTransport;

    async fn connect(&self) -> SqsTransport {
        common::connect(common::config().fifo(self.fifo)).await
    }

    fn config(&self) -> SuiteConfig {
        // The local server scans every message on each receive: keep the
        // volumes in the hundreds. Visibility timeouts are whole seconds.
        SuiteConfig::default()
            .messages(200)
            .lease(Duration::from_secs(2))
            .quiet_period(Duration::from_millis(1500))
            .receive_timeout(Duration::from_secs(20))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_queues_pass_the_conformance_suite() {
    let report = run_conformance(&Sqs { fifo: false }).await;
    common::remove_queues("sy-conf-", false).await;
    report.assert_passed();
    let skipped: Vec<_> = report
        .skipped()
        .into_iter()
        .map(|(c, _)| format!("{c:?}"))
        .collect();
    assert_eq!(
        skipped,
        ["FanOut", "PerKeyOrder"],
        "standard queues have no topics and no ordering; everything else applies"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_queues_pass_the_conformance_suite() {
    let report = run_conformance(&Sqs { fifo: true }).await;
    common::remove_queues("sy-conf-", true).await;
    report.assert_passed();
    let skipped: Vec<_> = report
        .skipped()
        .into_iter()
        .map(|(c, _)| format!("{c:?}"))
        .collect();
    assert_eq!(skipped, ["FanOut"], "FIFO queues have no topics");
}
