//! The SQS transport.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;
use switchyard_core::transport::BoxFuture;
use switchyard_core::{
    Capabilities, DeadLetterInfo, Delivery, DeliveryStream, Envelope, OrderingSupport, Settlement,
    Settler, SubscribeOptions, Support, Topology, Transport, TransportError, TransportErrorKind,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::batch::{Batcher, Op, Pending, Target, BATCH};
use crate::config::{SqsConfig, ATTRIBUTE_ROOM, MAX_VISIBILITY};
use crate::wire;

/// The queue tag that names a queue's dead-letter queue.
pub const DEAD_LETTER_TAG: &str = "switchyard-dead-letter";
/// How long a subscription waits for more free prefetch slots, so that one
/// receive can fetch a full batch of ten.
const GATHER: Duration = Duration::from_millis(50);

/// Requests made, by operation: SQS charges per request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestCounts {
    /// `ReceiveMessage` calls.
    pub receive: u64,
    /// `ReceiveMessage` calls that returned nothing.
    pub empty_receive: u64,
    /// Messages received.
    pub received: u64,
    /// `DeleteMessage(Batch)` calls.
    pub delete: u64,
    /// Messages deleted (entries of those calls).
    pub deleted: u64,
    /// `ChangeMessageVisibility(Batch)` calls.
    pub change_visibility: u64,
    /// `SendMessage(Batch)` calls.
    pub send: u64,
    /// Queue lookups and topology (`GetQueueUrl`, `CreateQueue`, ...).
    pub other: u64,
}

impl RequestCounts {
    /// Every request.
    pub fn total(&self) -> u64 {
        self.receive + self.delete + self.change_visibility + self.send + self.other
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &RequestCounts) -> RequestCounts {
        RequestCounts {
            receive: self.receive - earlier.receive,
            empty_receive: self.empty_receive - earlier.empty_receive,
            received: self.received - earlier.received,
            delete: self.delete - earlier.delete,
            deleted: self.deleted - earlier.deleted,
            change_visibility: self.change_visibility - earlier.change_visibility,
            send: self.send - earlier.send,
            other: self.other - earlier.other,
        }
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    receive: AtomicU64,
    empty_receive: AtomicU64,
    received: AtomicU64,
    delete: AtomicU64,
    deleted: AtomicU64,
    change_visibility: AtomicU64,
    send: AtomicU64,
    other: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64, op: &'static str) {
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("switchyard_sqs_requests_total", "op" => op).increment(1);
    }
    pub(crate) fn delete(&self, entries: usize) {
        Self::bump(&self.delete, "delete");
        self.deleted.fetch_add(entries as u64, Ordering::Relaxed);
    }
    pub(crate) fn change_visibility(&self, _entries: usize) {
        Self::bump(&self.change_visibility, "change_visibility");
    }
    fn send(&self) {
        Self::bump(&self.send, "send");
    }
    fn other(&self) {
        Self::bump(&self.other, "other");
    }
    fn receive(&self, got: usize) {
        Self::bump(&self.receive, "receive");
        if got == 0 {
            self.empty_receive.fetch_add(1, Ordering::Relaxed);
        }
        self.received.fetch_add(got as u64, Ordering::Relaxed);
    }
    fn snapshot(&self) -> RequestCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RequestCounts {
            receive: get(&self.receive),
            empty_receive: get(&self.empty_receive),
            received: get(&self.received),
            delete: get(&self.delete),
            deleted: get(&self.deleted),
            change_visibility: get(&self.change_visibility),
            send: get(&self.send),
            other: get(&self.other),
        }
    }
}

/// The kind of an SQS error code.
fn code_kind(code: Option<&str>) -> TransportErrorKind {
    match code.unwrap_or_default() {
        c if c.contains("NonExistentQueue") || c.contains("QueueDoesNotExist") => {
            TransportErrorKind::NotFound
        }
        "ReceiptHandleIsInvalid" | "MessageNotInflight" => TransportErrorKind::StaleDelivery,
        c if c.contains("TooLong") => TransportErrorKind::TooLarge,
        "AccessDenied"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "UnrecognizedClientException"
        | "MissingAuthenticationToken" => TransportErrorKind::Config,
        "" => TransportErrorKind::Other,
        _ => TransportErrorKind::Rejected,
    }
}

/// A transport error for an SDK error: classified by its error code, with
/// the SDK's whole explanation (which never holds credentials) as source.
pub(crate) fn sdk_error<E, R>(e: SdkError<E, R>, what: &str) -> TransportError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    let kind = match &e {
        SdkError::TimeoutError(_) => TransportErrorKind::Timeout,
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => TransportErrorKind::Connection,
        SdkError::ConstructionFailure(_) => TransportErrorKind::Config,
        _ => code_kind(e.code()),
    };
    let detail = match (e.code(), e.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => DisplayErrorContext(&e).to_string(),
    };
    TransportError::new(kind, what.to_owned()).with_source(detail)
}

/// Like [`sdk_error`] for requests that carry a receipt handle: SQS quotes
/// the handle in its messages, and handles do not belong in logs, so only
/// the error code is kept. A receipt SQS no longer accepts means the
/// message was deleted or its visibility ran out: `StaleDelivery`.
pub(crate) fn receipt_error<E, R>(e: SdkError<E, R>, what: &str) -> TransportError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    match e.code().map(str::to_owned) {
        Some(code) => {
            TransportError::new(crate::batch::entry_kind(&code), format!("{what}: {code}"))
        }
        None => sdk_error(e, what),
    }
}

/// Runs a request with a timeout, so that a hung connection cannot stall
/// the caller.
pub(crate) async fn with_timeout<T>(
    limit: Duration,
    request: impl Future<Output = T>,
) -> Result<T, TransportError> {
    tokio::time::timeout(limit, request).await.map_err(|_| {
        TransportError::new(
            TransportErrorKind::Timeout,
            format!("SQS did not answer within {limit:?}"),
        )
    })
}

/// What the transport knows of one queue.
#[derive(Debug)]
pub(crate) struct QueueInfo {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) max_message_size: usize,
    pub(crate) visibility: Duration,
    pub(crate) dead_letter: String,
    pub(crate) redrive_max_receive_count: Option<u32>,
    pub(crate) fifo: bool,
}

/// An SQS transport. Clones share the client and the queue cache.
#[derive(Clone)]
pub struct SqsTransport {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    config: SqsConfig,
    queues: Mutex<HashMap<String, Arc<QueueInfo>>>,
    counters: Arc<Counters>,
    /// Receives and releases still under way for dropped subscriptions and
    /// deliveries; `flush` waits for them.
    pending: Arc<Pending>,
}

impl fmt::Debug for SqsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsTransport")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Whole seconds, rounded up, as SQS wants them.
fn secs_up(d: Duration) -> i32 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(s).unwrap_or(i32::MAX)
}

/// A queue's default dead-letter queue: `<name>-dlq`, FIFO if it is.
pub fn default_dead_letter(queue: &str) -> String {
    match queue.strip_suffix(".fifo") {
        Some(base) => format!("{base}-dlq.fifo"),
        None => format!("{queue}-dlq"),
    }
}

impl SqsTransport {
    /// Builds the client from `config` and the standard AWS chain. Makes no
    /// request: a wrong endpoint or credentials show at the first call.
    pub async fn connect(config: SqsConfig) -> Result<Self, TransportError> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &config.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(profile) = &config.profile {
            loader = loader.profile_name(profile);
        }
        if let Some(endpoint) = &config.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some((id, secret)) = &config.credentials {
            loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "switchyard-static",
            ));
        }
        let shared = loader.load().await;
        if shared.region().is_none() {
            return Err(TransportError::new(
                TransportErrorKind::Config,
                "no AWS region: set one in the configuration or AWS_REGION",
            ));
        }
        Ok(SqsTransport {
            inner: Arc::new(Inner {
                client: Client::new(&shared),
                config,
                queues: Mutex::default(),
                counters: Arc::default(),
                pending: Arc::default(),
            }),
        })
    }

    /// The underlying SDK client.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The requests this transport (and its clones) made so far.
    pub fn request_counts(&self) -> RequestCounts {
        self.inner.counters.snapshot()
    }

    /// The SQS name of `queue`: in FIFO mode `.fifo` is appended if missing.
    pub fn queue_name(&self, queue: &str) -> String {
        if self.inner.config.fifo && !queue.ends_with(".fifo") {
            format!("{queue}.fifo")
        } else {
            queue.to_owned()
        }
    }

    fn forget(&self, queue: &str) {
        self.inner
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(queue);
    }

    async fn call<T, E, R>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, SdkError<E, R>>>,
    ) -> Result<T, TransportError>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: fmt::Debug + Send + Sync + 'static,
    {
        with_timeout(self.inner.config.request_timeout, request)
            .await?
            .map_err(|e| sdk_error(e, what))
    }

    /// The URL of `name`, or `NotFound`.
    pub async fn queue_url(&self, name: &str) -> Result<String, TransportError> {
        self.inner.counters.other();
        let out = self
            .call(
                &format!("cannot find queue {name:?}"),
                self.inner.client.get_queue_url().queue_name(name).send(),
            )
            .await?;
        out.queue_url().map(str::to_owned).ok_or_else(|| {
            TransportError::new(TransportErrorKind::NotFound, format!("no queue {name:?}"))
        })
    }

    /// The queue's attributes, by name.
    pub async fn queue_attributes(
        &self,
        url: &str,
    ) -> Result<HashMap<QueueAttributeName, String>, TransportError> {
        self.inner.counters.other();
        let out = self
            .call(
                "cannot read the queue's attributes",
                self.inner
                    .client
                    .get_queue_attributes()
                    .queue_url(url)
                    .attribute_names(QueueAttributeName::All)
                    .send(),
            )
            .await?;
        Ok(out.attributes().cloned().unwrap_or_default())
    }

    /// What the transport needs to know of `queue` (cached).
    pub(crate) async fn queue(&self, queue: &str) -> Result<Arc<QueueInfo>, TransportError> {
        let name = self.queue_name(queue);
        if let Some(info) = self
            .inner
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
        {
            return Ok(Arc::clone(info));
        }
        let url = self.queue_url(&name).await?;
        let attributes = self.queue_attributes(&url).await?;
        self.inner.counters.other();
        let tags = self
            .call(
                &format!("cannot read the tags of {name:?}"),
                self.inner.client.list_queue_tags().queue_url(&url).send(),
            )
            .await?;
        let redrive = attributes
            .get(&QueueAttributeName::RedrivePolicy)
            .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok());
        let redrive_target = redrive
            .as_ref()
            .and_then(|p| p.get("deadLetterTargetArn")?.as_str()?.rsplit(':').next())
            .map(str::to_owned);
        let redrive_max_receive_count = redrive.as_ref().and_then(|p| {
            let v = p.get("maxReceiveCount")?;
            v.as_u64()
                .or_else(|| v.as_str()?.parse().ok())
                .and_then(|n| u32::try_from(n).ok())
        });
        let dead_letter = tags
            .tags()
            .and_then(|t| t.get(DEAD_LETTER_TAG).cloned())
            .or(redrive_target)
            .unwrap_or_else(|| default_dead_letter(&name));
        let number = |key: QueueAttributeName| attributes.get(&key)?.parse::<u64>().ok();
        let info = Arc::new(QueueInfo {
            max_message_size: number(QueueAttributeName::MaximumMessageSize)
                .map(|n| n as usize)
                .unwrap_or(self.inner.config.max_message_size),
            visibility: number(QueueAttributeName::VisibilityTimeout)
                .map(Duration::from_secs)
                .unwrap_or(self.inner.config.visibility_timeout),
            fifo: attributes
                .get(&QueueAttributeName::FifoQueue)
                .is_some_and(|v| v == "true"),
            dead_letter,
            redrive_max_receive_count,
            url,
            name: name.clone(),
        });
        self.inner
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, Arc::clone(&info));
        Ok(info)
    }

    /// The largest payload every message can carry: binary payloads are
    /// base64-encoded (four bytes for three), and the attributes get
    /// [`ATTRIBUTE_ROOM`].
    fn max_payload(&self) -> usize {
        self.inner
            .config
            .max_message_size
            .saturating_sub(ATTRIBUTE_ROOM)
            / 4
            * 3
    }

    /// Creates `name` (idempotently) with `attributes`, updating an existing
    /// queue whose attributes differ. Returns its URL.
    async fn create_queue(
        &self,
        name: &str,
        mut attributes: HashMap<QueueAttributeName, String>,
        tags: HashMap<String, String>,
    ) -> Result<String, TransportError> {
        if name.ends_with(".fifo") {
            attributes.insert(QueueAttributeName::FifoQueue, "true".into());
        }
        self.inner.counters.other();
        let created = with_timeout(
            self.inner.config.request_timeout,
            self.inner
                .client
                .create_queue()
                .queue_name(name)
                .set_attributes(Some(attributes.clone()))
                .set_tags(Some(tags.clone()))
                .send(),
        )
        .await?;
        let url = match created {
            Ok(out) => out.queue_url().unwrap_or_default().to_owned(),
            Err(e)
                if e.code().is_some_and(|c| {
                    c.contains("QueueAlreadyExists") || c.contains("QueueNameExists")
                }) =>
            {
                // Exists with other attributes: bring it to what is declared.
                let url = self.queue_url(name).await?;
                attributes.remove(&QueueAttributeName::FifoQueue);
                self.inner.counters.other();
                self.call(
                    &format!("cannot update queue {name:?}"),
                    self.inner
                        .client
                        .set_queue_attributes()
                        .queue_url(&url)
                        .set_attributes(Some(attributes))
                        .send(),
                )
                .await?;
                if tags.is_empty() {
                    self.forget(name);
                    return Ok(url);
                }
                self.inner.counters.other();
                self.call(
                    &format!("cannot tag queue {name:?}"),
                    self.inner
                        .client
                        .tag_queue()
                        .queue_url(&url)
                        .set_tags(Some(tags))
                        .send(),
                )
                .await?;
                url
            }
            Err(e) => return Err(sdk_error(e, &format!("cannot declare queue {name:?}"))),
        };
        self.forget(name);
        Ok(url)
    }

    async fn declare_all(&self, topology: &Topology) -> Result<(), TransportError> {
        if let Some(topic) = topology.topics.first() {
            return Err(TransportError::new(
                TransportErrorKind::Unsupported,
                format!(
                    "SQS has no topics (topic {:?}); fan out with SNS or declare one queue per subscriber",
                    topic.name
                ),
            ));
        }
        for q in &topology.queues {
            let name = self.queue_name(&q.name);
            let dlq = q
                .dead_letter
                .as_deref()
                .map(|d| self.queue_name(d))
                .unwrap_or_else(|| default_dead_letter(&name));
            if name.ends_with(".fifo") != dlq.ends_with(".fifo") {
                return Err(TransportError::new(
                    TransportErrorKind::Config,
                    format!("queue {name:?} and its dead-letter queue {dlq:?} must both be FIFO or both standard"),
                ));
            }
            let dlq_url = self
                .create_queue(
                    &dlq,
                    HashMap::from([(
                        QueueAttributeName::MaximumMessageSize,
                        self.inner.config.max_message_size.to_string(),
                    )]),
                    HashMap::new(),
                )
                .await?;
            let lease = q.lease.unwrap_or(self.inner.config.visibility_timeout);
            let mut attributes = HashMap::from([
                (
                    QueueAttributeName::VisibilityTimeout,
                    secs_up(lease.min(MAX_VISIBILITY)).to_string(),
                ),
                (
                    QueueAttributeName::MaximumMessageSize,
                    self.inner.config.max_message_size.to_string(),
                ),
            ]);
            if let Some(n) = self.inner.config.redrive_max_receive_count {
                let dlq_arn = self
                    .queue_attributes(&dlq_url)
                    .await?
                    .remove(&QueueAttributeName::QueueArn)
                    .ok_or_else(|| {
                        TransportError::new(
                            TransportErrorKind::Other,
                            format!("SQS did not report the ARN of {dlq:?}"),
                        )
                    })?;
                attributes.insert(
                    QueueAttributeName::RedrivePolicy,
                    serde_json::json!({ "deadLetterTargetArn": dlq_arn, "maxReceiveCount": n })
                        .to_string(),
                );
            }
            self.create_queue(
                &name,
                attributes,
                HashMap::from([(DEAD_LETTER_TAG.to_owned(), dlq)]),
            )
            .await?;
        }
        Ok(())
    }

    fn check_size(
        &self,
        queue: &QueueInfo,
        envelope: &Envelope,
        size: usize,
    ) -> Result<(), TransportError> {
        self.check_payload(envelope)?;
        if size > queue.max_message_size {
            return Err(TransportError::new(
                TransportErrorKind::TooLarge,
                format!(
                    "message of {size} bytes (body and attributes; binary payloads are base64-encoded) is over the {}-byte maximum of queue {:?}",
                    queue.max_message_size, queue.name
                ),
            ));
        }
        Ok(())
    }

    fn check_payload(&self, envelope: &Envelope) -> Result<(), TransportError> {
        let max = self.max_payload();
        if envelope.payload.len() > max {
            return Err(TransportError::new(
                TransportErrorKind::TooLarge,
                format!(
                    "payload of {} bytes is over the {max}-byte limit of this SQS transport (three quarters of the maximum message size less {ATTRIBUTE_ROOM} bytes for attributes, so that base64 fits)",
                    envelope.payload.len()
                ),
            ));
        }
        Ok(())
    }

    /// The FIFO group and deduplication id of `envelope`. With a
    /// `dedup_suffix` (a dead-lettering or a replay, whose id is the
    /// original's) the deduplication id is the id plus the suffix, or a hash
    /// of the id plus the suffix where that would not be a valid one, and an
    /// invalid partition key falls back to the default group: such a copy
    /// must never be refused or taken for a duplicate.
    fn fifo_ids(
        &self,
        envelope: &Envelope,
        dedup_suffix: Option<&str>,
    ) -> Result<(String, String), TransportError> {
        let default_group = || self.inner.config.default_group.clone();
        let mut group = envelope.partition_key.clone().unwrap_or_else(default_group);
        let Some(suffix) = dedup_suffix else {
            wire::fifo_id("message group id (partition key)", &group)?;
            let dedup = envelope.id.as_str().to_owned();
            wire::fifo_id("deduplication id (message id)", &dedup)?;
            return Ok((group, dedup));
        };
        if wire::fifo_id("group", &group).is_err() {
            group = default_group();
        }
        let mut dedup = format!("{}{suffix}", envelope.id.as_str());
        if wire::fifo_id("dedup", &dedup).is_err() {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            envelope.id.as_str().hash(&mut h);
            dedup = format!("h{:016x}{suffix}", h.finish());
        }
        wire::fifo_id("deduplication id", &dedup)?;
        Ok((group, dedup))
    }

    /// Sends one message; `dedup_suffix` sets a FIFO deduplication id other
    /// than the message id (dead-lettering and replay must not be
    /// deduplicated against the original).
    pub(crate) async fn send(
        &self,
        destination: &str,
        envelope: &Envelope,
        dedup_suffix: Option<&str>,
    ) -> Result<(), TransportError> {
        self.check_payload(envelope)?;
        let queue = self.queue(destination).await?;
        let encoded = wire::encode(envelope);
        self.check_size(&queue, envelope, encoded.size)?;
        let mut request = self
            .inner
            .client
            .send_message()
            .queue_url(&queue.url)
            .message_body(encoded.body)
            .set_message_attributes(Some(encoded.attributes));
        if queue.fifo {
            let (group, dedup) = self.fifo_ids(envelope, dedup_suffix)?;
            request = request
                .message_group_id(group)
                .message_deduplication_id(dedup);
        }
        self.inner.counters.send();
        let result = self
            .call(
                &format!("SQS did not accept the message for {:?}", queue.name),
                request.send(),
            )
            .await;
        if let Err(e) = &result {
            if e.kind() == TransportErrorKind::NotFound {
                self.forget(&queue.name);
            }
        }
        result.map(drop)
    }

    /// Publishes `envelopes` with `SendMessageBatch` (ten to a request, within
    /// the queue's size limit per request). Entries SQS fails on its side are
    /// retried (up to three times); the error lists the ones that still
    /// failed, by index, and nothing else was sent twice.
    pub async fn publish_batch(
        &self,
        destination: &str,
        envelopes: Vec<Envelope>,
    ) -> Result<(), BatchPublishError> {
        let queue = self
            .queue(destination)
            .await
            .map_err(|e| BatchPublishError::all(envelopes.len(), e))?;
        let mut failed = Vec::new();
        let mut pending: Vec<(usize, SendMessageBatchRequestEntry, usize)> = Vec::new();
        for (i, envelope) in envelopes.iter().enumerate() {
            let encoded = wire::encode(envelope);
            if let Err(e) = self.check_size(&queue, envelope, encoded.size) {
                failed.push((i, e));
                continue;
            }
            let mut entry = SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(encoded.body)
                .set_message_attributes(Some(encoded.attributes));
            if queue.fifo {
                match self.fifo_ids(envelope, None) {
                    Ok((group, dedup)) => {
                        entry = entry
                            .message_group_id(group)
                            .message_deduplication_id(dedup)
                    }
                    Err(e) => {
                        failed.push((i, e));
                        continue;
                    }
                }
            }
            pending.push((i, entry.build().expect("id and body are set"), encoded.size));
        }
        let mut round = 0;
        while !pending.is_empty() {
            round += 1;
            let mut retry = Vec::new();
            let mut rest = pending.into_iter().peekable();
            while rest.peek().is_some() {
                // Ten entries, and no more bytes than one message may have.
                let mut chunk = Vec::with_capacity(BATCH);
                let mut bytes = 0;
                while let Some((_, _, size)) = rest.peek() {
                    if chunk.len() == BATCH
                        || (!chunk.is_empty() && bytes + size > queue.max_message_size)
                    {
                        break;
                    }
                    bytes += size;
                    chunk.push(rest.next().expect("peeked"));
                }
                self.inner.counters.send();
                let request = self
                    .inner
                    .client
                    .send_message_batch()
                    .queue_url(&queue.url)
                    .set_entries(Some(chunk.iter().map(|(_, e, _)| e.clone()).collect()))
                    .send();
                match self
                    .call(
                        &format!("SendMessageBatch to {:?} failed", queue.name),
                        request,
                    )
                    .await
                {
                    Err(e) => {
                        let text = e.to_string();
                        for (i, _, _) in chunk {
                            failed.push((i, TransportError::new(e.kind(), text.clone())));
                        }
                    }
                    Ok(out) => {
                        let errors: HashMap<&str, _> =
                            out.failed().iter().map(|f| (f.id(), f)).collect();
                        let accepted: std::collections::HashSet<&str> =
                            out.successful().iter().map(|s| s.id()).collect();
                        for item in chunk {
                            let id = item.0.to_string();
                            if accepted.contains(id.as_str()) {
                                continue;
                            }
                            let Some(f) = errors.get(id.as_str()) else {
                                // Neither accepted nor failed: not known to
                                // be sent.
                                failed.push((
                                    item.0,
                                    TransportError::new(
                                        TransportErrorKind::Other,
                                        format!(
                                            "SQS did not report message {} for {:?} as sent",
                                            item.0, queue.name
                                        ),
                                    ),
                                ));
                                continue;
                            };
                            if !f.sender_fault() && round < 4 {
                                retry.push(item);
                            } else {
                                failed.push((
                                    item.0,
                                    TransportError::new(
                                        code_kind(Some(f.code())),
                                        format!(
                                            "SQS refused message {} for {:?}: {}{}",
                                            item.0,
                                            queue.name,
                                            f.code(),
                                            f.message()
                                                .map(|m| format!(" ({m})"))
                                                .unwrap_or_default()
                                        ),
                                    ),
                                ));
                            }
                        }
                    }
                }
            }
            if !retry.is_empty() {
                tokio::time::sleep(Duration::from_millis(100 << round)).await;
            }
            pending = retry;
        }
        if failed.is_empty() {
            Ok(())
        } else {
            failed.sort_by_key(|(i, _)| *i);
            Err(BatchPublishError {
                total: envelopes.len(),
                failed,
            })
        }
    }

    async fn subscribe_to(
        &self,
        source: &str,
        options: SubscribeOptions,
    ) -> Result<DeliveryStream, TransportError> {
        let queue = self.queue(source).await?;
        if let (Some(limit), Some(attempts)) =
            (queue.redrive_max_receive_count, options.max_attempts)
        {
            // Releases count as receives: the runtime dead-letters a message
            // without running it only past twice its budget.
            if limit < attempts.saturating_mul(2) {
                tracing::warn!(
                    queue = %queue.name,
                    max_receive_count = limit,
                    max_attempts = attempts,
                    "the queue's redrive policy moves messages to the dead-letter queue after {limit} receives; with {attempts} attempts (and releases at shutdown counting as receives) SQS may move them first, without the reason; set maxReceiveCount to at least twice max_attempts"
                );
            }
        }
        let prefetch = options.prefetch.max(1);
        let batcher = Batcher::start(
            Target {
                client: self.inner.client.clone(),
                url: queue.url.clone(),
                queue: queue.name.clone(),
                counters: Arc::clone(&self.inner.counters),
                timeout: self.inner.config.request_timeout,
            },
            self.inner.config.settle_linger,
            Arc::clone(&self.inner.pending),
        );
        // Boxed: `unfold` moves its state in and out of the future for
        // every item.
        let state = Box::new(Pull {
            transport: self.clone(),
            source: source.into(),
            queue,
            batcher,
            prefetch,
            permits: Arc::new(Semaphore::new(prefetch)),
            buffer: VecDeque::new(),
            pause: None,
        });
        let deliveries = futures_util::stream::unfold(state, |mut pull| async move {
            loop {
                if let Some(d) = pull.buffer.pop_front() {
                    return Some((Ok(d), pull));
                }
                if let Some(pause) = pull.pause {
                    tokio::time::sleep(pause).await;
                }
                match pull.receive().await {
                    Ok(()) => pull.pause = None,
                    Err(e) => {
                        let pause = pull.pause.map_or(Duration::from_millis(200), |p| {
                            (p * 2).min(Duration::from_secs(10))
                        });
                        pull.pause = Some(pause);
                        return Some((Err(e), pull));
                    }
                }
            }
        });
        Ok(Box::pin(deliveries))
    }
}

/// Some messages of a [`SqsTransport::publish_batch`] were not accepted.
#[derive(Debug)]
pub struct BatchPublishError {
    /// How many messages the batch had.
    pub total: usize,
    /// The index of each message that was not sent, with the reason.
    pub failed: Vec<(usize, TransportError)>,
}

impl BatchPublishError {
    fn all(total: usize, e: TransportError) -> Self {
        let text = e.to_string();
        let kind = e.kind();
        BatchPublishError {
            total,
            failed: (0..total)
                .map(|i| (i, TransportError::new(kind, text.clone())))
                .collect(),
        }
    }
}

impl fmt::Display for BatchPublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} messages were not sent",
            self.failed.len(),
            self.total
        )?;
        if let Some((i, e)) = self.failed.first() {
            write!(f, " (first: message {i}: {e})")?;
        }
        Ok(())
    }
}

impl std::error::Error for BatchPublishError {}

/// The state of one subscription.
struct Pull {
    transport: SqsTransport,
    /// The name the subscriber used (without an implied `.fifo`).
    source: Arc<str>,
    queue: Arc<QueueInfo>,
    batcher: Batcher,
    prefetch: usize,
    permits: Arc<Semaphore>,
    buffer: VecDeque<Delivery>,
    pause: Option<Duration>,
}

impl Pull {
    /// One long-poll receive of as many messages as there are free prefetch
    /// slots (up to ten).
    async fn receive(&mut self) -> Result<(), TransportError> {
        let want = self.prefetch.min(BATCH);
        let mut permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("never closed");
        let gather = tokio::time::Instant::now() + GATHER;
        while permit.num_permits() < want {
            match tokio::time::timeout_at(gather, Arc::clone(&self.permits).acquire_owned()).await {
                Ok(Ok(more)) => permit.merge(more),
                _ => break,
            }
        }
        let config = &self.transport.inner.config;
        let wait = config.wait_time;
        let request = self
            .transport
            .inner
            .client
            .receive_message()
            .queue_url(&self.queue.url)
            .max_number_of_messages(permit.num_permits() as i32)
            .wait_time_seconds(secs_up(wait))
            .visibility_timeout(secs_up(self.queue.visibility))
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send();
        let limit = wait + config.receive_timeout_margin;
        let (transport, source, queue, batcher) = (
            self.transport.clone(),
            Arc::clone(&self.source),
            Arc::clone(&self.queue),
            self.batcher.clone(),
        );
        // In a task of its own: if the subscription is dropped while the long
        // poll is on the wire, what SQS hands out still becomes deliveries,
        // and dropping those makes the messages visible again at once rather
        // than after their visibility timeout (see `Orphanable`).
        let pending = Arc::clone(&self.transport.inner.pending);
        let task = tokio::spawn(async move {
            let out = with_timeout(limit, request).await.and_then(|r| {
                r.map_err(|e| sdk_error(e, &format!("receiving from {:?} failed", queue.name)))
            });
            let out = match out {
                Ok(out) => out,
                Err(e) => {
                    transport.inner.counters.receive(0);
                    if e.kind() == TransportErrorKind::NotFound {
                        transport.forget(&queue.name);
                    }
                    return Err(e);
                }
            };
            let received = Instant::now();
            let messages = out.messages();
            transport.inner.counters.receive(messages.len());
            let mut deliveries = Vec::with_capacity(messages.len());
            for message in messages {
                let Some(receipt) = message.receipt_handle() else {
                    continue;
                };
                let Some(slot) = permit.split(1) else {
                    // More than asked for (a non-conforming server): give
                    // the extra back.
                    tracing::warn!(queue = %queue.name, "SQS returned more messages than asked for; releasing the extra");
                    batcher.detach(receipt.to_owned(), Op::Visibility(0));
                    continue;
                };
                let attempt = message
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|n| n.parse::<u32>().ok())
                    .unwrap_or(1)
                    .max(1);
                let envelope = Arc::new(wire::decode(
                    message.body().unwrap_or_default(),
                    message.message_attributes(),
                ));
                let settler = SqsSettler {
                    transport: transport.clone(),
                    source: Arc::clone(&source),
                    queue: Arc::clone(&queue),
                    batcher: batcher.clone(),
                    receipt: Some(receipt.to_owned()),
                    envelope: Arc::clone(&envelope),
                    received,
                    deadline: received + queue.visibility,
                    _permit: slot,
                };
                deliveries.push(Delivery::received(
                    envelope,
                    attempt,
                    received,
                    Box::new(settler),
                ));
            }
            Ok(deliveries)
        });
        let deliveries = Orphanable::new(task, pending).await.map_err(|e| {
            TransportError::new(TransportErrorKind::Other, "the receive task failed").with_source(e)
        })??;
        if deliveries.is_empty() && wait < Duration::from_secs(1) {
            // Without long polling an empty queue would be a busy loop.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.buffer.extend(deliveries);
        Ok(())
    }
}

/// A receive task that, if the subscription is dropped while it runs, is
/// left to finish on its own: what it took is then released (its
/// deliveries are dropped) in the background, counted as pending work until
/// those releases are queued, each of which is counted until SQS answers.
/// `flush` waits for that; receives of live subscriptions are not counted.
struct Orphanable<T: Send + 'static> {
    task: Option<tokio::task::JoinHandle<T>>,
    pending: Arc<Pending>,
}

impl<T: Send + 'static> Orphanable<T> {
    fn new(task: tokio::task::JoinHandle<T>, pending: Arc<Pending>) -> Self {
        Orphanable {
            task: Some(task),
            pending,
        }
    }
}

impl<T: Send + 'static> std::future::Future for Orphanable<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let task = self.task.as_mut().expect("polled after completion");
        let out = std::task::ready!(std::pin::Pin::new(task).poll(cx));
        self.task = None;
        std::task::Poll::Ready(out)
    }
}

impl<T: Send + 'static> Drop for Orphanable<T> {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Counted from now until its output (the deliveries, whose drop
        // queues their releases) is gone.
        let busy = self.pending.busy();
        runtime.spawn(async move {
            drop(task.await);
            drop(busy);
        });
    }
}

fn detail_of(envelope: &Envelope) -> &str {
    envelope
        .headers
        .get(switchyard_core::header_names::DEAD_LETTER_DETAIL)
        .unwrap_or_default()
}

/// Settles one SQS message through its receipt handle.
struct SqsSettler {
    transport: SqsTransport,
    source: Arc<str>,
    queue: Arc<QueueInfo>,
    batcher: Batcher,
    /// `None` once settled.
    receipt: Option<String>,
    envelope: Arc<Envelope>,
    received: Instant,
    /// When the message becomes visible again unless extended.
    deadline: Instant,
    _permit: OwnedSemaphorePermit,
}

impl SqsSettler {
    /// The longest visibility SQS still allows for this message: twelve
    /// hours from its receipt.
    fn visibility_left(&self) -> Duration {
        MAX_VISIBILITY
            .saturating_sub(self.received.elapsed())
            .saturating_sub(Duration::from_secs(5))
    }

    async fn settle_now(mut self: Box<Self>, settlement: Settlement) -> Result<(), TransportError> {
        let receipt = self.receipt.take().expect("settled once");
        // Past its visibility timeout SQS may have handed it to another
        // consumer; deleting with this older receipt could remove that copy.
        if Instant::now() >= self.deadline {
            return Err(TransportError::new(
                TransportErrorKind::StaleDelivery,
                format!(
                    "the visibility timeout of this delivery from {:?} ran out; SQS redelivers it",
                    self.queue.name
                ),
            ));
        }
        match settlement {
            Settlement::Ack => self.batcher.settle(receipt, Op::Delete).await,
            Settlement::Retry { delay } => {
                let secs = secs_up(delay.min(self.visibility_left()));
                self.batcher.settle(receipt, Op::Visibility(secs)).await
            }
            Settlement::Release => self.batcher.settle(receipt, Op::Visibility(0)).await,
            Settlement::DeadLetter {
                reason,
                detail,
                attempts,
            } => {
                let mut envelope = Envelope::clone(&self.envelope);
                DeadLetterInfo {
                    reason,
                    detail,
                    attempts,
                    source: self.source.to_string(),
                    at: SystemTime::now(),
                }
                .write_to(&mut envelope.headers);
                // A FIFO dead-letter queue must not take this for a duplicate
                // of an earlier dead-lettering of the same message.
                let suffix = format!(
                    "-dl{}",
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_millis()
                );
                let mut sent = self
                    .transport
                    .send(&self.queue.dead_letter, &envelope, Some(&suffix))
                    .await;
                if matches!(&sent, Err(e) if e.kind() == TransportErrorKind::TooLarge) {
                    // The reason metadata pushed it over: keep the reason,
                    // shorten the detail.
                    let short: String = detail_of(&envelope).chars().take(200).collect();
                    envelope
                        .headers
                        .insert(switchyard_core::header_names::DEAD_LETTER_DETAIL, short);
                    sent = self
                        .transport
                        .send(&self.queue.dead_letter, &envelope, Some(&suffix))
                        .await;
                }
                if let Err(e) = sent {
                    // Not given back at once: it comes back when its
                    // visibility timeout ends, which spaces out the attempts
                    // while the dead-letter queue cannot take it.
                    return Err(TransportError::new(
                        e.kind(),
                        format!(
                            "cannot dead-letter to {:?}; {:?} redelivers the message when its visibility timeout ends",
                            self.queue.dead_letter, self.queue.name
                        ),
                    )
                    .with_source(e));
                }
                self.batcher.settle(receipt, Op::Delete).await
            }
        }
    }
}

impl Settler for SqsSettler {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(self.settle_now(settlement))
    }

    fn extend(&mut self, lease: Duration) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let left = self.visibility_left();
            let Some(receipt) = self.receipt.as_deref() else {
                return Err(TransportError::new(
                    TransportErrorKind::StaleDelivery,
                    "already settled",
                ));
            };
            if Instant::now() >= self.deadline {
                return Err(TransportError::new(
                    TransportErrorKind::StaleDelivery,
                    "the visibility timeout ran out before it was extended; SQS redelivers the message",
                ));
            }
            if left.is_zero() {
                return Err(TransportError::new(
                    TransportErrorKind::StaleDelivery,
                    "SQS allows no visibility timeout past 12 hours from receipt",
                ));
            }
            let secs = secs_up(lease.min(left));
            self.transport.inner.counters.change_visibility(1);
            let sent = Instant::now();
            let what = format!(
                "cannot extend the visibility of a message from {:?}",
                self.queue.name
            );
            let request = self
                .transport
                .inner
                .client
                .change_message_visibility()
                .queue_url(&self.queue.url)
                .receipt_handle(receipt)
                .visibility_timeout(secs)
                .send();
            with_timeout(self.transport.inner.config.request_timeout, request)
                .await?
                .map_err(|e| receipt_error(e, &what))?;
            self.deadline = sent + Duration::from_secs(secs as u64);
            Ok(())
        })
    }

    fn lease_deadline(&self) -> Option<Instant> {
        Some(self.deadline)
    }
}

impl Drop for SqsSettler {
    fn drop(&mut self) {
        // Dropped unsettled: make it visible now rather than at the end of
        // its visibility timeout (the receive already counted the attempt).
        // Past its deadline another consumer may hold it under a newer
        // receipt: leave it alone.
        if let Some(receipt) = self.receipt.take() {
            if Instant::now() < self.deadline {
                self.batcher.detach(receipt, Op::Visibility(0));
            }
        }
    }
}

impl SqsTransport {
    async fn stats_of(&self, queue: &str) -> Result<switchyard_core::QueueStats, TransportError> {
        let info = self.queue(queue).await?;
        let attributes = self.queue_attributes(&info.url).await?;
        let number = |key: QueueAttributeName| attributes.get(&key)?.parse::<u64>().ok();
        let mut stats = switchyard_core::QueueStats::default();
        stats.depth = match (
            number(QueueAttributeName::ApproximateNumberOfMessages),
            number(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        ) {
            (Some(a), b) => Some(a + b.unwrap_or(0)),
            (None, b) => b,
        };
        stats.in_flight = number(QueueAttributeName::ApproximateNumberOfMessagesNotVisible);
        Ok(stats)
    }
}

impl Transport for SqsTransport {
    /// Waits for the receives a dropped subscription left on the wire and
    /// for the releases of deliveries dropped unsettled: a process that
    /// exits before they are answered leaves those messages invisible until
    /// their visibility timeout ends.
    fn flush(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let config = &self.inner.config;
            let limit = config.wait_time + config.receive_timeout_margin + config.request_timeout;
            tokio::time::timeout(limit, self.inner.pending.idle())
                .await
                .map_err(|_| {
                    TransportError::new(
                        TransportErrorKind::Timeout,
                        format!(
                            "receives or releases still unanswered after {limit:?}; SQS makes those messages visible again when their visibility timeout ends"
                        ),
                    )
                })
        })
    }

    fn dead_letter_of(&self, queue: &str) -> String {
        let name = self.queue_name(queue);
        self.inner
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            .map(|q| q.dead_letter.clone())
            .unwrap_or_else(|| default_dead_letter(&name))
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
        caps.release_counts_attempt = true;
        caps.max_retry_delay = Some(MAX_VISIBILITY - Duration::from_secs(60));
        caps.fan_out = false;
        caps.max_payload = Some(self.max_payload());
        if self.inner.config.fifo {
            caps.ordering = OrderingSupport::PerKey;
            caps.deduplicates_publishes = true;
        } else {
            caps.ordering = OrderingSupport::None;
            caps.duplicates_without_failure = true;
        }
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
        Box::pin(async move {
            // A replay keeps its id: a FIFO queue must not drop it as a
            // duplicate of the original.
            let suffix = envelope
                .headers
                .get(switchyard_core::header_names::REPLAYED_AT)
                .map(|at| {
                    let digits: String = at.chars().filter(char::is_ascii_digit).collect();
                    format!("-r{digits}")
                });
            self.send(destination, &envelope, suffix.as_deref()).await
        })
    }

    fn subscribe<'a>(
        &'a self,
        source: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<DeliveryStream, TransportError>> {
        Box::pin(self.subscribe_to(source, options))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_round_up() {
        assert_eq!(secs_up(Duration::ZERO), 0);
        assert_eq!(secs_up(Duration::from_millis(1)), 1);
        assert_eq!(secs_up(Duration::from_millis(1000)), 1);
        assert_eq!(secs_up(Duration::from_millis(1001)), 2);
    }

    #[test]
    fn default_dead_letter_queues_keep_the_fifo_suffix() {
        assert_eq!(default_dead_letter("orders"), "orders-dlq");
        assert_eq!(default_dead_letter("orders.fifo"), "orders-dlq.fifo");
    }

    #[test]
    fn error_codes_are_classified() {
        assert_eq!(
            code_kind(Some("AWS.SimpleQueueService.NonExistentQueue")),
            TransportErrorKind::NotFound
        );
        assert_eq!(
            code_kind(Some("QueueDoesNotExist")),
            TransportErrorKind::NotFound
        );
        assert_eq!(
            code_kind(Some("ReceiptHandleIsInvalid")),
            TransportErrorKind::StaleDelivery
        );
        assert_eq!(
            code_kind(Some("InvalidClientTokenId")),
            TransportErrorKind::Config
        );
    }
}
