//! The envelope as an SQS message body and at most ten message attributes.
//! The mapping is in `docs/wire-format.md`.

use std::collections::HashMap;
use std::time::SystemTime;

use aws_sdk_sqs::types::MessageAttributeValue;
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Map, Value};
use switchyard_core::{
    header_names, Envelope, Headers, MessageId, TransportError, TransportErrorKind,
};

/// SQS's limit of message attributes per message.
pub(crate) const MAX_ATTRIBUTES: usize = 10;
pub(crate) const ID: &str = "switchyard-id";
pub(crate) const TYPE: &str = "switchyard-type";
/// The envelope fields without an attribute of their own, as JSON.
const ENVELOPE: &str = "switchyard-envelope";
/// Headers that did not get an attribute of their own, as a JSON object.
const HEADERS: &str = "switchyard-headers";
const CORRELATION_ID: &str = "switchyard-correlation-id";
const TRACEPARENT: &str = "traceparent";
const STRING: &str = "String";

/// Attributes that carry headers when there is room, most important first:
/// the dead-letter metadata is what an operator filters on.
const PRIORITY: [&str; 5] = [
    header_names::DEAD_LETTER_REASON,
    header_names::DEAD_LETTER_ATTEMPTS,
    header_names::DEAD_LETTER_SOURCE,
    header_names::DEAD_LETTER_AT,
    header_names::DEAD_LETTER_DETAIL,
];

/// A message ready for SendMessage.
pub(crate) struct Encoded {
    pub(crate) body: String,
    pub(crate) attributes: HashMap<String, MessageAttributeValue>,
    /// What SQS counts against the queue's maximum message size: the body
    /// plus each attribute's name, data type and value.
    pub(crate) size: usize,
}

/// Whether SQS accepts `c` in a body or attribute value (the XML 1.0
/// character set).
fn allowed(c: char) -> bool {
    matches!(c, '\u{9}' | '\u{a}' | '\u{d}' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
}

fn valid_value(v: &str) -> bool {
    !v.is_empty() && v.chars().all(allowed)
}

/// SQS attribute names: up to 256 of `A-Za-z0-9_-.`, no leading or trailing
/// or doubled `.`, and not starting with `AWS.` or `Amazon.`.
fn valid_name(n: &str) -> bool {
    let lower = n.to_ascii_lowercase();
    !n.is_empty()
        && n.len() <= 256
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !n.starts_with('.')
        && !n.ends_with('.')
        && !n.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
}

/// JSON whose characters SQS accepts: serde_json leaves characters such as
/// U+FFFE unescaped, which SQS refuses.
fn sqs_json(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().all(allowed) {
        return s;
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if allowed(c) {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

fn string_attribute(value: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type(STRING)
        .string_value(value)
        .build()
        .expect("data type is set")
}

/// The body and attributes of `env`.
pub(crate) fn encode(env: &Envelope) -> Encoded {
    let mut fields = Map::new();
    let mut attributes: Vec<(String, String)> = Vec::with_capacity(MAX_ATTRIBUTES);

    for (name, value) in [(ID, env.id.as_str()), (TYPE, env.kind.as_str())] {
        if valid_value(value) {
            attributes.push((name.to_owned(), value.to_owned()));
        } else {
            fields.insert(name.to_owned(), value.into());
        }
    }

    // Body: the payload itself when SQS can carry it as text, else base64.
    let body = match std::str::from_utf8(&env.payload) {
        Ok(text) if valid_value(text) => text.to_owned(),
        _ if env.payload.is_empty() => {
            fields.insert("body".into(), "empty".into());
            ".".to_owned()
        }
        _ => {
            fields.insert("body".into(), "base64".into());
            base64::engine::general_purpose::STANDARD.encode(&env.payload)
        }
    };

    if env.schema_version != 1 {
        fields.insert("schema_version".into(), env.schema_version.into());
    }
    if let Some(t) = switchyard_core::rfc3339_millis(env.occurred_at) {
        fields.insert("occurred_at".into(), t.into());
    }
    if let Some(t) = env.deadline.and_then(switchyard_core::rfc3339_millis) {
        fields.insert("deadline".into(), t.into());
    }
    for (name, value) in [
        ("causation_id", &env.causation_id),
        ("producer", &env.producer),
        ("partition_key", &env.partition_key),
        ("tenant", &env.tenant),
        ("reply_to", &env.reply_to),
        ("content_type", &env.content_type),
        ("tracestate", &env.trace.tracestate),
    ] {
        if let Some(v) = value {
            fields.insert(name.into(), v.as_str().into());
        }
    }

    // Candidates for an attribute of their own, in priority order; the rest
    // is packed. Envelope fields overflow into the envelope JSON, headers
    // into the headers JSON.
    enum Slot<'a> {
        Field(&'static str, &'static str, &'a str),
        Header(&'a str, &'a str),
    }
    let mut candidates: Vec<Slot<'_>> = Vec::new();
    for name in PRIORITY {
        if let Some(v) = env.headers.get(name) {
            candidates.push(Slot::Header(name, v));
        }
    }
    if let Some(v) = &env.correlation_id {
        candidates.push(Slot::Field(CORRELATION_ID, "correlation_id", v));
    }
    if let Some(v) = &env.trace.traceparent {
        candidates.push(Slot::Field(TRACEPARENT, "traceparent", v));
    }
    for (name, value) in env.headers.iter() {
        if !PRIORITY.contains(&name) {
            candidates.push(Slot::Header(name, value));
        }
    }
    let reserved =
        |n: &str| [ID, TYPE, ENVELOPE, HEADERS, CORRELATION_ID, TRACEPARENT].contains(&n);
    let eligible = |slot: &Slot<'_>| match slot {
        Slot::Field(_, _, v) => valid_value(v),
        Slot::Header(n, v) => valid_name(n) && !reserved(n) && valid_value(v),
    };
    let free = MAX_ATTRIBUTES - attributes.len() - 1; // one for the envelope JSON
    let n_eligible = candidates.iter().filter(|s| eligible(s)).count();
    let any_ineligible_header = candidates
        .iter()
        .any(|s| matches!(s, Slot::Header(..)) && !eligible(s));
    let own = if n_eligible + usize::from(any_ineligible_header) <= free {
        n_eligible
    } else {
        free - 1 // keep one for the headers JSON
    };
    let mut packed = Map::new();
    let mut given = 0;
    for slot in candidates {
        let gets_own = given < own && eligible(&slot);
        match slot {
            Slot::Field(attr, _, v) if gets_own => attributes.push((attr.to_owned(), v.to_owned())),
            Slot::Field(_, field, v) => {
                fields.insert(field.into(), v.into());
                continue;
            }
            Slot::Header(n, v) if gets_own => attributes.push((n.to_owned(), v.to_owned())),
            Slot::Header(n, v) => {
                packed.insert(n.into(), v.into());
                continue;
            }
        }
        given += 1;
    }
    attributes.push((ENVELOPE.to_owned(), sqs_json(&Value::Object(fields))));
    if !packed.is_empty() {
        attributes.push((HEADERS.to_owned(), sqs_json(&Value::Object(packed))));
    }
    debug_assert!(attributes.len() <= MAX_ATTRIBUTES);
    let size = body.len()
        + attributes
            .iter()
            .map(|(n, v)| n.len() + STRING.len() + v.len())
            .sum::<usize>();
    Encoded {
        body,
        attributes: attributes
            .into_iter()
            .map(|(n, v)| {
                let value = string_attribute(&v);
                (n, value)
            })
            .collect(),
        size,
    }
}

/// The envelope of a received message. Attributes it does not know become
/// headers; fields that do not parse stay in the headers under their
/// attribute names, so nothing is dropped.
pub(crate) fn decode(
    body: &str,
    attributes: Option<&HashMap<String, MessageAttributeValue>>,
) -> Envelope {
    let mut headers = Headers::new();
    let mut fields = Map::new();
    let mut packed = Map::new();
    let mut id = None;
    let mut kind = None;
    let mut correlation = None;
    let mut traceparent = None;
    for (name, value) in attributes.into_iter().flatten() {
        let text = match (value.string_value(), value.binary_value()) {
            (Some(s), _) => s.to_owned(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD.encode(b.as_ref()),
            (None, None) => String::new(),
        };
        match name.as_str() {
            ID => id = Some(text),
            TYPE => kind = Some(text),
            CORRELATION_ID => correlation = Some(text),
            TRACEPARENT => traceparent = Some(text),
            ENVELOPE | HEADERS => match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(map)) if name == ENVELOPE => fields = map,
                Ok(Value::Object(map)) => packed = map,
                _ => {
                    headers.insert(name.as_str(), text);
                }
            },
            _ => {
                headers.insert(name.as_str(), text);
            }
        }
    }
    for (name, value) in packed {
        match value {
            Value::String(s) => headers.insert(name, s),
            other => headers.insert(name, other.to_string()),
        };
    }
    let mut take = |name: &str| match fields.remove(name) {
        Some(Value::String(s)) => Some(s),
        Some(other) => Some(other.to_string()),
        None => None,
    };
    let id = id.or_else(|| take(ID)).unwrap_or_default();
    let kind = kind.or_else(|| take(TYPE)).unwrap_or_default();
    let payload = match take("body").as_deref() {
        Some("empty") => Bytes::new(),
        Some("base64") => match base64::engine::general_purpose::STANDARD.decode(body) {
            Ok(bytes) => Bytes::from(bytes),
            // Not what the producer claimed: hand the text over as it is and
            // let validation reject it.
            Err(_) => Bytes::copy_from_slice(body.as_bytes()),
        },
        _ => Bytes::copy_from_slice(body.as_bytes()),
    };
    let mut env = Envelope::new(kind, payload).with_id(MessageId::from_wire(id));
    env.correlation_id = correlation.or_else(|| take("correlation_id"));
    env.trace.traceparent = traceparent.or_else(|| take("traceparent"));
    env.causation_id = take("causation_id");
    env.producer = take("producer");
    env.partition_key = take("partition_key");
    env.tenant = take("tenant");
    env.reply_to = take("reply_to");
    env.content_type = take("content_type");
    env.trace.tracestate = take("tracestate");
    env.schema_version = 1;
    if let Some(v) = take("schema_version") {
        match v.parse::<u32>() {
            Ok(v) => env.schema_version = v,
            Err(_) => {
                headers.insert(header_names::SCHEMA_VERSION, v);
            }
        }
    }
    let parse_time = |s: &str| humantime::parse_rfc3339_weak(s).ok();
    env.occurred_at = SystemTime::UNIX_EPOCH;
    if let Some(t) = take("occurred_at") {
        match parse_time(&t) {
            Some(t) => env.occurred_at = t,
            None => {
                headers.insert(header_names::OCCURRED_AT, t);
            }
        }
    }
    if let Some(t) = take("deadline") {
        match parse_time(&t) {
            Some(t) => env.deadline = Some(t),
            None => {
                headers.insert(header_names::DEADLINE, t);
            }
        }
    }
    // Fields this version does not know are kept as headers.
    for (name, value) in fields {
        let text = match value {
            Value::String(s) => s,
            other => other.to_string(),
        };
        headers.insert(format!("{ENVELOPE}.{name}"), text);
    }
    env.headers = headers;
    env
}

/// A FIFO message group id or deduplication id: up to 128 characters of
/// `!`-`~`.
pub(crate) fn fifo_id(what: &str, value: &str) -> Result<(), TransportError> {
    if value.is_empty() || value.len() > 128 || !value.bytes().all(|b| (b'!'..=b'~').contains(&b)) {
        return Err(TransportError::new(
            TransportErrorKind::Encode,
            format!(
                "a FIFO {what} must be 1 to 128 printable ASCII characters; {:?} is not",
                switchyard_core::MessageId::from_wire(value).to_string()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn round_trip(env: &Envelope) -> Envelope {
        let enc = encode(env);
        assert!(
            enc.attributes.len() <= MAX_ATTRIBUTES,
            "{}",
            enc.attributes.len()
        );
        decode(&enc.body, Some(&enc.attributes))
    }

    fn same_ms(a: &Envelope, mut b: Envelope) -> Envelope {
        let ms = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        };
        assert_eq!(ms(a.occurred_at), ms(b.occurred_at));
        b.occurred_at = a.occurred_at;
        b
    }

    fn full() -> Envelope {
        let mut env = Envelope::new("orders.placed", "{\"n\":1}").with_schema_version(2);
        env.correlation_id = Some("c".into());
        env.causation_id = Some("k".into());
        env.producer = Some("p".into());
        env.partition_key = Some("pk".into());
        env.tenant = Some("t".into());
        env.reply_to = Some("r".into());
        env.content_type = Some("application/json".into());
        env.deadline = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000));
        env.trace.traceparent =
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        env.trace.tracestate = Some("a=b".into());
        env
    }

    #[test]
    fn every_field_round_trips() {
        let env = full().with_header("x-custom", "v");
        let back = round_trip(&env);
        assert_eq!(same_ms(&env, back), env);
    }

    #[test]
    fn many_headers_are_packed_within_ten_attributes() {
        let mut env = full();
        for i in 0..30 {
            env.headers.insert(format!("x-h{i:02}"), format!("v{i}"));
        }
        for name in PRIORITY {
            env.headers.insert(name, "dl");
        }
        let enc = encode(&env);
        assert_eq!(enc.attributes.len(), MAX_ATTRIBUTES);
        // The dead-letter metadata gets attributes of its own.
        for name in PRIORITY {
            assert!(enc.attributes.contains_key(name), "{name}");
        }
        let back = decode(&enc.body, Some(&enc.attributes));
        assert_eq!(same_ms(&env, back), env);
    }

    #[test]
    fn binary_empty_and_unsendable_payloads_round_trip() {
        for payload in [
            vec![0u8, 159, 146, 150, 255],
            vec![],
            "bad \u{1} control".as_bytes().to_vec(),
            "\u{fffe}".as_bytes().to_vec(),
        ] {
            let env = Envelope::new("t", payload.clone());
            let enc = encode(&env);
            assert!(valid_value(&enc.body));
            assert_eq!(round_trip(&env).payload, Bytes::from(payload));
        }
    }

    #[test]
    fn headers_sqs_cannot_name_are_packed() {
        let env = Envelope::new("t", "x")
            .with_header("has space", "v")
            .with_header("AWS.reserved", "v")
            .with_header("empty", "")
            .with_header("x-ctl", "a\u{1}b")
            .with_header(ID, "forged");
        let enc = encode(&env);
        for (name, value) in enc.attributes.iter() {
            assert!(valid_name(name), "{name}");
            assert!(valid_value(value.string_value().unwrap()), "{name}");
        }
        let back = round_trip(&env);
        assert_eq!(back.id, env.id, "a header cannot forge the id");
        assert_eq!(same_ms(&env, back), env);
    }

    #[test]
    fn foreign_messages_decode_with_defaults() {
        let mut attrs = HashMap::new();
        attrs.insert("origin".to_owned(), string_attribute("legacy"));
        attrs.insert(ENVELOPE.to_owned(), string_attribute("not json"));
        let env = decode("plain body", Some(&attrs));
        assert_eq!(env.payload, Bytes::from_static(b"plain body"));
        assert_eq!(env.id.as_str(), "");
        assert_eq!(env.headers.get("origin"), Some("legacy"));
        assert_eq!(env.headers.get(ENVELOPE), Some("not json"));
        assert_eq!(env.schema_version, 1);
    }

    #[test]
    fn fifo_ids_are_checked() {
        assert!(fifo_id("group id", "order-17").is_ok());
        assert!(fifo_id("group id", "").is_err());
        assert!(fifo_id("group id", "with space").is_err());
        assert!(fifo_id("group id", &"x".repeat(129)).is_err());
    }
}
