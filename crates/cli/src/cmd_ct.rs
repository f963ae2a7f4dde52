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
    /// Show the container's console output (its init's stdout and stderr).
    Console {
        name: String,
        /// Keep printing new output until interrupted.
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
        Cmd::Console { name, follow } => console(&sys, &name, follow)?,
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
