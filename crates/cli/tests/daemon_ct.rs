//! System containers through the real daemon: `corefour ct` commands over its socket, the
//! inventory, cgroup limits changed live, reconciliation after `kill -9` of the daemon, export and
//! import (a tampered or truncated archive refused with nothing registered), and the stop-copy
//! move between two daemons.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use corefour_daemon::client::Method;
use serde_json::Value;

#[path = "common/daemon.rs"]
mod harness;
use harness::{create_body, is_root, Daemon, EXE};

fn can_run() -> bool {
    if !is_root() {
        eprintln!("skip: needs root (namespaces, cgroups, overlayfs)");
        return false;
    }
    if !Path::new("/bin/busybox").is_file() {
        eprintln!("skip: /bin/busybox missing (Debian package busybox-static)");
        return false;
    }
    true
}

/// A daemon whose containers are all deleted before it goes (containers outlive their daemon).
struct CtDaemon(Daemon);

impl CtDaemon {
    fn start(tag: &str) -> CtDaemon {
        CtDaemon(Daemon::start(tag))
    }

    fn ct(&self, args: &[&str]) -> Output {
        Command::new(EXE)
            .arg("ct")
            .args(args)
            .env("COREFOUR_SOCKET", &self.0.sock)
            .env_remove("COREFOUR_CT_DIR")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.ct(args);
        assert!(
            o.status.success(),
            "ct {args:?}: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.0.log()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    fn info(&self, name: &str) -> Value {
        self.0.ok(Method::GET, &format!("/v1/cts/{name}"), None)
    }

    fn names(&self) -> Vec<String> {
        let v = self.0.ok(Method::GET, "/v1/cts", None);
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn ct_base(&self) -> PathBuf {
        self.0.state_dir().join("cts")
    }
}

/// The daemon's container cgroup parent (its state directory's tag, as the daemon computes it).
fn cgroup_parent(state_dir: &Path) -> String {
    let h = state_dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    format!("corefour-cts-{:04x}", h & 0xffff)
}

impl Drop for CtDaemon {
    fn drop(&mut self) {
        let cleanup = self.0.child.is_some();
        self.delete_all();
        self.0.terminate();
        if cleanup {
            // The daemon removes its cgroup parent on exit; a test that failed midway may not
            // get there.
            let parent = cgroup_parent(&self.0.state_dir());
            if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
                for h in rd.flatten() {
                    let _ = std::fs::remove_dir(h.path().join(&parent));
                }
            }
        }
    }
}

impl CtDaemon {
    fn delete_all(&self) {
        if self.0.child.is_some() {
            if let Ok((_, b)) = self
                .0
                .client
                .call(&self.0.sock, Method::GET, "/v1/cts", None)
            {
                if let Ok(Value::Array(cts)) = serde_json::from_slice::<Value>(&b) {
                    for c in cts {
                        if let Some(n) = c["name"].as_str() {
                            let _ = self.0.client.call(
                                &self.0.sock,
                                Method::DELETE,
                                &format!("/v1/cts/{n}?force=true"),
                                None,
                            );
                        }
                    }
                }
            }
        }
    }
}

fn uniq(n: &str) -> String {
    format!("{n}-{}", std::process::id())
}

/// The container's cgroup directory in the v1 `cpu` hierarchy (or v2's), under the daemon's
/// container parent.
fn cgroup_dir(controller: &str, name: &str) -> Option<PathBuf> {
    let roots = [
        PathBuf::from("/sys/fs/cgroup").join(controller),
        PathBuf::from("/sys/fs/cgroup"),
    ];
    for root in roots {
        let Ok(rd) = std::fs::read_dir(&root) else {
            continue;
        };
        for e in rd.flatten() {
            let fname = e.file_name().to_string_lossy().to_string();
            if fname.starts_with("corefour-cts") && e.path().join(name).is_dir() {
                return Some(e.path().join(name));
            }
        }
    }
    None
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn wait_state(d: &CtDaemon, name: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = d.info(name);
        if v["state"] == state {
            return v;
        }
        assert!(Instant::now() < deadline, "{name} never {state}: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn lifecycle_limits_console_events_and_api_errors() {
    if !can_run() {
        return;
    }
    let d = CtDaemon::start("ct-life");
    let a = uniq("life");
    let c = d.json(&[
        "create",
        &a,
        "--memory",
        "64M",
        "--cpu-quota",
        "50",
        "--pids",
        "64",
    ]);
    assert_eq!(c["state"], "created");
    assert_eq!(c["memory_bytes"], 64 << 20);
    let s = d.json(&["start", &a]);
    assert_eq!(s["state"], "running", "{s}");
    let pid = s["pid"].as_i64().unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    // The limits are in the container's cgroup, under the daemon's container parent.
    let cpu = cgroup_dir("cpu", &a).expect("the container's cpu cgroup");
    let v2 = !cpu.starts_with("/sys/fs/cgroup/cpu");
    if v2 {
        assert_eq!(read(&cpu.join("cpu.max")), "50000 100000");
    } else {
        assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "50000");
        let mem = cgroup_dir("memory", &a).unwrap();
        assert_eq!(
            read(&mem.join("memory.limit_in_bytes")),
            (64 << 20).to_string()
        );
        let procs = read(&cpu.join("cgroup.procs"));
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "init {pid} not in {procs}"
        );
    }
    // ... and change while it runs.
    let i = d.json(&["set", &a, "--cpu-quota", "25", "--memory", "96M"]);
    assert_eq!(i["cpu_quota_pct"], 25);
    assert_eq!(i["memory_bytes"], 96 << 20);
    if v2 {
        assert_eq!(read(&cpu.join("cpu.max")), "25000 100000");
    } else {
        assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "25000");
        let mem = cgroup_dir("memory", &a).unwrap();
        assert_eq!(
            read(&mem.join("memory.limit_in_bytes")),
            (96 << 20).to_string()
        );
    }
    // The process limit, too.
    if !v2 {
        let pids = cgroup_dir("pids", &a).expect("the container's pids cgroup");
        assert_eq!(read(&pids.join("pids.max")), "64");
        d.ok(&["set", &a, "--pids", "32"]);
        assert_eq!(read(&pids.join("pids.max")), "32");
        assert_eq!(d.info(&a)["pids"], 32);
    }
    // Removing the quota lifts it at once.
    d.ok(&["set", &a, "--cpu-quota", "0"]);
    if !v2 {
        assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "-1");
    }

    // exec runs inside (its own PID namespace: the init is pid 1 there).
    let o = d.ct(&["exec", &a, "--", "cat", "/proc/1/cmdline"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("init"));
    // The console: busybox init's shell on the pty, attached through the info's socket (input
    // from a pipe, output drained after it ends), and kept in the log the daemon serves.
    let mut child = Command::new(EXE)
        .args(["ct", "console", &a])
        .env("COREFOUR_SOCKET", &d.0.sock)
        .env_remove("COREFOUR_CT_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"echo console-$((40+2))\n").unwrap();
    drop(child.stdin.take());
    let o = child.wait_with_output().unwrap();
    // The terminal echoes the typed line at once; the shell's answer may come after the attach
    // stopped draining on a loaded machine, but the log has it.
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("console-$((40+2))"),
        "attach: {} {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = d.ok(&["console", &a, "--log"]);
        if log.contains("BusyBox") && log.contains("console-42") {
            break;
        }
        assert!(Instant::now() < deadline, "log: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // API errors: clear 4xx, nothing changed.
    let (st, v) = d.0.req(Method::POST, "/v1/cts", Some("{\"name\": "));
    assert_eq!(st, 400, "{v}");
    let (st, v) =
        d.0.req(Method::POST, "/v1/cts", Some(r#"{"name":"x1","memroy":5}"#));
    assert_eq!(st, 400);
    assert!(
        v["fault_message"].as_str().unwrap().contains("memroy"),
        "{v}"
    );
    let (st, _) =
        d.0.req(Method::POST, "/v1/cts", Some(r#"{"name":"../etc"}"#));
    assert_eq!(st, 400);
    let (st, _) = d.0.req(
        Method::POST,
        "/v1/cts",
        Some(&format!(r#"{{"name":"{a}"}}"#)),
    );
    assert_eq!(st, 409);
    // One name space with the VMs.
    let vm = uniq("shared");
    d.0.ok(Method::POST, "/v1/vms", Some(&create_body(&vm)));
    let (st, v) = d.0.req(
        Method::POST,
        "/v1/cts",
        Some(&format!(r#"{{"name":"{vm}"}}"#)),
    );
    assert_eq!(st, 409, "{v}");
    d.0.ok(Method::DELETE, &format!("/v1/vms/{vm}"), None);
    let (st, _) = d.0.req(Method::DELETE, &format!("/v1/cts/{a}"), None);
    assert_eq!(st, 409, "deleting a running container needs force");
    let (st, _) = d.0.req(
        Method::PATCH,
        &format!("/v1/cts/{a}"),
        Some(r#"{"cpu_weight":20000}"#),
    );
    assert_eq!(st, 400);
    assert!(d.names().contains(&a));

    // Pause freezes every process; resume thaws; a paused container still stops gracefully.
    let p = d.json(&["pause", &a]);
    assert_eq!(p["state"], "paused", "{p}");
    let freezer = cgroup_dir("freezer", &a);
    if let Some(f) = &freezer {
        assert_eq!(read(&f.join("freezer.state")), "FROZEN");
    }
    let (st, _) = d.0.req(Method::POST, &format!("/v1/cts/{a}/pause"), None);
    assert_eq!(st, 409, "pausing twice");
    assert_eq!(d.json(&["resume", &a])["state"], "running");
    if let Some(f) = &freezer {
        assert_eq!(read(&f.join("freezer.state")), "THAWED");
    }
    d.ok(&["pause", &a]);

    // Graceful stop: the init shuts down on SIGTERM; the cgroup goes with it.
    let t0 = Instant::now();
    let s = d.json(&["stop", &a, "--timeout", "10"]);
    assert_eq!(s["state"], "stopped");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "stop hit the timeout"
    );
    assert!(
        s["stop_reason"].as_str().unwrap().contains("on request"),
        "{s}"
    );
    assert!(!Path::new(&format!("/proc/{pid}")).exists() || pid_is_zombie_or_other(pid));
    assert!(cgroup_dir("cpu", &a).is_none(), "cgroup left behind");

    // kill: SIGKILL, recorded as such.
    d.ok(&["start", &a]);
    let k = d.json(&["kill", &a]);
    assert_eq!(k["state"], "stopped");
    assert!(
        k["stop_reason"].as_str().unwrap().contains("SIGKILL"),
        "{k}"
    );

    // A container whose init ends by itself is marked stopped with the reason.
    d.ok(&["start", &a]);
    let _ = d.ct(&["exec", &a, "--", "poweroff", "-f"]);
    let v = wait_state(&d, &a, "stopped");
    assert!(
        v["stop_reason"].as_str().unwrap().contains("powered"),
        "{v}"
    );

    let evs = d.ok(&["events", &a, "--json"]);
    let kinds: Vec<String> = evs
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for k in ["created", "started", "limits", "stopped"] {
        assert!(kinds.iter().any(|x| x == k), "no {k} event in {kinds:?}");
    }
    d.ok(&["delete", &a]);
    assert!(!d.names().contains(&a));
    assert!(!d.ct_base().join("containers").join(&a).exists());
    let o = d.ct(&["info", &a]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains(&a));

    // Files a killed daemon left without a row (a create it did not finish) do not block the
    // name.
    let orphan = d.ct_base().join("containers").join(&a);
    std::fs::create_dir_all(orphan.join("upper")).unwrap();
    let c = d.json(&["create", &a]);
    assert_eq!(c["state"], "created");
    assert!(orphan.join("ct.json").exists());
}

fn pid_is_zombie_or_other(pid: i64) -> bool {
    // A recycled pid belongs to another process: the old init is gone either way.
    std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .map(|c| !c.contains("init"))
        .unwrap_or(true)
}

#[test]
fn kill9_of_the_daemon_is_reconciled() {
    if !can_run() {
        return;
    }
    let mut d = CtDaemon::start("ct-k9");
    let (a, b) = (uniq("k9a"), uniq("k9b"));
    d.ok(&["create", &a, "--start"]);
    d.ok(&["create", &b, "--start"]);
    let pb = d.info(&b)["pid"].as_i64().unwrap();
    d.0.kill9();
    // While no daemon runs: b's init dies, a keeps running.
    Command::new("kill")
        .args(["-9", &pb.to_string()])
        .status()
        .unwrap();
    // The shim records the exit (after cleaning up) while no daemon listens.
    let rec = d.ct_base().join("containers").join(&b).join("exit.json");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !rec.exists() {
        assert!(
            Instant::now() < deadline,
            "the shim never recorded the exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.0.spawn();
    let va = d.info(&a);
    assert_eq!(va["state"], "running", "{va}");
    let vb = d.info(&b);
    assert_eq!(vb["state"], "stopped", "{vb}");
    let reason = vb["stop_reason"].as_str().unwrap();
    assert!(
        reason.contains("SIGKILL") && reason.contains("daemon was down"),
        "{reason}"
    );
    // The new daemon controls the survivor.
    let s = d.json(&["stop", &a, "--timeout", "5"]);
    assert_eq!(s["state"], "stopped");
    let evs = d.ok(&["events", &a]);
    assert!(evs.contains("reconciled"), "{evs}");
}

/// Rewrites the archive with one byte of `member` changed (same size), recompressed: a valid
/// tar.zst whose manifest no longer matches.
fn tamper(src: &Path, dst: &Path, member: &str) {
    let f = std::fs::File::open(src).unwrap();
    let mut ar = tar::Archive::new(zstd::Decoder::new(f).unwrap());
    let out = std::fs::File::create(dst).unwrap();
    let mut b = tar::Builder::new(zstd::Encoder::new(out, 3).unwrap().auto_finish());
    let mut hit = false;
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        let mut h = e.header().clone();
        if e.path().unwrap().to_string_lossy() == member {
            let i = data
                .iter()
                .position(|&c| c == b'M')
                .expect("a byte to flip");
            data[i] = b'N';
            hit = true;
        }
        b.append_data(&mut h, e.path().unwrap(), &data[..]).unwrap();
    }
    b.finish().unwrap();
    assert!(hit, "no member {member}");
}

#[test]
fn export_import_round_trip_and_bad_archives_register_nothing() {
    if !can_run() {
        return;
    }
    let d1 = CtDaemon::start("ct-exp1");
    let d2 = CtDaemon::start("ct-exp2");
    let a = uniq("exp");
    d1.ok(&["create", &a, "--memory", "48M", "--start"]);
    d1.ok(&[
        "exec",
        &a,
        "--",
        "sh",
        "-c",
        "echo MARKER-one > /root/marker && rm /etc/hosts && mkdir -p /opt/d && echo x > /opt/d/f",
    ]);
    let o = d1.ct(&["export", &a, "/tmp/never.tar.zst"]);
    assert!(!o.status.success(), "export of a running container");
    assert!(String::from_utf8_lossy(&o.stderr).contains("stop it first"));
    d1.ok(&["stop", &a]);
    let file = d1.0.dir.0.join("a.tar.zst");
    let f = file.to_str().unwrap();
    d1.ok(&["export", &a, f]);
    assert!(file.metadata().unwrap().len() > 0);
    assert!(!file.with_extension("partial").exists());

    // Round trip into another daemon under a new name: files, deletions and limits come along.
    let b = uniq("imp");
    let i = d2.json(&["import", f, "--name", &b, "--start"]);
    assert_eq!(i["state"], "running", "{i}");
    assert_eq!(i["memory_bytes"], 48 << 20);
    let o = d2.ct(&["exec", &b, "--", "cat", "/root/marker", "/opt/d/f"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "MARKER-one\nx\n");
    let o = d2.ct(&["exec", &b, "--", "test", "-e", "/etc/hosts"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "the deletion (overlay whiteout) was lost"
    );
    let o = d2.ct(&["exec", &b, "--", "test", "-e", "/etc/passwd"]);
    assert!(o.status.success(), "the template's files are gone");

    // --full: the whole root, no template needed on the other side.
    let full = d1.0.dir.0.join("full.tar.zst");
    d1.ok(&["export", &a, full.to_str().unwrap(), "--full"]);
    let c = uniq("full");
    d2.ok(&["import", full.to_str().unwrap(), "--name", &c, "--start"]);
    let o = d2.ct(&["exec", &c, "--", "cat", "/root/marker"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "MARKER-one\n");

    // A tampered archive (valid tar.zst, one byte of the root file system changed), a truncated
    // one, and a name already taken: refused, nothing registered, nothing left on disk.
    let bad = d1.0.dir.0.join("bad.tar.zst");
    tamper(&file, &bad, "rootfs.tar");
    let n = uniq("tampered");
    let o = d2.ct(&["import", bad.to_str().unwrap(), "--name", &n]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("checksum") && err.contains("nothing was registered"),
        "{err}"
    );
    let bytes = std::fs::read(&file).unwrap();
    let cut = d1.0.dir.0.join("cut.tar.zst");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = d2.ct(&["import", cut.to_str().unwrap(), "--name", &n]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("truncated"));
    let o = d2.ct(&["import", f, "--name", &b]);
    assert!(!o.status.success(), "a second import under a taken name");
    assert!(!d2.names().contains(&n));
    assert_eq!(d2.names().len(), 2);
    assert!(!d2.ct_base().join("containers").join(&n).exists());
    let left: Vec<_> = std::fs::read_dir(d2.ct_base().join("transfer"))
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "scratch left: {left:?}");
    let evs = d2.ok(&["events", "--limit", "1000"]);
    assert!(!evs.contains(&n), "{evs}");
}

#[test]
fn move_between_daemons() {
    if !can_run() {
        return;
    }
    let d1 = CtDaemon::start("ct-mv1");
    let d2 = CtDaemon::start("ct-mv2");
    let a = uniq("mv");
    d1.ok(&["create", &a, "--cpu-quota", "50", "--start"]);
    d1.ok(&["exec", &a, "--", "sh", "-c", "echo moved-data > /root/m"]);
    let to = d2.0.sock.to_str().unwrap().to_string();

    // Target unreachable, or already holding the name: refused before the source is touched.
    let o = d1.ct(&["move", &a, "--to", "/nonexistent/d.sock"]);
    assert!(!o.status.success());
    let pid = d1.info(&a)["pid"].as_i64().unwrap();
    d2.ok(&["create", &a]);
    let o = d1.ct(&["move", &a, "--to", &to]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already has"));
    assert_eq!(
        d1.info(&a)["pid"].as_i64(),
        Some(pid),
        "the source was touched"
    );
    d2.ok(&["delete", &a]);

    let m = d1.json(&["move", &a, "--to", &to]);
    assert_eq!(m["state"], "running", "{m}");
    assert!(!d1.names().contains(&a), "the source still has it");
    let i = d2.info(&a);
    assert_eq!(i["state"], "running");
    assert_eq!(i["cpu_quota_pct"], 50);
    let o = d2.ct(&["exec", &a, "--", "cat", "/root/m"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "moved-data\n");
    assert!(!d1.ct_base().join("containers").join(&a).exists());

    // Back to the first daemon as to another host: through `ssh HOST corefour ct ...`, here a
    // stand-in ssh that runs the command locally against that daemon's socket.
    let ssh = d1.0.dir.0.join("fake-ssh");
    std::fs::write(
        &ssh,
        format!(
            "#!/bin/sh\nshift\nCOREFOUR_SOCKET={} exec \"$@\"\n",
            d1.0.sock.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&ssh, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let via = |ssh_cmd: &Path| {
        Command::new(EXE)
            .args(["ct", "move", &a, "--to", "ssh://testhost", "--json"])
            .env("COREFOUR_SOCKET", &d2.0.sock)
            .env("COREFOUR_SSH", ssh_cmd)
            .env("COREFOUR_REMOTE_BIN", EXE)
            .env_remove("COREFOUR_CT_DIR")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // An ssh that fails: nothing changes.
    let o = via(Path::new("/bin/false"));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing was changed"));
    assert_eq!(d2.info(&a)["state"], "running");
    // A target that answers but fails the import, after the source has stopped: the source
    // starts again and the target keeps nothing.
    let flaky = d1.0.dir.0.join("flaky-ssh");
    std::fs::write(
        &flaky,
        format!(
            "#!/bin/sh\nshift\nif [ \"$3\" = import ]; then cat >/dev/null; echo 'corefour: no space left on device' >&2; exit 1; fi\nCOREFOUR_SOCKET={} exec \"$@\"\n",
            d1.0.sock.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&flaky, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pid_before = d2.info(&a)["pid"].as_i64().unwrap();
    let o = via(&flaky);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no space left") && err.contains("restarted"),
        "{err}"
    );
    let v = d2.info(&a);
    assert_eq!(v["state"], "running", "the source was not restarted: {v}");
    assert_ne!(v["pid"].as_i64(), Some(pid_before));
    assert!(!d1.names().contains(&a));
    let o = d2.ct(&["exec", &a, "--", "cat", "/root/m"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "moved-data\n");

    let o = via(&ssh);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(m["to"], "ssh://testhost");
    assert!(!d2.names().contains(&a));
    assert_eq!(d1.info(&a)["state"], "running");
    let o = d1.ct(&["exec", &a, "--", "cat", "/root/m"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "moved-data\n");
}

/// Deletes a test bridge on drop.
struct Bridge(String);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn bridge_networking_through_the_daemon() {
    if !can_run() {
        return;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        eprintln!("skip: no `ip` (Debian package iproute2)");
        return;
    }
    let d = CtDaemon::start("ct-net");
    let pid = std::process::id();
    let br = Bridge(format!("c4n{}", pid % 1_000_000));
    let subnet = format!("10.234.{}.0/24", pid % 250);
    let (a, b) = (uniq("neta"), uniq("netb"));
    let mut addrs = Vec::new();
    for n in [&a, &b] {
        let i = d.json(&[
            "create", n, "--net", "bridge", "--bridge", &br.0, "--subnet", &subnet, "--start",
        ]);
        assert_eq!(i["state"], "running", "{i}");
        assert_eq!(i["net"]["bridge"], br.0.as_str());
        addrs.push(i["address"].as_str().unwrap().to_string());
    }
    assert_ne!(addrs[0], addrs[1]);
    let o = d.ct(&["exec", &a, "--", "ping", "-c", "1", "-W", "3", &addrs[1]]);
    assert!(
        o.status.success(),
        "ping {} from {a}: {}{}",
        addrs[1],
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // Stopped, the container's netns and veth are gone; started again, it has the same address.
    d.ok(&["stop", &b, "--timeout", "5"]);
    assert!(!Path::new(&format!("/run/netns/corefour-{b}")).exists());
    let i = d.json(&["start", &b]);
    assert_eq!(i["address"].as_str(), Some(addrs[1].as_str()));
    let o = d.ct(&["exec", &b, "--", "ping", "-c", "1", "-W", "3", &addrs[0]]);
    assert!(o.status.success(), "ping after restart");
}

#[test]
fn concurrent_creates_and_deletes_share_one_template_build() {
    if !can_run() {
        return;
    }
    // A fresh daemon: the template is not cached, so the first creates race to build it.
    let d = CtDaemon::start("ct-conc");
    let names: Vec<String> = (0..6).map(|i| uniq(&format!("cc{i}"))).collect();
    std::thread::scope(|s| {
        for n in &names {
            let d = &d;
            s.spawn(move || {
                let (st, v) = d.0.req(
                    Method::POST,
                    "/v1/cts",
                    Some(&format!(r#"{{"name":"{n}","start":true}}"#)),
                );
                assert_eq!(st, 201, "{n}: {v}");
            });
        }
        // The same name from two clients at once: exactly one wins.
        let dup = uniq("dup");
        let codes: Vec<u16> = (0..2)
            .map(|_| {
                let (d, dup) = (&d, dup.clone());
                s.spawn(move || {
                    d.0.req(
                        Method::POST,
                        "/v1/cts",
                        Some(&format!(r#"{{"name":"{dup}"}}"#)),
                    )
                    .0
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let mut codes = codes;
        codes.sort();
        assert_eq!(codes, [201, 409]);
    });
    let listed = d.names();
    for n in &names {
        assert!(listed.contains(n), "{n} missing from {listed:?}");
        assert_eq!(d.info(n)["state"], "running");
    }
    assert_eq!(listed.len(), names.len() + 1);
    std::thread::scope(|s| {
        for n in &names {
            let d = &d;
            s.spawn(move || {
                let (st, v) =
                    d.0.req(Method::DELETE, &format!("/v1/cts/{n}?force=true"), None);
                assert_eq!(st, 204, "{n}: {v}");
            });
        }
    });
    assert_eq!(d.names().len(), 1);
}
