//! The shared conformance suite against core NATS (at-most-once): the cases
//! its capabilities exclude are reported as skipped.

use switchyard_nats::{NatsConfig, NatsCoreTransport};
use switchyard_testkit::{run_conformance, Case, Harness, SuiteConfig};

fn url() -> String {
    std::env::var("SWITCHYARD_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

struct Core;

impl Harness for Core {
    type Transport = NatsCoreTransport;

    async fn connect(&self) -> NatsCoreTransport {
        NatsCoreTransport::connect(NatsConfig::new(url()).name("switchyard-conformance-core"))
            .await
            .expect("NATS on 127.0.0.1:4222")
    }

    fn config(&self) -> SuiteConfig {
        SuiteConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_passes_the_conformance_cases_it_supports() {
    let report = run_conformance(&Core).await;
    report.assert_passed();
    let mut skipped: Vec<Case> = report.skipped().into_iter().map(|(c, _)| c).collect();
    skipped.sort();
    let mut expected = vec![
        Case::PublishIsDurable,
        Case::AckRemoves,
        Case::RetryWithDelay,
        Case::DeadLetterKeepsMetadata,
        Case::DroppedIsRedelivered,
        Case::ReleaseRedelivers,
        Case::LeaseExtension,
        Case::UnknownDestination,
        Case::PrefetchIsRespected,
        Case::SettleAfterStreamDropped,
    ];
    expected.sort();
    assert_eq!(
        skipped, expected,
        "core NATS skips exactly what at-most-once excludes"
    );
}
