//! Per partition key, one message at a time and in delivery order, while
//! different keys run concurrently. Messages without a partition key are
//! not held back.
//!
//! Order is taken when the runtime hands the delivery over (in the order
//! the broker delivered), so it holds as far as the broker delivers in
//! order (see the transport's `ordering` capability). A retried message
//! comes back later, behind messages of its key that arrived meanwhile: for
//! projections that must not apply an event twice or out of order, check
//! versions with [`VersionGate`].
//!
//! # Example
//!
//! ```
//! use switchyard_core::middleware::ordering::OrderingLayer;
//! use switchyard_core::{Context, HandleError, Message, Router};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Ping;
//! # impl Message for Ping { const TYPE: &'static str = "ping"; }
//!
//! let router = Router::builder().route(|_: Ping, _: Context| async { Ok::<_, HandleError>(()) }).build();
//! let pipeline = tower::ServiceBuilder::new().layer(OrderingLayer::new()).service(router);
//! # let _ = pipeline;
//! ```

mod layer;
mod version_gate;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use futures_util::future::Either;
use tokio::sync::Notify;

pub use layer::OrderingLayer;
pub use version_gate::{GateDecision, VersionGate};

use crate::outcome::Outcome;
use crate::runtime::Incoming;
use crate::transport::BoxFuture;

/// One key's queue: tickets are handed out in delivery order and served
/// one at a time.
#[derive(Default)]
struct Turns {
    next_ticket: u64,
    serving: u64,
    /// Tickets given up before their turn (their delivery was dropped
    /// unhandled): skipped when the turn reaches them.
    abandoned: BTreeSet<u64>,
    turn: Arc<Notify>,
}

type Keys = Arc<Mutex<HashMap<String, Turns>>>;

/// The ordering middleware; see the [module docs](self).
#[derive(Clone, Default)]
pub struct Ordering<S> {
    inner: S,
    keys: Keys,
}

impl<S> std::fmt::Debug for Ordering<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ordering").finish_non_exhaustive()
    }
}

impl<S> Ordering<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Ordering {
            inner,
            keys: Keys::default(),
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

fn lock(keys: &Keys) -> std::sync::MutexGuard<'_, HashMap<String, Turns>> {
    keys.lock().unwrap_or_else(|p| p.into_inner())
}

/// A place in a key's queue. Dropped in any state (finished, cancelled while
/// waiting, or never polled because an outer layer decided without the
/// handler), it hands the turn on or marks itself skipped, so a key is
/// never blocked by a delivery that will not run.
struct Ticket {
    keys: Keys,
    key: String,
    ticket: u64,
}

impl Ticket {
    fn is_turn(&self) -> bool {
        lock(&self.keys)
            .get(&self.key)
            .is_some_and(|t| t.serving == self.ticket)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut keys = lock(&self.keys);
        let Some(turns) = keys.get_mut(&self.key) else {
            return;
        };
        if turns.serving != self.ticket {
            turns.abandoned.insert(self.ticket);
            return;
        }
        turns.serving += 1;
        while turns.abandoned.remove(&turns.serving) {
            turns.serving += 1;
        }
        if turns.serving == turns.next_ticket {
            keys.remove(&self.key);
        } else {
            turns.turn.notify_waiters();
        }
    }
}

impl<S> tower::Service<Incoming> for Ordering<S>
where
    S: tower::Service<Incoming, Response = Outcome>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Outcome;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<Outcome, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, incoming: Incoming) -> Self::Future {
        let Some(key) = incoming.envelope.partition_key.as_deref() else {
            return Either::Left(self.inner.call(incoming));
        };
        // The ticket is taken now, synchronously, in delivery order, and its
        // guard exists before anything else can fail or be dropped.
        let (ticket, turn) = {
            let mut keys = lock(&self.keys);
            let turns = match keys.get_mut(key) {
                Some(turns) => turns,
                None => keys.entry(key.to_owned()).or_default(),
            };
            let ticket = turns.next_ticket;
            turns.next_ticket += 1;
            (
                Ticket {
                    keys: Arc::clone(&self.keys),
                    key: key.to_owned(),
                    ticket,
                },
                Arc::clone(&turns.turn),
            )
        };
        let handle = self.inner.call(incoming);
        Either::Right(Box::pin(async move {
            loop {
                let notified = turn.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if ticket.is_turn() {
                    break;
                }
                notified.await;
            }
            let result = handle.await;
            drop(ticket);
            result
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tower::Service;

    use super::*;
    use crate::envelope::Envelope;
    use crate::runtime::{Incoming, Publisher};

    fn keyed(key: &str) -> Incoming {
        let env = Envelope::new("t", "{}").with_partition_key(key);
        Incoming::new(
            Arc::new(env),
            Publisher::new(Arc::new(crate::testing::NO_TRANSPORT)),
            "q",
        )
    }

    fn service() -> Ordering<
        impl Service<Incoming, Response = Outcome, Error = std::convert::Infallible, Future: Send>
            + Clone,
    > {
        Ordering::new(tower::service_fn(|_: Incoming| async {
            Ok::<_, std::convert::Infallible>(Outcome::HANDLED)
        }))
    }

    #[tokio::test]
    async fn a_delivery_dropped_before_its_turn_does_not_block_its_key() {
        let mut svc = service();
        let first = svc.call(keyed("k"));
        let second = svc.call(keyed("k"));
        let third = svc.call(keyed("k"));
        // An outer layer decides without the handler (a duplicate, say):
        // the second is dropped unpolled, the first never polled either.
        drop(second);
        drop(first);
        let out = tokio::time::timeout(Duration::from_secs(1), third).await;
        assert_eq!(
            out.expect("the key is not blocked").unwrap(),
            Outcome::HANDLED
        );
        assert!(lock(&svc.keys).is_empty(), "finished keys are forgotten");
    }

    #[tokio::test]
    async fn a_waiting_delivery_cancelled_does_not_let_a_later_one_overtake() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
        let mut svc = Ordering::new(tower::service_fn(move |i: Incoming| {
            let rx = Arc::clone(&rx);
            async move {
                if i.envelope.payload.as_ref() == b"slow" {
                    let rx = rx.lock().await.take().unwrap();
                    let _ = rx.await;
                }
                Ok::<_, std::convert::Infallible>(Outcome::HANDLED)
            }
        }));
        let slow = {
            let env = Envelope::new("t", "slow").with_partition_key("k");
            svc.call(Incoming::new(
                Arc::new(env),
                Publisher::new(Arc::new(crate::testing::NO_TRANSPORT)),
                "q",
            ))
        };
        let slow = tokio::spawn(slow);
        tokio::task::yield_now().await;
        let cancelled = svc.call(keyed("k"));
        let mut last = tokio::spawn(svc.call(keyed("k")));
        drop(cancelled);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut last)
                .await
                .is_err(),
            "ran while the first of its key was still running"
        );
        tx.send(()).unwrap();
        slow.await.unwrap().unwrap();
        tokio::time::timeout(Duration::from_secs(1), last)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
