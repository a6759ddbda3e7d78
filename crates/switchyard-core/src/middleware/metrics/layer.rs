use std::collections::HashSet;
use std::sync::Arc;

use tower::Layer;

use super::{Metrics, Registry};
use crate::router::Router;

/// Applies [`Metrics`] to a service.
#[derive(Clone, Debug, Default)]
pub struct MetricsLayer {
    known: Option<HashSet<Box<str>>>,
}

impl MetricsLayer {
    /// Metrics labelled with the first 100 distinct types seen.
    pub fn new() -> Self {
        Self::default()
    }

    /// Metrics labelled with the types `router` handles; any other type is
    /// labelled `unknown`.
    pub fn for_router(router: &Router) -> Self {
        MetricsLayer {
            known: Some(router.routes().map(|(kind, _)| kind.into()).collect()),
        }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;

    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics {
            inner,
            registry: Arc::new(Registry::new(self.known.clone())),
        }
    }
}
