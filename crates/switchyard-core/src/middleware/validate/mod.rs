//! Rejects bad input before anything else looks at it: an incomplete or
//! malformed envelope, an oversized payload, an unknown type or schema
//! version, or JSON nested too deeply. Rejections dead-letter at once with a
//! precise reason (`malformed`, `too-large`, `unknown-type`,
//! `unsupported-version`) and are never retried.
//!
//! # Example
//!
//! ```
//! use switchyard_core::middleware::validate::ValidateLayer;
//! use switchyard_core::{Context, HandleError, Message, Router};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Ping;
//! # impl Message for Ping { const TYPE: &'static str = "ping"; }
//!
//! let router = Router::builder().route(|_: Ping, _: Context| async { Ok::<_, HandleError>(()) }).build();
//! let pipeline = tower::ServiceBuilder::new()
//!     .layer(ValidateLayer::for_router(&router).max_payload(64 * 1024))
//!     .service(router);
//! # let _ = pipeline;
//! ```

mod layer;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use futures_util::future::{Either, Ready};

pub use layer::ValidateLayer;

use crate::envelope::{Envelope, MessageId};
use crate::header_names;
use crate::outcome::{DeadLetterReason, Outcome};
use crate::runtime::Incoming;

/// The limits [`Validate`] enforces.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub(crate) max_payload: usize,
    pub(crate) max_id_len: usize,
    pub(crate) max_depth: usize,
    /// Known types and their versions; `None` accepts any.
    pub(crate) known: Option<Arc<HashMap<Box<str>, Vec<u32>>>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: 1024 * 1024,
            max_id_len: 256,
            max_depth: 64,
            known: None,
        }
    }
}

/// The validate middleware; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Validate<S> {
    inner: S,
    limits: Arc<Limits>,
}

impl<S> Validate<S> {
    pub(crate) fn new(inner: S, limits: Arc<Limits>) -> Self {
        Validate { inner, limits }
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

impl<S> tower::Service<Incoming> for Validate<S>
where
    S: tower::Service<Incoming, Response = Outcome>,
{
    type Response = Outcome;
    type Error = S::Error;
    type Future = Either<Ready<Result<Outcome, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, incoming: Incoming) -> Self::Future {
        match check(&incoming.envelope, &self.limits) {
            Ok(()) => Either::Right(self.inner.call(incoming)),
            Err((reason, detail)) => {
                tracing::debug!(message_id = %incoming.envelope.id, %reason, %detail, "invalid message");
                Either::Left(futures_util::future::ready(Ok(Outcome::DeadLetter {
                    reason,
                    detail,
                })))
            }
        }
    }
}

/// Escapes control characters and cuts `s` to `max` characters, for
/// quoting untrusted input in a dead-letter detail or a log line.
pub(crate) fn quote(s: &str, max: usize) -> String {
    let mut out = String::from("\"");
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if crate::envelope::must_escape(c) || c == '"' || c == '\\' {
            let _ = write!(out, "{}", c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('"');
    out
}

fn malformed(detail: String) -> Result<(), (DeadLetterReason, String)> {
    Err((DeadLetterReason::Malformed, detail))
}

fn check(env: &Envelope, limits: &Limits) -> Result<(), (DeadLetterReason, String)> {
    check_id(&env.id, limits)?;
    if env.kind.is_empty() {
        return malformed("the message type is empty".into());
    }
    if env.kind.len() > 256 || env.kind.chars().any(char::is_control) {
        return malformed(format!(
            "the message type {} is not a valid type name",
            quote(&env.kind, 64)
        ));
    }
    if env.schema_version == 0 {
        return malformed("schema version 0 is not valid (versions start at 1)".into());
    }
    for name in header_names::PARSED_FIELDS {
        if let Some(raw) = env.headers.get(name) {
            return malformed(format!("header {name} does not parse: {}", quote(raw, 64)));
        }
    }
    if env.payload.len() > limits.max_payload {
        return Err((
            DeadLetterReason::TooLarge,
            format!(
                "payload of {} bytes is over the limit of {} bytes",
                env.payload.len(),
                limits.max_payload
            ),
        ));
    }
    if let Some(known) = &limits.known {
        match known.get(env.kind.as_str()) {
            None => {
                return Err((
                    DeadLetterReason::UnknownType,
                    format!("no handler for message type {}", quote(&env.kind, 64)),
                ))
            }
            Some(versions) if !versions.contains(&env.schema_version) => {
                return Err((
                    DeadLetterReason::UnsupportedVersion,
                    format!(
                        "{} is handled in schema versions {versions:?}, not {}",
                        quote(&env.kind, 64),
                        env.schema_version
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    let json = env.content_type.as_deref().is_none_or(|ct| {
        ct.as_bytes()
            .windows(4)
            .any(|w| w.eq_ignore_ascii_case(b"json"))
    });
    if json {
        if env.payload.is_empty() {
            return malformed("the payload is empty".into());
        }
        if let Some(depth) = nesting_over(&env.payload, limits.max_depth) {
            return malformed(format!(
                "JSON nested {depth} levels deep, over the limit of {}",
                limits.max_depth
            ));
        }
    }
    Ok(())
}

fn check_id(id: &MessageId, limits: &Limits) -> Result<(), (DeadLetterReason, String)> {
    let id = id.as_str();
    if id.trim().is_empty() {
        return malformed("the message id is empty".into());
    }
    if id.len() > limits.max_id_len {
        return malformed(format!(
            "the message id is {} bytes, over the limit of {}: {}",
            id.len(),
            limits.max_id_len,
            quote(id, 64)
        ));
    }
    if id.chars().any(char::is_control) {
        return malformed(format!(
            "the message id contains control characters: {}",
            quote(id, 64)
        ));
    }
    Ok(())
}

/// The nesting depth once it exceeds `max`, scanning without parsing (a
/// nesting bomb must not reach the decoder's recursion).
fn nesting_over(json: &[u8], max: usize) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Some(depth);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_counted_outside_strings_only() {
        assert_eq!(nesting_over(b"[[[1]]]", 3), None);
        assert_eq!(nesting_over(b"[[[[1]]]]", 3), Some(4));
        assert_eq!(nesting_over(br#"{"a":"[[[[[[\"]]"}"#, 3), None);
    }

    #[test]
    fn quoting_escapes_and_cuts() {
        assert_eq!(quote("a\r\nb", 10), "\"a\\r\\nb\"");
        assert_eq!(quote("abcdef", 3), "\"abc…\"");
    }
}
