//! `corefour vm`: VMs through the daemon's REST API.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use corefour_api::{DiskSpec, Event, NetSpec, StopRequest, VmCreate, VmInfo, VmLimits};
use corefour_daemon::client::blocking::Client;
use corefour_daemon::client::fault_text;
use serde::de::DeserializeOwned;

#[derive(clap::Args)]
pub struct Args {
    /// The daemon's socket.
    #[arg(long, global = true, env = "COREFOUR_SOCKET", default_value = corefour_daemon::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Define a VM (or N of them with --count and a {n} in the name).
    Create(Box<CreateArgs>),
    /// Start VMs.
    Start { names: Vec<String> },
    /// Stop VMs gracefully; SIGKILL after --timeout.
    Stop {
        names: Vec<String>,
        /// How long to wait for a graceful shutdown: 10s, 500ms, 2m.
        #[arg(long, default_value = "10s")]
        timeout: String,
    },
    /// SIGKILL the VMs' VMMs.
    Kill { names: Vec<String> },
    /// Pause all vCPUs.
    Pause { names: Vec<String> },
    /// Resume paused VMs.
    Resume { names: Vec<String> },
    /// Export a stopped VM (config, kernel, disks, optional memory snapshot) to FILE.tar.zst,
    /// with the SHA-256 of every member in its manifest.
    Export {
        name: String,
        file: PathBuf,
        /// Also include this snapshot directory (from `corefour vm snapshot`).
        #[arg(long, value_name = "DIR")]
        snapshot: Option<PathBuf>,
    },
    /// Import an exported VM: every checksum is verified before the VM is registered.
    Import {
        file: PathBuf,
        /// Register it under this name instead of the exported one.
        #[arg(long)]
        name: Option<String>,
        /// Where to unpack its files (default /var/lib/corefour/imports/NAME-TIME).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Snapshot a running VM (vCPUs, devices, memory) into a directory; restore it with
    /// `corefour vm restore NAME --from DIR` (or `corefour vmm --restore DIR`). Its writable
    /// disks are snapshotted at the same instant: they move onto new qcow2 overlays and the
    /// files they were in freeze, so a restore sees the disk as it was.
    Snapshot {
        name: String,
        /// Absolute path of a new or empty directory (default: in the VM's state directory).
        #[arg(long)]
        path: Option<std::path::PathBuf>,
        /// Only the pages written since this VM's previous snapshot.
        #[arg(long)]
        diff: bool,
        /// Memory and devices only: a restore then uses the disks as they are at that time.
        #[arg(long)]
        memory_only: bool,
    },
    /// Clone a VM: new name and MACs; each writable disk becomes a qcow2 overlay on the
    /// source's (copy-on-write, nothing copied). A running source is snapshotted (a brief pause)
    /// and the clone starts from that instant; with writable disks the source moves onto its own
    /// overlay at the same instant, so the disk both read from no longer changes.
    Clone {
        src: String,
        dst: String,
        /// Start the clone once it is registered.
        #[arg(long)]
        start: bool,
    },
    /// Live-migrate a running VM to another corefour daemon (started there with
    /// --migration-listen). Disks must be on shared storage (the same paths on the target) unless
    /// --copy-storage. On any failure the VM keeps running here and the target keeps nothing.
    Migrate {
        name: String,
        /// The target daemon: HOST or HOST:PORT (default port 4747).
        #[arg(long, value_name = "HOST[:PORT]")]
        to: String,
        /// Downtime target for the last copy: 10ms, 1s.
        #[arg(long, default_value = "10ms", value_name = "DURATION")]
        max_downtime: String,
        /// Copy the writable disks to the target (under its state directory) instead of
        /// expecting shared storage: mirrored while the guest runs, the last written chunks
        /// during the downtime (raw and qcow2 disks without a backing file).
        #[arg(long)]
        copy_storage: bool,
    },
    /// Start a stopped VM from one of its snapshots instead of booting it.
    Restore {
        name: String,
        /// The snapshot directory (from `corefour vm snapshot`).
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
    },
    /// Delete VMs (running ones only with --force).
    Delete {
        names: Vec<String>,
        #[arg(long, short)]
        force: bool,
    },
    /// List VMs.
    List,
    /// Show one VM.
    Info { name: String },
    /// Print the VM's serial console log.
    Console {
        name: String,
        /// Keep printing new output until the VM stops.
        #[arg(long, short)]
        follow: bool,
    },
    /// Show inventory events.
    Events {
        /// Only events after this id.
        #[arg(long)]
        since: Option<i64>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Keep printing new events.
        #[arg(long, short)]
        follow: bool,
    },
    /// Change CPU limits (applied at once to a running VM).
    Set {
        name: String,
        /// Percent of one host CPU (150% = one and a half CPUs); 0 removes the quota.
        #[arg(long)]
        cpu_quota: Option<String>,
        /// Relative weight 1..10000 (100 = default); 0 restores the default.
        #[arg(long)]
        cpu_weight: Option<u32>,
    },
}

#[derive(clap::Args)]
struct CreateArgs {
    /// VM name; with --count, a template where {n} becomes 1..N (e.g. web-{n}).
    name: String,
    /// Guest kernel or test binary.
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    cmdline: Option<String>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory: 64M, 1G, 256MiB (a bare number is MiB).
    #[arg(long, default_value = "64M")]
    memory: String,
    /// Boot-time balloon target (memory the guest is asked to give back), e.g. 64M.
    #[arg(long)]
    balloon: Option<String>,
    /// CPU backend: auto, kvm or emu.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Host CPUs the VM may run on, e.g. 0,1 or 0-1.
    #[arg(long)]
    cpu_pin: Option<String>,
    /// Percent of one host CPU, e.g. 50%.
    #[arg(long)]
    cpu_quota: Option<String>,
    #[arg(long)]
    cpu_weight: Option<u32>,
    /// Disk image: PATH[,ro][,bps=N][,iops=N]; repeatable.
    #[arg(long)]
    disk: Vec<String>,
    /// NIC on a daemon-managed bridge: BRIDGE[,mac=MAC][,bps=N][,pps=N]; repeatable.
    #[arg(long)]
    net: Vec<String>,
    /// How many VMs to create from the name template.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Start each VM after creating it.
    #[arg(long)]
    start: bool,
}

/// A connection to the daemon: one runtime, one socket path, JSON in and out.
pub(crate) struct Api {
    client: Client,
    socket: PathBuf,
}

impl Api {
    pub(crate) fn new(socket: &Path) -> anyhow::Result<Api> {
        Ok(Api {
            client: Client::new().context("cannot start the I/O runtime")?,
            socket: socket.to_path_buf(),
        })
    }

    fn raw(
        &self,
        method: hyper_method::Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Vec<u8>> {
        let (status, bytes) = self
            .client
            .call(&self.socket, method, uri, body)
            .map_err(|e| self.unreachable(e))?;
        if !status.is_success() {
            bail!("{}", fault_text(&bytes));
        }
        Ok(bytes.to_vec())
    }

    fn unreachable(&self, e: corefour_daemon::client::ClientError) -> anyhow::Error {
        if e.is_unreachable() {
            anyhow::anyhow!(
                "cannot reach the corefour daemon at {}: is it running? start it with `corefour daemon`",
                self.socket.display()
            )
        } else if matches!(&e, corefour_daemon::client::ClientError::Connect { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied)
        {
            anyhow::anyhow!(
                "permission denied on {}: run as root or as a member of the daemon's --group",
                self.socket.display()
            )
        } else {
            e.into()
        }
    }

    pub(crate) fn call<T: DeserializeOwned>(
        &self,
        method: hyper_method::Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<T> {
        let bytes = self.raw(method, uri, body)?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("the daemon's answer to {uri} is not what this CLI expects"))
    }

    pub(crate) fn create(&self, req: &VmCreate) -> anyhow::Result<VmInfo> {
        self.call(
            hyper_method::Method::POST,
            "/v1/vms",
            Some(serde_json::to_vec(req)?),
        )
    }

    pub(crate) fn verb(
        &self,
        name: &str,
        verb: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<VmInfo> {
        self.call(
            hyper_method::Method::POST,
            &format!("/v1/vms/{}/{verb}", encode(name)),
            body,
        )
    }

    pub(crate) fn delete(&self, name: &str, force: bool) -> anyhow::Result<()> {
        self.raw(
            hyper_method::Method::DELETE,
            &format!("/v1/vms/{}?force={force}", encode(name)),
            None,
        )?;
        Ok(())
    }

    pub(crate) fn console(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        self.raw(
            hyper_method::Method::GET,
            &format!("/v1/vms/{}/console", encode(name)),
            None,
        )
    }

    /// Streams the console until the VM stops (or `sink` returns an error, which ends it early).
    pub(crate) fn follow_console(
        &self,
        name: &str,
        sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> anyhow::Result<()> {
        let status = self
            .client
            .stream(
                &self.socket,
                &format!("/v1/vms/{}/console?follow=true", encode(name)),
                sink,
            )
            .map_err(|e| self.unreachable(e))?;
        if !status.is_success() {
            bail!("cannot follow the console of {name:?}: HTTP {status}");
        }
        Ok(())
    }
}

/// The HTTP method type, under a name that does not suggest a dependency of the CLI's own.
pub(crate) mod hyper_method {
    pub use corefour_daemon::client::Method;
}

/// Names are validated by the daemon; percent-encode the few bytes a path segment cannot carry so
/// that even a hostile name reaches it intact and gets a clear 400.
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Returns the process exit code.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let api = Api::new(&args.socket)?;
    let json = args.json;
    match args.cmd {
        Cmd::Create(c) => create(&api, *c, json),
        Cmd::Start { names } => each(&api, &names, json, "start", None),
        Cmd::Stop { names, timeout } => {
            let secs = parse_duration_secs(&timeout)?;
            let body = serde_json::to_vec(&StopRequest {
                timeout_secs: Some(secs),
            })?;
            each(&api, &names, json, "stop", Some(body))
        }
        Cmd::Kill { names } => each(&api, &names, json, "kill", None),
        Cmd::Pause { names } => each(&api, &names, json, "pause", None),
        Cmd::Resume { names } => each(&api, &names, json, "resume", None),
        Cmd::Export {
            name,
            file,
            snapshot,
        } => crate::cmd_vm_export::export(&api, &name, &file, snapshot.as_deref(), json),
        Cmd::Import { file, name, dir } => {
            crate::cmd_vm_export::import(&api, &file, name.as_deref(), dir.as_deref(), json)
        }
        Cmd::Snapshot {
            name,
            path,
            diff,
            memory_only,
        } => {
            let path = match path {
                Some(p) if p.is_relative() => Some(std::env::current_dir()?.join(p)),
                p => p,
            };
            let body = serde_json::to_vec(
                &serde_json::json!({"path": path, "diff": diff, "memory_only": memory_only}),
            )?;
            let r: serde_json::Value = api.call(
                hyper_method::Method::POST,
                &format!("/v1/vms/{}/snapshot", encode(&name)),
                Some(body),
            )?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{name}: snapshot in {} ({} bytes of memory written, paused {:.1} ms)",
                    r["path"].as_str().unwrap_or("?"),
                    r["memory_bytes_written"],
                    r["paused_ms"].as_f64().unwrap_or(0.0)
                );
                for d in r["disks"].as_array().into_iter().flatten() {
                    println!(
                        "{name}: disk {} frozen at {}; the VM continues on {}",
                        d["index"],
                        d["frozen"].as_str().unwrap_or("?"),
                        d["running"].as_str().unwrap_or("?")
                    );
                }
            }
            Ok(0)
        }
        Cmd::Clone { src, dst, start } => {
            let body = serde_json::to_vec(&serde_json::json!({"name": dst, "start": start}))?;
            let v = api.verb(&src, "clone", Some(body))?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("{}: cloned from {src} ({})", v.name, v.state);
            }
            Ok(0)
        }
        Cmd::Migrate {
            name,
            to,
            max_downtime,
            copy_storage,
        } => crate::cmd_vm_migrate::migrate(&api, &name, &to, &max_downtime, copy_storage, json),
        Cmd::Restore { name, from } => {
            let from = std::path::absolute(&from)?;
            let body = serde_json::to_vec(&serde_json::json!({"path": from}))?;
            let v = api.verb(&name, "restore", Some(body))?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("{}: restored from {} ({})", v.name, from.display(), v.state);
            }
            Ok(0)
        }
        Cmd::Delete { names, force } => {
            need_names(&names)?;
            for n in &names {
                api.delete(n, force)?;
                if json {
                    println!("{}", serde_json::json!({"name": n, "deleted": true}));
                } else {
                    println!("deleted {n}");
                }
            }
            Ok(0)
        }
        Cmd::List => {
            let vms: Vec<VmInfo> = api.call(hyper_method::Method::GET, "/v1/vms", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vms)?);
            } else {
                print_table(&vms);
            }
            Ok(0)
        }
        Cmd::Info { name } => {
            let vm: VmInfo = api.call(
                hyper_method::Method::GET,
                &format!("/v1/vms/{}", encode(&name)),
                None,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vm)?);
            } else {
                print_info(&vm);
            }
            Ok(0)
        }
        Cmd::Console { name, follow } => {
            let mut out = std::io::stdout().lock();
            if follow {
                api.follow_console(&name, |b| {
                    out.write_all(b)?;
                    out.flush()
                })?;
            } else {
                out.write_all(&api.console(&name)?)?;
            }
            Ok(0)
        }
        Cmd::Events {
            since,
            limit,
            follow,
        } => events(&api, since, limit, follow, json),
        Cmd::Set {
            name,
            cpu_quota,
            cpu_weight,
        } => {
            if cpu_quota.is_none() && cpu_weight.is_none() {
                bail!("nothing to set: give --cpu-quota and/or --cpu-weight");
            }
            let req = VmLimits {
                cpu_quota_pct: cpu_quota.as_deref().map(parse_percent).transpose()?,
                cpu_weight,
            };
            let vm: VmInfo = api.call(
                hyper_method::Method::PATCH,
                &format!("/v1/vms/{}", encode(&name)),
                Some(serde_json::to_vec(&req)?),
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vm)?);
            } else {
                println!(
                    "{}: cpu quota {}, cpu weight {}",
                    vm.name,
                    vm.cpu_quota_pct
                        .map_or("none".to_string(), |q| format!("{q}%")),
                    vm.cpu_weight
                        .map_or("default".to_string(), |w| w.to_string())
                );
            }
            Ok(0)
        }
    }
}

fn need_names(names: &[String]) -> anyhow::Result<()> {
    if names.is_empty() {
        bail!("name at least one VM");
    }
    Ok(())
}

fn each(
    api: &Api,
    names: &[String],
    json: bool,
    verb: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<i32> {
    need_names(names)?;
    for n in names {
        let vm = api.verb(n, verb, body.clone())?;
        if json {
            println!("{}", serde_json::to_string(&vm)?);
        } else {
            match (&vm.stop_reason, vm.state) {
                (Some(r), corefour_api::VmState::Stopped) => println!("{}: stopped ({r})", vm.name),
                _ => println!("{}: {}", vm.name, vm.state),
            }
        }
    }
    Ok(0)
}

fn create(api: &Api, c: CreateArgs, json: bool) -> anyhow::Result<i32> {
    let names: Vec<String> = if c.count > 1 || c.name.contains("{n}") {
        if !c.name.contains("{n}") {
            bail!(
                "--count {} needs a name template with {{n}}, e.g. web-{{n}}",
                c.count
            );
        }
        (1..=c.count)
            .map(|i| c.name.replace("{n}", &i.to_string()))
            .collect()
    } else {
        vec![c.name.clone()]
    };
    let kernel = std::path::absolute(&c.kernel)
        .with_context(|| format!("cannot resolve {}", c.kernel.display()))?;
    let mut req = VmCreate {
        name: String::new(),
        kernel: kernel.display().to_string(),
        cmdline: c.cmdline.clone(),
        initrd: c
            .initrd
            .as_ref()
            .map(|p| std::path::absolute(p).map(|p| p.display().to_string()))
            .transpose()?,
        vcpus: c.vcpus,
        memory_mib: parse_mib(&c.memory)?,
        balloon_mib: c.balloon.as_deref().map(parse_mib).transpose()?,
        backend: c.backend.clone(),
        cpu_pin: c
            .cpu_pin
            .as_deref()
            .map(parse_cpu_list)
            .transpose()?
            .unwrap_or_default(),
        cpu_quota_pct: c.cpu_quota.as_deref().map(parse_percent).transpose()?,
        cpu_weight: c.cpu_weight,
        disks: c
            .disk
            .iter()
            .map(|d| parse_disk(d))
            .collect::<anyhow::Result<_>>()?,
        nets: c
            .net
            .iter()
            .map(|n| parse_net(n))
            .collect::<anyhow::Result<_>>()?,
        start: c.start,
    };
    // Many VMs on a terminal: a progress bar instead of a line each.
    let bar = (names.len() > 1 && !json && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(|| {
            let pb = indicatif::ProgressBar::new(names.len() as u64);
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} VMs {msg}")
            {
                pb.set_style(style);
            }
            pb
        });
    let mut made = Vec::new();
    for name in names {
        req.name = name;
        let vm = api.create(&req)?;
        match &bar {
            Some(pb) => {
                pb.set_message(vm.name.clone());
                pb.inc(1);
            }
            None if !json => println!(
                "created {}{}",
                vm.name,
                if c.start {
                    format!(" ({})", vm.state)
                } else {
                    String::new()
                }
            ),
            None => {}
        }
        made.push(vm);
    }
    if let Some(pb) = bar {
        pb.finish_and_clear();
        let (first, last) = (&made[0].name, &made[made.len() - 1].name);
        println!("created {} VMs: {first} .. {last}", made.len());
    }
    if json {
        if made.len() == 1 {
            println!("{}", serde_json::to_string_pretty(&made[0])?);
        } else {
            println!("{}", serde_json::to_string_pretty(&made)?);
        }
    }
    Ok(0)
}

fn events(
    api: &Api,
    since: Option<i64>,
    limit: u32,
    follow: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let mut since = since;
    loop {
        let uri = match since {
            Some(s) => format!("/v1/events?since={s}&limit={limit}"),
            None => format!("/v1/events?limit={limit}"),
        };
        let evs: Vec<Event> = api.call(hyper_method::Method::GET, &uri, None)?;
        for e in &evs {
            if json {
                println!("{}", serde_json::to_string(e)?);
            } else {
                println!(
                    "{:>6}  {}  {:<12} {:<10} {}",
                    e.id,
                    fmt_time(e.time_ms),
                    e.instance,
                    e.kind,
                    e.message
                );
            }
        }
        if let Some(last) = evs.last() {
            since = Some(last.id);
        } else if since.is_none() {
            since = Some(0);
        }
        if !follow {
            return Ok(0);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn fmt_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}Z", ms.rem_euclid(1000))
}

fn print_table(vms: &[VmInfo]) {
    println!(
        "{:<24} {:<8} {:>5} {:>8} {:>8}  REASON",
        "NAME", "STATE", "VCPUS", "MEMORY", "PID"
    );
    for v in vms {
        println!(
            "{:<24} {:<8} {:>5} {:>7}M {:>8}  {}",
            v.name,
            v.state.as_str(),
            v.vcpus,
            v.memory_mib,
            v.pid.map_or("-".to_string(), |p| p.to_string()),
            v.stop_reason.as_deref().unwrap_or("")
        );
    }
}

fn print_info(v: &VmInfo) {
    println!("name:        {}", v.name);
    println!("state:       {}", v.state);
    if let Some(p) = v.pid {
        println!("pid:         {p}");
    }
    if let Some(r) = &v.stop_reason {
        println!("stop reason: {r}");
    }
    println!("kernel:      {}", v.kernel);
    if let Some(c) = &v.cmdline {
        println!("cmdline:     {c}");
    }
    println!("vcpus:       {}", v.vcpus);
    println!("memory:      {} MiB", v.memory_mib);
    if let Some(b) = v.balloon_mib {
        println!("balloon:     {b} MiB");
    }
    println!("backend:     {}", v.backend);
    if !v.cpu_pin.is_empty() {
        println!("cpu pin:     {:?}", v.cpu_pin);
    }
    if let Some(q) = v.cpu_quota_pct {
        println!("cpu quota:   {q}%");
    }
    if let Some(w) = v.cpu_weight {
        println!("cpu weight:  {w}");
    }
    for d in &v.disks {
        println!(
            "disk:        {}{}",
            d.path,
            if d.read_only { " (read-only)" } else { "" }
        );
    }
    for n in &v.nics {
        println!("nic:         {} on {} mac {}", n.tap, n.bridge, n.mac);
    }
}

/// "256M", "1G", "512MiB", "64" (MiB) -> MiB.
fn parse_mib(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("memory size {s:?}: expected a number like 256M or 1G"))?;
    let mib = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => n,
        "g" | "gb" | "gib" => n * 1024,
        "k" | "kb" | "kib" if n.is_multiple_of(1024) => n / 1024,
        _ => bail!("memory size {s:?}: use M or G units (whole MiB), e.g. 256M or 1G"),
    };
    Ok(mib)
}

/// "50%", "50", "150%" -> percent of one CPU.
fn parse_percent(s: &str) -> anyhow::Result<u32> {
    s.trim().trim_end_matches('%').parse().with_context(|| {
        format!("cpu quota {s:?}: expected a percentage of one CPU, e.g. 50% or 150%")
    })
}

/// "0,1", "0-3", "1" -> CPU numbers.
fn parse_cpu_list(s: &str) -> anyhow::Result<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let bad = || format!("cpu list {s:?}: expected numbers and ranges like 0,1 or 0-3");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) =
                    (a.parse().with_context(bad)?, b.parse().with_context(bad)?);
                if a > b {
                    bail!("{}", bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().with_context(bad)?),
        }
    }
    Ok(out)
}

fn parse_kv_rate(
    k: &str,
    v: &str,
    rate: &mut corefour_api::RateLimit,
    what: &str,
) -> anyhow::Result<bool> {
    let n = || {
        v.parse::<u64>()
            .with_context(|| format!("{what} option {k}={v}: expected a number"))
    };
    match k {
        "bps" => rate.bytes_per_sec = Some(n()?),
        "iops" | "pps" => rate.ops_per_sec = Some(n()?),
        _ => return Ok(false),
    }
    Ok(true)
}

fn parse_disk(s: &str) -> anyhow::Result<DiskSpec> {
    let mut parts = s.split(',');
    let path = parts.next().unwrap_or("");
    if path.is_empty() {
        bail!("--disk {s:?}: expected PATH[,ro][,bps=N][,iops=N]");
    }
    let mut d = DiskSpec {
        path: std::path::absolute(path)?.display().to_string(),
        read_only: false,
        rate_limit: None,
    };
    let mut rate = corefour_api::RateLimit::default();
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => d.read_only = true,
            Some((k, v)) if parse_kv_rate(k, v, &mut rate, "--disk")? => {}
            _ => bail!("--disk option {opt:?} is unknown: use ro, bps=N or iops=N"),
        }
    }
    if rate != corefour_api::RateLimit::default() {
        d.rate_limit = Some(rate);
    }
    Ok(d)
}

fn parse_net(s: &str) -> anyhow::Result<NetSpec> {
    let mut parts = s.split(',');
    let bridge = parts.next().unwrap_or("").to_string();
    if bridge.is_empty() {
        bail!("--net {s:?}: expected BRIDGE[,mac=MAC][,bps=N][,pps=N]");
    }
    let mut n = NetSpec {
        bridge,
        mac: None,
        rate_limit: None,
    };
    let mut rate = corefour_api::RateLimit::default();
    for opt in parts {
        match opt.split_once('=') {
            Some(("mac", v)) => n.mac = Some(v.to_string()),
            Some((k, v)) if parse_kv_rate(k, v, &mut rate, "--net")? => {}
            _ => bail!("--net option {opt:?} is unknown: use mac=MAC, bps=N or pps=N"),
        }
    }
    if rate != corefour_api::RateLimit::default() {
        n.rate_limit = Some(rate);
    }
    Ok(n)
}

/// "10s", "500ms", "2m", "10" (seconds) -> whole seconds, rounded up.
fn parse_duration_secs(s: &str) -> anyhow::Result<u64> {
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
        _ => bail!("timeout {s:?}: use s, ms or m"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers() {
        assert_eq!(parse_mib("256M").unwrap(), 256);
        assert_eq!(parse_mib("1G").unwrap(), 1024);
        assert_eq!(parse_mib("64").unwrap(), 64);
        assert!(parse_mib("12X").is_err());
        assert_eq!(parse_percent("50%").unwrap(), 50);
        assert_eq!(parse_cpu_list("0,2-3").unwrap(), vec![0, 2, 3]);
        assert!(parse_cpu_list("3-1").is_err());
        assert_eq!(parse_duration_secs("1500ms").unwrap(), 2);
        assert_eq!(parse_duration_secs("2m").unwrap(), 120);
        let d = parse_disk("/x,ro,bps=100").unwrap();
        assert!(d.read_only);
        assert_eq!(d.rate_limit.unwrap().bytes_per_sec, Some(100));
        let n = parse_net("br0,mac=02:00:00:00:00:01,pps=5").unwrap();
        assert_eq!(n.mac.as_deref(), Some("02:00:00:00:00:01"));
        assert!(parse_net("br0,x=1").is_err());
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
    }
}
