//! `corefour oci`: the OCI runtime with runc's command line, so containerd or a script written
//! for runc drives it unchanged.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use corefour_container as ct;

#[derive(clap::Args)]
pub struct Args {
    /// Directory for container state (default /run/corefour-oci; for a non-root user
    /// $XDG_RUNTIME_DIR/corefour-oci).
    #[arg(long, global = true)]
    root: Option<PathBuf>,
    /// Write errors to this file as well (containerd reads it).
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// `text` or `json`.
    #[arg(long, global = true, default_value = "text")]
    log_format: String,
    /// Accepted for runc compatibility.
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for runc compatibility (cgroups are always managed through the filesystem).
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    #[command(subcommand)]
    cmd: Box<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a container from a bundle; its process waits for `start`.
    Create(CreateArgs),
    /// Run the user process of a created container.
    Start { id: String },
    /// Print the container's state (OCI JSON).
    State { id: String },
    /// Send a signal (default TERM) to the container's init.
    Kill {
        id: String,
        #[arg(default_value = "TERM")]
        signal: String,
        /// Signal every process in the container's cgroup.
        #[arg(short, long)]
        all: bool,
    },
    /// Delete a stopped (or, with --force, any) container.
    Delete {
        id: String,
        #[arg(short, long)]
        force: bool,
    },
    /// Create and start; without --detach wait for the exit and delete.
    Run {
        #[command(flatten)]
        create: CreateArgs,
        #[arg(short, long)]
        detach: bool,
        /// Keep the container after it exits (runc: --keep).
        #[arg(long)]
        keep: bool,
    },
    /// List containers.
    List {
        /// `table` or `json`.
        #[arg(short, long, default_value = "table")]
        format: String,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Run a process inside a running container.
    Exec {
        /// A process.json replacing the config's process.
        #[arg(short, long)]
        process: Option<PathBuf>,
        #[arg(short, long)]
        detach: bool,
        #[arg(long)]
        pid_file: Option<PathBuf>,
        #[arg(short, long = "env")]
        env: Vec<String>,
        #[arg(long)]
        cwd: Option<String>,
        /// uid[:gid]
        #[arg(short, long)]
        user: Option<String>,
        /// Accepted for runc compatibility; a terminal needs --process with terminal:true.
        #[arg(short, long)]
        tty: bool,
        #[arg(long)]
        console_socket: Option<PathBuf>,
        id: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Change the cgroup limits of a running container (runc update).
    Update {
        /// A JSON file of linux.resources (`-` for stdin) replacing the flags below.
        #[arg(short, long)]
        resources: Option<PathBuf>,
        #[arg(long)]
        memory: Option<String>,
        #[arg(long)]
        pids_limit: Option<i64>,
        #[arg(long)]
        cpu_quota: Option<i64>,
        #[arg(long)]
        cpu_period: Option<u64>,
        #[arg(long)]
        cpu_share: Option<u64>,
        #[arg(long)]
        cpuset_cpus: Option<String>,
        id: String,
    },
    /// Freeze every process of the container.
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// Write a default config.json into the bundle directory.
    Spec {
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        #[arg(long)]
        rootless: bool,
    },
    /// Print the PIDs in the container (runc ps).
    Ps {
        id: String,
        #[arg(short, long, default_value = "table")]
        format: String,
    },
}

#[derive(clap::Args)]
struct CreateArgs {
    /// Bundle directory (holds config.json).
    #[arg(short, long, default_value = ".")]
    bundle: PathBuf,
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Unix socket that receives the pty master when process.terminal is true.
    #[arg(long)]
    console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    no_new_keyring: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    preserve_fds: Option<u32>,
    id: String,
}

/// Returns the process exit code.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let log = args.log.clone();
    let json = args.log_format == "json";
    let r = dispatch(args);
    if let (Err(e), Some(path)) = (&r, &log) {
        log_error(path, json, &format!("{e:#}"));
    }
    r
}

fn log_error(path: &Path, json: bool, msg: &str) {
    let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    else {
        return;
    };
    let now = ct_time();
    let line = if json {
        serde_json::json!({"level": "error", "msg": msg, "time": now}).to_string()
    } else {
        format!("time=\"{now}\" level=error msg={msg:?}")
    };
    let _ = writeln!(f, "{line}");
}

fn ct_time() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

fn create_opts(root: &Path, a: &CreateArgs) -> ct::container_create::CreateOptions {
    ct::container_create::CreateOptions {
        id: a.id.clone(),
        bundle: a.bundle.clone(),
        state_root: root.to_path_buf(),
        pid_file: a.pid_file.clone(),
        console_socket: a.console_socket.clone(),
        cgroup_root: None,
        stdio: None,
        console_fd: None,
    }
}

fn default_root() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from(ct::DEFAULT_STATE_ROOT);
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("corefour-oci"),
        _ => std::env::temp_dir().join(format!("corefour-oci-{}", nix::unistd::geteuid())),
    }
}

fn dispatch(args: Args) -> anyhow::Result<i32> {
    let root_buf = args.root.clone().unwrap_or_else(default_root);
    let root = root_buf.as_path();
    match *args.cmd {
        Cmd::Create(a) => {
            ct::container_create::create(&create_opts(root, &a))?;
        }
        Cmd::Start { id } => {
            ct::container_start::start(root, &id)?;
        }
        Cmd::State { id } => {
            let st = ct::container_state::load(root, &id)?;
            println!("{}", serde_json::to_string_pretty(&st.oci)?);
        }
        Cmd::Kill { id, signal, all } => {
            let sig = ct::signal::parse(&signal)?;
            ct::container_kill::kill(root, &id, sig, all)?;
        }
        Cmd::Delete { id, force } => {
            ct::container_delete::delete(root, &id, force)?;
        }
        Cmd::Run {
            create,
            detach,
            keep,
        } => return run_container(root, &create, detach, keep),
        Cmd::List { format, quiet } => list(root, &format, quiet)?,
        Cmd::Exec {
            process,
            detach,
            pid_file,
            env,
            cwd,
            user,
            tty,
            console_socket,
            id,
            command,
        } => {
            let process = match process {
                Some(p) => {
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("read {}", p.display()))?;
                    Some(
                        serde_json::from_str(&text)
                            .with_context(|| format!("{}: malformed process JSON", p.display()))?,
                    )
                }
                None => None,
            };
            let user = user
                .map(|u| -> anyhow::Result<(u32, u32)> {
                    let (a, b) = u.split_once(':').unwrap_or((&u, "0"));
                    Ok((
                        a.parse().context("--user: uid must be a number")?,
                        b.parse().context("--user: gid must be a number")?,
                    ))
                })
                .transpose()?;
            let wants_tty = tty
                || process
                    .as_ref()
                    .is_some_and(|p: &ct::oci_spec::runtime::Process| p.terminal() == Some(true));
            let mut opts = ct::container_exec::ExecOptions {
                args: command,
                env,
                cwd,
                user,
                process,
                detach,
                pid_file,
                tty,
                console_socket,
                console_fd: None,
            };
            // A terminal in the foreground without --console-socket: proxy it here, as run does.
            let mut rx = None;
            if wants_tty && opts.console_socket.is_none() && !detach {
                use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
                let (r, t) = socketpair(
                    AddressFamily::Unix,
                    SockType::Stream,
                    None,
                    SockFlag::SOCK_CLOEXEC,
                )?;
                opts.console_fd = Some(std::sync::Arc::new(t));
                rx = Some(r);
            }
            let mut proxy: Option<std::thread::JoinHandle<()>> = None;
            let code = ct::container_exec::exec_with(root, &id, &opts, &mut |_pid| {
                if let Some(r) = rx.take() {
                    proxy = Some(std::thread::spawn(move || {
                        if let Ok(m) = ct::console::recv_fd(std::os::fd::AsRawFd::as_raw_fd(&r)) {
                            proxy_tty(m);
                        }
                    }));
                }
            })?;
            drop(opts);
            if let Some(p) = proxy {
                let _ = p.join();
            }
            return Ok(code);
        }
        Cmd::Update {
            resources,
            memory,
            pids_limit,
            cpu_quota,
            cpu_period,
            cpu_share,
            cpuset_cpus,
            id,
        } => {
            use ct::cgroups::CgroupManager;
            let r: ct::oci_spec::runtime::LinuxResources = match resources {
                Some(p) => {
                    let text = if p.as_os_str() == "-" {
                        std::io::read_to_string(std::io::stdin())?
                    } else {
                        std::fs::read_to_string(&p)
                            .with_context(|| format!("read {}", p.display()))?
                    };
                    serde_json::from_str(&text)
                        .with_context(|| format!("{}: malformed resources JSON", p.display()))?
                }
                None => {
                    let mut v = serde_json::json!({});
                    if let Some(m) = memory {
                        let bytes = ct::cgroups::parse_size(&m)
                            .with_context(|| format!("--memory {m:?}: use a size like 256M"))?;
                        v["memory"] = serde_json::json!({"limit": bytes});
                    }
                    if let Some(p) = pids_limit {
                        v["pids"] = serde_json::json!({"limit": p});
                    }
                    let mut cpu = serde_json::json!({});
                    if let Some(q) = cpu_quota {
                        cpu["quota"] = q.into();
                    }
                    if let Some(p) = cpu_period {
                        cpu["period"] = p.into();
                    }
                    if let Some(s) = cpu_share {
                        cpu["shares"] = s.into();
                    }
                    if let Some(c) = cpuset_cpus {
                        cpu["cpus"] = c.into();
                    }
                    if cpu.as_object().is_some_and(|o| !o.is_empty()) {
                        v["cpu"] = cpu;
                    }
                    serde_json::from_value(v)?
                }
            };
            let st = ct::container_state::load(root, &id)?;
            if st.oci.status == ct::state::Status::Stopped {
                bail!("container {id} is stopped; nothing to update");
            }
            ct::cgroups::manager(&st.cgroup)?.update(&r)?;
        }
        Cmd::Pause { id } => ct::container_pause::pause(root, &id)?,
        Cmd::Resume { id } => ct::container_pause::resume(root, &id)?,
        Cmd::Spec { bundle, rootless } => {
            let path = bundle.join("config.json");
            if path.exists() {
                bail!("{} already exists; remove it first", path.display());
            }
            let spec = ct::spec::default_spec(rootless);
            let text = serde_json::to_string_pretty(&spec)?;
            std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        }
        Cmd::Ps { id, format } => {
            use ct::cgroups::CgroupManager;
            let st = ct::container_state::load(root, &id)?;
            let pids = ct::cgroups::manager(&st.cgroup)?.pids()?;
            if format == "json" {
                println!("{}", serde_json::to_string(&pids)?);
            } else {
                println!("PID");
                for p in pids {
                    println!("{p}");
                }
            }
        }
    }
    Ok(0)
}

fn list(root: &Path, format: &str, quiet: bool) -> anyhow::Result<()> {
    let all = ct::container_list::list(root)?;
    if quiet {
        for c in &all {
            println!("{}", c.oci.id);
        }
        return Ok(());
    }
    if format == "json" {
        let v: Vec<serde_json::Value> = all
            .iter()
            .map(|c| {
                serde_json::json!({
                    "ociVersion": c.oci.oci_version, "id": c.oci.id, "pid": c.oci.pid,
                    "status": c.oci.status, "bundle": c.oci.bundle, "rootfs": c.rootfs,
                    "created": c.created, "owner": c.owner.to_string(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<8} {:<10} {:<40} {:<32} OWNER",
        "ID", "PID", "STATUS", "BUNDLE", "CREATED"
    );
    for c in &all {
        let pid = if c.oci.status == ct::state::Status::Stopped {
            0
        } else {
            c.oci.pid
        };
        println!(
            "{:<20} {:<8} {:<10} {:<40} {:<32} {}",
            c.oci.id,
            pid,
            c.oci.status.to_string(),
            c.oci.bundle.display(),
            c.created,
            c.owner
        );
    }
    Ok(())
}

/// `run`: create + start; in the foreground wait for the init (our child) and delete.
fn run_container(root: &Path, a: &CreateArgs, detach: bool, keep: bool) -> anyhow::Result<i32> {
    let mut opts = create_opts(root, a);
    // A terminal in the foreground without --console-socket: this process holds the pty master
    // and connects it to our own stdin/stdout, as `runc run` does.
    let wants_tty = std::fs::read(a.bundle.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["process"]["terminal"] == serde_json::json!(true));
    let mut console_rx = None;
    if wants_tty && a.console_socket.is_none() && !detach {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (rx, tx) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        opts.console_fd = Some(std::sync::Arc::new(tx));
        console_rx = Some(rx);
    }
    let st = ct::container_create::create(&opts)?;
    drop(opts);
    let master = match console_rx {
        Some(rx) => Some(ct::console::recv_fd(std::os::fd::AsRawFd::as_raw_fd(&rx))?),
        None => None,
    };
    if let Err(e) = ct::container_start::start(root, &a.id) {
        let _ = ct::container_delete::delete(root, &a.id, true);
        return Err(e.into());
    }
    if detach {
        return Ok(0);
    }
    forward_signals(st.oci.pid);
    if let Some(m) = master {
        proxy_tty(m);
    }
    let code = wait_child(st.oci.pid);
    if !keep {
        ct::container_delete::delete(root, &a.id, true)?;
    }
    Ok(code)
}

/// Copies stdin to the pty master and the master to stdout until the container closes its tty.
fn proxy_tty(master: std::os::fd::OwnedFd) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    use std::io::Read;
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    let saved = tcgetattr(stdin.as_fd()).ok();
    if let Some(t) = &saved {
        let mut raw = t.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw);
    }
    let mut master = std::fs::File::from(master);
    let mut out = std::io::stdout();
    let mut buf = [0u8; 8192];
    let mut stdin_open = true;
    loop {
        let mut fds = vec![PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        if stdin_open {
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
        }
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        let rev: Vec<PollFlags> = fds
            .iter()
            .map(|f| f.revents().unwrap_or(PollFlags::empty()))
            .collect();
        drop(fds);
        if rev[0].intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let _ = out.write_all(&buf[..n]);
                    let _ = out.flush();
                }
            }
        }
        if stdin_open && rev[1].intersects(PollFlags::POLLIN | PollFlags::POLLHUP) {
            match stdin.lock().read(&mut buf) {
                Ok(0) | Err(_) => stdin_open = false,
                Ok(n) => {
                    let _ = master.write_all(&buf[..n]);
                }
            }
        }
    }
    if let Some(t) = &saved {
        let _ = tcsetattr(stdin.as_fd(), SetArg::TCSANOW, t);
    }
}

static FORWARD_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward(sig: i32) {
    let pid = FORWARD_PID.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc_kill(pid, sig) };
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// While `run` waits in the foreground, the signals a terminal or supervisor sends go to the
/// container's init instead of ending us (runc does the same).
fn forward_signals(pid: i32) {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    FORWARD_PID.store(pid, std::sync::atomic::Ordering::Relaxed);
    let act = SigAction::new(
        SigHandler::Handler(forward),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGWINCH,
    ] {
        // SAFETY: the handler only reads an atomic and calls kill(2).
        let _ = unsafe { sigaction(s, &act) };
    }
}

fn wait_child(pid: i32) -> i32 {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, c)) => return c,
            Ok(WaitStatus::Signaled(_, s, _)) => return 128 + s as i32,
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(_) => return 255,
        }
    }
}
