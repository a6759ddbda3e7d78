//! The RabbitMQ workloads: raw lapin and switchyard doing the same work
//! against the same broker, in one run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use switchyard::rabbitmq::{RabbitConfig, RabbitTransport};
use switchyard::{Consumer, Envelope, Message, QueueSpec, Router, Topology, Transport};
use tokio::sync::Notify;

use crate::{CountTo, Tick};

/// Messages kept unconfirmed at once by the publishers (the window).
pub const WINDOW: usize = 1024;
/// Prefetch of every consumer, raw or not.
pub const PREFETCH: u16 = 64;

/// One measured rate.
pub struct Rate {
    /// What was measured.
    pub name: &'static str,
    /// Messages per second.
    pub per_sec: f64,
}

fn queue_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-expires".into(), AMQPValue::LongLongInt(120_000));
    args
}

fn unique(name: &str) -> String {
    format!(
        "sy-bench-{name}-{}",
        &switchyard::MessageId::new().as_str()[24..]
    )
}

async fn raw_connection(url: &str) -> Result<Connection, String> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| format!("connect: {e}"))
}

/// The properties of a raw publish: bare (persistent, nothing else), or the
/// same message switchyard sends (a unique id, the type, the time as a
/// timestamp and an RFC 3339 header), as a hand-rolled producer that
/// needs them would write them.
fn raw_properties(same_messages: bool) -> BasicProperties {
    let props = BasicProperties::default().with_delivery_mode(2);
    if !same_messages {
        return props;
    }
    let now = std::time::SystemTime::now();
    let mut headers = FieldTable::default();
    headers.insert(
        "switchyard-occurred-at".into(),
        AMQPValue::LongString(
            humantime::format_rfc3339_millis(now)
                .to_string()
                .into_bytes()
                .into(),
        ),
    );
    props
        .with_message_id(switchyard::MessageId::new().as_str().into())
        .with_type(Tick::TYPE.into())
        .with_timestamp(
            now.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        )
        .with_headers(headers)
}

/// Publishes `n` messages of `payload` bytes with confirms, `WINDOW` in flight.
async fn raw_publish(
    conn: &Connection,
    queue: &str,
    n: u64,
    payload: &[u8],
    same_messages: bool,
) -> Result<Duration, String> {
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut in_flight: FuturesUnordered<lapin::PublisherConfirm> = FuturesUnordered::new();
    for _ in 0..n {
        if in_flight.len() >= WINDOW {
            in_flight
                .next()
                .await
                .expect("non-empty")
                .map_err(|e: lapin::Error| e.to_string())?;
        }
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                payload,
                raw_properties(same_messages),
            )
            .await
            .map_err(|e| e.to_string())?;
        in_flight.push(confirm);
    }
    while let Some(c) = in_flight.next().await {
        c.map_err(|e| e.to_string())?;
    }
    Ok(started.elapsed())
}

/// Consumes `n` messages, acking each (`batch` = 1) or every `batch`th
/// with `multiple=true`; with `same_messages`, also reads each message's id
/// and type and decodes its JSON payload, as a hand-rolled consumer would.
async fn raw_consume(
    conn: &Connection,
    queue: &str,
    n: u64,
    batch: u64,
    same_messages: bool,
) -> Result<Duration, String> {
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    for i in 1..=n {
        let d = consumer
            .next()
            .await
            .ok_or("consumer ended")?
            .map_err(|e| e.to_string())?;
        if same_messages {
            let id = d.properties.message_id().as_ref().ok_or("no id")?;
            let kind = d.properties.kind().as_ref().ok_or("no type")?;
            if kind.as_str() != Tick::TYPE {
                return Err(format!("unexpected type {kind} of {id}"));
            }
            let tick: Tick = serde_json::from_slice(&d.data).map_err(|e| e.to_string())?;
            std::hint::black_box(tick);
        }
        if batch == 1 {
            d.acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(|e| e.to_string())?;
        } else if i % batch == 0 || i == n {
            ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(started.elapsed())
}

/// Publishes through `Transport::publish`, `WINDOW` publishes in flight.
async fn switchyard_publish(
    t: &RabbitTransport,
    queue: &str,
    n: u64,
    payload: &bytes::Bytes,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut in_flight: FuturesUnordered<
        switchyard::transport::BoxFuture<'_, Result<(), switchyard::TransportError>>,
    > = FuturesUnordered::new();
    for _ in 0..n {
        if in_flight.len() >= WINDOW {
            in_flight
                .next()
                .await
                .expect("non-empty")
                .map_err(|e: switchyard::TransportError| e.to_string())?;
        }
        in_flight.push(t.publish(queue, Envelope::new(Tick::TYPE, payload.clone())));
    }
    while let Some(r) = in_flight.next().await {
        r.map_err(|e| e.to_string())?;
    }
    Ok(started.elapsed())
}

async fn switchyard_consume(
    t: &RabbitTransport,
    queue: &str,
    n: u64,
    full_stack: bool,
) -> Result<Duration, String> {
    let handler = CountTo::new(n);
    let done: Arc<Notify> = handler.done();
    let router = Router::builder().route(handler).build();
    let started = Instant::now();
    let builder = Consumer::builder(t.clone(), queue.to_owned()).concurrency(usize::from(PREFETCH));
    let consumer = if full_stack {
        builder.serve_default(router).spawn()
    } else {
        builder.serve(router).spawn()
    };
    done.notified().await;
    let elapsed = started.elapsed();
    consumer.shutdown().await.map_err(|e| e.to_string())?;
    Ok(elapsed)
}

/// Runs every workload once with `n` messages of `size` bytes.
pub async fn run(url: &str, n: u64, size: usize) -> Result<Vec<Rate>, String> {
    let payload = crate::payload(size);
    let conn = raw_connection(url).await?;
    let admin = conn.create_channel().await.map_err(|e| e.to_string())?;
    let transport =
        RabbitTransport::connect(RabbitConfig::new(url).queue_expires(Duration::from_secs(120)))
            .await
            .map_err(|e| e.to_string())?;
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    let mut rates = Vec::new();
    let raw_queue = |name| {
        let q = unique(name);
        let admin = admin.clone();
        async move {
            admin
                .queue_declare(
                    q.as_str().into(),
                    QueueDeclareOptions::durable(),
                    queue_args(),
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(q)
        }
    };
    let sy_queue = |name| {
        let q = unique(name);
        let t = transport.clone();
        async move {
            t.declare(&Topology::new().queue(QueueSpec::new(&q)))
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(q)
        }
    };

    let q = raw_queue("raw-each").await?;
    rates.push(Rate {
        name: "publish raw lapin (confirms, window 1024)",
        per_sec: rate(raw_publish(&conn, &q, n, &payload, false).await?),
    });
    rates.push(Rate {
        name: "consume raw lapin, ack each",
        per_sec: rate(raw_consume(&conn, &q, n, 1, false).await?),
    });
    let q = raw_queue("raw-multi").await?;
    raw_publish(&conn, &q, n, &payload, false).await?;
    rates.push(Rate {
        name: "consume raw lapin, multiple-ack every 64",
        per_sec: rate(raw_consume(&conn, &q, n, 64, false).await?),
    });
    let q = raw_queue("raw-same").await?;
    rates.push(Rate {
        name: "publish raw lapin, same messages",
        per_sec: rate(raw_publish(&conn, &q, n, &payload, true).await?),
    });
    rates.push(Rate {
        name: "consume raw lapin, multiple-ack, same messages",
        per_sec: rate(raw_consume(&conn, &q, n, 64, true).await?),
    });

    let q = sy_queue("sy-bare").await?;
    rates.push(Rate {
        name: "publish switchyard (window 1024)",
        per_sec: rate(switchyard_publish(&transport, &q, n, &payload).await?),
    });
    rates.push(Rate {
        name: "consume switchyard, bare router",
        per_sec: rate(switchyard_consume(&transport, &q, n, false).await?),
    });
    let q = sy_queue("sy-stack").await?;
    switchyard_publish(&transport, &q, n, &payload).await?;
    rates.push(Rate {
        name: "consume switchyard, full default stack",
        per_sec: rate(switchyard_consume(&transport, &q, n, true).await?),
    });
    Ok(rates)
}
