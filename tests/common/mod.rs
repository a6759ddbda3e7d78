//! Helpers shared by the cross-crate tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use switchyard::memory::MemoryTransport;
use switchyard::{
    DeadLetterInfo, Envelope, Message, Publisher, QueueSpec, SubscribeOptions, Topology, Transport,
};

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Job {
    pub n: u32,
}

impl Message for Job {
    const TYPE: &'static str = "test.job";
}

pub async fn broker_with(queue: QueueSpec) -> MemoryTransport {
    let broker = MemoryTransport::new();
    broker.declare(&Topology::new().queue(queue)).await.unwrap();
    broker
}

pub async fn broker() -> MemoryTransport {
    broker_with(QueueSpec::new("jobs")).await
}

pub fn publisher(broker: &MemoryTransport) -> Publisher {
    Publisher::new(Arc::new(broker.clone()))
}

/// Waits until `cond` holds, failing the test after 10 s.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads (and acknowledges) every message in a dead-letter queue.
pub async fn dead_letters(broker: &MemoryTransport, dlq: &str) -> Vec<(Envelope, DeadLetterInfo)> {
    let mut out = Vec::new();
    let mut stream = broker
        .subscribe(dlq, SubscribeOptions::default())
        .await
        .unwrap();
    while let Ok(Some(Ok(d))) =
        tokio::time::timeout(Duration::from_millis(100), stream.next()).await
    {
        let env = d.envelope().clone();
        let info = DeadLetterInfo::read_from(&env.headers).expect("reason metadata");
        d.ack().await.unwrap();
        out.push((env, info));
    }
    out
}
