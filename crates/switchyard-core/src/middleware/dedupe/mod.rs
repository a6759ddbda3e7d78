//! Idempotent consumption: a message id this consumer already processed is
//! acknowledged as a duplicate without calling the handler.
//!
//! - Two concurrent deliveries of one id never both run the handler: the
//!   second waits (up to `busy_wait`, 30 s by default) for the first and is
//!   then acknowledged as a duplicate, or runs if the first failed; only a
//!   copy still blocked after that is retried through the broker.
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
use std::time::{Duration, Instant};

pub use layer::DedupeLayer;
pub use policy::{Claim, ClaimToken, DedupeStore, MemoryDedupeStore, StoreFuture};

use crate::envelope::Envelope;
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
    busy_wait: Duration,
}

impl<S> std::fmt::Debug for Dedupe<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedupe")
            .field("busy_retry", &self.busy_retry)
            .finish_non_exhaustive()
    }
}

impl<S> Dedupe<S> {
    pub(crate) fn new(
        inner: S,
        store: Option<Arc<dyn DedupeStore>>,
        busy_retry: Duration,
        busy_wait: Duration,
    ) -> Self {
        Dedupe {
            inner,
            store,
            busy_retry,
            busy_wait,
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

/// A stable 64-bit fingerprint of the type, version and payload: the same
/// in every process and release, so shared stores can compare it. Not
/// cryptographic; it tells a reused id from a redelivery.
pub fn fingerprint(envelope: &Envelope) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = u64::from(envelope.schema_version);
    let mut mix = |bytes: &[u8]| {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            h = (h.rotate_left(5) ^ w).wrapping_mul(K);
        }
        let mut tail = [0u8; 8];
        tail[..words.remainder().len()].copy_from_slice(words.remainder());
        h = (h.rotate_left(5) ^ u64::from_le_bytes(tail)).wrapping_mul(K);
        h = (h.rotate_left(5) ^ bytes.len() as u64).wrapping_mul(K);
    };
    mix(envelope.kind.as_bytes());
    mix(&envelope.payload);
    h
}

/// Releases a claim whose delivery was abandoned mid-way (its future
/// dropped, e.g. at shutdown), so that the redelivery can run.
struct ReleaseOnDrop {
    store: Arc<dyn DedupeStore>,
    scope: Arc<str>,
    envelope: Arc<Envelope>,
    token: ClaimToken,
    armed: bool,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let id = &self.envelope.id;
        // An in-process store answers at once: release right here.
        match self.store.release(&self.scope, id, self.token) {
            StoreFuture::Ready(Some(Err(e))) => {
                tracing::warn!(message_id = %id, error = %e, "could not release a dedupe claim");
                return;
            }
            StoreFuture::Ready(_) => return,
            // A networked store: release on a task of its own below.
            StoreFuture::Pending(_) => {}
        }
        let (store, scope, envelope, token) = (
            Arc::clone(&self.store),
            Arc::clone(&self.scope),
            Arc::clone(&self.envelope),
            self.token,
        );
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    let id = &envelope.id;
                    if let Err(e) = store.release(&scope, id, token).await {
                        tracing::warn!(message_id = %id, error = %e, "could not release a dedupe claim");
                    }
                });
            }
            Err(_) => tracing::warn!(
                message_id = %id,
                "no runtime to release a dedupe claim; it stays until it expires"
            ),
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
        let (busy_retry, busy_wait) = (self.busy_retry, self.busy_wait);
        let envelope = Arc::clone(&incoming.envelope);
        let scope = Arc::clone(&incoming.source);
        // Called now (tower's contract after poll_ready), but not polled
        // unless the claim is acquired; inner layers must not act in `call`.
        let handle = self.inner.call(incoming);
        Box::pin(async move {
            let id = &envelope.id;
            let fp = fingerprint(&envelope);
            // A copy being handled right now is waited for here, not sent
            // back through the broker (that would spend an attempt), up to
            // `busy_wait`.
            let waited_from = Instant::now();
            let mut pause = Duration::from_millis(10);
            let token = loop {
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
                    Claim::Acquired(token) => break token,
                    Claim::Duplicate => return Ok(Outcome::Ack(AckReason::Duplicate)),
                    Claim::Conflict => {
                        return Ok(Outcome::DeadLetter {
                            reason: DeadLetterReason::IdReuse,
                            detail: format!(
                                "message id {id} was already processed with a different payload"
                            ),
                        })
                    }
                    Claim::InProgress if waited_from.elapsed() < busy_wait => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                    Claim::InProgress => {
                        return Ok(Outcome::Retry {
                            delay: busy_retry,
                            detail: format!(
                                "message {id} is still being handled by another delivery"
                            ),
                        })
                    }
                }
            };
            let mut guard = ReleaseOnDrop {
                store: Arc::clone(&store),
                scope: Arc::clone(&scope),
                envelope: Arc::clone(&envelope),
                token,
                armed: true,
            };
            let result = handle.await;
            let settled = matches!(
                result,
                Ok(Outcome::Ack(
                    AckReason::Handled | AckReason::Rejected { .. }
                ))
            );
            let recorded = if settled {
                store.complete(&scope, id, fp, token).await
            } else {
                store.release(&scope, id, token).await
            };
            guard.armed = false;
            if let Err(e) = recorded {
                tracing::warn!(message_id = %id, error = %e, settled, "the dedupe store did not record the outcome");
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_tell_payloads_types_and_versions_apart() {
        let a = Envelope::new("t", "payload-one");
        let fp = fingerprint(&a);
        assert_eq!(
            fp,
            fingerprint(&a.clone().with_id("other id")),
            "ids do not count"
        );
        assert_ne!(fp, fingerprint(&Envelope::new("t", "payload-two")));
        assert_ne!(fp, fingerprint(&Envelope::new("u", "payload-one")));
        assert_ne!(fp, fingerprint(&a.clone().with_schema_version(2)));
        // Length is mixed in: trailing zero bytes change it.
        assert_ne!(
            fingerprint(&Envelope::new("t", vec![1u8])),
            fingerprint(&Envelope::new("t", vec![1u8, 0]))
        );
        // Stable across processes and releases.
        assert_eq!(fingerprint(&Envelope::new("t", "x")), 0xb39a_2876_014e_4a88);
    }
}
