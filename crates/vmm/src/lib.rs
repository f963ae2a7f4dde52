//! Builds and runs one VM from a config: memory, vCPUs, devices, loaders, snapshot and migration.

pub mod migration;
pub mod snapshot;
