//! The shared conformance suite against NATS JetStream on 127.0.0.1:4222.

use futures_util::StreamExt;
use switchyard_nats::{NatsConfig, NatsTransport};
use switchyard_testkit::{run_conformance, Harness, SuiteConfig};

fn url() -> String {
    std::env::var("SWITCHYARD_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

struct JetStream;

impl Harness for JetStream {
    type Transport = NatsTransport;

    async fn connect(&self) -> NatsTransport {
        NatsTransport::connect(NatsConfig::new(url()).name("switchyard-conformance"))
            .await
            .expect("NATS with JetStream on 127.0.0.1:4222")
    }

    fn config(&self) -> SuiteConfig {
        SuiteConfig::default()
    }
}

/// The suite's streams are named `sy-conf-*`; remove them afterwards so the
/// shared server does not accumulate them run after run.
async fn remove_test_streams() {
    let client = async_nats::connect(url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let names: Vec<String> = js
        .stream_names()
        .filter_map(|n| async move { n.ok() })
        .filter(|n| std::future::ready(n.starts_with("sy-conf-")))
        .collect()
        .await;
    for name in names {
        let _ = js.delete_stream(&name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_passes_the_conformance_suite() {
    let report = run_conformance(&JetStream).await;
    remove_test_streams().await;
    report.assert_passed();
    assert!(
        report.skipped().is_empty(),
        "JetStream declares every capability: {:?}",
        report.skipped()
    );
}
