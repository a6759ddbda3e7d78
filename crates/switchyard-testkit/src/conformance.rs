//! The transport conformance suite.
//!
//! Each [`Case`] states one rule of the contract in `docs/architecture.md`
//! and checks it against a real broker through the [`Transport`] trait only.
//! A case returns a precise failure message instead of panicking, so that a
//! report lists every broken rule at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;
use switchyard_core::{
    Capabilities, Consumer, Context, DeadLetterInfo, DeadLetterReason, Delivery, DeliveryGuarantee,
    DeliveryStream, Envelope, HandleError, Headers, Message, MessageId, OrderingSupport, QueueSpec,
    Router, Settlement, SubscribeOptions, TopicSpec, Topology, TraceContext, Transport,
    TransportErrorKind,
};

/// Volumes and timings of the suite, per adapter.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SuiteConfig {
    /// Messages in the volume cases (competing consumers, concurrent
    /// consumption, fan-out). Default 1,000; slow brokers may use fewer.
    pub messages: usize,
    /// Lease of the queues in the lease cases. Default 1 s.
    pub lease: Duration,
    /// Delay asked for in the delayed-retry case. Default 1 s.
    pub retry_delay: Duration,
    /// How long to wait for an expected delivery. Default 15 s.
    pub receive_timeout: Duration,
    /// How long to watch for an unexpected delivery. Default 500 ms.
    pub quiet_period: Duration,
}

impl Default for SuiteConfig {
    fn default() -> Self {
        SuiteConfig {
            messages: 1000,
            lease: Duration::from_secs(1),
            retry_delay: Duration::from_secs(1),
            receive_timeout: Duration::from_secs(15),
            quiet_period: Duration::from_millis(500),
        }
    }
}

impl SuiteConfig {
    /// Sets the message count of the volume cases.
    pub fn messages(mut self, n: usize) -> Self {
        self.messages = n;
        self
    }

    /// Sets the lease of the lease cases.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets the delay of the delayed-retry case.
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// Sets how long to wait for an expected delivery.
    pub fn receive_timeout(mut self, timeout: Duration) -> Self {
        self.receive_timeout = timeout;
        self
    }

    /// Sets how long to watch for an unexpected delivery.
    pub fn quiet_period(mut self, period: Duration) -> Self {
        self.quiet_period = period;
        self
    }
}

/// How the suite reaches the broker under test.
pub trait Harness: Send + Sync {
    /// The adapter's transport.
    type Transport: Transport + Clone;

    /// A new handle to the broker under test. For networked brokers this
    /// should be a new client connection: the durable-publish case drops one
    /// right after publishing and reads with another.
    fn connect(&self) -> impl Future<Output = Self::Transport> + Send;

    /// Volumes and timings for this adapter.
    fn config(&self) -> SuiteConfig {
        SuiteConfig::default()
    }
}

/// One rule of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Case {
    /// Every envelope field, the headers and a binary payload survive a round trip.
    EnvelopeRoundTrip,
    /// `publish` returns only once the broker holds the message: a handle
    /// dropped right after publishing loses nothing.
    PublishIsDurable,
    /// Two subscriptions on one queue share its messages; nothing is lost,
    /// and nothing is delivered twice unless the adapter declares spurious
    /// duplicates.
    CompetingConsumers,
    /// Every subscription of a topic gets every message.
    FanOut,
    /// An acknowledged message is gone.
    AckRemoves,
    /// `Retry { delay }` redelivers no sooner than the delay, as attempt + 1.
    RetryWithDelay,
    /// `DeadLetter` lands in the dead-letter destination with reason, detail,
    /// attempts and source, and the original id, headers and body.
    DeadLetterKeepsMetadata,
    /// A delivery dropped unsettled is redelivered, as attempt + 1.
    DroppedIsRedelivered,
    /// `Release` gives the message back for redelivery.
    ReleaseRedelivers,
    /// 1,000 messages (per [`SuiteConfig::messages`]) through the consumer
    /// runtime with concurrency: each handled, none lost.
    ConcurrentConsumption,
    /// A payload at the declared maximum works; one byte more is refused
    /// with a `TooLarge` error.
    MaxPayload,
    /// Messages of one partition key arrive in publish order.
    PerKeyOrder,
    /// An extended lease keeps the message from redelivery; an expired one
    /// does not.
    LeaseExtension,
    /// Publishing to a destination that does not exist is an error, not a
    /// silent drop.
    UnknownDestination,
    /// A subscription holds no more unsettled deliveries than its prefetch.
    PrefetchIsRespected,
    /// A delivery stays settleable after its stream is dropped (the runtime
    /// drains in-flight work after it stops pulling).
    SettleAfterStreamDropped,
}

impl Case {
    /// Every case, in the order the suite runs them.
    pub const ALL: [Case; 16] = [
        Case::EnvelopeRoundTrip,
        Case::PublishIsDurable,
        Case::CompetingConsumers,
        Case::FanOut,
        Case::AckRemoves,
        Case::RetryWithDelay,
        Case::DeadLetterKeepsMetadata,
        Case::DroppedIsRedelivered,
        Case::ReleaseRedelivers,
        Case::ConcurrentConsumption,
        Case::MaxPayload,
        Case::PerKeyOrder,
        Case::LeaseExtension,
        Case::UnknownDestination,
        Case::PrefetchIsRespected,
        Case::SettleAfterStreamDropped,
    ];

    /// Why the case does not apply to a transport with `caps`, if it does not.
    pub fn skip_reason(self, caps: &Capabilities) -> Option<&'static str> {
        match self {
            Case::FanOut if !caps.fan_out => Some("no fan-out (topics)"),
            Case::RetryWithDelay if !caps.delayed_retry.is_supported() => Some("no delayed retry"),
            Case::DeadLetterKeepsMetadata if !caps.dead_letter.is_supported() => {
                Some("no dead-letter destination")
            }
            Case::DroppedIsRedelivered | Case::ReleaseRedelivers
                if !caps.redelivery.is_supported() =>
            {
                Some("no redelivery")
            }
            Case::PublishIsDurable if caps.guarantee == DeliveryGuarantee::AtMostOnce => {
                Some("at-most-once: nothing is held for a later subscriber")
            }
            Case::AckRemoves | Case::PrefetchIsRespected | Case::SettleAfterStreamDropped
                if caps.guarantee == DeliveryGuarantee::AtMostOnce =>
            {
                Some("at-most-once: nothing to acknowledge")
            }
            Case::MaxPayload if caps.max_payload.is_none() => Some("no payload limit"),
            Case::UnknownDestination if caps.guarantee == DeliveryGuarantee::AtMostOnce => {
                Some("at-most-once: publishing to nobody is allowed")
            }
            Case::PerKeyOrder if caps.ordering == OrderingSupport::None => Some("no ordering"),
            Case::LeaseExtension
                if !caps.lease_extension.is_supported() || !caps.redelivery.is_supported() =>
            {
                Some("no lease extension")
            }
            _ => None,
        }
    }
}

/// The result of one case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaseResult {
    /// The transport kept the rule.
    Passed,
    /// The transport's capabilities exclude the case.
    Skipped(&'static str),
    /// The transport broke the rule.
    Failed(String),
}

/// The results of a suite run.
#[derive(Clone, Debug)]
pub struct Report {
    /// Each case with its result, in run order.
    pub results: Vec<(Case, CaseResult)>,
}

impl Report {
    /// The cases that failed, with their messages.
    pub fn failures(&self) -> Vec<(Case, &str)> {
        self.results
            .iter()
            .filter_map(|(c, r)| match r {
                CaseResult::Failed(m) => Some((*c, m.as_str())),
                _ => None,
            })
            .collect()
    }

    /// The cases that were skipped, with the reason.
    pub fn skipped(&self) -> Vec<(Case, &'static str)> {
        self.results
            .iter()
            .filter_map(|(c, r)| match r {
                CaseResult::Skipped(why) => Some((*c, *why)),
                _ => None,
            })
            .collect()
    }

    /// Panics, listing every failure, unless no case failed. Skipped cases
    /// are printed to stderr.
    pub fn assert_passed(&self) {
        eprintln!("{self}");
        let failures = self.failures();
        assert!(
            failures.is_empty(),
            "{} conformance case(s) failed:\n{}",
            failures.len(),
            failures
                .iter()
                .map(|(c, m)| format!("  {c:?}: {m}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (mut passed, mut failed, mut skipped) = (0, 0, 0);
        for (case, result) in &self.results {
            match result {
                CaseResult::Passed => {
                    passed += 1;
                    writeln!(f, "conformance {case:?}: passed")?;
                }
                CaseResult::Skipped(why) => {
                    skipped += 1;
                    writeln!(f, "conformance {case:?}: SKIPPED ({why})")?;
                }
                CaseResult::Failed(msg) => {
                    failed += 1;
                    writeln!(f, "conformance {case:?}: FAILED: {msg}")?;
                }
            }
        }
        write!(
            f,
            "conformance: {passed} passed, {failed} failed, {skipped} skipped"
        )
    }
}

/// Runs every case against the broker behind `harness`.
pub async fn run_conformance<H: Harness>(harness: &H) -> Report {
    let mut results = Vec::with_capacity(Case::ALL.len());
    for case in Case::ALL {
        let started = Instant::now();
        let result = run_case(harness, case).await;
        eprintln!(
            "conformance {case:?}: {result:?} in {:?}",
            started.elapsed()
        );
        results.push((case, result));
    }
    Report { results }
}

/// Runs one case.
pub async fn run_case<H: Harness>(harness: &H, case: Case) -> CaseResult {
    let transport = harness.connect().await;
    let caps = transport.capabilities();
    if let Some(why) = case.skip_reason(&caps) {
        return CaseResult::Skipped(why);
    }
    let cx = CaseCx {
        config: harness.config(),
        caps,
        prefix: format!(
            "sy-conf-{}-{}",
            case_slug(case),
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        ),
    };
    let limit = cx.config.receive_timeout * 4 + Duration::from_secs(60);
    let run = async {
        match case {
            Case::EnvelopeRoundTrip => envelope_round_trip(&cx, &transport).await,
            Case::PublishIsDurable => publish_is_durable(&cx, harness, &transport).await,
            Case::CompetingConsumers => competing_consumers(&cx, &transport).await,
            Case::FanOut => fan_out(&cx, &transport).await,
            Case::AckRemoves => ack_removes(&cx, &transport).await,
            Case::RetryWithDelay => retry_with_delay(&cx, &transport).await,
            Case::DeadLetterKeepsMetadata => dead_letter_keeps_metadata(&cx, &transport).await,
            Case::DroppedIsRedelivered => dropped_is_redelivered(&cx, &transport).await,
            Case::ReleaseRedelivers => release_redelivers(&cx, &transport).await,
            Case::ConcurrentConsumption => concurrent_consumption(&cx, &transport).await,
            Case::MaxPayload => max_payload(&cx, &transport).await,
            Case::PerKeyOrder => per_key_order(&cx, &transport).await,
            Case::LeaseExtension => lease_extension(&cx, &transport).await,
            Case::UnknownDestination => unknown_destination(&cx, &transport).await,
            Case::PrefetchIsRespected => prefetch_is_respected(&cx, &transport).await,
            Case::SettleAfterStreamDropped => settle_after_stream_dropped(&cx, &transport).await,
        }
    };
    match tokio::time::timeout(limit, run).await {
        Ok(Ok(())) => CaseResult::Passed,
        Ok(Err(msg)) => CaseResult::Failed(msg),
        Err(_) => CaseResult::Failed(format!("did not finish within {limit:?}")),
    }
}

fn case_slug(case: Case) -> String {
    let name = format!("{case:?}");
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

struct CaseCx {
    config: SuiteConfig,
    caps: Capabilities,
    prefix: String,
}

impl CaseCx {
    fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.prefix)
    }

    fn expects_count(&self) -> bool {
        self.caps.delivery_count.is_supported()
    }
}

type CaseOutcome = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

async fn declare_queue(t: &impl Transport, spec: QueueSpec) -> Result<String, String> {
    let name = spec.name.clone();
    t.declare(&Topology::new().queue(spec))
        .await
        .map_err(|e| format!("declaring queue {name}: {e}"))?;
    Ok(name)
}

async fn subscribe(
    t: &impl Transport,
    source: &str,
    prefetch: usize,
) -> Result<DeliveryStream, String> {
    t.subscribe(source, SubscribeOptions::default().prefetch(prefetch))
        .await
        .map_err(|e| format!("subscribing to {source}: {e}"))
}

async fn publish(t: &impl Transport, destination: &str, env: Envelope) -> CaseOutcome {
    t.publish(destination, env)
        .await
        .map_err(|e| format!("publishing to {destination}: {e}"))
}

/// The next delivery, or an error after `timeout`.
async fn recv(
    stream: &mut DeliveryStream,
    timeout: Duration,
    what: &str,
) -> Result<Delivery, String> {
    match tokio::time::timeout(timeout, stream.next()).await {
        Ok(Some(Ok(d))) => Ok(d),
        Ok(Some(Err(e))) => Err(format!("waiting for {what}: subscription error: {e}")),
        Ok(None) => Err(format!("waiting for {what}: subscription ended")),
        Err(_) => Err(format!("{what} did not arrive within {timeout:?}")),
    }
}

/// Succeeds if nothing arrives for `period`; hands back an unexpected delivery
/// in the error message.
async fn expect_quiet(stream: &mut DeliveryStream, period: Duration, why: &str) -> CaseOutcome {
    match tokio::time::timeout(period, stream.next()).await {
        Err(_) => Ok(()),
        Ok(Some(Ok(d))) => Err(format!(
            "{why}, but message {} arrived (attempt {})",
            d.envelope().id,
            d.attempt()
        )),
        Ok(Some(Err(e))) => Err(format!("{why}, but the subscription failed: {e}")),
        Ok(None) => Err(format!(
            "{why}; the check could not be made because the subscription ended"
        )),
    }
}

async fn settle(d: Delivery, s: Settlement) -> CaseOutcome {
    let label = format!("{s:?}");
    d.settle(s)
        .await
        .map_err(|e| format!("settling with {label}: {e}"))
}

fn millis(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

/// Message `n` of a volume case. Each has its own partition key: the cases
/// that are not about ordering must not be held up by a broker that keeps
/// per-key order (an SQS FIFO queue delivers nothing more of a group while
/// one of its messages is unsettled).
fn numbered(kind: &str, n: usize) -> Envelope {
    Envelope::new(kind, Bytes::from(n.to_string()))
        .with_header("conformance-seq", n.to_string())
        .with_partition_key(format!("k{n}"))
}

fn seq_of(d: &Delivery) -> Result<usize, String> {
    d.envelope()
        .headers
        .get("conformance-seq")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            format!(
                "message {} lost its conformance-seq header",
                d.envelope().id
            )
        })
}

async fn envelope_round_trip(cx: &CaseCx, t: &impl Transport) -> CaseOutcome {
    let queue = declare_queue(t, QueueSpec::new(cx.name("q"))).await?;
    let payload: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let mut headers = Headers::new();
    headers.insert("x-custom", "value with spaces and ünïcode");
    headers.insert("x-empty", "");
    let now = SystemTime::now();
    let sent = Envelope {
        id: MessageId::new(),
        kind: "conformance.round-trip".into(),
        schema_version: 7,
        occurred_at: now - Duration::from_millis(1234),
        correlation_id: Some("corr-1".into()),
        causation_id: Some("cause-1".into()),
        producer: Some("conformance-suite".into()),
        partition_key: Some("key-1".into()),
        tenant: Some("tenant-1".into()),
        deadline: Some(now + Duration::from_secs(3600)),
        reply_to: Some("replies".into()),
        trace: TraceContext {
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            tracestate: Some("vendor=value".into()),
        },
        content_type: Some("application/octet-stream".into()),
        headers,
        payload: Bytes::from(payload),
    };
    let mut stream = subscribe(t, &queue, 1).await?;
    publish(t, &queue, sent.clone()).await?;
    let got = recv(
        &mut stream,
        cx.config.receive_timeout,
        "the round-trip message",
    )
    .await?;
    let env = got.envelope().clone();
    let mut diffs = Vec::new();
    macro_rules! same {
        ($($field:ident).+) => {
            if env.$($field).+ != sent.$($field).+ {
                diffs.push(format!(
                    "{}: sent {:?}, got {:?}",
                    stringify!($($field).+),
                    sent.$($field).+,
                    env.$($field).+
                ));
            }
        };
    }
    same!(id);
    same!(kind);
    same!(schema_version);
    same!(correlation_id);
    same!(causation_id);
    same!(producer);
    same!(partition_key);
    same!(tenant);
    same!(reply_to);
    same!(trace.traceparent);
    same!(trace.tracestate);
    same!(content_type);
    same!(payload);
    for (k, v) in sent.headers.iter() {
        if env.headers.get(k) != Some(v) {
            diffs.push(format!(
                "header {k}: sent {v:?}, got {:?}",
                env.headers.get(k)
            ));
        }
    }
    if millis(env.occurred_at) != millis(sent.occurred_at) {
        diffs.push(format!(
            "occurred_at: sent {} ms, got {} ms",
            millis(sent.occurred_at),
            millis(env.occurred_at)
        ));
    }
    if env.deadline.map(millis) != sent.deadline.map(millis) {
        diffs.push(format!(
            "deadline: sent {:?} ms, got {:?} ms",
            sent.deadline.map(millis),
            env.deadline.map(millis)
        ));
    }
    settle(got, Settlement::Ack).await?;
    ensure!(
        diffs.is_empty(),
        "envelope changed in transit: {}",
        diffs.join("; ")
    );
    Ok(())
}

async fn publish_is_durable<H: Harness>(cx: &CaseCx, h: &H, reader: &H::Transport) -> CaseOutcome {
    let queue = declare_queue(reader, QueueSpec::new(cx.name("q"))).await?;
    let n = cx.config.messages.min(100);
    let mut ids = HashSet::new();
    // A handle of its own, dropped right after the last publish returned:
    // whatever it had only buffered is lost with it.
    let writer = h.connect().await;
    for i in 0..n {
        let env = numbered("conformance.durable", i);
        ids.insert(env.id.clone());
        publish(&writer, &queue, env).await?;
    }
    drop(writer);
    let mut stream = subscribe(reader, &queue, 16).await?;
    while !ids.is_empty() {
        let d = recv(
            &mut stream,
            cx.config.receive_timeout,
            &format!(
                "{} of {n} messages published by a dropped handle",
                ids.len()
            ),
        )
        .await?;
        ids.remove(&d.envelope().id);
        settle(d, Settlement::Ack).await?;
    }
    Ok(())
}

async fn competing_consumers(cx: &CaseCx, t: &impl Transport) -> CaseOutcome {
    let queue = declare_queue(t, QueueSpec::new(cx.name("q"))).await?;
    let n = cx.config.messages;
    let a = subscribe(t, &queue, 8).await?;
    let b = subscribe(t, &queue, 8).await?;
    let mut sent = HashSet::new();
    for i in 0..n {
        let env = numbered("conformance.competing", i);
        sent.insert(env.id.clone());
        publish(t, &queue, env).await?;
    }
    let seen: Arc<Mutex<Vec<(usize, MessageId)>>> = Arc::default();
    let drain = |mut stream: DeliveryStream, who: usize| {
        let seen = Arc::clone(&seen);
        let quiet = cx.config.quiet_period;
        let timeout = cx.config.receive_timeout;
        async move {
            let started = Instant::now();
            loop {
                match tokio::time::timeout(quiet, stream.next()).await {
                    Ok(Some(Ok(d))) => {
                        seen.lock().unwrap().push((who, d.envelope().id.clone()));
                        d.ack().await.map_err(|e| format!("ack: {e}"))?;
                    }
                    Ok(Some(Err(e))) => return Err(format!("subscription error: {e}")),
                    Ok(None) => return Ok::<_, String>(()),
                    // Quiet for a while: done once everything arrived (and no
                    // duplicate followed), or when waiting longer is pointless.
                    Err(_) => {
                        if distinct(&seen.lock().unwrap()) >= n || started.elapsed() > timeout * 4 {
                            return Ok(());
                        }
                    }
                }
            }
        }
    };
    let (ra, rb) = tokio::join!(drain(a, 0), drain(b, 1));
    ra?;
    rb?;
    let seen = seen.lock().unwrap().clone();
    let mut counts: HashMap<&MessageId, usize> = HashMap::new();
    for (_, id) in &seen {
        *counts.entry(id).or_default() += 1;
    }
    let lost = sent.iter().filter(|id| !counts.contains_key(id)).count();
    ensure!(
        lost == 0,
        "{lost} of {n} messages were never delivered to either consumer"
    );
    let twice = counts.values().filter(|c| **c > 1).count();
    ensure!(
        twice == 0 || cx.caps.duplicates_without_failure,
        "{twice} messages were delivered more than once although nothing failed"
    );
    // Spurious duplicates are the exception, not a copy per consumer.
    ensure!(
        twice * 100 <= n,
        "{twice} of {n} messages were delivered more than once: more than the 1% an at-least-once broker may duplicate"
    );
    for who in 0..2 {
        ensure!(
            seen.iter().any(|(w, _)| *w == who),
            "consumer {who} received nothing: the two subscriptions do not share the queue"
        );
    }
    Ok(())
}

fn distinct(seen: &[(usize, MessageId)]) -> usize {
    seen.iter().map(|(_, id)| id).collect::<HashSet<_>>().len()
}

async fn fan_out(cx: &CaseCx, t: &impl Transport) -> CaseOutcome {
    let topic = cx.name("topic");
    let (qa, qb) = (cx.name("sub-a"), cx.name("sub-b"));
    t.declare(
        &Topology::new()
            .queue(QueueSpec::new(&qa))
            .queue(QueueSpec::new(&qb))
            .topic(TopicSpec::new(&topic).subscription(&qa).subscription(&qb)),
    )
    .await
    .map_err(|e| format!("declaring topic: {e}"))?;
    // Subscribed first: an at-most-once transport delivers only to those
    // listening when a message is published.
    let mut streams = vec![
        (qa.clone(), subscribe(t, &qa, 32).await?),
        (qb.clone(), subscribe(t, &qb, 32).await?),
    ];
    let n = cx.config.messages.min(200);
    let mut sent = HashSet::new();
    for i in 0..n {
        let env = numbered("conformance.fan-out", i);
        sent.insert(env.id.clone());
        publish(t, &topic, env).await?;
    }
    for (q, stream) in &mut streams {
        let mut missing = sent.clone();
        while !missing.is_empty() {
            let d = recv(
                stream,
                cx.config.receive_timeout,
                &format!("{} of {n} messages on subscription {q}", missing.len()),
            )
            .await?;
            missing.remove(&d.envelope().id);
            settle(d, Settlement::Ack).await?;
        }
    }
    Ok(())
}

async fn ack_removes(cx: &CaseCx, t: &impl Transport) -> CaseOutcome {
    let queue = declare_queue(t, QueueSpec::new(cx.name("q")).lease(cx.config.lease)).await?;
    publish(t, &queue, Envelope::new("conformance.ack", "x")).await?;
    let mut stream = subscribe(t, &queue, 1).await?;
    let d = recv(&mut stream, cx.config.receive_timeout, "the message").await?;
    settle(d, Settlement::Ack).await?;
    // Closing the subscription gives back anything unacknowledged; an acked
    // message must not come back, not even after its lease would have expired.
    drop(stream);
    let mut stream = subscribe(t, &queue, 1).await?;
    expect_quiet(
        &mut stream,
        cx.config.quiet_period.max(cx.config.lease * 2),
        "the message was acknowledged",
    )
    .await
}

async fn retry_with_delay(cx: &CaseCx, t: &impl Transport) -> CaseOutcome {
    let queue = declare_queue(t, QueueSpec::new(cx.name("q"))).await?;
    // Different partition keys: only a message of another key may pass one
    // that waits for its retry (per-key order holds the rest back).
    let sent = Envelope::new("conformance.retry", "x").with_partition_key("retried");
    publish(t, &queue, sent.clone()).await?;
    let mut stream = subscribe(t, &queue, 4).await?;
    let first = recv(&mut stream, cx.config.receive_timeout, "the first delivery").await?;
    let first_attempt = first.attempt();
    let delay = cx.config.retry_delay;
    let settled_at = Instant::now();
    settle(first, Settlement::Retry { delay }).await?;
    let settle_took = settled_at.elapsed();
    ensure!(
        settle_took < delay / 2,
        "settling a retry took {settle_took:?}: the delay must be held by the broker, not waited out in the consumer"
    );
    // A message published during the delay is not held up behind it.
    let other = Envelope::new("conformance.retry-other", "y").with_partition_key("other");
    publish(t, &queue, other).await?;
    let next = recv(
        &mut stream,
        cx.config.receive_timeout + delay,
        "the message published during the delay",
    )
    .await?;
    if next.envelope().id == sent.id {
        return Err(format!(
            "the retried message came back after {:?}, ahead of a message published during its {delay:?} delay",
            settled_at.elapsed()
        ));
    }
    settle(next, Settlement::Ack).await?;
    let again = recv(
        &mut stream,
        cx.config.receive_timeout + delay,
        "the retried delivery",
    )
    .await?;
    let waited = settled_at.elapsed();
    ensure!(
        again.envelope().id == sent.id,
        "a different message arrived"
    );
    ensure!(
        waited >= delay,
        "redelivered after {waited:?}, sooner than the {delay:?} asked for"
    );
    if cx.expects_count() {
        ensure!(
            again.attempt() == first_attempt + 1,
            "attempt went from {first_attempt} to {}, not +1",
            again.attempt()
        );
    }
    settle(again, Settlement::Ack).await
}

async fn dead_letter_keeps_metadata(cx: &CaseCx, t: &impl Transport) -> CaseOutcome {
    let dlq = cx.name("dlq");
    let queue = declare_queue(
        t,
        QueueSpec::new(cx.name("q"))
            .dead_letter(&dlq)
            .lease(cx.config.lease),
    )
    .await?;
    let sent = Envelope::new("conformance.poison", Bytes::from_static(b"\x00poison\xff"))
        .with_correlation_id("corr-dl")
        .with_header("x-original", "kept");
    publish(t, &queue, sent.clone()).await?;
    let mut stream = subscribe(t, &queue, 1).await?;
    let d = recv(&mut stream, cx.config.receive_timeout, "the poison message").await?;
    settle(
        d,
        Settlement::DeadLetter {
            reason: DeadLetterReason::MaxAttempts,
            detail: "boom: database said no".into(),
            attempts: 3,
        },
    )
    .await?;
    let mut dead = subscribe(t, &dlq, 1).await?;
    let got = recv(
        &mut dead,
        cx.config.receive_timeout,
        "the dead-lettered message",
    )
    .await?;
    let env = got.envelope().clone();
    settle(got, Settlement::Ack).await?;
    ensure!(
        env.id == sent.id,
        "dead-letter id {} is not the original {}",
        env.id,
        sent.id
    );
    ensure!(
        env.kind == sent.kind,
        "dead-letter type {:?} changed",
        env.kind
    );
    ensure!(env.payload == sent.payload, "dead-letter body changed");
    ensure!(
        env.correlation_id == sent.correlation_id,
        "correlation id was lost"
    );
    ensure!(
        env.headers.get("x-original") == Some("kept"),
        "original header x-original was lost"
    );
    let info = DeadLetterInfo::read_from(&env.headers)
        .ok_or("the dead-lettered message has no reason metadata")?;
    ensure!(
        info.reason == DeadLetterReason::MaxAttempts,
        "reason is {:?}",
        info.reason
    );
    ensure!(
        info.detail == "boom: database said no",
        "detail is {:?}",
        info.detail
    );
    ensure!(info.attempts == 3, "attempts is {}", info.attempts);
    ensure!(
        info.source == queue,
        "source is {:?}, not {queue:?}",
        info.source
    );
    let age = SystemTime::now()
        .duration_since(info.at)
        .unwrap_or_default();
    ensure!(
        age < Duration::from_secs(300),
        "dead-letter time {age:?} ago is not plausible"
    );
    // The original is gone, not merely invisible until its lease runs out.
    drop(stream);
    let mut stream = subscribe(t, &queue, 1).await?;
    expect_quiet(
        &mut stream,
        cx.config.quiet_period.max(cx.config.lease * 2),
        "the message was dead-lettered",
    )
    .await
}

async fn dropped_is_redelivered(cx: &CaseCx, t: &impl Transport) -> CaseOutcome {
    let queue = declare_queue(t, QueueSpec::new(cx.name("q")).lease(cx.config.lease)).await?;
    let sent = Envelope::new("conformance.dropped", "x");
    publish(t, &queue, sent.clone()).await?;
    let mut stream = subscribe(t, &queue, 1).await?;
    let first = recv(&mut stream, cx.config.receive_timeout, "the first delivery").await?;
    let first_attempt = first.attempt();
    drop(first);
    let again = recv(
        &mut stream,
        cx.config.receive_timeout + cx.config.lease,
        "the redelivery of a dropped delivery",
    )
    .await?;
    ensure!(
        again.envelope().id == sent.id,
        "a different message arrived"
    );
    if cx.expects_count() {
        ensure!(
            again.attempt() == first_attempt + 1,
            "attempt went from {first_attempt} to {}, not +1",
            again.attempt()
        );
    }
    settle(again, Settlement::Ack).await
}

async fn release_redelivers(cx: &CaseCx, t: &impl Transport) -> CaseOutcome {
    let queue = declare_queue(t, QueueSpec::new(cx.name("q"))).await?;
    let sent = Envelope::new("conformance.release", "x");
    publish(t, &queue, sent.clone()).await?;
    let mut stream = subscribe(t, &queue, 1).await?;
    let first = recv(&mut stream, cx.config.receive_timeout, "the first delivery").await?;
    let first_attempt = first.attempt();
    settle(first, Settlement::Release).await?;
    let again = recv(
        &mut stream,
        cx.config.receive_timeout,
        "the released message",
    )
    .await?;
    ensure!(
        again.envelope().id == sent.id,
        "a different message arrived"
    );
    if cx.expects_count() && !cx.caps.release_counts_attempt {
        ensure!(
            again.attempt() == first_attempt,
            "a release counted as an attempt ({first_attempt} -> {}), though the transport declares it does not",
            again.attempt()
        );
    }
    settle(again, Settlement::Ack).await
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Ping {
    n: usize,
}

impl Message for Ping {
    const TYPE: &'static str = "switchyard.conformance.ping";
}

async fn concurrent_consumption(cx: &CaseCx, t: &(impl Transport + Clone)) -> CaseOutcome {
    let queue = declare_queue(t, QueueSpec::new(cx.name("q"))).await?;
    let n = cx.config.messages;
    let handled: Arc<Mutex<Vec<usize>>> = Arc::default();
    let router = Router::builder()
        .route({
            let handled = Arc::clone(&handled);
            move |msg: Ping, _cx: Context| {
                let handled = Arc::clone(&handled);
                async move {
                    // Yield so that handlers really overlap.
                    tokio::task::yield_now().await;
                    handled.lock().unwrap().push(msg.n);
                    Ok::<_, HandleError>(())
                }
            }
        })
        .build();
    let consumer = Consumer::builder(t.clone(), queue.clone())
        .concurrency(32)
        .serve(router)
        .spawn();
    consumer.subscribed().await;
    for i in 0..n {
        let payload = json!({ "n": i }).to_string();
        publish(t, &queue, Envelope::new(Ping::TYPE, payload)).await?;
    }
    let deadline = Instant::now() + cx.config.receive_timeout * 4;
    let distinct_handled = || handled.lock().unwrap().iter().collect::<HashSet<_>>().len();
    while distinct_handled() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Give stray duplicates a chance to show.
    tokio::time::sleep(cx.config.quiet_period).await;
    let report = consumer
        .shutdown()
        .await
        .map_err(|e| format!("consumer failed: {e}"))?;
    let handled = handled.lock().unwrap().clone();
    let distinct: HashSet<usize> = handled.iter().copied().collect();
    let lost = (0..n).filter(|i| !distinct.contains(i)).count();
    ensure!(
        lost == 0,
        "{lost} of {n} messages were never handled ({report:?})"
    );
    ensure!(
        handled.len() == n || cx.caps.duplicates_without_failure,
        "{} handler calls for {n} messages although nothing failed",
        handled.len()
    );
    ensure!(
        report.acked as usize >= n,
        "only {} of {n} acknowledged",
        report.acked
    );
    ensure!(
        report.dead_lettered == 0 && report.retried == 0 && report.settle_failed == 0,
        "unexpected failures: {report:?}"
    );
    Ok(())
}

async fn max_payload(cx: &CaseCx, t: &impl Transport) -> CaseOutcome {
    let max = cx.caps.max_payload.expect("skipped without a limit");
    let queue = declare_queue(t, QueueSpec::new(cx.name("q"))).await?;
    let mut stream = subscribe(t, &queue, 1).await?;
    let at_max = Bytes::from(vec![b'm'; max]);
    // With ordinary metadata: the declared limit must hold for real messages.
    let envelope = Envelope::new("conformance.max", at_max.clone())
        .with_correlation_id("corr-max")
        .with_header("x-tenant-region", "eu-west")
        .with_header("x-request", "r-0001");
    publish(t, &queue, envelope).await.map_err(|e| {
        format!("a payload of exactly the declared maximum ({max} bytes) was refused: {e}")
    })?;
    match t
        .publish(
            &queue,
            Envelope::new("conformance.max", vec![b'x'; max + 1]),
        )
        .await
    {
        Ok(()) => {
            return Err(format!(
                "a payload of {} bytes, over the declared maximum, was accepted",
                max + 1
            ))
        }
        Err(e) => ensure!(
            e.kind() == TransportErrorKind::TooLarge,
            "an oversized payload was refused with kind {:?}, not TooLarge: {e}",
            e.kind()
        ),
    }
    let d = recv(
        &mut stream,
        cx.config.receive_timeout,
        "the maximum-size message",
    )
    .await?;
    ensure!(
        d.envelope().payload == at_max,
        "the maximum-size payload changed in transit"
    );
    settle(d, Settlement::Ack).await?;
    expect_quiet(
        &mut stream,
        cx.config.quiet_period,
        "the oversized message was refused",
    )
    .await
}

async fn per_key_order(cx: &CaseCx, t: &impl Transport) -> CaseOutcome {
    let queue = declare_queue(t, QueueSpec::new(cx.name("q"))).await?;
    let n = cx.config.messages.min(300);
    let keys = ["k-a", "k-b", "k-c"];
    let mut stream = subscribe(t, &queue, 1).await?;
    for i in 0..n {
        let env = numbered("conformance.ordered", i).with_partition_key(keys[i % keys.len()]);
        publish(t, &queue, env).await?;
    }
    let mut last: BTreeMap<String, usize> = BTreeMap::new();
    for received in 0..n {
        let d = recv(
            &mut stream,
            cx.config.receive_timeout,
            &format!("message {} of {n}", received + 1),
        )
        .await?;
        let seq = seq_of(&d)?;
        if cx.caps.ordering == OrderingSupport::PerSource {
            ensure!(
                seq == received,
                "message {seq} arrived in position {received}: the source is not in publish order"
            );
        }
        let key = d
            .envelope()
            .partition_key
            .clone()
            .ok_or("the partition key was lost")?;
        if let Some(prev) = last.insert(key.clone(), seq) {
            ensure!(prev < seq, "key {key}: message {seq} arrived after {prev}");
        }
        settle(d, Settlement::Ack).await?;
    }
    Ok(())
}

async fn lease_extension(cx: &CaseCx, t: &impl Transport) -> CaseOutcome {
    let lease = cx.config.lease;
    let queue = declare_queue(t, QueueSpec::new(cx.name("q")).lease(lease)).await?;
    let sent = Envelope::new("conformance.lease", "x");
    publish(t, &queue, sent.clone()).await?;
    let mut stream = subscribe(t, &queue, 1).await?;
    let mut held = recv(&mut stream, cx.config.receive_timeout, "the leased message").await?;
    ensure!(
        held.lease_deadline().is_some(),
        "the transport declares lease extension, but a delivery from a queue with a lease has no lease deadline"
    );
    let mut other = subscribe(t, &queue, 1).await?;
    // Hold it for three leases, extending every third of one.
    let until = Instant::now() + lease * 3;
    while Instant::now() < until {
        held.extend(lease)
            .await
            .map_err(|e| format!("extending the lease: {e}"))?;
        expect_quiet(&mut other, lease / 3, "the lease was being extended").await?;
    }
    // Stop extending: the lease runs out and the message comes back.
    let again = recv(
        &mut other,
        lease * 3 + cx.config.receive_timeout,
        "the message after its lease expired",
    )
    .await?;
    ensure!(
        again.envelope().id == sent.id,
        "a different message arrived"
    );
    if cx.expects_count() {
        ensure!(
            again.attempt() >= 2,
            "the redelivery after lease expiry is attempt {}",
            again.attempt()
        );
    }
    // The first holder's settlement comes too late: a typed error (or a
    // harmless success), never a hang, and it must not remove the copy that
    // is now in someone else's hands.
    match tokio::time::timeout(cx.config.receive_timeout, held.settle(Settlement::Ack)).await {
        Err(_) => return Err("settling a delivery whose lease had run out hung".into()),
        Ok(Err(e)) => ensure!(
            e.kind() == TransportErrorKind::StaleDelivery,
            "settling an expired delivery failed with kind {:?}, not StaleDelivery: {e}",
            e.kind()
        ),
        Ok(Ok(())) => {}
    }
    settle(again, Settlement::Release).await?;
    let last = recv(
        &mut other,
        cx.config.receive_timeout,
        "the message after the stale ack",
    )
    .await
    .map_err(|e| format!("a stale ack removed the redelivered copy: {e}"))?;
    ensure!(last.envelope().id == sent.id, "a different message arrived");
    settle(last, Settlement::Ack).await
}

async fn unknown_destination(cx: &CaseCx, t: &impl Transport) -> CaseOutcome {
    let nowhere = cx.name("does-not-exist");
    match t
        .publish(&nowhere, Envelope::new("conformance.lost", "x"))
        .await
    {
        Ok(()) => Err(format!(
            "publishing to undeclared {nowhere:?} succeeded: the message would be silently lost"
        )),
        Err(e) => {
            ensure!(
                e.kind() == TransportErrorKind::NotFound,
                "publishing to an undeclared destination failed with kind {:?}, not NotFound: {e}",
                e.kind()
            );
            Ok(())
        }
    }
}

async fn prefetch_is_respected(cx: &CaseCx, t: &impl Transport) -> CaseOutcome {
    let queue = declare_queue(t, QueueSpec::new(cx.name("q"))).await?;
    for i in 0..5 {
        publish(t, &queue, numbered("conformance.prefetch", i)).await?;
    }
    let mut stream = subscribe(t, &queue, 2).await?;
    let a = recv(&mut stream, cx.config.receive_timeout, "the first delivery").await?;
    let b = recv(
        &mut stream,
        cx.config.receive_timeout,
        "the second delivery",
    )
    .await?;
    expect_quiet(
        &mut stream,
        cx.config.quiet_period,
        "two deliveries were unsettled with a prefetch of 2",
    )
    .await?;
    settle(a, Settlement::Ack).await?;
    let c = recv(
        &mut stream,
        cx.config.receive_timeout,
        "a delivery once one was settled",
    )
    .await?;
    for d in [b, c] {
        settle(d, Settlement::Ack).await?;
    }
    Ok(())
}

async fn settle_after_stream_dropped(cx: &CaseCx, t: &impl Transport) -> CaseOutcome {
    let queue = declare_queue(t, QueueSpec::new(cx.name("q")).lease(cx.config.lease)).await?;
    publish(t, &queue, Envelope::new("conformance.drained", "x")).await?;
    let mut stream = subscribe(t, &queue, 1).await?;
    let d = recv(&mut stream, cx.config.receive_timeout, "the message").await?;
    drop(stream);
    d.settle(Settlement::Ack)
        .await
        .map_err(|e| format!("acknowledging after the stream was dropped: {e}"))?;
    let mut stream = subscribe(t, &queue, 1).await?;
    expect_quiet(
        &mut stream,
        cx.config.quiet_period.max(cx.config.lease * 2),
        "the message was acknowledged after its stream was dropped",
    )
    .await
}
