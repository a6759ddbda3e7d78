//! Counters, histograms and a gauge through the [`metrics`] facade (install
//! any recorder: Prometheus, StatsD, ...). Names and labels are listed in
//! `docs/operations.md`:
//!
//! | name | kind | labels |
//! | --- | --- | --- |
//! | `switchyard_messages_received_total` | counter | `source`, `type` |
//! | `switchyard_messages_settled_total` | counter | `source`, `type`, `outcome`, `reason` |
//! | `switchyard_handler_duration_seconds` | histogram | `source`, `type` |
//! | `switchyard_end_to_end_latency_seconds` | histogram | `source`, `type` |
//! | `switchyard_delivery_attempts` | histogram | `source`, `type` |
//! | `switchyard_messages_in_flight` | gauge | `source` |
//!
//! `outcome` is `acked`, `duplicate`, `rejected`, `expired`, `retried` or
//! `dead-lettered`; `reason` is the dead-letter reason (empty otherwise).
//! The `type` label comes from untrusted input, so it is bounded: with
//! [`MetricsLayer::for_router`] only the router's types are named (others
//! are `unknown`); otherwise the first 100 distinct types are, and the rest
//! are `other`.
//!
//! # Example
//!
//! ```
//! use switchyard_core::middleware::metrics::MetricsLayer;
//! use switchyard_core::{Context, HandleError, Message, Router};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Ping;
//! # impl Message for Ping { const TYPE: &'static str = "ping"; }
//!
//! let router = Router::builder().route(|_: Ping, _: Context| async { Ok::<_, HandleError>(()) }).build();
//! let pipeline = tower::ServiceBuilder::new()
//!     .layer(MetricsLayer::for_router(&router))
//!     .service(router);
//! # let _ = pipeline;
//! ```

mod layer;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Instant, SystemTime};

use metrics::{Counter, Gauge, Histogram};

pub use layer::MetricsLayer;

use crate::outcome::{AckReason, DeadLetterReason, Outcome};
use crate::runtime::Incoming;

/// Most distinct `type` labels without a router's list of types.
const MAX_TYPES: usize = 100;

const REASONS: [&str; 9] = [
    "malformed",
    "too-large",
    "unknown-type",
    "unsupported-version",
    "max-attempts",
    "permanent",
    "expired",
    "id-reuse",
    "other",
];

fn reason_index(reason: &DeadLetterReason) -> usize {
    match reason {
        DeadLetterReason::Malformed => 0,
        DeadLetterReason::TooLarge => 1,
        DeadLetterReason::UnknownType => 2,
        DeadLetterReason::UnsupportedVersion => 3,
        DeadLetterReason::MaxAttempts => 4,
        DeadLetterReason::Permanent => 5,
        DeadLetterReason::Expired => 6,
        DeadLetterReason::IdReuse => 7,
        _ => 8,
    }
}

/// Handles of one (source, type).
struct TypeHandles {
    received: Counter,
    duration: Histogram,
    latency: Histogram,
    attempts: Histogram,
    /// acked, duplicate, rejected, expired, retried.
    settled: [Counter; 5],
    dead_lettered: [Counter; 9],
}

impl TypeHandles {
    fn register(source: &str, kind: &str) -> Self {
        let (s, t) = (source.to_owned(), kind.to_owned());
        let settled = |outcome: &'static str, reason: &'static str| {
            metrics::counter!(
                "switchyard_messages_settled_total",
                "source" => s.clone(), "type" => t.clone(), "outcome" => outcome, "reason" => reason
            )
        };
        TypeHandles {
            received: metrics::counter!("switchyard_messages_received_total", "source" => s.clone(), "type" => t.clone()),
            duration: metrics::histogram!("switchyard_handler_duration_seconds", "source" => s.clone(), "type" => t.clone()),
            latency: metrics::histogram!("switchyard_end_to_end_latency_seconds", "source" => s.clone(), "type" => t.clone()),
            attempts: metrics::histogram!("switchyard_delivery_attempts", "source" => s.clone(), "type" => t.clone()),
            settled: ["acked", "duplicate", "rejected", "expired", "retried"]
                .map(|o| settled(o, "")),
            dead_lettered: REASONS.map(|r| settled("dead-lettered", r)),
        }
    }

    fn record(&self, outcome: &Outcome) {
        let counter = match outcome {
            Outcome::Ack(AckReason::Handled) => &self.settled[0],
            Outcome::Ack(AckReason::Duplicate) => &self.settled[1],
            Outcome::Ack(AckReason::Rejected { .. }) => &self.settled[2],
            Outcome::Ack(AckReason::Expired) => &self.settled[3],
            Outcome::Retry { .. } => &self.settled[4],
            Outcome::DeadLetter { reason, .. } => &self.dead_lettered[reason_index(reason)],
        };
        counter.increment(1);
    }
}

/// Handles of one source.
struct SourceHandles {
    source: Arc<str>,
    in_flight: Gauge,
    types: RwLock<HashMap<Box<str>, Arc<TypeHandles>>>,
}

pub(crate) struct Registry {
    known: Option<HashSet<Box<str>>>,
    /// The consumer's source: one `Metrics` normally serves one consumer.
    first: OnceLock<Arc<SourceHandles>>,
    others: RwLock<HashMap<Arc<str>, Arc<SourceHandles>>>,
}

impl Registry {
    pub(crate) fn new(known: Option<HashSet<Box<str>>>) -> Self {
        Registry {
            known,
            first: OnceLock::new(),
            others: RwLock::default(),
        }
    }

    fn source(&self, source: &Arc<str>) -> Arc<SourceHandles> {
        let make = || {
            Arc::new(SourceHandles {
                source: Arc::clone(source),
                in_flight: metrics::gauge!("switchyard_messages_in_flight", "source" => source.to_string()),
                types: RwLock::default(),
            })
        };
        let first = self.first.get_or_init(make);
        if Arc::ptr_eq(&first.source, source) || *first.source == **source {
            return Arc::clone(first);
        }
        if let Some(h) = self
            .others
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(source)
        {
            return Arc::clone(h);
        }
        let mut others = self.others.write().unwrap_or_else(|p| p.into_inner());
        Arc::clone(others.entry(Arc::clone(source)).or_insert_with(make))
    }

    fn types(&self, source: &SourceHandles, kind: &str) -> Arc<TypeHandles> {
        if let Some(h) = source
            .types
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(kind)
        {
            return Arc::clone(h);
        }
        let mut types = source.types.write().unwrap_or_else(|p| p.into_inner());
        let label = match &self.known {
            Some(known) if known.contains(kind) => kind,
            Some(_) => "unknown",
            None if types.len() < MAX_TYPES => kind,
            None => "other",
        };
        let handles = match types.get(label) {
            Some(h) => Arc::clone(h),
            None => Arc::new(TypeHandles::register(&source.source, label)),
        };
        // Unlisted types share their bucket's handles, and are not cached
        // under their own (unbounded) names.
        if label == kind {
            types.insert(kind.into(), Arc::clone(&handles));
        } else {
            types
                .entry(label.into())
                .or_insert_with(|| Arc::clone(&handles));
        }
        handles
    }
}

/// The metrics middleware; see the [module docs](self).
#[derive(Clone)]
pub struct Metrics<S> {
    inner: S,
    registry: Arc<Registry>,
}

impl<S> std::fmt::Debug for Metrics<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl<S> Metrics<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the wrapped service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Decrements the in-flight gauge however the delivery ends.
struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl<S> tower::Service<Incoming> for Metrics<S>
where
    S: tower::Service<Incoming, Response = Outcome>,
{
    type Response = Outcome;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, incoming: Incoming) -> Self::Future {
        let source = self.registry.source(&incoming.source);
        let handles = self.registry.types(&source, &incoming.envelope.kind);
        handles.received.increment(1);
        handles.attempts.record(f64::from(incoming.attempt));
        source.in_flight.increment(1.0);
        let occurred_at = incoming.envelope.occurred_at;
        ResponseFuture {
            inner: self.inner.call(incoming),
            started: Instant::now(),
            occurred_at,
            handles,
            _in_flight: InFlight(source.in_flight.clone()),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Metrics`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        started: Instant,
        occurred_at: SystemTime,
        handles: Arc<TypeHandles>,
        _in_flight: InFlight,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Outcome, E>>,
{
    type Output = Result<Outcome, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        this.handles
            .duration
            .record(this.started.elapsed().as_secs_f64());
        if let Ok(age) = SystemTime::now().duration_since(*this.occurred_at) {
            this.handles.latency.record(age.as_secs_f64());
        }
        if let Ok(outcome) = &out {
            this.handles.record(outcome);
        }
        Poll::Ready(out)
    }
}
