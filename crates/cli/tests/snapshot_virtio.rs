//! Snapshots, restore and live migration of VMs with virtio devices, through the real binary.
//! The `vblkloop` guest (guests/vblkloop.c) writes, reads back and checks disk sectors in a
//! loop and prints `count=N`; with `rng=1` it also reads a virtio-rng every iteration. A copy
//! restored or migrated mid-run must continue the count with no gap or repeat and find on the
//! disk what it wrote before (the guest checks the previous iteration's sector every time).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corefour_vmm::api_client::call;
use corefour_vmm::snapshot::format;

#[path = "common/guests.rs"]
#[macro_use]
mod guests;
use guests::{counts, guest, virtio_guest, Tmp};

impl Tmp {
    /// A zeroed raw disk of 1 MiB (2048 sectors).
    fn disk(&self) -> PathBuf {
        let p = self.0.join("disk.raw");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        p
    }
}
/// A VMM child (optionally inside a network namespace) with stdout and stderr in files.
struct Vmm {
    child: Child,
    out: PathBuf,
    err: PathBuf,
    sock: PathBuf,
}

impl Vmm {
    fn start(netns: Option<&str>, args: &[&str], dir: &Path, name: &str) -> Self {
        let sock = dir.join(format!("{name}.sock"));
        let out = dir.join(format!("{name}.out"));
        let err = dir.join(format!("{name}.err"));
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_corefour")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_corefour")),
        };
        let child = cmd
            .arg("vmm")
            .args(args)
            .arg("--api-sock")
            .arg(&sock)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn corefour vmm");
        let v = Self {
            child,
            out,
            err,
            sock,
        };
        let t = Instant::now();
        // A migration target has no API socket until a VM arrives: it says it is waiting.
        while std::os::unix::net::UnixStream::connect(&v.sock).is_err()
            && !v.stderr().contains("waiting for a migration")
        {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "VMM never became ready: {}",
                v.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        v
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    fn wait_counts(&self, n: usize) {
        let t = Instant::now();
        while counts(&self.output()).len() < n {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "guest printed too little: {:?} {}",
                self.output(),
                self.stderr()
            );
            assert!(
                !self.output().contains("FAIL"),
                "guest failed: {}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn put(&self, path: &str, body: Option<&str>) -> (u16, String) {
        let r = call(&self.sock, "PUT", path, body, Duration::from_secs(120)).unwrap();
        (r.status, r.body)
    }

    /// Waits for the process to end (killing it after 30 s); returns (exit code, stderr).
    fn finish(mut self) -> (Option<i32>, String) {
        let t = Instant::now();
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if t.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (st.code(), self.stderr())
    }

    fn shutdown(self) -> (Option<i32>, String) {
        let _ = self.put("/vm/shutdown", None);
        self.finish()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `before` then `after` must count 0, 1, 2, ... with nothing missing or repeated, and the
/// copy must have made progress of its own without the guest's disk checks failing.
fn assert_continues(before: &str, after: &str) {
    assert!(!after.contains("FAIL"), "the copy failed: {after}");
    let joined = format!("{before}{after}");
    let c = counts(&joined);
    assert!(
        c.len() > counts(before).len() + 2,
        "the copy printed too little: {after:?}"
    );
    for (i, n) in c.iter().enumerate() {
        assert_eq!(*n, i as u64, "count broken at line {i}: {joined:?}");
    }
}

/// What vblkloop's iteration `n` wrote: sector 1 + n % 64, bytes 0..8 = n, byte j = n + j.
fn assert_disk_holds(disk: &Path, n: u64) {
    let data = std::fs::read(disk).unwrap();
    let s = (1 + n % 64) as usize * 512;
    let sector = &data[s..s + 512];
    assert_eq!(sector[..8], n.to_le_bytes(), "sector of iteration {n}");
    for (j, b) in sector.iter().enumerate().skip(8) {
        assert_eq!(
            *b,
            (n + j as u64) as u8,
            "byte {j} of iteration {n}'s sector"
        );
    }
}

fn snapshot(v: &Vmm, dir: &Path) {
    let (code, body) = v.put(
        "/vm/snapshot",
        Some(&format!(r#"{{"path": "{}"}}"#, dir.display())),
    );
    assert_eq!(code, 200, "{body}");
}

/// Pauses `v`, lets its output settle, and takes a full snapshot into `dir`: what the guest
/// printed up to the snapshot, and the snapshot's directory.
fn paused_snapshot(v: &Vmm, dir: &Path) -> (String, PathBuf) {
    assert_eq!(v.put("/vm/pause", None).0, 204);
    std::thread::sleep(Duration::from_millis(200));
    let before = v.output();
    snapshot(v, dir);
    (before, dir.to_path_buf())
}

/// Runs vblkloop with a disk and an rng on `transport`, takes a full snapshot and later a diff
/// snapshot (paused, so the output matches), stops the source, restores each, and checks the
/// copies. Returns the full snapshot's directory and the disk for the tamper test.
/// `disk_opts` follow the disk's path on `--disk` (`,direct`: O_DIRECT through io_uring).
fn round_trip(t: &Tmp, transport: &str, disk_opts: &str) -> (PathBuf, PathBuf) {
    let kernel = virtio_guest("vblkloop");
    let disk = t.disk();
    let disk_arg = format!("{}{disk_opts}", disk.display());
    let src = Vmm::start(
        None,
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--disk",
            &disk_arg,
            "--rng",
            "--virtio-transport",
            transport,
            "--cmdline",
            "spin=200000 rng=1",
            "--timeout",
            "120s",
        ],
        &t.0,
        "src",
    );
    src.wait_counts(20);
    // Paused first, so that what the source printed is exactly what precedes the snapshot.
    let (before, snap) = paused_snapshot(&src, &t.0.join("snap"));
    // Resuming after a snapshot lets the devices go on too.
    assert_eq!(src.put("/vm/resume", None).0, 204);
    let n = counts(&src.output()).len();
    src.wait_counts(n + 10);
    // A diff snapshot on top: it must hold the pages the disk device wrote since, which
    // KVM's dirty log does not see (vblkloop reads into a page only the device writes and
    // checks it on the next iteration).
    assert_eq!(src.put("/vm/pause", None).0, 204);
    std::thread::sleep(Duration::from_millis(200));
    let before_diff = src.output();
    let diff = t.0.join("diff");
    let (code, body) = src.put(
        "/vm/snapshot",
        Some(&format!(
            r#"{{"path": "{}", "diff": true}}"#,
            diff.display()
        )),
    );
    assert_eq!(code, 200, "{body}");
    // Stop the source dead: only the snapshots carry on.
    drop(src);

    for (dir, before, name) in [
        (&snap, &before, "restored"),
        (&diff, &before_diff, "fromdiff"),
    ] {
        // Disks are not part of a snapshot (qcow2 overlays would be): put the disk back to
        // the snapshot's instant, which vblkloop's pattern makes computable. The guest may
        // have written iteration last + 1's sector before the pause: rewind to just after
        // that write (the copy writes the same bytes again if it had not).
        let last = *counts(before).last().unwrap();
        rewind_disk(&disk, last + 1);
        let r = Vmm::start(None, &["--restore", dir.to_str().unwrap()], &t.0, name);
        r.wait_counts(10);
        let after = r.output();
        let (code, err) = r.shutdown();
        assert_eq!(code, Some(0), "{err}");
        assert!(err.contains("restored"), "{err}");
        assert_continues(before, &after);
        let end = *counts(&after).last().unwrap();
        assert_disk_holds(&disk, end);
    }
    (snap, disk)
}

/// Rewrites the sectors vblkloop would hold right after iteration `last` (each of the 64
/// sectors holds the latest iteration <= `last` that maps to it; untouched ones stay zero).
fn rewind_disk(disk: &Path, last: u64) {
    let mut data = std::fs::read(disk).unwrap();
    for s in 0..64u64 {
        let off = (1 + s) as usize * 512;
        let sector = &mut data[off..off + 512];
        if s > last {
            sector.fill(0);
            continue;
        }
        let n = last - (last - s) % 64;
        sector[..8].copy_from_slice(&n.to_le_bytes());
        for (j, b) in sector.iter_mut().enumerate().skip(8) {
            *b = (n + j as u64) as u8;
        }
    }
    std::fs::write(disk, data).unwrap();
}

#[test]
fn blk_and_rng_continue_after_restore_over_mmio_and_damaged_device_state_is_refused() {
    need_kvm!();
    let t = Tmp::new("vsnap-mmio");
    let (snap, disk) = round_trip(&t, "mmio", "");

    let restore = |dir: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_corefour"))
            .args(["vmm", "--restore", dir.to_str().unwrap(), "--timeout", "2s"])
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let state = std::fs::read(snap.join("state.bin")).unwrap();
    let payload: serde_json::Value = serde_json::from_slice(&state[24..state.len() - 4]).unwrap();
    let devices = &payload["machine"]["devices"]["virtio"];
    assert_eq!(devices.as_array().map(Vec::len), Some(2), "{devices}");
    assert_eq!(devices[0]["device"]["kind"], "block");
    assert_eq!(devices[1]["device"]["kind"], "rng");
    assert_eq!(devices[0]["activated"], true);
    let variant = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let d = t.0.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(snap.join("memory.bin"), d.join("memory.bin")).unwrap();
        let mut p = payload.clone();
        edit(&mut p);
        let bytes = format::encode(format::KIND_VM_STATE, &p).unwrap();
        std::fs::write(d.join("state.bin"), bytes).unwrap();
        d
    };
    let refused = |d: &Path, want: &str| {
        let (code, err) = restore(d);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(want), "want {want:?} in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    };

    // A queue size no driver could have set, with a valid checksum: refused by name.
    let d = variant("badqueue", &|p| {
        p["machine"]["devices"]["virtio"][0]["queues"][0]["size"] = 3.into()
    });
    refused(&d, "virtio device 0 (blk): queue 0");
    // The device section cut short (one device missing).
    let d = variant("short", &|p| {
        p["machine"]["devices"]["virtio"]
            .as_array_mut()
            .unwrap()
            .pop();
    });
    refused(&d, "holds 1 virtio devices, the config has 2");
    // The devices swapped.
    let d = variant("swapped", &|p| {
        p["machine"]["devices"]["virtio"]
            .as_array_mut()
            .unwrap()
            .swap(0, 1);
    });
    refused(&d, "saved state is for device type 4");
    // Rings pointed outside guest memory.
    let d = variant("rings", &|p| {
        p["machine"]["devices"]["virtio"][0]["queues"][0]["used_ring"] = (1u64 << 40).into()
    });
    refused(&d, "queue 0 is not valid");
    // A field of the wrong type.
    let d = variant("type", &|p| {
        p["machine"]["devices"]["virtio"][1]["status"] = "running".into()
    });
    refused(&d, "payload is not valid");
    // A flipped byte inside the device section, checksum left alone.
    let d = variant("flip", &|_| {});
    let mut s = std::fs::read(d.join("state.bin")).unwrap();
    let text = String::from_utf8_lossy(&s).into_owned();
    let at = text.find("\"next_used\"").unwrap();
    s[at + 2] ^= 0x20;
    std::fs::write(d.join("state.bin"), &s).unwrap();
    refused(&d, "checksum mismatch");
    // Truncated in the device section.
    std::fs::write(d.join("state.bin"), &s[..at]).unwrap();
    refused(&d, "truncated");
    // The disk grew since the snapshot: the guest would see another capacity.
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.set_len(2 << 20).unwrap();
    refused(&snap, "sectors now but 2048");
}

#[test]
fn blk_and_rng_continue_after_restore_over_pci() {
    need_kvm!();
    let t = Tmp::new("vsnap-pci");
    // Direct: the disk's requests go through io_uring, drained when the VM pauses.
    let (snap, _) = round_trip(&t, "pci", ",direct");
    let state = std::fs::read(snap.join("state.bin")).unwrap();
    let payload: serde_json::Value = serde_json::from_slice(&state[24..state.len() - 4]).unwrap();
    let pci = &payload["machine"]["devices"]["virtio"][0]["pci"];
    assert_eq!(pci["bar"], 0xe000_0000u64, "{pci}");
}

/// The `name=N` counter of the `corefour vmm virtio:` line that `--stats` prints.
fn virtio_stat(stderr: &str, name: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("corefour vmm virtio: "))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in stderr:\n{stderr}"))
}

/// vblkloop on PCI with its disk moved to another BAR address and completions waited for by
/// MSI-X (`irq=2 movebar=1`): the restored copy rebuilds the vector's GSI route from the
/// saved MSI-X table (the guest is HLTed waiting for it) and registers the queue ioeventfd at
/// the moved BAR, so it goes on with no notification taking the bus path.
#[test]
fn msix_routes_and_moved_bar_ioeventfds_survive_restore() {
    need_kvm!();
    let t = Tmp::new("vsnap-msix");
    let kernel = virtio_guest("vblkloop");
    let disk = t.disk();
    let src = Vmm::start(
        None,
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
            "--virtio-transport",
            "pci",
            "--cmdline",
            "spin=1000 irq=2 movebar=1",
            "--timeout",
            "120s",
        ],
        &t.0,
        "src",
    );
    src.wait_counts(20);
    let (before, snap) = paused_snapshot(&src, &t.0.join("snap"));
    drop(src);
    let last = *counts(&before).last().unwrap();
    rewind_disk(&disk, last + 1);
    let r = Vmm::start(
        None,
        &["--restore", snap.to_str().unwrap(), "--stats"],
        &t.0,
        "restored",
    );
    r.wait_counts(10);
    let after = r.output();
    let (code, err) = r.shutdown();
    assert_eq!(code, Some(0), "{err}");
    assert_continues(&before, &after);
    // Every completion after the restore came as an MSI-X message through the irqfd, the
    // route installed once; the restore moved the ioeventfd to the saved BAR.
    // At least one message per count (event idx lets the device coalesce some completions).
    assert!(virtio_stat(&err, "msix_irqfd") >= 10, "{err}");
    assert_eq!(virtio_stat(&err, "msix_ioctl"), 0, "{err}");
    assert_eq!(virtio_stat(&err, "route_updates"), 1, "{err}");
    assert_eq!(virtio_stat(&err, "bar_moves"), 1, "{err}");
    assert_eq!(virtio_stat(&err, "ioeventfds_moved"), 1, "{err}");
    assert_eq!(virtio_stat(&err, "pci_notify_exits"), 0, "{err}");
}

/// The software CPU's snapshot: vCPU state with the local APIC, and the VM's I/O APIC, PIT,
/// PIC and clock; the counter guest continues with no gap or repeat.
#[test]
fn emu_vm_snapshot_restores_and_continues() {
    let kernel = guest("counter");
    let t = Tmp::new("vsnap-emu");
    let src = Vmm::start(
        None,
        &[
            "--backend",
            "emu",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "spin=20000",
            "--timeout",
            "120s",
        ],
        &t.0,
        "src",
    );
    src.wait_counts(5);
    let (before, snap) = paused_snapshot(&src, &t.0.join("snap"));
    drop(src);
    let state = std::fs::read(snap.join("state.bin")).unwrap();
    let payload: serde_json::Value = serde_json::from_slice(&state[24..state.len() - 4]).unwrap();
    assert_eq!(payload["machine"]["vm"]["backend"], "emu");
    let r = Vmm::start(
        None,
        &["--restore", snap.to_str().unwrap()],
        &t.0,
        "restored",
    );
    r.wait_counts(5);
    let after = r.output();
    let (code, err) = r.shutdown();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("backend emu"), "{err}");
    assert!(
        !after.contains("MISMATCH"),
        "memory was not restored: {after}"
    );
    assert_continues(&before, &after);
}

fn netns_missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces need root".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("`ip` (iproute2) is not installed".into()),
    }
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

/// Two namespaces joined by a veth pair: 10.99.N.1 and 10.99.N.2.
struct Hosts {
    a: String,
    b: String,
}

impl Hosts {
    fn new(n: u8) -> Self {
        let id = format!("v{}", std::process::id() % 100000);
        let h = Self {
            a: format!("c4a{id}"),
            b: format!("c4b{id}"),
        };
        let (va, vb) = (format!("va{id}"), format!("vb{id}"));
        ip(&["netns", "add", &h.a]);
        ip(&["netns", "add", &h.b]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &h.a]);
        ip(&["link", "set", &vb, "netns", &h.b]);
        ip(&[
            "-n",
            &h.a,
            "addr",
            "add",
            &format!("10.99.{n}.1/24"),
            "dev",
            &va,
        ]);
        ip(&[
            "-n",
            &h.b,
            "addr",
            "add",
            &format!("10.99.{n}.2/24"),
            "dev",
            &vb,
        ]);
        for (ns, dev) in [(&h.a, &va), (&h.b, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        h
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

/// Live migration between two netns hosts of a VM doing disk I/O (the disk on storage both
/// hosts see): the target continues the count and the disk checks pass.
#[test]
fn blk_guest_migrates_between_netns_hosts_without_gap() {
    need_kvm!();
    if let Some(why) = netns_missing() {
        eprintln!("SKIP: {why}");
        return;
    }
    let kernel = virtio_guest("vblkloop");
    let t = Tmp::new("vsnap-mig");
    let disk = t.disk();
    let h = Hosts::new(73);
    let to = "10.99.73.2:47300";
    let target = Vmm::start(Some(&h.b), &["--incoming", to], &t.0, "target");
    let src = Vmm::start(
        Some(&h.a),
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
            "--rng",
            "--cmdline",
            "spin=200000 rng=1",
            "--timeout",
            "120s",
        ],
        &t.0,
        "source",
    );
    src.wait_counts(20);
    let (code, body) = src.put(
        "/vm/migrate",
        Some(&format!(r#"{{"to": "{to}", "max_downtime_ms": 10}}"#)),
    );
    assert_eq!(code, 200, "{body}");
    let (scode, serr) = src.finish();
    assert_eq!(scode, Some(0), "the source ends after handing over: {serr}");
    target.wait_counts(10);
    let before = std::fs::read_to_string(t.0.join("source.out")).unwrap();
    let after = target.output();
    assert_continues(&before, &after);
    let (code, _) = target.put("/vm/shutdown", None);
    assert_eq!(code, 204);
    let (tcode, terr) = target.finish();
    assert_eq!(tcode, Some(0), "{terr}");
    let end = *counts(&after).last().unwrap();
    assert_disk_holds(&disk, end);
}
