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
        self.0.state_dir().join("ct")
    }
}

impl Drop for CtDaemon {
    fn drop(&mut self) {
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
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("console-42"),
        "attach: {} {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let log = d.ok(&["console", &a, "--log"]);
    assert!(
        log.contains("BusyBox") && log.contains("console-42"),
        "log: {log}"
    );

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
    std::thread::sleep(Duration::from_millis(300));
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
}
