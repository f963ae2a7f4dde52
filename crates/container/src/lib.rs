//! The OCI runtime and system containers: namespaces, cgroups v1/v2, rootfs, seccomp, capabilities, templates.
//!
//! The runtime follows runc's process model without its re-exec: `create` clones the container init
//! directly (one `clone` with every new namespace), the init sets up the rootfs and blocks on a Unix
//! socket in the state directory until `start` connects, then execs the user process in place.

pub mod capabilities;
pub mod cgroups;
pub mod console;
pub mod container_create;
pub mod container_delete;
pub mod container_exec;
pub mod container_kill;
pub mod container_list;
pub mod container_pause;
pub mod container_start;
pub mod container_state;
pub mod devices;
mod error;
pub mod hooks;
pub mod init;
pub mod monitor;
pub mod mounts;
pub mod namespaces;
pub mod network;
pub mod process;
pub mod rootfs;
pub mod seccomp;
pub mod signal;
pub mod spec;
pub mod state;
pub mod sync;
pub mod system;
pub mod templates;
mod util;

pub use error::ContainerError;
/// The spec types, for callers that build or parse configs.
pub use oci_spec;

/// Where `corefour oci` keeps container state unless `--root` says otherwise (runc uses /run/runc).
pub const DEFAULT_STATE_ROOT: &str = "/run/corefour-oci";
