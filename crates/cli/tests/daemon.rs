//! The daemon, driven through its real binary and socket: inventory, API errors, lifecycle,
//! reconciliation after `kill -9`, the CLI. Each test runs its own daemon with its own state dir.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corefour_daemon::client::blocking::Client;
use corefour_daemon::client::Method;
use serde_json::{json, Value};

#[path = "common/daemon.rs"]
mod harness;
use harness::*;

/// The real VMM is there when `corefour vmm --help` succeeds.
fn real_vmm() -> bool {
    Command::new(EXE)
        .args(["vmm", "--help"])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("--config"))
        .unwrap_or(false)
}

fn pid_alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let st = s.rsplit(')').next().unwrap_or("").split_whitespace().next();
            st != Some("Z") && st != Some("X")
        })
        .unwrap_or(false)
}

fn sigkill(pid: i64) {
    let st = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn create_list_info_delete() {
    let d = Daemon::start("crud");
    let v = d.ok(Method::POST, "/v1/vms", Some(&create_body("crud-a")));
    assert_eq!(v["state"], "created");
    assert_eq!(
        v["kernel"],
        std::fs::canonicalize(EXE).unwrap().display().to_string()
    );
    d.ok(
        Method::POST,
        "/v1/vms",
        Some(
            &json!({"name": "crud-b", "kernel": some_file(), "vcpus": 2, "memory_mib": 128, "balloon_mib": 32,
                     "cpu_quota_pct": 50, "nets": [{"bridge": "c4test0"}]})
            .to_string(),
        ),
    );
    let (s, v) = d.req(Method::POST, "/v1/vms", Some(&create_body("crud-a")));
    assert_eq!(s, 409, "{v}");
    assert!(v["fault_message"]
        .as_str()
        .unwrap()
        .contains("already exists"));
    let list = d.ok(Method::GET, "/v1/vms", None);
    let names: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, [json!("crud-a"), json!("crud-b")]);
    let b = d.ok(Method::GET, "/v1/vms/crud-b", None);
    assert_eq!(
        (b["vcpus"].clone(), b["memory_mib"].clone()),
        (json!(2), json!(128))
    );
    assert!(b["nics"][0]["mac"].as_str().unwrap().starts_with("02:c4:"));
    assert_eq!(b["balloon_mib"], 32);
    assert_eq!(d.req(Method::DELETE, "/v1/vms/crud-a", None).0, 204);
    assert_eq!(d.req(Method::GET, "/v1/vms/crud-a", None).0, 404);
    assert_eq!(d.req(Method::DELETE, "/v1/vms/crud-a", None).0, 404);
    assert!(!d.state_dir().join("vms/crud-a").exists());
    assert!(d.state_dir().join("vms/crud-b").is_dir());
    // The CLI sees the same inventory.
    let out = d.cli(&["list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let l: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(l.as_array().unwrap().len(), 1);
    let out = d.cli(&["info", "crud-b"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cpu quota:   50%"),
        "{out:?}"
    );
    let ev = d.ok(Method::GET, "/v1/events", None);
    let kinds: Vec<_> = ev
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["created", "created", "deleted"]);
}

#[test]
fn concurrent_creates_and_deletes_lose_and_duplicate_nothing() {
    let d = Daemon::start("conc");
    let threads: usize = 8;
    let per: usize = 20;
    let results: Vec<(usize, u32)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let d = &d;
                s.spawn(move || {
                    let c = Client::new().unwrap();
                    let mut dup_ok = 0;
                    for i in 0..per {
                        let body = create_body(&format!("conc-{t}-{i}"));
                        let (st, _) = c
                            .call(&d.sock, Method::POST, "/v1/vms", Some(body.into_bytes()))
                            .unwrap();
                        assert_eq!(st.as_u16(), 201);
                        // Every thread races for the same few names: exactly one create wins each.
                        let (st, _) = c
                            .call(
                                &d.sock,
                                Method::POST,
                                "/v1/vms",
                                Some(create_body(&format!("conc-dup-{}", i % 5)).into_bytes()),
                            )
                            .unwrap();
                        assert!(st.as_u16() == 201 || st.as_u16() == 409, "{st}");
                        dup_ok += u32::from(st.as_u16() == 201);
                    }
                    (t, dup_ok)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        results.iter().map(|r| r.1).sum::<u32>(),
        5,
        "each contested name created exactly once"
    );
    let list = d.ok(Method::GET, "/v1/vms", None);
    let mut names: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), threads * per + 5);
    names.dedup();
    assert_eq!(names.len(), threads * per + 5, "no duplicated rows");

    // Now delete everything from many threads, each name twice: one 204, one 404.
    std::thread::scope(|s| {
        for t in 0..threads {
            let d = &d;
            let names = &names;
            s.spawn(move || {
                let c = Client::new().unwrap();
                for (i, n) in names.iter().enumerate() {
                    if i % threads == t || (i + 1) % threads == t {
                        let (st, _) = c
                            .call(&d.sock, Method::DELETE, &format!("/v1/vms/{n}"), None)
                            .unwrap();
                        assert!(st.as_u16() == 204 || st.as_u16() == 404, "{st}");
                    }
                }
            });
        }
    });
    assert_eq!(d.ok(Method::GET, "/v1/vms", None), json!([]));
    let ev = d.ok(Method::GET, "/v1/events?since=0&limit=10000", None);
    let count = |k: &str| {
        ev.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == k)
            .count()
    };
    assert_eq!(count("created"), threads * per + 5);
    assert_eq!(count("deleted"), threads * per + 5);
    let left = std::fs::read_dir(d.state_dir().join("vms"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "no VM directory left behind");
}

#[test]
fn malformed_json_and_unknown_fields_are_400_with_a_clear_message() {
    let d = Daemon::start("bad");
    d.ok(Method::POST, "/v1/vms", Some(&create_body("bad-a")));
    let cases: &[(Method, &str, &str, &str)] = &[
        (Method::POST, "/v1/vms", "{", "EOF while parsing"),
        (Method::POST, "/v1/vms", "not json", "expected"),
        (Method::POST, "/v1/vms", "", "EOF"),
        (
            Method::POST,
            "/v1/vms",
            r#"{"name":"x","kernel":"/bin/sh","vcpu":2}"#,
            "unknown field `vcpu`",
        ),
        (
            Method::POST,
            "/v1/vms",
            r#"{"name":"x","kernel":"/bin/sh","vcpus":"two"}"#,
            "invalid type",
        ),
        (
            Method::POST,
            "/v1/vms",
            r#"{"name":"x","kernel":"/bin/sh","disks":[{"path":"/bin/sh","ro":true}]}"#,
            "unknown field `ro`",
        ),
        (
            Method::POST,
            "/v1/vms",
            r#"{"kernel":"/bin/sh"}"#,
            "missing field `name`",
        ),
        (Method::POST, "/v1/vms", r#"[1,2]"#, "invalid type"),
        (
            Method::PATCH,
            "/v1/vms/bad-a",
            r#"{"cpu_quota":5}"#,
            "unknown field `cpu_quota`",
        ),
        (
            Method::PATCH,
            "/v1/vms/bad-a",
            r#"{"cpu_weight":0.5}"#,
            "invalid type",
        ),
        (
            Method::POST,
            "/v1/vms/bad-a/stop",
            r#"{"timeout":1}"#,
            "unknown field `timeout`",
        ),
        (
            Method::DELETE,
            "/v1/vms/bad-a?forse=true",
            "",
            "unknown field `forse`",
        ),
        (Method::GET, "/v1/events?since=abc", "", "invalid type"),
    ];
    for (m, uri, body, want) in cases {
        let body = if body.is_empty() && *m != Method::POST {
            None
        } else {
            Some(*body)
        };
        let (s, v) = d.req(m.clone(), uri, body);
        assert_eq!(s, 400, "{m} {uri} {body:?} -> {s} {v}");
        let msg = v["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message: {v}"));
        assert!(msg.contains(want), "{m} {uri}: {msg:?} lacks {want:?}");
    }
    // Nothing was created or lost by any of it.
    let list = d.ok(Method::GET, "/v1/vms", None);
    assert_eq!(list.as_array().unwrap().len(), 1);
    // Random bytes never crash the daemon.
    let mut x = rand_u32() | 1;
    for _ in 0..200 {
        let len = (x % 64) as usize;
        let body: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x & 0xff) as u8
            })
            .collect();
        let (s, _) = d
            .client
            .call(&d.sock, Method::POST, "/v1/vms", Some(body))
            .unwrap();
        assert_eq!(s.as_u16(), 400);
    }
    assert_eq!(
        d.ok(Method::GET, "/v1/vms", None).as_array().unwrap().len(),
        1
    );
}

#[test]
fn names_and_paths_are_validated() {
    let d = Daemon::start("names");
    for bad in [
        "../../etc",
        "A",
        "-x",
        ".x",
        "a/b",
        "",
        &"x".repeat(64),
        "a..b",
    ] {
        let (s, v) = d.req(Method::POST, "/v1/vms", Some(&create_body(bad)));
        assert_eq!(s, 400, "{bad:?} -> {v}");
        assert!(
            v["fault_message"]
                .as_str()
                .unwrap()
                .contains("invalid name"),
            "{v}"
        );
    }
    for (kernel, want) in [
        ("relative/k", "must be absolute"),
        ("/nonexistent/k", "cannot be opened"),
        ("/tmp", "not a regular file"),
    ] {
        let (s, v) = d.req(
            Method::POST,
            "/v1/vms",
            Some(&json!({"name": "n", "kernel": kernel}).to_string()),
        );
        assert_eq!(s, 400, "{v}");
        assert!(v["fault_message"].as_str().unwrap().contains(want), "{v}");
    }
    // A traversal in the URL finds nothing and touches nothing.
    let (s, _) = d.req(Method::GET, "/v1/vms/..%2F..%2Fetc/console", None);
    assert_eq!(s, 404);
    let (s, _) = d.req(Method::DELETE, "/v1/vms/..", None);
    assert_eq!(s, 404);
    assert!(d.state_dir().join("inventory.db").exists());
    assert_eq!(d.ok(Method::GET, "/v1/vms", None), json!([]));
}

#[test]
fn openapi_is_served_as_kept_in_the_repo_and_every_route_exists() {
    let d = Daemon::start("openapi");
    let (s, served) = d.req(Method::GET, "/openapi.json", None);
    assert_eq!(s, 200);
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(served, file);
    for (method, path) in corefour_daemon::server::ROUTES {
        assert!(
            file["paths"][path][method].is_object(),
            "{method} {path} undocumented"
        );
        let m: Method = method.to_uppercase().parse().unwrap();
        let uri = path.replace("{name}", "nosuchvm");
        let (s, v) = d.req(m, &uri, Some("{}"));
        let no_route = v["fault_message"]
            .as_str()
            .is_some_and(|f| f.starts_with("no route"));
        assert!(
            !no_route,
            "{method} {uri} is documented but not served: {s} {v}"
        );
    }
    let (s, v) = d.req(Method::GET, "/v2/vms", None);
    assert_eq!(s, 404);
    assert!(v["fault_message"].as_str().unwrap().starts_with("no route"));
}

#[test]
fn socket_is_root_only_and_cli_errors_are_one_line() {
    let d = Daemon::start("sock");
    let mode = std::fs::metadata(&d.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A second daemon on the same socket refuses to steal it.
    let out = Command::new(EXE)
        .args(["daemon", "--socket"])
        .arg(&d.sock)
        .arg("--state-dir")
        .arg(d.dir.0.join("other"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already listens"),
        "{out:?}"
    );

    let out = Command::new(EXE)
        .args(["vm", "list", "--socket", "/nonexistent/c4.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot reach the corefour daemon at /nonexistent/c4.sock"),
        "{err}"
    );
    let out = d.cli(&["info", "nope"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "corefour: no instance named \"nope\""
    );
    let out = d.cli(&[
        "create", "web-{n}", "--kernel", EXE, "--count", "3", "--memory", "32M",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = d.cli(&["list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for n in ["web-1", "web-2", "web-3"] {
        assert!(text.contains(n), "{text}");
    }
    let out = d.cli(&["create", "x", "--kernel", EXE, "--memory", "12Q"]);
    assert!(!out.status.success());
}

#[test]
fn a_vmm_that_dies_is_marked_stopped_with_the_reason() {
    let t = TempDir::new("fakevmm");
    let d = Daemon::start_with("died", Some(fake_vmm(&t.0)));
    let v = d.ok(
        Method::POST,
        "/v1/vms",
        Some(&json!({"name": "died-a", "kernel": some_file(), "start": true}).to_string()),
    );
    assert_eq!(v["state"], "running", "{v}");
    let pid = v["pid"].as_i64().unwrap();
    assert!(pid_alive(pid));
    wait_console(&d, "died-a", 1);
    sigkill(pid);
    let v = d.wait_state("died-a", "stopped", Duration::from_secs(10));
    assert_eq!(v["stop_reason"], "killed by signal 9 (SIGKILL)", "{v}");
    assert!(v.get("pid").is_none());
    // It starts again, and `kill` ends it the same way.
    let v = d.ok(Method::POST, "/v1/vms/died-a/start", None);
    assert_eq!(v["state"], "running");
    // The console log keeps both runs' output.
    wait_console(&d, "died-a", 2);
    let v = d.ok(Method::POST, "/v1/vms/died-a/kill", None);
    assert_eq!(v["state"], "stopped");
    assert!(v["stop_reason"].as_str().unwrap().contains("SIGKILL"));
    // Deleting a running VM needs force.
    d.ok(Method::POST, "/v1/vms/died-a/start", None);
    let (s, v) = d.req(Method::DELETE, "/v1/vms/died-a", None);
    assert_eq!(s, 409, "{v}");
    assert_eq!(
        d.req(Method::DELETE, "/v1/vms/died-a?force=true", None).0,
        204
    );
    assert!(!pid_alive(pid));
}

#[test]
fn kill_9_of_the_daemon_with_vms_running_then_restart_reconciles() {
    let t = TempDir::new("fakevmm");
    let mut d = Daemon::start_with("recon", Some(fake_vmm(&t.0)));
    let mut pids = Vec::new();
    for n in ["recon-a", "recon-b"] {
        let v = d.ok(
            Method::POST,
            "/v1/vms",
            Some(&json!({"name": n, "kernel": some_file(), "start": true}).to_string()),
        );
        pids.push(v["pid"].as_i64().unwrap());
    }
    d.kill9();
    // The VMMs outlive the daemon.
    assert!(pids.iter().all(|&p| pid_alive(p)));
    // One dies while no daemon watches.
    sigkill(pids[1]);
    std::thread::sleep(Duration::from_millis(200));
    d.spawn();
    let a = d.ok(Method::GET, "/v1/vms/recon-a", None);
    assert_eq!(
        (a["state"].clone(), a["pid"].as_i64()),
        (json!("running"), Some(pids[0])),
        "{a}"
    );
    let b = d.ok(Method::GET, "/v1/vms/recon-b", None);
    assert_eq!(b["state"], "stopped", "{b}");
    assert_eq!(
        b["stop_reason"],
        "killed by signal 9 (SIGKILL) (while the daemon was down)"
    );
    // The restarted daemon watches the survivor: its death is noticed and recorded.
    sigkill(pids[0]);
    let a = d.wait_state("recon-a", "stopped", Duration::from_secs(10));
    assert!(
        a["stop_reason"].as_str().unwrap().contains("SIGKILL"),
        "{a}"
    );
    let ev = d.ok(Method::GET, "/v1/events?since=0", None);
    assert!(
        ev.as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "reconciled"),
        "{ev}"
    );
    // And a daemon restarted with nothing running has nothing to fix.
    d.kill9();
    d.spawn();
    assert_eq!(
        d.ok(Method::GET, "/v1/vms/recon-a", None)["state"],
        "stopped"
    );
}

#[test]
fn cpu_limits_live_in_the_vm_cgroup_and_change_while_it_runs() {
    if !is_root() || !Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists() {
        eprintln!("skipped: needs root and a cgroup v1 cpu hierarchy");
        return;
    }
    let t = TempDir::new("fakevmm");
    let d = Daemon::start_with("cg", Some(fake_vmm(&t.0)));
    let v = d.ok(
        Method::POST,
        "/v1/vms",
        Some(&json!({"name": "cg-a", "kernel": some_file(), "start": true, "cpu_quota_pct": 50, "cpu_weight": 200, "cpu_pin": [0], "memory_mib": 64}).to_string()),
    );
    let pid = v["pid"].as_i64().unwrap();
    let cgroup_of = |ctl: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap()
            .lines()
            .find_map(|l| {
                let mut f = l.splitn(3, ':');
                let _ = f.next();
                let ctls = f.next()?;
                ctls.split(',')
                    .any(|c| c == ctl)
                    .then(|| f.next().unwrap().to_string())
            })
            .unwrap()
    };
    let cpu_cg = cgroup_of("cpu");
    assert!(
        cpu_cg.starts_with("/corefour-vms-") && cpu_cg.ends_with("/cg-a"),
        "{cpu_cg}"
    );
    let dir = Path::new("/sys/fs/cgroup/cpu").join(cpu_cg.trim_start_matches('/'));
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(read("cpu.cfs_quota_us"), "50000");
    assert_eq!(read("cpu.shares"), "2048");
    let cpuset =
        Path::new("/sys/fs/cgroup/cpuset").join(cgroup_of("cpuset").trim_start_matches('/'));
    assert_eq!(
        std::fs::read_to_string(cpuset.join("cpuset.cpus"))
            .unwrap()
            .trim(),
        "0"
    );
    let mem = Path::new("/sys/fs/cgroup/memory").join(cgroup_of("memory").trim_start_matches('/'));
    assert_eq!(
        std::fs::read_to_string(mem.join("memory.limit_in_bytes"))
            .unwrap()
            .trim(),
        ((64u64 << 20) + (128 << 20)).to_string()
    );
    let out = d.cli(&["set", "cg-a", "--cpu-quota", "25%", "--cpu-weight", "50"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(read("cpu.cfs_quota_us"), "25000");
    assert_eq!(read("cpu.shares"), "512");
    let (s, v) = d.req(
        Method::PATCH,
        "/v1/vms/cg-a",
        Some(r#"{"cpu_weight": 20000}"#),
    );
    assert_eq!(s, 400, "{v}");
    d.ok(
        Method::PATCH,
        "/v1/vms/cg-a",
        Some(r#"{"cpu_quota_pct": 0}"#),
    );
    assert_eq!(read("cpu.cfs_quota_us"), "-1");
    d.ok(Method::POST, "/v1/vms/cg-a/kill", None);
    assert!(!dir.exists(), "the cgroup is removed when the VM stops");
}

#[test]
fn real_guests_start_pause_resume_stop() {
    let (Some(hello), Some(pioloop)) = (guest("hello"), guest("pioloop")) else {
        eprintln!("skipped: guests not built (make -C guests)");
        return;
    };
    if !real_vmm() {
        eprintln!("skipped: `corefour vmm` is not built into this binary yet");
        return;
    }
    let d = Daemon::start("real");
    let v = d.ok(
        Method::POST,
        "/v1/vms",
        Some(
            &json!({"name": "real-hello", "kernel": hello, "cmdline": "hi", "start": true})
                .to_string(),
        ),
    );
    assert!(v["state"] == "running" || v["state"] == "stopped", "{v}");
    let v = d.wait_state("real-hello", "stopped", Duration::from_secs(30));
    assert_eq!(v["exit_code"], 0, "{v}");
    assert_eq!(v["stop_reason"], "guest exited with code 0");
    let out = d.cli(&["console", "real-hello"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Hello from corefour guest"),
        "{out:?}"
    );

    d.ok(
        Method::POST,
        "/v1/vms",
        Some(&json!({"name": "real-loop", "kernel": pioloop, "cmdline": "n=100000000000", "start": true,
                     "vcpus": 2, "cpu_pin": [1, 0]}).to_string()),
    );
    // Each vCPU thread is pinned to its own host CPU: vcpu0 -> 1, vcpu1 -> 0.
    let pid = d.ok(Method::GET, "/v1/vms/real-loop", None)["pid"]
        .as_i64()
        .unwrap();
    let two_cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
    let deadline = Instant::now() + Duration::from_secs(5);
    while two_cpus && Instant::now() < deadline + Duration::from_secs(1) {
        let mut pins = std::collections::BTreeMap::new();
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let allowed = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap_or("")
                .trim()
                .to_string();
            if comm.starts_with("vcpu") {
                pins.insert(comm.trim().to_string(), allowed);
            }
        }
        if pins.get("vcpu0").map(String::as_str) == Some("1")
            && pins.get("vcpu1").map(String::as_str) == Some("0")
        {
            break;
        }
        assert!(Instant::now() < deadline, "vCPUs not pinned: {pins:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = d.ok(Method::POST, "/v1/vms/real-loop/pause", None);
    assert_eq!(v["state"], "paused", "{v}");
    let (s, _) = d.req(Method::POST, "/v1/vms/real-loop/pause", None);
    assert_eq!(s, 409);
    let v = d.ok(Method::POST, "/v1/vms/real-loop/resume", None);
    assert_eq!(v["state"], "running");
    let out = d.cli(&["stop", "real-loop", "--timeout", "10s"]);
    assert!(out.status.success(), "{out:?}");
    let v = d.ok(Method::GET, "/v1/vms/real-loop", None);
    assert_eq!(v["state"], "stopped");
    assert_eq!(v["exit_code"], 0, "graceful shutdown exits 0: {v}");
    assert_eq!(v["stop_reason"], "shut down on request (exit code 0)");
}

#[test]
fn nics_get_a_tap_in_the_managed_bridge_while_running() {
    if !is_root() || !Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: needs root and /dev/net/tun");
        return;
    }
    let t = TempDir::new("fakevmm");
    let d = Daemon::start_with("net", Some(fake_vmm(&t.0)));
    let bridge = format!("c4tb{}", std::process::id() % 100_000);
    let v = d.ok(
        Method::POST,
        "/v1/vms",
        Some(
            &json!({"name": "net-a", "kernel": some_file(), "start": true,
                     "nets": [{"bridge": bridge, "rate_limit": {"bytes_per_sec": 1000000}},
                              {"bridge": bridge, "mac": "02:AA:00:00:00:01"}]})
            .to_string(),
        ),
    );
    let nics = v["nics"].as_array().unwrap().clone();
    assert_eq!(nics.len(), 2, "{v}");
    assert_eq!(nics[1]["mac"], "02:aa:00:00:00:01");
    assert_eq!(nics[0]["rate_limit"]["bytes_per_sec"], 1000000);
    for nic in &nics {
        let tap = nic["tap"].as_str().unwrap();
        let master = std::fs::read_link(format!("/sys/class/net/{tap}/master")).unwrap();
        assert_eq!(master.file_name().unwrap().to_str().unwrap(), bridge);
    }
    // The VMM config names the taps and MACs the daemon assigned.
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(d.state_dir().join("vms/net-a/vm.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["nets"][0]["tap"], nics[0]["tap"]);
    assert_eq!(cfg["nets"][1]["mac"], "02:aa:00:00:00:01");
    // The same MAC cannot be handed out twice.
    let (s, e) = d.req(
        Method::POST,
        "/v1/vms",
        Some(&json!({"name": "net-b", "kernel": some_file(), "nets": [{"bridge": bridge, "mac": "02:aa:00:00:00:01"}]}).to_string()),
    );
    assert_eq!(s, 409, "{e}");
    d.ok(Method::POST, "/v1/vms/net-a/kill", None);
    for nic in &nics {
        let tap = nic["tap"].as_str().unwrap();
        assert!(
            !Path::new("/sys/class/net").join(tap).exists(),
            "tap {tap} outlived its VM"
        );
    }
    let _ = Command::new("ip").args(["link", "del", &bridge]).status();
}

#[test]
fn jailed_vmm_runs_chrooted_unprivileged_in_its_own_namespaces() {
    let (Some(hello), Some(pioloop)) = (guest("hello"), guest("pioloop")) else {
        eprintln!("skipped: guests not built (make -C guests)");
        return;
    };
    if !real_vmm() || !is_root() {
        eprintln!("skipped: needs root and `corefour vmm` built into this binary");
        return;
    }
    let d = Daemon::start_full("jail", None, &["--jail"]);
    d.ok(
        Method::POST,
        "/v1/vms",
        Some(&json!({"name": "jail-hello", "kernel": hello, "start": true}).to_string()),
    );
    let v = d.wait_state("jail-hello", "stopped", Duration::from_secs(30));
    assert_eq!(v["stop_reason"], "guest exited with code 0", "{v}");
    let out = d.cli(&["console", "jail-hello"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Hello from corefour guest"),
        "{out:?}"
    );

    let v = d.ok(
        Method::POST,
        "/v1/vms",
        Some(&json!({"name": "jail-loop", "kernel": pioloop, "cmdline": "n=100000000000", "start": true}).to_string()),
    );
    let pid = v["pid"].as_i64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let uid: u32 = field("Uid:")[0].parse().unwrap();
    assert!(
        uid >= 100_000,
        "the VMM runs as an unprivileged uid: {status}"
    );
    assert_eq!(
        field("NSpid:").last().map(String::as_str),
        Some("1"),
        "own PID namespace: {status}"
    );
    assert_eq!(field("Seccomp:"), ["2"], "seccomp filter: {status}");
    for ns in ["mnt", "net", "pid_for_children", "uts"] {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let its = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        if ns != "pid_for_children" {
            assert_ne!(mine, its, "{ns} namespace shared with the host");
        }
    }
    let root = d.state_dir().join("vms/jail-loop/root");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        root
    );
    // The API socket inside the jail carries pause and resume.
    assert_eq!(
        d.ok(Method::POST, "/v1/vms/jail-loop/pause", None)["state"],
        "paused"
    );
    assert_eq!(
        d.ok(Method::POST, "/v1/vms/jail-loop/resume", None)["state"],
        "running"
    );
    let v = d.ok(
        Method::POST,
        "/v1/vms/jail-loop/stop",
        Some(r#"{"timeout_secs": 10}"#),
    );
    assert_eq!(
        v["stop_reason"], "shut down on request (exit code 0)",
        "{v}"
    );
    assert!(
        !root.exists(),
        "the jail root is removed once the VMM is gone"
    );
}

#[test]
fn console_follow_streams_until_the_vm_stops() {
    let t = TempDir::new("fakevmm");
    let d = Daemon::start_with("follow", Some(fake_vmm(&t.0)));
    let v = d.ok(
        Method::POST,
        "/v1/vms",
        Some(&json!({"name": "follow-a", "kernel": some_file(), "start": true}).to_string()),
    );
    let pid = v["pid"].as_i64().unwrap();
    let mut follower = Command::new(EXE)
        .args(["vm", "console", "follow-a", "--follow"])
        .env("COREFOUR_SOCKET", &d.sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_console(&d, "follow-a", 1);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        follower.try_wait().unwrap().is_none(),
        "follow ended while the VM runs"
    );
    sigkill(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = follower.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "follow did not end after the VM stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    let mut out = String::new();
    std::io::Read::read_to_string(&mut follower.stdout.take().unwrap(), &mut out).unwrap();
    assert!(out.contains("fake vmm up: vmm --config"), "{out:?}");
}

#[test]
fn socket_group_option_opens_it_to_that_group() {
    let d = Daemon::start_full("group", None, &["--group", "root"]);
    let meta = std::fs::metadata(&d.sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 0);
    let out = Command::new(EXE)
        .args(["daemon", "--group", "no-such-group-c4", "--socket"])
        .arg(d.dir.0.join("x.sock"))
        .arg("--state-dir")
        .arg(d.dir.0.join("x"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown group"),
        "{out:?}"
    );
}

#[test]
fn kill_9_of_the_daemon_mid_creates_loses_no_acknowledged_vm() {
    let mut d = Daemon::start("midop");
    let acked = std::sync::Mutex::new(Vec::new());
    let sock = d.sock.clone();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (sock, acked) = (&sock, &acked);
            s.spawn(move || {
                let c = Client::new().unwrap();
                for i in 0.. {
                    let name = format!("midop-{t}-{i}");
                    match c.call(
                        sock,
                        Method::POST,
                        "/v1/vms",
                        Some(create_body(&name).into_bytes()),
                    ) {
                        Ok((st, _)) if st.as_u16() == 201 => acked.lock().unwrap().push(name),
                        Ok((st, b)) => panic!("{st} {}", String::from_utf8_lossy(&b)),
                        Err(_) => return, // the daemon is gone
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(300));
        d.kill9();
    });
    d.spawn();
    let list = d.ok(Method::GET, "/v1/vms", None);
    let names: std::collections::BTreeSet<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names.len(),
        list.as_array().unwrap().len(),
        "duplicated rows"
    );
    let acked = acked.into_inner().unwrap();
    assert!(!acked.is_empty());
    for n in &acked {
        assert!(
            names.contains(n),
            "{n} was acknowledged but is gone after kill -9"
        );
    }
    // At most one create per thread was in flight: recorded or not, never half.
    assert!(
        names.len() <= acked.len() + 4,
        "{} rows for {} acknowledged creates",
        names.len(),
        acked.len()
    );
    // Every VM, including one whose directory the crash may have missed, still works.
    for n in &names {
        assert_eq!(d.req(Method::DELETE, &format!("/v1/vms/{n}"), None).0, 204);
    }
    assert_eq!(d.ok(Method::GET, "/v1/vms", None), json!([]));
}

#[test]
fn a_vmm_started_just_before_the_daemon_died_is_adopted() {
    let t = TempDir::new("fakevmm");
    let mut d = Daemon::start_with("adopt", Some(fake_vmm(&t.0)));
    let v = d.ok(
        Method::POST,
        "/v1/vms",
        Some(&json!({"name": "adopt-a", "kernel": some_file(), "start": true}).to_string()),
    );
    let pid = v["pid"].as_i64().unwrap();
    d.kill9();
    // Make the inventory look as if the daemon died before recording the start.
    {
        let inv =
            corefour_daemon::inventory::Inventory::open(&d.state_dir().join("inventory.db"), "c4x")
                .unwrap();
        inv.set_stopped("adopt-a", "simulated: start not recorded", None)
            .unwrap();
    }
    d.spawn();
    let v = d.ok(Method::GET, "/v1/vms/adopt-a", None);
    assert_eq!(
        (v["state"].clone(), v["pid"].as_i64()),
        (json!("running"), Some(pid)),
        "{v}"
    );
    // Watched like any other: its end is recorded.
    sigkill(pid);
    let v = d.wait_state("adopt-a", "stopped", Duration::from_secs(10));
    assert!(
        v["stop_reason"].as_str().unwrap().contains("SIGKILL"),
        "{v}"
    );
}

fn sh(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", cmd])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn a_guest_reads_and_writes_its_disk_through_the_daemon() {
    let Some(vblk) = guest("vblk") else {
        eprintln!("skipped: virtio guests not built (make -C guests -f virtio.mk)");
        return;
    };
    if !real_vmm() {
        eprintln!("skipped: `corefour vmm` is not built into this binary");
        return;
    }
    let d = Daemon::start("disk");
    let img = d.dir.0.join("disk.img");
    let mut data = vec![0u8; 4096];
    data[..16].copy_from_slice(b"0123456789abcdef");
    std::fs::write(&img, &data).unwrap();
    d.ok(
        Method::POST,
        "/v1/vms",
        Some(
            &json!({"name": "disk-a", "kernel": vblk, "start": true,
                     "disks": [{"path": img, "rate_limit": {"bytes_per_sec": 10000000}}]})
            .to_string(),
        ),
    );
    let v = d.wait_state("disk-a", "stopped", Duration::from_secs(60));
    let console = String::from_utf8(d.cli(&["console", "disk-a"]).stdout).unwrap();
    assert_eq!(v["exit_code"], 0, "{v}\n{console}");
    assert!(
        console.contains("SECTOR0 30313233343536373839616263646566"),
        "{console}"
    );
    let after = std::fs::read(&img).unwrap();
    assert_eq!(&after[512..520], b"COREFOUR");
}

#[test]
fn a_guest_pings_a_host_across_the_daemon_bridge() {
    let Some(vnet) = guest("vnet") else {
        eprintln!("skipped: virtio guests not built (make -C guests -f virtio.mk)");
        return;
    };
    if !real_vmm() || !is_root() || !Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: needs root, /dev/net/tun and `corefour vmm`");
        return;
    }
    let id = std::process::id() % 100_000;
    let (ns, br, va, vb) = (
        format!("c4t{id}"),
        format!("c4b{id}"),
        format!("c4v{id}a"),
        format!("c4v{id}b"),
    );
    // The test host lives in its own network namespace, linked to the bridge by a veth pair.
    let setup = format!(
        "ip netns add {ns} && ip link add {br} type bridge && ip link set {br} up && \
         ip link add {va} type veth peer name {vb} && ip link set {vb} netns {ns} && \
         ip link set {va} master {br} up && ip -n {ns} addr add 10.77.0.1/24 dev {vb} && \
         ip -n {ns} link set {vb} up && ip -n {ns} link set lo up"
    );
    let cleanup = format!(
        "ip netns del {ns} 2>/dev/null; ip link del {va} 2>/dev/null; ip link del {br} 2>/dev/null"
    );
    if !sh(&setup) {
        sh(&cleanup);
        eprintln!("skipped: cannot build the test network (ip netns, veth, bridge)");
        return;
    }
    let d = Daemon::start("vnet");
    d.ok(
        Method::POST,
        "/v1/vms",
        Some(
            &json!({"name": "vnet-a", "kernel": vnet, "start": true, "nets": [{"bridge": br}]})
                .to_string(),
        ),
    );
    let v = d.wait_state("vnet-a", "stopped", Duration::from_secs(60));
    let console = String::from_utf8(d.cli(&["console", "vnet-a"]).stdout).unwrap();
    sh(&cleanup);
    assert_eq!(v["exit_code"], 0, "{v}\n{console}");
    assert!(
        console.contains("VNET ping reply from 10.77.0.1"),
        "{console}"
    );
}
