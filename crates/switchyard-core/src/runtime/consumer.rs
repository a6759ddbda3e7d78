//! The consumer: one source, bounded in-flight work, settlement from the
//! pipeline's outcome, graceful drain.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{Service, ServiceExt};

use super::{Incoming, Publisher};
use crate::outcome::{DeadLetterReason, Outcome};
use crate::router::panic_message;
use crate::transport::{
    BoxError, Delivery, Settlement, Settler, SubscribeOptions, Transport, TransportError,
    TransportErrorKind,
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

    /// Finishes the consumer with its pipeline: a [`Router`](crate::Router)
    /// or any stack of tower layers around one. A service error (e.g. from
    /// tower's `Timeout` or `LoadShed`) counts as a transient failure.
    pub fn serve<S>(self, service: S) -> Consumer<S>
    where
        S: Service<Incoming, Response = Outcome> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
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
                publisher,
                hard_stop: CancellationToken::new(),
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
    publisher: Publisher,
    hard_stop: CancellationToken,
    stats: ConsumerStats,
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
        released: "Deliveries given back unsettled-as-failure at shutdown.",
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

/// A running consumer.
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
    S: Service<Incoming, Response = Outcome> + Clone + Send + 'static,
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
    /// # Cancel safety
    ///
    /// Dropping this future drops every in-flight delivery unsettled: the
    /// broker redelivers them and counts an attempt, as after a crash. Use
    /// `shutdown` for a graceful stop.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<ShutdownReport, TransportError> {
        let shared = self.shared;
        let options = SubscribeOptions::default().prefetch(self.concurrency);
        let mut stream = shared.transport.subscribe(&shared.source, options).await?;
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let tracker = TaskTracker::new();
        tokio::pin!(shutdown);
        tracing::debug!(source = %shared.source, concurrency = self.concurrency, "consumer started");

        loop {
            let permit = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                p = Arc::clone(&permits).acquire_owned() => p.expect("the semaphore is never closed"),
            };
            let next = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                next = stream.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    ConsumerStats::bump(&shared.stats.received);
                    tracker.spawn(process(
                        delivery,
                        self.service.clone(),
                        Arc::clone(&shared),
                        permit,
                    ));
                }
                Some(Err(e)) if e.kind() == TransportErrorKind::Closed => {
                    tracing::warn!(source = %shared.source, error = %e, "subscription closed");
                    break;
                }
                Some(Err(e)) => {
                    // The adapter reconnects by itself; this is an observation.
                    tracing::warn!(source = %shared.source, error = %e, "subscription error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                None => break,
            }
        }

        // Stop pulling: the adapter gives back whatever it had prefetched.
        drop(stream);
        tracker.close();
        let drain_timed_out = tokio::time::timeout(self.drain_timeout, tracker.wait())
            .await
            .is_err();
        if drain_timed_out {
            tracing::warn!(
                source = %shared.source,
                in_flight = tracker.len(),
                "drain timeout passed; cancelling and releasing in-flight deliveries"
            );
            shared.hard_stop.cancel();
            tracker.wait().await;
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
        };
        tracing::debug!(source = %shared.source, ?report, "consumer stopped");
        Ok(report)
    }
}

async fn process<S>(
    delivery: Delivery,
    service: S,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
) where
    S: Service<Incoming, Response = Outcome> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let (envelope, attempt, received_at, mut settler) = delivery.into_parts();

    if attempt > shared.max_attempts {
        let outcome = Outcome::DeadLetter {
            reason: DeadLetterReason::MaxAttempts,
            detail: format!(
                "delivered {attempt} times, over the budget of {}; earlier attempts never settled (the handler may crash the process)",
                shared.max_attempts
            ),
        };
        settle(&shared, settler, &envelope.id, attempt, outcome).await;
        return;
    }

    let incoming = Incoming {
        envelope: Arc::clone(&envelope),
        attempt,
        max_attempts: shared.max_attempts,
        received_at,
        cancel: shared.hard_stop.child_token(),
        publisher: shared.publisher.clone(),
        source: Arc::clone(&shared.source),
    };
    let call = AssertUnwindSafe(service.oneshot(incoming))
        .catch_unwind()
        .map(|result| match result {
            Ok(Ok(outcome)) => outcome,
            // An error from a layer (tower's Timeout, LoadShed, ...) is transient.
            Ok(Err(e)) => Outcome::Retry {
                delay: Duration::ZERO,
                detail: e.into().to_string(),
            },
            Err(panic) => Outcome::Retry {
                delay: Duration::ZERO,
                detail: format!("pipeline panicked: {}", panic_message(&*panic)),
            },
        });
    tokio::pin!(call);

    // Leases count from broker receipt; each extension renews the same length.
    let lease = settler.lease_deadline().map(|deadline| {
        deadline
            .saturating_duration_since(received_at)
            .max(MIN_LEASE)
    });
    let result = loop {
        let extend_at = lease.and_then(|lease| {
            settler
                .lease_deadline()
                .map(|deadline| deadline.checked_sub(lease / 3).unwrap_or(deadline))
        });
        tokio::select! {
            biased;
            outcome = &mut call => break Some(outcome),
            _ = shared.hard_stop.cancelled() => break None,
            _ = sleep_until_some(extend_at) => {
                let lease = lease.unwrap_or(MIN_LEASE);
                if let Err(e) = settler.extend(lease).await {
                    tracing::warn!(message_id = %envelope.id, error = %e, "lease extension failed");
                }
            }
        }
    };

    let outcome = match result {
        Some(outcome) => outcome,
        None => {
            // Shutdown is not failure: give it back without counting an attempt.
            ConsumerStats::bump(&shared.stats.released);
            if let Err(e) = settler.settle(Settlement::Release).await {
                ConsumerStats::bump(&shared.stats.settle_failed);
                tracing::warn!(message_id = %envelope.id, error = %e, "release failed; the broker will redeliver");
            }
            return;
        }
    };
    settle(&shared, settler, &envelope.id, attempt, outcome).await;
}

/// The shortest lease the runtime extends by, so that a broker with a tiny
/// lease does not turn extension into a busy loop.
const MIN_LEASE: Duration = Duration::from_millis(30);

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn settle(
    shared: &Shared,
    settler: Box<dyn Settler>,
    id: &crate::envelope::MessageId,
    attempt: u32,
    outcome: Outcome,
) {
    let stats = &shared.stats;
    let settlement = match outcome {
        Outcome::Ack(_) => {
            ConsumerStats::bump(&stats.acked);
            Settlement::Ack
        }
        Outcome::Retry { delay, detail } if attempt < shared.max_attempts => {
            tracing::debug!(message_id = %id, attempt, ?delay, %detail, "retrying");
            ConsumerStats::bump(&stats.retried);
            Settlement::Retry { delay }
        }
        Outcome::Retry { detail, .. } => {
            tracing::warn!(message_id = %id, attempt, %detail, "attempts exhausted; dead-lettering");
            ConsumerStats::bump(&stats.dead_lettered);
            Settlement::DeadLetter {
                reason: DeadLetterReason::MaxAttempts,
                detail,
                attempts: attempt,
            }
        }
        Outcome::DeadLetter { reason, detail } => {
            tracing::warn!(message_id = %id, attempt, %reason, %detail, "dead-lettering");
            ConsumerStats::bump(&stats.dead_lettered);
            Settlement::DeadLetter {
                reason,
                detail,
                attempts: attempt,
            }
        }
    };
    if let Err(e) = settler.settle(settlement).await {
        ConsumerStats::bump(&stats.settle_failed);
        tracing::warn!(message_id = %id, error = %e, kind = ?e.kind(), "settlement failed; the broker will redeliver");
    }
}
