//! The error body every corefour API (daemon and VMM) returns.

use serde::{Deserialize, Serialize};

/// `{"fault_message": "..."}`: one sentence saying what failed and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub fault_message: String,
}

impl Fault {
    pub fn new(msg: impl Into<String>) -> Self {
        Fault {
            fault_message: msg.into(),
        }
    }
}
