//! `corefour vm migrate` between two daemons, each in its own `ip netns` test host, joined by a
//! veth pair (created and removed here): the counter guest continues on the target without a
//! gap or repeat; a link cut mid-migration leaves the source running and the target clean; a
//! name clash on the target is refused with the VM untouched on both sides; with
//! `--copy-storage` a disk-writing guest moves onto the target's own copy of its disk, mirrored
//! while it runs, and the copy equals the source's disk at the hand-over. The daemons share a
//! `--migration-key`; a source without it, or with another, is refused, and a daemon will not
//! listen on a non-loopback address without one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corefour_daemon::client::Method;
use serde_json::{json, Value};

#[path = "common/daemon.rs"]
mod harness;
use harness::*;

#[path = "common/guests.rs"]
mod guests;
use guests::{counts, without_vmm_lines};

/// Why these tests cannot run here, if they cannot.
fn missing() -> Option<String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!("/dev/kvm is not usable ({e})"));
    }
    if !is_root() {
        return Some("network namespaces need root".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => {}
        _ => return Some("`ip` (iproute2) is not installed".into()),
    }
    if guest("counter").is_none() || guest("dirtier").is_none() || guest("vblkloop").is_none() {
        return Some("guests not built (make -C guests)".into());
    }
    None
}

macro_rules! need {
    () => {
        if let Some(why) = missing() {
            eprintln!("SKIP: {why}");
            return;
        }
    };
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Two test hosts: namespaces `a` (10.98.N.1) and `b` (10.98.N.2) joined by a veth pair, a
/// daemon in each, `b`'s listening for migrations.
struct Hosts {
    ns_a: String,
    ns_b: String,
    veth_a: String,
    addr_b: String,
    a: Daemon,
    b: Daemon,
}

/// A migration key file (mode 0600) holding `secret`.
fn key_file(dir: &Path, secret: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(format!("key-{}", secret.len()));
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

const SECRET: &str = "a shared secret for both test hosts";

fn daemon_in(ns: &str, tag: &str, listen: Option<&str>, key: Option<&str>) -> Daemon {
    let dir = TempDir::new(tag);
    let key = key.map(|k| key_file(&dir.0, k));
    let sock = dir.0.join("d.sock");
    let mut d = Daemon {
        dir,
        sock,
        child: None,
        vmm_binary: None,
        extra: Vec::new(),
        client: corefour_daemon::client::blocking::Client::new().unwrap(),
    };
    let log = std::fs::File::create(d.dir.0.join("daemon.log")).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, EXE, "daemon", "--log-level", "debug"])
        .arg("--socket")
        .arg(&d.sock)
        .arg("--state-dir")
        .arg(d.state_dir())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    if let Some(l) = listen {
        cmd.args(["--migration-listen", l]);
    }
    if let Some(k) = &key {
        cmd.arg("--migration-key").arg(k);
    }
    // `ip netns exec` execs the daemon: this child is the daemon itself.
    d.child = Some(cmd.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&d.sock).is_err() {
        if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("daemon exited with {st}: {}", d.log());
        }
        assert!(
            Instant::now() < deadline,
            "daemon did not listen: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    d
}

impl Hosts {
    fn new(tag: &str, n: u8) -> Hosts {
        let id = format!("{tag}{}", std::process::id() % 100000);
        let (ns_a, ns_b) = (format!("c4da{id}"), format!("c4db{id}"));
        let (va, vb) = (format!("dva{id}"), format!("dvb{id}"));
        ip(&["netns", "add", &ns_a]);
        ip(&["netns", "add", &ns_b]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &ns_a]);
        ip(&["link", "set", &vb, "netns", &ns_b]);
        ip(&[
            "-n",
            &ns_a,
            "addr",
            "add",
            &format!("10.98.{n}.1/24"),
            "dev",
            &va,
        ]);
        ip(&[
            "-n",
            &ns_b,
            "addr",
            "add",
            &format!("10.98.{n}.2/24"),
            "dev",
            &vb,
        ]);
        for (ns, dev) in [(&ns_a, &va), (&ns_b, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let addr_b = format!("10.98.{n}.2");
        let a = daemon_in(&ns_a, &format!("{tag}a"), None, Some(SECRET));
        let b = daemon_in(
            &ns_b,
            &format!("{tag}b"),
            Some(&format!("{addr_b}:4747")),
            Some(SECRET),
        );
        Hosts {
            ns_a,
            ns_b,
            veth_a: va,
            addr_b,
            a,
            b,
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // The daemons' own Drop (after this) deletes their VMs; a namespace lives on until its
        // last process has left it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns_a])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns_b])
            .status();
    }
}

/// `corefour vm console --follow`: everything the VM prints until its VMM ends here.
fn follow(d: &Daemon, name: &str) -> Child {
    Command::new(EXE)
        .args(["vm", "console", "--follow", name])
        .env("COREFOUR_SOCKET", &d.sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn start_vm(d: &Daemon, name: &str, kernel: &Path, cmdline: &str, mem: u64) {
    d.ok(
        Method::POST,
        "/v1/vms",
        Some(
            &json!({"name": name, "kernel": kernel, "cmdline": cmdline, "memory_mib": mem,
                    "start": true})
            .to_string(),
        ),
    );
}

fn start_vm_with_disk(d: &Daemon, name: &str, kernel: &Path, cmdline: &str, disk: &Path) {
    d.ok(
        Method::POST,
        "/v1/vms",
        Some(
            &json!({"name": name, "kernel": kernel, "cmdline": cmdline,
                    "disks": [{"path": disk}], "start": true})
            .to_string(),
        ),
    );
}

/// Waits until the target daemon has nothing of VM `name` left: no record, no directory.
fn assert_clean(b: &Daemon, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(40);
    let dir: PathBuf = b.state_dir().join("vms").join(name);
    while dir.exists() {
        assert!(
            Instant::now() < deadline,
            "the target kept {}: {:?}\n{}",
            dir.display(),
            std::fs::read_dir(&dir).map(|d| d.count()),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(b.req(Method::GET, &format!("/v1/vms/{name}"), None).0, 404);
}

#[test]
fn counter_moves_between_daemons_without_gap_or_repeat() {
    need!();
    let h = Hosts::new("m", 81);
    let counter = guest("counter").unwrap();
    // Shared storage: both test hosts see the same file system, so the disk is at the same path.
    let disk = h.a.dir.0.join("shared.raw");
    std::fs::write(&disk, vec![0x42u8; 1 << 20]).unwrap();
    start_vm_with_disk(&h.a, "c", &counter, "spin=1000000", &disk);
    wait_console_until(&h.a, "c", |t| counts(t).len() >= 5);
    let mut follower = follow(&h.a, "c");
    let out = h.a.cli(&[
        "--json",
        "migrate",
        "c",
        "--to",
        &h.addr_b,
        "--max-downtime",
        "10ms",
    ]);
    assert!(
        out.status.success(),
        "{}\nsource:\n{}\ntarget:\n{}",
        String::from_utf8_lossy(&out.stderr),
        h.a.log(),
        h.b.log()
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["target_confirmed"], true, "{report}");
    assert!(
        report["vmm"]["downtime_ms"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    // Gone here, running there.
    assert_eq!(h.a.req(Method::GET, "/v1/vms/c", None).0, 404);
    assert!(!h.a.state_dir().join("vms/c").exists());
    let v = h.b.ok(Method::GET, "/v1/vms/c", None);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["disks"][0]["path"], disk.to_str().unwrap(), "{v}");
    assert!(disk.exists(), "the source must not delete shared storage");
    let events = h.b.ok(Method::GET, "/v1/events", None);
    assert!(events.to_string().contains("migrated"), "{events}");
    // The source's output up to its last instruction, then the target's: one count.
    let mut before = String::new();
    std::io::Read::read_to_string(follower.stdout.as_mut().unwrap(), &mut before).unwrap();
    follower.wait().unwrap();
    let after = wait_console_until(&h.b, "c", |t| counts(t).len() >= 3);
    let joined = without_vmm_lines(&format!("{before}{after}"));
    assert!(!joined.contains("MISMATCH"), "{joined}");
    let c = counts(&joined);
    assert!(c.len() > counts(&before).len() + 2, "{joined}");
    assert!(
        c.windows(2).all(|w| w[1] == w[0] + 1),
        "the count has a gap or repeat:\n{joined}"
    );
    // The target manages it like any VM of its own.
    let out = h.b.cli(&["stop", "c", "--timeout", "2s"]);
    assert!(out.status.success(), "{out:?}");
    h.b.wait_state("c", "stopped", Duration::from_secs(10));
}

#[test]
fn cutting_the_link_mid_migration_keeps_the_source_and_leaves_the_target_clean() {
    need!();
    let h = Hosts::new("c", 82);
    let dirtier = guest("dirtier").unwrap();
    start_vm(&h.a, "d", &dirtier, "ws=400 spin=0", 512);
    wait_console_until(&h.a, "d", |t| t.contains("dirtier: pass"));
    let ns_a = h.ns_a.clone();
    let veth = h.veth_a.clone();
    let cutter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        ip(&["-n", &ns_a, "link", "set", &veth, "down"]);
    });
    let (status, body) = h.a.req(
        Method::POST,
        "/v1/vms/d/migrate",
        Some(&json!({"to": h.addr_b, "max_downtime_ms": 0, "io_timeout_ms": 1500}).to_string()),
    );
    cutter.join().unwrap();
    assert_eq!(status, 409, "{body}\n{}", h.a.log());
    assert!(body.to_string().contains("keeps running here"), "{body}");
    // The source runs on: state, and more passes on its console.
    let v = h.a.ok(Method::GET, "/v1/vms/d", None);
    assert_eq!(v["state"], "running", "{v}");
    let n = console(&h.a, "d").matches("dirtier: pass").count();
    wait_console_until(&h.a, "d", |t| t.matches("dirtier: pass").count() > n);
    // The target gave up on its own (its VMM's reads time out) and kept nothing.
    assert_clean(&h.b, "d");
    assert_eq!(h.b.ok(Method::GET, "/v1/vms", None), json!([]));
}

#[test]
fn a_name_taken_on_the_target_is_refused() {
    need!();
    let h = Hosts::new("r", 83);
    let counter = guest("counter").unwrap();
    h.b.ok(Method::POST, "/v1/vms", Some(&create_body("c")));
    start_vm(&h.a, "c", &counter, "spin=1000000", 64);
    wait_console_until(&h.a, "c", |t| counts(t).len() >= 2);
    let out = h.a.cli(&["migrate", "c", "--to", &h.addr_b]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert!(err.contains("keeps running here"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let v = h.a.ok(Method::GET, "/v1/vms/c", None);
    assert_eq!(v["state"], "running", "{v}");
    let n = counts(&console(&h.a, "c")).len();
    wait_console_until(&h.a, "c", |t| counts(t).len() > n);
    // The target's own VM "c" is untouched; nothing else appeared.
    let list = h.b.ok(Method::GET, "/v1/vms", None);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["state"], "created", "{list}");
    // The same with --copy-storage: refused before any copy is made.
    let out =
        h.a.cli(&["migrate", "c", "--to", &h.addr_b, "--copy-storage"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(h.a.ok(Method::GET, "/v1/vms/c", None)["state"], "running");
    assert_eq!(
        h.b.ok(Method::GET, "/v1/vms", None)
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // No daemon listening on that port: a clear error, the VM still runs here.
    let out =
        h.a.cli(&["migrate", "c", "--to", &format!("{}:4748", h.addr_b)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect"), "{err}");
    assert_eq!(h.a.ok(Method::GET, "/v1/vms/c", None)["state"], "running");
}

/// vblkloop's sector pattern for iteration `n`: bytes 0..8 = n, byte j = n + j.
fn pattern(n: u64) -> Vec<u8> {
    let mut v = n.to_le_bytes().to_vec();
    v.extend((8..512u64).map(|j| (n + j) as u8));
    v
}

/// vblkloop with `stride=STRIDE`: iteration n writes sector 1 + (n % 64) * STRIDE.
const STRIDE: u64 = 128;

fn sector_of(n: u64) -> usize {
    (1 + (n % 64) * STRIDE) as usize * 512
}

/// The iteration whose pattern `sector` holds, if any.
fn iteration_in(sector: &[u8]) -> Option<u64> {
    let n = u64::from_le_bytes(sector[..8].try_into().unwrap());
    (sector == pattern(n).as_slice()).then_some(n)
}

#[test]
fn copy_storage_mirrors_a_disk_the_guest_writes_during_the_migration() {
    need!();
    let h = Hosts::new("s", 84);
    let vblkloop = guest("vblkloop").unwrap();
    // The disk lives only in the source's directory: the target gets its own copy. 8 MiB of
    // data the first pass must carry (the guest's 64 sectors lie in its first 4 MiB, 64 KiB
    // apart: one per dirty chunk), then a hole that need not travel, and a marker in it.
    let disk = h.a.dir.0.join("private.raw");
    let mut data = vec![0u8; 32 << 20];
    for (i, b) in data[..8 << 20].iter_mut().enumerate() {
        *b = (i / 4096) as u8 | 1;
    }
    data[24 << 20..(24 << 20) + 4096].fill(0xa5);
    std::fs::write(&disk, &data).unwrap();
    start_vm_with_disk(
        &h.a,
        "s",
        &vblkloop,
        &format!("spin=20000000 stride={STRIDE}"),
        &disk,
    );
    wait_console_until(&h.a, "s", |t| counts(t).len() >= 3);
    let mut follower = follow(&h.a, "s");
    let out = h.a.cli(&[
        "--json",
        "migrate",
        "s",
        "--to",
        &h.addr_b,
        "--copy-storage",
    ]);
    assert!(
        out.status.success(),
        "{}\nsource:\n{}\ntarget:\n{}",
        String::from_utf8_lossy(&out.stderr),
        h.a.log(),
        h.b.log()
    );
    // Stop the guest there at once: the copy must equal the source's disk as it was at the
    // hand-over, except for what the guest wrote on the target since.
    h.b.ok(Method::POST, "/v1/vms/s/pause", None);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("report: {report}");
    assert_eq!(report["target_confirmed"], true, "{report}");
    let st = &report["storage"];
    assert_eq!(st["disks"], 1, "{report}");
    assert_eq!(st["bytes"], 32 << 20, "{report}");
    let sent = st["bytes_sent"].as_u64().unwrap();
    assert!(
        ((8 << 20) + 4096..16 << 20).contains(&sent),
        "the hole was sent, or the data was not: {report}"
    );
    // The guest wrote meanwhile: chunks went again after the first pass.
    let again: u64 = st["chunks_per_round"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(again > 0, "{report}");
    // The target's record points at its own copy, under its state directory.
    let v = h.b.ok(Method::GET, "/v1/vms/s", None);
    assert_eq!(v["state"], "paused", "{v}");
    let copy = PathBuf::from(v["disks"][0]["path"].as_str().unwrap());
    assert!(copy.starts_with(h.b.state_dir()), "{v}");
    assert!(disk.exists(), "the source's disk stays");
    let mut before = String::new();
    std::io::Read::read_to_string(follower.stdout.as_mut().unwrap(), &mut before).unwrap();
    follower.wait().unwrap();
    let last_before = *counts(&before).last().unwrap();
    let last_there = counts(&console(&h.b, "s")).last().copied();
    let src = std::fs::read(&disk).unwrap();
    let got = std::fs::read(&copy).unwrap();
    assert_eq!(got.len(), src.len());
    // Every sector the guest writes: the source's (final) content, or a later iteration the
    // guest ran on the target. The source's is its latest iteration's.
    let mut same = 0;
    for k in 0..64u64 {
        let at = sector_of(k);
        let (s, g) = (&src[at..at + 512], &got[at..at + 512]);
        // A sector the guest has not reached yet holds the original data.
        let n_src = iteration_in(s);
        match n_src {
            Some(n) => assert!(
                n + 64 > last_before && n <= last_before + 1,
                "source sector {k}: iteration {n}, last count {last_before}"
            ),
            None => assert!(
                s == &data[at..at + 512] && last_before < 64,
                "source sector {k} holds neither a pattern nor the original data"
            ),
        }
        if s == g {
            same += 1;
            continue;
        }
        let n = iteration_in(g).unwrap_or_else(|| panic!("copy's sector {k} holds no pattern"));
        assert!(
            n > last_before && n % 64 == k && last_there.is_none_or(|l| n <= l + 1),
            "copy's sector {k} holds iteration {n}, source's {n_src:?}, last count here {last_before}, there {last_there:?}"
        );
    }
    assert!(
        same > 32,
        "the guest ran too far on the target to compare ({same} sectors)"
    );
    // Everything else is the source's, byte for byte.
    let mut masked = (src.clone(), got.clone());
    for k in 0..64u64 {
        let at = sector_of(k);
        masked.0[at..at + 512].fill(0);
        masked.1[at..at + 512].fill(0);
    }
    assert!(
        masked.0 == masked.1,
        "the copy differs from the source's disk"
    );
    assert_eq!(got[24 << 20..(24 << 20) + 4096], [0xa5u8; 4096]);
    // The guest goes on there: the count without gap or repeat, its read-backs pass.
    h.b.ok(Method::POST, "/v1/vms/s/resume", None);
    let after = wait_console_until(&h.b, "s", |t| counts(t).len() >= 5);
    let joined = without_vmm_lines(&format!("{before}{after}"));
    assert!(!joined.contains("FAIL"), "{joined}");
    let c = counts(&joined);
    assert!(
        c.windows(2).all(|w| w[1] == w[0] + 1),
        "the count has a gap or repeat:\n{joined}"
    );
    // Deleting it there removes the copy with it.
    let out = h.b.cli(&["stop", "s", "--timeout", "2s"]);
    assert!(out.status.success(), "{out:?}");
    h.b.wait_state("s", "stopped", Duration::from_secs(10));
    h.b.ok(Method::DELETE, "/v1/vms/s", None);
    assert!(
        !copy.exists(),
        "the target kept its disk copy after the delete"
    );
}

#[test]
fn a_vm_with_a_nic_moves_and_keeps_its_mac_on_a_tap_in_the_targets_bridge() {
    need!();
    let h = Hosts::new("n", 85);
    let counter = guest("counter").unwrap();
    h.a.ok(
        Method::POST,
        "/v1/vms",
        Some(
            &json!({"name": "n", "kernel": counter, "cmdline": "spin=1000000",
                    "nets": [{"bridge": "c4mig0"}], "start": true})
            .to_string(),
        ),
    );
    let src = h.a.ok(Method::GET, "/v1/vms/n", None);
    let mac = src["nics"][0]["mac"].as_str().unwrap().to_string();
    let src_tap = src["nics"][0]["tap"].as_str().unwrap().to_string();
    wait_console_until(&h.a, "n", |t| counts(t).len() >= 3);
    let out = h.a.cli(&["--json", "migrate", "n", "--to", &h.addr_b]);
    assert!(
        out.status.success(),
        "{}\nsource:\n{}\ntarget:\n{}",
        String::from_utf8_lossy(&out.stderr),
        h.a.log(),
        h.b.log()
    );
    let v = h.b.ok(Method::GET, "/v1/vms/n", None);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["nics"][0]["mac"], mac.as_str(), "{v}");
    let tap = v["nics"][0]["tap"].as_str().unwrap();
    // The recorded tap exists on the target, in its bridge; the source's is gone.
    let link = Command::new("ip")
        .args(["-n", &h.ns_b, "-o", "link", "show", "dev", tap])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&link.stdout);
    assert!(
        link.status.success() && text.contains("master c4mig0"),
        "{text} {link:?}"
    );
    let gone = Command::new("ip")
        .args(["-n", &h.ns_a, "link", "show", "dev", &src_tap])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "the source kept its tap {src_tap}");
    let n = counts(&console(&h.b, "n")).len();
    wait_console_until(&h.b, "n", |t| counts(t).len() > n + 2);
    // Deleting it there removes the tap.
    let out = h.b.cli(&["stop", "n", "--timeout", "2s"]);
    assert!(out.status.success(), "{out:?}");
    h.b.wait_state("n", "stopped", Duration::from_secs(10));
    let still = Command::new("ip")
        .args(["-n", &h.ns_b, "link", "show", "dev", tap])
        .output()
        .unwrap();
    assert!(!still.status.success(), "the stopped VM's tap stayed");
}

#[test]
fn a_copy_storage_migration_cut_short_resumes_the_source_and_the_target_drops_its_copies() {
    need!();
    let h = Hosts::new("k", 86);
    let vblkloop = guest("vblkloop").unwrap();
    // Big enough (every block non-zero) that the link goes down while it is on its way.
    let disk = h.a.dir.0.join("big.raw");
    std::fs::write(&disk, vec![0x11u8; 768 << 20]).unwrap();
    start_vm_with_disk(&h.a, "k", &vblkloop, "spin=200000", &disk);
    wait_console_until(&h.a, "k", |t| counts(t).len() >= 5);
    let ns_a = h.ns_a.clone();
    let veth = h.veth_a.clone();
    let cutter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        ip(&["-n", &ns_a, "link", "set", &veth, "down"]);
    });
    let (status, body) = h.a.req(
        Method::POST,
        "/v1/vms/k/migrate",
        Some(&json!({"to": h.addr_b, "copy_storage": true, "io_timeout_ms": 1500}).to_string()),
    );
    cutter.join().unwrap();
    assert_eq!(status, 409, "{body}\n{}", h.a.log());
    assert!(body.to_string().contains("keeps running here"), "{body}");
    // Resumed here: the count goes on, the guest's disk checks pass.
    let v = h.a.ok(Method::GET, "/v1/vms/k", None);
    assert_eq!(v["state"], "running", "{v}");
    let n = counts(&console(&h.a, "k")).len();
    let text = wait_console_until(&h.a, "k", |t| counts(t).len() > n + 3);
    assert!(!text.contains("FAIL"), "{text}");
    // The source's disk is as the guest left it: past its 64 sectors, the original bytes.
    let mut f = std::fs::File::open(&disk).unwrap();
    let mut probe = vec![0u8; 1 << 20];
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(700 << 20)).unwrap();
    std::io::Read::read_exact(&mut f, &mut probe).unwrap();
    assert!(
        probe.iter().all(|&b| b == 0x11),
        "the source's disk changed"
    );
    // The target gave up (its reads time out) and removed the VM's directory with the copy.
    assert_clean(&h.b, "k");
    assert_eq!(h.b.ok(Method::GET, "/v1/vms", None), json!([]));
}

#[test]
fn only_a_source_with_the_same_key_may_migrate_and_keyless_listening_is_loopback_only() {
    need!();
    let h = Hosts::new("a", 87);
    let counter = guest("counter").unwrap();
    // Two more source daemons on host a: one without a key, one with another.
    for (tag, key, why) in [
        ("anokey", None, "accepts only authenticated migrations"),
        ("awrong", Some("not the secret the target holds"), "differs"),
    ] {
        let d = daemon_in(&h.ns_a, tag, None, key);
        start_vm(&d, "c", &counter, "spin=1000000", 64);
        wait_console_until(&d, "c", |t| counts(t).len() >= 2);
        let out = d.cli(&["migrate", "c", "--to", &h.addr_b]);
        assert!(!out.status.success(), "{tag}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(why) && err.contains("keeps running here"),
            "{tag}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert_eq!(d.ok(Method::GET, "/v1/vms/c", None)["state"], "running");
        assert_eq!(h.b.ok(Method::GET, "/v1/vms", None), json!([]), "{tag}");
        // The target logged why it refused.
        assert!(h.b.log().contains(why), "{tag}: {}", h.b.log());
    }
    // The source with the key moves it.
    start_vm(&h.a, "c", &counter, "spin=1000000", 64);
    wait_console_until(&h.a, "c", |t| counts(t).len() >= 2);
    let out = h.a.cli(&["migrate", "c", "--to", &h.addr_b]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        h.b.log()
    );
    assert_eq!(h.b.ok(Method::GET, "/v1/vms/c", None)["state"], "running");
    // The VMMs' stream was bound to the daemons' authentication too: the incoming VMM waited
    // for the source holding its one-time token.
    let text = console(&h.b, "c");
    assert!(text.contains("with this VMM's token"), "{text}");

    // No key on a non-loopback address: the daemon refuses to start, and says why.
    let dir = TempDir::new("nokeylisten");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &h.ns_b, EXE, "daemon", "--socket"])
        .arg(dir.0.join("d.sock"))
        .arg("--state-dir")
        .arg(dir.0.join("state"))
        .args(["--migration-listen", &format!("{}:4749", h.addr_b)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the daemon listened without a key");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("--migration-key"), "{err}");
}
