//! Core NATS: fast, **at-most-once** publish/subscribe.
//!
//! Nothing is stored: a message published while no subscriber listens is
//! gone, and one whose handler fails is gone too (there is no redelivery,
//! no delayed retry and no dead-letter destination; the capabilities say
//! so, and the conformance suite skips exactly those cases). Competing
//! consumers of a queue form a NATS queue group; a topic's subscriptions are
//! one queue group each on the topic's subject, so each gets every message.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_nats::Client;
use futures_util::StreamExt;
use switchyard_core::transport::BoxFuture;
use switchyard_core::{
    Capabilities, Delivery, DeliveryGuarantee, DeliveryStream, Envelope, OrderingSupport,
    Settlement, Settler, Settling, SubscribeOptions, Support, Topology, Transport, TransportError,
    TransportErrorKind,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::transport::{connect_client, NatsConfig, HEADER_ROOM};
use crate::wire;

/// A core NATS transport (at-most-once). Clones share the connection.
#[derive(Clone)]
pub struct NatsCoreTransport {
    client: Client,
    max_payload: usize,
    /// Subscription queue -> the topic subject it listens on.
    bindings: Arc<Mutex<HashMap<String, String>>>,
}

impl fmt::Debug for NatsCoreTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsCoreTransport").finish_non_exhaustive()
    }
}

impl NatsCoreTransport {
    /// Connects with `config`.
    pub async fn connect(config: NatsConfig) -> Result<Self, TransportError> {
        let client = connect_client(&config).await?;
        let max_payload = client.server_info().max_payload.saturating_sub(HEADER_ROOM);
        Ok(NatsCoreTransport {
            client,
            max_payload,
            bindings: Arc::default(),
        })
    }
}

struct CoreSettler {
    subject: Arc<str>,
    _permit: OwnedSemaphorePermit,
}

impl CoreSettler {
    /// Nothing to tell the server: core NATS has no acknowledgements.
    fn drop_message(&self, settlement: &Settlement) {
        match settlement {
            Settlement::Ack | Settlement::Release => {}
            // At-most-once: there is nowhere to send it back to.
            Settlement::Retry { .. } | Settlement::DeadLetter { .. } => tracing::warn!(
                subject = %self.subject,
                ?settlement,
                "core NATS is at-most-once: the message is dropped"
            ),
        }
    }
}

impl Settler for CoreSettler {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        self.drop_message(&settlement);
        Box::pin(std::future::ready(Ok(())))
    }

    fn begin_settle(
        self: Box<Self>,
        settlement: Settlement,
        _: &mut std::task::Context<'_>,
    ) -> Settling {
        self.drop_message(&settlement);
        Settling::Done(Ok(()))
    }
}

impl Transport for NatsCoreTransport {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::full();
        caps.guarantee = DeliveryGuarantee::AtMostOnce;
        caps.redelivery = Support::Unsupported;
        caps.delayed_retry = Support::Unsupported;
        caps.dead_letter = Support::Unsupported;
        caps.lease_extension = Support::Unsupported;
        caps.delivery_count = Support::Unsupported;
        caps.ordering = OrderingSupport::PerSource;
        caps.max_payload = Some(self.max_payload);
        caps
    }

    fn declare<'a>(&'a self, topology: &'a Topology) -> BoxFuture<'a, Result<(), TransportError>> {
        // Subjects need no declaring; remember which queues listen on topics.
        let mut bindings = self.bindings.lock().unwrap_or_else(|p| p.into_inner());
        for t in &topology.topics {
            for queue in &t.subscriptions {
                bindings.insert(queue.clone(), t.name.clone());
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn publish<'a>(
        &'a self,
        destination: &'a str,
        envelope: Envelope,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        // Encoded before the future is built, so that the boxed future
        // holds the headers and the payload, not the whole envelope.
        let (headers, payload) = match wire::encode_within(envelope, self.max_payload) {
            Ok(encoded) => encoded,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        Box::pin(async move {
            // At-most-once: handed to the connection, which sends it in the
            // background; nothing stores it, so there is nothing to wait for.
            self.client
                .publish_with_headers(destination.to_owned(), headers, payload)
                .await
                .map_err(|e| {
                    TransportError::new(TransportErrorKind::Connection, "publish failed")
                        .with_source(e)
                })
        })
    }

    fn subscribe<'a>(
        &'a self,
        source: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<DeliveryStream, TransportError>> {
        Box::pin(async move {
            let subject = self
                .bindings
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(source)
                .cloned()
                .unwrap_or_else(|| source.to_owned());
            let subscriber = self
                .client
                .queue_subscribe(subject.clone(), source.to_owned())
                .await
                .map_err(|e| {
                    TransportError::new(TransportErrorKind::Connection, "subscribe failed")
                        .with_source(e)
                })?;
            // Make sure the server knows the subscription before returning.
            self.client.flush().await.map_err(|e| {
                TransportError::new(TransportErrorKind::Connection, "flush failed").with_source(e)
            })?;
            let permits = Arc::new(Semaphore::new(options.prefetch.max(1)));
            let subject: Arc<str> = subject.into();
            // Boxed: `unfold` moves its state in and out of the future for
            // every item.
            let stream = futures_util::stream::unfold(
                Box::new((subscriber, permits, subject)),
                |mut state| async move {
                    let (sub, permits, subject) = &mut *state;
                    let permit = switchyard_core::transport::prefetch_slot(permits).await;
                    let message = sub.next().await?;
                    let envelope =
                        Arc::new(wire::decode(message.headers.as_ref(), message.payload));
                    let settler = CoreSettler {
                        subject: Arc::clone(subject),
                        _permit: permit,
                    };
                    Some((Ok(Delivery::new(envelope, 1, Box::new(settler))), state))
                },
            );
            Ok(Box::pin(stream) as DeliveryStream)
        })
    }
}
