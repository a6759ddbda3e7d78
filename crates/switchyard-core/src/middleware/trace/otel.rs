//! The delivery span's OpenTelemetry parent (feature `opentelemetry`).

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::TraceParent;

/// Makes the incoming context the span's OpenTelemetry parent, and returns
/// the span's own context when an OpenTelemetry tracer gave it a span id
/// (messages published from the handler then point at that span).
pub(super) fn continue_trace(
    span: &Span,
    parent: TraceParent,
    tracestate: Option<&str>,
) -> Option<TraceParent> {
    let remote = SpanContext::new(
        TraceId::from_bytes(parent.trace_id.to_be_bytes()),
        SpanId::from_bytes(parent.span_id.to_be_bytes()),
        TraceFlags::new(parent.flags),
        true,
        tracestate
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default(),
    );
    if span
        .set_parent(opentelemetry::Context::new().with_remote_span_context(remote))
        .is_err()
    {
        return None;
    }
    let cx = span.context();
    let own = cx.span().span_context().clone();
    let span_id = u64::from_be_bytes(own.span_id().to_bytes());
    (own.is_valid() && span_id != parent.span_id).then(|| TraceParent {
        trace_id: u128::from_be_bytes(own.trace_id().to_bytes()),
        span_id,
        flags: own.trace_flags().to_u8(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{TraceContextExt, TraceId};
    use tower::{Service, ServiceExt};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::prelude::*;

    use crate::envelope::Envelope;
    use crate::middleware::trace::Trace;
    use crate::outcome::Outcome;
    use crate::runtime::{Incoming, Publisher};

    #[tokio::test(flavor = "current_thread")]
    async fn the_delivery_span_continues_the_incoming_trace_in_opentelemetry() {
        let tracer = opentelemetry::trace::noop::NoopTracer::new();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer));
        let _guard = tracing::subscriber::set_default(subscriber);
        let seen: Arc<Mutex<Option<TraceId>>> = Arc::default();
        let inner = tower::service_fn({
            let seen = Arc::clone(&seen);
            move |_: Incoming| {
                let cx = tracing::Span::current().context();
                *seen.lock().unwrap() = Some(cx.span().span_context().trace_id());
                async { Ok::<_, std::convert::Infallible>(Outcome::HANDLED) }
            }
        });
        let mut traced = Trace::new(inner);
        let mut env = Envelope::new("t", "{}");
        env.trace.traceparent =
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        let incoming = Incoming::new(
            Arc::new(env),
            Publisher::new(Arc::new(crate::testing::NO_TRANSPORT)),
            "q",
        );
        let outcome = traced.ready().await.unwrap().call(incoming).await.unwrap();
        assert_eq!(outcome, Outcome::HANDLED);
        assert_eq!(
            seen.lock().unwrap().map(|t| t.to_string()),
            Some("4bf92f3577b34da6a3ce929d0e0e4736".to_owned())
        );
    }
}
