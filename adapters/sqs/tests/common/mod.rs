//! Reaching the local SQS-compatible server the test script starts
//! (moto on 127.0.0.1:4566; `SWITCHYARD_TEST_SQS_URL` overrides).

#![allow(dead_code)]

use std::time::Duration;

use switchyard_sqs::{SqsConfig, SqsTransport};

pub fn endpoint() -> String {
    std::env::var("SWITCHYARD_TEST_SQS_URL").unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

/// Settings for the local server: static test credentials, short long
/// polls so that tests that drop a subscription do not leave a receive
/// waiting on the server for long.
pub fn config() -> SqsConfig {
    SqsConfig::new()
        .endpoint(endpoint())
        .region("us-east-1")
        .static_credentials("test", "test")
        .wait_time(Duration::from_secs(1))
}

pub async fn connect(config: SqsConfig) -> SqsTransport {
    SqsTransport::connect(config)
        .await
        .expect("an SQS-compatible server on 127.0.0.1:4566 (tests/run starts moto)")
}

/// A unique queue name starting with `sy-test-`.
pub fn unique(name: &str) -> String {
    format!(
        "sy-test-{name}-{}",
        &switchyard_core::MessageId::new().as_str()[24..]
    )
}

/// Deletes every queue whose name starts with `prefix` (FIFO queues or
/// standard ones), so the shared server does not accumulate them.
pub async fn remove_queues(prefix: &str, fifo: bool) {
    let t = connect(config()).await;
    if let Ok(out) = t
        .client()
        .list_queues()
        .queue_name_prefix(prefix)
        .send()
        .await
    {
        for url in out
            .queue_urls()
            .iter()
            .filter(|u| u.ends_with(".fifo") == fifo)
        {
            let _ = t.client().delete_queue().queue_url(url).send().await;
        }
    }
}
