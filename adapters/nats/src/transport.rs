//! The JetStream transport.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::stream::{self, Source};
use async_nats::jetstream::{self, Context};
use futures_util::StreamExt;
use switchyard_core::transport::BoxFuture;
use switchyard_core::{
    Capabilities, DeadLetterInfo, Delivery, DeliveryStream, Envelope, OrderingSupport, Settlement,
    Settler, Settling, SubscribeOptions, Support, Topology, Transport, TransportError,
    TransportErrorKind,
};
use tokio::sync::Semaphore;

use crate::pull::{PullError, Puller};
use crate::wire;

/// The durable pull consumer every subscriber of a queue shares.
const CONSUMER: &str = "switchyard";
/// How long a pull request waits on the server. A subscription that is
/// dropped leaves its last request there until it expires (the server does
/// not notice the subscriber is gone), and it would take messages that are
/// given back meanwhile; see [`Pull::alive`].
///
/// The server sends a heartbeat every half of it while a request waits with
/// nothing to deliver, and a subscription that hears nothing for two
/// heartbeats pulls anew. That is also how it gets over a pull request
/// that goes unanswered: against nats-server 2.9.10, about one benchmark
/// run in ten stopped with no request waiting on the server while the
/// client waited for its batch, until that second heartbeat.
const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// Room left for headers under the server's `max_payload`.
pub(crate) const HEADER_ROOM: usize = 16 * 1024;

/// How to reach NATS. `Debug` never shows credentials.
#[derive(Clone)]
pub struct NatsConfig {
    url: String,
    name: Option<String>,
    credentials: Option<(String, String)>,
    token: Option<String>,
    ack_wait: Duration,
    double_ack: bool,
    max_ack_pending: Option<i64>,
    max_deliver: Option<i64>,
    tls: TlsConfig,
    creds_file: Option<std::path::PathBuf>,
    nkey_seed: Option<String>,
    client_capacity: Option<usize>,
}

/// TLS settings beyond what the URL says (`tls://` turns TLS on).
#[derive(Clone, Debug, Default)]
struct TlsConfig {
    required: bool,
    root_certificates: Vec<std::path::PathBuf>,
    client_certificate: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl NatsConfig {
    /// Settings for `url` (`nats://host:4222`): an ack wait of 30 s (the
    /// lease) unless a queue declares its own, plain acks.
    pub fn new(url: impl Into<String>) -> Self {
        NatsConfig {
            url: url.into(),
            name: None,
            credentials: None,
            token: None,
            ack_wait: Duration::from_secs(30),
            double_ack: false,
            max_ack_pending: None,
            max_deliver: None,
            tls: TlsConfig::default(),
            creds_file: None,
            nkey_seed: None,
            client_capacity: None,
        }
    }

    /// The most unacknowledged messages the server lets the durable
    /// consumer of a queue have out, across all its subscribers, including
    /// messages waiting out a retry delay (a nak with delay stays pending).
    /// By default sixteen times the prefetch (concurrency) of the
    /// subscriber that creates it, and at least 1,000 (the server's own
    /// default): room for several subscribers and for messages in backoff,
    /// which would otherwise stall the queue during an outage. An existing
    /// consumer keeps its value.
    pub fn max_ack_pending(mut self, n: i64) -> Self {
        self.max_ack_pending = Some(n);
        self
    }

    /// How many times the server delivers a message before it gives up on
    /// it (`-1`: never). By default `2 × max_attempts + 50`: above the
    /// runtime's budget (where a release counts a delivery, two per
    /// attempt), so switchyard dead-letters a message with its reason
    /// before the server stops delivering it, with room for the dead-letter
    /// publish to be retried while the dead-letter stream is unavailable.
    /// Subscribing to a consumer whose `max_deliver` is not above the
    /// budget is a configuration error.
    pub fn max_deliver(mut self, n: i64) -> Self {
        self.max_deliver = Some(n);
        self
    }

    /// Requires TLS even for a `nats://` URL (`tls://` always does).
    pub fn require_tls(mut self, on: bool) -> Self {
        self.tls.required = on;
        self
    }

    /// Trusts the CA certificates in this PEM file (in addition to the
    /// system's).
    pub fn root_certificates(mut self, pem: impl Into<std::path::PathBuf>) -> Self {
        self.tls.root_certificates.push(pem.into());
        self
    }

    /// Presents this client certificate and key (PEM files) to the server.
    pub fn client_certificate(
        mut self,
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.tls.client_certificate = Some((cert.into(), key.into()));
        self
    }

    /// Authenticates with a credentials file (`.creds`: a user JWT and its
    /// NKey seed), as issued by `nsc` for decentralized auth.
    pub fn credentials_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.creds_file = Some(path.into());
        self
    }

    /// Authenticates with an NKey: the user's seed (`SU...`). Only the
    /// public key and a signature of the server's nonce are sent.
    pub fn nkey(mut self, seed: impl Into<String>) -> Self {
        self.nkey_seed = Some(seed.into());
        self
    }

    /// The connection name the server shows.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// User and password.
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.credentials = Some((user.into(), password.into()));
        self
    }

    /// A token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The default lease (`ack_wait`) of declared queues.
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// Waits for the server to confirm each ack (`double ack`).
    pub fn double_ack(mut self, on: bool) -> Self {
        self.double_ack = on;
        self
    }

    /// How many commands (publishes and subscriptions; on JetStream also
    /// acks and pull requests) the connection queues for its writer before
    /// senders wait: async-nats' client capacity, 2,048 unless set, at
    /// least 1 (0 is taken as 1). Settlements never fail on a full queue;
    /// they wait for room, holding their prefetch slot meanwhile.
    pub fn client_capacity(mut self, n: usize) -> Self {
        self.client_capacity = Some(n.max(1));
        self
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &switchyard_core::redact(&self.url))
            .field("name", &self.name)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .field("password", &self.credentials.as_ref().map(|_| "***"))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("nkey", &self.nkey_seed.as_ref().map(|_| "***"))
            .field("credentials_file", &self.creds_file)
            .field("tls", &self.tls)
            .field("max_ack_pending", &self.max_ack_pending)
            .field("max_deliver", &self.max_deliver)
            .field("ack_wait", &self.ack_wait)
            .field("double_ack", &self.double_ack)
            .field("client_capacity", &self.client_capacity)
            .finish()
    }
}

/// Connects a client, logging disconnections and reconnections.
pub(crate) async fn connect_client(
    config: &NatsConfig,
) -> Result<async_nats::Client, TransportError> {
    let mut options = async_nats::ConnectOptions::new().event_callback(|event| async move {
        match event {
            async_nats::Event::Disconnected => {
                metrics::counter!("switchyard_nats_disconnects_total").increment(1);
                tracing::warn!("NATS connection lost; reconnecting");
            }
            async_nats::Event::Connected => {
                metrics::counter!("switchyard_nats_connects_total").increment(1);
                tracing::info!("connected to NATS");
            }
            other => tracing::debug!(event = %other, "NATS event"),
        }
    });
    if let Some(name) = &config.name {
        options = options.name(name);
    }
    if let Some(n) = config.client_capacity {
        options = options.client_capacity(n);
    }
    if let Some((user, password)) = &config.credentials {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(seed) = &config.nkey_seed {
        options = options.nkey(seed.clone());
    }
    if let Some(path) = &config.creds_file {
        // The error names the file, never its contents.
        options = options.credentials_file(path).await.map_err(|e| {
            TransportError::new(
                TransportErrorKind::Config,
                format!(
                    "cannot use the NATS credentials file {}: {}",
                    path.display(),
                    e.kind()
                ),
            )
        })?;
    }
    // async-nats builds its TLS configuration with rustls' process-wide
    // crypto provider, which rustls cannot pick by itself when another
    // crate in the build (the AWS SDK) enables a second one: it would
    // panic. Choose ring (what async-nats is built with) unless the
    // application chose already.
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    if config.tls.required {
        options = options.require_tls(true);
    }
    for pem in &config.tls.root_certificates {
        options = options.add_root_certificates(pem.clone());
    }
    if let Some((cert, key)) = &config.tls.client_certificate {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    options.connect(config.url.as_str()).await.map_err(|e| {
        error(
            TransportErrorKind::Connection,
            format!("cannot connect to {}", switchyard_core::redact(&config.url)),
            e,
        )
    })
}

/// A NATS JetStream transport. Clones share the connection (async-nats
/// reconnects by itself).
#[derive(Clone)]
pub struct NatsTransport {
    inner: Arc<Inner>,
}

struct Inner {
    config: NatsConfig,
    js: Context,
    max_payload: usize,
    /// Queue -> its dead-letter subject and lease, as declared here.
    queues: Mutex<HashMap<String, (String, Duration)>>,
}

impl fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsTransport")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn error(
    kind: TransportErrorKind,
    what: String,
    e: impl Into<switchyard_core::BoxError>,
) -> TransportError {
    TransportError::new(kind, what).with_source(e)
}

/// A stream name for a subject: streams may not contain `.`, spaces,
/// wildcards or path separators.
pub(crate) fn stream_name(subject: &str) -> String {
    subject
        .chars()
        .map(|c| {
            if matches!(c, '.' | ' ' | '*' | '>' | '/' | '\\' | '\t') {
                '_'
            } else {
                c
            }
        })
        .collect()
}

impl NatsTransport {
    /// Connects with `config`.
    pub async fn connect(config: NatsConfig) -> Result<Self, TransportError> {
        let client = connect_client(&config).await?;
        let max_payload = client.server_info().max_payload.saturating_sub(HEADER_ROOM);
        Ok(NatsTransport {
            inner: Arc::new(Inner {
                js: jetstream::new(client),
                max_payload,
                queues: Mutex::default(),
                config,
            }),
        })
    }

    fn queue_info(&self, queue: &str) -> (String, Duration) {
        self.inner
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(queue)
            .cloned()
            .unwrap_or_else(|| (format!("{queue}.dlq"), self.inner.config.ack_wait))
    }

    async fn ensure_stream(
        &self,
        subject: &str,
        sources: Option<Vec<Source>>,
    ) -> Result<(), TransportError> {
        let config = stream::Config {
            name: stream_name(subject),
            subjects: vec![subject.to_owned()],
            sources,
            ..Default::default()
        };
        self.inner
            .js
            .get_or_create_stream(config)
            .await
            .map(drop)
            .map_err(|e| {
                error(
                    TransportErrorKind::Config,
                    format!("cannot declare stream for {subject:?}"),
                    e,
                )
            })
    }

    async fn declare_all(&self, topology: &Topology) -> Result<(), TransportError> {
        for q in &topology.queues {
            let dlq = q
                .dead_letter
                .clone()
                .unwrap_or_else(|| format!("{}.dlq", q.name));
            self.ensure_stream(&dlq, None).await?;
            self.ensure_stream(&q.name, None).await?;
            let lease = q.lease.unwrap_or(self.inner.config.ack_wait);
            self.inner
                .queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(q.name.clone(), (dlq, lease));
        }
        for t in &topology.topics {
            self.ensure_stream(&t.name, None).await?;
            for queue in &t.subscriptions {
                // The subscription's stream sources the topic's.
                let name = stream_name(queue);
                let mut stream = self.inner.js.get_stream(&name).await.map_err(|e| {
                    error(
                        TransportErrorKind::Config,
                        format!(
                            "topic {:?} binds queue {queue:?}, which is not declared",
                            t.name
                        ),
                        e,
                    )
                })?;
                let info = stream.info().await.map_err(|e| {
                    error(
                        TransportErrorKind::Connection,
                        format!("cannot read stream {name:?}"),
                        e,
                    )
                })?;
                let mut config = info.config.clone();
                let topic_stream = stream_name(&t.name);
                let sources = config.sources.get_or_insert_with(Vec::new);
                if !sources.iter().any(|s| s.name == topic_stream) {
                    sources.push(Source {
                        name: topic_stream,
                        ..Default::default()
                    });
                    self.inner.js.update_stream(config).await.map_err(|e| {
                        error(
                            TransportErrorKind::Config,
                            format!("cannot bind {queue:?} to topic {:?}", t.name),
                            e,
                        )
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Publishes `envelope` to `subject` and waits for the PubAck.
    ///
    /// Encoding happens before the future is built, and the future holds
    /// only the headers and the payload: it is boxed once per message, and
    /// the envelope alongside async-nats' publish state would take it past
    /// the allocator's small-allocation cache.
    fn publish_envelope<'a>(
        &'a self,
        subject: &'a str,
        envelope: Envelope,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        match wire::encode_within(envelope, self.inner.max_payload) {
            Ok((headers, payload)) => {
                started(Box::pin(send(&self.inner.js, subject, headers, payload)))
            }
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    /// The consumer's message stream (the durable consumer is created the
    /// first time).
    async fn messages(
        &self,
        queue: &str,
        lease: Duration,
        prefetch: usize,
        max_attempts: Option<u32>,
    ) -> Result<Puller, TransportError> {
        // A release counts a delivery: two per attempt, then the one on
        // which the runtime dead-letters a message over its budget.
        let budget = max_attempts.map(|n| i64::from(n) * 2 + 1);
        let max_deliver = self
            .inner
            .config
            .max_deliver
            .or(budget.map(|b| b + 49))
            .unwrap_or(-1);
        let max_ack_pending = self.inner.config.max_ack_pending.unwrap_or_else(|| {
            i64::try_from(prefetch.saturating_mul(16).max(1000)).unwrap_or(i64::MAX)
        });
        let stream = self
            .inner
            .js
            .get_stream(stream_name(queue))
            .await
            .map_err(|e| {
                error(
                    TransportErrorKind::NotFound,
                    format!("no stream for queue {queue:?}"),
                    e,
                )
            })?;
        let consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.to_owned()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: lease,
                    // Above the runtime's budget: switchyard dead-letters
                    // with the reason before the server gives up.
                    max_deliver,
                    max_ack_pending,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                error(
                    TransportErrorKind::Config,
                    format!("cannot create the consumer of {queue:?}"),
                    e,
                )
            })?;
        // An existing consumer keeps its settings: check they still fit.
        let existing = &consumer.cached_info().config;
        if let Some(budget) = budget {
            if existing.max_deliver > 0 && existing.max_deliver <= budget {
                return Err(TransportError::new(
                    TransportErrorKind::Config,
                    format!(
                        "the consumer of {queue:?} has max_deliver {}, which is not above this subscriber's budget of {budget} deliveries (2 x max_attempts + 1): the server would stop delivering a message before switchyard dead-letters it; raise max_deliver (or delete the consumer) or lower max_attempts",
                        existing.max_deliver
                    ),
                ));
            }
        }
        if existing.max_ack_pending > 0
            && usize::try_from(existing.max_ack_pending).is_ok_and(|m| m < prefetch)
        {
            tracing::warn!(
                queue,
                max_ack_pending = existing.max_ack_pending,
                prefetch,
                "the consumer's max_ack_pending is below this subscriber's concurrency; it cannot use all of it"
            );
        }
        Puller::new(
            &self.inner.js.client(),
            &stream_name(queue),
            CONSUMER,
            prefetch,
            PULL_EXPIRES,
        )
        .await
        .map_err(|e| {
            error(
                TransportErrorKind::Connection,
                format!("cannot consume {queue:?}"),
                e,
            )
        })
    }

    async fn subscribe_to(
        &self,
        queue: &str,
        options: SubscribeOptions,
    ) -> Result<DeliveryStream, TransportError> {
        let (_, lease) = self.queue_info(queue);
        let prefetch = options.prefetch.max(1);
        let max_attempts = options.max_attempts;
        let messages = self.messages(queue, lease, prefetch, max_attempts).await?;
        // Boxed: `unfold` moves its state in and out of the future for
        // every item, and the pull stream is large.
        let state = Box::new(Pull {
            shared: Arc::new(Subscription {
                transport: self.clone(),
                queue: queue.into(),
                lease,
                alive: AtomicBool::new(true),
                slots: Arc::new(Semaphore::new(prefetch)),
                client: self.inner.js.client(),
            }),
            prefetch,
            max_attempts,
            messages: Some(messages),
            pause: Duration::from_millis(100),
        });
        // Survives a lost server: an interrupted pull is re-created (with
        // backoff) until the server answers again; an error of the pull
        // stream is reported once, a missed heartbeat only logged.
        let deliveries = futures_util::stream::unfold(state, |mut pull| async move {
            let slot = Slot::take(&pull.shared).await;
            loop {
                let Some(messages) = pull.messages.as_mut() else {
                    match pull
                        .shared
                        .transport
                        .messages(
                            &pull.shared.queue,
                            pull.shared.lease,
                            pull.prefetch,
                            pull.max_attempts,
                        )
                        .await
                    {
                        Ok(m) => {
                            pull.messages = Some(m);
                            pull.pause = Duration::from_millis(100);
                            tracing::info!(queue = %pull.shared.queue, "consuming again");
                        }
                        Err(e) => {
                            tokio::time::sleep(pull.pause).await;
                            pull.pause = (pull.pause * 2).min(Duration::from_secs(5));
                            if matches!(
                                e.kind(),
                                TransportErrorKind::Config | TransportErrorKind::NotFound
                            ) {
                                // Not the server being away: someone must act.
                                tracing::warn!(queue = %pull.shared.queue, error = %e, "cannot consume; retrying");
                            } else {
                                tracing::debug!(queue = %pull.shared.queue, error = %e, "cannot consume yet");
                            }
                        }
                    }
                    continue;
                };
                match messages.next().await {
                    Some(Ok(message)) => {
                        let delivery = pull.delivery(message, slot);
                        return Some((Ok(delivery), pull));
                    }
                    Some(Err(PullError::MissingHeartbeat)) => {
                        // Nothing for two heartbeats: a pull request went
                        // unanswered, or the server is away. Pull anew (with
                        // backoff while that fails); the connection's own
                        // events report an outage.
                        tracing::info!(queue = %pull.shared.queue, "no heartbeat from the server; pulling anew");
                        pull.messages = None;
                    }
                    Some(Err(e)) => {
                        pull.messages = None;
                        let e = error(
                            TransportErrorKind::Connection,
                            format!(
                                "consuming {:?} was interrupted; resuming",
                                &*pull.shared.queue
                            ),
                            e,
                        );
                        return Some((Err(e), pull));
                    }
                    None => pull.messages = None,
                }
            }
        });
        Ok(Box::pin(deliveries))
    }
}

/// `publish`, already handed to the connection when there is room for it,
/// as async-nats' own `publish` is before it returns its PubAck future: a
/// caller that builds several publishes and then awaits them together
/// (`join_all`, `FuturesUnordered`) has all of them on the wire at once,
/// not each only when first polled. The first poll uses a waker that does
/// nothing; the caller's first poll registers its own. Best effort: when
/// the command queue is full, or the calling task has used up tokio's
/// cooperative budget, the publish goes out on the caller's first poll,
/// as it does outside a tokio runtime (async-nats' timers need one). The
/// publish's timeouts count from the call.
fn started<'a>(
    mut publish: BoxFuture<'a, Result<(), TransportError>>,
) -> BoxFuture<'a, Result<(), TransportError>> {
    if tokio::runtime::Handle::try_current().is_err() {
        return publish;
    }
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match publish.as_mut().poll(&mut cx) {
        // Refused before it was sent (too large, connection closed).
        std::task::Poll::Ready(result) => Box::pin(std::future::ready(result)),
        std::task::Poll::Pending => publish,
    }
}

/// Publishes and waits for the PubAck.
async fn send(
    js: &Context,
    subject: &str,
    headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
) -> Result<(), TransportError> {
    let message = async_nats::jetstream::message::PublishMessage::build()
        .payload(payload)
        .headers(headers);
    let ack = js
        .send_publish(subject.to_owned(), message)
        .await
        .map_err(|e| {
            // Before it is sent: too large with its headers (the payload
            // alone was checked), or the connection.
            let kind = publish_error_kind(e.kind(), TransportErrorKind::Connection);
            error(kind, format!("cannot publish to {subject:?}"), e)
        })?;
    ack.await.map(drop).map_err(|e| {
        let kind = publish_error_kind(e.kind(), TransportErrorKind::Rejected);
        error(
            kind,
            format!("JetStream did not store the message for {subject:?}"),
            e,
        )
    })
}

/// What a failed JetStream publish is, `otherwise` where async-nats does
/// not say.
fn publish_error_kind(kind: PublishErrorKind, otherwise: TransportErrorKind) -> TransportErrorKind {
    match kind {
        PublishErrorKind::StreamNotFound => TransportErrorKind::NotFound,
        PublishErrorKind::MaxPayloadExceeded => TransportErrorKind::TooLarge,
        PublishErrorKind::TimedOut => TransportErrorKind::Timeout,
        _ => otherwise,
    }
}

/// What one subscription's deliveries share.
struct Subscription {
    transport: NatsTransport,
    queue: Box<str>,
    lease: Duration,
    /// False once the subscription is dropped: its deliveries are then given
    /// back with a delay longer than a pull request lives, so that the
    /// request it left on the server cannot take them.
    alive: AtomicBool,
    /// Prefetch left: each delivery takes a slot until it is settled.
    slots: Arc<Semaphore>,
    /// The connection, which settlements are published through
    /// (`Context::client` clones it on every call).
    client: async_nats::Client,
}

/// A prefetch slot, given back when dropped. It keeps the subscription's
/// shared state for its delivery's settler (one reference for both).
struct Slot(Arc<Subscription>);

impl Slot {
    async fn take(shared: &Arc<Subscription>) -> Slot {
        // The permit is forgotten here, and given back by `Slot`'s drop.
        switchyard_core::transport::prefetch_slot(&shared.slots)
            .await
            .forget();
        Slot(Arc::clone(shared))
    }
}

impl std::ops::Deref for Slot {
    type Target = Subscription;

    fn deref(&self) -> &Subscription {
        &self.0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.slots.add_permits(1);
    }
}

/// The state of one subscription's stream.
struct Pull {
    shared: Arc<Subscription>,
    prefetch: usize,
    max_attempts: Option<u32>,
    messages: Option<Puller>,
    pause: Duration,
}

impl Pull {
    fn delivery(&self, message: async_nats::Message, slot: Slot) -> Delivery {
        let received = Instant::now();
        let (delivered, stream_sequence) = message
            .reply
            .as_deref()
            .and_then(wire::ack_subject)
            .unwrap_or((1, 0));
        let attempt = u32::try_from(delivered).unwrap_or(u32::MAX).max(1);
        // The settler answers on the reply subject through the subscription's
        // client.
        let envelope = Arc::new(wire::decode(message.headers.as_ref(), message.payload));
        let settler = NatsSettler {
            subject: message.subject,
            stream_sequence,
            reply: Some(message.reply.ok_or(NoReply)),
            envelope: Arc::clone(&envelope),
            deadline: received + slot.lease,
            slot,
        };
        Delivery::received(envelope, attempt, received, Box::new(settler))
    }
}

impl Drop for Pull {
    fn drop(&mut self) {
        self.shared.alive.store(false, Ordering::Release);
    }
}

/// Settles one JetStream message.
struct NatsSettler {
    /// The subject acknowledgements go to (an error if the server sent
    /// none); `None` once settled.
    reply: Option<Result<async_nats::Subject, NoReply>>,
    /// The subject it was published to, and its sequence number in the
    /// stream (0 if unknown): dead-letter metadata.
    subject: async_nats::Subject,
    stream_sequence: u64,
    envelope: Arc<Envelope>,
    /// When the server redelivers it unless extended.
    deadline: Instant,
    /// Its prefetch slot, and what the subscription's deliveries share.
    slot: Slot,
}

fn stale(queue: &str) -> TransportError {
    TransportError::new(
        TransportErrorKind::StaleDelivery,
        format!("the lease of this delivery from {queue:?} ran out; JetStream redelivers it"),
    )
}

fn ack_error(e: impl Into<async_nats::Error>) -> TransportError {
    TransportError::new(TransportErrorKind::Connection, "acknowledgement failed")
        .with_source(e.into())
}

/// A message without a reply subject: not from a JetStream consumer, so
/// there is nothing to acknowledge it to.
#[derive(Clone, Copy, Debug)]
struct NoReply;

impl From<NoReply> for TransportError {
    fn from(_: NoReply) -> TransportError {
        TransportError::new(
            TransportErrorKind::Other,
            "the message has no reply subject: it did not come from a JetStream consumer",
        )
    }
}

/// The payload of a settlement on the wire, as async-nats' `Acker` sends
/// it: an ack is an empty message (`Acker::ack`), every other kind its
/// `AckKind` bytes (`Acker::ack_with`).
fn ack_payload(kind: Option<AckKind>) -> bytes::Bytes {
    kind.map_or_else(bytes::Bytes::new, bytes::Bytes::from)
}

impl NatsSettler {
    /// A nak redelivering after `delay`, or, once the subscription is
    /// dropped, no sooner than its last pull request has expired.
    fn nak(&self, delay: Duration) -> AckKind {
        let delay = if self.slot.alive.load(Ordering::Acquire) {
            delay
        } else {
            delay.max(PULL_EXPIRES + Duration::from_secs(1))
        };
        AckKind::Nak((!delay.is_zero()).then_some(delay))
    }

    /// `StaleDelivery` once the lease has run out: the server has handed
    /// the message out again, and acting on it now would act on the copy
    /// someone else holds.
    fn fresh(&self) -> Result<(), TransportError> {
        if Instant::now() >= self.deadline {
            Err(stale(&self.slot.queue))
        } else {
            Ok(())
        }
    }

    /// Sends `kind` (`None`: a plain ack) for this delivery without a
    /// boxed future: [`send_ack`](Self::send_ack), polled once here, puts
    /// it in the client's command queue at once unless the queue is full
    /// (or the task has used up tokio's cooperative budget). `Err` gives the
    /// reply subject back when it is not taken; the publish is dropped
    /// unsent then (tokio's `Sender::send` sends nothing unless it
    /// completes), and so is its place in the queue's wait list.
    fn queue_ack(
        &self,
        reply: async_nats::Subject,
        kind: Option<AckKind>,
        cx: &mut std::task::Context<'_>,
    ) -> Result<Result<(), TransportError>, async_nats::Subject> {
        let send = std::pin::pin!(self.send_ack(reply.clone(), kind));
        match send.poll(cx) {
            std::task::Poll::Ready(sent) => Ok(sent),
            std::task::Poll::Pending => Err(reply),
        }
    }

    /// Sends `kind` (`None`: a plain ack) for this delivery, waiting for
    /// room in the client's command queue.
    async fn send_ack(
        &self,
        reply: async_nats::Subject,
        kind: Option<AckKind>,
    ) -> Result<(), TransportError> {
        self.slot
            .client
            .publish(reply, ack_payload(kind))
            .await
            .map_err(ack_error)
    }

    /// Publishes to the dead-letter stream (PubAck awaited), then terms.
    async fn dead_letter(
        self: Box<Self>,
        reply: async_nats::Subject,
        reason: switchyard_core::DeadLetterReason,
        detail: String,
        attempts: u32,
    ) -> Result<(), TransportError> {
        let (dlq, _) = self.slot.transport.queue_info(&self.slot.queue);
        let mut envelope = Envelope::clone(&self.envelope);
        DeadLetterInfo {
            reason,
            detail,
            attempts,
            source: self.slot.queue.to_string(),
            at: SystemTime::now(),
        }
        .write_to(&mut envelope.headers);
        envelope
            .headers
            .insert(wire::DEAD_LETTER_SUBJECT, self.subject.as_str());
        if self.stream_sequence > 0 {
            envelope.headers.insert(
                wire::DEAD_LETTER_STREAM_SEQUENCE,
                self.stream_sequence.to_string(),
            );
        }
        if let Err(e) = self.slot.transport.publish_envelope(&dlq, envelope).await {
            // Back after a pause, not at once: it would fail again in a
            // tight loop while the dead-letter stream refuses it.
            let nak = self.nak(Duration::from_secs(5));
            let _ = self.send_ack(reply, Some(nak)).await;
            return Err(e);
        }
        self.send_ack(reply, Some(AckKind::Term)).await
    }

    /// The reply subject, once: `StaleDelivery` past the lease (the server
    /// has handed the message out again, and acting on it now would act
    /// on the copy someone else holds).
    fn take_reply(&mut self) -> Result<async_nats::Subject, TransportError> {
        let reply = self.reply.take().expect("settled once")?;
        self.fresh()?;
        Ok(reply)
    }

    /// The kind a settlement other than a dead-lettering is sent as (`None`:
    /// a plain ack); `None` for a dead-lettering, and for an ack when the
    /// server must confirm it.
    fn wire_kind(&self, settlement: &Settlement) -> Option<Option<AckKind>> {
        match settlement {
            Settlement::Ack if self.slot.transport.inner.config.double_ack => None,
            Settlement::Ack => Some(None),
            Settlement::Retry { delay } => Some(Some(self.nak(*delay))),
            Settlement::Release => Some(Some(self.nak(Duration::ZERO))),
            Settlement::DeadLetter { .. } => None,
        }
    }
}

impl Settler for NatsSettler {
    fn settle(
        mut self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        let reply = match self.take_reply() {
            Ok(reply) => reply,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        // Each future keeps the settler (and its prefetch slot) until the
        // settlement is sent.
        match (self.wire_kind(&settlement), settlement) {
            (Some(kind), _) => Box::pin(async move { self.send_ack(reply, kind).await }),
            (
                None,
                Settlement::DeadLetter {
                    reason,
                    detail,
                    attempts,
                },
            ) => Box::pin(self.dead_letter(reply, reason, detail, attempts)),
            (None, _) => Box::pin(async move {
                let js = self.slot.transport.inner.js.clone();
                Acker::new(js, Some(reply))
                    .double_ack()
                    .await
                    .map_err(ack_error)
            }),
        }
    }

    /// Acks, naks and releases go to the client's command queue directly
    /// (the connection task writes them, as it would `Acker::ack`'s), with
    /// no boxed future and no copy of the JetStream context: on a busy
    /// consumer this is most of what settling costs.
    fn begin_settle(
        mut self: Box<Self>,
        settlement: Settlement,
        cx: &mut std::task::Context<'_>,
    ) -> Settling {
        let Some(kind) = self.wire_kind(&settlement) else {
            return Settling::poll_once(self.settle(settlement), cx);
        };
        let reply = match self.take_reply() {
            Ok(reply) => reply,
            Err(e) => return Settling::Done(Err(e)),
        };
        match self.queue_ack(reply, kind, cx) {
            Ok(sent) => Settling::Done(sent),
            // Not taken (the queue is full, or the task's cooperative
            // budget is spent): wait for room, keeping the slot meanwhile.
            Err(reply) => {
                Settling::Pending(Box::pin(async move { self.send_ack(reply, kind).await }))
            }
        }
    }

    fn extend(&mut self, _lease: Duration) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            self.fresh()?;
            let reply = match &self.reply {
                Some(Ok(reply)) => reply.clone(),
                Some(Err(no_reply)) => return Err((*no_reply).into()),
                None => return Err(stale(&self.slot.queue)),
            };
            // In-progress resets the server's ack wait to its full length.
            self.send_ack(reply, Some(AckKind::Progress)).await?;
            self.deadline = Instant::now() + self.slot.lease;
            Ok(())
        })
    }

    fn lease_deadline(&self) -> Option<Instant> {
        Some(self.deadline)
    }
}

impl Drop for NatsSettler {
    fn drop(&mut self) {
        // Dropped unsettled: give it back now rather than at the ack wait.
        let Some(Ok(reply)) = self.reply.take() else {
            return;
        };
        let nak = ack_payload(Some(self.nak(Duration::ZERO)));
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let client = self.slot.client.clone();
            handle.spawn(async move {
                let _ = client.publish(reply, nak).await;
            });
        }
    }
}

impl NatsTransport {
    async fn stats_of(&self, queue: &str) -> Result<switchyard_core::QueueStats, TransportError> {
        let name = stream_name(queue);
        let mut stream = self.inner.js.get_stream(&name).await.map_err(|e| {
            error(
                TransportErrorKind::NotFound,
                format!("no stream for queue {queue:?}"),
                e,
            )
        })?;
        let info = stream.info().await.map_err(|e| {
            error(
                TransportErrorKind::Connection,
                format!("cannot read stream {name:?}"),
                e,
            )
        })?;
        let state = info.state.clone();
        let mut stats = switchyard_core::QueueStats::default();
        stats.depth = Some(state.messages);
        let first: SystemTime = state.first_timestamp.into();
        if state.messages > 0 {
            stats.oldest_age = SystemTime::now().duration_since(first).ok();
        }
        if let Ok(mut consumer) = stream.get_consumer::<pull::Config>(CONSUMER).await {
            if let Ok(c) = consumer.info().await {
                // Unsettled messages stay in the stream until acked.
                stats.depth = Some(c.num_pending);
                stats.in_flight = Some(c.num_ack_pending as u64);
                stats.consumers = Some(c.num_waiting as u64);
            }
        }
        Ok(stats)
    }
}

impl Transport for NatsTransport {
    fn flush(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            // Acks and naks are published without waiting: push them out.
            self.inner.js.client().flush().await.map_err(|e| {
                error(
                    TransportErrorKind::Connection,
                    "cannot flush to NATS".into(),
                    e,
                )
            })
        })
    }

    fn dead_letter_of(&self, queue: &str) -> String {
        self.queue_info(queue).0
    }

    fn queue_stats<'a>(
        &'a self,
        queue: &'a str,
    ) -> BoxFuture<'a, Result<switchyard_core::QueueStats, TransportError>> {
        Box::pin(self.stats_of(queue))
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::full();
        caps.dead_letter = Support::Emulated;
        // A nak counts as a delivery.
        caps.release_counts_attempt = true;
        caps.ordering = OrderingSupport::PerSource;
        caps.max_payload = Some(self.inner.max_payload);
        // `Nats-Msg-Id` is the message id.
        caps.deduplicates_publishes = true;
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
        self.publish_envelope(destination, envelope)
    }

    fn subscribe<'a>(
        &'a self,
        source: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<DeliveryStream, TransportError>> {
        Box::pin(self.subscribe_to(source, options))
    }
}
