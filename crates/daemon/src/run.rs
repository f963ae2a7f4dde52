//! Running the daemon: logging, runtime, inventory, socket.

use std::path::PathBuf;
use std::sync::Arc;

use crate::lifecycle::{Daemon, DaemonConfig};
use crate::server::{self, ServeError};
use crate::DaemonError;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// Group allowed to use the socket (mode 0660); None: root only (0600).
    pub group: Option<String>,
    /// The `corefour` binary that runs the shims.
    pub exe: PathBuf,
    /// The binary run as `VMM vmm --config ... --api-sock ...`.
    pub vmm_exe: PathBuf,
    /// Jail every VMM (chroot, namespaces, unprivileged uid).
    pub jail: bool,
    /// error, warn, info, debug or trace.
    pub log_level: String,
    /// Accept live migrations from other daemons on this TCP address.
    pub migration_listen: Option<String>,
    /// Warm VMMs kept for `vm restore`.
    pub warm_pool: crate::lifecycle::WarmPoolConfig,
    /// The shared secret both daemons of a migration must hold (a file, mode 0600).
    pub migration_key: Option<PathBuf>,
    /// Listen on a non-loopback address without a key (a trusted network).
    pub migration_insecure: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("cannot listen for migrations on {addr}: {source}")]
    MigrationListen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    MigrationKey(#[from] crate::lifecycle::KeyError),
    #[error("serving the API failed: {0}")]
    Io(#[source] std::io::Error),
}

/// Runs the daemon until SIGINT/SIGTERM.
pub fn run(opts: RunOptions) -> Result<(), RunError> {
    let level: tracing::Level = opts.log_level.parse().unwrap_or(tracing::Level::INFO);
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    let migration_key = match &opts.migration_key {
        Some(p) => Some(crate::lifecycle::MigrationKey::load(p)?),
        None => None,
    };
    if let Some(addr) = &opts.migration_listen {
        crate::lifecycle::check_listen(addr, migration_key.is_some(), opts.migration_insecure)?;
        if migration_key.is_none() {
            tracing::warn!(
                addr,
                "the migration port is unauthenticated (no --migration-key)"
            );
        }
    }
    rt.block_on(async {
        // Bound before the API socket: once a client can reach the API, migrations reach
        // this daemon too (connections wait in the backlog until it serves them).
        let migrations =
            match &opts.migration_listen {
                Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(
                    |source| RunError::MigrationListen {
                        addr: addr.clone(),
                        source,
                    },
                )?),
                None => None,
            };
        let listener = server::bind(&opts.socket, opts.group.as_deref())?;
        let d = Daemon::open(DaemonConfig {
            state_dir: opts.state_dir.clone(),
            exe: opts.exe.clone(),
            vmm_exe: opts.vmm_exe.clone(),
            jail: opts.jail,
            warm_pool: opts.warm_pool.clone(),
            migration_key,
        })
        .await?;
        let cts = crate::ct::Cts::open(Arc::clone(&d), &opts.state_dir, &opts.exe).await?;
        crate::console_rotate::spawn(opts.state_dir.clone(), crate::console_rotate::MAX_BYTES);
        if let (Some(addr), Some(l)) = (&opts.migration_listen, migrations) {
            tracing::info!(addr, "accepting migrations");
            tokio::spawn(crate::lifecycle::serve_migrations(Arc::clone(&d), l));
        }
        tracing::info!(
            socket = %opts.socket.display(),
            state_dir = %opts.state_dir.display(),
            "corefour daemon listening"
        );
        server::serve(listener, Arc::clone(&d), Arc::clone(&cts))
            .await
            .map_err(RunError::Io)?;
        d.shutdown();
        cts.shutdown();
        let _ = std::fs::remove_file(&opts.socket);
        Ok(())
    })
}
