//! Warm restores through the real binary: `corefour vmm --prewarm` restores the `counter`
//! guest (twice from one snapshot) and it counts on with no gap or repeat; a warm VMM of
//! another shape refuses and stays warm; the daemon's pool restores into a warm VMM of the
//! VM's shape only, refills itself, and replaces a warm VMM that was killed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corefour_daemon::client::Method;
use serde_json::json;

#[path = "common/daemon.rs"]
mod harness;
use harness::{console, wait_console_until, Daemon};

#[path = "common/guests.rs"]
#[macro_use]
mod guests;
use guests::{counts, guest, Tmp};

const EXE: &str = env!("CARGO_BIN_EXE_corefour");

/// A VMM child whose stdout goes to a file.
struct Vmm {
    child: Child,
    out: PathBuf,
}

impl Vmm {
    fn spawn(args: &[&str], sock: &Path, out: &Path) -> Self {
        let child = Command::new(EXE)
            .arg("vmm")
            .args(args)
            .arg("--api-sock")
            .arg(sock)
            .stdout(std::fs::File::create(out).unwrap())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn corefour vmm");
        wait_accepting(sock);
        Self {
            child,
            out: out.to_path_buf(),
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn wait_counts(&self, n: usize) {
        let t = Instant::now();
        while counts(&self.output()).len() < n {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "guest printed too little: {:?}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Shuts down through `sock` and returns (exit code, stderr).
    fn shutdown(mut self, sock: &Path) -> (i32, String) {
        wait_accepting(sock);
        let _ = put(sock, "/vm/shutdown", None);
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

fn wait_accepting(sock: &Path) {
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never accepted a connection",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn put(sock: &Path, path: &str, body: Option<&str>) -> (u16, String) {
    let r =
        corefour_vmm::api_client::call(sock, "PUT", path, body, Duration::from_secs(60)).unwrap();
    (r.status, r.body)
}

/// The output before the snapshot followed by a restored copy's counts 0, 1, 2, ... with
/// nothing missing or repeated (a line cut by the snapshot is completed by the copy).
fn assert_continues(before: &str, after: &str) {
    assert!(
        !after.contains("MISMATCH"),
        "memory was not restored: {after:?}"
    );
    let joined = format!("{before}{after}");
    let c = counts(&joined);
    assert!(c.len() > counts(before).len() + 2, "{after:?}");
    for (i, n) in c.iter().enumerate() {
        assert_eq!(*n, i as u64, "count broken at line {i}: {joined:?}");
    }
}

#[test]
fn warm_vmm_restores_twice_and_refuses_another_shape() {
    need_kvm!();
    let kernel = guest("counter");
    let t = Tmp::new("snap-warm");
    let src_sock = t.0.join("src.sock");
    let src = Vmm::spawn(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64M",
            "--cmdline",
            "spin=1000000",
            "--timeout",
            "60s",
        ],
        &src_sock,
        &t.0.join("src.out"),
    );
    src.wait_counts(5);
    // Paused first, so what the source printed is exactly what precedes the snapshot.
    assert_eq!(put(&src_sock, "/vm/pause", None).0, 204);
    std::thread::sleep(Duration::from_millis(200));
    let before = src.output();
    let snap = t.0.join("snap");
    let body = json!({ "path": snap }).to_string();
    let (code, resp) = put(&src_sock, "/vm/snapshot", Some(&body));
    assert_eq!(code, 200, "{resp}");
    let (code, err) = src.shutdown(&src_sock);
    assert_eq!(code, 0, "{err}");

    // Another shape: refused before anything changed, and the VMM stays warm.
    let wrong_sock = t.0.join("wrong.sock");
    let wrong = Vmm::spawn(
        &["--prewarm", "--vcpus", "2", "--memory", "64M"],
        &wrong_sock,
        &t.0.join("wrong.out"),
    );
    let (code, resp) = put(&wrong_sock, "/vm/restore", Some(&body));
    assert_eq!(code, 409, "{resp}");
    assert!(resp.contains("1 vCPUs"), "{resp}");
    let info =
        corefour_vmm::api_client::call(&wrong_sock, "GET", "/vm", None, Duration::from_secs(5))
            .unwrap();
    assert!(info.body.contains(r#""state":"warm""#), "{}", info.body);
    let (code, err) = wrong.shutdown(&wrong_sock);
    assert_eq!(code, 0, "{err}");
    assert!(wrong_out_is_empty(&t.0.join("wrong.out")));

    // The right shape, twice from the same snapshot: once serving its API where it waited,
    // once on a new socket.
    for round in 0..2 {
        let warm_sock = t.0.join(format!("warm{round}.sock"));
        let out = t.0.join(format!("warm{round}.out"));
        let w = Vmm::spawn(
            &["--prewarm", "--memory", "64M", "--timeout", "60s"],
            &warm_sock,
            &out,
        );
        let run_sock = if round == 0 {
            warm_sock.clone()
        } else {
            t.0.join("run1.sock")
        };
        let req = json!({ "path": snap, "api_sock": run_sock }).to_string();
        let (code, resp) = put(&warm_sock, "/vm/restore", Some(&req));
        assert_eq!(code, 200, "{resp}");
        let report: serde_json::Value = serde_json::from_str(&resp).unwrap();
        assert!(report["total_ms"].as_f64().unwrap() > 0.0, "{resp}");
        assert!(report["phases"]["map memory"].is_number(), "{resp}");
        w.wait_counts(3);
        let (code, err) = w.shutdown(&run_sock);
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("(warm, 1 layer"), "{err}");
        assert_continues(&before, &std::fs::read_to_string(&out).unwrap());
    }
}

fn wrong_out_is_empty(p: &Path) -> bool {
    std::fs::read_to_string(p).unwrap_or_default().is_empty()
}

/// The warm VMMs of the daemon's pool that are ready: (vCPUs, MiB, VMM pid, warm dir).
fn warm_vmms(d: &Daemon) -> Vec<(u32, u64, i32, PathBuf)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(d.state_dir().join("warm")) else {
        return out;
    };
    for e in rd.flatten() {
        let dir = e.path();
        if dir.join("claimed").exists()
            || std::os::unix::net::UnixStream::connect(dir.join("vmm.sock")).is_err()
        {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(dir.join("pids"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(2)?.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let after = |flag: &str| {
            let i = args.iter().position(|a| a == flag)?;
            args.get(i + 1).cloned()
        };
        let (Some(v), Some(m)) = (after("--vcpus"), after("--memory")) else {
            continue;
        };
        let (Ok(v), Ok(m)) = (v.parse(), m.trim_end_matches('M').parse()) else {
            continue;
        };
        out.push((v, m, pid, dir));
    }
    out
}

/// Waits until the pool holds a warm VMM of `shape` whose pid is not in `not`; returns it.
fn wait_warm(d: &Daemon, shape: (u32, u64), not: &[i32]) -> (i32, PathBuf) {
    let t = Instant::now();
    loop {
        if let Some((_, _, pid, dir)) = warm_vmms(d)
            .into_iter()
            .find(|(v, m, pid, _)| (*v, *m) == shape && !not.contains(pid))
        {
            return (pid, dir);
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no warm VMM {shape:?} beside {not:?}: {:?}\n{}",
            warm_vmms(d),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Snapshots the running counter VM `name` (paused first) and kills it; returns the console
/// so far and the snapshot.
fn snapshot_and_kill(d: &Daemon, name: &str, dir: &Path) -> (String, PathBuf) {
    wait_console_until(d, name, |t| counts(t).len() >= 5);
    d.ok(Method::POST, &format!("/v1/vms/{name}/pause"), None);
    std::thread::sleep(Duration::from_millis(200));
    let snap = dir.join(format!("{name}-snap"));
    let out = d.cli(&["snapshot", name, "--path", snap.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    d.ok(Method::POST, &format!("/v1/vms/{name}/kill"), None);
    d.wait_state(name, "stopped", Duration::from_secs(10));
    (console(d, name), snap)
}

/// Restores `name` from `snap` and returns what its console added once it counted 3 more.
fn restore(d: &Daemon, name: &str, snap: &Path, before: &str) -> String {
    let out = d.cli(&["restore", name, "--from", snap.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}\n{}", d.log());
    let text = wait_console_until(d, name, |t| {
        t.len() > before.len() && counts(&t[before.len()..]).len() >= 3
    });
    text[before.len()..].to_string()
}

#[test]
fn daemon_pool_restores_warm_refills_and_replaces_the_dead() {
    need_kvm!();
    let counter = guest("counter");
    let d = Daemon::start_full(
        "warm",
        None,
        &[
            "--warm-pool",
            "1",
            "--warm-shape",
            "1x64",
            "--warm-shape",
            "2x64",
        ],
    );
    let tmp = Tmp::new("daemon-warm");
    let (first, _) = wait_warm(&d, (1, 64), &[]);
    let (two, _) = wait_warm(&d, (2, 64), &[]);

    d.ok(
        Method::POST,
        "/v1/vms",
        Some(
            &json!({"name": "c", "kernel": counter, "cmdline": "spin=1000000", "start": true})
                .to_string(),
        ),
    );
    let (before, snap) = snapshot_and_kill(&d, "c", &tmp.0);
    let before_guest = guests::without_vmm_lines(&before);

    // Twice from the same snapshot, each time into a warm VMM of the VM's shape, and the
    // count goes on from the snapshot each time.
    let mut used = vec![first];
    for round in 0..2 {
        let mark = console(&d, "c");
        let after = restore(&d, "c", &snap, &mark);
        assert!(after.contains("(warm, 1 layer"), "round {round}: {after}");
        let info = d.ok(Method::GET, "/v1/vms/c", None);
        assert_eq!(info["state"], "running", "{info}");
        assert_eq!(info["pid"].as_i64(), Some(i64::from(used[round])), "{info}");
        assert_continues(&before_guest, &guests::without_vmm_lines(&after));
        // The pool refilled: a new 1x64 warm VMM, the 2x64 one untouched.
        let (next, _) = wait_warm(&d, (1, 64), &used);
        used.push(next);
        assert_eq!(wait_warm(&d, (2, 64), &[]).0, two);
        d.ok(Method::POST, "/v1/vms/c/kill", None);
        d.wait_state("c", "stopped", Duration::from_secs(10));
    }
    // A stop recorded through the warm shim reads like any other.
    let info = d.ok(Method::GET, "/v1/vms/c", None);
    assert!(
        info["stop_reason"]
            .as_str()
            .unwrap_or("")
            .contains("signal 9"),
        "{info}"
    );

    // A killed warm VMM is noticed and replaced.
    let (victim, victim_dir) = wait_warm(&d, (1, 64), &[]);
    let st = Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let mut gone = used.clone();
    gone.push(victim);
    wait_warm(&d, (1, 64), &gone);
    let t = Instant::now();
    while victim_dir.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{}",
            victim_dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A VM of no pooled shape restores cold, and no warm VMM is used for it.
    let pool_before: Vec<i32> = warm_vmms(&d).iter().map(|w| w.2).collect();
    d.ok(
        Method::POST,
        "/v1/vms",
        Some(
            &json!({"name": "s", "kernel": counter, "cmdline": "spin=1000000",
                    "memory_mib": 32, "start": true})
            .to_string(),
        ),
    );
    let (before, snap) = snapshot_and_kill(&d, "s", &tmp.0);
    let after = restore(&d, "s", &snap, &before);
    assert!(after.contains("(cold, 1 layer"), "{after}");
    assert_continues(
        &guests::without_vmm_lines(&before),
        &guests::without_vmm_lines(&after),
    );
    let mut pool_after: Vec<i32> = warm_vmms(&d).iter().map(|w| w.2).collect();
    let mut pool_before = pool_before;
    pool_before.sort_unstable();
    pool_after.sort_unstable();
    assert_eq!(pool_before, pool_after);
}
