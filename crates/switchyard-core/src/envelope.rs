//! The transport-neutral message: identity, routing metadata and payload.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

/// A message's unique identity.
///
/// Generated ids are UUID v7 (time-ordered). Ids read from a broker are kept
/// as the producer wrote them: they are untrusted input, and the validate
/// middleware decides whether they are well formed.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(String);

impl MessageId {
    /// A new, unique, time-ordered id (UUID v7).
    pub fn new() -> Self {
        // Encoded into a buffer: `to_string` would go through the
        // formatting machinery, at several times the cost.
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        MessageId(
            uuid::Uuid::now_v7()
                .hyphenated()
                .encode_lower(&mut buf)
                .to_owned(),
        )
    }

    /// The id exactly as read from the wire.
    pub fn from_wire(id: impl Into<String>) -> Self {
        MessageId(id.into())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id's string, without a copy (for adapters that put it on the
    /// wire as it is).
    pub fn into_string(self) -> String {
        self.0
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Ids come from producers: escape control characters so that an id
        // with CR/LF cannot forge log lines.
        for c in self.0.chars() {
            if must_escape(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_fmt(format_args!("{c}"))?;
            }
        }
        Ok(())
    }
}

/// Characters untrusted text must not reach a log line or an error message
/// as they are: control characters (CR/LF forge lines) and the ones that
/// reorder or break lines when displayed (bidi controls, line separators).
pub(crate) fn must_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({:?})", self.0)
    }
}

impl From<&str> for MessageId {
    fn from(s: &str) -> Self {
        MessageId(s.to_owned())
    }
}

impl From<String> for MessageId {
    fn from(s: String) -> Self {
        MessageId(s)
    }
}

/// Extra headers: names and values the contract does not give a field of
/// their own. Ordered, so that their wire form is deterministic.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers(BTreeMap<String, String>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Sets `name` to `value`, returning the previous value.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) -> Option<String> {
        self.0.insert(name.into(), value.into())
    }

    /// Removes `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        self.0.remove(name)
    }

    /// Every header, ordered by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter()).finish()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<T: IntoIterator<Item = (K, V)>>(iter: T) -> Self {
        Headers(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// W3C trace context carried with a message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// The `traceparent` value.
    pub traceparent: Option<String>,
    /// The `tracestate` value.
    pub tracestate: Option<String>,
}

/// `t` in RFC 3339 with milliseconds, UTC (`2026-11-27T08:25:02.123Z`),
/// the form every adapter writes times in; `None` before 1970 or after
/// 9999, which the form cannot express.
///
/// The same text as `humantime::format_rfc3339_millis`, written straight
/// into a buffer: this runs for every message published, and the
/// formatting machinery took several times as long.
pub fn rfc3339_millis(t: SystemTime) -> Option<String> {
    const YEAR_10000: Duration = Duration::from_secs(253_402_300_800);
    let since = t.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    if since >= YEAR_10000 {
        return None;
    }
    let secs = since.as_secs();
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    // Days to the civil date (H. Hinnant's `civil_from_days`), from
    // 0000-03-01 so that the leap day ends a year.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let mut buf = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut n: u64| {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, of_day / 3_600);
    put(14, 2, of_day % 3_600 / 60);
    put(17, 2, of_day % 60);
    put(20, 3, u64::from(since.subsec_millis()));
    std::str::from_utf8(&buf).ok().map(str::to_owned)
}

/// An RFC 3339 rendering of `t` that cannot panic: times humantime cannot
/// format (before 1970, after 9999) are shown as signed milliseconds since
/// the epoch. Times come from the wire, so they are untrusted.
pub(crate) fn display_time(t: SystemTime) -> String {
    if let Some(s) = rfc3339_millis(t) {
        return s;
    }
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => format!("{}ms since the epoch", d.as_millis()),
        Err(e) => format!("-{}ms since the epoch", e.duration().as_millis()),
    }
}

/// The transport-neutral message.
///
/// Every adapter maps these fields onto broker-native properties and headers
/// (see `docs/wire-format.md`), so that a message published through one
/// adapter reads back with the same fields.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique identity (UUID v7 when switchyard creates it).
    pub id: MessageId,
    /// Stable type name, e.g. `orders.order-placed`.
    pub kind: String,
    /// Version of the payload schema of `kind`.
    pub schema_version: u32,
    /// When the fact happened or the command was issued.
    pub occurred_at: SystemTime,
    /// The conversation this message belongs to.
    pub correlation_id: Option<String>,
    /// The id of the message that caused this one.
    pub causation_id: Option<String>,
    /// The service that produced the message.
    pub producer: Option<String>,
    /// The key whose messages must be handled in order.
    pub partition_key: Option<String>,
    /// The tenant the message belongs to.
    pub tenant: Option<String>,
    /// After this instant the work is no longer wanted.
    pub deadline: Option<SystemTime>,
    /// Where a reply should be sent.
    pub reply_to: Option<String>,
    /// W3C trace context.
    pub trace: TraceContext,
    /// Media type of the payload, e.g. `application/json`.
    pub content_type: Option<String>,
    /// Headers without a field of their own.
    pub headers: Headers,
    /// The encoded message.
    pub payload: Bytes,
}

impl Envelope {
    /// An envelope with a fresh id, the current time, schema version 1 and
    /// the given type and payload; every optional field empty.
    pub fn new(kind: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        let mut env = Envelope::decoded(MessageId::new(), kind.into(), payload.into());
        env.occurred_at = SystemTime::now();
        env
    }

    /// An envelope read off the wire: the given id, type and payload,
    /// schema version 1 and an `occurred_at` of the Unix epoch (a message
    /// that does not say when it happened), every optional field empty.
    /// Adapters fill in the rest from the broker's properties; unlike
    /// [`new`](Self::new), nothing is generated and the clock is not read.
    pub fn decoded(id: MessageId, kind: String, payload: Bytes) -> Self {
        Envelope {
            id,
            kind,
            schema_version: 1,
            occurred_at: SystemTime::UNIX_EPOCH,
            correlation_id: None,
            causation_id: None,
            producer: None,
            partition_key: None,
            tenant: None,
            deadline: None,
            reply_to: None,
            trace: TraceContext::default(),
            content_type: None,
            headers: Headers::new(),
            payload,
        }
    }

    /// Sets the schema version.
    pub fn with_schema_version(mut self, version: u32) -> Self {
        self.schema_version = version;
        self
    }

    /// Sets the id.
    pub fn with_id(mut self, id: impl Into<MessageId>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the partition key.
    pub fn with_partition_key(mut self, key: impl Into<String>) -> Self {
        self.partition_key = Some(key.into());
        self
    }

    /// Sets the deadline.
    pub fn with_deadline(mut self, deadline: SystemTime) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Sets the deadline to `ttl` from now.
    pub fn with_ttl(self, ttl: Duration) -> Self {
        self.with_deadline(SystemTime::now() + ttl)
    }

    /// Sets a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Whether the deadline, if any, lies before `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The payload may hold personal data: show its size, not its bytes.
        f.debug_struct("Envelope")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("schema_version", &self.schema_version)
            .field("occurred_at", &display_time(self.occurred_at))
            .field("correlation_id", &self.correlation_id)
            .field("causation_id", &self.causation_id)
            .field("producer", &self.producer)
            .field("partition_key", &self.partition_key)
            .field("tenant", &self.tenant)
            .field("deadline", &self.deadline.map(display_time))
            .field("reply_to", &self.reply_to)
            .field("trace", &self.trace)
            .field("content_type", &self.content_type)
            .field("headers", &self.headers)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_millis_writes_what_humantime_writes() {
        let at = |secs: u64, millis: u64| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
        };
        let mut times = vec![
            at(0, 0),
            at(951_782_400, 1),       // 2000-02-29, a leap day of a century
            at(4_107_542_400, 999),   // 2100-03-01, after a century's missing one
            at(253_402_300_799, 999), // 9999-12-31T23:59:59.999Z
            at(1_764_230_702, 123),
        ];
        // Every day of four hundred years (a whole leap cycle), at a time
        // of day and a millisecond that change with it.
        times.extend((0..146_097u64).map(|d| at(d * 86_400 + d * 7_919 % 86_400, d % 1_000)));
        for t in times {
            assert_eq!(
                rfc3339_millis(t).as_deref(),
                Some(humantime::format_rfc3339_millis(t).to_string().as_str())
            );
        }
        assert_eq!(rfc3339_millis(at(253_402_300_800, 0)), None);
        assert_eq!(
            rfc3339_millis(SystemTime::UNIX_EPOCH - Duration::from_millis(1)),
            None
        );
    }

    #[test]
    fn generated_ids_are_hyphenated_lowercase_uuid_v7() {
        let id = MessageId::new();
        let uuid = uuid::Uuid::parse_str(id.as_str()).unwrap();
        assert_eq!(uuid.get_version_num(), 7);
        assert_eq!(id.as_str(), uuid.hyphenated().to_string());
        assert_ne!(MessageId::new(), id);
    }

    #[test]
    fn generated_ids_are_unique_and_time_ordered() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert_ne!(a, b);
        assert!(a < b, "uuid v7 ids sort by creation time");
        assert_eq!(
            uuid::Uuid::parse_str(a.as_str()).unwrap().get_version_num(),
            7
        );
    }

    #[test]
    fn display_escapes_control_characters() {
        let id = MessageId::from_wire("abc\r\nFAKE LOG LINE");
        assert_eq!(id.to_string(), "abc\\r\\nFAKE LOG LINE");
        let id = MessageId::from_wire("a\u{202e}b");
        assert_eq!(id.to_string(), "a\\u{202e}b");
    }

    #[test]
    fn debug_hides_payload() {
        let env = Envelope::new("t", &b"secret card number"[..]);
        let dbg = format!("{env:?}");
        assert!(!dbg.contains("secret"));
        assert!(dbg.contains("payload_len: 18"));
    }

    #[test]
    fn debug_survives_times_out_of_rfc3339_range() {
        let mut env = Envelope::new("t", Bytes::new());
        env.occurred_at = SystemTime::UNIX_EPOCH - Duration::from_secs(10);
        env.deadline = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(400_000_000_000));
        let dbg = format!("{env:?}");
        assert!(dbg.contains("-10000ms since the epoch"), "{dbg}");
    }

    #[test]
    fn expiry() {
        let now = SystemTime::now();
        let env = Envelope::new("t", Bytes::new()).with_deadline(now);
        assert!(env.is_expired_at(now));
        assert!(!env.is_expired_at(now - Duration::from_secs(1)));
        assert!(!Envelope::new("t", Bytes::new()).is_expired_at(now));
    }
}
