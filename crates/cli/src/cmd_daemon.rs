//! `corefour daemon`: the REST API over a Unix socket, the inventory and the VM lifecycle.

use std::path::PathBuf;

use anyhow::Context;
use corefour_daemon::run::{run as run_daemon, RunOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Unix socket to listen on.
    #[arg(long, env = "COREFOUR_SOCKET", default_value = corefour_daemon::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Directory for the inventory and per-VM files (config, console log, API socket).
    #[arg(long, default_value = corefour_daemon::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Let this group use the socket (mode 0660); by default only root can (0600).
    #[arg(long)]
    group: Option<String>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    log_level: String,
    /// The VMM binary, run as `BINARY vmm --config vm.json --api-sock vmm.sock` (default: this
    /// corefour binary).
    #[arg(long, value_name = "BINARY")]
    vmm_binary: Option<PathBuf>,
    /// Run each VMM jailed: chroot, own mount/PID/IPC/UTS (and, without NICs, network)
    /// namespaces, an unprivileged uid, besides the seccomp filter every VMM gets.
    #[arg(long)]
    jail: bool,
    /// Accept live migrations from other corefour daemons on this TCP address (e.g.
    /// 10.0.0.2:4747). A non-loopback address needs --migration-key (or --migration-insecure).
    #[arg(long, value_name = "ADDR:PORT")]
    migration_listen: Option<String>,
    /// Warm VMMs kept per --warm-shape for `vm restore` (each an idle VMM process of ~8 MiB
    /// RSS whose KVM VM, memory slots and vCPUs exist, so a restore skips KVM's set-up).
    /// Default: 1, or 0 with --jail or --vmm-binary (those VMMs may not support --prewarm).
    #[arg(long, value_name = "N")]
    warm_pool: Option<usize>,
    /// The shapes warm VMMs are made in, VCPUSxMIB (repeat the flag for several); a restore
    /// uses one only when the VM's vCPUs and memory are the same.
    #[arg(long, value_name = "VCPUSxMIB", default_value = "1x64")]
    warm_shape: Vec<corefour_daemon::lifecycle::WarmShape>,
    /// Internal: run as the shim of one warm VMM in this directory.
    #[arg(long, hide = true, value_name = "DIR")]
    warm_shim: Option<PathBuf>,
    /// The shared secret (a file of at least 16 bytes, mode 0600, the same on both hosts)
    /// that migrations in and out must prove, by HMAC-SHA256 challenge-response in both
    /// directions. Authenticates the daemons' connection; it does not encrypt it.
    #[arg(long, value_name = "FILE")]
    migration_key: Option<PathBuf>,
    /// Let --migration-listen take a non-loopback address without a key: anyone who reaches
    /// the port can then start VMs here. Only for a network you trust.
    #[arg(long)]
    migration_insecure: bool,
    /// Internal: the shim jails the VMM as this uid/gid.
    #[arg(long, hide = true)]
    jail_uid: Option<u32>,
    /// Internal: the shim joins the VM's cgroup through these cgroup.procs files.
    #[arg(long, hide = true)]
    cgroup_procs: Vec<PathBuf>,
    /// Internal: run as the shim that starts and waits for one VM's VMM.
    #[arg(long, hide = true, value_name = "VM_DIR")]
    vmm_shim: Option<PathBuf>,
}

/// Returns the process exit code.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("cannot find the corefour binary")?;
    let vmm_exe = match &args.vmm_binary {
        Some(p) => std::fs::canonicalize(p)
            .with_context(|| format!("cannot find the VMM binary {}", p.display()))?,
        None => exe.clone(),
    };
    if let Some(dir) = args.warm_shim {
        let Some(shape) = args.warm_shape.first() else {
            anyhow::bail!("--warm-shim needs --warm-shape");
        };
        return corefour_daemon::lifecycle::run_warm_shim(&dir, &vmm_exe, *shape)
            .map_err(Into::into);
    }
    if let Some(dir) = args.vmm_shim {
        return corefour_daemon::shim::run(&dir, &vmm_exe, args.jail_uid, &args.cgroup_procs)
            .map_err(Into::into);
    }
    let state_dir = absolute(&args.state_dir)?;
    let socket = absolute(&args.socket)?;
    run_daemon(RunOptions {
        socket,
        state_dir,
        group: args.group,
        exe,
        vmm_exe,
        jail: args.jail,
        log_level: args.log_level,
        migration_listen: args.migration_listen,
        warm_pool: corefour_daemon::lifecycle::WarmPoolConfig {
            per_shape: args
                .warm_pool
                .unwrap_or(if args.jail || args.vmm_binary.is_some() {
                    0
                } else {
                    1
                }),
            shapes: args.warm_shape,
        },
        migration_key: args.migration_key.map(|p| absolute(&p)).transpose()?,
        migration_insecure: args.migration_insecure,
    })?;
    Ok(0)
}

fn absolute(p: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))
}
