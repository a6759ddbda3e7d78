//! Gives up on a handler that runs past its limit: its cancellation token
//! is cancelled, its future dropped, and the delivery fails transiently
//! (so the retry layer decides whether it comes back).
//!
//! Unlike tower's own `Timeout` (which also works in the pipeline, as a
//! layer error), this one tells the handler through
//! [`Context::cancellation`](crate::Context::cancellation) and yields an
//! [`Outcome`] with a readable detail.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use switchyard_core::middleware::timeout::TimeoutLayer;
//! use switchyard_core::{Context, HandleError, Message, Router};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Ping;
//! # impl Message for Ping { const TYPE: &'static str = "ping"; }
//!
//! let router = Router::builder().route(|_: Ping, _: Context| async { Ok::<_, HandleError>(()) }).build();
//! let pipeline = tower::ServiceBuilder::new()
//!     .layer(TimeoutLayer::new(Duration::from_secs(30)))
//!     .service(router);
//! # let _ = pipeline;
//! ```

mod layer;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use layer::TimeoutLayer;

use crate::outcome::Outcome;
use crate::runtime::Incoming;

/// The timeout middleware; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    limit: Duration,
}

impl<S> Timeout<S> {
    /// Wraps `inner`, allowing each call `limit`.
    pub fn new(inner: S, limit: Duration) -> Self {
        Timeout { inner, limit }
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

impl<S> tower::Service<Incoming> for Timeout<S>
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
        let cancel = incoming.cancel.clone();
        ResponseFuture {
            inner: self.inner.call(incoming),
            sleep: None,
            cancel,
            limit: self.limit,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Timeout`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Armed when the handler first returns `Pending`: a handler done on
        // its first poll never touches the timer wheel, and time spent
        // waiting in outer layers (ordering, dedupe) is not the handler's.
        #[pin]
        sleep: Option<tokio::time::Sleep>,
        cancel: CancellationToken,
        limit: Duration,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Outcome, E>>,
{
    type Output = Result<Outcome, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(out) = this.inner.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        if this.sleep.is_none() {
            this.sleep.set(Some(tokio::time::sleep(*this.limit)));
        }
        let sleep = this.sleep.as_pin_mut().expect("armed above");
        std::task::ready!(sleep.poll(cx));
        this.cancel.cancel();
        // One more poll: a handler that watches its token may finish (and
        // clean up) right away.
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(out);
        }
        Poll::Ready(Ok(Outcome::Retry {
            delay: Duration::ZERO,
            detail: format!("the handler timed out after {:?}", this.limit),
        }))
    }
}
