//! `corefour bench ct`: create + start + delete of one busybox bundle running /bin/true, with
//! corefour, runc and crun in the same run on the same bundle; medians and ratios.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use corefour_container as ct;

#[derive(clap::Args)]
pub struct Args {
    /// Runs per runtime (at least 50 for the reported medians).
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Skip installing runc/crun with apt-get when they are missing.
    #[arg(long)]
    no_install: bool,
}

struct Peer {
    name: &'static str,
    bin: PathBuf,
    /// Arguments before the global flags (`oci` for corefour).
    prefix: &'static [&'static str],
    root: PathBuf,
}

#[derive(serde::Serialize)]
struct Row {
    runtime: String,
    create_ms: f64,
    start_ms: f64,
    delete_ms: f64,
    total_ms: f64,
    runs: usize,
    error: Option<String>,
}

fn median(v: &mut [Duration]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn ensure_peers(no_install: bool) -> anyhow::Result<()> {
    if which("runc").is_some() && which("crun").is_some() || no_install {
        return Ok(());
    }
    eprintln!("bench ct: installing runc and crun with apt-get");
    let ok = Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "runc",
            "crun",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!(
            "bench ct: apt-get install runc crun failed; peers that are missing will show n/a"
        );
    }
    Ok(())
}

fn build_bundle(dir: &Path) -> anyhow::Result<()> {
    let rootfs = dir.join("rootfs");
    ct::templates::busybox::populate(&rootfs)?;
    let mut spec = ct::spec::default_spec(false);
    if let Some(p) = spec.process_mut() {
        p.set_terminal(Some(false));
        p.set_args(Some(vec!["/bin/true".into()]));
    }
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&spec)?)?;
    Ok(())
}

/// Runs a runtime command with stdio away from us: the container init inherits create's stdio,
/// so a pipe would never reach EOF. Errors come back through a scratch file.
fn quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let err = tempfile_in_tmp()?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err.try_clone()?)
        .status()?;
    if !status.success() {
        let text = std::fs::read_to_string(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&err)
        ))
        .unwrap_or_default();
        bail!("{:?} failed: {}", cmd, text.trim());
    }
    Ok(())
}

fn tempfile_in_tmp() -> anyhow::Result<std::fs::File> {
    let path = std::env::temp_dir().join(format!("corefour-bench-err-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let _ = std::fs::remove_file(&path);
    Ok(f)
}

/// One runtime, `runs` times: (create, start, delete) durations.
fn measure(
    p: &Peer,
    bundle: &Path,
    runs: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, Vec<Duration>)> {
    let (mut c, mut s, mut d) = (Vec::new(), Vec::new(), Vec::new());
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!("bench ct: {} x {} ...", p.name, runs + 2);
    }
    let base = |cmd: &mut Command| {
        cmd.args(p.prefix).arg("--root").arg(&p.root);
    };
    for i in 0..runs + 2 {
        let id = format!("bench-{}-{i}", p.name);
        let t0 = Instant::now();
        let mut cmd = Command::new(&p.bin);
        base(&mut cmd);
        quiet(cmd.arg("create").arg("--bundle").arg(bundle).arg(&id))?;
        let t1 = Instant::now();
        let mut cmd = Command::new(&p.bin);
        base(&mut cmd);
        quiet(cmd.arg("start").arg(&id))?;
        let t2 = Instant::now();
        let mut cmd = Command::new(&p.bin);
        base(&mut cmd);
        quiet(cmd.arg("delete").arg("--force").arg(&id))?;
        let t3 = Instant::now();
        // The first two runs warm the page cache and are not counted.
        if i >= 2 {
            c.push(t1 - t0);
            s.push(t2 - t1);
            d.push(t3 - t2);
        }
    }
    Ok((c, s, d))
}

fn row(name: &str, r: anyhow::Result<(Vec<Duration>, Vec<Duration>, Vec<Duration>)>) -> Row {
    match r {
        Ok((mut c, mut s, mut d)) => {
            let mut tot: Vec<Duration> = c
                .iter()
                .zip(&s)
                .zip(&d)
                .map(|((a, b), c)| *a + *b + *c)
                .collect();
            Row {
                runtime: name.into(),
                create_ms: median(&mut c),
                start_ms: median(&mut s),
                delete_ms: median(&mut d),
                total_ms: median(&mut tot),
                runs: tot.len(),
                error: None,
            }
        }
        Err(e) => Row {
            runtime: name.into(),
            create_ms: f64::NAN,
            start_ms: f64::NAN,
            delete_ms: f64::NAN,
            total_ms: f64::NAN,
            runs: 0,
            error: Some(format!("{e:#}")),
        },
    }
}

/// crun refuses hybrid cgroups unless the empty cgroup2 mount is hidden: measure it from a child
/// in its own mount namespace with /sys/fs/cgroup/unified unmounted (the exec costs are the same).
fn measure_crun(
    p: &Peer,
    bundle: &Path,
    runs: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, Vec<Duration>)> {
    let (rd, wr) = nix::unistd::pipe()?;
    // SAFETY: the bench is single-threaded; the child only measures and writes to the pipe.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => {
            drop(rd);
            let res = (|| -> anyhow::Result<Vec<u8>> {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
                nix::mount::mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    nix::mount::MsFlags::MS_PRIVATE | nix::mount::MsFlags::MS_REC,
                    None::<&str>,
                )?;
                let unified = Path::new("/sys/fs/cgroup/unified");
                if unified.exists() {
                    nix::mount::umount2(unified, nix::mount::MntFlags::MNT_DETACH)
                        .context("umount /sys/fs/cgroup/unified")?;
                }
                let (c, s, d) = measure(p, bundle, runs)?;
                let enc =
                    |v: &[Duration]| v.iter().map(|x| x.as_nanos() as u64).collect::<Vec<_>>();
                Ok(serde_json::to_vec(&(enc(&c), enc(&s), enc(&d)))?)
            })();
            let out = match res {
                Ok(v) => v,
                Err(e) => serde_json::to_vec(&format!("{e:#}")).unwrap_or_default(),
            };
            let _ = nix::unistd::write(&wr, &out);
            drop(wr);
            // SAFETY: leave the forked child without running the parent's exit handlers.
            unsafe { libc_exit() }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(wr);
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::fs::File::from(rd), &mut buf)?;
            let _ = nix::sys::wait::waitpid(child, None);
            type Enc = (Vec<u64>, Vec<u64>, Vec<u64>);
            if let Ok((c, s, d)) = serde_json::from_slice::<Enc>(&buf) {
                let dec = |v: Vec<u64>| v.into_iter().map(Duration::from_nanos).collect();
                return Ok((dec(c), dec(s), dec(d)));
            }
            let msg: String =
                serde_json::from_slice(&buf).unwrap_or_else(|_| "crun measurement died".into());
            bail!(msg)
        }
    }
}

unsafe fn libc_exit() -> ! {
    extern "C" {
        fn _exit(code: i32) -> !;
    }
    // SAFETY: plain process exit.
    unsafe { _exit(0) }
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    if args.runs < 1 {
        bail!("--runs must be at least 1");
    }
    ensure_peers(args.no_install)?;
    let dir = std::env::temp_dir().join(format!("corefour-bench-ct-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> anyhow::Result<Vec<Row>> {
        let bundle = dir.join("bundle");
        build_bundle(&bundle)?;
        let me = std::env::current_exe().context("locate the corefour binary")?;
        let ours = Peer {
            name: "corefour",
            bin: me,
            prefix: &["oci"],
            root: dir.join("state-corefour"),
        };
        let mut rows = vec![row("corefour", measure(&ours, &bundle, args.runs))];
        match which("crun") {
            Some(bin) => rows.push(row(
                "crun",
                measure_crun(
                    &Peer {
                        name: "crun",
                        bin,
                        prefix: &[],
                        root: dir.join("state-crun"),
                    },
                    &bundle,
                    args.runs,
                ),
            )),
            None => rows.push(row("crun", Err(anyhow::anyhow!("crun is not installed")))),
        }
        match which("runc") {
            Some(bin) => rows.push(row(
                "runc",
                measure(
                    &Peer {
                        name: "runc",
                        bin,
                        prefix: &[],
                        root: dir.join("state-runc"),
                    },
                    &bundle,
                    args.runs,
                ),
            )),
            None => rows.push(row("runc", Err(anyhow::anyhow!("runc is not installed")))),
        }
        Ok(rows)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let rows = result?;
    let ours = rows[0].total_ms;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    println!(
        "create+start+delete of a busybox bundle running /bin/true (median of {} runs)",
        args.runs
    );
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10} {:>14}",
        "runtime", "create ms", "start ms", "delete ms", "total ms", "vs corefour"
    );
    for r in &rows {
        match &r.error {
            Some(e) => println!("{:<10} n/a: {e}", r.runtime),
            None => println!(
                "{:<10} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>13.2}x",
                r.runtime,
                r.create_ms,
                r.start_ms,
                r.delete_ms,
                r.total_ms,
                r.total_ms / ours
            ),
        }
    }
    println!("(ratio = peer total / corefour total; above 1.00x means corefour is faster)");
    Ok(0)
}
