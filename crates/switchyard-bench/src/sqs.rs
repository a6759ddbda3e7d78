//! The SQS workloads: raw aws-sdk-sqs (batched receive and delete) and
//! switchyard doing the same work against the same server, in one run,
//! with the API requests each made. SQS charges per request, so requests
//! per message is the figure that matters; the floor is 0.2 (a receive of
//! ten and a delete batch of ten per ten messages).

use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;
use switchyard::sqs::{SqsConfig, SqsTransport};
use switchyard::{Consumer, Envelope, Message, QueueSpec, Router, Topology, Transport};

use crate::{CountTo, Tick};

/// Consumer concurrency (and prefetch) of the switchyard run.
pub const CONCURRENCY: usize = 32;

/// One measured workload.
#[derive(Clone, Debug)]
pub struct SqsRate {
    /// What was measured.
    pub name: &'static str,
    /// Messages per second.
    pub per_sec: f64,
    /// Requests per message (receive, delete, visibility, send).
    pub requests_per_message: f64,
}

/// The whole run.
#[derive(Clone, Debug)]
pub struct SqsReport {
    /// Publish and consume, raw and switchyard.
    pub rates: Vec<SqsRate>,
    /// Requests an idle switchyard consumer made, and over how long.
    pub idle: Option<(u64, Duration)>,
}

fn unique(name: &str) -> String {
    format!(
        "sy-bench-{name}-{}",
        &switchyard::MessageId::new().as_str()[24..]
    )
}

fn config(endpoint: &str) -> SqsConfig {
    SqsConfig::new()
        .endpoint(endpoint)
        .region("us-east-1")
        .static_credentials("test", "test")
}

async fn raw_publish(
    client: &Client,
    url: &str,
    n: u64,
    body: &str,
) -> Result<(u64, Duration), String> {
    let started = Instant::now();
    let mut requests = 0;
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(10);
        let entries = (0..k)
            .map(|i| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(body)
                    .build()
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        requests += 1;
        let out = client
            .send_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !out.failed().is_empty() {
            return Err(format!("{} entries failed", out.failed().len()));
        }
        sent += k;
    }
    Ok((requests, started.elapsed()))
}

async fn raw_consume(client: &Client, url: &str, n: u64) -> Result<(u64, Duration), String> {
    let started = Instant::now();
    let mut requests = 0;
    let mut done = 0;
    while done < n {
        requests += 1;
        let out = client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(20)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let entries = out
            .messages()
            .iter()
            .enumerate()
            .map(|(i, m)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(m.receipt_handle().unwrap_or_default())
                    .build()
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        if entries.is_empty() {
            continue;
        }
        done += entries.len() as u64;
        requests += 1;
        client
            .delete_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok((requests, started.elapsed()))
}

/// Runs every workload once with `n` messages of `size` bytes against the
/// server at `endpoint`, then watches an idle consumer for `idle`.
pub async fn run(endpoint: &str, n: u64, size: usize, idle: Duration) -> Result<SqsReport, String> {
    let payload = crate::payload(size);
    let body = std::str::from_utf8(&payload)
        .map_err(|e| e.to_string())?
        .to_owned();
    let t = SqsTransport::connect(config(endpoint))
        .await
        .map_err(|e| e.to_string())?;
    let client = t.client().clone();
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    let per_msg = |r: u64| r as f64 / n as f64;
    let mut rates = Vec::new();
    let mut made = Vec::new();

    // Raw.
    let raw = unique("raw");
    let url = client
        .create_queue()
        .queue_name(&raw)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .queue_url()
        .unwrap_or_default()
        .to_owned();
    made.push(url.clone());
    let (requests, took) = raw_publish(&client, &url, n, &body).await?;
    rates.push(SqsRate {
        name: "publish, raw SendMessageBatch",
        per_sec: rate(took),
        requests_per_message: per_msg(requests),
    });
    let (requests, took) = raw_consume(&client, &url, n).await?;
    rates.push(SqsRate {
        name: "consume+delete, raw (receive 10, delete batch)",
        per_sec: rate(took),
        requests_per_message: per_msg(requests),
    });

    // switchyard.
    let q = unique("sy");
    t.declare(&Topology::new().queue(QueueSpec::new(&q)))
        .await
        .map_err(|e| e.to_string())?;
    made.push(t.queue_url(&q).await.map_err(|e| e.to_string())?);
    made.push(
        t.queue_url(&switchyard::sqs::default_dead_letter(&q))
            .await
            .map_err(|e| e.to_string())?,
    );
    let batch: Vec<Envelope> = (0..n)
        .map(|_| Envelope::new(Tick::TYPE, payload.clone()))
        .collect();
    let before = t.request_counts();
    let started = Instant::now();
    for chunk in batch.chunks(500) {
        t.publish_batch(&q, chunk.to_vec())
            .await
            .map_err(|e| e.to_string())?;
    }
    let took = started.elapsed();
    let spent = t.request_counts().since(&before);
    rates.push(SqsRate {
        name: "publish, switchyard publish_batch",
        per_sec: rate(took),
        requests_per_message: per_msg(spent.send),
    });
    let handler = CountTo::new(n);
    let done = handler.done();
    let before = t.request_counts();
    let started = Instant::now();
    let consumer = Consumer::builder(t.clone(), q.clone())
        .concurrency(CONCURRENCY)
        .serve(Router::builder().route(handler).build())
        .spawn();
    done.notified().await;
    let took = started.elapsed();
    consumer.shutdown().await.map_err(|e| e.to_string())?;
    let spent = t.request_counts().since(&before);
    rates.push(SqsRate {
        name: "consume+ack, switchyard",
        per_sec: rate(took),
        requests_per_message: per_msg(spent.receive + spent.delete + spent.change_visibility),
    });

    // Idle: an empty queue, a running consumer.
    let idle_report = if idle.is_zero() {
        None
    } else {
        let consumer = Consumer::builder(t.clone(), q.clone())
            .concurrency(CONCURRENCY)
            .serve(Router::builder().route(CountTo::new(u64::MAX)).build())
            .spawn();
        consumer.subscribed().await;
        let before = t.request_counts();
        tokio::time::sleep(idle).await;
        let spent = t.request_counts().since(&before);
        consumer.shutdown().await.map_err(|e| e.to_string())?;
        Some((spent.total(), idle))
    };

    for url in made {
        let _ = client.delete_queue().queue_url(url).send().await;
    }
    Ok(SqsReport {
        rates,
        idle: idle_report,
    })
}
