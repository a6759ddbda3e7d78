//! Publishing typed messages through a transport.

use std::fmt;
use std::sync::Arc;

use crate::envelope::{Envelope, MessageId};
use crate::message::{Codec, JsonCodec, Message};
use crate::transport::{Transport, TransportError, TransportErrorKind};

/// Publishes typed messages (JSON-encoded) or raw envelopes. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    transport: Arc<dyn Transport>,
    producer: Option<Arc<str>>,
}

impl Publisher {
    /// A publisher on `transport`.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Publisher {
            transport,
            producer: None,
        }
    }

    /// Stamps `producer` into every envelope it creates.
    pub fn with_producer(mut self, producer: impl Into<Arc<str>>) -> Self {
        self.producer = Some(producer.into());
        self
    }

    /// The transport it publishes on.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// A fresh envelope for `msg`: new id, its type and version, JSON payload.
    pub fn envelope_for<M: Message>(&self, msg: &M) -> Result<Envelope, TransportError> {
        let payload = JsonCodec.encode(msg).map_err(|e| {
            TransportError::new(
                TransportErrorKind::Encode,
                format!("cannot encode {}", M::TYPE),
            )
            .with_source(e)
        })?;
        let mut env = Envelope::new(M::TYPE, payload).with_schema_version(M::VERSION);
        env.content_type = Some(JsonCodec.content_type().to_owned());
        env.producer = self.producer.as_deref().map(str::to_owned);
        Ok(env)
    }

    /// Publishes `msg` to `destination`; returns its id once the broker holds it.
    pub async fn publish<M: Message>(
        &self,
        destination: &str,
        msg: &M,
    ) -> Result<MessageId, TransportError> {
        self.publish_envelope(destination, self.envelope_for(msg)?)
            .await
    }

    /// Publishes a ready envelope; returns its id once the broker holds it.
    pub async fn publish_envelope(
        &self,
        destination: &str,
        envelope: Envelope,
    ) -> Result<MessageId, TransportError> {
        let id = envelope.id.clone();
        self.transport.publish(destination, envelope).await?;
        Ok(id)
    }
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("producer", &self.producer)
            .finish_non_exhaustive()
    }
}
