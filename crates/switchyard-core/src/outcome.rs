//! What the pipeline decided about one delivery.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// Why a message was dead-lettered. Its string form travels with the message
/// in the `switchyard-dead-letter-reason` header.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The payload or envelope could not be read.
    Malformed,
    /// The payload is larger than allowed.
    TooLarge,
    /// No handler is registered for the message type.
    UnknownType,
    /// The type is known but not in this schema version.
    UnsupportedVersion,
    /// Transient failures exhausted the attempt budget.
    MaxAttempts,
    /// The handler reported a permanent failure.
    Permanent,
    /// The message's deadline passed before it was handled.
    Expired,
    /// A known id arrived with a different payload.
    IdReuse,
    /// Any other reason, in kebab-case.
    Other(Cow<'static, str>),
}

impl DeadLetterReason {
    /// The kebab-case wire form.
    pub fn as_str(&self) -> &str {
        match self {
            DeadLetterReason::Malformed => "malformed",
            DeadLetterReason::TooLarge => "too-large",
            DeadLetterReason::UnknownType => "unknown-type",
            DeadLetterReason::UnsupportedVersion => "unsupported-version",
            DeadLetterReason::MaxAttempts => "max-attempts",
            DeadLetterReason::Permanent => "permanent",
            DeadLetterReason::Expired => "expired",
            DeadLetterReason::IdReuse => "id-reuse",
            DeadLetterReason::Other(s) => s,
        }
    }

    /// Parses the wire form; unknown strings become [`DeadLetterReason::Other`].
    pub fn parse(s: &str) -> Self {
        match s {
            "malformed" => DeadLetterReason::Malformed,
            "too-large" => DeadLetterReason::TooLarge,
            "unknown-type" => DeadLetterReason::UnknownType,
            "unsupported-version" => DeadLetterReason::UnsupportedVersion,
            "max-attempts" => DeadLetterReason::MaxAttempts,
            "permanent" => DeadLetterReason::Permanent,
            "expired" => DeadLetterReason::Expired,
            "id-reuse" => DeadLetterReason::IdReuse,
            other => DeadLetterReason::Other(Cow::Owned(other.to_owned())),
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a delivery was acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AckReason {
    /// The handler succeeded.
    Handled,
    /// The message had been handled before.
    Duplicate,
    /// The handler rejected it as a business decision; not retried.
    Rejected {
        /// The rejection as the handler stated it.
        detail: String,
    },
    /// Its deadline passed and the policy is to drop it.
    Expired,
}

/// What the pipeline decided about one delivery; the runtime turns it into
/// a [`Settlement`](crate::Settlement) once the handler has returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done: remove the message from the broker.
    Ack(AckReason),
    /// Failed transiently: redeliver after `delay`.
    Retry {
        /// How long the broker should hold the message back.
        delay: Duration,
        /// The error, for the dead-letter detail if attempts run out.
        detail: String,
    },
    /// Failed for good: move to the dead-letter destination.
    DeadLetter {
        /// The classified reason.
        reason: DeadLetterReason,
        /// The error text.
        detail: String,
    },
}

impl Outcome {
    /// The handler succeeded.
    pub const HANDLED: Outcome = Outcome::Ack(AckReason::Handled);

    /// A short label for logs and metrics: `acked`, `duplicate`, `rejected`,
    /// `expired`, `retried` or `dead-lettered`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ack(AckReason::Handled) => "acked",
            Outcome::Ack(AckReason::Duplicate) => "duplicate",
            Outcome::Ack(AckReason::Rejected { .. }) => "rejected",
            Outcome::Ack(AckReason::Expired) => "expired",
            Outcome::Retry { .. } => "retried",
            Outcome::DeadLetter { .. } => "dead-lettered",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip() {
        for r in [
            DeadLetterReason::Malformed,
            DeadLetterReason::TooLarge,
            DeadLetterReason::UnknownType,
            DeadLetterReason::UnsupportedVersion,
            DeadLetterReason::MaxAttempts,
            DeadLetterReason::Permanent,
            DeadLetterReason::Expired,
            DeadLetterReason::IdReuse,
            DeadLetterReason::Other("custom-thing".into()),
        ] {
            assert_eq!(DeadLetterReason::parse(r.as_str()), r);
        }
    }
}
