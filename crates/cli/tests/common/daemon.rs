//! The daemon test harness shared by daemon.rs and daemon_clone.rs: one daemon process per test
//! with its own socket and state dir, a stand-in VMM, and the test guests.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use corefour_daemon::client::blocking::Client;
use corefour_daemon::client::Method;
use serde_json::{json, Value};

pub const EXE: &str = env!("CARGO_BIN_EXE_corefour");

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    pub fn libc_geteuid() -> u32;
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "c4d-{tag}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ (rand_u32() as u128)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    t.subsec_nanos() ^ (t.as_secs() as u32).rotate_left(7)
}

/// One daemon process with its own socket and state dir.
pub struct Daemon {
    pub dir: TempDir,
    pub sock: PathBuf,
    pub child: Option<Child>,
    pub vmm_binary: Option<PathBuf>,
    pub extra: Vec<String>,
    pub client: Client,
}

impl Daemon {
    pub fn start(tag: &str) -> Daemon {
        Daemon::start_with(tag, None)
    }

    pub fn start_with(tag: &str, vmm_binary: Option<PathBuf>) -> Daemon {
        Daemon::start_full(tag, vmm_binary, &[])
    }

    pub fn start_full(tag: &str, vmm_binary: Option<PathBuf>, extra: &[&str]) -> Daemon {
        let dir = TempDir::new(tag);
        let sock = dir.0.join("d.sock");
        let mut d = Daemon {
            dir,
            sock,
            child: None,
            vmm_binary,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            client: Client::new().unwrap(),
        };
        d.spawn();
        d
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.0.join("state")
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.0.join("daemon.log"))
            .unwrap();
        let mut cmd = Command::new(EXE);
        cmd.arg("daemon")
            .arg("--socket")
            .arg(&self.sock)
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--log-level")
            .arg("debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(v) = &self.vmm_binary {
            cmd.arg("--vmm-binary").arg(v);
        }
        cmd.args(&self.extra);
        self.child = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.sock).is_err() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited with {st}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not listen: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("daemon.log")).unwrap_or_default()
    }

    /// SIGTERM: the daemon exits gracefully (VMs keep running).
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// (status, body) of one request.
    pub fn req(&self, method: Method, uri: &str, body: Option<&str>) -> (u16, Value) {
        let (status, bytes) = self
            .client
            .call(&self.sock, method, uri, body.map(|b| b.as_bytes().to_vec()))
            .unwrap();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status.as_u16(), v)
    }

    pub fn ok(&self, method: Method, uri: &str, body: Option<&str>) -> Value {
        let (s, v) = self.req(method.clone(), uri, body);
        assert!(
            (200..300).contains(&s),
            "{method} {uri} -> {s} {v}\n{}",
            self.log()
        );
        v
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(EXE)
            .arg("vm")
            .args(args)
            .env("COREFOUR_SOCKET", &self.sock)
            .output()
            .unwrap()
    }

    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.ok(Method::GET, &format!("/v1/vms/{name}"), None);
            if v["state"] == state {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never reached {state}: {v}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Kill every VMM this daemon still runs, then the daemon.
        if self.child.is_some() {
            if let Ok((_, b)) = self.client.call(&self.sock, Method::GET, "/v1/vms", None) {
                if let Ok(Value::Array(vms)) = serde_json::from_slice::<Value>(&b) {
                    for vm in vms {
                        if let Some(n) = vm["name"].as_str() {
                            let _ = self.client.call(
                                &self.sock,
                                Method::DELETE,
                                &format!("/v1/vms/{n}?force=true"),
                                None,
                            );
                        }
                    }
                }
            }
        }
        self.terminate();
    }
}

/// Any existing regular file is a valid `kernel` for tests that never start the VM.
pub fn some_file() -> String {
    EXE.to_string()
}

pub fn create_body(name: &str) -> String {
    json!({"name": name, "kernel": some_file()}).to_string()
}

/// A stand-in VMM for lifecycle tests that do not need a guest: prints a line and sleeps, like a
/// VMM whose guest idles. `$1` is "vmm"; the rest are the contract's flags.
pub fn fake_vmm(dir: &Path) -> PathBuf {
    let p = dir.join("fake-vmm");
    std::fs::write(&p, "#!/bin/sh\necho \"fake vmm up: $*\"\nexec sleep 600\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Waits until the fake VMM has announced itself `n` times in the VM's console log.
pub fn wait_console(d: &Daemon, name: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let console = d.ok(Method::GET, &format!("/v1/vms/{name}/console"), None);
        let text = console.as_str().unwrap_or_default().to_string();
        if text.matches("fake vmm up: vmm --config").count() == n {
            return;
        }
        assert!(Instant::now() < deadline, "{text}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn guest(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../guests/build")
        .join(format!("{name}.elf"));
    p.exists().then(|| p.canonicalize().unwrap())
}

/// What the VM's console log holds now (`corefour vm console NAME`).
pub fn console(d: &Daemon, name: &str) -> String {
    let out = d.cli(&["console", name]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The console once `pred` holds for it (at most a minute).
pub fn wait_console_until(d: &Daemon, name: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = console(d, name);
        if pred(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{text}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}
