//! The shared conformance suite against the RabbitMQ on 127.0.0.1:5672.

use std::time::Duration;

use switchyard_rabbitmq::{RabbitConfig, RabbitTransport};
use switchyard_testkit::{run_conformance, Case, Harness, SuiteConfig};

pub fn url() -> String {
    std::env::var("SWITCHYARD_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

struct Rabbit;

impl Harness for Rabbit {
    type Transport = RabbitTransport;

    async fn connect(&self) -> RabbitTransport {
        let config = RabbitConfig::new(url())
            .connection_name("switchyard-conformance")
            .max_payload(256 * 1024)
            // Test queues go away a minute after their last use.
            .queue_expires(Duration::from_secs(60));
        RabbitTransport::connect(config)
            .await
            .expect("RabbitMQ on 127.0.0.1:5672")
    }

    fn config(&self) -> SuiteConfig {
        SuiteConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_passes_the_conformance_suite() {
    let report = run_conformance(&Rabbit).await;
    report.assert_passed();
    let skipped: Vec<Case> = report.skipped().into_iter().map(|(c, _)| c).collect();
    assert_eq!(
        skipped,
        [Case::LeaseExtension],
        "only what the capabilities exclude"
    );
}
