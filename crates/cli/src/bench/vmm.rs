//! `corefour bench vmm`: the VMM against a minimal C program doing the same KVM_RUN loop with
//! raw ioctls (guests/bench/kvm_pio_loop.c), both measured in the same run, interleaved so
//! that load from elsewhere on the host hits both alike.
//!
//! - start -> first serial byte: from spawn to the first byte on the child's stdout
//!   (corefour runs `hello.elf`; the baseline prints "H" as its first guest instruction);
//! - VMM overhead RSS: VmRSS at exit minus the guest RAM resident (mincore), both self-reported;
//!   and the private part of it (RssAnon minus guest RAM): file-backed pages (the binary, libc)
//!   are shared by every VMM process on the host, the private part is what each VM adds;
//! - PIO exit round trip: (wall(n = N exits) - wall(n = 0)) / N, the same 3-instruction loop
//!   (`out 0x80; dec rcx; jnz`) in ring 0 on both sides.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

#[derive(clap::Args)]
pub struct Args {
    /// Runs per measurement (medians are reported).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Port-I/O exits per run of the round-trip measurement.
    #[arg(long, default_value_t = 20_000)]
    exits: u64,
    /// Where `make -C guests` put hello.elf, pioloop.elf and kvm_pio_loop.
    #[arg(long, default_value = "guests/build")]
    guests: PathBuf,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    metric: &'static str,
    unit: &'static str,
    corefour: f64,
    baseline: f64,
    ratio: f64,
    goal: &'static str,
    met: bool,
}

struct Sample {
    first_byte: Duration,
    overhead_kib: u64,
    private_kib: u64,
}

/// Runs `cmd` to completion: time to its first stdout byte, and the "rss_kib=.. guest_resident_kib=.."
/// it prints on stderr.
fn first_byte_and_rss(mut cmd: Command) -> anyhow::Result<Sample> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    let mut out = child.stdout.take().context("no stdout")?;
    let mut b = [0u8; 1];
    out.read_exact(&mut b)
        .with_context(|| format!("{cmd:?} printed nothing"))?;
    let first_byte = start.elapsed();
    let mut rest = Vec::new();
    let _ = out.read_to_end(&mut rest);
    let o = child.wait_with_output()?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let err = String::from_utf8_lossy(&o.stderr);
    let num = |key: &str| -> anyhow::Result<u64> {
        err.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{cmd:?} did not report {key} on stderr: {err}"))
    };
    let rss = num("rss_kib=")?;
    let anon = num("anon_kib=")?;
    let guest = num("guest_resident_kib=")?;
    Ok(Sample {
        first_byte,
        overhead_kib: rss.saturating_sub(guest),
        private_kib: anon.saturating_sub(guest),
    })
}

/// Wall time of `cmd` from spawn to exit (it must succeed).
fn wall(mut cmd: Command) -> anyhow::Result<Duration> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let o = cmd
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?
        .wait_with_output()?;
    let t = start.elapsed();
    if !o.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(t)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn need(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} not found: build the guests first (make -C guests) or pass --guests DIR",
            p.display()
        );
    }
    Ok(p)
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    if a.runs == 0 || a.exits == 0 {
        bail!("--runs and --exits must be at least 1");
    }
    let hello = need(&a.guests, "hello.elf")?;
    let pioloop = need(&a.guests, "pioloop.elf")?;
    let baseline = need(&a.guests, "kvm_pio_loop")?;
    let me = std::env::current_exe().context("cannot find the corefour binary")?;
    let ours = |kernel: &Path, cmdline: &str, stats: bool| {
        let mut c = Command::new(&me);
        c.args(["vmm", "--backend", "kvm", "--kernel"])
            .arg(kernel)
            .args(["--cmdline", cmdline]);
        if stats {
            c.arg("--stats");
        }
        c
    };
    let theirs = |n: u64, stats: bool| {
        let mut c = Command::new(&baseline);
        c.arg(n.to_string());
        if stats {
            c.arg("--stats");
        }
        c
    };

    let tty = std::io::stderr().is_terminal();
    let new = || [Vec::new(), Vec::new()];
    let (mut fb, mut rss, mut anon, mut t0, mut tn) = (new(), new(), new(), new(), new());
    let n_arg = format!("n={}", a.exits);
    for i in 0..a.runs {
        if tty {
            eprint!("\rcorefour bench vmm: run {}/{}", i + 1, a.runs);
        }
        for (side, s) in [
            first_byte_and_rss(ours(&hello, "", true))?,
            first_byte_and_rss(theirs(0, true))?,
        ]
        .into_iter()
        .enumerate()
        {
            fb[side].push(s.first_byte.as_secs_f64() * 1e3);
            rss[side].push(s.overhead_kib as f64 / 1024.0);
            anon[side].push(s.private_kib as f64 / 1024.0);
        }
        t0[0].push(wall(ours(&pioloop, "n=0", false))?.as_secs_f64());
        t0[1].push(wall(theirs(0, false))?.as_secs_f64());
        tn[0].push(wall(ours(&pioloop, &n_arg, false))?.as_secs_f64());
        tn[1].push(wall(theirs(a.exits, false))?.as_secs_f64());
    }
    if tty {
        eprintln!();
    }
    let per_exit_us =
        |side: usize| (median(tn[side].clone()) - median(t0[side].clone())) / a.exits as f64 * 1e6;
    let row = |metric, unit, c: f64, b: f64, goal, met: bool| Row {
        metric,
        unit,
        corefour: c,
        baseline: b,
        ratio: c / b,
        goal,
        met,
    };
    let (fb_c, fb_b) = (median(fb[0].clone()), median(fb[1].clone()));
    let (rss_c, rss_b) = (median(rss[0].clone()), median(rss[1].clone()));
    let (anon_c, anon_b) = (median(anon[0].clone()), median(anon[1].clone()));
    let (pio_c, pio_b) = (per_exit_us(0), per_exit_us(1));
    let rows = [
        row(
            "start -> first serial byte",
            "ms",
            fb_c,
            fb_b,
            "<= 5 ms",
            fb_c <= 5.0,
        ),
        row(
            "VMM overhead RSS",
            "MiB",
            rss_c,
            rss_b,
            "<= 3 MiB",
            rss_c <= 3.0,
        ),
        row(
            "  of which private (anon)",
            "MiB",
            anon_c,
            anon_b,
            "(info)",
            true,
        ),
        row(
            "PIO exit round trip",
            "us",
            pio_c,
            pio_b,
            "<= 1.1x C",
            pio_c <= 1.1 * pio_b,
        ),
    ];
    if a.json {
        let doc = serde_json::json!({
            "runs": a.runs,
            "exits_per_run": a.exits,
            "baseline": baseline.display().to_string(),
            "rows": rows,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(0);
    }
    println!(
        "corefour bench vmm: medians of {} runs; baseline = {} (raw KVM ioctls in C), same run",
        a.runs,
        baseline.display()
    );
    println!(
        "{:<28} {:>12} {:>12} {:>7}  {:<10}",
        "metric", "corefour", "C baseline", "ratio", "goal"
    );
    for r in &rows {
        println!(
            "{:<28} {:>9.2} {:<3}{:>8.2} {:<3}{:>6.2}x  {:<10} {}",
            r.metric,
            r.corefour,
            r.unit,
            r.baseline,
            r.unit,
            r.ratio,
            r.goal,
            match (r.goal, r.met) {
                ("(info)", _) => "",
                (_, true) => "met",
                (_, false) => "MISSED",
            }
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
