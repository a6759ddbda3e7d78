use tower::Layer;

use super::{Deadline, DeadlinePolicy};

/// Applies [`Deadline`] to a service.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeadlineLayer {
    policy: DeadlinePolicy,
}

impl DeadlineLayer {
    /// Expired deliveries are handled by `policy`.
    pub fn new(policy: DeadlinePolicy) -> Self {
        DeadlineLayer { policy }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline::new(inner, self.policy)
    }
}
