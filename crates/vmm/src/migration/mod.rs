//! Live migration: pre-copy over TCP with dirty-page tracking (`send`), the target side
//! (`receive`) and the wire format they share (`protocol`).

pub mod disks;
pub mod incoming;
pub mod protocol;
pub mod receive;
pub mod send;

pub use receive::Incoming;
pub use send::{migrate, MigrationSource, SendError, SendParams, SendReport};

#[cfg(test)]
mod tests;
