//! Running every configured consumer: [`start`] and [`run`].

use std::sync::Arc;

use switchyard_core::middleware::retry::ExponentialBackoff;
use switchyard_core::middleware::Stack;
use switchyard_core::{
    Consumer, ConsumerHandle, Router, ShutdownReport, Transport, TransportError,
};

use crate::config::{Config, ConfigError, DedupeConfig};

/// The running consumers of a [`Config`], on one transport.
pub struct App {
    transport: Arc<dyn Transport>,
    consumers: Vec<(String, ConsumerHandle)>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field(
                "consumers",
                &self.consumers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl App {
    /// The transport every consumer runs on (to publish with, for example).
    pub fn transport(&self) -> Arc<dyn Transport> {
        Arc::clone(&self.transport)
    }

    /// The running consumers, by name.
    pub fn consumers(&self) -> impl Iterator<Item = (&str, &ConsumerHandle)> {
        self.consumers.iter().map(|(n, h)| (n.as_str(), h))
    }

    /// Waits until every consumer has subscribed.
    pub async fn subscribed(&self) {
        for (_, h) in &self.consumers {
            h.subscribed().await;
        }
    }

    /// Stops every consumer gracefully (each drains its in-flight work),
    /// sends the settlements still queued for the wire (coalesced acks), and
    /// reports what each did.
    pub async fn shutdown(self) -> Vec<(String, Result<ShutdownReport, TransportError>)> {
        let stops = self
            .consumers
            .into_iter()
            .map(|(name, h)| async move { (name, h.shutdown().await) });
        let reports = futures_util::future::join_all(stops).await;
        if let Err(e) = self.transport.flush().await {
            tracing::warn!(error = %e, "settlements not sent at shutdown; the broker redelivers those messages");
        }
        reports
    }

    /// Whether any consumer has stopped on its own (its subscription failed).
    pub fn any_stopped(&self) -> bool {
        self.consumers.iter().any(|(_, h)| h.is_finished())
    }
}

/// Connects the configured transport, declares what the consumers need,
/// and starts every consumer with the default middleware stack configured
/// from its table (backoff, timeout, deadline policy, dedupe), routing to
/// `router`.
pub async fn start(config: &Config, router: Router) -> Result<App, ConfigError> {
    let transport = config.transport().await?;
    start_on(config, transport, router).await
}

/// Like [`start`], on a transport made elsewhere.
pub async fn start_on(
    config: &Config,
    transport: Arc<dyn Transport>,
    router: Router,
) -> Result<App, ConfigError> {
    let topology = config.topology();
    transport
        .declare(&topology)
        .await
        .map_err(|e| ConfigError {
            origin: config.origin().map(|p| p.display().to_string()),
            key: "consumers".into(),
            problem: crate::config::redact(&format!("cannot declare the consumers' queues: {e}")),
        })?;
    let caps = transport.capabilities();
    let mut consumers = Vec::with_capacity(config.consumers.len());
    for (name, c) in &config.consumers {
        let mut stack = Stack::new()
            .deadline(c.deadline())
            .retry_policy(ExponentialBackoff::new(c.backoff.initial, c.backoff.max))
            .timeout(c.timeout);
        if let Some(max) = caps.max_payload {
            stack = stack.max_payload(max);
        }
        if c.dedupe == DedupeConfig::None {
            stack = stack.without_dedupe();
        }
        let handle = Consumer::builder(Arc::clone(&transport), c.source.clone())
            .concurrency(c.concurrency)
            .max_attempts(c.max_attempts)
            .drain_timeout(c.drain_timeout)
            .producer(name.clone())
            .serve(stack.build(router.clone()))
            .spawn();
        tracing::info!(consumer = %name, source = %c.source, "consumer started");
        consumers.push((name.clone(), handle));
    }
    Ok(App {
        transport,
        consumers,
    })
}

/// Starts every configured consumer ([`start`]) and runs until SIGINT or
/// SIGTERM, then shuts them down gracefully and returns their reports.
pub async fn run(
    config: &Config,
    router: Router,
) -> Result<Vec<(String, Result<ShutdownReport, TransportError>)>, ConfigError> {
    let app = start(config, router).await?;
    // Until a signal, or until a consumer stops by itself: a service whose
    // consumer died must not look healthy while consuming nothing.
    let consumer_stopped = async {
        while !app.any_stopped() {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    };
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("shutting down: draining in-flight messages"),
        _ = consumer_stopped => tracing::error!("a consumer stopped; shutting the others down"),
    }
    let reports = app.shutdown().await;
    for (name, report) in &reports {
        match report {
            Ok(r) => tracing::info!(consumer = %name, report = ?r, "consumer stopped"),
            Err(e) => tracing::error!(consumer = %name, error = %e, "consumer failed"),
        }
    }
    Ok(reports)
}

/// Resolves at the first SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
