//! Snapshot and restore through the real binary: the `counter` guest is snapshotted mid-run,
//! restored twice from the same snapshot, and each copy continues the count with no gap and no
//! repeat; a diff snapshot on top restores too; damaged snapshots are refused with a reason.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corefour_vmm::api_client::call;

#[path = "common/guests.rs"]
#[macro_use]
mod guests;
use guests::{counts, guest, Tmp};

/// A VMM child whose stdout goes to a file (so nothing blocks on a pipe).
struct Vmm {
    child: Child,
    out: PathBuf,
    sock: PathBuf,
}

impl Vmm {
    fn start(args: &[&str], sock: &Path, out: &Path) -> Self {
        let f = std::fs::File::create(out).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_corefour"))
            .arg("vmm")
            .args(args)
            .arg("--api-sock")
            .arg(sock)
            .stdout(f)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn corefour vmm");
        let v = Self {
            child,
            out: out.to_path_buf(),
            sock: sock.to_path_buf(),
        };
        let t = Instant::now();
        // The socket file appears at bind(), a moment before listen(): wait until it accepts.
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "API socket never accepted a connection"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        v
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn wait_lines(&self, n: usize) {
        let t = Instant::now();
        while count_lines(&self.output()) < n {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "guest printed too little: {:?}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn put(&self, path: &str, body: Option<&str>) -> (u16, String) {
        let r = call(&self.sock, "PUT", path, body, Duration::from_secs(60)).unwrap();
        (r.status, r.body)
    }

    /// Shuts down through the API and returns (exit code, stderr).
    fn shutdown(mut self) -> (i32, String) {
        let _ = self.put("/vm/shutdown", None);
        let st = self.child.wait().unwrap();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut err).unwrap();
        }
        (st.code().unwrap_or(-1), err)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn count_lines(s: &str) -> usize {
    s.lines().filter(|l| l.starts_with("count=")).count()
}

/// The output before the snapshot, followed by a restored copy's, must count 0, 1, 2, ...
/// with nothing missing or repeated (a line cut by the snapshot is completed by the copy).
fn assert_continues(before: &str, after: &str) {
    assert!(
        !after.contains("MISMATCH"),
        "memory was not restored: {after:?}"
    );
    let joined = format!("{before}{after}");
    let c = counts(&joined);
    assert!(
        c.len() > counts(before).len(),
        "the copy printed nothing new: {after:?}"
    );
    for (i, n) in c.iter().enumerate() {
        assert_eq!(
            *n, i as u64,
            "count sequence broken at line {i}: {joined:?}"
        );
    }
}

#[test]
fn counter_continues_exactly_after_restore_twice_and_from_a_diff() {
    need_kvm!();
    let kernel = guest("counter");
    let t = Tmp::new("snap-counter");
    let k = kernel.to_str().unwrap();
    let src = Vmm::start(
        &[
            "--kernel",
            k,
            "--cmdline",
            "spin=1000000",
            "--timeout",
            "60s",
        ],
        &t.0.join("src.sock"),
        &t.0.join("src.out"),
    );
    src.wait_lines(5);
    // Pause first so that what the source printed is exactly what precedes the snapshot
    // (the VMM flushes a partial line within 50 ms of the guest going quiet).
    assert_eq!(src.put("/vm/pause", None).0, 204);
    std::thread::sleep(Duration::from_millis(200));
    let before_full = src.output();
    let snap = t.0.join("snap");
    let (code, body) = src.put(
        "/vm/snapshot",
        Some(&format!(r#"{{"path": "{}"}}"#, snap.display())),
    );
    assert_eq!(code, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["diff"], false);
    // Let it run a little longer, then a diff snapshot.
    assert_eq!(src.put("/vm/resume", None).0, 204);
    let n = count_lines(&src.output());
    src.wait_lines(n + 3);
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
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["diff"], true);
    // A diff only holds the pages written since the full snapshot.
    assert!(
        report["memory_bytes_written"].as_u64().unwrap() < 1 << 20,
        "{body}"
    );
    let (code, err) = src.shutdown();
    assert_eq!(code, 0, "{err}");
    for round in 0..2 {
        let out = t.0.join(format!("restored{round}.out"));
        let r = Vmm::start(
            &["--restore", snap.to_str().unwrap()],
            &t.0.join(format!("r{round}.sock")),
            &out,
        );
        r.wait_lines(3);
        let (code, err) = r.shutdown();
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("restored"), "{err}");
        let after = std::fs::read_to_string(&out).unwrap();
        assert_continues(&before_full, &after);
    }

    let out = t.0.join("fromdiff.out");
    let r = Vmm::start(
        &["--restore", diff.to_str().unwrap(), "--verify"],
        &t.0.join("d.sock"),
        &out,
    );
    r.wait_lines(3);
    let (code, err) = r.shutdown();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("2 layers"), "{err}");
    assert_continues(&before_diff, &std::fs::read_to_string(&out).unwrap());
}

#[test]
fn damaged_snapshots_are_refused_with_a_reason() {
    need_kvm!();
    let kernel = guest("counter");
    let t = Tmp::new("snap-damaged");
    let src = Vmm::start(
        &["--kernel", kernel.to_str().unwrap(), "--timeout", "60s"],
        &t.0.join("s.sock"),
        &t.0.join("s.out"),
    );
    src.wait_lines(1);
    let snap = t.0.join("snap");
    let (code, body) = src.put(
        "/vm/snapshot",
        Some(&format!(r#"{{"path": "{}"}}"#, snap.display())),
    );
    assert_eq!(code, 200, "{body}");
    // A diff needs nothing more; bad requests get a clear 4xx.
    let (code, body) = src.put("/vm/snapshot", Some("{\"path\": 5}"));
    assert_eq!(code, 400, "{body}");
    let (code, body) = src.put(
        "/vm/snapshot",
        Some(&format!(r#"{{"path": "{}"}}"#, snap.display())),
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("not empty"), "{body}");
    let (code, _) = src.shutdown();
    assert_eq!(code, 0);

    let restore = |dir: &Path, extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_corefour"))
            .args(["vmm", "--restore", dir.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let copy = |name: &str| {
        let d = t.0.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["state.bin", "memory.bin"] {
            std::fs::copy(snap.join(f), d.join(f)).unwrap();
        }
        d
    };
    // Truncated state.
    let d = copy("trunc");
    let s = std::fs::read(d.join("state.bin")).unwrap();
    std::fs::write(d.join("state.bin"), &s[..s.len() / 2]).unwrap();
    let (code, err) = restore(&d, &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("truncated"), "{err}");
    // Tampered state.
    let d = copy("tamper");
    let mut s = std::fs::read(d.join("state.bin")).unwrap();
    let mid = s.len() / 2;
    s[mid] ^= 1;
    std::fs::write(d.join("state.bin"), &s).unwrap();
    let (code, err) = restore(&d, &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("checksum mismatch"), "{err}");
    // Another format version.
    let d = copy("version");
    let mut s = std::fs::read(d.join("state.bin")).unwrap();
    s[8] = 9;
    std::fs::write(d.join("state.bin"), &s).unwrap();
    let (code, err) = restore(&d, &[]);
    assert_eq!(code, Some(1));
    // The minor version is whatever this corefour writes (1.1 since the virtio section).
    assert!(
        err.contains("version 9.") && err.contains("is not supported"),
        "{err}"
    );
    // Truncated memory.
    let d = copy("memtrunc");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("memory.bin"))
        .unwrap();
    f.set_len(4096).unwrap();
    let (code, err) = restore(&d, &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("truncated"), "{err}");
    // Tampered memory: caught by --verify.
    let d = copy("memtamper");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("memory.bin"))
        .unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"X", 0x100010).unwrap();
    let (code, err) = restore(&d, &["--verify", "--timeout", "1s"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("checksum"), "{err}");
}

/// `corefour vm snapshot` through a real daemon: the VM it runs is snapshotted, and the
/// snapshot restores into a VMM whose output continues the daemon VM's console.
#[test]
fn daemon_vm_snapshot_restores_and_continues() {
    need_kvm!();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: the daemon test needs root (cgroups, state dir)");
        return;
    }
    let kernel = guest("counter");
    let t = Tmp::new("snap-daemon");
    let (mut daemon, sock) = start_daemon(&t);
    let vm = |args: &[&str]| vm_cli(&sock, args);
    let k = kernel.to_str().unwrap();
    let (ok, _, err) = vm(&[
        "create",
        "snapvm",
        "--kernel",
        k,
        "--cmdline",
        "spin=1000000",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = vm(&["start", "snapvm"]);
    assert!(ok, "{err}");
    let t0 = Instant::now();
    while count_lines(&vm(&["console", "snapvm"]).1) < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the VM printed nothing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ok, _, err) = vm(&["pause", "snapvm"]);
    assert!(ok, "{err}");
    std::thread::sleep(Duration::from_millis(200));
    let before = vm(&["console", "snapvm"]).1;
    let snap = t.0.join("vmsnap");
    let (ok, out, err) = vm(&["snapshot", "snapvm", "--path", snap.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("snapshot in"), "{out}");
    let (ok, _, err) = vm(&["snapshot", "nosuchvm"]);
    assert!(!ok && !err.is_empty());
    let _ = vm(&["delete", "--force", "snapvm"]);
    let _ = daemon.kill();
    let _ = daemon.wait();

    let out = t.0.join("restored.out");
    let r = Vmm::start(
        &["--restore", snap.to_str().unwrap()],
        &t.0.join("r.sock"),
        &out,
    );
    r.wait_lines(3);
    let (code, err) = r.shutdown();
    assert_eq!(code, 0, "{err}");
    assert_continues(&before, &std::fs::read_to_string(&out).unwrap());
}

fn start_daemon(t: &Tmp) -> (Child, PathBuf) {
    let sock = t.0.join("d.sock");
    let log = std::fs::File::create(t.0.join("daemon.log")).unwrap();
    let daemon = Command::new(env!("CARGO_BIN_EXE_corefour"))
        .arg("daemon")
        .arg("--socket")
        .arg(&sock)
        .arg("--state-dir")
        .arg(t.0.join("state"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "daemon did not listen"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (daemon, sock)
}

fn vm_cli(sock: &Path, args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_corefour"))
        .arg("vm")
        .args(args)
        .env("COREFOUR_SOCKET", sock)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `corefour vm export` / `import` through a daemon: the imported VM has the same kernel and a
/// byte-identical, still sparse disk; a tampered or truncated archive registers nothing.
#[test]
fn export_import_round_trip_and_refusals() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: the daemon test needs root (cgroups, state dir)");
        return;
    }
    let kernel = guest("counter");
    let t = Tmp::new("snap-export");
    let (mut daemon, sock) = start_daemon(&t);
    let vm = |args: &[&str]| vm_cli(&sock, args);
    let disk = t.0.join("root.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&disk).unwrap();
        f.set_len(256 << 20).unwrap();
        f.write_all_at(b"DISK-MARKER", 100 << 20).unwrap();
    }
    let (ok, _, err) = vm(&[
        "create",
        "ex1",
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk",
        disk.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let archive = t.0.join("ex1.tar.zst");
    let (ok, out, err) = vm(&["export", "ex1", archive.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("exported ex1"), "{out}");
    assert!(
        std::fs::metadata(&archive).unwrap().len() < 1 << 20,
        "a sparse 256 MiB disk exports small"
    );
    let dir = t.0.join("imported");
    let (ok, out, err) = vm(&[
        "import",
        archive.to_str().unwrap(),
        "--name",
        "ex2",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("imported ex2"), "{out}");
    let (ok, info, err) = vm(&["--json", "info", "ex2"]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let new_disk = PathBuf::from(info["disks"][0]["path"].as_str().unwrap());
    assert!(new_disk.starts_with(&dir), "{info}");
    assert_eq!(
        std::fs::read(&new_disk).unwrap(),
        std::fs::read(&disk).unwrap()
    );
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(&new_disk).unwrap().blocks() * 512 < 1 << 20);
    assert_eq!(
        std::fs::read(info["kernel"].as_str().unwrap()).unwrap(),
        std::fs::read(&kernel).unwrap()
    );

    // Tampered and truncated archives: refused, nothing registered, nothing left unpacked.
    let bytes = std::fs::read(&archive).unwrap();
    let mut tampered = bytes.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x20;
    let cases = [
        ("tampered", tampered),
        ("truncated", bytes[..bytes.len() * 2 / 3].to_vec()),
    ];
    for (what, data) in cases {
        let bad = t.0.join(format!("{what}.tar.zst"));
        std::fs::write(&bad, data).unwrap();
        let d = t.0.join(format!("{what}-dir"));
        let (ok, _, err) = vm(&[
            "import",
            bad.to_str().unwrap(),
            "--name",
            what,
            "--dir",
            d.to_str().unwrap(),
        ]);
        assert!(!ok, "{what} archive was accepted");
        assert!(err.contains("nothing was registered"), "{err}");
        assert!(!d.exists(), "{what}: staging left behind");
        let (_, list, _) = vm(&["--json", "list"]);
        assert!(
            !list.contains(&format!("\"{what}\"")),
            "{what} got registered: {list}"
        );
    }
    let _ = vm(&["delete", "--force", "ex1"]);
    let _ = vm(&["delete", "--force", "ex2"]);
    let _ = daemon.kill();
    let _ = daemon.wait();
}
