//! The consumer: one source, bounded in-flight work, settlement from the
//! pipeline's outcome, graceful drain.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::Service;

use super::{Incoming, Publisher};
use crate::envelope::{Envelope, MessageId};
use crate::outcome::{DeadLetterReason, Outcome};
use crate::router::panic_message;
use crate::transport::{
    BoxError, BoxFuture, Delivery, Settlement, Settler, Settling, SubscribeOptions, Transport,
    TransportError, TransportErrorKind,
};

/// Configures a [`Consumer`].
///
/// ```no_run
/// # async fn demo(transport: std::sync::Arc<dyn switchyard_core::Transport>, router: switchyard_core::Router) {
/// use std::time::Duration;
/// use switchyard_core::Consumer;
///
/// let handle = Consumer::builder(transport, "orders")
///     .concurrency(32)
///     .max_attempts(5)
///     .drain_timeout(Duration::from_secs(10))
///     .serve(router)
///     .spawn();
/// // ... later, on SIGTERM:
/// let report = handle.shutdown().await.unwrap();
/// println!("{report:?}");
/// # }
/// ```
pub struct ConsumerBuilder {
    transport: Arc<dyn Transport>,
    source: Arc<str>,
    concurrency: usize,
    max_attempts: u32,
    drain_timeout: Duration,
    producer: Option<Arc<str>>,
}

impl ConsumerBuilder {
    /// At most `n` deliveries in flight (pulled and not yet settled); also
    /// the subscription's prefetch. Default 32.
    ///
    /// In-flight deliveries run concurrently on the consumer's own task
    /// (no task per message): they interleave at `.await` points, so a
    /// handler must not block its thread. CPU-heavy work belongs in
    /// `tokio::task::spawn_blocking` or a worker pool; several consumers of
    /// one source spread over several cores.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The attempt budget: a delivery whose handler failed transiently on
    /// attempt `n` is dead-lettered (`max-attempts`) instead of retried, and
    /// one that arrives with an attempt above `n` (its earlier attempts never
    /// settled, e.g. it crashed the process) is dead-lettered without running
    /// the handler. Default 5.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// How long shutdown waits for in-flight handlers before cancelling them
    /// and releasing their deliveries. Default 30 s.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// The producer name stamped on messages published from handlers.
    pub fn producer(mut self, name: impl Into<Arc<str>>) -> Self {
        self.producer = Some(name.into());
        self
    }

    /// Finishes the consumer with the canonical middleware stack
    /// ([`Stack`](crate::middleware::Stack) with its defaults) around
    /// `router`: metrics, trace, validate, deadline, dedupe, ordering, retry
    /// and timeout. Use [`serve`](Self::serve) with
    /// `Stack::new()...build(router)` to configure it.
    pub fn serve_default(self, router: crate::Router) -> Consumer<crate::middleware::DefaultStack> {
        self.serve(crate::middleware::Stack::new().build(router))
    }

    /// Finishes the consumer with its pipeline: a [`Router`](crate::Router)
    /// or any stack of tower layers around one (the first layer added is the
    /// outermost and sees the delivery first).
    ///
    /// The runtime waits for the pipeline to be ready (`poll_ready`) before
    /// it pulls the next delivery, so a layer's backpressure
    /// (`ConcurrencyLimit`, `RateLimit`) keeps messages at the broker. The
    /// service need not be `Clone`. An error returned for one delivery (e.g.
    /// by tower's `Timeout` or `LoadShed`) is a transient failure of that
    /// delivery; an error from `poll_ready` means the pipeline is broken, and
    /// the consumer drains and stops with that error.
    pub fn serve<S>(self, service: S) -> Consumer<S>
    where
        S: Service<Incoming, Response = Outcome> + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let caps = self.transport.capabilities();
        // Where releases count as deliveries, allow one per attempt before
        // calling a message poison.
        let poison_threshold = if caps.release_counts_attempt {
            self.max_attempts.saturating_mul(2)
        } else {
            self.max_attempts
        };
        let mut publisher = Publisher::new(Arc::clone(&self.transport));
        if let Some(p) = &self.producer {
            publisher = publisher.with_producer(Arc::clone(p));
        }
        Consumer {
            service,
            shared: Arc::new(Shared {
                transport: self.transport,
                source: self.source,
                max_attempts: self.max_attempts,
                poison_threshold,
                max_retry_delay: caps.max_retry_delay,
                publisher,
                hard_stop: CancellationToken::new(),
                subscribed: tokio::sync::watch::channel(false).0,
                stats: ConsumerStats::default(),
            }),
            concurrency: self.concurrency,
            drain_timeout: self.drain_timeout,
        }
    }
}

struct Shared {
    transport: Arc<dyn Transport>,
    source: Arc<str>,
    max_attempts: u32,
    /// Above this attempt number a delivery is dead-lettered unrun.
    poison_threshold: u32,
    max_retry_delay: Option<Duration>,
    publisher: Publisher,
    hard_stop: CancellationToken,
    stats: ConsumerStats,
    /// Set once the subscription is established, or the consumer stopped
    /// trying.
    subscribed: tokio::sync::watch::Sender<bool>,
}

/// Counters of one consumer, readable while it runs.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    received: AtomicU64,
    acked: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    released: AtomicU64,
    settle_failed: AtomicU64,
}

macro_rules! stat_getters {
    ($($name:ident: $doc:literal),*) => {$(
        #[doc = $doc]
        pub fn $name(&self) -> u64 {
            self.$name.load(Ordering::Relaxed)
        }
    )*};
}

impl ConsumerStats {
    stat_getters!(
        received: "Deliveries pulled from the broker.",
        acked: "Deliveries settled as acknowledged (handled, rejected, duplicate or dropped as expired).",
        retried: "Deliveries settled for a delayed retry.",
        dead_lettered: "Deliveries settled by dead-lettering.",
        released: "Deliveries given back at shutdown, not counted as attempts.",
        settle_failed: "Settlements the broker did not accept (the broker redelivers those)."
    );

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a consumer did, reported when it stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Deliveries pulled.
    pub received: u64,
    /// Acknowledged.
    pub acked: u64,
    /// Settled for retry.
    pub retried: u64,
    /// Dead-lettered.
    pub dead_lettered: u64,
    /// Released for redelivery because the drain timeout ran out.
    pub released: u64,
    /// Settlements the broker refused.
    pub settle_failed: u64,
    /// Whether in-flight work outlived the drain timeout.
    pub drain_timed_out: bool,
    /// Deliveries that could not even be released in time after the drain
    /// timeout (the broker redelivers them once their lease or connection
    /// ends).
    pub abandoned: usize,
}

/// Consumes one source through a pipeline. Built with [`Consumer::builder`].
pub struct Consumer<S> {
    service: S,
    shared: Arc<Shared>,
    concurrency: usize,
    drain_timeout: Duration,
}

impl Consumer<()> {
    /// A consumer of `source` on `transport`.
    pub fn builder(transport: impl Transport, source: impl Into<Arc<str>>) -> ConsumerBuilder {
        ConsumerBuilder {
            transport: Arc::new(transport),
            source: source.into(),
            concurrency: 32,
            max_attempts: 5,
            drain_timeout: Duration::from_secs(30),
            producer: None,
        }
    }
}

impl<S> fmt::Debug for Consumer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("source", &self.shared.source)
            .field("concurrency", &self.concurrency)
            .field("max_attempts", &self.shared.max_attempts)
            .finish_non_exhaustive()
    }
}

/// A running consumer. Dropping the handle leaves the consumer running in
/// the background; [`shutdown`](Self::shutdown) stops it gracefully.
pub struct ConsumerHandle {
    shutdown: CancellationToken,
    shared: Arc<Shared>,
    join: JoinHandle<Result<ShutdownReport, TransportError>>,
}

impl ConsumerHandle {
    /// Live counters.
    pub fn stats(&self) -> &ConsumerStats {
        &self.shared.stats
    }

    /// Waits until the consumer has subscribed to its source (returns at
    /// once if it already has, or if it stopped without subscribing). With
    /// an at-most-once transport, messages published before this are not
    /// delivered to it.
    pub async fn subscribed(&self) {
        let mut rx = self.shared.subscribed.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Whether the consumer stopped (shut down, or its subscription failed).
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// Stops pulling, drains in-flight work (up to the drain timeout) and
    /// returns what the consumer did.
    pub async fn shutdown(self) -> Result<ShutdownReport, TransportError> {
        self.shutdown.cancel();
        self.join.await.unwrap_or_else(|e| {
            Err(
                TransportError::new(TransportErrorKind::Other, "consumer task failed")
                    .with_source(e),
            )
        })
    }
}

impl<S> Consumer<S>
where
    S: Service<Incoming, Response = Outcome> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    /// Runs the consumer on the current tokio runtime until
    /// [`ConsumerHandle::shutdown`].
    pub fn spawn(self) -> ConsumerHandle {
        let shutdown = CancellationToken::new();
        let shared = Arc::clone(&self.shared);
        let join = tokio::spawn(self.run(shutdown.clone().cancelled_owned()));
        ConsumerHandle {
            shutdown,
            shared,
            join,
        }
    }

    /// Runs until `shutdown` completes, then drains.
    ///
    /// Fails at once if the transport redelivers but cannot count deliveries
    /// (retries could not be bounded), if the source cannot be subscribed,
    /// and after draining if the pipeline broke or the subscription ended
    /// without a shutdown.
    ///
    /// # Cancel safety
    ///
    /// Dropping this future drops every in-flight delivery unsettled: the
    /// broker redelivers them and counts an attempt, as after a crash. Use
    /// `shutdown` for a graceful stop.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<ShutdownReport, TransportError> {
        let Consumer {
            mut service,
            shared,
            concurrency,
            drain_timeout,
        } = self;
        let caps = shared.transport.capabilities();
        if caps.redelivery.is_supported() && !caps.delivery_count.is_supported() {
            shared.subscribed.send_replace(true);
            return Err(TransportError::new(
                TransportErrorKind::Config,
                "the transport redelivers but cannot count deliveries, so retries could not be bounded",
            ));
        }
        let options = SubscribeOptions::default()
            .prefetch(concurrency)
            .max_attempts(shared.max_attempts);
        let subscribed = shared.transport.subscribe(&shared.source, options).await;
        // Whether it worked or not, nobody should wait for it any more.
        shared.subscribed.send_replace(true);
        let mut stream = subscribed?;
        // In-flight deliveries are polled by this task rather than spawned:
        // no task per message, no cross-thread wake-ups on the hot path.
        let mut in_flight: FuturesUnordered<BoxFuture<'static, ()>> = FuturesUnordered::new();
        let mut failure = None;
        tokio::pin!(shutdown);
        tracing::debug!(source = %shared.source, concurrency, "consumer started");

        // After a subscription error, pulling pauses briefly; in-flight work
        // keeps running meanwhile.
        let mut paused_until: Option<tokio::time::Instant> = None;
        // Deliveries finished in a row without this task yielding, and how
        // many it may finish before it does.
        let mut in_a_row = 0usize;
        let yield_every = match caps.settlement_batches_per_window {
            0 => MAX_IN_A_ROW,
            batches => (concurrency / batches as usize).clamp(MIN_IN_A_ROW, MAX_IN_A_ROW),
        };
        loop {
            if in_a_row >= yield_every {
                // Let the tasks this one woke run: an adapter's settlement
                // worker woken from here waits on this thread until this
                // task yields, and while deliveries keep arriving it would
                // not (a broker that waits for settlements before it sends
                // more then stalls).
                in_a_row = 0;
                tokio::task::yield_now().await;
            }
            let room = in_flight.len() < concurrency && paused_until.is_none();
            let pull = async {
                // Reserve room in the pipeline before taking a message off the broker.
                std::future::poll_fn(|cx| service.poll_ready(cx).map_err(Into::<BoxError>::into))
                    .await?;
                Ok::<_, BoxError>(stream.next().await)
            };
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                // An async block, so that the clock is not read and no timer
                // is built on every turn while not paused (select! builds
                // every branch's future, disabled or not).
                _ = async {
                    match paused_until {
                        Some(until) => tokio::time::sleep_until(until).await,
                        None => std::future::pending().await,
                    }
                }, if paused_until.is_some() => {
                    paused_until = None;
                }
                pulled = pull, if room => match pulled {
                    Err(e) => {
                        tracing::error!(source = %shared.source, error = %e, "the pipeline failed; stopping");
                        failure = Some(
                            TransportError::new(TransportErrorKind::Other, "the consumer's pipeline failed")
                                .with_source(e),
                        );
                        break;
                    }
                    Ok(Some(Ok(delivery))) => {
                        ConsumerStats::bump(&shared.stats.received);
                        // Most deliveries are done on their first poll (a
                        // handler that does not wait, settlement queued):
                        // only the others are tracked.
                        let mut delivery = Some(delivery);
                        let pending = std::future::poll_fn(|cx| {
                            let delivery = delivery.take().expect("polled once");
                            Poll::Ready(start(delivery, &mut service, &shared, cx))
                        })
                        .await;
                        match pending {
                            Some(job) => in_flight.push(job),
                            None => in_a_row += 1,
                        }
                    }
                    Ok(Some(Err(e))) if e.kind() == TransportErrorKind::Closed => {
                        failure = Some(e);
                        break;
                    }
                    Ok(Some(Err(e))) => {
                        // The adapter reconnects by itself; this is an observation.
                        tracing::warn!(source = %shared.source, error = %e, "subscription error");
                        paused_until = Some(tokio::time::Instant::now() + Duration::from_millis(100));
                    }
                    Ok(None) => {
                        failure = Some(TransportError::new(
                            TransportErrorKind::Closed,
                            format!("the subscription to {:?} ended", &*shared.source),
                        ));
                        break;
                    }
                },
            }
        }

        // Stop pulling. Deliveries already yielded stay settleable.
        drop(stream);
        let drain = async { while in_flight.next().await.is_some() {} };
        let drain_timed_out = tokio::time::timeout(drain_timeout, drain).await.is_err();
        let mut abandoned = 0;
        if drain_timed_out {
            tracing::warn!(
                source = %shared.source,
                in_flight = in_flight.len(),
                "drain timeout passed; cancelling and releasing in-flight deliveries"
            );
            shared.hard_stop.cancel();
            // Releasing is quick unless the broker is unreachable; do not hang on it.
            let release = async { while in_flight.next().await.is_some() {} };
            if tokio::time::timeout(RELEASE_GRACE, release).await.is_err() {
                abandoned = in_flight.len();
                tracing::error!(
                    source = %shared.source,
                    abandoned,
                    "deliveries could not be released in time; the broker redelivers them"
                );
            }
        }
        let s = &shared.stats;
        let report = ShutdownReport {
            received: s.received(),
            acked: s.acked(),
            retried: s.retried(),
            dead_lettered: s.dead_lettered(),
            released: s.released(),
            settle_failed: s.settle_failed(),
            drain_timed_out,
            abandoned,
        };
        tracing::debug!(source = %shared.source, ?report, "consumer stopped");
        match failure {
            Some(e) => {
                tracing::error!(source = %shared.source, error = %e, ?report, "consumer stopped by failure");
                Err(e)
            }
            None => Ok(report),
        }
    }
}

/// The fewest deliveries the run loop finishes in a row before it yields
/// (see `Capabilities::settlement_batches_per_window`).
const MIN_IN_A_ROW: usize = 16;

/// The most: tokio's cooperative budget makes the loop yield when the
/// transport's stream uses tokio's primitives, but a stream that is always
/// ready without them (and handlers done at once) would otherwise keep its
/// thread for as long as the backlog lasts.
const MAX_IN_A_ROW: usize = 1024;

/// How long releasing in-flight deliveries may take after the drain timeout.
const RELEASE_GRACE: Duration = Duration::from_secs(10);

/// The shortest lease the runtime extends by, so that a broker with a tiny
/// lease does not turn extension into a busy loop.
const MIN_LEASE: Duration = Duration::from_millis(30);

/// Backoff for failures that did not come from the handler's classified
/// error (a layer's error, a panic in a layer), per attempt.
const UNCLASSIFIED_BACKOFF: Duration = Duration::from_millis(100);

/// The pipeline's future for one delivery, caught if it panics.
type Call<F> = Pin<Box<futures_util::future::CatchUnwind<AssertUnwindSafe<F>>>>;

/// One delivery on its way through the pipeline.
struct Job<F> {
    call: Call<F>,
    envelope: Arc<Envelope>,
    attempt: u32,
    received_at: Instant,
    cancel: CancellationToken,
    settler: Box<dyn Settler>,
}

/// Starts one delivery: calls the pipeline (on the run loop, right after
/// `poll_ready`) and polls it and its settlement once. Most deliveries are
/// done by then (a handler that does not wait, a settlement the adapter
/// only queues), and nothing else is allocated for them; the others come
/// back as a future to track.
///
/// A delivery whose lease ran out before it started is dropped without
/// calling the pipeline (so its layers, metrics included, never see it;
/// the consumer counts it as received), and one over the attempt budget is
/// dead-lettered without it.
fn start<S, F, E>(
    delivery: Delivery,
    service: &mut S,
    shared: &Arc<Shared>,
    cx: &mut TaskContext<'_>,
) -> Option<BoxFuture<'static, ()>>
where
    S: Service<Incoming, Future = F, Error = E>,
    F: Future<Output = Result<Outcome, E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    // Shutdown's hard stop comes after the run loop has stopped starting
    // deliveries: it only ever meets the ones `finish` tracks.
    debug_assert!(!shared.hard_stop.is_cancelled());
    let (envelope, attempt, received_at, settler) = delivery.into_parts();
    if attempt > shared.poison_threshold {
        // Do not run it again: earlier attempts never settled.
        let outcome = Outcome::DeadLetter {
            reason: DeadLetterReason::MaxAttempts,
            detail: format!(
                "delivered {attempt} times, over the budget of {}; earlier attempts never settled (the handler may crash the process)",
                shared.max_attempts
            ),
        };
        return settle_now(shared, settler, envelope, attempt, outcome, cx);
    }
    if settler
        .lease_deadline()
        .is_some_and(|d| d <= Instant::now())
    {
        // It waited in the prefetch buffer past its lease: the broker is
        // handing it to someone else already.
        tracing::debug!(message_id = %envelope.id, "lease expired before the handler started; skipping");
        return None;
    }
    let cancel = CancellationToken::new();
    let incoming = Incoming {
        envelope: Arc::clone(&envelope),
        attempt,
        max_attempts: shared.max_attempts,
        received_at,
        cancel: cancel.clone(),
        publisher: shared.publisher.clone(),
        source: Arc::clone(&shared.source),
        trace: envelope.trace.clone(),
    };
    let mut call = match std::panic::catch_unwind(AssertUnwindSafe(|| service.call(incoming))) {
        Ok(future) => Box::pin(AssertUnwindSafe(future).catch_unwind()),
        Err(panic) => {
            let outcome = panicked(&*panic, attempt);
            return settle_now(shared, settler, envelope, attempt, outcome, cx);
        }
    };
    match call.as_mut().poll(cx) {
        Poll::Ready(result) => {
            // Its clean-up has run: the pipeline's future is dropped before
            // the delivery is settled.
            drop(call);
            let outcome = outcome_of(result, attempt);
            settle_now(shared, settler, envelope, attempt, outcome, cx)
        }
        Poll::Pending => Some(Box::pin(
            Job {
                call,
                envelope,
                attempt,
                received_at,
                cancel,
                settler,
            }
            .finish(Arc::clone(shared)),
        )),
    }
}

/// The outcome of a pipeline that returned (or panicked).
fn outcome_of<E: Into<BoxError>>(
    result: Result<Result<Outcome, E>, Box<dyn std::any::Any + Send>>,
    attempt: u32,
) -> Outcome {
    match result {
        Ok(Ok(outcome)) => outcome,
        // An error from a layer (tower's Timeout, LoadShed, ...) is transient.
        Ok(Err(e)) => Outcome::Retry {
            delay: UNCLASSIFIED_BACKOFF * attempt,
            detail: e.into().to_string(),
        },
        Err(panic) => panicked(&*panic, attempt),
    }
}

fn panicked(panic: &(dyn std::any::Any + Send), attempt: u32) -> Outcome {
    Outcome::Retry {
        delay: UNCLASSIFIED_BACKOFF * attempt,
        detail: format!("pipeline panicked: {}", panic_message(panic)),
    }
}

/// Settles `outcome`, polling the settlement once; what is left of it if it
/// is not done.
fn settle_now(
    shared: &Arc<Shared>,
    settler: Box<dyn Settler>,
    envelope: Arc<Envelope>,
    attempt: u32,
    outcome: Outcome,
    cx: &mut TaskContext<'_>,
) -> Option<BoxFuture<'static, ()>> {
    let Some((settlement, counter)) = settlement_of(shared, &envelope.id, attempt, outcome) else {
        return Some(Box::pin(release(Arc::clone(shared), settler, envelope)));
    };
    match settler.begin_settle(settlement, cx) {
        Settling::Done(result) => {
            record(shared, &envelope.id, counter, result);
            None
        }
        Settling::Pending(settling) => {
            let shared = Arc::clone(shared);
            Some(Box::pin(async move {
                let result = settling.await;
                record(&shared, &envelope.id, counter, result);
            }))
        }
    }
}

impl<F, E> Job<F>
where
    F: Future<Output = Result<Outcome, E>> + Send + 'static,
    E: Into<BoxError>,
{
    /// Runs the rest of the pipeline's future, keeps the lease, and settles.
    async fn finish(self, shared: Arc<Shared>) {
        let Job {
            mut call,
            envelope,
            attempt,
            received_at,
            cancel,
            mut settler,
        } = self;
        let outcome = {
            let keeper = keep_lease(&mut *settler, received_at, &envelope.id);
            // Biased: the pipeline first, as on its first poll.
            let first = tokio::select! {
                biased;
                result = &mut call => Some(outcome_of(result, attempt)),
                _ = shared.hard_stop.cancelled() => None,
                _ = keeper => None,
            };
            match first {
                Some(outcome) => Some(outcome),
                None => {
                    // Shutdown's drain timeout passed: tell the handler, and
                    // give it one chance to finish before it is dropped.
                    cancel.cancel();
                    match futures_util::poll!(call.as_mut()) {
                        Poll::Ready(result) => Some(outcome_of(result, attempt)),
                        Poll::Pending => None,
                    }
                }
            }
        };
        // The pipeline's future is dropped here, so its clean-up runs
        // before the delivery is settled or released.
        drop(call);
        let settled = outcome.and_then(|o| settlement_of(&shared, &envelope.id, attempt, o));
        match settled {
            Some((settlement, counter)) => {
                let result = settle(settler, settlement).await;
                record(&shared, &envelope.id, counter, result);
            }
            None => release(shared, settler, envelope).await,
        }
    }
}

/// Settles through [`Settler::begin_settle`] (with this task's context),
/// then waits for what is left.
async fn settle(settler: Box<dyn Settler>, settlement: Settlement) -> Result<(), TransportError> {
    let mut start = Some((settler, settlement));
    let settling = std::future::poll_fn(|cx| {
        let (settler, settlement) = start.take().expect("polled once");
        Poll::Ready(settler.begin_settle(settlement, cx))
    })
    .await;
    match settling {
        Settling::Done(result) => result,
        Settling::Pending(rest) => rest.await,
    }
}

/// Gives a delivery back at shutdown, without counting an attempt.
async fn release(shared: Arc<Shared>, settler: Box<dyn Settler>, envelope: Arc<Envelope>) {
    match settle(settler, Settlement::Release).await {
        Ok(()) => ConsumerStats::bump(&shared.stats.released),
        Err(e) => {
            ConsumerStats::bump(&shared.stats.settle_failed);
            tracing::warn!(message_id = %envelope.id, error = %e, "release failed; the broker will redeliver");
        }
    }
}

/// Extends the lease each time two thirds of it have passed; never returns.
/// Leases count from broker receipt, and each extension renews the same
/// length.
async fn keep_lease(settler: &mut dyn Settler, received_at: Instant, id: &MessageId) {
    let Some(first) = settler.lease_deadline() else {
        return std::future::pending().await;
    };
    let lease = first.saturating_duration_since(received_at).max(MIN_LEASE);
    let mut next = first.checked_sub(lease / 3).unwrap_or(first);
    loop {
        tokio::time::sleep_until(next.into()).await;
        let now = Instant::now();
        match settler.extend(lease).await {
            Ok(()) => {
                next = settler
                    .lease_deadline()
                    .and_then(|d| d.checked_sub(lease / 3))
                    .unwrap_or(now + lease * 2 / 3)
                    .max(now + MIN_LEASE);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    TransportErrorKind::StaleDelivery | TransportErrorKind::Unsupported
                ) =>
            {
                tracing::warn!(message_id = %id, error = %e, "cannot extend the lease any more");
                return std::future::pending().await;
            }
            Err(e) => {
                tracing::warn!(message_id = %id, error = %e, "lease extension failed; trying again");
                next = now + (lease / 6).max(MIN_LEASE);
            }
        }
    }
}

/// Which counter a settlement bumps once the broker has it.
#[derive(Clone, Copy)]
enum Counter {
    Acked,
    Retried,
    DeadLettered,
}

/// The settlement of `outcome`; `None` when the delivery is to be given
/// back instead (shutdown's drain timeout passed, and the outcome is not an
/// ack).
fn settlement_of(
    shared: &Shared,
    id: &MessageId,
    attempt: u32,
    outcome: Outcome,
) -> Option<(Settlement, Counter)> {
    Some(match outcome {
        Outcome::Ack(_) => (Settlement::Ack, Counter::Acked),
        // Shutdown is not failure: give it back without counting an attempt.
        _ if shared.hard_stop.is_cancelled() => return None,
        Outcome::Retry { delay, detail } if attempt < shared.max_attempts => {
            let delay = shared.max_retry_delay.map_or(delay, |max| delay.min(max));
            tracing::debug!(message_id = %id, attempt, ?delay, %detail, "retrying");
            (Settlement::Retry { delay }, Counter::Retried)
        }
        Outcome::Retry { detail, .. } => {
            tracing::warn!(message_id = %id, attempt, %detail, "attempts exhausted; dead-lettering");
            (
                Settlement::DeadLetter {
                    reason: DeadLetterReason::MaxAttempts,
                    detail,
                    attempts: attempt,
                },
                Counter::DeadLettered,
            )
        }
        Outcome::DeadLetter { reason, detail } => {
            tracing::warn!(message_id = %id, attempt, %reason, %detail, "dead-lettering");
            (
                Settlement::DeadLetter {
                    reason,
                    detail,
                    attempts: attempt,
                },
                Counter::DeadLettered,
            )
        }
    })
}

/// Counts a settlement the broker answered.
fn record(shared: &Shared, id: &MessageId, counter: Counter, result: Result<(), TransportError>) {
    let stats = &shared.stats;
    match result {
        Ok(()) => ConsumerStats::bump(match counter {
            Counter::Acked => &stats.acked,
            Counter::Retried => &stats.retried,
            Counter::DeadLettered => &stats.dead_lettered,
        }),
        Err(e) => {
            ConsumerStats::bump(&stats.settle_failed);
            tracing::warn!(message_id = %id, error = %e, kind = ?e.kind(), "settlement failed; the broker will redeliver");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    use super::*;
    use crate::transport::DeliveryStream;
    use crate::{Envelope, Handler, Message, Router};

    /// Deliveries that are always ready, from a stream that uses none of
    /// tokio's primitives (so it spends no cooperative budget), settled at
    /// once: the consumer never has to wait. 5,000 of them, then the stream
    /// ends (a consumer that never yielded would fail the test, not hang
    /// it).
    fn always_ready() -> DeliveryStream {
        Box::pin(
            futures_util::stream::repeat_with(|| {
                let envelope = Arc::new(Envelope::new(Tick::TYPE, "{}"));
                Ok(Delivery::new(
                    envelope,
                    1,
                    Box::new(Settled) as Box<dyn Settler>,
                ))
            })
            .take(5_000),
        )
    }

    struct Settled;

    impl Settler for Settled {
        fn settle(
            self: Box<Self>,
            _: Settlement,
        ) -> BoxFuture<'static, Result<(), TransportError>> {
            Box::pin(async { Ok(()) })
        }
    }

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Tick {}

    impl Message for Tick {
        const TYPE: &'static str = "test.tick";
    }

    /// Counts, and notes whether the other task has run yet.
    struct Count {
        handled: Arc<AtomicU64>,
        other_ran: Arc<AtomicBool>,
        handled_before_it: Arc<AtomicU64>,
    }

    impl Handler<Tick> for Count {
        async fn handle(&self, _: Tick, _: &crate::Context) -> Result<(), crate::HandleError> {
            let n = self.handled.fetch_add(1, Ordering::Relaxed) + 1;
            if !self.other_ran.load(Ordering::Relaxed) {
                self.handled_before_it.store(n, Ordering::Relaxed);
            }
            Ok(())
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_consumer_that_never_waits_still_lets_other_tasks_run() {
        let (handled, other_ran, before) = Default::default();
        let count = Count {
            handled: Arc::clone(&handled),
            other_ran: Arc::clone(&other_ran),
            handled_before_it: Arc::clone(&before),
        };
        let transport = crate::testing::TestTransport(Some(always_ready));
        let consumer = Consumer::builder(transport, "endless")
            .concurrency(64)
            .serve(Router::builder().route(count).build())
            .spawn();
        // On this one thread the consumer runs first; the task below runs
        // only once the consumer yields.
        let flag = Arc::clone(&other_ran);
        tokio::spawn(async move { flag.store(true, Ordering::Relaxed) })
            .await
            .unwrap();
        let before = before.load(Ordering::Relaxed);
        assert!(
            (1..=MAX_IN_A_ROW as u64).contains(&before),
            "the other task ran after {before} deliveries"
        );
        // It goes on until the stream ends (and then stops with an error).
        let _ = consumer.shutdown().await;
        assert!(handled.load(Ordering::Relaxed) >= before);
    }

    /// How the deliveries of `recorded` were settled, in order.
    fn settled(recorded: &Mutex<Vec<&'static str>>) -> Vec<&'static str> {
        recorded.lock().unwrap().clone()
    }

    /// Records each settlement in `log` once its future completes, which
    /// is only on its second poll.
    struct SlowSettler(&'static Mutex<Vec<&'static str>>);

    impl Settler for SlowSettler {
        fn settle(
            self: Box<Self>,
            settlement: Settlement,
        ) -> BoxFuture<'static, Result<(), TransportError>> {
            let kind = match settlement {
                Settlement::Ack => "ack",
                Settlement::Retry { .. } => "retry",
                Settlement::DeadLetter { .. } => "dead-letter",
                Settlement::Release => "release",
            };
            Box::pin(async move {
                tokio::task::yield_now().await;
                self.0.lock().unwrap().push(kind);
                Ok(())
            })
        }
    }

    /// `n` deliveries, the `i`th settled by `settler(i)`, then nothing more
    /// (the stream stays open).
    fn settled_by(
        n: usize,
        settler: impl Fn(usize) -> Box<dyn Settler> + Send + 'static,
    ) -> DeliveryStream {
        Box::pin(
            futures_util::stream::iter((0..n).map(move |i| {
                let envelope = Arc::new(Envelope::new(Tick::TYPE, "{}"));
                Ok(Delivery::new(envelope, 1, settler(i)))
            }))
            .chain(futures_util::stream::pending()),
        )
    }

    /// `n` deliveries settled by `SlowSettler(log)`, then nothing more (the
    /// stream stays open).
    fn slow_settled(n: usize, log: &'static Mutex<Vec<&'static str>>) -> DeliveryStream {
        settled_by(n, move |_| Box::new(SlowSettler(log)))
    }

    /// Runs `pipeline` over the `n` deliveries `stream` yields until they
    /// have been received and `settlements` have been recorded in `log` (or
    /// 5 s pass), then shuts down.
    async fn consume<S>(
        (stream, n): (fn() -> DeliveryStream, u64),
        log: &'static Mutex<Vec<&'static str>>,
        settlements: usize,
        drain_timeout: Duration,
        pipeline: S,
    ) -> ShutdownReport
    where
        S: Service<Incoming, Response = Outcome> + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let consumer = Consumer::builder(crate::testing::TestTransport(Some(stream)), "q")
            .drain_timeout(drain_timeout)
            .serve(pipeline)
            .spawn();
        let deadline = Instant::now() + Duration::from_secs(5);
        while (consumer.stats().received() < n || log.lock().unwrap().len() < settlements)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        consumer.shutdown().await.unwrap()
    }

    #[tokio::test]
    async fn a_settlement_still_pending_after_the_first_poll_is_tracked_to_its_end() {
        static LOG: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
        let handled = Arc::new(AtomicU64::new(0));
        let count = Count {
            handled: Arc::clone(&handled),
            other_ran: Arc::default(),
            handled_before_it: Arc::default(),
        };
        let report = consume(
            (|| slow_settled(100, &LOG), 100),
            &LOG,
            100,
            Duration::from_secs(5),
            Router::builder().route(count).build(),
        )
        .await;
        assert_eq!(settled(&LOG), vec!["ack"; 100]);
        assert_eq!((report.received, report.acked), (100, 100));
        assert_eq!(handled.load(Ordering::Relaxed), 100);
    }

    /// Settles through `begin_settle` only: the `n`th delivery at once
    /// (`n % 3 == 0`), later (`1`), or fails at once (`2`).
    struct Inline(usize, &'static Mutex<Vec<&'static str>>);

    impl Settler for Inline {
        fn settle(
            self: Box<Self>,
            _: Settlement,
        ) -> BoxFuture<'static, Result<(), TransportError>> {
            panic!("the runtime settles through begin_settle")
        }

        fn begin_settle(self: Box<Self>, _: Settlement, _: &mut TaskContext<'_>) -> Settling {
            let log = self.1;
            match self.0 % 3 {
                0 => {
                    log.lock().unwrap().push("now");
                    Settling::Done(Ok(()))
                }
                1 => Settling::Pending(Box::pin(async move {
                    tokio::task::yield_now().await;
                    log.lock().unwrap().push("later");
                    Ok(())
                })),
                _ => {
                    log.lock().unwrap().push("failed");
                    Settling::Done(Err(TransportError::new(
                        TransportErrorKind::Connection,
                        "the connection is gone",
                    )))
                }
            }
        }
    }

    #[tokio::test]
    async fn settlements_begun_inline_are_counted_whether_done_pending_or_failed() {
        static LOG: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
        fn stream() -> DeliveryStream {
            settled_by(30, |n| Box::new(Inline(n, &LOG)))
        }
        let count = Count {
            handled: Arc::default(),
            other_ran: Arc::default(),
            handled_before_it: Arc::default(),
        };
        let report = consume(
            (stream, 30),
            &LOG,
            30,
            Duration::from_secs(5),
            Router::builder().route(count).build(),
        )
        .await;
        let mut log = settled(&LOG);
        log.sort_unstable();
        assert_eq!(log.iter().filter(|k| **k == "now").count(), 10, "{log:?}");
        assert_eq!(log.iter().filter(|k| **k == "later").count(), 10, "{log:?}");
        assert_eq!(
            log.iter().filter(|k| **k == "failed").count(),
            10,
            "{log:?}"
        );
        assert_eq!(
            (report.received, report.acked, report.settle_failed),
            (30, 20, 10)
        );
    }

    /// A pipeline whose `call` panics.
    struct PanicsInCall;

    impl Service<Incoming> for PanicsInCall {
        type Response = Outcome;
        type Error = BoxError;
        type Future = BoxFuture<'static, Result<Outcome, BoxError>>;

        fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Incoming) -> Self::Future {
            panic!("a layer's call panicked")
        }
    }

    #[tokio::test]
    async fn a_pipeline_that_panics_in_call_retries_the_delivery_and_goes_on() {
        static LOG: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
        let report = consume(
            (|| slow_settled(2, &LOG), 2),
            &LOG,
            2,
            Duration::from_secs(5),
            PanicsInCall,
        )
        .await;
        assert_eq!(settled(&LOG), vec!["retry", "retry"]);
        assert_eq!((report.received, report.retried), (2, 2));
    }

    /// Waits for the delivery's cancellation, then fails transiently.
    struct FailsWhenCancelled;

    impl Handler<Tick> for FailsWhenCancelled {
        async fn handle(&self, _: Tick, cx: &crate::Context) -> Result<(), crate::HandleError> {
            cx.cancellation().cancelled().await;
            Err(crate::HandleError::transient("cancelled"))
        }
    }

    #[tokio::test]
    async fn a_failure_after_the_drain_timeout_releases_instead_of_retrying() {
        static LOG: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
        // Nothing is settled until shutdown: wait for the delivery alone.
        let report = consume(
            (|| slow_settled(1, &LOG), 1),
            &LOG,
            0,
            Duration::from_millis(50),
            Router::builder().route(FailsWhenCancelled).build(),
        )
        .await;
        assert_eq!(settled(&LOG), vec!["release"]);
        assert_eq!((report.released, report.retried), (1, 0));
        assert!(report.drain_timed_out);
    }
}
