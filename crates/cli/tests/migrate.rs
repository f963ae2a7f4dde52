//! Live migration through the real binary, between two `ip netns` test hosts joined by veth
//! (created and removed here): the counter guest continues on the target with no gap or repeat;
//! cutting the link mid-migration leaves the source running and the target never starts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use corefour_vmm::api_client::call;

#[path = "common/guests.rs"]
#[macro_use]
mod guests;
use guests::{counts, guest};

/// Why these tests cannot run here, if they cannot.
fn missing() -> Option<String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!("/dev/kvm is not usable ({e})"));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces need root".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("`ip` (iproute2) is not installed".into()),
    }
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

/// Two namespaces, `a` (10.99.N.1) and `b` (10.99.N.2), joined by a veth pair.
struct Hosts {
    a: String,
    b: String,
    veth_a: String,
    addr_b: String,
    dir: PathBuf,
}

impl Hosts {
    fn new(tag: &str, n: u8) -> Self {
        let id = format!("{}{}", tag, std::process::id() % 100000);
        let (a, b) = (format!("c4a{id}"), format!("c4b{id}"));
        let (va, vb) = (format!("va{id}"), format!("vb{id}"));
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("mig-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let h = Self {
            a: a.clone(),
            b: b.clone(),
            veth_a: va.clone(),
            addr_b: format!("10.99.{n}.2"),
            dir,
        };
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &a]);
        ip(&["link", "set", &vb, "netns", &b]);
        let a_addr = format!("10.99.{n}.1/24");
        let b_addr = format!("10.99.{n}.2/24");
        ip(&["-n", &a, "addr", "add", &a_addr, "dev", &va]);
        ip(&["-n", &b, "addr", "add", &b_addr, "dev", &vb]);
        for (ns, dev) in [(&a, &va), (&b, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        h
    }

    fn vmm(&self, ns: &str, args: &[&str], name: &str) -> Vmm {
        let sock = self.dir.join(format!("{name}.sock"));
        let out = self.dir.join(format!("{name}.out"));
        let errp = self.dir.join(format!("{name}.err"));
        let f = std::fs::File::create(&out).unwrap();
        let e = std::fs::File::create(&errp).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_corefour"), "vmm"])
            .args(args)
            .arg("--api-sock")
            .arg(&sock)
            .stdout(f)
            .stderr(e)
            .spawn()
            .expect("spawn corefour vmm");
        let t = Instant::now();
        // A target has no API socket until a VM arrives: wait for it to listen instead.
        let ready = |s: &Path| {
            s.exists()
                || std::fs::read_to_string(&errp)
                    .unwrap_or_default()
                    .contains("waiting for a migration")
        };
        while !ready(&sock) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "VMM never became ready"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Vmm {
            child,
            out,
            sock,
            err: errp,
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Vmm {
    child: Child,
    out: PathBuf,
    sock: PathBuf,
    err: PathBuf,
}

impl Vmm {
    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
    fn wait_for(&self, what: &str, n: usize) {
        let t = Instant::now();
        while self.output().matches(what).count() < n {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "guest printed too little: {:?}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let r = call(&self.sock, method, path, body, Duration::from_secs(120)).unwrap();
        (r.status, r.body)
    }
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
        (
            st.code(),
            std::fs::read_to_string(&self.err).unwrap_or_default(),
        )
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn counter_moves_between_netns_hosts_without_gap_or_repeat() {
    need!();
    let kernel = guest("counter");
    let h = Hosts::new("m", 71);
    let target_addr = format!("{}:47100", h.addr_b);
    let target = h.vmm(&h.b, &["--incoming", &target_addr], "target");
    let src = h.vmm(
        &h.a,
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "spin=1000000",
            "--timeout",
            "60s",
        ],
        "source",
    );
    src.wait_for("count=", 5);
    let (code, body) = src.api(
        "PUT",
        "/vm/migrate",
        Some(&format!(
            r#"{{"to": "{target_addr}", "max_downtime_ms": 10}}"#
        )),
    );
    assert_eq!(code, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(report["downtime_ms"].as_f64().unwrap() > 0.0, "{body}");
    let (scode, serr) = src.finish();
    assert_eq!(scode, Some(0), "the source ends after handing over: {serr}");
    assert!(serr.contains("migrated to"), "{serr}");
    target.wait_for("count=", 3);
    let before = std::fs::read_to_string(h.dir.join("source.out")).unwrap();
    let after = target.output();
    assert!(!after.contains("MISMATCH"), "{after}");
    let joined = format!("{before}{after}");
    let c = counts(&joined);
    assert!(c.len() > counts(&before).len() + 2);
    for (i, n) in c.iter().enumerate() {
        assert_eq!(*n, i as u64, "count broken at line {i}: {joined:?}");
    }
    let (code, _) = target.api("PUT", "/vm/shutdown", None);
    assert_eq!(code, 204);
    let (tcode, terr) = target.finish();
    assert_eq!(tcode, Some(0), "{terr}");
}

#[test]
fn cutting_the_link_mid_migration_keeps_the_source_running() {
    need!();
    let kernel = guest("dirtier");
    let h = Hosts::new("c", 72);
    let target_addr = format!("{}:47101", h.addr_b);
    let target = h.vmm(&h.b, &["--incoming", &target_addr], "target");
    let src = h.vmm(
        &h.a,
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "512M",
            "--cmdline",
            "ws=400 spin=0",
            "--timeout",
            "120s",
        ],
        "source",
    );
    src.wait_for("dirtier: pass", 1);
    let ns_a = h.a.clone();
    let veth = h.veth_a.clone();
    let cutter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        ip(&["-n", &ns_a, "link", "set", &veth, "down"]);
    });
    let (code, body) = src.api(
        "PUT",
        "/vm/migrate",
        Some(&format!(
            r#"{{"to": "{target_addr}", "max_downtime_ms": 1, "max_rounds": 1000, "io_timeout_ms": 1500}}"#
        )),
    );
    cutter.join().unwrap();
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("keeps running here"), "{body}");
    let (code, state) = src.api("GET", "/vm", None);
    assert_eq!(code, 200);
    assert!(state.contains("\"running\""), "{state}");
    // And it really runs: more passes appear.
    let n = src.output().matches("dirtier: pass").count();
    src.wait_for("dirtier: pass", n + 1);
    let (code, _) = src.api("PUT", "/vm/shutdown", None);
    assert_eq!(code, 204);
    let (scode, serr) = src.finish();
    assert_eq!(scode, Some(0), "{serr}");
    // The target never ran the guest and gave up with an error.
    let (tcode, terr) = target.finish();
    assert_ne!(tcode, Some(0), "{terr}");
    assert!(
        !std::fs::read_to_string(h.dir.join("target.out"))
            .unwrap()
            .contains("dirtier"),
        "the target must not run the guest"
    );
}
