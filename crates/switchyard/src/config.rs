//! Choosing the broker and the consumers in a configuration file.
//!
//! A TOML file plus environment overrides (`SWITCHYARD_TRANSPORT__URL`,
//! `SWITCHYARD_CONSUMERS__ORDERS__CONCURRENCY`: `__` separates the keys),
//! read with [figment]. Every key, with its default, is in
//! `docs/configuration.md`.
//!
//! ```toml
//! [transport]
//! kind = "rabbitmq"                      # memory | rabbitmq | jetstream | nats | sqs
//! url = "amqp://guest:guest@127.0.0.1:5672/%2f"
//!
//! [consumers.billing]
//! source = "billing"
//! concurrency = 16
//! max_attempts = 5
//! backoff = { initial = "200ms", max = "5m" }
//! timeout = "30s"
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer};

use switchyard_core::middleware::deadline::DeadlinePolicy;
use switchyard_core::{QueueSpec, TopicSpec, Topology, Transport};

/// The environment variable prefix of overrides.
pub const ENV_PREFIX: &str = "SWITCHYARD_";

/// The whole configuration: the transport and the consumers.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Which broker, and how to reach it.
    pub transport: TransportConfig,
    /// The consumers, by name.
    #[serde(default)]
    pub consumers: BTreeMap<String, ConsumerConfig>,
    /// Topics and the queues subscribed to them (fan-out).
    #[serde(default)]
    pub topics: BTreeMap<String, TopicConfig>,
    #[serde(skip)]
    origin: Option<PathBuf>,
}

/// The transport kinds.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// The in-process memory transport (feature `memory`).
    Memory,
    /// RabbitMQ (feature `rabbitmq`).
    Rabbitmq,
    /// NATS JetStream (feature `nats`).
    Jetstream,
    /// Core NATS, at-most-once (feature `nats`).
    Nats,
    /// Amazon SQS (feature `sqs`).
    Sqs,
}

impl TransportKind {
    /// The name used in configuration files.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Memory => "memory",
            TransportKind::Rabbitmq => "rabbitmq",
            TransportKind::Jetstream => "jetstream",
            TransportKind::Nats => "nats",
            TransportKind::Sqs => "sqs",
        }
    }

    /// The cargo feature of `switchyard` that brings the adapter in.
    pub fn feature(self) -> &'static str {
        match self {
            TransportKind::Memory => "memory",
            TransportKind::Rabbitmq => "rabbitmq",
            TransportKind::Jetstream | TransportKind::Nats => "nats",
            TransportKind::Sqs => "sqs",
        }
    }

    fn compiled(self) -> bool {
        match self {
            TransportKind::Memory => cfg!(feature = "memory"),
            TransportKind::Rabbitmq => cfg!(feature = "rabbitmq"),
            TransportKind::Jetstream | TransportKind::Nats => cfg!(feature = "nats"),
            TransportKind::Sqs => cfg!(feature = "sqs"),
        }
    }
}

/// A value that must not be shown: `Debug` and `Display` print `***`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The value itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A broker URL; `Debug` and [`redacted`](Self::redacted) hide a password
/// or token in it.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Url(String);

impl Url {
    /// The URL itself, with its secrets.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with user information replaced by `***`.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }
}

impl fmt::Debug for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

pub use switchyard_core::redact;

/// The kinds this build has.
fn compiled_kinds() -> Vec<TransportKind> {
    use TransportKind::*;
    [Memory, Rabbitmq, Jetstream, Nats, Sqs]
        .into_iter()
        .filter(|k| k.compiled())
        .collect()
}

fn not_compiled(kind: TransportKind, built: &[TransportKind]) -> String {
    let names: Vec<&str> = built.iter().map(|k| k.name()).collect();
    format!(
        "transport kind {:?} is not compiled in: enable the cargo feature `{}` of switchyard (this build has: {})",
        kind.name(),
        kind.feature(),
        if names.is_empty() { "none".to_owned() } else { names.join(", ") }
    )
}

/// `[transport]`: the kind, its URL and its options. Options of another
/// kind are refused.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TransportConfig {
    /// Which broker.
    pub kind: TransportKind,
    /// `amqp://…` (rabbitmq), `nats://…` (jetstream, nats), an endpoint
    /// (sqs, optional: AWS by default). Not used by memory.
    #[serde(default)]
    pub url: Option<Url>,
    /// memory, rabbitmq: the largest payload accepted, in bytes.
    #[serde(default)]
    pub max_payload: Option<usize>,
    /// memory: the most messages a queue holds (publishers wait beyond).
    #[serde(default)]
    pub capacity: Option<usize>,
    /// rabbitmq: the retry delay tiers.
    #[serde(default, deserialize_with = "durations")]
    pub delay_tiers: Option<Vec<Duration>>,
    /// rabbitmq: queues unused this long are deleted by the broker.
    #[serde(default, deserialize_with = "duration")]
    pub queue_expires: Option<Duration>,
    /// rabbitmq, jetstream, nats: the connection name the broker shows.
    #[serde(default)]
    pub connection_name: Option<String>,
    /// jetstream: the default lease (`ack_wait`) of declared queues.
    #[serde(default, deserialize_with = "duration")]
    pub ack_wait: Option<Duration>,
    /// jetstream: wait for the server to confirm each ack.
    #[serde(default)]
    pub double_ack: Option<bool>,
    /// jetstream, nats: the connection's command queue (async-nats' client
    /// capacity, default 2,048).
    #[serde(default)]
    pub client_capacity: Option<usize>,
    /// sqs: the region (else `AWS_REGION` or the profile).
    #[serde(default)]
    pub region: Option<String>,
    /// sqs: the shared-config profile.
    #[serde(default)]
    pub profile: Option<String>,
    /// sqs: a static access key id (else the AWS credential chain).
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// sqs: the static secret key that goes with `access_key_id`.
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    /// sqs: FIFO mode.
    #[serde(default)]
    pub fifo: Option<bool>,
    /// sqs: the long-poll wait.
    #[serde(default, deserialize_with = "duration")]
    pub wait_time: Option<Duration>,
    /// sqs: the visibility timeout of declared queues.
    #[serde(default, deserialize_with = "duration")]
    pub visibility_timeout: Option<Duration>,
    /// sqs: `MaximumMessageSize` of declared queues.
    #[serde(default)]
    pub max_message_size: Option<usize>,
    /// sqs: declare queues with a redrive policy after this many receives.
    #[serde(default)]
    pub redrive_max_receive_count: Option<u32>,
    /// rabbitmq, jetstream, nats: a PEM file of CA certificates trusted
    /// for TLS (`amqps://`, `tls://`) besides the system's.
    #[serde(default)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// rabbitmq, jetstream, nats: a client certificate (PEM) for TLS;
    /// needs `tls_key`.
    #[serde(default)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// rabbitmq, jetstream, nats: the client certificate's private key
    /// (PEM; PKCS#8 for rabbitmq).
    #[serde(default)]
    pub tls_key: Option<std::path::PathBuf>,
    /// jetstream, nats: a credentials file (`.creds`: user JWT and NKey seed).
    #[serde(default)]
    pub credentials_file: Option<std::path::PathBuf>,
    /// jetstream, nats: an NKey seed (`SU...`) to authenticate with.
    #[serde(default)]
    pub nkey_seed: Option<Secret>,
    /// jetstream: the durable consumer's `max_ack_pending` (default
    /// sixteen times the consumer's concurrency, at least 1,000).
    #[serde(default)]
    pub max_ack_pending: Option<i64>,
    /// jetstream: the durable consumer's `max_deliver` (default
    /// `2 x max_attempts + 50`; -1 for unlimited).
    #[serde(default)]
    pub max_deliver: Option<i64>,
}

/// `[topics.<name>]`: a topic and the queues subscribed to it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TopicConfig {
    /// Queues that each get every message published to the topic.
    #[serde(default)]
    pub subscriptions: Vec<String>,
}

/// How the retry layer spaces attempts: exponential with full jitter.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BackoffConfig {
    /// The ceiling after the first failure. Default 200 ms.
    #[serde(
        default = "default_backoff_initial",
        deserialize_with = "required_duration"
    )]
    pub initial: Duration,
    /// The largest delay. Default 5 minutes.
    #[serde(
        default = "default_backoff_max",
        deserialize_with = "required_duration"
    )]
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
        }
    }
}

fn default_backoff_initial() -> Duration {
    Duration::from_millis(200)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(300)
}

/// What to do with a message past its deadline.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DeadlineConfig {
    /// Dead-letter it as `expired` (default).
    #[default]
    DeadLetter,
    /// Acknowledge it unhandled, and count it.
    Drop,
}

/// Where the dedupe middleware remembers handled message ids.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DedupeConfig {
    /// In this process (default): duplicates across restarts or processes
    /// are not caught.
    #[default]
    Memory,
    /// No deduplication (handlers are idempotent themselves).
    None,
}

/// `[consumers.<name>]`: one consumer.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// The queue it consumes.
    pub source: String,
    /// Deliveries in flight at once (and the prefetch). Default 32.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// The attempt budget. Default 5.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Retry spacing.
    #[serde(default)]
    pub backoff: BackoffConfig,
    /// How long a handler may run. Default 30 s.
    #[serde(default = "default_timeout", deserialize_with = "required_duration")]
    pub timeout: Duration,
    /// Expired messages: `dead-letter` (default) or `drop`.
    #[serde(default)]
    pub deadline_policy: DeadlineConfig,
    /// The dead-letter destination (else the adapter's default name).
    #[serde(default)]
    pub dead_letter: Option<String>,
    /// `memory` (default) or `none`.
    #[serde(default)]
    pub dedupe: DedupeConfig,
    /// The queue's lease, where the broker has one.
    #[serde(default, deserialize_with = "duration")]
    pub lease: Option<Duration>,
    /// How long shutdown waits for in-flight handlers. Default 30 s.
    #[serde(default = "default_timeout", deserialize_with = "required_duration")]
    pub drain_timeout: Duration,
    /// Declare the queue (and its dead-letter queue) at start. Default true.
    #[serde(default = "default_true")]
    pub declare: bool,
}

fn default_concurrency() -> usize {
    32
}
fn default_max_attempts() -> u32 {
    5
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_true() -> bool {
    true
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("invalid duration {s:?} ({e}); write a number with a unit, such as \"250ms\", \"30s\" or \"5m\"")
    })
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| parse_duration(&s))
        .transpose()
        .map_err(serde::de::Error::custom)
}

fn required_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    parse_duration(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

fn durations<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Duration>>, D::Error> {
    Option::<Vec<String>>::deserialize(d)?
        .map(|v| v.iter().map(|s| parse_duration(s)).collect())
        .transpose()
        .map_err(serde::de::Error::custom)
}

/// A configuration problem: where (file and key) and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or `environment`), when known.
    pub origin: Option<String>,
    /// The key, dotted (`consumers.orders.timeout`).
    pub key: String,
    /// What is wrong, with credentials redacted.
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(origin) = &self.origin {
            write!(f, "{origin}: ")?;
        }
        if self.key.is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "`{}`: {}", self.key, self.problem)
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn new(origin: Option<&Path>, key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            origin: origin.map(|p| p.display().to_string()),
            key: key.into(),
            problem: redact(&problem.into()),
        }
    }

    fn from_figment(e: figment::Error, file: Option<&Path>) -> Self {
        let origin = match e.metadata.as_ref().map(|m| m.name.as_ref()) {
            Some(name) if name.contains("environment") || name.contains("SWITCHYARD") => {
                Some("environment (SWITCHYARD_*)".to_owned())
            }
            _ => file.map(|p| p.display().to_string()),
        };
        let key = e.path.join(".");
        let secret_key = key.ends_with("secret_access_key") || key.ends_with("url");
        let problem = match &e.kind {
            // A syntax error quotes the offending line, which may hold a
            // secret: keep only its first line (where, and what).
            figment::error::Kind::Message(m) => m.lines().next().unwrap_or_default().to_owned(),
            // The value of a secret is not echoed, whatever its type.
            figment::error::Kind::InvalidType(_, expected) if secret_key => {
                format!("invalid type: expected {expected}")
            }
            figment::error::Kind::UnknownVariant(v, expected)
                if e.path.last().is_some_and(|k| k == "kind") =>
            {
                format!(
                    "unknown transport kind {v:?}; valid kinds: {}",
                    expected.join(", ")
                )
            }
            kind => kind.to_string(),
        };
        ConfigError {
            origin,
            key,
            problem: redact(&problem),
        }
    }
}

impl Config {
    /// Reads `path` (TOML) and the `SWITCHYARD_*` environment overrides.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(ConfigError::new(
                Some(path),
                "",
                "no such file (pass --config, or create switchyard.toml)",
            ));
        }
        Self::extract(Figment::from(Toml::file_exact(path)), Some(path))
    }

    /// Parses TOML text, with the `SWITCHYARD_*` environment overrides.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::extract(Figment::from(Toml::string(text)), None)
    }

    fn extract(figment: Figment, path: Option<&Path>) -> Result<Self, ConfigError> {
        // Only keys under `transport` and `consumers` come from the
        // environment, so that unrelated SWITCHYARD_* variables are ignored.
        let env = Env::prefixed(ENV_PREFIX)
            .filter(|k| {
                let k = k.as_str().to_ascii_lowercase();
                k.starts_with("transport__")
                    || k.starts_with("consumers__")
                    || k.starts_with("topics__")
            })
            .split("__");
        let mut config: Config = figment
            .merge(env)
            .extract()
            .map_err(|e| ConfigError::from_figment(e, path))?;
        config.origin = path.map(Path::to_path_buf);
        config.validate()?;
        Ok(config)
    }

    /// The file it was read from.
    pub fn origin(&self) -> Option<&Path> {
        self.origin.as_deref()
    }

    fn error(&self, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError::new(self.origin(), key, problem)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.transport;
        let kind = t.kind;
        if !kind.compiled() {
            return Err(self.error("transport.kind", not_compiled(kind, &compiled_kinds())));
        }
        match (kind, &t.url) {
            (TransportKind::Rabbitmq, None) => {
                return Err(self.error(
                    "transport.url",
                    "missing: the rabbitmq transport needs a url such as \"amqp://user:password@host:5672/%2f\"",
                ))
            }
            (TransportKind::Jetstream | TransportKind::Nats, None) => {
                return Err(self.error(
                    "transport.url",
                    format!(
                        "missing: the {} transport needs a url such as \"nats://127.0.0.1:4222\"",
                        kind.name()
                    ),
                ))
            }
                        (TransportKind::Rabbitmq, Some(u))
                if !(u.expose().starts_with("amqp://") || u.expose().starts_with("amqps://")) =>
            {
                return Err(self.error(
                    "transport.url",
                    "is not an amqp:// URL (amqp://user:password@host:5672/vhost)",
                ))
            }
            (TransportKind::Memory, Some(_)) => {
                return Err(self.error("transport.url", "the memory transport has no url"))
            }
            _ => {}
        }
        // Options of another kind are a mistake worth reporting.
        let options: [(&str, bool, &[TransportKind]); 24] = {
            use TransportKind::*;
            [
                ("max_payload", t.max_payload.is_some(), &[Memory, Rabbitmq]),
                ("capacity", t.capacity.is_some(), &[Memory]),
                ("delay_tiers", t.delay_tiers.is_some(), &[Rabbitmq]),
                ("queue_expires", t.queue_expires.is_some(), &[Rabbitmq]),
                (
                    "connection_name",
                    t.connection_name.is_some(),
                    &[Rabbitmq, Jetstream, Nats],
                ),
                ("ack_wait", t.ack_wait.is_some(), &[Jetstream]),
                ("double_ack", t.double_ack.is_some(), &[Jetstream]),
                (
                    "client_capacity",
                    t.client_capacity.is_some(),
                    &[Jetstream, Nats],
                ),
                ("region", t.region.is_some(), &[Sqs]),
                ("profile", t.profile.is_some(), &[Sqs]),
                ("access_key_id", t.access_key_id.is_some(), &[Sqs]),
                ("secret_access_key", t.secret_access_key.is_some(), &[Sqs]),
                ("fifo", t.fifo.is_some(), &[Sqs]),
                ("wait_time", t.wait_time.is_some(), &[Sqs]),
                ("visibility_timeout", t.visibility_timeout.is_some(), &[Sqs]),
                ("max_message_size", t.max_message_size.is_some(), &[Sqs]),
                (
                    "redrive_max_receive_count",
                    t.redrive_max_receive_count.is_some(),
                    &[Sqs],
                ),
                ("tls_ca", t.tls_ca.is_some(), &[Rabbitmq, Jetstream, Nats]),
                (
                    "tls_cert",
                    t.tls_cert.is_some(),
                    &[Rabbitmq, Jetstream, Nats],
                ),
                ("tls_key", t.tls_key.is_some(), &[Rabbitmq, Jetstream, Nats]),
                (
                    "credentials_file",
                    t.credentials_file.is_some(),
                    &[Jetstream, Nats],
                ),
                ("nkey_seed", t.nkey_seed.is_some(), &[Jetstream, Nats]),
                ("max_ack_pending", t.max_ack_pending.is_some(), &[Jetstream]),
                ("max_deliver", t.max_deliver.is_some(), &[Jetstream]),
            ]
        };
        for (name, set, kinds) in options {
            if set && !kinds.contains(&kind) {
                let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
                return Err(self.error(
                    format!("transport.{name}"),
                    format!(
                        "applies to {} only, not to kind {:?}",
                        names.join(", "),
                        kind.name()
                    ),
                ));
            }
        }
        if t.tls_cert.is_some() != t.tls_key.is_some() {
            return Err(self.error("transport.tls_key", "tls_cert and tls_key go together"));
        }
        if t.access_key_id.is_some() != t.secret_access_key.is_some() {
            return Err(self.error(
                "transport.secret_access_key",
                "access_key_id and secret_access_key go together",
            ));
        }
        for (name, value) in [
            ("max_payload", t.max_payload),
            ("capacity", t.capacity),
            ("client_capacity", t.client_capacity),
        ] {
            if value == Some(0) {
                return Err(self.error(format!("transport.{name}"), "must be at least 1"));
            }
        }
        for (name, c) in &self.consumers {
            let key = |k: &str| format!("consumers.{name}.{k}");
            if c.source.trim().is_empty() {
                return Err(self.error(key("source"), "must name a queue"));
            }
            if c.concurrency == 0 {
                return Err(self.error(key("concurrency"), "must be at least 1"));
            }
            if c.max_attempts == 0 {
                return Err(self.error(key("max_attempts"), "must be at least 1"));
            }
            if c.timeout.is_zero() {
                return Err(self.error(key("timeout"), "must be longer than zero"));
            }
            if let Some(d) = &c.dead_letter {
                if d.trim().is_empty() || *d == c.source {
                    return Err(self.error(
                        key("dead_letter"),
                        "must name a queue other than the consumer's source",
                    ));
                }
            }
            // Consumers of one source share its queue: they must agree on
            // how it is declared.
            if let Some((other, o)) = self
                .consumers
                .iter()
                .find(|(n, o)| *n < name && o.source == c.source)
            {
                if o.dead_letter != c.dead_letter || o.lease != c.lease {
                    return Err(self.error(
                        key("dead_letter"),
                        format!(
                            "consumers {other:?} and {name:?} share the source {:?} but not its dead_letter and lease",
                            c.source
                        ),
                    ));
                }
            }
            if c.backoff.initial > c.backoff.max {
                return Err(self.error(key("backoff.initial"), "is longer than backoff.max"));
            }
        }
        for (name, topic) in &self.topics {
            for q in &topic.subscriptions {
                if !self.consumers.values().any(|c| &c.source == q) {
                    return Err(self.error(
                        format!("topics.{name}.subscriptions"),
                        format!("queue {q:?} is not the source of any consumer"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The consumer called `name`.
    pub fn consumer(&self, name: &str) -> Result<&ConsumerConfig, ConfigError> {
        self.consumers.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.consumers.keys().map(String::as_str).collect();
            self.error(
                format!("consumers.{name}"),
                format!("no such consumer; configured: {}", known.join(", ")),
            )
        })
    }

    /// What the consumers need declared: each source queue (with its
    /// dead-letter destination and lease) and the topics.
    pub fn topology(&self) -> Topology {
        let mut topology = Topology::new();
        let mut seen = std::collections::BTreeSet::new();
        for c in self.consumers.values().filter(|c| c.declare) {
            if !seen.insert(c.source.clone()) {
                continue;
            }
            let mut q = QueueSpec::new(&c.source);
            if let Some(d) = &c.dead_letter {
                q = q.dead_letter(d);
            }
            if let Some(l) = c.lease {
                q = q.lease(l);
            }
            topology = topology.queue(q);
        }
        for (name, t) in &self.topics {
            let mut spec = TopicSpec::new(name);
            for s in &t.subscriptions {
                spec = spec.subscription(s);
            }
            topology = topology.topic(spec);
        }
        topology
    }

    /// Connects the configured transport.
    pub async fn transport(&self) -> Result<Arc<dyn Transport>, ConfigError> {
        let t = &self.transport;
        match t.kind {
            #[cfg(feature = "memory")]
            TransportKind::Memory => {
                let mut c = switchyard_memory::MemoryConfig::default();
                if let Some(n) = t.max_payload {
                    c = c.max_payload(n);
                }
                if let Some(n) = t.capacity {
                    c = c.default_capacity(n);
                }
                Ok(Arc::new(switchyard_memory::MemoryTransport::with_config(c)))
            }
            #[cfg(feature = "rabbitmq")]
            TransportKind::Rabbitmq => {
                let mut c = switchyard_rabbitmq::RabbitConfig::new(self.url());
                if let Some(tiers) = &t.delay_tiers {
                    c = c.delay_tiers(tiers.iter().copied());
                }
                if let Some(d) = t.queue_expires {
                    c = c.queue_expires(d);
                }
                if let Some(n) = &t.connection_name {
                    c = c.connection_name(n);
                }
                if let Some(n) = t.max_payload {
                    c = c.max_payload(n);
                }
                if let Some(ca) = &t.tls_ca {
                    c = c.root_certificates(ca);
                }
                if let (Some(cert), Some(key)) = (&t.tls_cert, &t.tls_key) {
                    c = c.client_certificate(cert, key);
                }
                let transport = switchyard_rabbitmq::RabbitTransport::connect(c)
                    .await
                    .map_err(|e| self.connect_error(e))?;
                Ok(Arc::new(transport))
            }
            #[cfg(feature = "nats")]
            TransportKind::Jetstream | TransportKind::Nats => {
                let mut c = switchyard_nats::NatsConfig::new(self.url());
                if let Some(n) = &t.connection_name {
                    c = c.name(n);
                }
                if let Some(d) = t.ack_wait {
                    c = c.ack_wait(d);
                }
                if let Some(on) = t.double_ack {
                    c = c.double_ack(on);
                }
                if let Some(n) = t.client_capacity {
                    c = c.client_capacity(n);
                }
                if let Some(ca) = &t.tls_ca {
                    c = c.root_certificates(ca);
                }
                if let (Some(cert), Some(key)) = (&t.tls_cert, &t.tls_key) {
                    c = c.client_certificate(cert, key);
                }
                if let Some(path) = &t.credentials_file {
                    c = c.credentials_file(path);
                }
                if let Some(seed) = &t.nkey_seed {
                    c = c.nkey(seed.expose());
                }
                if let Some(n) = t.max_ack_pending {
                    c = c.max_ack_pending(n);
                }
                if let Some(n) = t.max_deliver {
                    c = c.max_deliver(n);
                }
                if t.kind == TransportKind::Nats {
                    let transport = switchyard_nats::NatsCoreTransport::connect(c)
                        .await
                        .map_err(|e| self.connect_error(e))?;
                    Ok(Arc::new(transport))
                } else {
                    let transport = switchyard_nats::NatsTransport::connect(c)
                        .await
                        .map_err(|e| self.connect_error(e))?;
                    Ok(Arc::new(transport))
                }
            }
            #[cfg(feature = "sqs")]
            TransportKind::Sqs => {
                let mut c = switchyard_sqs::SqsConfig::new();
                if let Some(u) = &t.url {
                    c = c.endpoint(u.expose());
                }
                if let Some(r) = &t.region {
                    c = c.region(r);
                }
                if let Some(p) = &t.profile {
                    c = c.profile(p);
                }
                if let (Some(id), Some(secret)) = (&t.access_key_id, &t.secret_access_key) {
                    c = c.static_credentials(id, secret.expose());
                }
                if let Some(on) = t.fifo {
                    c = c.fifo(on);
                }
                if let Some(d) = t.wait_time {
                    c = c.wait_time(d);
                }
                if let Some(d) = t.visibility_timeout {
                    c = c.visibility_timeout(d);
                }
                if let Some(n) = t.max_message_size {
                    c = c.max_message_size(n);
                }
                if let Some(n) = t.redrive_max_receive_count {
                    c = c.redrive_max_receive_count(n);
                }
                let transport = switchyard_sqs::SqsTransport::connect(c)
                    .await
                    .map_err(|e| self.connect_error(e))?;
                Ok(Arc::new(transport))
            }
            #[allow(unreachable_patterns)]
            other => Err(self.error("transport.kind", not_compiled(other, &compiled_kinds()))),
        }
    }

    /// The transport URL with its secrets, for the adapters (`""` if unset;
    /// `validate` requires one where the kind needs it).
    #[cfg(any(feature = "rabbitmq", feature = "nats"))]
    fn url(&self) -> &str {
        self.transport.url.as_ref().map_or("", Url::expose)
    }

    /// A failed connection, naming the transport and its redacted URL.
    #[cfg(any(feature = "rabbitmq", feature = "nats", feature = "sqs"))]
    fn connect_error(&self, e: switchyard_core::TransportError) -> ConfigError {
        let t = &self.transport;
        self.error(
            "transport.url",
            format!(
                "cannot connect to the {} transport at {}: {e}",
                t.kind.name(),
                t.url
                    .as_ref()
                    .map_or_else(|| "the default endpoint".to_owned(), Url::redacted)
            ),
        )
    }
}

impl ConsumerConfig {
    /// The deadline policy for the middleware.
    pub fn deadline(&self) -> DeadlinePolicy {
        match self.deadline_policy {
            DeadlineConfig::DeadLetter => DeadlinePolicy::DeadLetter,
            DeadlineConfig::Drop => DeadlinePolicy::Drop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_user_information_everywhere() {
        assert_eq!(
            redact("cannot reach amqp://guest:s3cret@host:5672/%2f (and nats://tok@h:4222)"),
            "cannot reach amqp://***@host:5672/%2f (and nats://***@h:4222)"
        );
        assert_eq!(redact("http://127.0.0.1:4566"), "http://127.0.0.1:4566");
        assert_eq!(redact("no urls"), "no urls");
        assert_eq!(
            redact("nats://u:p1@h1:4222,nats://u:p2@h2:4222"),
            "nats://***@h1:4222,nats://***@h2:4222"
        );
        assert_eq!(redact("amqp://u:pa/ss?#@h/%2f"), "amqp://***@h/%2f");
        assert_eq!(
            redact("url \"guest:s3cret@rabbit:5672\""),
            "url \"***@rabbit:5672\""
        );
        assert_eq!(redact("mail me@example.com"), "mail me@example.com");
    }

    #[test]
    fn a_kind_not_compiled_in_names_its_feature() {
        let m = not_compiled(
            TransportKind::Sqs,
            &[TransportKind::Memory, TransportKind::Rabbitmq],
        );
        assert_eq!(
            m,
            "transport kind \"sqs\" is not compiled in: enable the cargo feature `sqs` of switchyard (this build has: memory, rabbitmq)"
        );
    }

    #[test]
    fn url_debug_is_redacted() {
        let u = Url("amqp://u:pw@h/".into());
        assert_eq!(format!("{u:?}"), "\"amqp://***@h/\"");
        assert_eq!(format!("{:?}", Secret("x".into())), "***");
    }
}
