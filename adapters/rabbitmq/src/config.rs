//! Connection and topology settings.

use std::fmt;
use std::time::Duration;

use switchyard_core::{TransportError, TransportErrorKind};

/// The kind of queue declared for consumers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueKind {
    /// Replicated, with a delivery count (the default).
    Quorum,
    /// Classic queues: no delivery count, so crash redeliveries are only
    /// flagged, not counted exactly.
    Classic,
}

/// How to reach RabbitMQ and what to declare. `Debug` never shows the
/// password.
#[derive(Clone)]
pub struct RabbitConfig {
    pub(crate) url: String,
    pub(crate) connection_name: Option<String>,
    pub(crate) heartbeat: Option<Duration>,
    pub(crate) queue_kind: QueueKind,
    pub(crate) delay_tiers: Vec<Duration>,
    pub(crate) max_payload: usize,
    pub(crate) publish_timeout: Duration,
    pub(crate) queue_expires: Option<Duration>,
    pub(crate) delivery_limit: Option<u32>,
    pub(crate) single_active_consumer: bool,
    /// Extra CA certificates (PEM files) trusted for `amqps://`.
    pub(crate) tls_roots: Vec<std::path::PathBuf>,
    /// Client certificate and PKCS#8 key (PEM files) for `amqps://`.
    pub(crate) tls_client: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl RabbitConfig {
    /// Settings for `url` (`amqp://user:password@host:5672/vhost`): quorum
    /// queues, delay tiers of 1 s, 5 s, 30 s, 2 min, 10 min and 1 h,
    /// payloads up to 8 MiB, confirms awaited up to 30 s, heartbeat 10 s.
    pub fn new(url: impl Into<String>) -> Self {
        RabbitConfig {
            url: url.into(),
            connection_name: None,
            heartbeat: Some(Duration::from_secs(10)),
            queue_kind: QueueKind::Quorum,
            delay_tiers: [1, 5, 30, 120, 600, 3600].map(Duration::from_secs).to_vec(),
            max_payload: 8 * 1024 * 1024,
            publish_timeout: Duration::from_secs(30),
            queue_expires: None,
            delivery_limit: None,
            single_active_consumer: false,
            tls_roots: Vec::new(),
            tls_client: None,
        }
    }

    /// For `amqps://`: trusts the CA certificates in this PEM file as well
    /// as the system's.
    pub fn root_certificates(mut self, pem: impl Into<std::path::PathBuf>) -> Self {
        self.tls_roots.push(pem.into());
        self
    }

    /// For `amqps://`: presents this client certificate with its PKCS#8
    /// private key (PEM files), for brokers that authenticate clients by
    /// certificate.
    pub fn client_certificate(
        mut self,
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.tls_client = Some((cert.into(), key.into()));
        self
    }

    /// The TLS settings for lapin, read from the files named (an unreadable
    /// file is a configuration error naming it).
    pub(crate) fn tls(&self) -> Result<lapin::tcp::OwnedTLSConfig, TransportError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| {
                TransportError::new(
                    TransportErrorKind::Config,
                    format!("cannot read TLS file {}: {e}", path.display()),
                )
            })
        };
        let mut chain = String::new();
        for path in &self.tls_roots {
            chain.push_str(&String::from_utf8_lossy(&read(path)?));
            chain.push('\n');
        }
        let identity = match &self.tls_client {
            Some((cert, key)) => Some(lapin::tcp::OwnedIdentity::PKCS8 {
                pem: read(cert)?,
                key: read(key)?,
            }),
            None => None,
        };
        Ok(lapin::tcp::OwnedTLSConfig {
            identity,
            cert_chain: (!chain.is_empty()).then_some(chain),
        })
    }

    /// Declares quorum queues with this `x-delivery-limit` (RabbitMQ 4
    /// defaults to 20). It must stay above the consumers' attempt budget
    /// (twice it, as requeues count): subscribing checks.
    pub fn delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = Some(limit);
        self
    }

    /// Declares queues with `x-single-active-consumer`: one subscriber at a
    /// time receives, the others stand by, so a queue is consumed in order.
    pub fn single_active_consumer(mut self, on: bool) -> Self {
        self.single_active_consumer = on;
        self
    }

    /// The connection name shown in RabbitMQ's management UI.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// The heartbeat interval (`None`: the server's).
    pub fn heartbeat(mut self, interval: Option<Duration>) -> Self {
        self.heartbeat = interval;
        self
    }

    /// Quorum (default) or classic queues.
    pub fn queue_kind(mut self, kind: QueueKind) -> Self {
        self.queue_kind = kind;
        self
    }

    /// The retry delays available; a requested delay is rounded up to the
    /// next tier (and capped at the largest).
    pub fn delay_tiers(mut self, tiers: impl IntoIterator<Item = Duration>) -> Self {
        let mut tiers: Vec<Duration> = tiers.into_iter().filter(|d| !d.is_zero()).collect();
        tiers.sort_unstable();
        tiers.dedup();
        self.delay_tiers = tiers;
        self
    }

    /// The largest payload published.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// How long a publish waits for the broker's confirm.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Deletes declared queues after this long unused (`x-expires`); for
    /// tests and ephemeral environments.
    pub fn queue_expires(mut self, after: Duration) -> Self {
        self.queue_expires = Some(after);
        self
    }

    pub(crate) fn check(&self) -> Result<(), TransportError> {
        if !(self.url.starts_with("amqp://") || self.url.starts_with("amqps://")) {
            return Err(TransportError::new(
                TransportErrorKind::Config,
                format!("{} is not an amqp:// or amqps:// URL", self.redacted_url()),
            ));
        }
        if self.delay_tiers.is_empty() {
            return Err(TransportError::new(
                TransportErrorKind::Config,
                "at least one delay tier is needed for delayed retries",
            ));
        }
        Ok(())
    }

    pub(crate) fn url_with_heartbeat(&self) -> String {
        match self.heartbeat {
            Some(h) if !self.url.contains("heartbeat=") => {
                let sep = if self.url.contains('?') { '&' } else { '?' };
                format!("{}{sep}heartbeat={}", self.url, h.as_secs().max(1))
            }
            _ => self.url.clone(),
        }
    }

    /// The URL with its password replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }
}

pub(crate) use switchyard_core::redact;

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &self.redacted_url())
            .field("connection_name", &self.connection_name)
            .field("heartbeat", &self.heartbeat)
            .field("queue_kind", &self.queue_kind)
            .field("delay_tiers", &self.delay_tiers)
            .field("max_payload", &self.max_payload)
            .field("publish_timeout", &self.publish_timeout)
            .field("queue_expires", &self.queue_expires)
            .field("delivery_limit", &self.delivery_limit)
            .field("single_active_consumer", &self.single_active_consumer)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        let c = RabbitConfig::new("amqp://app:s3cr3t@rabbit:5672/%2f?x=1");
        assert_eq!(c.redacted_url(), "amqp://***@rabbit:5672/%2f?x=1");
        assert!(!format!("{c:?}").contains("s3cr3t"));
        assert_eq!(redact("amqp://rabbit:5672"), "amqp://rabbit:5672");
        assert_eq!(redact("amqp://a:b@c@host/"), "amqp://***@host/");
    }

    #[test]
    fn other_schemes_are_refused_and_amqps_is_accepted() {
        assert!(RabbitConfig::new("amqps://u:p@h").check().is_ok());
        let err = RabbitConfig::new("http://u:secret@h").check().unwrap_err();
        assert_eq!(err.kind(), TransportErrorKind::Config);
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn an_unreadable_tls_file_is_a_configuration_error_naming_it() {
        let err = RabbitConfig::new("amqps://h")
            .root_certificates("/nonexistent/ca.pem")
            .tls()
            .unwrap_err();
        assert_eq!(err.kind(), TransportErrorKind::Config);
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn heartbeat_goes_into_the_url() {
        let c = RabbitConfig::new("amqp://h/%2f");
        assert_eq!(c.url_with_heartbeat(), "amqp://h/%2f?heartbeat=10");
    }
}
