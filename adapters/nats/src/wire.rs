//! The envelope in NATS headers. The mapping is in `docs/wire-format.md`.

use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use bytes::Bytes;
use switchyard_core::{
    header_names, Envelope, Headers, MessageId, TransportError, TransportErrorKind,
};

pub(crate) const MSG_ID: &str = "Nats-Msg-Id";
const TYPE: &str = "switchyard-type";
/// The id, when `Nats-Msg-Id` is not it (replays).
const ID: &str = "switchyard-id";
const CORRELATION_ID: &str = "switchyard-correlation-id";
const CAUSATION_ID: &str = "switchyard-causation-id";
const PRODUCER: &str = "switchyard-producer";
const PARTITION_KEY: &str = "switchyard-partition-key";
const TENANT: &str = "switchyard-tenant";
const REPLY_TO: &str = "switchyard-reply-to";
const CONTENT_TYPE: &str = "switchyard-content-type";
const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

fn rfc3339(t: SystemTime) -> Option<String> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    (d < Duration::from_secs(253_402_300_800))
        .then(|| humantime::format_rfc3339_millis(t).to_string())
}

/// The NATS headers of `env`. Header values cannot hold CR or LF on the
/// wire, and names cannot hold `:` or whitespace: such headers are refused
/// with an `Encode` error rather than corrupting the protocol.
pub(crate) fn encode(env: &Envelope) -> Result<HeaderMap, TransportError> {
    let mut h = HeaderMap::new();
    let mut put = |name: &str, value: &str| -> Result<(), TransportError> {
        if value.contains(['\r', '\n'])
            || name.is_empty()
            || name.contains([':', ' ', '\t', '\r', '\n'])
        {
            return Err(TransportError::new(
                TransportErrorKind::Encode,
                format!("header {name:?} cannot be carried by NATS (CR/LF in the value, or an invalid name)"),
            ));
        }
        h.insert(name, value);
        Ok(())
    };
    for (k, v) in env.headers.iter() {
        put(k, v)?;
    }
    match env.headers.get(header_names::REPLAYED_AT) {
        // A replay keeps its id but must not hit the duplicate window.
        Some(at) => {
            put(MSG_ID, &format!("{}:replay:{at}", env.id.as_str()))?;
            put(ID, env.id.as_str())?;
        }
        None => put(MSG_ID, env.id.as_str())?,
    }
    put(TYPE, &env.kind)?;
    put(
        header_names::SCHEMA_VERSION,
        &env.schema_version.to_string(),
    )?;
    if let Some(t) = rfc3339(env.occurred_at) {
        put(header_names::OCCURRED_AT, &t)?;
    }
    if let Some(t) = env.deadline.and_then(rfc3339) {
        put(header_names::DEADLINE, &t)?;
    }
    for (name, value) in [
        (CORRELATION_ID, &env.correlation_id),
        (CAUSATION_ID, &env.causation_id),
        (PRODUCER, &env.producer),
        (PARTITION_KEY, &env.partition_key),
        (TENANT, &env.tenant),
        (REPLY_TO, &env.reply_to),
        (CONTENT_TYPE, &env.content_type),
        (TRACEPARENT, &env.trace.traceparent),
        (TRACESTATE, &env.trace.tracestate),
    ] {
        if let Some(v) = value {
            put(name, v)?;
        }
    }
    Ok(h)
}

/// The envelope of a message; unparsable standard fields stay in the
/// headers under their names.
pub(crate) fn decode(headers: Option<&HeaderMap>, payload: Bytes) -> Envelope {
    let mut all = Headers::new();
    if let Some(map) = headers {
        for (name, values) in map.iter() {
            if let Some(v) = values.last() {
                all.insert(AsRef::<str>::as_ref(name), v.as_str());
            }
        }
    }
    let msg_id = all.remove(MSG_ID);
    let id = all.remove(ID).or(msg_id).unwrap_or_default();
    let kind = all.remove(TYPE).unwrap_or_default();
    let mut env = Envelope::new(kind, payload).with_id(MessageId::from_wire(id));
    env.correlation_id = all.remove(CORRELATION_ID);
    env.causation_id = all.remove(CAUSATION_ID);
    env.producer = all.remove(PRODUCER);
    env.partition_key = all.remove(PARTITION_KEY);
    env.tenant = all.remove(TENANT);
    env.reply_to = all.remove(REPLY_TO);
    env.content_type = all.remove(CONTENT_TYPE);
    env.trace.traceparent = all.remove(TRACEPARENT);
    env.trace.tracestate = all.remove(TRACESTATE);
    match all.get(header_names::SCHEMA_VERSION).map(str::parse::<u32>) {
        Some(Ok(v)) => {
            env.schema_version = v;
            all.remove(header_names::SCHEMA_VERSION);
        }
        Some(Err(_)) => {}
        None => env.schema_version = 1,
    }
    let parse_time = |s: &str| humantime::parse_rfc3339_weak(s).ok();
    match all.get(header_names::OCCURRED_AT).map(parse_time) {
        Some(Some(t)) => {
            env.occurred_at = t;
            all.remove(header_names::OCCURRED_AT);
        }
        Some(None) => {}
        None => env.occurred_at = SystemTime::UNIX_EPOCH,
    }
    if let Some(Some(t)) = all.get(header_names::DEADLINE).map(parse_time) {
        env.deadline = Some(t);
        all.remove(header_names::DEADLINE);
    }
    env.headers = all;
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_round_trips_through_nats_headers() {
        let mut env = Envelope::new("orders.placed", vec![0u8, 255]).with_schema_version(2);
        env.correlation_id = Some("c".into());
        env.causation_id = Some("k".into());
        env.producer = Some("p".into());
        env.partition_key = Some("pk".into());
        env.tenant = Some("t".into());
        env.reply_to = Some("r".into());
        env.content_type = Some("application/json".into());
        env.trace.traceparent =
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        env.headers.insert("x-custom", "v");
        let back = decode(Some(&encode(&env).unwrap()), env.payload.clone());
        let ms = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        };
        assert_eq!(ms(back.occurred_at), ms(env.occurred_at));
        let mut expected = env.clone();
        expected.occurred_at = back.occurred_at;
        assert_eq!(back, expected);
    }

    #[test]
    fn a_replay_keeps_its_id_under_another_msg_id() {
        let env =
            Envelope::new("t", "x").with_header(header_names::REPLAYED_AT, "2026-11-27T04:00:00Z");
        let h = encode(&env).unwrap();
        assert_ne!(h.get(MSG_ID).unwrap().as_str(), env.id.as_str());
        let back = decode(Some(&h), env.payload.clone());
        assert_eq!(back.id, env.id);
        assert_eq!(
            back.headers.get(header_names::REPLAYED_AT),
            Some("2026-11-27T04:00:00Z")
        );
    }

    #[test]
    fn header_values_with_newlines_are_refused() {
        let env = Envelope::new("t", "x").with_header("x-evil", "a\r\nNats-Msg-Id: forged");
        assert_eq!(encode(&env).unwrap_err().kind(), TransportErrorKind::Encode);
    }
}
