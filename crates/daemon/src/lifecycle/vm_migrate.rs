//! `POST /v1/vms/{name}/migrate`: live migration between two daemons.
//!
//! The daemons talk over one TCP connection (the target listens with
//! `corefour daemon --migration-listen ADDR:PORT`), one JSON object per line:
//! ```text
//! source daemon                              target daemon
//!                                      <-    CHALLENGE {nonce, auth}
//! (with --migration-key on both: AUTH -> <- PROOF, see `auth`)
//! PREPARE {version, spec, copy_storage,
//!          disks}                      ->    checks name, room, version, disks, MACs
//!                                            (copy_storage: creates empty copies of the
//!                                            announced disks in the VM's dir, see `disks`)
//!                                            makes taps with the guest's MACs in its bridges;
//!                                            spawns `corefour vmm --incoming IP:PORT --config`
//!                                            (its config: local disk paths, taps; registers
//!                                            nothing)
//!                                      <-    READY {vmm_addr} | REFUSE {reason}
//! (the source VMM migrates straight to vmm_addr: PUT /vm/migrate, see corefour_vmm::migration;
//!  with copy_storage it mirrors the disks live in the same stream)
//! COMMIT                               ->    waits until its VMM runs the guest, then registers
//!                                      <-    REGISTERED | REFUSE {reason}
//! or ABORT {reason}                    ->    kills its VMM, removes everything it made
//! ```
//! The VMMs' own handshake decides where the guest runs: the source VMM never resumes once it has
//! sent its COMMIT, and the target VMM never runs before it. So when the daemons' link breaks,
//! the target daemon asks its VMM: if it serves its API the guest runs there and is registered;
//! if it exits or never gets that far, it is killed and its files removed. The target holds the
//! VM name's operation lock from PREPARE to the end, so no create or clone can take the name
//! meanwhile, and nothing appears in its inventory until the guest runs there.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corefour_api::VmCreate;
use hyper::Method;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::watch::Watched;
use super::{remove_dir_if_exists, Daemon, RunHandle};
use crate::error::DaemonError;
use crate::inventory::{Pids, VmRecord};
use crate::names::validate_name;
use crate::shim;

pub mod auth;
mod disks;
pub use auth::{check_listen, KeyError, MigrationKey};
pub use disks::StorageReport;

/// The daemons' migration protocol version (the VMMs' stream has its own).
/// 2: live disk mirroring (PREPARE announces the disks; no SEND_DISKS/DISK messages); the
/// target opens with a CHALLENGE (authentication with a shared key).
pub const MIGRATION_VERSION: u32 = 2;
/// The port `--migration-listen` and `vm migrate --to HOST` use when none is given.
pub const DEFAULT_MIGRATION_PORT: u16 = 4747;
/// The marker in the VM's directory that makes the shim run `vmm --incoming ADDR`.
const INCOMING_MARKER: &str = "incoming-on";
/// A control message longer than this is refused (a spec is a few hundred bytes).
const MAX_LINE: u64 = 1 << 20;
/// How long either daemon waits for the other's next control message, except while the VMMs
/// copy memory (that wait is bounded by the VMMs' own I/O timeouts).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the target waits for its VMM to show whether it runs the guest.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The target daemon: HOST or HOST:PORT (port default 4747).
    pub to: String,
    /// Downtime target for the last copy.
    #[serde(default = "default_downtime")]
    pub max_downtime_ms: u64,
    /// How long one read or write on the VMMs' stream may block before the migration fails.
    #[serde(default)]
    pub io_timeout_ms: Option<u64>,
    /// Copy every writable disk to the target (under its state directory) instead of
    /// expecting shared storage: mirrored while the guest runs.
    #[serde(default)]
    pub copy_storage: bool,
}

fn default_downtime() -> u64 {
    10
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Msg {
    Prepare {
        version: u32,
        /// The sender's corefour version, for the refusal message.
        corefour: String,
        spec: Box<VmCreate>,
        /// The writable disks are mirrored by the VMMs into copies the target creates.
        #[serde(default)]
        copy_storage: bool,
        /// With `copy_storage`: the writable disks' formats and sizes.
        #[serde(default)]
        disks: Vec<disks::MirrorDisk>,
    },
    /// The target's first word: a nonce, and whether it requires the key.
    Challenge {
        nonce: String,
        auth: bool,
    },
    /// The source's answer: its own nonce and HMAC (hex).
    Auth {
        nonce: String,
        mac: String,
    },
    /// The target's proof that it holds the key too.
    Proof {
        mac: String,
    },
    Ready {
        vmm_addr: String,
    },
    Refuse {
        reason: String,
    },
    Commit,
    Abort {
        reason: String,
    },
    Registered,
}

/// Called by the shim: the address the incoming VMM listens on, if this start is a migration.
pub fn take_incoming_marker(vm_dir: &Path) -> Option<String> {
    let p = vm_dir.join(INCOMING_MARKER);
    let text = std::fs::read_to_string(&p).ok()?;
    let _ = std::fs::remove_file(&p);
    let a = text.trim();
    (!a.is_empty()).then(|| a.to_string())
}

/// One control connection, line-framed JSON.
struct Control {
    r: BufReader<tokio::io::ReadHalf<TcpStream>>,
    w: tokio::io::WriteHalf<TcpStream>,
}

#[derive(Debug, thiserror::Error)]
enum ControlError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message ({0})")]
    Malformed(String),
}

impl Control {
    fn new(s: TcpStream) -> Control {
        let _ = s.set_nodelay(true);
        let (r, w) = tokio::io::split(s);
        Control {
            r: BufReader::new(r),
            w,
        }
    }

    async fn send(&mut self, m: &Msg) -> Result<(), ControlError> {
        let mut line = serde_json::to_vec(m).map_err(|e| ControlError::Malformed(e.to_string()))?;
        line.push(b'\n');
        // A cut link blocks a write once the socket's buffer is full (after a disk copy broke
        // off, at once): bounded like every read.
        let write = async {
            self.w.write_all(&line).await?;
            self.w.flush().await
        };
        tokio::time::timeout(CONTROL_TIMEOUT, write)
            .await
            .map_err(|_| ControlError::Timeout(CONTROL_TIMEOUT))??;
        Ok(())
    }

    async fn recv(&mut self, timeout: Duration) -> Result<Msg, ControlError> {
        let mut line = Vec::new();
        let mut limited = (&mut self.r).take(MAX_LINE);
        let read = limited.read_until(b'\n', &mut line);
        let n = tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| ControlError::Timeout(timeout))??;
        if n == 0 {
            return Err(ControlError::Closed);
        }
        if line.last() != Some(&b'\n') {
            return Err(ControlError::Malformed(format!(
                "a line longer than {MAX_LINE} bytes, or cut short"
            )));
        }
        serde_json::from_slice(&line).map_err(|e| ControlError::Malformed(e.to_string()))
    }
}

/// `HOST` or `HOST:PORT` (IPv6 in brackets) with the default port filled in.
fn with_port(to: &str) -> String {
    let has_port = match to.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok() && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    };
    if has_port {
        to.to_string()
    } else {
        format!("{to}:{DEFAULT_MIGRATION_PORT}")
    }
}

/// Bytes the host can still give (MemAvailable), if /proc/meminfo says.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The report `vm migrate` prints.
#[derive(Debug, Serialize)]
pub struct MigrateReport {
    pub name: String,
    pub to: String,
    pub total_ms: f64,
    /// What the VMMs measured: from the source's pause to the target's start.
    pub vmm: serde_json::Value,
    /// Whether the target daemon confirmed that it registered the VM.
    pub target_confirmed: bool,
    /// With `--copy-storage`: what the disk mirror moved and how long the guest was paused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageReport>,
}

impl Daemon {
    /// The source side: moves the running VM `name` to the daemon at `req.to`. Until the VMMs
    /// commit, any failure leaves the VM running here and nothing registered there.
    pub async fn migrate(
        self: &Arc<Self>,
        name: &str,
        req: MigrateRequest,
    ) -> Result<MigrateReport, DaemonError> {
        let t0 = Instant::now();
        let to = with_port(&req.to);
        let g = self.op_lock(name).await;
        let h = self.running_handle(name)?;
        let rec = self.inv.get_vm(name)?;
        if self.cfg.jail {
            return Err(DaemonError::Conflict(
                "migration is not supported for jailed VMMs yet (their network namespace has no \
                 route to the target): run the daemon without --jail"
                    .into(),
            ));
        }
        let refused = |why: String| {
            DaemonError::Conflict(format!(
                "migration of {name:?} to {to} failed, it keeps running here: {why}"
            ))
        };
        let mirrored = if req.copy_storage {
            disks::describe(&rec.spec).map_err(refused)?
        } else {
            Vec::new()
        };
        let stream = tokio::time::timeout(CONTROL_TIMEOUT, TcpStream::connect(&to))
            .await
            .map_err(|_| refused(format!("no connection within {CONTROL_TIMEOUT:?}")))?
            .map_err(|e| {
                refused(format!(
                    "cannot connect to the target daemon ({e}); is it running with \
                     --migration-listen?"
                ))
            })?;
        let mut c = Control::new(stream);
        authenticate_source(&mut c, self.cfg.migration_key.as_ref())
            .await
            .map_err(refused)?;
        let mut spec = rec.spec.clone();
        spec.start = false;
        // The guest keeps its MACs: the target makes its taps with these.
        for (n, nic) in spec.nets.iter_mut().zip(&rec.nics) {
            n.mac = Some(nic.mac.clone());
        }
        c.send(&Msg::Prepare {
            version: MIGRATION_VERSION,
            corefour: env!("CARGO_PKG_VERSION").into(),
            spec: Box::new(spec),
            copy_storage: req.copy_storage,
            disks: mirrored,
        })
        .await
        .map_err(|e| refused(e.to_string()))?;
        let vmm_addr = match c.recv(CONTROL_TIMEOUT).await {
            Ok(Msg::Ready { vmm_addr }) => vmm_addr,
            Ok(Msg::Refuse { reason }) => {
                return Err(refused(format!("the target refused: {reason}")));
            }
            Ok(other) => {
                return Err(refused(format!("the target answered {other:?}")));
            }
            Err(e) => {
                return Err(refused(format!("the target did not get ready: {e}")));
            }
        };
        tracing::info!(vm = name, to, vmm_addr, "target ready; migrating");
        let mut body = serde_json::json!({"to": vmm_addr, "max_downtime_ms": req.max_downtime_ms});
        if let Some(t) = req.io_timeout_ms {
            body["io_timeout_ms"] = t.into();
        }
        if req.copy_storage {
            body["copy_storage"] = true.into();
        }
        let res = crate::client::call(
            &self.api_sock(name),
            Method::PUT,
            "/vm/migrate",
            Some(body.to_string().into_bytes()),
        )
        .await;
        let vmm_report = match res {
            Ok((status, b)) if status.is_success() => {
                serde_json::from_slice::<serde_json::Value>(&b).unwrap_or_default()
            }
            Ok((_, b)) => {
                let why = crate::client::fault_text(&b);
                if why.contains("did not confirm it started") {
                    // The VMMs committed but the confirmation was lost: the target may run the
                    // guest, this VMM stays paused. Let the target's VMM decide.
                    return self.after_unconfirmed(name, &to, &mut c, &h, why).await;
                }
                let _ = c
                    .send(&Msg::Abort {
                        reason: why.clone(),
                    })
                    .await;
                return Err(refused(why));
            }
            Err(e) => {
                let why = format!("the VMM did not answer: {e}");
                let _ = c
                    .send(&Msg::Abort {
                        reason: why.clone(),
                    })
                    .await;
                return Err(refused(why));
            }
        };
        let storage = req
            .copy_storage
            .then(|| StorageReport::from_vmm(&vmm_report));
        // The guest runs on the target now; this VMM exits on its own.
        let confirmed = match c.send(&Msg::Commit).await {
            Ok(()) => match c.recv(CONTROL_TIMEOUT + SETTLE_TIMEOUT).await {
                Ok(Msg::Registered) => true,
                Ok(other) => {
                    tracing::error!(vm = name, "target answered the commit with {other:?}");
                    false
                }
                Err(e) => {
                    tracing::error!(vm = name, "target did not confirm the registration: {e}");
                    false
                }
            },
            Err(e) => {
                tracing::error!(vm = name, "cannot send the commit to the target: {e}");
                false
            }
        };
        self.forget_migrated(name, &h, &to).await;
        drop(g);
        self.forget_lock(name);
        Ok(MigrateReport {
            name: name.to_string(),
            to,
            total_ms: t0.elapsed().as_secs_f64() * 1e3,
            vmm: vmm_report,
            target_confirmed: confirmed,
            storage,
        })
    }

    async fn after_unconfirmed(
        &self,
        name: &str,
        to: &str,
        c: &mut Control,
        h: &RunHandle,
        why: String,
    ) -> Result<MigrateReport, DaemonError> {
        let answer = match c.send(&Msg::Commit).await {
            Ok(()) => c.recv(CONTROL_TIMEOUT + SETTLE_TIMEOUT).await.ok(),
            Err(_) => None,
        };
        if matches!(answer, Some(Msg::Registered)) {
            // The target runs it: the paused copy here goes.
            super::stop::signal(h.vmm_pid, libc::SIGKILL);
            self.forget_migrated(name, h, to).await;
            return Err(DaemonError::Conflict(format!(
                "{name:?} now runs on {to}, but the hand-over was not clean ({why})"
            )));
        }
        Err(DaemonError::Conflict(format!(
            "migration of {name:?} to {to} is undecided: {why}. The VM is paused here; check \
             the target, then resume or kill this copy"
        )))
    }

    /// After the guest moved: wait for this side's VMM to end and remove the VM here.
    async fn forget_migrated(&self, name: &str, h: &RunHandle, to: &str) {
        if !super::stop::wait_done(h, Duration::from_secs(10)).await {
            super::stop::signal(h.vmm_pid, libc::SIGKILL);
            super::stop::wait_done(h, Duration::from_secs(5)).await;
        }
        self.release(name);
        let dir = self.vm_dir(name);
        // A disk inside the VM's directory (a clone's overlay) is the one the target uses now
        // (shared storage): then the directory stays.
        let disk_inside = self
            .inv
            .get_vm(name)
            .map(|r| {
                r.spec
                    .disks
                    .iter()
                    .any(|d| Path::new(&d.path).starts_with(&dir))
            })
            .unwrap_or(false);
        if !disk_inside {
            let _ = remove_dir_if_exists(&dir);
        }
        let _ = self.inv.delete_vm(name);
        let _ = self.inv.add_event(name, "migrated", &format!("to {to}"));
        tracing::info!(vm = name, to, "migrated away");
    }
}

/// Accepts migrations from other daemons until the runtime ends.
pub async fn serve_migrations(d: Arc<Daemon>, listener: tokio::net::TcpListener) {
    loop {
        match listener.accept().await {
            Ok((s, peer)) => {
                let d = Arc::clone(&d);
                tokio::spawn(async move { d.incoming(s, peer.to_string()).await });
            }
            Err(e) => {
                tracing::warn!("migration listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What the target made for one incoming VM, to be registered or removed.
struct Pending {
    rec: VmRecord,
    child: tokio::process::Child,
    pids: Pids,
    cgroup: Option<crate::cgroup::VmCgroup>,
}

impl Daemon {
    async fn incoming(self: Arc<Self>, s: TcpStream, peer: String) {
        let local_ip = s.local_addr().map(|a| a.ip());
        let mut c = Control::new(s);
        if let Err(why) = authenticate_target(&mut c, self.cfg.migration_key.as_ref()).await {
            tracing::warn!(peer, "migration connection refused: {why}");
            let _ = c.send(&Msg::Refuse { reason: why }).await;
            return;
        }
        let (spec, theirs, copy) = match c.recv(CONTROL_TIMEOUT).await {
            Ok(Msg::Prepare {
                version,
                corefour,
                spec,
                copy_storage,
                disks,
            }) => {
                if version != MIGRATION_VERSION {
                    let reason = format!(
                        "migration protocol version {version} (corefour {corefour}) is not \
                         supported here (corefour {} speaks {MIGRATION_VERSION})",
                        env!("CARGO_PKG_VERSION")
                    );
                    let _ = c.send(&Msg::Refuse { reason }).await;
                    return;
                }
                (spec, corefour, copy_storage.then_some(disks))
            }
            Ok(other) => {
                let reason = format!("expected PREPARE, got {other:?}");
                let _ = c.send(&Msg::Refuse { reason }).await;
                return;
            }
            Err(e) => {
                tracing::warn!(peer, "migration connection dropped before PREPARE: {e}");
                return;
            }
        };
        let name = spec.name.clone();
        tracing::info!(vm = name, peer, corefour = theirs, "incoming migration");
        // Held to the end: no create or clone can take the name while the VM is on its way.
        let Ok(_g) = self.try_op_lock(&name) else {
            let reason = format!("VM {name:?} is busy here (another operation holds it)");
            let _ = c.send(&Msg::Refuse { reason }).await;
            return;
        };
        let local_ip = match local_ip {
            Ok(ip) => ip,
            Err(e) => {
                let _ = c
                    .send(&Msg::Refuse {
                        reason: e.to_string(),
                    })
                    .await;
                return;
            }
        };
        let mut p = match self
            .prepare_incoming(*spec, local_ip, copy.as_deref())
            .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::info!(vm = name, "refusing the migration: {e}");
                let _ = c
                    .send(&Msg::Refuse {
                        reason: e.to_string(),
                    })
                    .await;
                return;
            }
        };
        let vmm_addr = p.1.clone();
        if c.send(&Msg::Ready { vmm_addr }).await.is_err() {
            self.discard_incoming(p.0, "the source went away").await;
            return;
        }
        // The VMMs copy memory now; a migration of a big busy guest can take minutes. An
        // incoming VMM that gives up (the stream broke: its reads time out) ends the wait too,
        // even when the same broken link keeps the source's ABORT from arriving.
        let pending = &mut p.0;
        let next = tokio::select! {
            m = c.recv(Duration::from_secs(3600)) => m,
            _ = pending.child.wait() => {
                let tail = super::start::console_tail(&self.vm_dir(&name).join(shim::CONSOLE_LOG));
                self.discard_incoming(p.0, &format!("the incoming VMM ended: {tail}")).await;
                let _ = c.send(&Msg::Refuse { reason: format!("the incoming VMM ended: {tail}") }).await;
                return;
            }
        };
        match next {
            Ok(Msg::Commit) => match self.settle(pending).await {
                Ok(()) => {
                    let r = self.register_incoming(p.0, &peer);
                    let msg = match &r {
                        Ok(()) => Msg::Registered,
                        Err(e) => Msg::Refuse {
                            reason: e.to_string(),
                        },
                    };
                    let _ = c.send(&msg).await;
                }
                Err(why) => {
                    self.discard_incoming(p.0, &why).await;
                    let _ = c.send(&Msg::Refuse { reason: why }).await;
                }
            },
            Ok(Msg::Abort { reason }) => {
                // The source's VMM failed before its COMMIT: this VMM never runs the guest.
                self.discard_incoming(p.0, &format!("the source aborted: {reason}"))
                    .await;
            }
            other => {
                // The link broke or the peer misbehaved: let the VMM say where the guest is.
                let why = match other {
                    Ok(m) => format!("unexpected message {m:?}"),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(vm = name, "migration control link: {why}");
                match self.settle(pending).await {
                    Ok(()) => {
                        if let Err(e) = self.register_incoming(p.0, &peer) {
                            tracing::error!(vm = name, "cannot register the migrated VM: {e}");
                        }
                    }
                    Err(w) => self.discard_incoming(p.0, &format!("{why}; {w}")).await,
                }
            }
        }
    }

    fn try_op_lock(&self, name: &str) -> Result<tokio::sync::OwnedMutexGuard<()>, ()> {
        let m = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(name.to_string()).or_default().clone()
        };
        m.try_lock_owned().map_err(|_| ())
    }

    /// Checks the target can take the VM and starts its VMM waiting for the memory.
    /// With `copy` (the disks the source mirrors) empty copies of the writable disks are made
    /// in the VM's directory, and the VM's config points at them.
    async fn prepare_incoming(
        &self,
        mut spec: VmCreate,
        local_ip: std::net::IpAddr,
        copy: Option<&[disks::MirrorDisk]>,
    ) -> Result<(Pending, String), DaemonError> {
        validate_name(&spec.name)?;
        let name = spec.name.clone();
        if self.inv.get_vm(&name).is_ok() {
            return Err(DaemonError::Conflict(format!(
                "a VM named {name:?} already exists on this host"
            )));
        }
        if self.cfg.jail {
            return Err(DaemonError::Conflict(
                "this daemon jails its VMMs; incoming migration is not supported with --jail"
                    .into(),
            ));
        }
        let mut macs_here = std::collections::HashSet::new();
        for v in self.inv.list_vms()? {
            macs_here.extend(v.nics.into_iter().map(|n| n.mac));
        }
        for n in &spec.nets {
            let Some(mac) = &n.mac else {
                return Err(DaemonError::Conflict(
                    "a NIC comes without its MAC (the source must send the guest's MACs)".into(),
                ));
            };
            if macs_here.contains(mac) {
                return Err(DaemonError::Conflict(format!(
                    "MAC {mac} is already used by a VM on this host"
                )));
            }
        }
        let need = (spec.memory_mib << 20) + super::start::memory_overhead_bytes(spec.memory_mib);
        if let Some(avail) = mem_available() {
            if avail < need {
                return Err(DaemonError::Conflict(format!(
                    "no room: the VM needs {} MiB, this host has {} MiB available",
                    need >> 20,
                    avail >> 20
                )));
            }
        }
        // Shared storage: every file the VM uses must be at the same path here.
        let mut files: Vec<(&str, &str)> = vec![("kernel", spec.kernel.as_str())];
        if let Some(i) = &spec.initrd {
            files.push(("initrd", i.as_str()));
        }
        for d in &spec.disks {
            if copy.is_none() || d.read_only {
                files.push(("disk", d.path.as_str()));
            }
        }
        for (what, path) in files {
            if !Path::new(path).is_file() {
                return Err(DaemonError::Conflict(format!(
                    "{what} {path} does not exist on this host (migration expects shared \
                     storage at the same path)"
                )));
            }
        }
        // A port for the incoming VMM, on the address the source reached this daemon at.
        let port = std::net::TcpListener::bind((local_ip, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| DaemonError::io("cannot find a free port for the incoming VMM", e))?
            .port();
        let vmm_addr = std::net::SocketAddr::new(local_ip, port).to_string();
        let dir = self.vm_dir(&name);
        // Left by a delete or migration that crashed half way: it belongs to nobody.
        remove_dir_if_exists(&dir)?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| DaemonError::io(format!("cannot create {}", dir.display()), e))?;
        let undo = |e: DaemonError| {
            let _ = remove_dir_if_exists(&dir);
            e
        };
        if let Some(announced) = copy {
            if let Err(why) = disks::create_copies(announced, &mut spec, &dir) {
                return Err(undo(DaemonError::Conflict(format!(
                    "cannot make the disk copies: {why}"
                ))));
            }
        }
        // Taps named for the incoming VMM's port until the record (and its tap names) exists.
        let nics: Vec<corefour_api::VmNic> = spec
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| corefour_api::VmNic {
                bridge: n.bridge.clone(),
                tap: format!("c4in{port}n{i}"),
                mac: n.mac.clone().unwrap_or_default(),
                rate_limit: n.rate_limit.clone(),
            })
            .collect();
        for (i, nic) in nics.iter().enumerate() {
            if let Err(e) = crate::network::create_tap(&nic.tap, &nic.bridge, None) {
                nics[..i]
                    .iter()
                    .for_each(|n| crate::network::delete_tap(&n.tap));
                return Err(undo(e.into()));
            }
        }
        let undo = |e: DaemonError| {
            nics.iter().for_each(|n| crate::network::delete_tap(&n.tap));
            undo(e)
        };
        let rec = VmRecord {
            id: 0,
            name: name.clone(),
            state: corefour_api::VmState::Created,
            spec,
            nics: nics.clone(),
            pids: None,
            stop_reason: None,
            exit_code: None,
            created_ms: crate::inventory::now_ms(),
        };
        let cfg_path = dir.join(shim::CONFIG_FILE);
        std::fs::write(&cfg_path, crate::vmm_config::render(&rec)).map_err(|e| {
            undo(DaemonError::io(
                format!("cannot write {}", cfg_path.display()),
                e,
            ))
        })?;
        std::fs::write(dir.join(INCOMING_MARKER), &vmm_addr).map_err(|e| {
            undo(DaemonError::io(
                format!("cannot write {}", dir.join(INCOMING_MARKER).display()),
                e,
            ))
        })?;
        let cgroup = self.make_cgroup(&rec).map_err(undo)?;
        match self.spawn_shim(&dir, cgroup.as_ref(), None).await {
            Ok((child, pids)) => Ok((
                Pending {
                    rec,
                    child,
                    pids,
                    cgroup,
                },
                vmm_addr,
            )),
            Err(e) => {
                if let Some(c) = &cgroup {
                    c.remove();
                }
                Err(undo(e))
            }
        }
    }

    /// Waits until the incoming VMM either serves its API (it runs the guest: Ok) or ends.
    async fn settle(&self, p: &mut Pending) -> Result<(), String> {
        let sock = self.api_sock(&p.rec.name);
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            if let Ok((status, body)) = crate::client::call(&sock, Method::GET, "/vm", None).await {
                if status.is_success() {
                    return Ok(());
                }
                return Err(format!(
                    "the incoming VMM answered {status}: {}",
                    crate::client::fault_text(&body)
                ));
            }
            if let Ok(Some(_)) = p.child.try_wait() {
                let tail =
                    super::start::console_tail(&self.vm_dir(&p.rec.name).join(shim::CONSOLE_LOG));
                return Err(format!("the incoming VMM exited: {tail}"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the incoming VMM did not start the guest within {SETTLE_TIMEOUT:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The guest runs here: record the VM as running, as `start` would have.
    fn register_incoming(self: &Arc<Self>, p: Pending, peer: &str) -> Result<(), DaemonError> {
        let name = p.rec.name.clone();
        let mut spec = p.rec.spec.clone();
        spec.start = false;
        if let Err(e) = self
            .inv
            .insert_vm(&spec)
            .and_then(|_| self.inv.set_running(&name, p.pids))
        {
            // The guest runs but cannot be recorded: keep it watched so its exit is cleaned up.
            tracing::error!(vm = name, "cannot record the migrated VM: {e}");
            return Err(e.into());
        }
        // The taps take the names the record gave them (a rename keeps the VMM's open fd).
        if let Ok(r) = self.inv.get_vm(&name) {
            for (from, to) in p.rec.nics.iter().zip(&r.nics) {
                if let Err(e) = rename_link(&from.tap, &to.tap) {
                    tracing::error!(
                        vm = name,
                        "cannot rename tap {} to {}: {e}",
                        from.tap,
                        to.tap
                    );
                }
            }
        }
        let (tx, rx) = tokio::sync::watch::channel(false);
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                name.clone(),
                RunHandle {
                    vmm_pid: p.pids.vmm_pid,
                    done: rx,
                },
            );
        self.spawn_watcher(name.clone(), Watched::Child(p.child), tx);
        super::pin::spawn_pinner(
            name.clone(),
            p.pids.vmm_pid,
            spec.cpu_pin.clone(),
            spec.vcpus,
        );
        let _ = self
            .inv
            .add_event(&name, "migrated", &format!("from {peer}"));
        tracing::info!(
            vm = name,
            vmm_pid = p.pids.vmm_pid,
            peer,
            "migrated in; running"
        );
        Ok(())
    }

    /// Kills the incoming VMM and removes all it left: nothing of the VM stays here.
    async fn discard_incoming(&self, mut p: Pending, why: &str) {
        let name = p.rec.name.clone();
        super::stop::signal(p.pids.vmm_pid, libc::SIGKILL);
        let _ = tokio::time::timeout(Duration::from_secs(10), p.child.wait()).await;
        if let Some(c) = &p.cgroup {
            c.remove();
        }
        for nic in &p.rec.nics {
            crate::network::delete_tap(&nic.tap);
        }
        let _ = remove_dir_if_exists(&self.vm_dir(&name));
        tracing::info!(vm = name, "incoming migration dropped: {why}");
    }
}

/// The source's half of the authentication (see `auth`): Ok once PREPARE may follow.
async fn authenticate_source(c: &mut Control, key: Option<&MigrationKey>) -> Result<(), String> {
    let (nonce_t, auth) = match c.recv(CONTROL_TIMEOUT).await {
        Ok(Msg::Challenge { nonce, auth }) => match auth::unhex(&nonce) {
            Some(n) if n.len() == auth::NONCE => (n, auth),
            _ => return Err("the target sent a malformed challenge".into()),
        },
        Ok(Msg::Refuse { reason }) => return Err(format!("the target refused: {reason}")),
        Ok(other) => {
            return Err(format!(
                "the target opened with {other:?}, not a challenge (an older corefour?)"
            ))
        }
        Err(e) => return Err(format!("the target did not answer: {e}")),
    };
    let refusal = match (key, auth) {
        (None, false) => return Ok(()),
        (Some(k), true) => Ok(k),
        (None, true) => Err(
            "the target accepts only authenticated migrations: start this \
                             daemon with --migration-key FILE (the same secret as the target's)",
        ),
        (Some(_), false) => Err("the target does not authenticate (it runs without \
                                 --migration-key): this daemon sends VMs only to a peer that \
                                 proves the key"),
    };
    let key = match refusal {
        Ok(k) => k,
        Err(why) => {
            // Tell the target too, so its log says why the connection ended.
            let reason = why.to_string();
            let _ = c.send(&Msg::Abort { reason }).await;
            return Err(why.into());
        }
    };
    let nonce_s = auth::nonce().map_err(|e| format!("cannot make a nonce: {e}"))?;
    let mac = key.source_mac(&nonce_t, &nonce_s);
    c.send(&Msg::Auth {
        nonce: auth::hex(&nonce_s),
        mac: auth::hex(&mac),
    })
    .await
    .map_err(|e| e.to_string())?;
    match c.recv(CONTROL_TIMEOUT).await {
        Ok(Msg::Proof { mac }) => {
            if auth::unhex(&mac).is_some_and(|m| key.check_target(&nonce_s, &nonce_t, &m)) {
                Ok(())
            } else {
                Err(
                    "the target could not prove the migration key: its --migration-key \
                     differs"
                        .into(),
                )
            }
        }
        Ok(Msg::Refuse { reason }) => Err(format!("the target refused: {reason}")),
        Ok(other) => Err(format!("the target answered {other:?} instead of a proof")),
        Err(e) => Err(format!("the target did not answer: {e}")),
    }
}

/// The target's half: a challenge, then (with a key) the source's answer checked and the
/// proof sent. Ok once PREPARE may follow; Err is the reason to refuse with.
async fn authenticate_target(c: &mut Control, key: Option<&MigrationKey>) -> Result<(), String> {
    let nonce_t = auth::nonce().map_err(|e| format!("cannot make a nonce: {e}"))?;
    c.send(&Msg::Challenge {
        nonce: auth::hex(&nonce_t),
        auth: key.is_some(),
    })
    .await
    .map_err(|e| e.to_string())?;
    let Some(key) = key else {
        return Ok(());
    };
    let (nonce_s, mac) = match c.recv(CONTROL_TIMEOUT).await {
        Ok(Msg::Auth { nonce, mac }) => (nonce, mac),
        Ok(Msg::Prepare { .. }) => {
            return Err(
                "this daemon accepts only authenticated migrations: start the source \
                        daemon with --migration-key FILE (the same secret as this one's)"
                    .into(),
            )
        }
        Ok(Msg::Abort { reason }) => return Err(format!("the source gave up: {reason}")),
        Ok(other) => return Err(format!("expected AUTH, got {other:?}")),
        Err(e) => return Err(format!("no authentication: {e}")),
    };
    let nonce_s = match auth::unhex(&nonce_s) {
        Some(n) if n.len() == auth::NONCE && n != nonce_t => n,
        _ => return Err("authentication failed: a malformed nonce".into()),
    };
    if !auth::unhex(&mac).is_some_and(|m| key.check_source(&nonce_t, &nonce_s, &m)) {
        return Err(
            "authentication failed: the source's --migration-key differs from this daemon's".into(),
        );
    }
    c.send(&Msg::Proof {
        mac: auth::hex(&key.target_mac(&nonce_s, &nonce_t)),
    })
    .await
    .map_err(|e| e.to_string())
}

/// Renames a network link (down, rename, up: Linux renames only links that are down).
fn rename_link(from: &str, to: &str) -> Result<(), String> {
    if from == to {
        return Ok(());
    }
    crate::network::validate_ifname(to).map_err(|e| e.to_string())?;
    for args in [
        vec!["link", "set", "dev", from, "down"],
        vec!["link", "set", "dev", from, "name", to],
        vec!["link", "set", "dev", to, "up"],
    ] {
        let o = std::process::Command::new("ip")
            .args(&args)
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_port_is_added_only_when_missing() {
        assert_eq!(with_port("10.0.0.2"), "10.0.0.2:4747");
        assert_eq!(with_port("10.0.0.2:9000"), "10.0.0.2:9000");
        assert_eq!(with_port("host.example"), "host.example:4747");
        assert_eq!(with_port("[::1]:80"), "[::1]:80");
        assert_eq!(with_port("[::1]"), "[::1]:4747");
    }

    #[test]
    fn control_messages_round_trip_and_reject_junk() {
        let m = Msg::Ready {
            vmm_addr: "1.2.3.4:5".into(),
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(s, r#"{"op":"ready","vmm_addr":"1.2.3.4:5"}"#);
        assert!(matches!(
            serde_json::from_str::<Msg>(&s).unwrap(),
            Msg::Ready { .. }
        ));
        assert!(serde_json::from_str::<Msg>(r#"{"op":"launch"}"#).is_err());
        assert!(serde_json::from_str::<Msg>(r#"{"op":"abort","reason":"r","x":1}"#).is_err());
    }

    /// Runs both halves of the authentication over loopback: (source's, target's) result.
    async fn handshake(
        src: Option<MigrationKey>,
        dst: Option<MigrationKey>,
    ) -> (Result<(), String>, Result<(), String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let target = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut c = Control::new(s);
            let r = authenticate_target(&mut c, dst.as_ref()).await;
            if let Err(why) = &r {
                let _ = c
                    .send(&Msg::Refuse {
                        reason: why.clone(),
                    })
                    .await;
            }
            r
        });
        let mut c = Control::new(TcpStream::connect(addr).await.unwrap());
        let s = authenticate_source(&mut c, src.as_ref()).await;
        if s.is_ok() && src.is_none() {
            // Without keys the source goes straight to PREPARE.
            let _ = c
                .send(&Msg::Abort {
                    reason: "test".into(),
                })
                .await;
        }
        drop(c);
        (s, target.await.unwrap())
    }

    #[tokio::test]
    async fn daemons_authenticate_each_other_with_the_shared_key() {
        let k = || Some(MigrationKey::from_bytes(b"the shared migration secret"));
        let other = || Some(MigrationKey::from_bytes(b"another migration secret!"));
        let (s, t) = handshake(k(), k()).await;
        assert!(s.is_ok() && t.is_ok(), "{s:?} {t:?}");
        let (s, t) = handshake(None, None).await;
        assert!(s.is_ok() && t.is_ok(), "{s:?} {t:?}");
        let (s, t) = handshake(other(), k()).await;
        assert!(t.unwrap_err().contains("differs"));
        assert!(s.unwrap_err().contains("differs"));
        let (s, _) = handshake(k(), None).await;
        assert!(s.unwrap_err().contains("does not authenticate"));
        let (s, _) = handshake(None, k()).await;
        assert!(s.unwrap_err().contains("--migration-key"));
    }

    #[tokio::test]
    async fn an_overlong_or_cut_line_is_refused() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(br#"{"op":"commit"}"#).await.unwrap();
            s.write_all(b"\n{\"op\":\"abo").await.unwrap();
        });
        let (s, _) = l.accept().await.unwrap();
        let mut c = Control::new(s);
        assert!(matches!(
            c.recv(Duration::from_secs(5)).await.unwrap(),
            Msg::Commit
        ));
        writer.await.unwrap();
        assert!(matches!(
            c.recv(Duration::from_secs(5)).await,
            Err(ControlError::Malformed(_))
        ));
    }
}
