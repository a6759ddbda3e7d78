use tower::Layer;

use super::Ordering;

/// Applies [`Ordering`] to a service.
#[derive(Clone, Copy, Debug, Default)]
pub struct OrderingLayer {
    _private: (),
}

impl OrderingLayer {
    /// Per-key ordering.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for OrderingLayer {
    type Service = Ordering<S>;

    fn layer(&self, inner: S) -> Ordering<S> {
        Ordering::new(inner)
    }
}
