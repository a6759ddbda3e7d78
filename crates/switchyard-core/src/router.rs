//! Dispatch by message type and version: the innermost service of the
//! pipeline.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use futures_util::future::{FutureExt, Map};

use crate::handler::{Context, ErrorClass, HandleError, Handler};
use crate::message::{Codec, JsonCodec, Message};
use crate::outcome::{AckReason, DeadLetterReason, Outcome};
use crate::runtime::Incoming;
use crate::transport::BoxFuture;

type RouteFn = dyn Fn(Incoming) -> BoxFuture<'static, Outcome> + Send + Sync;

/// Handlers of one message type, by schema version.
type Versions = Vec<(u32, Arc<RouteFn>)>;

/// Dispatches each delivery to the handler registered for its type and
/// schema version, decoding the payload (JSON by default).
///
/// It never fails: an unknown type, an unsupported version or a payload that
/// does not decode becomes a dead-letter [`Outcome`]; a handler error becomes
/// the outcome of its class; a handler panic is a transient failure of that
/// message alone.
#[derive(Clone)]
pub struct Router {
    /// Sorted by type, for a binary search: cheaper per delivery than
    /// hashing the type (SipHash) for the few types a router has.
    routes: Arc<[(Box<str>, Versions)]>,
}

impl Router {
    /// Starts a router.
    pub fn builder() -> RouterBuilder {
        RouterBuilder {
            routes: HashMap::new(),
        }
    }

    /// The `(type, version)` pairs this router handles.
    pub fn routes(&self) -> impl Iterator<Item = (&str, u32)> {
        self.routes
            .iter()
            .flat_map(|(k, vs)| vs.iter().map(move |(v, _)| (&**k, *v)))
    }

    /// Whether a handler exists for `kind` in any version.
    pub fn knows(&self, kind: &str) -> bool {
        self.versions(kind).is_some()
    }

    fn versions(&self, kind: &str) -> Option<&Versions> {
        self.routes
            .binary_search_by(|(k, _)| (**k).cmp(kind))
            .ok()
            .map(|i| &self.routes[i].1)
    }

    fn dispatch(&self, incoming: Incoming) -> BoxFuture<'static, Outcome> {
        let env = &incoming.envelope;
        let Some(versions) = self.versions(&env.kind) else {
            let detail = format!("no handler for message type {:?}", env.kind);
            return Box::pin(async move {
                Outcome::DeadLetter {
                    reason: DeadLetterReason::UnknownType,
                    detail,
                }
            });
        };
        let Some((_, route)) = versions.iter().find(|(v, _)| *v == env.schema_version) else {
            let mut known: Vec<u32> = versions.iter().map(|(v, _)| *v).collect();
            known.sort_unstable();
            let detail = format!(
                "{:?} has no handler for schema version {} (handled: {:?})",
                env.kind, env.schema_version, known
            );
            return Box::pin(async move {
                Outcome::DeadLetter {
                    reason: DeadLetterReason::UnsupportedVersion,
                    detail,
                }
            });
        };
        route(incoming)
    }
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut routes: Vec<_> = self.routes().collect();
        routes.sort();
        f.debug_struct("Router").field("routes", &routes).finish()
    }
}

impl tower::Service<Incoming> for Router {
    type Response = Outcome;
    type Error = Infallible;
    type Future = Map<BoxFuture<'static, Outcome>, fn(Outcome) -> Result<Outcome, Infallible>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, incoming: Incoming) -> Self::Future {
        self.dispatch(incoming).map(Ok)
    }
}

/// Builds a [`Router`].
pub struct RouterBuilder {
    routes: HashMap<Box<str>, Versions>,
}

impl RouterBuilder {
    /// Routes messages of type `M::TYPE`, version `M::VERSION`, to `handler`,
    /// decoding JSON.
    ///
    /// # Panics
    ///
    /// If a handler for the same type and version is already registered.
    pub fn route<M, H>(self, handler: H) -> Self
    where
        M: Message,
        H: Handler<M>,
    {
        self.route_with_codec::<M, H, JsonCodec>(handler, JsonCodec)
    }

    /// Like [`route`](Self::route), with another codec.
    pub fn route_with_codec<M, H, C>(mut self, handler: H, codec: C) -> Self
    where
        M: Message,
        H: Handler<M>,
        C: Codec,
    {
        let handler = Arc::new(handler);
        let codec = Arc::new(codec);
        let route: Arc<RouteFn> = Arc::new(move |incoming: Incoming| {
            let handler = Arc::clone(&handler);
            let codec = Arc::clone(&codec);
            Box::pin(async move {
                let msg = match codec.decode::<M>(&incoming.envelope.payload) {
                    Ok(msg) => msg,
                    Err(e) => {
                        return Outcome::DeadLetter {
                            reason: DeadLetterReason::Malformed,
                            detail: HandleError::permanent(e).detail(),
                        }
                    }
                };
                let cx = Context::new(incoming);
                let result = AssertUnwindSafe(handler.handle(msg, &cx))
                    .catch_unwind()
                    .await;
                match result {
                    Ok(Ok(())) => Outcome::HANDLED,
                    Ok(Err(e)) => classify(&e),
                    Err(panic) => Outcome::Retry {
                        delay: Duration::ZERO,
                        detail: format!("handler panicked: {}", panic_message(&*panic)),
                    },
                }
            }) as BoxFuture<'static, Outcome>
        });
        let versions = self.routes.entry(M::TYPE.into()).or_default();
        assert!(
            versions.iter().all(|(v, _)| *v != M::VERSION),
            "a handler for {} v{} is already registered",
            M::TYPE,
            M::VERSION
        );
        versions.push((M::VERSION, route));
        self
    }

    /// Finishes the router.
    pub fn build(self) -> Router {
        let mut routes: Vec<_> = self.routes.into_iter().collect();
        routes.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
        Router {
            routes: routes.into(),
        }
    }
}

/// The outcome a classified error leads to without any middleware:
/// transient -> retry (after the error's `retry_after`, else at once),
/// permanent -> dead-letter, rejected -> ack.
pub fn classify(error: &HandleError) -> Outcome {
    match error.class() {
        ErrorClass::Transient => Outcome::Retry {
            delay: error.retry_after().unwrap_or(Duration::ZERO),
            detail: error.detail(),
        },
        ErrorClass::Permanent => Outcome::DeadLetter {
            reason: error
                .reason()
                .cloned()
                .unwrap_or(DeadLetterReason::Permanent),
            detail: error.detail(),
        },
        ErrorClass::Rejected => Outcome::Ack(AckReason::Rejected {
            detail: error.detail(),
        }),
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "non-string panic payload"
    }
}
