//! Idempotent consumption: a message id this consumer already processed is
//! acknowledged as a duplicate without calling the handler.
//!
//! - Two concurrent deliveries of one id never both run the handler: the
//!   second is retried later (through the broker) while the first runs.
//! - An id is recorded only once the handler succeeded (or rejected the
//!   message, which settles it too); a failure releases it, so the
//!   redelivery runs.
//! - The same id with a different payload is not silently a duplicate: it is
//!   dead-lettered with reason `id-reuse`.
//! - If the store cannot be reached, the delivery is retried: without the
//!   store, a duplicate could not be told apart.
//!
//! The store sits behind [`DedupeStore`]; [`MemoryDedupeStore`] is bounded
//! and expires entries.
//!
//! # Example
//!
//! ```
//! use switchyard_core::middleware::dedupe::{DedupeLayer, MemoryDedupeStore};
//! use switchyard_core::{Context, HandleError, Message, Router};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Ping;
//! # impl Message for Ping { const TYPE: &'static str = "ping"; }
//!
//! let router = Router::builder().route(|_: Ping, _: Context| async { Ok::<_, HandleError>(()) }).build();
//! let pipeline = tower::ServiceBuilder::new()
//!     .layer(DedupeLayer::new(MemoryDedupeStore::new()))
//!     .service(router);
//! # let _ = pipeline;
//! ```

mod layer;
mod policy;

use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

pub use layer::DedupeLayer;
pub use policy::{Claim, DedupeStore, MemoryDedupeStore};

use crate::envelope::{Envelope, MessageId};
use crate::outcome::{AckReason, DeadLetterReason, Outcome};
use crate::runtime::Incoming;
use crate::transport::BoxFuture;

/// The dedupe middleware; see the [module docs](self).
#[derive(Clone)]
pub struct Dedupe<S> {
    inner: S,
    /// `None` passes every delivery through (dedupe switched off in a stack).
    store: Option<Arc<dyn DedupeStore>>,
    busy_retry: Duration,
}

impl<S> std::fmt::Debug for Dedupe<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedupe")
            .field("busy_retry", &self.busy_retry)
            .finish_non_exhaustive()
    }
}

impl<S> Dedupe<S> {
    pub(crate) fn new(inner: S, store: Option<Arc<dyn DedupeStore>>, busy_retry: Duration) -> Self {
        Dedupe {
            inner,
            store,
            busy_retry,
        }
    }

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

/// A stable 64-bit FNV-1a fingerprint of the type, version and payload
/// (stable across processes and releases, so shared stores can compare it).
pub fn fingerprint(envelope: &Envelope) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let version = envelope.schema_version.to_be_bytes();
    let parts: [&[u8]; 4] = [envelope.kind.as_bytes(), &[0], &version, &envelope.payload];
    for part in parts {
        for &b in part {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
    }
    h
}

/// Releases a claim whose delivery was abandoned mid-way (its future
/// dropped, e.g. at shutdown), so that the redelivery can run.
struct ReleaseOnDrop {
    store: Arc<dyn DedupeStore>,
    scope: Arc<str>,
    id: MessageId,
    armed: bool,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (store, scope, id) = (
            Arc::clone(&self.store),
            Arc::clone(&self.scope),
            self.id.clone(),
        );
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(e) = store.release(&scope, &id).await {
                    tracing::warn!(message_id = %id, error = %e, "could not release a dedupe claim");
                }
            });
        }
    }
}

impl<S> tower::Service<Incoming> for Dedupe<S>
where
    S: tower::Service<Incoming, Response = Outcome>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Outcome;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Outcome, S::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, incoming: Incoming) -> Self::Future {
        let Some(store) = self.store.clone() else {
            return Box::pin(self.inner.call(incoming));
        };
        let busy_retry = self.busy_retry;
        let envelope = Arc::clone(&incoming.envelope);
        let scope = Arc::clone(&incoming.source);
        // Not polled unless the claim is acquired.
        let handle = self.inner.call(incoming);
        Box::pin(async move {
            let id = &envelope.id;
            let fp = fingerprint(&envelope);
            let claim = match store.claim(&scope, id, fp).await {
                Ok(claim) => claim,
                Err(e) => {
                    return Ok(Outcome::Retry {
                        delay: busy_retry,
                        detail: format!("the dedupe store is unavailable: {e}"),
                    })
                }
            };
            match claim {
                Claim::Duplicate => return Ok(Outcome::Ack(AckReason::Duplicate)),
                Claim::InProgress => {
                    return Ok(Outcome::Retry {
                        delay: busy_retry,
                        detail: format!("message {id} is being handled by another delivery"),
                    })
                }
                Claim::Conflict => {
                    return Ok(Outcome::DeadLetter {
                        reason: DeadLetterReason::IdReuse,
                        detail: format!(
                            "message id {id} was already processed with a different payload"
                        ),
                    })
                }
                Claim::Acquired => {}
            }
            let mut guard = ReleaseOnDrop {
                store: Arc::clone(&store),
                scope: Arc::clone(&scope),
                id: id.clone(),
                armed: true,
            };
            let result = handle.await;
            guard.armed = false;
            let settled = matches!(
                result,
                Ok(Outcome::Ack(
                    AckReason::Handled | AckReason::Rejected { .. }
                ))
            );
            let recorded = if settled {
                store.complete(&scope, id, fp).await
            } else {
                store.release(&scope, id).await
            };
            if let Err(e) = recorded {
                tracing::warn!(message_id = %id, error = %e, settled, "the dedupe store did not record the outcome");
            }
            result
        })
    }
}
