//! The envelope in NATS headers. The mapping is in `docs/wire-format.md`.

use async_nats::header::{HeaderName, NATS_MESSAGE_ID};
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
/// On a dead letter: the subject the message was published to.
pub(crate) const DEAD_LETTER_SUBJECT: &str = "switchyard-dead-letter-subject";
/// On a dead letter: its sequence number in the stream it came from.
pub(crate) const DEAD_LETTER_STREAM_SEQUENCE: &str = "switchyard-dead-letter-stream-sequence";

/// The optional string fields with a header of their own, by name.
const OPTIONAL: [(&str, HeaderName); 9] = [
    (CORRELATION_ID, HeaderName::from_static(CORRELATION_ID)),
    (CAUSATION_ID, HeaderName::from_static(CAUSATION_ID)),
    (PRODUCER, HeaderName::from_static(PRODUCER)),
    (PARTITION_KEY, HeaderName::from_static(PARTITION_KEY)),
    (TENANT, HeaderName::from_static(TENANT)),
    (REPLY_TO, HeaderName::from_static(REPLY_TO)),
    (CONTENT_TYPE, HeaderName::from_static(CONTENT_TYPE)),
    (TRACEPARENT, HeaderName::from_static(TRACEPARENT)),
    (TRACESTATE, HeaderName::from_static(TRACESTATE)),
];

fn optional_fields(env: &Envelope) -> [&Option<String>; 9] {
    [
        &env.correlation_id,
        &env.causation_id,
        &env.producer,
        &env.partition_key,
        &env.tenant,
        &env.reply_to,
        &env.content_type,
        &env.trace.traceparent,
        &env.trace.tracestate,
    ]
}

fn unencodable(name: &str) -> TransportError {
    TransportError::new(
        TransportErrorKind::Encode,
        format!(
            "header {:?} cannot be carried by NATS (a name must be printable ASCII without ':', a value cannot hold CR or LF)",
            name.escape_debug().to_string()
        ),
    )
}

/// A value NATS can carry (async-nats panics on the others).
fn value(name: &str, value: &str) -> Result<String, TransportError> {
    owned_value(name, value.to_owned())
}

/// [`value`] for a string that is already owned.
fn owned_value(name: &str, value: String) -> Result<String, TransportError> {
    // Bytes, not chars: `str::contains` with a char set decodes each one.
    if value.bytes().any(|b| b == b'\r' || b == b'\n') {
        return Err(unencodable(name));
    }
    Ok(value)
}

/// The delivery count and the stream sequence from the reply subject of a
/// JetStream message (the ack subject, ADR-15): `$JS.ACK.<stream>.
/// <consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`, or
/// the newer form with the domain and account hash before the stream and
/// possibly more tokens after. `None` for any other subject.
///
/// async-nats' `Message::info` parses every token, the timestamp included,
/// for these two numbers, at a cost comparable to decoding the envelope.
pub(crate) fn ack_subject(reply: &str) -> Option<(u64, u64)> {
    let rest = reply.strip_prefix("$JS.ACK.")?.as_bytes();
    // Where each of the first ten tokens starts, and how many there are;
    // one pass over the bytes (`str::split` searches for each dot anew).
    let mut starts = [0usize; 10];
    let mut n = 1;
    for (i, &b) in rest.iter().enumerate() {
        if b == b'.' {
            if n < starts.len() {
                starts[n] = i + 1;
            }
            n += 1;
        }
    }
    let at = match n {
        7 => 2,
        n if n >= 9 => 4,
        _ => return None,
    };
    let number = |i: usize| -> Option<u64> {
        let token = &rest[starts[i]..starts[i + 1] - 1];
        if token.is_empty() || token.len() > 19 {
            return None;
        }
        token.iter().try_fold(0u64, |acc, &d| {
            d.is_ascii_digit().then(|| acc * 10 + u64::from(d - b'0'))
        })
    };
    Some((number(at)?, number(at + 1)?))
}

/// The NATS headers of `env`, and its payload. Header values cannot hold
/// CR or LF on the wire, and names must be printable ASCII without `:`:
/// such headers are refused with an `Encode` error rather than corrupting
/// the protocol. Schema version 1 (the default) is not written. The id and
/// type strings become header values without a copy.
pub(crate) fn encode(env: Envelope) -> Result<(HeaderMap, Bytes), TransportError> {
    let mut h = HeaderMap::new();
    for (k, v) in env.headers.iter() {
        if k.is_empty() || k.contains(|c: char| !c.is_ascii_graphic() || c == ':') {
            return Err(unencodable(k));
        }
        h.insert(k, value(k, v)?);
    }
    if env.schema_version != 1 {
        h.insert(
            HeaderName::from_static(header_names::SCHEMA_VERSION),
            env.schema_version.to_string(),
        );
    }
    if let Some(t) = switchyard_core::rfc3339_millis(env.occurred_at) {
        h.insert(HeaderName::from_static(header_names::OCCURRED_AT), t);
    }
    if let Some(t) = env.deadline.and_then(switchyard_core::rfc3339_millis) {
        h.insert(HeaderName::from_static(header_names::DEADLINE), t);
    }
    for ((name, header), field) in OPTIONAL.into_iter().zip(optional_fields(&env)) {
        if let Some(v) = field {
            h.insert(header, value(name, v)?);
        }
    }
    match env.headers.get(header_names::REPLAYED_AT) {
        // A replay keeps its id but must not hit the duplicate window.
        Some(at) => {
            h.insert(
                NATS_MESSAGE_ID,
                value(MSG_ID, &format!("{}:replay:{at}", env.id.as_str()))?,
            );
            h.insert(HeaderName::from_static(ID), value(ID, env.id.as_str())?);
        }
        None => h.insert(NATS_MESSAGE_ID, owned_value(MSG_ID, env.id.into_string())?),
    }
    h.insert(HeaderName::from_static(TYPE), owned_value(TYPE, env.kind)?);
    Ok((h, env.payload))
}

/// [`encode`], after checking that the payload is at most `max_payload`
/// bytes (the server's `max_payload` less room for headers): `TooLarge`
/// otherwise.
pub(crate) fn encode_within(
    env: Envelope,
    max_payload: usize,
) -> Result<(HeaderMap, Bytes), TransportError> {
    if env.payload.len() > max_payload {
        return Err(TransportError::new(
            TransportErrorKind::TooLarge,
            format!(
                "payload of {} bytes is over the {max_payload}-byte limit of this NATS server (max_payload less room for headers)",
                env.payload.len()
            ),
        ));
    }
    encode(env)
}

/// The envelope of a message; unparsable standard fields stay in the
/// headers under their names. A missing schema version is 1; a missing
/// time is the Unix epoch.
pub(crate) fn decode(headers: Option<&HeaderMap>, payload: Bytes) -> Envelope {
    let mut env = Envelope::decoded(MessageId::from_wire(String::new()), String::new(), payload);
    let Some(map) = headers else {
        return env;
    };
    let mut msg_id = None;
    let mut id = None;
    let mut others = Headers::new();
    let parse_time = |s: &str| humantime::parse_rfc3339_weak(s).ok();
    for (name, values) in map.iter() {
        let Some(v) = values.last() else { continue };
        let (name, v): (&str, &str) = (name.as_ref(), v.as_str());
        let field = match name {
            MSG_ID => {
                msg_id = Some(v);
                continue;
            }
            ID => {
                id = Some(v);
                continue;
            }
            TYPE => {
                env.kind = v.to_owned();
                continue;
            }
            CORRELATION_ID => &mut env.correlation_id,
            CAUSATION_ID => &mut env.causation_id,
            PRODUCER => &mut env.producer,
            PARTITION_KEY => &mut env.partition_key,
            TENANT => &mut env.tenant,
            REPLY_TO => &mut env.reply_to,
            CONTENT_TYPE => &mut env.content_type,
            TRACEPARENT => &mut env.trace.traceparent,
            TRACESTATE => &mut env.trace.tracestate,
            header_names::SCHEMA_VERSION => {
                match v.parse() {
                    Ok(version) => env.schema_version = version,
                    Err(_) => {
                        others.insert(name, v);
                    }
                }
                continue;
            }
            header_names::OCCURRED_AT => {
                match parse_time(v) {
                    Some(t) => env.occurred_at = t,
                    None => {
                        others.insert(name, v);
                    }
                }
                continue;
            }
            header_names::DEADLINE => {
                match parse_time(v) {
                    Some(t) => env.deadline = Some(t),
                    None => {
                        others.insert(name, v);
                    }
                }
                continue;
            }
            // JetStream's own control headers (`Nats-Expected-Stream`,
            // `Nats-Rollup`, `Nats-TTL`, ...) a producer set: not part of
            // the message, and harmful if passed on with a dead-letter or
            // a republish.
            _ if name.len() >= 5 && name[..5].eq_ignore_ascii_case("nats-") => continue,
            _ => {
                others.insert(name, v);
                continue;
            }
        };
        *field = Some(v.to_owned());
    }
    // `switchyard-id` carries the id only for a replay (whose `Nats-Msg-Id`
    // is made unique); otherwise `Nats-Msg-Id` is the id.
    let replay = others.get(header_names::REPLAYED_AT).is_some();
    let id = if replay { id.or(msg_id) } else { msg_id.or(id) };
    if let Some(id) = id {
        env.id = MessageId::from_wire(id);
    }
    env.headers = others;
    env
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    #[test]
    fn ack_subjects_of_both_forms_give_the_delivery_count_and_stream_sequence() {
        // The original form: stream, consumer, delivered, stream seq,
        // consumer seq, time, pending.
        assert_eq!(
            ack_subject("$JS.ACK.orders.switchyard.3.1042.77.1764230400000000000.12"),
            Some((3, 1042))
        );
        // ADR-15: domain (`_` for none) and account hash first, and a
        // random token (or more tokens) after.
        assert_eq!(
            ack_subject("$JS.ACK._.ACCHASH.orders.switchyard.1.7.7.1764230400000000000.0.tok"),
            Some((1, 7))
        );
        assert_eq!(
            ack_subject("$JS.ACK.hub.ACCHASH.orders.switchyard.2.9.8.1764230400000000000.0"),
            Some((2, 9))
        );
        assert_eq!(
            ack_subject("$JS.ACK.hub.ACCHASH.orders.switchyard.5.6.4.1.0.tok.future.more"),
            Some((5, 6))
        );
        for not_an_ack in [
            "_INBOX.abc",
            "$JS.ACK.orders.switchyard.3",
            "$JS.ACK.orders.switchyard.x.1.1.1.1",
            "$JS.ACK.a.b.c.d.e.f.g.h",
            "",
        ] {
            assert_eq!(ack_subject(not_an_ack), None, "{not_an_ack}");
        }
    }

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
        let back = decode(Some(&encode(env.clone()).unwrap().0), env.payload.clone());
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
        let h = encode(env.clone()).unwrap().0;
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
        assert_eq!(
            encode(env.clone()).unwrap_err().kind(),
            TransportErrorKind::Encode
        );
    }

    #[test]
    fn header_names_nats_cannot_carry_are_refused_not_panicked_on() {
        for name in ["x-caf\u{e9}", "x-a\u{1}b", "x a", "x:a", ""] {
            let env = Envelope::new("t", "x").with_header(name, "v");
            assert_eq!(
                encode(env.clone()).unwrap_err().kind(),
                TransportErrorKind::Encode,
                "{name:?}"
            );
        }
    }

    #[test]
    fn schema_version_one_is_implied_and_others_are_written() {
        let h = encode(Envelope::new("t", "x")).unwrap().0;
        assert!(h.get(header_names::SCHEMA_VERSION).is_none());
        assert_eq!(decode(Some(&h), Bytes::new()).schema_version, 1);
        let h = encode(Envelope::new("t", "x").with_schema_version(3))
            .unwrap()
            .0;
        assert_eq!(h.get(header_names::SCHEMA_VERSION).unwrap().as_str(), "3");
        assert_eq!(decode(Some(&h), Bytes::new()).schema_version, 3);
    }

    #[test]
    fn unparsable_standard_fields_stay_as_headers() {
        let mut h = HeaderMap::new();
        h.insert(NATS_MESSAGE_ID, "m-1");
        h.insert(header_names::SCHEMA_VERSION, "two");
        h.insert(header_names::OCCURRED_AT, "yesterday");
        let env = decode(Some(&h), Bytes::new());
        assert_eq!(env.id.as_str(), "m-1");
        assert_eq!(env.schema_version, 1);
        assert_eq!(env.occurred_at, SystemTime::UNIX_EPOCH);
        assert_eq!(env.headers.get(header_names::SCHEMA_VERSION), Some("two"));
        assert_eq!(
            env.headers.get(header_names::OCCURRED_AT),
            Some("yesterday")
        );
    }

    #[test]
    fn jetstream_control_headers_are_not_carried_into_the_envelope() {
        let mut h = HeaderMap::new();
        h.insert(NATS_MESSAGE_ID, "m-1");
        h.insert("Nats-Expected-Stream", "elsewhere");
        h.insert("Nats-Rollup", "all");
        h.insert(ID, "forged");
        h.insert("x-kept", "v");
        let env = decode(Some(&h), Bytes::new());
        assert_eq!(
            env.id.as_str(),
            "m-1",
            "switchyard-id counts only for replays"
        );
        assert_eq!(env.headers.get("x-kept"), Some("v"));
        assert!(env.headers.iter().all(|(k, _)| !k.starts_with("Nats-")));
    }
}
