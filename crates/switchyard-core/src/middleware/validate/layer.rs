use std::collections::HashMap;
use std::sync::Arc;

use tower::Layer;

use super::{Limits, Validate};
use crate::router::Router;

/// Applies [`Validate`] to a service.
///
/// Defaults: payloads up to 1 MiB, ids up to 256 bytes, JSON nesting up to
/// 64 levels, any type and version (use [`for_router`](Self::for_router) to
/// accept only what a router handles).
#[derive(Clone, Debug, Default)]
pub struct ValidateLayer {
    limits: Limits,
}

impl ValidateLayer {
    /// Validation with the default limits, accepting any type.
    pub fn new() -> Self {
        Self::default()
    }

    /// Validation that also accepts only the types and versions `router`
    /// handles.
    pub fn for_router(router: &Router) -> Self {
        let mut known: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        for (kind, version) in router.routes() {
            known.entry(kind.into()).or_default().push(version);
        }
        ValidateLayer {
            limits: Limits {
                known: Some(Arc::new(known)),
                ..Limits::default()
            },
        }
    }

    /// The largest payload accepted, in bytes; checked before decoding.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.limits.max_payload = bytes;
        self
    }

    /// The longest message id accepted, in bytes.
    pub fn max_id_len(mut self, bytes: usize) -> Self {
        self.limits.max_id_len = bytes;
        self
    }

    /// The deepest JSON nesting accepted.
    pub fn max_depth(mut self, depth: usize) -> Self {
        self.limits.max_depth = depth;
        self
    }
}

impl<S> Layer<S> for ValidateLayer {
    type Service = Validate<S>;

    fn layer(&self, inner: S) -> Validate<S> {
        Validate::new(inner, Arc::new(self.limits.clone()))
    }
}
