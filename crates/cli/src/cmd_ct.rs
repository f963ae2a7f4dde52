//! `corefour ct`: LXC-style system containers from templates (busybox, debian), on overlayfs,
//! with cgroup limits and bridge networking.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use corefour_container::network::BridgeConfig;
use corefour_container::system::{CreateRequest, CtInfo, System, DEFAULT_BASE};

#[derive(clap::Args)]
pub struct Args {
    /// Where templates, containers and runtime state live.
    #[arg(long, global = true, env = "COREFOUR_CT_DIR", default_value = DEFAULT_BASE)]
    dir: PathBuf,
    /// Print data as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Box<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a container from a template (the template is built and cached on first use).
    Create {
        name: String,
        #[arg(long, default_value = "busybox")]
        template: String,
        /// Memory limit, e.g. 256M.
        #[arg(long)]
        memory: Option<String>,
        /// CPU limit in CPUs (CFS quota), e.g. 1 or 0.5.
        #[arg(long)]
        cpus: Option<f64>,
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
    },
    /// Start a container's init.
    Start { name: String },
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
        name: String,
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Delete a stopped container (--force stops it first).
    Delete {
        name: String,
        #[arg(short, long)]
        force: bool,
    },
    /// List containers.
    List,
    /// Show one container.
    Info { name: String },
}

/// Returns the process exit code.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let sys = System::new(&args.dir);
    match *args.cmd {
        Cmd::Create {
            name,
            template,
            memory,
            cpus,
            pids,
            net,
            bridge,
            subnet,
        } => {
            let memory = memory
                .map(|m| {
                    corefour_container::cgroups::parse_size(&m)
                        .with_context(|| format!("--memory {m:?}: use a size like 256M or 1G"))
                })
                .transpose()?;
            let bridge = match net.as_str() {
                "bridge" => Some(BridgeConfig { bridge, subnet }),
                "none" => None,
                other => anyhow::bail!("--net {other:?}: use bridge or none"),
            };
            let cached = args
                .dir
                .join("templates")
                .join(&template)
                .join(".complete")
                .exists();
            if !cached && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                let how = if template == "debian" {
                    "debootstrap, a few minutes"
                } else {
                    "busybox-static"
                };
                eprintln!(
                    "building the {template} template once ({how}); later containers reuse it"
                );
            }
            let cfg = sys.create(&CreateRequest {
                name,
                template,
                memory,
                cpus,
                pids,
                bridge,
            })?;
            if args.json {
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
        Cmd::Start { name } => {
            let pid = sys.start(&name)?;
            if args.json {
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
                console(&sys, &name, follow)?;
            } else {
                attach(&name, &sock)?;
            }
        }
        Cmd::Stop { name, timeout } => sys.stop(&name, Duration::from_secs(timeout))?,
        Cmd::Delete { name, force } => sys.delete(&name, force)?,
        Cmd::List => {
            let all = sys.list();
            if args.json {
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
            if args.json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
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
        }
    }
    Ok(0)
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
fn attach(name: &str, sock: &std::path::Path) -> anyhow::Result<()> {
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
