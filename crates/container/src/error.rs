//! The error every lifecycle verb returns; each module's own error converts into it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContainerError {
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroups::CgroupError),
    #[error(transparent)]
    Hook(#[from] crate::hooks::HookError),
    #[error(transparent)]
    Signal(#[from] crate::signal::SignalError),
    #[error(transparent)]
    Sync(#[from] crate::sync::SyncError),
    #[error(transparent)]
    Namespace(#[from] crate::namespaces::NamespaceError),
    #[error(transparent)]
    Console(#[from] crate::console::ConsoleError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error(transparent)]
    Capability(#[from] crate::capabilities::CapabilityError),
    /// The container init reported a failure while setting the container up.
    #[error("container init failed: {0}")]
    Init(String),
    #[error(
        "container {id} already exists (state in {dir}); pick another ID or `delete` it first"
    )]
    Exists { id: String, dir: PathBuf },
    #[error("container {0} does not exist")]
    NotFound(String),
    #[error("invalid container ID {0:?}: use letters, digits, '.', '_', '-' (at most 128)")]
    BadId(String),
    #[error("container {id} is {status}; {what}")]
    WrongStatus {
        id: String,
        status: String,
        what: String,
    },
    #[error("{what}: {cause}")]
    Sys { what: String, cause: nix::Error },
    #[error("{what}: {cause}")]
    Io { what: String, cause: std::io::Error },
}

impl ContainerError {
    pub(crate) fn sys(what: impl Into<String>, cause: nix::Error) -> Self {
        Self::Sys {
            what: what.into(),
            cause,
        }
    }
    pub(crate) fn io(what: impl Into<String>, cause: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            cause,
        }
    }
}
