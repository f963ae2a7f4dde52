//! Builds and runs one VM from a config: memory, vCPUs, devices, loaders.
//!
//! The VMM names only the `corefour_hypervisor` traits; `backend` is the one place that picks
//! KVM or the software CPU. guests/CONTRACT.md is the guest-facing side of `layout` and `boot`.

pub mod acpi;
pub mod api_client;
pub mod api_server;
pub mod backend;
pub mod boot;
pub mod builder;
pub mod config;
pub mod control;
pub mod disk_dirty_api;
pub mod disk_overlay;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod signals;
pub mod snapshot;
pub mod vcpu_thread;
pub mod virtio_devices;
pub mod virtio_eventfd;

pub use builder::{RunOptions, RunReport, Vmm, VmmError};
pub use config::{BackendKind, VmConfig};
pub use control::Outcome;
pub use corefour_devices::Console;
