//! The NATS workloads: raw async-nats and switchyard doing the same work
//! against the same server, in one run.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, stream};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use switchyard::nats::{NatsConfig, NatsCoreTransport, NatsTransport};
use switchyard::{Consumer, Envelope, Message, QueueSpec, Router, Topology, Transport};

use crate::rabbit::Rate;
use crate::{with_cpu, CountTo, Tick};

/// The server's process name, for the CPU diagnostics.
const SERVER: &str = "nats-server";

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

/// What the raw client carries with each message.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Raw {
    /// The payload and nothing else.
    Bare,
    /// The same messages switchyard sends: the payload plus what a
    /// hand-rolled producer needs to match it (a unique id as `Nats-Msg-Id`
    /// so the server drops duplicates, the type, the time); the consumer
    /// reads the id and type and decodes the JSON payload. Both raw
    /// consumers pull with switchyard's settings (1 s expiry, 500 ms
    /// heartbeats).
    SameMessages,
}

/// The headers a hand-rolled producer attaches in [`Raw::SameMessages`].
fn raw_headers() -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert(
        async_nats::header::NATS_MESSAGE_ID,
        switchyard::MessageId::new().as_str(),
    );
    h.insert("switchyard-type", Tick::TYPE);
    h.insert(
        "switchyard-occurred-at",
        humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
    );
    h
}

/// What a hand-rolled consumer does with a message in
/// [`Raw::SameMessages`]: read its id and type, decode its payload.
fn raw_read(headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Result<(), String> {
    let h = headers.ok_or("no headers")?;
    let id = h.get(async_nats::header::NATS_MESSAGE_ID).ok_or("no id")?;
    let kind = h.get("switchyard-type").ok_or("no type")?;
    if kind.as_str() != Tick::TYPE {
        return Err(format!("unexpected type {kind} of {id}"));
    }
    let tick: Tick = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    std::hint::black_box(tick);
    Ok(())
}

async fn raw_js_publish(
    js: &jetstream::Context,
    subject: &str,
    n: u64,
    payload: &bytes::Bytes,
    raw: Raw,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut acks = FuturesUnordered::new();
    for _ in 0..n {
        if acks.len() >= WINDOW {
            let ack: Result<_, _> = acks.next().await.expect("non-empty");
            ack.map_err(|e: jetstream::context::PublishError| e.to_string())?;
        }
        let ack = match raw {
            Raw::Bare => js.publish(subject.to_owned(), payload.clone()).await,
            Raw::SameMessages => {
                js.publish_with_headers(subject.to_owned(), raw_headers(), payload.clone())
                    .await
            }
        }
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
    raw: Raw,
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
    // The pull settings switchyard uses (heartbeats are required of it,
    // and async-nats re-arms a timer per message for them). With
    // async-nats' defaults (30 s requests, no heartbeat) the raw consumer
    // also stalled for about 30 s in some runs.
    let start = || async {
        consumer
            .stream()
            .max_messages_per_batch(PREFETCH)
            .expires(Duration::from_secs(1))
            .heartbeat(Duration::from_millis(500))
            .messages()
            .await
            .map_err(|e| e.to_string())
    };
    let mut messages = start().await?;
    let started = Instant::now();
    let mut handled = 0;
    while handled < n {
        let m = match messages.next().await.ok_or("ended")? {
            Ok(m) => m,
            // The server, busy writing to disk, was late with a heartbeat.
            // The stream pulls no more after that: pull anew, as
            // switchyard does (a loop that went on waiting would hang).
            Err(e) if e.kind() == pull::MessagesErrorKind::MissingHeartbeat => {
                if std::env::var_os("SWITCHYARD_BENCH_DEBUG").is_some() {
                    eprintln!(
                        "raw consumer: missed heartbeat after {handled} messages, {:?} in",
                        started.elapsed()
                    );
                }
                messages = start().await?;
                continue;
            }
            Err(e) => return Err(e.to_string()),
        };
        handled += 1;
        if handled % 1024 == 0 {
            // As switchyard's consumer does after 1,024 deliveries in a
            // row. Without it this loop stopped in about two runs of five
            // (with 2 s pull requests: no message for 2 s, until the
            // missed heartbeat); with it, about as often as switchyard's
            // (see docs/performance.md).
            tokio::task::yield_now().await;
        }
        if raw == Raw::SameMessages {
            raw_read(m.headers.as_ref(), &m.payload)?;
        }
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
    let p = published.await?;
    if std::env::var("SWITCHYARD_BENCH_DEBUG").is_ok() {
        eprintln!("published in {p:?}, at {:?}", started.elapsed());
    }
    done.notified().await;
    let elapsed = started.elapsed();
    consumer.shutdown().await.map_err(|e| e.to_string())?;
    Ok(elapsed)
}

/// Core NATS through the raw client: publish and receive concurrently.
async fn raw_core(
    client: &async_nats::Client,
    n: u64,
    payload: &bytes::Bytes,
    raw: Raw,
) -> Result<Duration, String> {
    let subject = unique("core-raw");
    let mut sub = client
        .subscribe(subject.clone())
        .await
        .map_err(|e| e.to_string())?;
    client.flush().await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    let receive = async {
        for _ in 0..n {
            let m = sub.next().await.ok_or("ended")?;
            if raw == Raw::SameMessages {
                raw_read(m.headers.as_ref(), &m.payload)?;
            }
        }
        Ok::<_, String>(())
    };
    let send = async {
        for _ in 0..n {
            match raw {
                Raw::Bare => client.publish(subject.clone(), payload.clone()).await,
                Raw::SameMessages => {
                    client
                        .publish_with_headers(subject.clone(), raw_headers(), payload.clone())
                        .await
                }
            }
            .map_err(|e| e.to_string())?;
        }
        client.flush().await.map_err(|e| e.to_string())
    };
    let (r, s) = tokio::join!(receive, send);
    r?;
    s?;
    Ok(started.elapsed())
}

/// Runs so far in this process: every other one turns the order around.
static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Who publishes and consumes: raw async-nats (with bare payloads or the
/// same messages), or switchyard. Ordered as reported.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Raw(Raw),
    Switchyard,
}

/// A workload's name and how long it took.
type Timed = (&'static str, Duration);

/// JetStream publish then consume by the raw client, in a stream of its
/// own that is deleted afterwards.
async fn raw_js(
    js: &jetstream::Context,
    n: u64,
    payload: &bytes::Bytes,
    raw: Raw,
) -> Result<(Timed, Timed), String> {
    let (publish_name, consume_name) = match raw {
        Raw::Bare => (
            "JetStream publish, raw, bare payload",
            "JetStream consume+ack, raw, bare payload",
        ),
        Raw::SameMessages => (
            "JetStream publish, raw, same messages",
            "JetStream consume+ack, raw, same messages",
        ),
    };
    let subject = unique("raw");
    js.get_or_create_stream(stream::Config {
        name: subject.clone(),
        subjects: vec![subject.clone()],
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let result = async {
        let publish = with_cpu(
            publish_name,
            SERVER,
            n,
            raw_js_publish(js, &subject, n, payload, raw),
        )
        .await?;
        let consume = with_cpu(
            consume_name,
            SERVER,
            n,
            raw_js_consume(js, &subject, n, raw),
        )
        .await?;
        Ok(((publish_name, publish), (consume_name, consume)))
    }
    .await;
    let _ = js.delete_stream(&subject).await;
    result
}

/// JetStream publish then consume through switchyard, on a queue of its
/// own that is deleted afterwards.
async fn sy_js(url: &str, n: u64, payload: &bytes::Bytes) -> Result<(Timed, Timed), String> {
    let t = NatsTransport::connect(NatsConfig::new(url))
        .await
        .map_err(|e| e.to_string())?;
    let q = unique("sy");
    t.declare(&Topology::new().queue(QueueSpec::new(&q)))
        .await
        .map_err(|e| e.to_string())?;
    let result = async {
        let publish_name = "JetStream publish, switchyard";
        let publish = with_cpu(publish_name, SERVER, n, sy_publish(&t, &q, n, payload)).await?;
        let none = async { Ok(Duration::ZERO) };
        let consume_name = "JetStream consume+ack, switchyard";
        let consume = with_cpu(consume_name, SERVER, n, sy_consume(t.clone(), &q, n, none)).await?;
        Ok(((publish_name, publish), (consume_name, consume)))
    }
    .await;
    let js = jetstream::new(async_nats::connect(url).await.map_err(|e| e.to_string())?);
    for stream in [q.clone(), format!("{q}_dlq")] {
        let _ = js.delete_stream(&stream).await;
    }
    result
}

/// Runs every workload once with `n` messages of `size` bytes. The rates
/// come in groups of three (JetStream publish, JetStream consume, core
/// pub/sub): raw with bare payloads, raw with the same messages as
/// switchyard, switchyard.
pub async fn run(url: &str, n: u64, size: usize) -> Result<Vec<Rate>, String> {
    let payload = crate::payload(size);
    let client = async_nats::connect(url).await.map_err(|e| e.to_string())?;
    let js = jetstream::new(client.clone());
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    let mut rates = Vec::new();

    // `SWITCHYARD_BENCH_ONLY=js` or `=core` runs one group, `js-raw` or
    // `js-sy` one side of the JetStream group (for profiling; the ratios
    // are then not printed).
    let only = std::env::var("SWITCHYARD_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only.starts_with("js") {
        // Each side in a stream of its own, deleted once it is consumed, so
        // that every workload meets the server holding the same data; and
        // the order turns around every other run, so that neither side
        // always goes first (the server's speed drifts within a run).
        let turn = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut sides = match only.as_str() {
            "js-raw" => vec![Side::Raw(Raw::Bare), Side::Raw(Raw::SameMessages)],
            "js-sy" => vec![Side::Switchyard],
            _ => vec![
                Side::Raw(Raw::Bare),
                Side::Raw(Raw::SameMessages),
                Side::Switchyard,
            ],
        };
        let mut measured = Vec::new();
        if turn % 2 == 1 {
            sides.reverse();
        }
        for side in sides {
            crate::broker_quiet(SERVER).await;
            let (publish, consume) = match side {
                Side::Raw(raw) => raw_js(&js, n, &payload, raw).await?,
                Side::Switchyard => sy_js(url, n, &payload).await?,
            };
            measured.push((side, publish, consume));
        }
        // Reported in one order: raw bare, raw same messages, switchyard.
        measured.sort_by_key(|(side, _, _)| *side);
        rates.extend(measured.iter().map(|(_, p, _)| Rate {
            name: p.0,
            per_sec: rate(p.1),
        }));
        rates.extend(measured.iter().map(|(_, _, c)| Rate {
            name: c.0,
            per_sec: rate(c.1),
        }));
        if only.starts_with("js") {
            return Ok(rates);
        }
    }
    if only.is_empty() || only == "core" {
        // Core NATS: publish and receive concurrently (nothing is stored).
        for (raw, name) in [
            (Raw::Bare, "core pub/sub, raw, bare payload"),
            (Raw::SameMessages, "core pub/sub, raw, same messages"),
        ] {
            crate::broker_quiet(SERVER).await;
            let d = with_cpu(name, SERVER, n, raw_core(&client, n, &payload, raw));
            rates.push(Rate {
                name,
                per_sec: rate(d.await?),
            });
        }
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
        let name = "core pub/sub, switchyard";
        crate::broker_quiet(SERVER).await;
        let d = with_cpu(name, SERVER, n, sy_consume(core, &subject, n, publish_all));
        rates.push(Rate {
            name,
            per_sec: rate(d.await?),
        });
    }
    Ok(rates)
}
