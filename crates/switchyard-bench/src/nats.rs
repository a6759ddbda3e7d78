//! The NATS workloads: raw async-nats and switchyard doing the same work
//! against the same server, in one run.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, stream};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use switchyard::nats::{NatsConfig, NatsCoreTransport, NatsTransport};
use switchyard::{Consumer, Envelope, Message, QueueSpec, Router, Topology, Transport};

use crate::rabbit::Rate;
use crate::{CountTo, Tick};

/// Publishes in flight at once.
pub const WINDOW: usize = 256;
/// Prefetch (pull batch) of every consumer.
pub const PREFETCH: usize = 64;

fn unique(name: &str) -> String {
    format!(
        "sy-bench-{name}-{}",
        &switchyard::MessageId::new().as_str()[24..]
    )
}

async fn raw_js_publish(
    js: &jetstream::Context,
    subject: &str,
    n: u64,
    payload: &bytes::Bytes,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut acks = FuturesUnordered::new();
    for _ in 0..n {
        if acks.len() >= WINDOW {
            let ack: Result<_, _> = acks.next().await.expect("non-empty");
            ack.map_err(|e: jetstream::context::PublishError| e.to_string())?;
        }
        let ack = js
            .publish(subject.to_owned(), payload.clone())
            .await
            .map_err(|e| e.to_string())?;
        acks.push(async move { ack.await });
    }
    while let Some(a) = acks.next().await {
        a.map_err(|e| e.to_string())?;
    }
    Ok(started.elapsed())
}

async fn raw_js_consume(
    js: &jetstream::Context,
    stream_name: &str,
    n: u64,
) -> Result<Duration, String> {
    let stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| e.to_string())?;
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(
            "raw",
            pull::Config {
                durable_name: Some("raw".into()),
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(PREFETCH)
        .messages()
        .await
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    for _ in 0..n {
        let m = messages
            .next()
            .await
            .ok_or("ended")?
            .map_err(|e| e.to_string())?;
        m.ack().await.map_err(|e| e.to_string())?;
    }
    Ok(started.elapsed())
}

async fn sy_publish(
    t: &impl Transport,
    subject: &str,
    n: u64,
    payload: &bytes::Bytes,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for _ in 0..n {
        if in_flight.len() >= WINDOW {
            let r: Result<(), switchyard::TransportError> =
                in_flight.next().await.expect("non-empty");
            r.map_err(|e| e.to_string())?;
        }
        in_flight.push(t.publish(subject, Envelope::new(Tick::TYPE, payload.clone())));
    }
    while let Some(r) = in_flight.next().await {
        r.map_err(|e| e.to_string())?;
    }
    Ok(started.elapsed())
}

async fn sy_consume(
    t: impl Transport + Clone,
    queue: &str,
    n: u64,
    published: impl std::future::Future<Output = Result<Duration, String>>,
) -> Result<Duration, String> {
    let handler = CountTo::new(n);
    let done = handler.done();
    let consumer = Consumer::builder(t, queue.to_owned())
        .concurrency(PREFETCH)
        .serve(Router::builder().route(handler).build())
        .spawn();
    consumer.subscribed().await;
    let started = Instant::now();
    published.await?;
    done.notified().await;
    let elapsed = started.elapsed();
    consumer.shutdown().await.map_err(|e| e.to_string())?;
    Ok(elapsed)
}

/// Runs every workload once with `n` messages of `size` bytes.
pub async fn run(url: &str, n: u64, size: usize) -> Result<Vec<Rate>, String> {
    let payload = crate::payload(size);
    let client = async_nats::connect(url).await.map_err(|e| e.to_string())?;
    let js = jetstream::new(client.clone());
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    let mut rates = Vec::new();
    let mut made = Vec::new();

    // JetStream, raw.
    let subject = unique("raw");
    js.get_or_create_stream(stream::Config {
        name: subject.clone(),
        subjects: vec![subject.clone()],
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    made.push(subject.clone());
    rates.push(Rate {
        name: "JetStream publish, raw async-nats (window 256)",
        per_sec: rate(raw_js_publish(&js, &subject, n, &payload).await?),
    });
    rates.push(Rate {
        name: "JetStream consume+ack, raw async-nats",
        per_sec: rate(raw_js_consume(&js, &subject, n).await?),
    });

    // JetStream, switchyard.
    let t = NatsTransport::connect(NatsConfig::new(url))
        .await
        .map_err(|e| e.to_string())?;
    let q = unique("sy");
    t.declare(&Topology::new().queue(QueueSpec::new(&q)))
        .await
        .map_err(|e| e.to_string())?;
    made.push(q.clone());
    made.push(format!("{q}_dlq"));
    rates.push(Rate {
        name: "JetStream publish, switchyard (window 256)",
        per_sec: rate(sy_publish(&t, &q, n, &payload).await?),
    });
    let none = async { Ok(Duration::ZERO) };
    rates.push(Rate {
        name: "JetStream consume+ack, switchyard",
        per_sec: rate(sy_consume(t.clone(), &q, n, none).await?),
    });

    // Core NATS: publish and receive concurrently (nothing is stored).
    let subject = unique("core-raw");
    let mut sub = client
        .subscribe(subject.clone())
        .await
        .map_err(|e| e.to_string())?;
    client.flush().await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    let receive = async {
        for _ in 0..n {
            sub.next().await.ok_or("ended")?;
        }
        Ok::<_, String>(())
    };
    let send = async {
        for _ in 0..n {
            client
                .publish(subject.clone(), payload.clone())
                .await
                .map_err(|e| e.to_string())?;
        }
        client.flush().await.map_err(|e| e.to_string())
    };
    let (r, s) = tokio::join!(receive, send);
    r?;
    s?;
    rates.push(Rate {
        name: "core pub/sub, raw async-nats",
        per_sec: rate(started.elapsed()),
    });
    let core = NatsCoreTransport::connect(NatsConfig::new(url))
        .await
        .map_err(|e| e.to_string())?;
    let subject = unique("core-sy");
    let publisher = core.clone();
    let subject2 = subject.clone();
    let payload2 = payload.clone();
    let publish_all = async move {
        let started = Instant::now();
        for _ in 0..n {
            publisher
                .publish(&subject2, Envelope::new(Tick::TYPE, payload2.clone()))
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(started.elapsed())
    };
    rates.push(Rate {
        name: "core pub/sub, switchyard",
        per_sec: rate(sy_consume(core, &subject, n, publish_all).await?),
    });

    for name in made {
        let _ = js.delete_stream(&name).await;
    }
    Ok(rates)
}
