//! Inventory events: what happened to which instance, and when.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Increasing sequence number; `GET /v1/events?since=ID` returns the events after it.
    pub id: i64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// The instance the event concerns (empty for daemon-wide events).
    pub instance: String,
    /// A short machine-readable word: created, started, stopped, paused, resumed, deleted, limits, reconciled.
    pub kind: String,
    pub message: String,
}
