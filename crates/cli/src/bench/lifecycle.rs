//! `corefour bench lifecycle`: create, boot (to the guest's first serial line) and destroy N VMs
//! through the daemon's API, against the raw `corefour vmm` one-shot path measured in the same run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use corefour_api::VmCreate;

use crate::cmd_vm::Api;

#[derive(clap::Args)]
pub struct Args {
    /// VMs to create, boot and destroy per path.
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Requests in flight at once (default: 4 per host CPU).
    #[arg(long)]
    parallel: Option<usize>,
    /// Guest to boot (default: guests/build/hello.elf beside the source tree or the current dir).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Use this running daemon instead of starting a private one.
    #[arg(long)]
    socket: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// One path's result.
struct Run {
    wall: Duration,
    lat: Vec<Duration>,
}

impl Run {
    fn per_sec(&self, n: usize) -> f64 {
        n as f64 / self.wall.as_secs_f64()
    }
    fn pct(&self, p: f64) -> f64 {
        let mut l = self.lat.clone();
        l.sort();
        let i = ((l.len() as f64 - 1.0) * p).round() as usize;
        l.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    }
}

fn default_kernel() -> Option<PathBuf> {
    let candidates = [
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests/build/hello.elf"),
        PathBuf::from("guests/build/hello.elf"),
    ];
    candidates.into_iter().find(|p| p.exists())
}

/// A daemon private to the benchmark, killed (VMs and all) on drop.
struct PrivateDaemon {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl PrivateDaemon {
    fn start(exe: &Path) -> anyhow::Result<PrivateDaemon> {
        let dir = std::env::temp_dir().join(format!("corefour-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let sock = dir.join("d.sock");
        let child = Command::new(exe)
            .args(["daemon", "--log-level", "warn", "--socket"])
            .arg(&sock)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start a private daemon")?;
        let mut d = PrivateDaemon { child, dir, sock };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&d.sock).is_err() {
            if let Some(st) = d.child.try_wait()? {
                bail!("the private daemon exited with {st}");
            }
            if Instant::now() > deadline {
                bail!("the private daemon did not listen within 20 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(d)
    }
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        // SIGTERM: a graceful exit removes its cgroup parent.
        // SAFETY: kill() with our own child's pid.
        unsafe {
            libc_kill(self.child.id() as i32, 15);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Runs `f(i)` for i in 0..n on `par` threads; returns wall time and per-item latencies.
fn fan_out(
    n: usize,
    par: usize,
    f: impl Fn(usize) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<Run> {
    let next = AtomicUsize::new(0);
    let t0 = Instant::now();
    let results: Vec<anyhow::Result<Vec<Duration>>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..par.min(n).max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut lat = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(lat);
                        }
                        let t = Instant::now();
                        f(i)?;
                        lat.push(t.elapsed());
                    }
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a bench thread panicked")))
            })
            .collect()
    });
    let wall = t0.elapsed();
    let mut lat = Vec::new();
    for r in results {
        lat.extend(r?);
    }
    Ok(Run { wall, lat })
}

/// Through the daemon: POST /v1/vms (start), follow the console to the first line, DELETE (force).
/// Per-phase latencies of the API path: create+start, boot to the first line, delete.
type Phases = std::sync::Mutex<[Vec<Duration>; 3]>;

fn api_path(
    sock: &Path,
    kernel: &str,
    n: usize,
    par: usize,
    tag: &str,
    phases: &Phases,
) -> anyhow::Result<Run> {
    fan_out(n, par, |i| {
        thread_local! {
            static API: std::cell::RefCell<Option<Api>> = const { std::cell::RefCell::new(None) };
        }
        API.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(Api::new(sock)?);
            }
            let Some(api) = slot.as_ref() else {
                bail!("no API client");
            };
            let name = format!("bench-{tag}-{i}");
            let req = VmCreate {
                name: name.clone(),
                kernel: kernel.to_string(),
                cmdline: None,
                initrd: None,
                vcpus: 1,
                memory_mib: 16,
                balloon_mib: None,
                backend: "auto".into(),
                cpu_pin: vec![],
                cpu_quota_pct: None,
                cpu_weight: None,
                disks: vec![],
                nets: vec![],
                start: true,
            };
            let t0 = Instant::now();
            api.create(&req)?;
            let t1 = Instant::now();
            let mut seen = Vec::new();
            api.follow_console(&name, |b| {
                seen.extend_from_slice(b);
                if guest_line(&seen) {
                    // Ends the stream: the first line is what we waited for.
                    Err(std::io::Error::other("first line seen"))
                } else {
                    Ok(())
                }
            })?;
            if !guest_line(&seen) {
                let info: corefour_api::VmInfo = api.call(
                    crate::cmd_vm::hyper_method::Method::GET,
                    &format!("/v1/vms/{name}"),
                    None,
                )?;
                bail!(
                    "{name} stopped before printing a line ({}): {}",
                    info.stop_reason.unwrap_or_default(),
                    String::from_utf8_lossy(&seen)
                );
            }
            let t2 = Instant::now();
            api.delete(&name, true)?;
            let mut p = phases.lock().unwrap_or_else(|e| e.into_inner());
            p[0].push(t1 - t0);
            p[1].push(t2 - t1);
            p[2].push(t2.elapsed());
            Ok(())
        })
    })
}

/// Whether the console holds a complete line from the guest (the VMM's own notes on stderr, which
/// share the log, start with "corefour").
fn guest_line(log: &[u8]) -> bool {
    log.split(|&b| b == b'\n')
        .rev()
        .skip(1)
        .any(|l| !l.starts_with(b"corefour"))
}

/// The baseline: `corefour vmm --kernel K` spawned directly, read to its first line, then reaped.
fn raw_path(exe: &Path, kernel: &str, n: usize, par: usize) -> anyhow::Result<Run> {
    fan_out(n, par, |_| {
        let mut child = Command::new(exe)
            .args(["vmm", "--kernel", kernel, "--memory", "16M"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run corefour vmm")?;
        let out = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        let _ = child.kill();
        child.wait()?;
        if line.is_empty() {
            bail!("corefour vmm printed nothing");
        }
        Ok(())
    })
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("cannot find the corefour binary")?;
    let kernel = match args.kernel.or_else(default_kernel) {
        Some(k) => {
            std::fs::canonicalize(&k).with_context(|| format!("cannot open {}", k.display()))?
        }
        None => bail!("no guest to boot: build the guests (make -C guests) or pass --kernel FILE"),
    };
    let kernel = kernel.display().to_string();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let par = args.parallel.unwrap_or(4 * cpus).max(1);
    let n = args.count.max(1);

    let private;
    let sock = match &args.socket {
        Some(s) => s.clone(),
        None => {
            private = PrivateDaemon::start(&exe)?;
            private.sock.clone()
        }
    };
    // Warm up both paths (page cache, first-exec costs) outside the measurement.
    raw_path(&exe, &kernel, par.min(4), par)?;
    api_path(&sock, &kernel, par.min(4), par, "warm", &Phases::default())?;

    let raw = raw_path(&exe, &kernel, n, par)?;
    let phases = Phases::default();
    let api = api_path(&sock, &kernel, n, par, "run", &phases)?;
    let phases = phases.into_inner().unwrap_or_else(|e| e.into_inner());
    let p50 = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v.get(v.len() / 2).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let ratio = api.per_sec(n) / raw.per_sec(n);

    if args.json {
        let row = |r: &Run| {
            serde_json::json!({"vms": n, "wall_s": r.wall.as_secs_f64(), "vms_per_s": r.per_sec(n),
                               "p50_ms": r.pct(0.5), "p99_ms": r.pct(0.99)})
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "kernel": kernel, "parallel": par, "host_cpus": cpus,
                "api": row(&api), "raw_vmm": row(&raw), "ratio_api_over_raw": ratio,
            }))?
        );
    } else {
        println!("lifecycle: create + boot to first serial line + destroy, {n} VMs, {par} in flight, {cpus} host CPUs");
        println!("guest: {kernel}");
        println!(
            "{:<34} {:>8} {:>8} {:>9} {:>9}",
            "path", "wall s", "VMs/s", "p50 ms", "p99 ms"
        );
        for (label, r) in [
            ("daemon API (create/start/delete)", &api),
            ("raw `corefour vmm` one-shot", &raw),
        ] {
            println!(
                "{:<34} {:>8.2} {:>8.1} {:>9.1} {:>9.1}",
                label,
                r.wall.as_secs_f64(),
                r.per_sec(n),
                r.pct(0.5),
                r.pct(0.99)
            );
        }
        println!(
            "API phases, p50: create+start {:.1} ms, boot to first line {:.1} ms, delete {:.1} ms",
            p50(&phases[0]),
            p50(&phases[1]),
            p50(&phases[2])
        );
        println!("ratio API / raw: {ratio:.2}x  (goal: >= 100 VMs/s through the API)");
    }
    Ok(0)
}
