//! Version checks for projections that must apply each entity's events once
//! and in order.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::handler::HandleError;

/// What a [`VersionGate`] says about an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateDecision {
    /// The next version: apply it, then [`VersionGate::record`] it.
    Apply,
    /// Already applied (a redelivery or an older event): skip it.
    Stale {
        /// The last version applied.
        seen: u64,
    },
    /// A predecessor is missing: retry later, it may still arrive.
    Gap {
        /// The last version applied.
        seen: u64,
    },
}

impl GateDecision {
    /// `Ok(true)` to apply, `Ok(false)` to skip as stale, and a transient
    /// error for a gap, so that the message is retried once its predecessor
    /// may have arrived.
    pub fn into_result(self) -> Result<bool, HandleError> {
        match self {
            GateDecision::Apply => Ok(true),
            GateDecision::Stale { .. } => Ok(false),
            GateDecision::Gap { seen } => Err(HandleError::transient(format!(
                "version gap: the last version applied is {seen}, a predecessor is missing"
            ))),
        }
    }
}

/// The last version applied per entity key, in memory.
///
/// A projection keeping its state in a database should keep the version
/// there too, in the same transaction; this gate is for in-memory
/// projections and shows the rule: `version <= seen` is stale,
/// `version > seen + 1` is a gap.
///
/// ```
/// use switchyard_core::middleware::ordering::{GateDecision, VersionGate};
///
/// let gate = VersionGate::new();
/// assert_eq!(gate.check("order-1", 1), GateDecision::Apply);
/// gate.record("order-1", 1);
/// assert_eq!(gate.check("order-1", 1), GateDecision::Stale { seen: 1 });
/// assert_eq!(gate.check("order-1", 3), GateDecision::Gap { seen: 1 });
/// assert!(gate.check("order-1", 3).into_result().is_err());
/// assert_eq!(gate.check("order-1", 2), GateDecision::Apply);
/// ```
#[derive(Debug, Default)]
pub struct VersionGate {
    seen: Mutex<HashMap<String, u64>>,
}

impl VersionGate {
    /// No versions seen (every key starts before version 1).
    pub fn new() -> Self {
        Self::default()
    }

    /// Decides about `version` of `key`.
    pub fn check(&self, key: &str, version: u64) -> GateDecision {
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0);
        if version <= seen {
            GateDecision::Stale { seen }
        } else if version > seen + 1 {
            GateDecision::Gap { seen }
        } else {
            GateDecision::Apply
        }
    }

    /// Records that `version` of `key` was applied.
    pub fn record(&self, key: &str, version: u64) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let v = seen.entry(key.to_owned()).or_insert(0);
        *v = (*v).max(version);
    }
}
