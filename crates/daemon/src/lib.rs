//! The corefour daemon: the inventory, the lifecycle of VMs (one VMM process each, in its own
//! cgroup), and the REST API over a Unix socket.

pub mod cgroup;
pub mod client;
pub mod console_rotate;
pub mod ct;
pub mod error;
pub mod inventory;
pub mod jail;
pub mod lifecycle;
pub mod names;
pub mod network;
pub mod run;
pub mod seccomp;
pub mod server;
pub mod shim;
pub mod vmm_config;

pub use error::DaemonError;
pub use lifecycle::{Daemon, DaemonConfig};

/// Default socket and state directory.
pub const DEFAULT_SOCKET: &str = "/run/corefour/corefour.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/corefour";
