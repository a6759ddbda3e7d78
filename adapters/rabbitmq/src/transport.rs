//! The RabbitMQ transport: connection, topology, publishing with confirms,
//! consuming with manual acknowledgements, and settlement.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use switchyard_core::transport::BoxFuture;
use switchyard_core::{
    Capabilities, DeadLetterInfo, Delivery, DeliveryStream, Envelope, OrderingSupport, QueueSpec,
    Settlement, Settler, Settling, SubscribeOptions, Support, Topology, Transport, TransportError,
    TransportErrorKind,
};

use crate::acks::Acks;
use crate::config::{QueueKind, RabbitConfig};
use crate::wire;

/// How long a delivery whose dead-lettering failed is held back before it
/// comes back (and is dead-lettered again).
const DEAD_LETTER_BACKOFF: Duration = Duration::from_secs(5);

/// Publisher channels per connection; each keeps many publishes
/// unconfirmed (see [`PubChannel`]).
const PUBLISH_CHANNELS: usize = 16;

/// How long an ack or nack may take before its channel is presumed dead.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// A RabbitMQ transport: one connection (re-established after a loss), a
/// pool of publisher channels, a channel per subscription. Clones
/// share the connection.
#[derive(Clone)]
pub struct RabbitTransport {
    inner: Arc<Inner>,
}

struct Inner {
    config: RabbitConfig,
    /// The live connection; replaced after a loss.
    current: Mutex<Arc<Conn>>,
    /// One reconnection at a time.
    reconnecting: tokio::sync::Mutex<()>,
    next_publisher: AtomicUsize,
    /// Everything declared, declared again after a reconnection.
    declared: Mutex<Vec<Topology>>,
    topics: Mutex<HashSet<String>>,
    dead_letters: Mutex<HashMap<String, String>>,
    /// The ack workers of the subscriptions, for `flush`.
    ack_workers: Mutex<Vec<crate::acks::WeakAcks>>,
}

/// A publisher channel with many publishes unconfirmed at once.
///
/// lapin hands a `basic.return` to whichever confirm of the ack that
/// follows it resolves first: with `multiple` acks that is not always the
/// returned message's own. So each publish records the id of any returned
/// message it is handed, and before deciding its own fate waits until every
/// publish sent before its confirm arrived has recorded too (those are the
/// only ones that can hold its return: RabbitMQ sends a return before the
/// ack that covers it). A publish is unroutable exactly when its own id was
/// recorded as returned.
struct PubChannel {
    channel: Channel,
    /// Sends one publish at a time, so that sequence numbers follow
    /// delivery tags.
    send: tokio::sync::Mutex<()>,
    state: Mutex<PubState>,
    recorded: tokio::sync::Notify,
}

#[derive(Default)]
struct PubState {
    next_seq: u64,
    /// Every publish below this has recorded its confirm.
    watermark: u64,
    /// Recorded above the watermark.
    done: std::collections::BTreeSet<u64>,
    /// Ids of returned messages, not yet claimed by their publish.
    returned: HashMap<String, usize>,
}

impl PubChannel {
    fn new(channel: Channel) -> Self {
        PubChannel {
            channel,
            send: tokio::sync::Mutex::new(()),
            state: Mutex::default(),
            recorded: tokio::sync::Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that publish `seq` has its answer (and the returned message
    /// it was handed, if any); returns how many publishes were sent so far.
    fn record(&self, seq: u64, returned: Option<String>) -> u64 {
        let sent = {
            let mut guard = self.state();
            let s = &mut *guard;
            if let Some(id) = returned {
                *s.returned.entry(id).or_default() += 1;
            }
            s.done.insert(seq);
            while s.done.remove(&s.watermark) {
                s.watermark += 1;
            }
            s.next_seq
        };
        self.recorded.notify_waiters();
        sent
    }

    /// Waits until every publish below `sent` has recorded.
    async fn settled_up_to(&self, sent: u64) {
        loop {
            let notified = self.recorded.notified();
            if self.state().watermark >= sent {
                return;
            }
            notified.await;
        }
    }

    /// Whether a message with `id` was returned (claiming the record).
    fn take_returned(&self, id: &str) -> bool {
        let mut s = self.state();
        match s.returned.get_mut(id) {
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    s.returned.remove(id);
                }
                true
            }
            None => false,
        }
    }
}

/// The envelope id a returned message carries.
fn returned_id(m: &lapin::message::BasicReturnMessage) -> Option<String> {
    if let Some(id) = m.properties.message_id() {
        return Some(id.as_str().to_owned());
    }
    let headers = m.properties.headers().as_ref()?;
    match headers.inner().get(wire::names::ID)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// One connection and its publisher channels.
struct Conn {
    connection: Connection,
    publishers: Vec<PubChannel>,
    generation: u64,
}

impl Conn {
    async fn open(config: &RabbitConfig, generation: u64) -> Result<Conn, TransportError> {
        let mut props = ConnectionProperties::default();
        if let Some(name) = &config.connection_name {
            props = props.with_connection_name(name.clone().into());
        }
        let runtime = lapin::runtime::default_runtime().map_err(|e| {
            TransportError::new(TransportErrorKind::Connection, "no async runtime for lapin")
                .with_source(e)
        })?;
        let connection = Connection::connect_with_config(
            config.url_with_heartbeat().as_str(),
            props,
            config.tls()?,
            runtime,
        )
        .await
        .map_err(|e| {
            TransportError::new(
                TransportErrorKind::Connection,
                format!("cannot connect to {}", config.redacted_url()),
            )
            .with_source(e)
        })?;
        let mut publishers = Vec::with_capacity(PUBLISH_CHANNELS);
        for _ in 0..PUBLISH_CHANNELS {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| amqp_error("cannot open a channel", e))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| amqp_error("cannot enable publisher confirms", e))?;
            publishers.push(PubChannel::new(channel));
        }
        Ok(Conn {
            connection,
            publishers,
            generation,
        })
    }

    fn is_alive(&self) -> bool {
        self.connection.status().connected()
    }
}

impl fmt::Debug for RabbitTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitTransport")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn amqp_error(what: &str, e: lapin::Error) -> TransportError {
    let kind = match e.kind() {
        lapin::ErrorKind::ProtocolError(p)
            if *p.kind()
                == lapin::protocol::AMQPErrorKind::Soft(
                    lapin::protocol::AMQPSoftError::NOTFOUND,
                ) =>
        {
            TransportErrorKind::NotFound
        }
        lapin::ErrorKind::ProtocolError(_) => TransportErrorKind::Rejected,
        lapin::ErrorKind::InvalidChannelState(..) => TransportErrorKind::StaleDelivery,
        _ => TransportErrorKind::Connection,
    };
    TransportError::new(kind, what.to_owned()).with_source(e)
}

fn stale(source: &str) -> TransportError {
    TransportError::new(
        TransportErrorKind::StaleDelivery,
        format!("the channel of this delivery from {source:?} is gone; RabbitMQ redelivers it"),
    )
}

impl RabbitTransport {
    /// Connects with `config`.
    pub async fn connect(config: RabbitConfig) -> Result<Self, TransportError> {
        config.check()?;
        let conn = Conn::open(&config, 0).await?;
        tracing::debug!(url = %config.redacted_url(), "connected to RabbitMQ");
        Ok(RabbitTransport {
            inner: Arc::new(Inner {
                config,
                current: Mutex::new(Arc::new(conn)),
                reconnecting: tokio::sync::Mutex::new(()),
                next_publisher: AtomicUsize::new(0),
                declared: Mutex::default(),
                topics: Mutex::default(),
                dead_letters: Mutex::default(),
                ack_workers: Mutex::default(),
            }),
        })
    }

    fn conn(&self) -> Arc<Conn> {
        Arc::clone(&self.inner.current.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A live connection newer than generation `broken` (the one that
    /// failed): reconnects with capped exponential backoff and re-declares
    /// everything declared so far; gives up after `give_up` (never: `None`).
    async fn reconnect(
        &self,
        broken: u64,
        give_up: Option<Duration>,
    ) -> Result<Arc<Conn>, TransportError> {
        let _one_at_a_time = self.inner.reconnecting.lock().await;
        let current = self.conn();
        if current.generation != broken && current.is_alive() {
            return Ok(current);
        }
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match Conn::open(&self.inner.config, current.generation + 1).await {
                Ok(conn) => {
                    let conn = Arc::new(conn);
                    *self.inner.current.lock().unwrap_or_else(|p| p.into_inner()) =
                        Arc::clone(&conn);
                    let declared = self
                        .inner
                        .declared
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    for topology in &declared {
                        if let Err(e) = self.declare_on(&conn, topology).await {
                            tracing::warn!(error = %e, "re-declaring after reconnection failed");
                        }
                    }
                    tracing::info!(
                        url = %self.inner.config.redacted_url(),
                        generation = conn.generation,
                        "reconnected to RabbitMQ"
                    );
                    return Ok(conn);
                }
                Err(e) => {
                    if give_up.is_some_and(|limit| started.elapsed() >= limit) {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, retry_in = ?pause, "RabbitMQ connection lost; reconnecting");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// A live connection, reconnecting (within the publish timeout) if the
    /// current one is down.
    async fn live_conn(&self) -> Result<Arc<Conn>, TransportError> {
        let conn = self.conn();
        if conn.is_alive() {
            return Ok(conn);
        }
        self.reconnect(conn.generation, Some(self.inner.config.publish_timeout))
            .await
    }

    /// The delay tiers and the names of their queues for `source`.
    fn tiers(&self, source: &str) -> Vec<(Duration, String)> {
        self.inner
            .config
            .delay_tiers
            .iter()
            .map(|d| (*d, format!("{source}.retry.{}ms", d.as_millis())))
            .collect()
    }

    fn dead_letter_of(&self, source: &str) -> String {
        self.inner
            .dead_letters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(source)
            .cloned()
            .unwrap_or_else(|| format!("{source}.dlq"))
    }

    fn queue_args(&self, kind: QueueKind) -> FieldTable {
        let mut args = FieldTable::default();
        if kind == QueueKind::Quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("quorum")),
            );
        }
        if kind == QueueKind::Quorum {
            if let Some(limit) = self.inner.config.delivery_limit {
                args.insert(
                    "x-delivery-limit".into(),
                    AMQPValue::LongLongInt(i64::from(limit)),
                );
            }
        }
        if let Some(expires) = self.inner.config.queue_expires {
            let ms = i64::try_from(expires.as_millis()).unwrap_or(i64::MAX);
            args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
        }
        args
    }

    async fn declare_queue(
        &self,
        ch: &Channel,
        name: &str,
        args: FieldTable,
    ) -> Result<(), TransportError> {
        ch.queue_declare(name.into(), QueueDeclareOptions::durable(), args)
            .await
            .map(drop)
            .map_err(|e| amqp_error(&format!("cannot declare queue {name:?}"), e))
    }

    async fn declare_all(&self, topology: &Topology) -> Result<(), TransportError> {
        let conn = self.live_conn().await?;
        self.declare_on(&conn, topology).await?;
        let mut declared = self
            .inner
            .declared
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !declared.contains(topology) {
            declared.push(topology.clone());
        }
        Ok(())
    }

    async fn declare_on(&self, conn: &Conn, topology: &Topology) -> Result<(), TransportError> {
        let ch = conn
            .connection
            .create_channel()
            .await
            .map_err(|e| amqp_error("cannot open a channel", e))?;
        let kind = self.inner.config.queue_kind;
        for q in &topology.queues {
            self.declare_consumer_queue(&ch, q, kind).await?;
        }
        for t in &topology.topics {
            ch.exchange_declare(
                t.name.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error(&format!("cannot declare exchange {:?}", t.name), e))?;
            for queue in &t.subscriptions {
                ch.queue_bind(
                    queue.as_str().into(),
                    t.name.as_str().into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| amqp_error(&format!("cannot bind {queue:?} to {:?}", t.name), e))?;
            }
            self.inner
                .topics
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(t.name.clone());
        }
        let _ = ch.close(200, "declared".into()).await;
        Ok(())
    }

    async fn declare_consumer_queue(
        &self,
        ch: &Channel,
        q: &QueueSpec,
        kind: QueueKind,
    ) -> Result<(), TransportError> {
        let dlq = q
            .dead_letter
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", q.name));
        self.declare_queue(ch, &dlq, self.queue_args(kind)).await?;
        let mut args = self.queue_args(kind);
        if self.inner.config.single_active_consumer {
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        self.declare_queue(ch, &q.name, args).await?;
        // Delay tiers: classic queues whose messages expire after the tier's
        // delay and are dead-lettered back to the source through the default
        // exchange. One queue per tier, so messages in a tier share one TTL
        // and never wait behind a longer one (no head-of-line blocking).
        for (delay, tier) in self.tiers(&q.name) {
            let mut args = self.queue_args(QueueKind::Classic);
            let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from("")),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(LongString::from(q.name.as_bytes().to_vec())),
            );
            self.declare_queue(ch, &tier, args).await?;
        }
        self.inner
            .dead_letters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(q.name.clone(), dlq);
        Ok(())
    }

    /// Publishes and waits for the broker's confirm; if the connection died
    /// under it, publishes once more on a new one (at-least-once: the first
    /// may have arrived too).
    async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        envelope: &Envelope,
        prior_attempts: u32,
    ) -> Result<(), TransportError> {
        let max = self.inner.config.max_payload;
        if envelope.payload.len() > max {
            return Err(TransportError::new(
                TransportErrorKind::TooLarge,
                format!(
                    "payload of {} bytes is over the {max}-byte limit configured for RabbitMQ",
                    envelope.payload.len()
                ),
            ));
        }
        let props = wire::encode(envelope, prior_attempts);
        let conn = self.live_conn().await?;
        match self
            .publish_on(&conn, exchange, routing_key, envelope, props.clone())
            .await
        {
            Err(e)
                if matches!(
                    e.kind(),
                    TransportErrorKind::Connection | TransportErrorKind::StaleDelivery
                ) =>
            {
                let conn = self
                    .reconnect(conn.generation, Some(self.inner.config.publish_timeout))
                    .await?;
                self.publish_on(&conn, exchange, routing_key, envelope, props)
                    .await
            }
            other => other,
        }
    }

    async fn publish_on(
        &self,
        conn: &Conn,
        exchange: &str,
        routing_key: &str,
        envelope: &Envelope,
        props: lapin::BasicProperties,
    ) -> Result<(), TransportError> {
        let i = self.inner.next_publisher.fetch_add(1, Ordering::Relaxed) % PUBLISH_CHANNELS;
        let publisher = &conn.publishers[i];
        let id = envelope.id.as_str();
        let timeout = self.inner.config.publish_timeout;
        let (seq, sent) = {
            let _turn = publisher.send.lock().await;
            let seq = {
                let mut s = publisher.state();
                s.next_seq += 1;
                s.next_seq - 1
            };
            let sent = publisher
                .channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &envelope.payload,
                    props,
                )
                .await;
            (seq, sent)
        };
        let answer = match sent {
            Ok(confirm) => match tokio::time::timeout(timeout, confirm).await {
                Ok(Ok(c)) => Ok(c),
                Ok(Err(e)) => Err(amqp_error("publish failed", e)),
                Err(_) => Err(TransportError::new(
                    TransportErrorKind::Timeout,
                    format!("no publisher confirm within {timeout:?}"),
                )),
            },
            Err(e) => Err(amqp_error("publish failed", e)),
        };
        let handed = match &answer {
            Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r))) => returned_id(r),
            _ => None,
        };
        // Every path records, or later publishes would wait for this one.
        let sent_so_far = publisher.record(seq, handed);
        let confirmation = answer?;
        let _ = tokio::time::timeout(timeout, publisher.settled_up_to(sent_so_far)).await;
        let returned = publisher.take_returned(id);
        match confirmation {
            Confirmation::Nack(_) => Err(TransportError::new(
                TransportErrorKind::Rejected,
                "RabbitMQ refused the message (negative publisher confirm)",
            )),
            Confirmation::NotRequested => Err(TransportError::new(
                TransportErrorKind::Other,
                "publisher confirms are not enabled on this channel",
            )),
            Confirmation::Ack(_) if returned => Err(TransportError::new(
                TransportErrorKind::NotFound,
                format!(
                    "unroutable: no queue is bound for {routing_key:?} on exchange {exchange:?} (returned by RabbitMQ)"
                ),
            )),
            Confirmation::Ack(_) => Ok(()),
        }
    }

    async fn publish_to(
        &self,
        destination: &str,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        let is_topic = self
            .inner
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(destination);
        if is_topic {
            return self
                .publish_raw(destination, &envelope.kind, envelope, 0)
                .await;
        }
        match self.publish_raw("", destination, envelope, 0).await {
            Err(e)
                if e.kind() == TransportErrorKind::NotFound
                    && self.exchange_exists(destination).await =>
            {
                self.inner
                    .topics
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(destination.to_owned());
                self.publish_raw(destination, &envelope.kind, envelope, 0)
                    .await
            }
            other => other,
        }
    }

    /// Whether an exchange named `name` exists (a passive declare on a
    /// throwaway channel: a missing one closes the channel).
    async fn exchange_exists(&self, name: &str) -> bool {
        let Ok(ch) = self.conn().connection.create_channel().await else {
            return false;
        };
        let found = ch
            .exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok();
        if found {
            let _ = ch.close(200, "checked".into()).await;
        }
        found
    }

    /// A quorum queue's `x-delivery-limit` counts every delivery, requeues
    /// included: at or below the consumer's budget (twice it, for
    /// requeues), RabbitMQ would drop or dead-letter a message without its
    /// reason before switchyard does.
    fn check_delivery_limit(&self, source: &str, max_attempts: u32) -> Result<(), TransportError> {
        let needed = max_attempts.saturating_mul(2);
        let quorum = self.inner.config.queue_kind == QueueKind::Quorum;
        match self.inner.config.delivery_limit {
            Some(limit) if quorum && limit <= needed => Err(TransportError::new(
                TransportErrorKind::Config,
                format!(
                    "queue {source:?}: x-delivery-limit {limit} must be above {needed} (twice max_attempts {max_attempts}, as requeues count); raise delivery_limit or lower max_attempts"
                ),
            )),
            None if quorum && needed >= 20 => {
                tracing::warn!(
                    source,
                    max_attempts,
                    "RabbitMQ 4 limits quorum queues to 20 deliveries by default; set RabbitConfig::delivery_limit above {needed}"
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Opens a channel with the prefetch and starts consuming `source`.
    async fn consume_on(
        &self,
        conn: &Conn,
        source: &str,
        prefetch: u16,
    ) -> Result<(lapin::Consumer, Acks), TransportError> {
        let ch = conn
            .connection
            .create_channel()
            .await
            .map_err(|e| amqp_error("cannot open a channel", e))?;
        ch.basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| amqp_error("cannot set the prefetch", e))?;
        let consumer = ch
            .basic_consume(
                source.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error(&format!("cannot consume from {source:?}"), e))?;
        let acks = Acks::spawn(ch, usize::from(prefetch));
        let mut workers = self
            .inner
            .ack_workers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        workers.push(acks.downgrade());
        Ok((consumer, acks))
    }

    async fn flush_acks(&self) -> Result<(), TransportError> {
        let workers: Vec<_> = std::mem::take(
            &mut *self
                .inner
                .ack_workers
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let mut alive = Vec::with_capacity(workers.len());
        for w in workers {
            if w.flush().await {
                alive.push(w);
            }
        }
        self.inner
            .ack_workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(alive);
        Ok(())
    }

    fn delivery(&self, source: &Arc<str>, acks: &Acks, d: lapin::message::Delivery) -> Delivery {
        let classic = self.inner.config.queue_kind == QueueKind::Classic;
        let redelivered = d.redelivered;
        let (envelope, counts) = wire::decode(&d.properties, d.data);
        // Attempts: delay-tier retries recorded in the copy, plus the
        // broker's count of earlier deliveries of this copy (quorum queues
        // count crashes and requeues; classic ones only flag them).
        let earlier = if classic {
            u32::from(redelivered)
        } else {
            counts.delivery_count
        };
        let attempt = counts
            .prior_attempts
            .saturating_add(earlier)
            .saturating_add(1);
        let envelope = Arc::new(envelope);
        let settler = RabbitSettler {
            transport: self.clone(),
            acks: Some(acks.clone()),
            tag: d.delivery_tag,
            source: Arc::clone(source),
            envelope: Arc::clone(&envelope),
            attempt,
        };
        Delivery::new(envelope, attempt, Box::new(settler))
    }

    async fn subscribe_to(
        &self,
        source: &str,
        options: SubscribeOptions,
    ) -> Result<DeliveryStream, TransportError> {
        let prefetch = u16::try_from(options.prefetch).unwrap_or(u16::MAX);
        if let Some(attempts) = options.max_attempts {
            self.check_delivery_limit(source, attempts)?;
        }
        let conn = self.live_conn().await?;
        let consumer = self.consume_on(&conn, source, prefetch).await?;
        // Boxed: `unfold` moves its state in and out of the future for
        // every item.
        let state = Box::new(Subscription {
            transport: self.clone(),
            source: source.into(),
            prefetch,
            generation: conn.generation,
            consumer: Some(consumer),
        });
        // Survives connection loss: the stream reports the interruption
        // once, reconnects (with backoff, re-declaring), consumes again, and
        // carries on. Deliveries of the dead channel cannot be settled any
        // more (StaleDelivery); RabbitMQ redelivers them.
        let stream = futures_util::stream::unfold(state, |mut sub| async move {
            loop {
                let Some((consumer, acks)) = sub.consumer.as_mut() else {
                    let conn = match sub.transport.reconnect(sub.generation, None).await {
                        Ok(conn) => conn,
                        Err(e) => return Some((Err(e), sub)),
                    };
                    sub.generation = conn.generation;
                    match sub
                        .transport
                        .consume_on(&conn, &sub.source, sub.prefetch)
                        .await
                    {
                        Ok(consumer) => {
                            sub.consumer = Some(consumer);
                            tracing::info!(source = %sub.source, "consuming again after reconnection");
                            continue;
                        }
                        Err(e) if e.kind() == TransportErrorKind::NotFound => {
                            let closed = TransportError::new(
                                TransportErrorKind::Closed,
                                format!("queue {:?} no longer exists", &*sub.source),
                            )
                            .with_source(e);
                            return Some((Err(closed), sub));
                        }
                        Err(e) => return Some((Err(e), sub)),
                    }
                };
                let (delivery, next) = match consumer.next().await {
                    Some(Ok(d)) => (Ok(sub.transport.delivery(&sub.source, acks, d)), true),
                    Some(Err(e)) => (
                        Err(amqp_error(
                            "the subscription was interrupted; reconnecting",
                            e,
                        )),
                        false,
                    ),
                    // Cancelled by the broker, or its connection closed.
                    None => (
                        Err(TransportError::new(
                            TransportErrorKind::Connection,
                            format!("the subscription to {:?} ended; reconnecting", &*sub.source),
                        )),
                        false,
                    ),
                };
                if !next {
                    sub.consumer = None;
                }
                return Some((delivery, sub));
            }
        });
        Ok(Box::pin(stream))
    }
}

struct Subscription {
    transport: RabbitTransport,
    source: Arc<str>,
    prefetch: u16,
    generation: u64,
    consumer: Option<(lapin::Consumer, Acks)>,
}

/// Settles one delivery: acks through the channel's coalescing worker, and
/// republishes (with confirms) before acking for retries and dead-letters.
struct RabbitSettler {
    transport: RabbitTransport,
    /// `None` once settled.
    acks: Option<Acks>,
    tag: u64,
    source: Arc<str>,
    envelope: Arc<Envelope>,
    attempt: u32,
}

impl RabbitSettler {
    fn ack(acks: &Acks, tag: u64, source: &str) -> Result<(), TransportError> {
        // Queued in order for the wire; a coalesced ack lost with its
        // channel shows up as a redelivery.
        if acks.ack(tag) {
            Ok(())
        } else {
            Err(stale(source))
        }
    }

    /// A nack on a channel whose connection died can wait forever for an
    /// answer that will not come: bounded, it is a stale delivery (RabbitMQ
    /// redelivers whatever the dead channel held).
    async fn requeue(acks: &Acks, tag: u64, source: &str) -> Result<(), TransportError> {
        match tokio::time::timeout(SETTLE_TIMEOUT, acks.nack(tag, true)).await {
            Ok(Some(Ok(()))) => Ok(()),
            Ok(Some(Err(e))) => Err(amqp_error("nack failed", e)),
            Ok(None) | Err(_) => Err(stale(source)),
        }
    }

    /// Publishes the delivery (confirmed) to the delay tier of `source` that
    /// holds it back at least `delay` (or the longest).
    async fn to_delay_tier(&self, source: &str, delay: Duration) -> Result<(), TransportError> {
        let tiers = self.transport.tiers(source);
        let (_, tier) = tiers
            .iter()
            .find(|(d, _)| *d >= delay)
            .or(tiers.last())
            .ok_or_else(|| {
                TransportError::new(TransportErrorKind::Config, "no delay tiers configured")
            })?;
        self.transport
            .publish_raw("", tier, &self.envelope, self.attempt)
            .await
    }

    async fn settle_now(mut self: Box<Self>, settlement: Settlement) -> Result<(), TransportError> {
        // The handle stays in `self` until the final ack or nack is queued:
        // if this future is dropped while it publishes to a delay tier or
        // the dead-letter queue, `Drop` gives the delivery back, rather
        // than leaving its tag unsettled (which would hold back every
        // later ack of the channel). `done` takes it out right before the
        // final call, which queues its frame at once.
        let acks = self.acks.clone().expect("settled once");
        let (tag, source) = (self.tag, Arc::clone(&self.source));
        let done = |settler: &mut Self| settler.acks = None;
        match settlement {
            Settlement::Ack => {
                done(&mut self);
                Self::ack(&acks, tag, &source)
            }
            Settlement::Release => {
                done(&mut self);
                Self::requeue(&acks, tag, &source).await
            }
            Settlement::Retry { delay } if delay.is_zero() => {
                done(&mut self);
                Self::requeue(&acks, tag, &source).await
            }
            Settlement::Retry { delay } => {
                // Into the tier first (confirmed), then off the source: a
                // crash in between leaves a duplicate, never a loss.
                if let Err(e) = self.to_delay_tier(&source, delay).await {
                    done(&mut self);
                    let _ = Self::requeue(&acks, tag, &source).await;
                    return Err(e);
                }
                done(&mut self);
                Self::ack(&acks, tag, &source)
            }
            Settlement::DeadLetter {
                reason,
                detail,
                attempts,
            } => {
                let dlq = self.transport.dead_letter_of(&source);
                let mut envelope = Envelope::clone(&self.envelope);
                DeadLetterInfo {
                    reason,
                    detail,
                    attempts,
                    source: source.to_string(),
                    at: SystemTime::now(),
                }
                .write_to(&mut envelope.headers);
                if let Err(e) = self.transport.publish_raw("", &dlq, &envelope, 0).await {
                    // Held back through a delay tier rather than requeued at
                    // once: requeued, it would come straight back and fail
                    // again in a tight loop while the dead-letter queue
                    // cannot take it.
                    let held = self.to_delay_tier(&source, DEAD_LETTER_BACKOFF).await;
                    done(&mut self);
                    match held {
                        Ok(()) => {
                            let _ = Self::ack(&acks, tag, &source);
                        }
                        Err(_) => {
                            let _ = Self::requeue(&acks, tag, &source).await;
                        }
                    }
                    return Err(e);
                }
                done(&mut self);
                Self::ack(&acks, tag, &source)
            }
        }
    }
}

impl Settler for RabbitSettler {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(self.settle_now(settlement))
    }

    /// An ack only queues its frame (coalesced with the channel's others):
    /// done here, without building `settle_now`'s future, which is sized
    /// for a dead-lettering's publish.
    fn begin_settle(
        mut self: Box<Self>,
        settlement: Settlement,
        cx: &mut std::task::Context<'_>,
    ) -> Settling {
        if let Settlement::Ack = settlement {
            let acks = self.acks.take().expect("settled once");
            return Settling::Done(Self::ack(&acks, self.tag, &self.source));
        }
        Settling::poll_once(self.settle(settlement), cx)
    }
}

impl Drop for RabbitSettler {
    fn drop(&mut self) {
        // Dropped unsettled: give it back.
        if let Some(acks) = self.acks.take() {
            acks.nack_later(self.tag, true);
        }
    }
}

impl RabbitTransport {
    async fn stats_of(&self, queue: &str) -> Result<switchyard_core::QueueStats, TransportError> {
        let conn = self.live_conn().await?;
        let ch = conn
            .connection
            .create_channel()
            .await
            .map_err(|e| amqp_error("cannot open a channel", e))?;
        // Passive: only looks; a missing queue closes the channel with 404.
        let declared = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error(&format!("no queue {queue:?}"), e));
        let _ = ch.close(200, "done".into()).await;
        let q = declared?;
        let mut stats = switchyard_core::QueueStats::default();
        stats.depth = Some(u64::from(q.message_count()));
        stats.consumers = Some(u64::from(q.consumer_count()));
        Ok(stats)
    }
}

impl Transport for RabbitTransport {
    fn flush(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(self.flush_acks())
    }

    fn dead_letter_of(&self, queue: &str) -> String {
        RabbitTransport::dead_letter_of(self, queue)
    }

    fn queue_stats<'a>(
        &'a self,
        queue: &'a str,
    ) -> BoxFuture<'a, Result<switchyard_core::QueueStats, TransportError>> {
        Box::pin(self.stats_of(queue))
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::full();
        caps.delayed_retry = Support::Emulated;
        caps.dead_letter = Support::Emulated;
        caps.lease_extension = Support::Unsupported;
        caps.delivery_count = Support::Emulated;
        // A requeue counts as a delivery on quorum queues.
        caps.release_counts_attempt = true;
        // The ack worker acknowledges a quarter of the prefetch at a time.
        caps.settlement_batches_per_window = 4;
        caps.max_retry_delay = self.inner.config.delay_tiers.iter().max().copied();
        caps.ordering = OrderingSupport::PerSource;
        caps.max_payload = Some(self.inner.config.max_payload);
        caps
    }

    fn declare<'a>(&'a self, topology: &'a Topology) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(self.declare_all(topology))
    }

    fn publish<'a>(
        &'a self,
        destination: &'a str,
        envelope: Envelope,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move { self.publish_to(destination, &envelope).await })
    }

    fn subscribe<'a>(
        &'a self,
        source: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<DeliveryStream, TransportError>> {
        Box::pin(self.subscribe_to(source, options))
    }
}
