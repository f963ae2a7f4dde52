//! `corefour bench ct-lifecycle`: create, start, kill and delete N system containers through the
//! daemon (`corefour ct ...` against a private daemon), with the daemonless path
//! (`corefour ct --direct ...`) measured in the same run as the baseline. Both go through the CLI
//! binary, one process per verb, as a script would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

#[derive(clap::Args)]
pub struct Args {
    /// Containers per path.
    #[arg(long, default_value_t = 20)]
    count: usize,
    #[arg(long)]
    json: bool,
}

const PHASES: [&str; 4] = ["create", "start", "kill", "delete"];

/// A daemon private to the benchmark; its containers are deleted and it is stopped on drop.
struct PrivateDaemon {
    exe: PathBuf,
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl PrivateDaemon {
    fn start(exe: &Path, dir: &Path) -> anyhow::Result<PrivateDaemon> {
        let sock = dir.join("d.sock");
        let child = Command::new(exe)
            .args(["daemon", "--log-level", "warn", "--socket"])
            .arg(&sock)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start a private daemon")?;
        let mut d = PrivateDaemon {
            exe: exe.to_path_buf(),
            child,
            dir: dir.to_path_buf(),
            sock,
        };
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
        // Containers outlive their daemon: delete them first.
        if let Ok(o) = Command::new(&self.exe)
            .args(["ct", "list", "--json", "--socket"])
            .arg(&self.sock)
            .env_remove("COREFOUR_CT_DIR")
            .output()
        {
            let names: Vec<String> = serde_json::from_slice::<serde_json::Value>(&o.stdout)
                .ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|c| c["name"].as_str().map(String::from))
                .collect();
            for n in names {
                let _ = Command::new(&self.exe)
                    .args(["ct", "delete", "--force", &n, "--socket"])
                    .arg(&self.sock)
                    .env_remove("COREFOUR_CT_DIR")
                    .output();
            }
        }
        // SIGTERM: a graceful exit removes its cgroup parent.
        // SAFETY: kill() with our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Per-phase latencies of one path.
struct Run {
    lat: Vec<Vec<Duration>>,
    wall: Duration,
}

fn median_ms(v: &[Duration]) -> f64 {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

/// Runs create/start/kill/delete for `n` containers through `ct` with `mode` arguments.
fn path(exe: &Path, mode: &[String], tag: &str, n: usize) -> anyhow::Result<Run> {
    let ct = |args: &[&str]| -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        let o = Command::new(exe)
            .arg("ct")
            .args(mode)
            .args(args)
            .env_remove("COREFOUR_CT_DIR")
            .stdin(Stdio::null())
            .output()
            .context("cannot run corefour ct")?;
        let dt = t0.elapsed();
        if !o.status.success() {
            bail!(
                "ct {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(dt)
    };
    // The template is built once, outside the timing.
    let warm = format!("bw{tag}-{}", std::process::id());
    ct(&["create", &warm])?;
    ct(&["delete", &warm])?;
    let mut lat = vec![Vec::new(); PHASES.len()];
    let t0 = Instant::now();
    for i in 0..n {
        let name = format!("b{tag}{i}-{}", std::process::id());
        lat[0].push(ct(&["create", &name])?);
        lat[1].push(ct(&["start", &name])?);
        lat[2].push(ct(&["kill", &name])?);
        lat[3].push(ct(&["delete", &name])?);
    }
    Ok(Run {
        lat,
        wall: t0.elapsed(),
    })
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench ct-lifecycle needs root (namespaces, cgroups, overlayfs)");
    }
    let exe = std::env::current_exe().context("cannot find the corefour binary")?;
    let n = args.count.max(1);
    let dir = std::env::temp_dir().join(format!("corefour-bench-ct-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let direct_dir = dir.join("direct");
    let direct = path(
        &exe,
        &["--dir".to_string(), direct_dir.display().to_string()],
        "d",
        n,
    );
    let _ = std::fs::remove_dir_all(&direct_dir);
    let direct = direct?;
    let daemon = {
        let d = PrivateDaemon::start(&exe, &dir.join("daemon"))?;
        path(
            &exe,
            &["--socket".to_string(), d.sock.display().to_string()],
            "a",
            n,
        )?
    };
    let _ = std::fs::remove_dir_all(&dir);
    let rows: Vec<(String, f64, f64)> = PHASES
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                p.to_string(),
                median_ms(&direct.lat[i]),
                median_ms(&daemon.lat[i]),
            )
        })
        .collect();
    let rate = |r: &Run| n as f64 / r.wall.as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "count": n,
                "phases_ms": rows.iter().map(|(p, a, b)| serde_json::json!({"phase": p, "direct": a, "daemon": b})).collect::<Vec<_>>(),
                "cycles_per_sec": {"direct": rate(&direct), "daemon": rate(&daemon)},
            })
        );
        return Ok(0);
    }
    println!(
        "ct lifecycle, {n} busybox containers, one `corefour ct` process per verb (median ms)"
    );
    println!(
        "{:<10} {:>10} {:>10} {:>8}",
        "phase", "direct", "daemon", "ratio"
    );
    for (p, a, b) in &rows {
        println!("{p:<10} {a:>10.1} {b:>10.1} {:>7.2}x", b / a);
    }
    println!(
        "{:<10} {:>9.1}/s {:>9.1}/s {:>7.2}x  (create+start+kill+delete cycles)",
        "cycles",
        rate(&direct),
        rate(&daemon),
        rate(&daemon) / rate(&direct)
    );
    println!("ratio: daemon / direct (times: above 1 is slower; cycles: above 1 is faster)");
    Ok(0)
}
