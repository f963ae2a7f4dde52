//! System containers (`corefour ct`): LXC-style long-lived containers made from a template, each a
//! generated OCI bundle over an overlayfs rootfs, run by this crate's OCI runtime.
//!
//! Layout under the base directory (default /var/lib/corefour/ct):
//! `templates/<name>/rootfs` (cache), `containers/<NAME>/{ct.json,config.json,rootfs,upper,work,console.log}`,
//! `run/` (the OCI runtime's state root).

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::network::BridgeConfig;
use crate::state::Status;
use crate::ContainerError;

pub const DEFAULT_BASE: &str = "/var/lib/corefour/ct";

#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub name: String,
    pub template: String,
    pub memory: Option<i64>,
    pub cpus: Option<f64>,
    pub pids: Option<i64>,
    /// Relative CPU weight 1..=10000 (100 = default), as cgroup v2 counts it.
    pub cpu_weight: Option<u32>,
    /// Attach to this bridge (created if missing) with an address from its subnet.
    pub bridge: Option<BridgeConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetInfo {
    #[serde(flatten)]
    pub bridge: BridgeConfig,
    pub address: Ipv4Addr,
}

/// What `ct create` recorded (ct.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CtConfig {
    pub name: String,
    pub template: String,
    pub memory: Option<i64>,
    pub cpus: Option<f64>,
    pub pids: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    pub net: Option<NetInfo>,
    pub created: String,
}

/// ct.json plus the live status, as `list` and `info` print it.
#[derive(Debug, Clone, Serialize)]
pub struct CtInfo {
    #[serde(flatten)]
    pub config: CtConfig,
    pub status: String,
    pub pid: Option<i32>,
    pub rootfs: PathBuf,
}

pub struct System {
    pub base: PathBuf,
    /// Cgroup directory (relative to each hierarchy) the containers' cgroups are made in.
    pub cgroup_parent: String,
}

/// The cgroup parent of containers run without the daemon.
pub const DEFAULT_CGROUP_PARENT: &str = "corefour-ct";

/// How an imported container gets its files: the template it was made from (upper layer only in
/// the archive), or its whole root filesystem over an empty lower layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layers {
    Template,
    FullRootfs,
}

fn ct_err(msg: impl Into<String>) -> ContainerError {
    ContainerError::Init(msg.into())
}

impl System {
    pub fn new(base: &Path) -> Self {
        Self::with_cgroup_parent(base, DEFAULT_CGROUP_PARENT)
    }

    /// A system whose containers' cgroups live under `cgroup_parent` (the daemon uses its own).
    pub fn with_cgroup_parent(base: &Path, cgroup_parent: &str) -> Self {
        System {
            base: base.to_path_buf(),
            cgroup_parent: cgroup_parent.to_string(),
        }
    }

    /// The container's directory: ct.json, config.json, rootfs, upper, work, console.log.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.base.join("containers").join(name)
    }

    /// The OCI runtime's state root.
    pub fn run_root(&self) -> PathBuf {
        self.base.join("run")
    }

    pub fn load(&self, name: &str) -> Result<CtConfig, ContainerError> {
        if !crate::state::validate_id(name) {
            return Err(ContainerError::BadId(name.into()));
        }
        let path = self.dir(name).join("ct.json");
        let text = std::fs::read(&path).map_err(|_| ContainerError::NotFound(name.into()))?;
        serde_json::from_slice(&text)
            .map_err(|e| ct_err(format!("{}: corrupt ({e})", path.display())))
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.base.join("containers"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    pub fn create(&self, req: &CreateRequest) -> Result<CtConfig, ContainerError> {
        self.create_with(req, Layers::Template, |_| Ok(()))
    }

    /// Creates a container and lets `fill` put files into its upper directory before it is
    /// complete (import); on any failure nothing of it is left.
    pub fn create_with(
        &self,
        req: &CreateRequest,
        layers: Layers,
        fill: impl FnOnce(&Path) -> Result<(), ContainerError>,
    ) -> Result<CtConfig, ContainerError> {
        if !crate::state::validate_id(&req.name) {
            return Err(ContainerError::BadId(req.name.clone()));
        }
        if let Some(c) = req.cpus {
            if !(c > 0.0 && c <= 1024.0) {
                return Err(ct_err(format!("--cpus {c}: use a positive number of CPUs")));
            }
        }
        if let Some(w) = req.cpu_weight {
            if !(1..=10_000).contains(&w) {
                return Err(ct_err(format!(
                    "CPU weight {w}: use 1..10000 (100 = default)"
                )));
            }
        }
        let lower = match layers {
            Layers::FullRootfs => {
                let empty = self.base.join("templates").join(".empty");
                std::fs::create_dir_all(&empty)
                    .map_err(|e| ContainerError::io(format!("create {}", empty.display()), e))?;
                empty
            }
            Layers::Template => {
                crate::templates::ensure(&self.base.join("templates"), &req.template)
                    .map_err(|e| ct_err(e.to_string()))?
            }
        };
        let net = match &req.bridge {
            Some(b) => {
                let used: Vec<Ipv4Addr> = self
                    .names()
                    .iter()
                    .filter_map(|n| self.load(n).ok()?.net.map(|n| n.address))
                    .collect();
                let address = b.allocate(&used).map_err(|e| ct_err(e.to_string()))?;
                Some(NetInfo {
                    bridge: b.clone(),
                    address,
                })
            }
            None => None,
        };
        let dir = self.dir(&req.name);
        std::fs::create_dir_all(self.base.join("containers"))
            .map_err(|e| ContainerError::io("create the containers directory", e))?;
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ContainerError::Exists {
                    id: req.name.clone(),
                    dir,
                })
            }
            Err(e) => return Err(ContainerError::io(format!("create {}", dir.display()), e)),
        }
        let cfg = CtConfig {
            name: req.name.clone(),
            template: req.template.clone(),
            memory: req.memory,
            cpus: req.cpus,
            pids: req.pids,
            cpu_weight: req.cpu_weight,
            net,
            created: crate::util::rfc3339_now(),
        };
        let r = (|| -> Result<(), ContainerError> {
            for d in ["rootfs", "upper", "work"] {
                std::fs::create_dir(dir.join(d))
                    .map_err(|e| ContainerError::io(format!("mkdir {d}"), e))?;
            }
            std::fs::write(dir.join("lower"), lower.as_os_str().as_encoded_bytes())
                .map_err(|e| ContainerError::io("write lower", e))?;
            fill(&dir.join("upper"))?;
            self.write_bundle(&cfg)?;
            self.save_config(&cfg)
        })();
        if let Err(e) = r {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(cfg)
    }

    /// Writes ct.json atomically (a crash leaves the old or the new one).
    pub fn save_config(&self, cfg: &CtConfig) -> Result<(), ContainerError> {
        let dir = self.dir(&cfg.name);
        let tmp = dir.join(".ct.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(cfg).unwrap_or_default())
            .map_err(|e| ContainerError::io("write ct.json", e))?;
        std::fs::rename(&tmp, dir.join("ct.json"))
            .map_err(|e| ContainerError::io("write ct.json", e))
    }

    /// (Re)generates the OCI bundle config from ct.json, so changed limits and a new home (an
    /// imported container) take effect at the next start.
    fn write_bundle(&self, cfg: &CtConfig) -> Result<(), ContainerError> {
        let dir = self.dir(&cfg.name);
        let lower = std::fs::read_to_string(dir.join("lower"))
            .map_err(|e| ContainerError::io("read lower", e))?;
        let spec = bundle_config(cfg, Path::new(&lower), &self.cgroup_parent);
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec_pretty(&spec).unwrap_or_default(),
        )
        .map_err(|e| ContainerError::io("write config.json", e))
    }

    /// Changes limits: kept in ct.json for the next start and, while the container runs,
    /// written to its cgroup at once. `None` leaves a limit as it is; `Some(None)` removes it.
    pub fn set_limits(&self, name: &str, l: &LimitChange) -> Result<CtConfig, ContainerError> {
        let mut cfg = self.load(name)?;
        if let Some(m) = l.memory {
            cfg.memory = m;
        }
        if let Some(c) = l.cpus {
            if let Some(c) = c {
                if !(c > 0.0 && c <= 1024.0) {
                    return Err(ct_err(format!("CPU quota {c} CPUs: use a positive number")));
                }
            }
            cfg.cpus = c;
        }
        if let Some(w) = l.cpu_weight {
            if let Some(w) = w {
                if !(1..=10_000).contains(&w) {
                    return Err(ct_err(format!(
                        "CPU weight {w}: use 1..10000 (100 = default)"
                    )));
                }
            }
            cfg.cpu_weight = w;
        }
        if let Some(p) = l.pids {
            cfg.pids = p;
        }
        if let Some(st) = self
            .status(name)
            .filter(|s| s.oci.status != Status::Stopped)
        {
            use crate::cgroups::CgroupManager;
            // Removing a limit writes the "no limit" value: the cgroup files keep the old one
            // otherwise.
            let res = json!({
                "memory": {"limit": cfg.memory.unwrap_or(-1)},
                "cpu": {
                    "quota": cfg.cpus.map_or(-1, |c| (c * 100_000.0) as i64),
                    "period": 100_000,
                    "shares": weight_to_shares(cfg.cpu_weight),
                },
                "pids": {"limit": cfg.pids.unwrap_or(-1)},
            });
            let res: oci_spec::runtime::LinuxResources = serde_json::from_value(res)
                .map_err(|e| ct_err(format!("limits do not form valid resources: {e}")))?;
            crate::cgroups::manager(&st.cgroup)?.update(&res)?;
        }
        self.save_config(&cfg)?;
        Ok(cfg)
    }

    fn status(&self, name: &str) -> Option<crate::state::ContainerState> {
        crate::container_state::load(&self.run_root(), name).ok()
    }

    /// Mounts the overlay on `rootfs` (no-op when mounted).
    pub fn mount_rootfs(&self, name: &str) -> Result<(), ContainerError> {
        let dir = self.dir(name);
        let lower = std::fs::read_to_string(dir.join("lower"))
            .map_err(|e| ContainerError::io("read lower", e))?;
        let rootfs = dir.join("rootfs");
        if is_mountpoint(&rootfs) {
            return Ok(());
        }
        let data = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            dir.join("upper").display(),
            dir.join("work").display()
        );
        mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(|e| ContainerError::sys(format!("mount overlay on {}", rootfs.display()), e))
    }

    /// Unmounts the overlay (lazily: a straggler holding it open does not fail the caller).
    pub fn unmount_rootfs(&self, name: &str) {
        let rootfs = self.dir(name).join("rootfs");
        if is_mountpoint(&rootfs) {
            let _ = umount2(&rootfs, MntFlags::MNT_DETACH);
        }
    }

    /// Removes what a run leaves (runtime state, cgroup, netns and veth, the overlay mount).
    pub fn cleanup(&self, name: &str) -> Result<(), ContainerError> {
        let cfg = self.load(name)?;
        self.teardown(name, &cfg);
        Ok(())
    }

    fn teardown(&self, name: &str, cfg: &CtConfig) {
        let _ = crate::container_delete::delete(&self.run_root(), name, true);
        if cfg.net.is_some() {
            crate::network::detach(name);
        }
        let rootfs = self.dir(name).join("rootfs");
        if is_mountpoint(&rootfs) {
            let _ = umount2(&rootfs, MntFlags::MNT_DETACH);
        }
    }

    pub fn start(&self, name: &str) -> Result<i32, ContainerError> {
        let cfg = self.load(name)?;
        if let Some(st) = self.status(name) {
            if st.oci.status != Status::Stopped {
                return Err(ContainerError::WrongStatus {
                    id: name.into(),
                    status: st.oci.status.to_string(),
                    what: "it is already started".into(),
                });
            }
        }
        // A container that stopped by itself still has its runtime state: clear it first.
        self.teardown(name, &cfg);
        let r = (|| -> Result<i32, ContainerError> {
            self.write_bundle(&cfg)?;
            self.mount_rootfs(name)?;
            if let Some(n) = &cfg.net {
                crate::network::attach(&n.bridge, name, n.address)
                    .map_err(|e| ct_err(e.to_string()))?;
            }
            let dir = self.dir(name);
            let terminal = std::fs::read(dir.join("config.json"))
                .ok()
                .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
                .is_some_and(|v| v["process"]["terminal"] == json!(true));
            let mut opts = crate::container_create::CreateOptions {
                id: name.into(),
                bundle: dir.clone(),
                state_root: self.run_root(),
                ..Default::default()
            };
            if terminal {
                opts.console_fd = Some(Arc::new(crate::monitor::spawn(&dir)?));
            } else {
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("console.log"))
                    .map_err(|e| ContainerError::io("open console.log", e))?;
                opts.stdio = Some(Arc::new(OwnedFd::from(log)));
            }
            let st = crate::container_create::create(&opts)?;
            crate::container_start::start(&self.run_root(), name)?;
            Ok(st.oci.pid)
        })();
        if r.is_err() {
            self.teardown(name, &cfg);
        }
        r
    }

    /// SIGTERM to the init, SIGKILL after `timeout`, then the runtime state, netns and overlay go.
    pub fn stop(&self, name: &str, timeout: Duration) -> Result<(), ContainerError> {
        let cfg = self.load(name)?;
        match self.status(name) {
            Some(st) if st.oci.status == Status::Running || st.oci.status == Status::Paused => {
                if st.oci.status == Status::Paused {
                    let _ = crate::container_pause::resume(&self.run_root(), name);
                }
                let _ = crate::container_kill::kill(&self.run_root(), name, libc::SIGTERM, false);
                if !crate::container_delete::wait_exit(st.oci.pid, timeout) {
                    let _ =
                        crate::container_kill::kill(&self.run_root(), name, libc::SIGKILL, false);
                    crate::container_delete::wait_exit(st.oci.pid, Duration::from_secs(5));
                }
            }
            Some(_) => {}
            None => {
                return Err(ContainerError::WrongStatus {
                    id: name.into(),
                    status: "stopped".into(),
                    what: "nothing to stop".into(),
                })
            }
        }
        self.teardown(name, &cfg);
        Ok(())
    }

    pub fn exec(&self, name: &str, cmd: &[String]) -> Result<i32, ContainerError> {
        self.load(name)?;
        let opts = crate::container_exec::ExecOptions {
            args: cmd.to_vec(),
            ..Default::default()
        };
        crate::container_exec::exec(&self.run_root(), name, &opts)
    }

    pub fn delete(&self, name: &str, force: bool) -> Result<(), ContainerError> {
        let cfg = self.load(name)?;
        if let Some(st) = self.status(name) {
            if st.oci.status != Status::Stopped && !force {
                return Err(ContainerError::WrongStatus {
                    id: name.into(),
                    status: st.oci.status.to_string(),
                    what: "stop it first or use --force".into(),
                });
            }
            self.stop(name, Duration::from_secs(0))?;
        }
        self.teardown(name, &cfg);
        let dir = self.dir(name);
        std::fs::remove_dir_all(&dir)
            .map_err(|e| ContainerError::io(format!("remove {}", dir.display()), e))
    }

    pub fn info(&self, name: &str) -> Result<CtInfo, ContainerError> {
        let config = self.load(name)?;
        let st = self.status(name);
        Ok(CtInfo {
            status: st
                .as_ref()
                .map(|s| s.oci.status.to_string())
                .unwrap_or_else(|| "stopped".into()),
            pid: st
                .as_ref()
                .filter(|s| s.oci.status != Status::Stopped)
                .map(|s| s.oci.pid),
            rootfs: self.dir(name).join("rootfs"),
            config,
        })
    }

    pub fn list(&self) -> Vec<CtInfo> {
        self.names()
            .iter()
            .filter_map(|n| self.info(n).ok())
            .collect()
    }

    pub fn console_socket(&self, name: &str) -> PathBuf {
        self.dir(name).join(crate::monitor::SOCKET)
    }

    pub fn console_log(&self, name: &str) -> PathBuf {
        self.dir(name).join("console.log")
    }
}

/// A change of limits: `None` keeps a limit, `Some(None)` removes it.
#[derive(Debug, Clone, Default)]
pub struct LimitChange {
    pub memory: Option<Option<i64>>,
    pub cpus: Option<Option<f64>>,
    pub cpu_weight: Option<Option<u32>>,
    pub pids: Option<Option<i64>>,
}

/// cgroup v2 weight (1..=10000, default 100) to v1 shares (2..=262144, default 1024); the OCI
/// config carries shares, which the runtime converts back on v2.
pub fn weight_to_shares(weight: Option<u32>) -> u64 {
    (u64::from(weight.unwrap_or(100)) * 1024 / 100).clamp(2, 262_144)
}

fn is_mountpoint(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(p), p.parent().map(std::fs::metadata)) {
        (Ok(a), Some(Ok(b))) => a.dev() != b.dev(),
        _ => false,
    }
}

/// The OCI config of a system container: its own init, a full set of namespaces, a broad (but not
/// full) capability set, and the requested limits.
fn bundle_config(cfg: &CtConfig, lower: &Path, cgroup_parent: &str) -> serde_json::Value {
    let mut spec = serde_json::to_value(crate::spec::default_spec(false)).unwrap_or_default();
    let has_busybox_init = lower.join("etc/inittab").exists() && lower.join("sbin/init").exists();
    let args = if has_busybox_init {
        json!(["/sbin/init"])
    } else {
        json!([
            "/bin/sh",
            "-c",
            "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done"
        ])
    };
    let caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
        "CAP_NET_ADMIN",
        "CAP_SYS_BOOT"
    ]);
    // busybox init runs a shell on its console: give it a pty the console monitor holds.
    spec["process"]["terminal"] = json!(has_busybox_init);
    spec["process"]["args"] = args;
    spec["process"]["env"] = json!([
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "TERM=xterm",
        "container=corefour"
    ]);
    spec["process"]["noNewPrivileges"] = json!(false);
    for set in ["bounding", "effective", "permitted"] {
        spec["process"]["capabilities"][set] = caps.clone();
    }
    spec["process"]["capabilities"]["inheritable"] = json!([]);
    spec["process"]["capabilities"]["ambient"] = json!([]);
    spec["root"] = json!({"path": "rootfs", "readonly": false});
    spec["hostname"] = json!(cfg.name);
    let mut ns = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        json!({"type": "cgroup"}),
    ];
    ns.push(match &cfg.net {
        Some(_) => json!({"type": "network", "path": crate::network::netns_path(&cfg.name)}),
        None => json!({"type": "network"}),
    });
    spec["linux"]["namespaces"] = json!(ns);
    spec["linux"]["cgroupsPath"] = json!(format!("{cgroup_parent}/{}", cfg.name));
    let mut res = json!({});
    if let Some(m) = cfg.memory {
        res["memory"] = json!({"limit": m});
    }
    if let Some(c) = cfg.cpus {
        res["cpu"] = json!({"quota": (c * 100_000.0) as i64, "period": 100_000});
    }
    if cfg.cpu_weight.is_some() {
        res["cpu"]["shares"] = json!(weight_to_shares(cfg.cpu_weight));
    }
    if let Some(p) = cfg.pids {
        res["pids"] = json!({"limit": p});
    }
    spec["linux"]["resources"] = res;
    spec
}
