//! `corefour ct`: LXC-style system containers from templates (busybox, debian), on overlayfs,
//! with cgroup limits and bridge networking.
//!
//! As `vm`, the commands talk to the daemon (`--socket`, COREFOUR_SOCKET): it keeps containers in
//! its inventory, runs each under a shim and finds them again after a restart. With `--direct`
//! (or `--dir` / COREFOUR_CT_DIR) they run without a daemon, from this process, as before.

#[path = "cmd_ct_daemon.rs"]
mod daemon;
#[path = "cmd_ct_move.rs"]
mod transfer;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use corefour_container::network::BridgeConfig;
use corefour_container::system::{CreateRequest, CtInfo, LimitChange, System, DEFAULT_BASE};

#[derive(clap::Args)]
pub struct Args {
    /// The daemon's socket.
    #[arg(long, global = true, env = "COREFOUR_SOCKET", default_value = corefour_daemon::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Run without the daemon, from this process, with state under --dir.
    #[arg(long, global = true)]
    direct: bool,
    /// Daemonless state directory (templates, containers, runtime state); implies --direct.
    #[arg(long, global = true, env = "COREFOUR_CT_DIR")]
    dir: Option<PathBuf>,
    /// Print data as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Box<Cmd>,
}

#[derive(clap::Args)]
pub(crate) struct CreateArgs {
    name: String,
    #[arg(long, default_value = "busybox")]
    template: String,
    /// Memory limit, e.g. 256M.
    #[arg(long)]
    memory: Option<String>,
    /// CPU limit in CPUs (CFS quota), e.g. 1 or 0.5.
    #[arg(long, conflicts_with = "cpu_quota")]
    cpus: Option<f64>,
    /// CPU limit in percent of one CPU (150 = one and a half CPUs).
    #[arg(long)]
    cpu_quota: Option<u32>,
    /// Relative CPU weight 1..10000 (100 = default).
    #[arg(long)]
    cpu_weight: Option<u32>,
    /// Maximum number of processes.
    #[arg(long)]
    pids: Option<i64>,
    /// `bridge` to attach to a Linux bridge with an address from its range, `none` for loopback only.
    #[arg(long, default_value = "none")]
    net: String,
    /// Bridge to attach to (created if missing).
    #[arg(long, default_value = "corefour0")]
    bridge: String,
    /// Address range of the bridge; its first address is the bridge's.
    #[arg(long, default_value = "10.88.0.0/24")]
    subnet: String,
    /// Start it once created.
    #[arg(long)]
    start: bool,
}

impl CreateArgs {
    fn memory_bytes(&self) -> anyhow::Result<Option<i64>> {
        self.memory
            .as_ref()
            .map(|m| {
                corefour_container::cgroups::parse_size(m)
                    .with_context(|| format!("--memory {m:?}: use a size like 256M or 1G"))
            })
            .transpose()
    }

    fn bridge(&self) -> anyhow::Result<Option<BridgeConfig>> {
        Ok(match self.net.as_str() {
            "bridge" => Some(BridgeConfig {
                bridge: self.bridge.clone(),
                subnet: self.subnet.clone(),
            }),
            "none" => None,
            other => anyhow::bail!("--net {other:?}: use bridge or none"),
        })
    }

    fn cpus(&self) -> Option<f64> {
        self.cpus.or(self.cpu_quota.map(|q| f64::from(q) / 100.0))
    }
}

#[derive(clap::Args)]
pub(crate) struct SetArgs {
    name: String,
    /// Percent of one host CPU (150 = one and a half CPUs); 0 removes the quota.
    #[arg(long)]
    cpu_quota: Option<u32>,
    /// Relative weight 1..10000 (100 = default); 0 restores the default.
    #[arg(long)]
    cpu_weight: Option<u32>,
    /// Memory limit, e.g. 256M; 0 removes it.
    #[arg(long)]
    memory: Option<String>,
    /// Maximum number of processes; 0 removes the limit.
    #[arg(long)]
    pids: Option<i64>,
}

impl SetArgs {
    fn memory_bytes(&self) -> anyhow::Result<Option<i64>> {
        self.memory
            .as_ref()
            .map(|m| {
                corefour_container::cgroups::parse_size(m)
                    .with_context(|| format!("--memory {m:?}: use a size like 256M or 1G, or 0"))
            })
            .transpose()
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a container from a template (the template is built and cached on first use).
    Create(Box<CreateArgs>),
    /// Start containers.
    Start { names: Vec<String> },
    /// Run a command inside a running container: `ct exec NAME -- CMD ARGS`.
    Exec {
        name: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Attach to the container's console (Ctrl-] detaches); with --log, print what it wrote.
    Console {
        name: String,
        /// Print the console log instead of attaching.
        #[arg(long)]
        log: bool,
        /// With --log: keep printing new output until the container stops.
        #[arg(short, long)]
        follow: bool,
    },
    /// SIGTERM to the init, SIGKILL after the timeout.
    Stop {
        names: Vec<String>,
        /// Seconds to wait for the init to exit before SIGKILL: 10, 10s, 500ms, 2m.
        #[arg(long, default_value = "10")]
        timeout: String,
    },
    /// SIGKILL the containers' inits.
    Kill { names: Vec<String> },
    /// Freeze every process of the containers (cgroup freezer).
    Pause { names: Vec<String> },
    /// Thaw paused containers.
    Resume { names: Vec<String> },
    /// Delete stopped containers (--force stops them first).
    Delete {
        names: Vec<String>,
        #[arg(short, long)]
        force: bool,
    },
    /// List containers.
    List,
    /// Show one container.
    Info { name: String },
    /// Show the containers' inventory events (daemon only).
    Events {
        /// Only this container's.
        name: Option<String>,
        /// Only events after this id.
        #[arg(long)]
        since: Option<i64>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Keep printing new events.
        #[arg(long, short)]
        follow: bool,
    },
    /// Change limits; a running container's cgroup changes at once.
    Set(SetArgs),
    /// Export a stopped container (config and root file system layer) to FILE.tar.zst, with the
    /// SHA-256 of every member in its manifest (daemon only).
    Export {
        name: String,
        file: PathBuf,
        /// The whole root file system instead of the upper layer over the template.
        #[arg(long)]
        full: bool,
    },
    /// Import an exported container: every checksum is verified before it is registered.
    Import {
        /// The archive; `-` reads it from standard input.
        file: PathBuf,
        /// Register it under this name instead of the exported one.
        #[arg(long)]
        name: Option<String>,
        /// Start it once imported.
        #[arg(long)]
        start: bool,
    },
    /// Move a container to another daemon: stop, copy, start there; the source is deleted only
    /// after the target confirms, and restarted if anything fails.
    Move {
        name: String,
        /// The target: a daemon's socket on this host (a path), or `HOST` / `ssh://HOST` for
        /// the daemon on another host, reached with `ssh HOST corefour ct ...` (COREFOUR_SSH and
        /// COREFOUR_REMOTE_BIN override the two commands).
        #[arg(long)]
        to: String,
        /// Copy the whole root file system (the target then needs no template).
        #[arg(long)]
        full: bool,
        /// Graceful stop timeout on the source.
        #[arg(long, default_value = "10")]
        timeout: String,
    },
    /// Internal: the shim the daemon runs per container.
    #[command(hide = true)]
    Shim {
        name: String,
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        cgroup_parent: String,
    },
}

/// Returns the process exit code.
pub fn run(args: Args) -> anyhow::Result<i32> {
    if let Cmd::Shim {
        name,
        base,
        cgroup_parent,
    } = &*args.cmd
    {
        return Ok(corefour_daemon::ct::shim::run(base, cgroup_parent, name)?);
    }
    if args.direct || args.dir.is_some() {
        let dir = args.dir.unwrap_or_else(|| PathBuf::from(DEFAULT_BASE));
        return direct(&System::new(&dir), *args.cmd, args.json);
    }
    daemon::run(&args.socket, *args.cmd, args.json)
}

/// "10s", "500ms", "2m", "10" (seconds) -> whole seconds, rounded up.
pub(crate) fn parse_secs(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("timeout {s:?}: expected e.g. 10s, 500ms or 2m"))?;
    Ok(match unit {
        "" | "s" => n,
        "ms" => n.div_ceil(1000),
        "m" => n * 60,
        _ => anyhow::bail!("timeout {s:?}: use s, ms or m"),
    })
}

fn one<'a>(names: &'a [String], verb: &str) -> anyhow::Result<&'a str> {
    match names {
        [n] => Ok(n),
        [] => anyhow::bail!("ct {verb}: name a container"),
        _ => anyhow::bail!("ct {verb} --direct takes one container at a time"),
    }
}

/// The daemonless path: this process runs the container runtime itself.
fn direct(sys: &System, cmd: Cmd, json: bool) -> anyhow::Result<i32> {
    match cmd {
        Cmd::Create(c) => {
            let memory = c.memory_bytes()?;
            let bridge = c.bridge()?;
            let cached = sys
                .base
                .join("templates")
                .join(&c.template)
                .join(".complete")
                .exists();
            if !cached && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                let how = if c.template == "debian" {
                    "debootstrap, a few minutes"
                } else {
                    "busybox-static"
                };
                eprintln!(
                    "building the {} template once ({how}); later containers reuse it",
                    c.template
                );
            }
            let cfg = sys.create(&CreateRequest {
                name: c.name.clone(),
                template: c.template.clone(),
                memory,
                cpus: c.cpus(),
                pids: c.pids,
                cpu_weight: c.cpu_weight,
                bridge,
            })?;
            if c.start {
                sys.start(&cfg.name)?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&cfg)?);
            } else {
                let addr = cfg
                    .net
                    .as_ref()
                    .map(|n| format!(" address {}", n.address))
                    .unwrap_or_default();
                println!("created {} from {}{addr}", cfg.name, cfg.template);
            }
        }
        Cmd::Start { names } => {
            let name = one(&names, "start")?;
            let pid = sys.start(name)?;
            if json {
                println!("{}", serde_json::json!({"name": name, "pid": pid}));
            }
        }
        Cmd::Exec { name, command } => return Ok(sys.exec(&name, &command)?),
        Cmd::Console { name, log, follow } => {
            let sock = sys.console_socket(&name);
            if log || follow || !sock.exists() {
                if !log && !follow {
                    sys.info(&name)?;
                    eprintln!("{name} has no interactive console (not running, or its init has no tty); its log:");
                }
                console(sys, &name, follow)?;
            } else {
                attach(&name, &sock)?;
            }
        }
        Cmd::Stop { names, timeout } => {
            let t = parse_secs(&timeout)?;
            sys.stop(one(&names, "stop")?, Duration::from_secs(t))?
        }
        Cmd::Kill { names } => sys.stop(one(&names, "kill")?, Duration::ZERO)?,
        Cmd::Pause { names } => {
            corefour_container::container_pause::pause(&sys.run_root(), one(&names, "pause")?)?
        }
        Cmd::Resume { names } => {
            corefour_container::container_pause::resume(&sys.run_root(), one(&names, "resume")?)?
        }
        Cmd::Delete { names, force } => sys.delete(one(&names, "delete")?, force)?,
        Cmd::Set(s) => {
            let zero_none_u = |v: u32| (v != 0).then_some(v);
            let zero_none_i = |v: i64| (v != 0).then_some(v);
            let change = LimitChange {
                memory: s.memory_bytes()?.map(zero_none_i),
                cpus: s
                    .cpu_quota
                    .map(|q| zero_none_u(q).map(|q| f64::from(q) / 100.0)),
                cpu_weight: s.cpu_weight.map(zero_none_u),
                pids: s.pids.map(zero_none_i),
            };
            let cfg = sys.set_limits(&s.name, &change)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&cfg)?);
            }
        }
        Cmd::List => {
            let all = sys.list();
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!(
                    "{:<20} {:<9} {:<9} {:<16} {:>8}",
                    "NAME", "STATUS", "TEMPLATE", "IPV4", "PID"
                );
                for c in &all {
                    print_row(c);
                }
            }
        }
        Cmd::Info { name } => {
            let i = sys.info(&name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                print_direct_info(&i);
            }
        }
        Cmd::Events { .. } | Cmd::Export { .. } | Cmd::Import { .. } | Cmd::Move { .. } => {
            anyhow::bail!(
                "this ct command needs the daemon: drop --direct/--dir (and unset COREFOUR_CT_DIR)"
            )
        }
        Cmd::Shim { .. } => unreachable!("handled before"),
    }
    Ok(0)
}

fn print_direct_info(i: &CtInfo) {
    println!("name:     {}", i.config.name);
    println!("status:   {}", i.status);
    println!("template: {}", i.config.template);
    println!(
        "pid:      {}",
        i.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
    );
    println!("rootfs:   {}", i.rootfs.display());
    println!(
        "memory:   {}",
        i.config
            .memory
            .map(|m| format!("{} MiB", m >> 20))
            .unwrap_or_else(|| "unlimited".into())
    );
    println!(
        "cpus:     {}",
        i.config
            .cpus
            .map(|c| c.to_string())
            .unwrap_or_else(|| "unlimited".into())
    );
    println!(
        "pids:     {}",
        i.config
            .pids
            .map(|c| c.to_string())
            .unwrap_or_else(|| "unlimited".into())
    );
    match &i.config.net {
        Some(n) => println!(
            "network:  {} on {} ({})",
            n.address, n.bridge.bridge, n.bridge.subnet
        ),
        None => println!("network:  none (loopback only)"),
    }
    println!("created:  {}", i.config.created);
}

fn print_row(c: &CtInfo) {
    let ip = c
        .config
        .net
        .as_ref()
        .map(|n| n.address.to_string())
        .unwrap_or_else(|| "-".into());
    let pid = c.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    println!(
        "{:<20} {:<9} {:<9} {:<16} {:>8}",
        c.config.name, c.status, c.config.template, ip, pid
    );
}

fn console(sys: &System, name: &str, follow: bool) -> anyhow::Result<()> {
    use std::io::{Read, Seek, Write};
    sys.info(name)?;
    let path = sys.console_log(name);
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(_) if !follow => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("open {}", path.display())),
    };
    let mut out = std::io::stdout();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            out.flush()?;
            continue;
        }
        if !follow
            || sys
                .info(name)
                .map(|i| i.status == "stopped")
                .unwrap_or(true)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
        let pos = f.stream_position()?;
        f.seek(std::io::SeekFrom::Start(pos))?;
    }
}

/// Proxies the terminal to the console monitor's socket; Ctrl-] detaches. With a non-tty stdin
/// (scripts), input is sent as it is and the output is drained briefly after stdin ends.
pub(crate) fn attach(name: &str, sock: &std::path::Path) -> anyhow::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    let mut conn = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("connect to {}", sock.display()))?;
    let stdin = std::io::stdin();
    let saved = tcgetattr(stdin.as_fd()).ok();
    if let Some(t) = &saved {
        let mut raw = t.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        eprint!("Connected to the console of {name}; Ctrl-] detaches.\r\n");
    }
    let mut out = std::io::stdout();
    let mut buf = [0u8; 8192];
    let mut stdin_open = true;
    let mut drain_deadline: Option<std::time::Instant> = None;
    let result = (|| -> anyhow::Result<()> {
        loop {
            let timeout = match drain_deadline {
                Some(d) => PollTimeout::try_from(
                    d.saturating_duration_since(std::time::Instant::now())
                        .as_millis() as i32,
                )
                .unwrap_or(PollTimeout::ZERO),
                None => PollTimeout::NONE,
            };
            let mut fds = vec![PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
            if stdin_open {
                fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
            }
            let n = poll(&mut fds, timeout)?;
            if n == 0 {
                return Ok(());
            }
            let rev: Vec<PollFlags> = fds
                .iter()
                .map(|f| f.revents().unwrap_or(PollFlags::empty()))
                .collect();
            drop(fds);
            if rev[0].intersects(PollFlags::POLLIN | PollFlags::POLLHUP) {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                out.write_all(&buf[..n])?;
                out.flush()?;
            }
            if stdin_open && rev[1].intersects(PollFlags::POLLIN | PollFlags::POLLHUP) {
                let n = stdin.lock().read(&mut buf)?;
                if n == 0 {
                    stdin_open = false;
                    drain_deadline =
                        Some(std::time::Instant::now() + std::time::Duration::from_millis(1500));
                    continue;
                }
                if saved.is_some() && buf[..n].contains(&0x1d) {
                    return Ok(());
                }
                conn.write_all(&buf[..n])?;
            }
        }
    })();
    if let Some(t) = &saved {
        let _ = tcsetattr(stdin.as_fd(), SetArg::TCSANOW, t);
        eprintln!();
    }
    result
}
