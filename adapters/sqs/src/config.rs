//! How to reach SQS and how queues behave.

use std::fmt;
use std::time::Duration;

/// The longest long-poll SQS allows.
pub const MAX_WAIT: Duration = Duration::from_secs(20);
/// The longest visibility timeout SQS allows, counted from receipt.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);
/// Room under the queue's maximum message size kept for the attributes
/// that carry the envelope; the declared payload limit is what remains.
pub const ATTRIBUTE_ROOM: usize = 8 * 1024;

/// Settings of an [`SqsTransport`](crate::SqsTransport). `Debug` never
/// shows the secret key.
///
/// Credentials and region come from the standard AWS chain (environment,
/// profile, web identity, ECS/IMDS) unless set here.
#[derive(Clone)]
pub struct SqsConfig {
    pub(crate) endpoint: Option<String>,
    pub(crate) region: Option<String>,
    pub(crate) profile: Option<String>,
    pub(crate) credentials: Option<(String, String)>,
    pub(crate) wait_time: Duration,
    pub(crate) receive_timeout_margin: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) visibility_timeout: Duration,
    pub(crate) max_message_size: usize,
    pub(crate) settle_linger: Duration,
    pub(crate) redrive_max_receive_count: Option<u32>,
    pub(crate) fifo: bool,
    pub(crate) default_group: String,
}

impl Default for SqsConfig {
    fn default() -> Self {
        SqsConfig {
            endpoint: None,
            region: None,
            profile: None,
            credentials: None,
            wait_time: MAX_WAIT,
            receive_timeout_margin: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            visibility_timeout: Duration::from_secs(30),
            max_message_size: 1024 * 1024,
            settle_linger: Duration::from_millis(10),
            redrive_max_receive_count: None,
            fifo: false,
            default_group: "switchyard".to_owned(),
        }
    }
}

impl SqsConfig {
    /// The defaults: the standard credential and region chain, 20 s long
    /// polls, a 30 s visibility timeout for declared queues, standard queues.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends requests to `url` instead of AWS (a local SQS-compatible server).
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoint = Some(url.into());
        self
    }

    /// The region (otherwise from `AWS_REGION` or the profile).
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// The profile of the shared AWS config files to use.
    pub fn profile(mut self, profile: impl Into<String>) -> Self {
        self.profile = Some(profile.into());
        self
    }

    /// Static credentials instead of the chain (for local servers and tests).
    pub fn static_credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        self.credentials = Some((access_key_id.into(), secret_access_key.into()));
        self
    }

    /// How long a receive waits for messages (long polling); at most 20 s.
    pub fn wait_time(mut self, wait: Duration) -> Self {
        self.wait_time = wait.min(MAX_WAIT);
        self
    }

    /// How much longer than the long-poll wait a receive may take before it
    /// is abandoned as hung. Default 10 s.
    pub fn receive_timeout_margin(mut self, margin: Duration) -> Self {
        self.receive_timeout_margin = margin;
        self
    }

    /// The timeout of every other request. Default 30 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The visibility timeout (the lease) of queues declared without one.
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = timeout.min(MAX_VISIBILITY);
        self
    }

    /// The maximum message size of declared queues (1 MiB, SQS's largest,
    /// by default). The declared payload limit is three quarters of this less
    /// [`ATTRIBUTE_ROOM`], so that any payload fits once base64-encoded.
    /// Sends are also checked against each queue's own `MaximumMessageSize`
    /// (queues declared elsewhere may allow less).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// How long a delete or visibility change waits for others to share its
    /// batch request. Default 10 ms; a full batch of ten goes at once.
    pub fn settle_linger(mut self, linger: Duration) -> Self {
        self.settle_linger = linger;
        self
    }

    /// Declares queues with a redrive policy to their dead-letter queue after
    /// `n` receives. Off by default: the runtime dead-letters with the reason
    /// after `max_attempts`; a redrive policy is a backstop for consumers that
    /// crash on a message and should be well above `max_attempts`.
    pub fn redrive_max_receive_count(mut self, n: u32) -> Self {
        self.redrive_max_receive_count = Some(n);
        self
    }

    /// FIFO mode: every queue is a FIFO queue (`.fifo` is appended to names
    /// without it). Messages go to the group of their partition key (or the
    /// default group) and are deduplicated by message id.
    pub fn fifo(mut self, on: bool) -> Self {
        self.fifo = on;
        self
    }

    /// The FIFO message group of messages without a partition key.
    pub fn default_group(mut self, group: impl Into<String>) -> Self {
        self.default_group = group.into();
        self
    }
}

pub(crate) use switchyard_core::redact as redact_url;

impl fmt::Debug for SqsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsConfig")
            .field("endpoint", &self.endpoint.as_deref().map(redact_url))
            .field("region", &self.region)
            .field("profile", &self.profile)
            .field(
                "access_key_id",
                &self.credentials.as_ref().map(|(id, _)| id.as_str()),
            )
            .field(
                "secret_access_key",
                &self.credentials.as_ref().map(|_| "***"),
            )
            .field("wait_time", &self.wait_time)
            .field("visibility_timeout", &self.visibility_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("settle_linger", &self.settle_linger)
            .field("redrive_max_receive_count", &self.redrive_max_receive_count)
            .field("fifo", &self.fifo)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_secret() {
        let c = SqsConfig::new()
            .static_credentials("AKIDEXAMPLE", "wJalrXUtnFEMI-SECRET")
            .endpoint("http://user:pass@localhost:4566");
        let shown = format!("{c:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(!shown.contains("pass"), "{shown}");
        assert!(shown.contains("AKIDEXAMPLE"));
    }

    #[test]
    fn redaction_strips_user_info() {
        assert_eq!(redact_url("http://a:b@h:1/x"), "http://***@h:1/x");
        assert_eq!(redact_url("http://h:1"), "http://h:1");
    }

    #[test]
    fn waits_are_capped() {
        let c = SqsConfig::new()
            .wait_time(Duration::from_secs(60))
            .visibility_timeout(Duration::from_secs(100_000));
        assert_eq!(c.wait_time, MAX_WAIT);
        assert_eq!(c.visibility_timeout, MAX_VISIBILITY);
    }
}
