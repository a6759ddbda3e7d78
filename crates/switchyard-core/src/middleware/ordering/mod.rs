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

use std::collections::HashMap;
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

/// Hands the turn to the next ticket of the key when dropped, finished or
/// not (a cancelled delivery must not block its key forever).
struct EndOfTurn {
    keys: Keys,
    key: String,
}

impl Drop for EndOfTurn {
    fn drop(&mut self) {
        let mut keys = lock(&self.keys);
        let Some(turns) = keys.get_mut(&self.key) else {
            return;
        };
        turns.serving += 1;
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
        let Some(key) = incoming.envelope.partition_key.clone() else {
            return Either::Left(self.inner.call(incoming));
        };
        // The ticket is taken now, synchronously, in delivery order.
        let (ticket, turn) = {
            let mut keys = lock(&self.keys);
            let turns = keys.entry(key.clone()).or_default();
            let ticket = turns.next_ticket;
            turns.next_ticket += 1;
            (ticket, Arc::clone(&turns.turn))
        };
        let keys = Arc::clone(&self.keys);
        let handle = self.inner.call(incoming);
        Either::Right(Box::pin(async move {
            let end = EndOfTurn { keys, key };
            loop {
                let notified = turn.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let serving = lock(&end.keys).get(&end.key).map_or(ticket, |t| t.serving);
                if serving == ticket {
                    break;
                }
                notified.await;
            }
            let result = handle.await;
            drop(end);
            result
        }))
    }
}
