//! The pipeline layers that make a consumer more than a receive loop.
//!
//! Each is a tower [`Layer`](tower::Layer) in a module of its own, usable
//! alone or in any `tower::ServiceBuilder`; [`Stack`] puts them together in
//! the canonical order, and
//! [`ConsumerBuilder::serve_default`](crate::ConsumerBuilder::serve_default)
//! does that in one call.
//!
//! # Order
//!
//! The first layer added is the outermost: it sees the delivery first and
//! the outcome last. The canonical stack, outermost first:
//!
//! | layer | why there |
//! | --- | --- |
//! | [`metrics`] | counts everything, including what the layers below reject |
//! | [`trace`] | one span around all the work, so every log line has the message id |
//! | [`validate`] | bad input never reaches dedupe stores or handlers |
//! | [`deadline`] | expired work is not started (and takes no dedupe claim or ordering turn) |
//! | [`dedupe`] | a duplicate is acknowledged before it takes an ordering turn; records only the final outcome of retry |
//! | [`ordering`] | one message per partition key at a time, in delivery order |
//! | [`retry`] | classifies the handler's outcome (including timeouts) into backoff or dead-letter |
//! | [`timeout`] | innermost, so a timeout is a transient failure that retry classifies |
//!
//! tower's own layers (`ConcurrencyLimit`, `RateLimit`, `Timeout`,
//! `LoadShed`) drop into the same stack unmodified: the runtime waits for
//! `poll_ready` before it pulls a message, and treats a layer's error as a
//! transient failure.

pub mod deadline;
pub mod dedupe;
pub mod metrics;
pub mod ordering;
pub mod retry;
pub mod timeout;
pub mod trace;
pub mod validate;

use std::time::Duration;

use tower::Layer;

use crate::router::Router;
use deadline::{Deadline, DeadlineLayer, DeadlinePolicy};
use dedupe::{Dedupe, DedupeLayer, DedupeStore, MemoryDedupeStore};
use metrics::{Metrics, MetricsLayer};
use ordering::{Ordering, OrderingLayer};
use retry::{Retry, RetryEvent, RetryLayer, RetryPolicy};
use timeout::{Timeout, TimeoutLayer};
use trace::{Trace, TraceLayer};
use validate::{Validate, ValidateLayer};

/// The canonical stack around a [`Router`], outermost first.
pub type DefaultStack =
    Metrics<Trace<Validate<Deadline<Dedupe<Ordering<Retry<Timeout<Router>>>>>>>>;

/// Builds the canonical stack (see [Order](self#order)).
///
/// Defaults: payloads up to 1 MiB; expired messages dead-lettered;
/// deduplication in a [`MemoryDedupeStore`]; per-key ordering; exponential
/// backoff with full jitter within the consumer's attempt budget; handlers
/// time out after 30 s.
///
/// ```
/// use std::time::Duration;
/// use switchyard_core::middleware::Stack;
/// use switchyard_core::middleware::deadline::DeadlinePolicy;
/// use switchyard_core::{Context, HandleError, Message, Router};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Ping;
/// # impl Message for Ping { const TYPE: &'static str = "ping"; }
///
/// let router = Router::builder().route(|_: Ping, _: Context| async { Ok::<_, HandleError>(()) }).build();
/// let pipeline = Stack::new()
///     .timeout(Duration::from_secs(5))
///     .deadline(DeadlinePolicy::Drop)
///     .on_dead_letter(|event, reason| eprintln!("{} dead-lettered: {reason}", event.message_id))
///     .build(router);
/// # let _ = pipeline;
/// ```
pub struct Stack {
    max_payload: usize,
    deadline: DeadlinePolicy,
    dedupe: DedupeLayer,
    retry: RetryLayer,
    timeout: Duration,
}

impl Default for Stack {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("max_payload", &self.max_payload)
            .field("deadline", &self.deadline)
            .field("dedupe", &self.dedupe)
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Stack {
    /// The canonical stack with its defaults.
    pub fn new() -> Self {
        Stack {
            max_payload: 1024 * 1024,
            deadline: DeadlinePolicy::DeadLetter,
            dedupe: DedupeLayer::new(MemoryDedupeStore::new()),
            retry: RetryLayer::new(),
            timeout: Duration::from_secs(30),
        }
    }

    /// The largest payload accepted (checked before decoding).
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// What to do with expired messages.
    pub fn deadline(mut self, policy: DeadlinePolicy) -> Self {
        self.deadline = policy;
        self
    }

    /// Deduplicates through `store`.
    pub fn dedupe_store(mut self, store: impl DedupeStore) -> Self {
        self.dedupe = DedupeLayer::new(store).busy_retry(self.dedupe.busy_retry_delay());
        self
    }

    /// How long a copy of a message that is being handled right now (or one
    /// that met an unreachable dedupe store) is held back. Default 1 s.
    pub fn dedupe_busy_retry(mut self, delay: std::time::Duration) -> Self {
        self.dedupe = self.dedupe.busy_retry(delay);
        self
    }

    /// No deduplication (handlers are idempotent by themselves).
    pub fn without_dedupe(mut self) -> Self {
        self.dedupe = DedupeLayer::disabled();
        self
    }

    /// The retry backoff policy.
    pub fn retry_policy(mut self, policy: impl RetryPolicy) -> Self {
        self.retry = self.retry.policy(policy);
        self
    }

    /// Calls `hook` for each retry, with the delay chosen.
    pub fn on_retry<F>(mut self, hook: F) -> Self
    where
        F: Fn(&RetryEvent<'_>, Duration) + Send + Sync + 'static,
    {
        self.retry = self.retry.on_retry(hook);
        self
    }

    /// Calls `hook` for each dead-letter the retry layer sees: permanent
    /// errors, exhausted attempts (timeouts and panics included) and what
    /// the router refuses (undecodable payloads). Dead-letters decided by
    /// the outer layers (validate, deadline, dedupe's `id-reuse`) do not
    /// pass through it; the metrics layer counts every dead-letter.
    pub fn on_dead_letter<F>(mut self, hook: F) -> Self
    where
        F: Fn(&RetryEvent<'_>, &crate::DeadLetterReason) + Send + Sync + 'static,
    {
        self.retry = self.retry.on_dead_letter(hook);
        self
    }

    /// How long a handler may run.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit;
        self
    }

    /// Wraps `router` in the stack.
    pub fn build(self, router: Router) -> DefaultStack {
        let metrics = MetricsLayer::for_router(&router);
        let validate = ValidateLayer::for_router(&router).max_payload(self.max_payload);
        let inner = TimeoutLayer::new(self.timeout).layer(router);
        let inner = self.retry.layer(inner);
        let inner = OrderingLayer::new().layer(inner);
        let inner = self.dedupe.layer(inner);
        let inner = DeadlineLayer::new(self.deadline).layer(inner);
        let inner = validate.layer(inner);
        let inner = TraceLayer::new().layer(inner);
        metrics.layer(inner)
    }
}
