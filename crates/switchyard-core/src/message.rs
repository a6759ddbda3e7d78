//! Typed messages and the codecs that turn them into payload bytes.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A typed message: a serde type with a stable type name and a version.
///
/// Commands are imperative (`ReserveInventory`), events past tense
/// (`OrderPlaced`). `TYPE` is what goes on the wire, so it must not change
/// when the Rust type is renamed.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use switchyard_core::Message;
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderPlaced { order_id: String }
///
/// impl Message for OrderPlaced {
///     const TYPE: &'static str = "orders.order-placed";
/// }
/// assert_eq!(OrderPlaced::VERSION, 1);
/// ```
pub trait Message: Serialize + DeserializeOwned + Send + 'static {
    /// Stable type name, e.g. `orders.order-placed`.
    const TYPE: &'static str;
    /// Schema version of this type; bump it on incompatible changes.
    const VERSION: u32 = 1;
}

/// A payload that could not be decoded into the expected type.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode {kind} v{version} payload")]
pub struct DecodeError {
    /// The message type that was expected.
    pub kind: &'static str,
    /// The schema version that was expected.
    pub version: u32,
    /// Why decoding failed.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Turns typed messages into payload bytes and back.
pub trait Codec: Send + Sync + 'static {
    /// The media type written into the envelope's `content_type`.
    fn content_type(&self) -> &'static str;
    /// Encodes `msg`.
    fn encode<M: Message>(&self, msg: &M) -> Result<Bytes, serde_json::Error>;
    /// Decodes a payload into `M`.
    fn decode<M: Message>(&self, payload: &[u8]) -> Result<M, DecodeError>;
}

/// JSON through serde, the default codec.
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    fn content_type(&self) -> &'static str {
        "application/json"
    }

    fn encode<M: Message>(&self, msg: &M) -> Result<Bytes, serde_json::Error> {
        serde_json::to_vec(msg).map(Bytes::from)
    }

    fn decode<M: Message>(&self, payload: &[u8]) -> Result<M, DecodeError> {
        serde_json::from_slice(payload).map_err(|e| DecodeError {
            kind: M::TYPE,
            version: M::VERSION,
            source: Box::new(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Ping {
        n: u32,
    }
    impl Message for Ping {
        const TYPE: &'static str = "test.ping";
        const VERSION: u32 = 2;
    }

    #[test]
    fn json_round_trip() {
        let bytes = JsonCodec.encode(&Ping { n: 7 }).unwrap();
        assert_eq!(JsonCodec.decode::<Ping>(&bytes).unwrap(), Ping { n: 7 });
    }

    #[test]
    fn decode_error_names_type_and_version() {
        let err = JsonCodec.decode::<Ping>(b"{\"n\":").unwrap_err();
        assert!(err
            .to_string()
            .starts_with("cannot decode test.ping v2 payload"));
    }
}
