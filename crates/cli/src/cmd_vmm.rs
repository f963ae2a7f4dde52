//! `corefour vmm`: run one VM in the foreground. Serial output goes to stdout, stdin goes to the
//! guest's serial input; notes and errors to stderr. Exit code: the guest's debug-exit code, 1 VMM error, 2 guest reset/triple fault,
//! 3 timeout, 0 after an API/SIGTERM shutdown.

use std::path::PathBuf;

use anyhow::Context;
use corefour_vmm::config::{parse_duration, parse_memory_mib};
use corefour_vmm::snapshot::restore::RestoreTiming;
use corefour_vmm::snapshot::warm::{self, Served, WarmVmm};
use corefour_vmm::{BackendKind, Console, RunOptions, VmConfig, Vmm};

#[derive(clap::Args)]
#[command(
    after_help = "Serial output goes to stdout and stdin to the guest's serial input.\n\
Exit status: the guest's debug-exit code (port 0xf4), 1 VMM error, 2 guest reset or triple \
fault, 3 --timeout, 0 after PUT /vm/shutdown or SIGTERM. Guest ABI: guests/CONTRACT.md"
)]
pub struct Args {
    /// Guest kernel: an ELF64 x86-64 executable, or a flat binary named *.bin (loaded at 1 MiB).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    /// Guest memory, e.g. 64M, 1G (a bare number is MiB).
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// Command line passed to the guest (see guests/CONTRACT.md).
    #[arg(long, value_name = "STRING", allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// Initial ramdisk, loaded after the image (address and size in the boot info).
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// VM config file (vm.json); the flags above override its fields.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Stop the guest after this long (e.g. 30s, 500ms) and exit 3.
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// CPU backend: kvm, emu, or auto (KVM where /dev/kvm opens).
    #[arg(long, value_name = "BACKEND")]
    backend: Option<String>,
    /// Serve the VMM API (HTTP over this Unix socket): GET /vm, PUT /vm/{pause,resume,shutdown}.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Restore the VM saved in this snapshot directory (PUT /vm/snapshot) instead of booting.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "config", "incoming"])]
    restore: Option<PathBuf>,
    /// With --restore: check the memory file checksums first (reads all of it).
    #[arg(long, requires = "restore")]
    verify: bool,
    /// Start a warm VMM: create a KVM VM of --vcpus and --memory with its memory slots and
    /// vCPUs, then wait on --api-sock for PUT /vm/restore {"path": DIR} and run that snapshot
    /// (a restore without KVM's set-up cost; the daemon keeps a pool of these).
    #[arg(
        long,
        requires = "api_sock",
        conflicts_with_all = ["kernel", "config", "incoming", "restore"]
    )]
    prewarm: bool,
    /// Wait for a live migration on HOST:PORT (PUT /vm/migrate on the source) and run it.
    /// With --config: this host's disk paths and taps replace the source's.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "kernel")]
    incoming: Option<String>,
    /// Write every vCPU's final registers to FILE as JSON (for KVM vs software-CPU comparisons).
    #[arg(long, value_name = "FILE")]
    dump_regs: Option<PathBuf>,
    #[command(flatten)]
    virtio: crate::cmd_vmm_virtio::VirtioArgs,
    /// Print the VMM's resident memory at exit on stderr (used by `corefour bench vmm`).
    #[arg(long, hide = true)]
    stats: bool,
}

fn config_from(a: &Args) -> anyhow::Result<VmConfig> {
    let mut c = match &a.config {
        Some(path) => VmConfig::load(path).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => VmConfig::new(a.kernel.clone().unwrap_or_default()),
    };
    if let Some(k) = &a.kernel {
        c.kernel = k.clone();
    }
    if let Some(v) = a.vcpus {
        c.vcpus = v;
    }
    if let Some(m) = &a.memory {
        c.memory_mib = parse_memory_mib(m)?;
    }
    if let Some(s) = &a.cmdline {
        c.cmdline = s.clone();
    }
    if let Some(i) = &a.initrd {
        c.initrd = Some(i.clone());
    }
    if let Some(b) = &a.backend {
        c.backend = b.parse::<BackendKind>()?;
    }
    a.virtio.apply(&mut c)?;
    Ok(c)
}

/// Returns the process exit code.
pub fn run(a: Args) -> anyhow::Result<i32> {
    let config = if a.prewarm {
        config_from(&a)?
    } else if a.restore.is_some() || a.incoming.is_some() {
        VmConfig::new(PathBuf::new())
    } else {
        config_from(&a)?
    };
    let timeout = match &a.timeout {
        Some(t) => Some(parse_duration(t)?),
        None => config.timeout(),
    };
    // The library's errors carry their cause in the message already; anyhow's chain would
    // print it twice.
    let flat = |e: corefour_vmm::VmmError| anyhow::anyhow!("{e}");
    let mut incoming = None;
    let mut api_sock = a.api_sock.clone();
    let vmm = if a.prewarm {
        match prewarm(&a, &config)? {
            Some((vmm, sock)) => {
                api_sock = Some(sock);
                vmm
            }
            None => return Ok(0),
        }
    } else if let Some(dir) = &a.restore {
        let opts = corefour_vmm::snapshot::restore::RestoreOptions { verify: a.verify };
        let (vmm, t) = corefour_vmm::snapshot::restore::restore(dir, Console::stdout(), opts)
            .map_err(|e| anyhow::anyhow!("restore {}: {e}", dir.display()))?;
        restored_note(dir, "cold", &t);
        vmm
    } else if let Some(addr) = &a.incoming {
        let local = match &a.config {
            Some(p) => Some(VmConfig::load(p).map_err(|e| anyhow::anyhow!("{e}"))?),
            None => None,
        };
        let r = corefour_vmm::migration::incoming::receive(
            addr,
            Console::stdout(),
            std::time::Duration::from_secs(10),
            local.as_ref(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        eprintln!(
            "corefour vmm: migration from {} received in {:.1} ms",
            r.conn.peer, r.receive_ms
        );
        incoming = Some(r.conn);
        r.vmm
    } else {
        Vmm::build(config, Console::stdout()).map_err(flat)?
    };
    if let Some(mut conn) = incoming {
        // The vCPU threads start inside `run` right after this.
        conn.started()
            .map_err(|e| anyhow::anyhow!("migration: cannot confirm the start: {e}"))?;
    }
    eprintln!(
        "corefour vmm: backend {} ({})",
        vmm.backend(),
        vmm.backend_why()
    );
    let report = vmm
        .run(RunOptions {
            timeout,
            api_sock,
            handle_signals: true,
            forward_stdin: true,
        })
        .map_err(flat)?;
    if a.stats {
        eprintln!(
            "corefour vmm stats: rss_kib={} anon_kib={} guest_resident_kib={}",
            report.rss_bytes / 1024,
            report.anon_bytes / 1024,
            report.guest_resident_bytes / 1024
        );
        if !report.virtio_stats.is_empty() {
            eprintln!("corefour vmm virtio: {}", report.virtio_stats);
        }
    }
    if let Some(path) = &a.dump_regs {
        let json = serde_json::to_string_pretty(&report.final_regs)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write registers to {}", path.display()))?;
    }
    if let Some(msg) = report.outcome.message() {
        eprintln!("corefour: {msg}");
    }
    Ok(report.outcome.exit_code())
}

/// "restored DIR in X ms (cold, 1 layer; read snapshot 0.12, ...)" on stderr: the phases are
/// what `corefour bench migrate` and a reader of the console log look at.
fn restored_note(dir: &std::path::Path, how: &str, t: &RestoreTiming) {
    eprintln!(
        "corefour vmm: restored {} in {:.2} ms ({how}, {} layer{}; {} ms)",
        dir.display(),
        t.total_ms,
        t.layers,
        if t.layers == 1 { "" } else { "s" },
        t.phases.describe()
    );
}

/// `--prewarm`: creates the warm VM, serves its API until a restore, and returns the restored
/// VM with the API socket it should serve; None after a shutdown request.
fn prewarm(a: &Args, config: &VmConfig) -> anyhow::Result<Option<(Vmm, PathBuf)>> {
    let Some(sock) = &a.api_sock else {
        anyhow::bail!("--prewarm needs --api-sock");
    };
    let warm = WarmVmm::create(config.vcpus, config.memory_mib)
        .map_err(|e| anyhow::anyhow!("warm VMM: {e}"))?;
    eprintln!(
        "corefour vmm: warm VMM ({} vCPUs, {} MiB) created in {} ms; waiting on {}",
        warm.vcpus(),
        warm.memory_mib(),
        warm.created.describe(),
        sock.display()
    );
    match warm::serve(warm, sock).map_err(|e| anyhow::anyhow!("warm VMM: {e}"))? {
        Served::Shutdown => Ok(None),
        Served::Restored {
            vmm,
            api_sock,
            path,
            timing,
        } => {
            restored_note(&path, "warm", &timing);
            Ok(Some((*vmm, api_sock)))
        }
    }
}
