//! One `tracing` span per delivery (`switchyard.delivery`) carrying the
//! message id, type, correlation and causation ids, attempt and consumer,
//! and the outcome once decided.
//!
//! The W3C trace context in the envelope continues: the delivery gets a
//! span id of its own under the incoming `traceparent` (recorded on the
//! span as `trace_id`, `span_id` and `parent_span_id`), and messages the
//! handler publishes carry that context, so a trace runs through the broker
//! from producer to consumer to whatever it publishes. Without an incoming
//! `traceparent` no trace is started.
//!
//! With the `opentelemetry` feature and a `tracing-opentelemetry` layer in
//! the subscriber, the span's OpenTelemetry parent is the incoming context,
//! so the delivery's span joins the producer's trace in any OpenTelemetry
//! backend, and published messages carry the OpenTelemetry span's id.
//!
//! # Example
//!
//! ```
//! use switchyard_core::middleware::trace::TraceLayer;
//! use switchyard_core::{Context, HandleError, Message, Router};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Ping;
//! # impl Message for Ping { const TYPE: &'static str = "ping"; }
//!
//! let router = Router::builder().route(|_: Ping, _: Context| async { Ok::<_, HandleError>(()) }).build();
//! let pipeline = tower::ServiceBuilder::new().layer(TraceLayer::new()).service(router);
//! # let _ = pipeline;
//! ```

mod layer;
#[cfg(feature = "opentelemetry")]
mod otel;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use tracing::Span;

pub use layer::TraceLayer;

use crate::envelope::TraceContext;
use crate::outcome::Outcome;
use crate::runtime::Incoming;

/// A parsed W3C `traceparent` (version 00).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id (32 hex digits), not all zero.
    pub trace_id: u128,
    /// The parent span id (16 hex digits), not all zero.
    pub span_id: u64,
    /// The trace flags (`01` = sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` header; `None` if it is not valid W3C trace
    /// context (it is untrusted input).
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        // Version 00 has exactly four parts; later versions may add more.
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        let hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !(hex(version) && hex(trace) && hex(span) && hex(flags)) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(TraceParent {
            trace_id,
            span_id,
            // Only the flags this version defines (sampled, random) travel on.
            flags: flags & 0x03,
        })
    }

    /// A child: same trace and flags, a new random span id.
    pub fn child(&self) -> Self {
        TraceParent {
            span_id: fastrand::u64(1..),
            ..*self
        }
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

/// The trace middleware; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
}

impl<S> Trace<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Trace { inner }
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

impl<S> tower::Service<Incoming> for Trace<S>
where
    S: tower::Service<Incoming, Response = Outcome>,
{
    type Response = Outcome;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut incoming: Incoming) -> Self::Future {
        let parent = incoming
            .envelope
            .trace
            .traceparent
            .as_deref()
            .and_then(TraceParent::parse);
        let child = parent.map(|p| p.child());
        let env = &incoming.envelope;
        let span = tracing::info_span!(
            "switchyard.delivery",
            message_id = %env.id,
            message_type = %env.kind,
            correlation_id = env.correlation_id.as_deref(),
            causation_id = env.causation_id.as_deref(),
            attempt = incoming.attempt,
            consumer = %incoming.source,
            trace_id = child.map(|c| tracing::field::display(format!("{:032x}", c.trace_id))),
            span_id = child.map(|c| tracing::field::display(format!("{:016x}", c.span_id))),
            parent_span_id = parent.map(|p| tracing::field::display(format!("{:016x}", p.span_id))),
            outcome = tracing::field::Empty,
        );
        // With OpenTelemetry, the span's own id (if a tracer gave it one)
        // is what published messages should point at.
        #[cfg(feature = "opentelemetry")]
        let child = parent
            .and_then(|p| {
                otel::continue_trace(&span, p, incoming.envelope.trace.tracestate.as_deref())
            })
            .or(child);
        incoming.trace = match child {
            Some(child) => TraceContext {
                traceparent: Some(child.to_string()),
                tracestate: incoming.envelope.trace.tracestate.clone(),
            },
            // An invalid traceparent is not passed on (W3C: drop both).
            None => TraceContext::default(),
        };
        let inner = {
            let _entered = span.enter();
            self.inner.call(incoming)
        };
        ResponseFuture { inner, span }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Trace`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        span: Span,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Outcome, E>>,
{
    type Output = Result<Outcome, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let out = std::task::ready!(this.inner.poll(cx));
        match &out {
            Ok(outcome) => {
                this.span.record("outcome", outcome.label());
                if let Outcome::DeadLetter { reason, detail } = outcome {
                    tracing::warn!(%reason, %detail, "dead-lettered");
                }
            }
            Err(_) => {
                this.span.record("outcome", "error");
            }
        }
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_children_keep_the_trace() {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let p = TraceParent::parse(s).unwrap();
        assert_eq!(p.to_string(), s);
        let c = p.child();
        assert_eq!((c.trace_id, c.flags), (p.trace_id, p.flags));
        assert_ne!(c.span_id, p.span_id);
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473\n-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }
}
