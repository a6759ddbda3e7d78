//! The envelope on the wire: AMQP 0-9-1 properties and headers. The mapping
//! is documented in `docs/wire-format.md`; keep the two in step.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use switchyard_core::{header_names, Envelope, Headers, MessageId};

/// Headers the adapter writes for fields AMQP has no property for.
pub(crate) mod names {
    pub const ID: &str = "switchyard-id";
    pub const TYPE: &str = "switchyard-type";
    pub const CORRELATION_ID: &str = "switchyard-correlation-id";
    pub const CAUSATION_ID: &str = "switchyard-causation-id";
    pub const PRODUCER: &str = "switchyard-producer";
    pub const PARTITION_KEY: &str = "switchyard-partition-key";
    pub const TENANT: &str = "switchyard-tenant";
    pub const REPLY_TO: &str = "switchyard-reply-to";
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
    /// Attempts made before this copy was published (delay-tier retries).
    pub const ATTEMPT: &str = "switchyard-attempt";
    /// RabbitMQ's own count of earlier deliveries of this copy (quorum queues).
    pub const DELIVERY_COUNT: &str = "x-delivery-count";
}

fn short(s: &str) -> Option<ShortString> {
    ShortString::try_new(s).ok()
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// A string property, or the header fallback when it is too long for an
/// AMQP short string (255 bytes).
fn put(headers: &mut FieldTable, value: Option<&str>, header: &str, set: impl FnOnce(ShortString)) {
    let Some(value) = value else { return };
    match short(value) {
        Some(s) => set(s),
        None => {
            headers.insert(header.into(), long(value));
        }
    }
}

/// The AMQP properties of `env`, with `attempt` prior attempts recorded.
pub(crate) fn encode(env: &Envelope, prior_attempts: u32) -> BasicProperties {
    let mut headers = FieldTable::default();
    let mut props = BasicProperties::default().with_delivery_mode(2);
    put(&mut headers, Some(env.id.as_str()), names::ID, |s| {
        props = props.clone().with_message_id(s)
    });
    put(&mut headers, Some(&env.kind), names::TYPE, |s| {
        props = props.clone().with_type(s)
    });
    put(
        &mut headers,
        env.correlation_id.as_deref(),
        names::CORRELATION_ID,
        |s| props = props.clone().with_correlation_id(s),
    );
    put(
        &mut headers,
        env.producer.as_deref(),
        names::PRODUCER,
        |s| props = props.clone().with_app_id(s),
    );
    put(
        &mut headers,
        env.reply_to.as_deref(),
        names::REPLY_TO,
        |s| props = props.clone().with_reply_to(s),
    );
    if let Some(ct) = env.content_type.as_deref().and_then(short) {
        props = props.with_content_type(ct);
    }
    if let Ok(d) = env.occurred_at.duration_since(SystemTime::UNIX_EPOCH) {
        props = props.with_timestamp(d.as_secs());
    }
    // Extra headers first, so that switchyard's own names win.
    for (k, v) in env.headers.iter() {
        if k == names::ATTEMPT || k == names::DELIVERY_COUNT {
            continue; // retry bookkeeping is the adapter's, never a producer's
        }
        if let Some(k) = short(k) {
            headers.insert(k, long(v));
        }
    }
    // Version 1 is implied when the header is absent.
    if env.schema_version != 1 {
        headers.insert(
            header_names::SCHEMA_VERSION.into(),
            long(&env.schema_version.to_string()),
        );
    }
    if let Some(t) = switchyard_core::rfc3339_millis(env.occurred_at) {
        headers.insert(header_names::OCCURRED_AT.into(), long(&t));
    }
    if let Some(t) = env.deadline.and_then(switchyard_core::rfc3339_millis) {
        headers.insert(header_names::DEADLINE.into(), long(&t));
    }
    for (name, value) in [
        (names::CAUSATION_ID, &env.causation_id),
        (names::PARTITION_KEY, &env.partition_key),
        (names::TENANT, &env.tenant),
        (names::TRACEPARENT, &env.trace.traceparent),
        (names::TRACESTATE, &env.trace.tracestate),
    ] {
        if let Some(v) = value {
            headers.insert(name.into(), long(v));
        }
    }
    if prior_attempts > 0 {
        headers.insert(
            names::ATTEMPT.into(),
            AMQPValue::LongLongInt(i64::from(prior_attempts)),
        );
    }
    props.with_headers(headers)
}

fn value_str(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::Boolean(b) => Some(b.to_string()),
        AMQPValue::ShortShortInt(n) => Some(n.to_string()),
        AMQPValue::ShortShortUInt(n) => Some(n.to_string()),
        AMQPValue::ShortInt(n) => Some(n.to_string()),
        AMQPValue::ShortUInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::Timestamp(n) => Some(n.to_string()),
        _ => None,
    }
}

fn value_u32(v: &AMQPValue) -> Option<u32> {
    match v {
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(*n),
        AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
        _ => value_str(v)?.parse().ok(),
    }
}

/// What a delivery says about earlier attempts.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counts {
    /// Attempts recorded in the copy (delay-tier retries).
    pub(crate) prior_attempts: u32,
    /// RabbitMQ's `x-delivery-count` (earlier deliveries of this copy).
    pub(crate) delivery_count: u32,
}

/// The envelope of a delivery. Standard fields that do not parse stay in the
/// headers under their names (the validate middleware refuses them).
pub(crate) fn decode(props: &BasicProperties, payload: Vec<u8>) -> (Envelope, Counts) {
    let mut headers = Headers::new();
    let mut counts = Counts::default();
    if let Some(table) = props.headers() {
        for (k, v) in table.inner() {
            match k.as_str() {
                names::ATTEMPT => counts.prior_attempts = value_u32(v).unwrap_or(0),
                names::DELIVERY_COUNT => counts.delivery_count = value_u32(v).unwrap_or(0),
                // RabbitMQ's dead-lettering history of delay tiers: noise to handlers.
                "x-death"
                | "x-first-death-exchange"
                | "x-first-death-queue"
                | "x-first-death-reason"
                | "x-last-death-exchange"
                | "x-last-death-queue"
                | "x-last-death-reason" => {}
                name => {
                    if let Some(s) = value_str(v) {
                        headers.insert(name, s);
                    }
                }
            }
        }
    }
    let prop = |p: &Option<ShortString>, header: &str, headers: &mut Headers| {
        let from_header = headers.remove(header);
        p.as_ref().map(|s| s.as_str().to_owned()).or(from_header)
    };
    let id = prop(props.message_id(), names::ID, &mut headers).unwrap_or_default();
    let kind = prop(props.kind(), names::TYPE, &mut headers).unwrap_or_default();
    let correlation_id = prop(props.correlation_id(), names::CORRELATION_ID, &mut headers);
    let producer = prop(props.app_id(), names::PRODUCER, &mut headers);
    let reply_to = prop(props.reply_to(), names::REPLY_TO, &mut headers);
    let mut env = Envelope::decoded(MessageId::from_wire(id), kind, Bytes::from(payload));
    env.correlation_id = correlation_id;
    env.producer = producer;
    env.reply_to = reply_to;
    env.content_type = props.content_type().as_ref().map(|s| s.as_str().to_owned());
    env.causation_id = headers.remove(names::CAUSATION_ID);
    env.partition_key = headers.remove(names::PARTITION_KEY);
    env.tenant = headers.remove(names::TENANT);
    env.trace.traceparent = headers.remove(names::TRACEPARENT);
    env.trace.tracestate = headers.remove(names::TRACESTATE);
    // Parsed standard fields leave the headers; unparsable ones stay.
    match headers
        .get(header_names::SCHEMA_VERSION)
        .map(str::parse::<u32>)
    {
        Some(Ok(v)) => {
            env.schema_version = v;
            headers.remove(header_names::SCHEMA_VERSION);
        }
        Some(Err(_)) => {}
        None => env.schema_version = 1,
    }
    let parse_time = |s: &str| humantime::parse_rfc3339_weak(s).ok();
    match headers.get(header_names::OCCURRED_AT).map(parse_time) {
        Some(Some(t)) => {
            env.occurred_at = t;
            headers.remove(header_names::OCCURRED_AT);
        }
        Some(None) => {}
        None => {
            env.occurred_at = props.timestamp().map_or(SystemTime::UNIX_EPOCH, |s| {
                SystemTime::UNIX_EPOCH + Duration::from_secs(s)
            });
        }
    }
    if let Some(Some(t)) = headers.get(header_names::DEADLINE).map(parse_time) {
        env.deadline = Some(t);
        headers.remove(header_names::DEADLINE);
    }
    env.headers = headers;
    (env, counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_round_trips_through_amqp_properties() {
        let mut env = Envelope::new("orders.placed", vec![0u8, 255, 10]).with_schema_version(3);
        env.correlation_id = Some("c".into());
        env.causation_id = Some("k".into());
        env.producer = Some("p".into());
        env.partition_key = Some("pk".into());
        env.tenant = Some("t".into());
        env.deadline = Some(SystemTime::now() + Duration::from_secs(60));
        env.reply_to = Some("r".into());
        env.trace.traceparent =
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        env.trace.tracestate = Some("a=b".into());
        env.content_type = Some("application/json".into());
        env.headers.insert("x-custom", "v");
        let props = encode(&env, 2);
        let (back, counts) = decode(&props, env.payload.to_vec());
        assert_eq!(counts.prior_attempts, 2);
        let ms = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        };
        assert_eq!(ms(back.occurred_at), ms(env.occurred_at));
        assert_eq!(back.deadline.map(ms), env.deadline.map(ms));
        let mut expected = env.clone();
        expected.occurred_at = back.occurred_at;
        expected.deadline = back.deadline;
        assert_eq!(back, expected);
    }

    #[test]
    fn long_values_move_to_headers_instead_of_panicking() {
        let long_id = "i".repeat(300);
        let env = Envelope::new("k".repeat(400), "{}").with_id(long_id.as_str());
        let (back, _) = decode(&encode(&env, 0), b"{}".to_vec());
        assert_eq!(back.id.as_str(), long_id);
        assert_eq!(back.kind, "k".repeat(400));
    }

    #[test]
    fn producers_cannot_set_the_attempt_count() {
        let env = Envelope::new("t", "{}").with_header(names::ATTEMPT, "999");
        let (_, counts) = decode(&encode(&env, 0), vec![]);
        assert_eq!(counts.prior_attempts, 0);
    }

    #[test]
    fn an_unparsable_deadline_stays_in_the_headers() {
        let mut props_env = Envelope::new("t", "{}");
        props_env.headers.insert("placeholder", "x");
        let mut table = FieldTable::default();
        table.insert(header_names::DEADLINE.into(), long("soon"));
        let props = BasicProperties::default().with_headers(table);
        let (env, _) = decode(&props, vec![]);
        assert_eq!(env.deadline, None);
        assert_eq!(env.headers.get(header_names::DEADLINE), Some("soon"));
    }
}
