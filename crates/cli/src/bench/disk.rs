//! `corefour bench disk`: image conversion against `qemu-img convert` in the same run, and random
//! 4 KiB I/O through the qcow2 layer against raw.

use anyhow::{bail, Context};
use corefour_disk::qcow2::{CreateOptions, Qcow2};
use corefour_disk::raw::RawImage;
use corefour_disk::{convert, open, BlockWrite, Format, Open};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Runs per case; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Size of the sparse qcow2 source.
    #[arg(long, default_value = "2G")]
    sparse_size: String,
    /// Size of the random raw source.
    #[arg(long, default_value = "1G")]
    random_size: String,
    /// Random 4 KiB operations per I/O case.
    #[arg(long, default_value_t = 50_000)]
    ops: u64,
    /// Directory for the scratch images (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

struct Xorshift(u64);
impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn qemu_convert(src: &Path, src_fmt: &str, dst: &Path, fmt: &str) -> anyhow::Result<()> {
    let st = Command::new("qemu-img")
        .args(["convert", "-f", src_fmt, "-O", fmt])
        .arg(src)
        .arg(dst)
        .status()
        .context("running qemu-img")?;
    if !st.success() {
        bail!("qemu-img convert failed");
    }
    Ok(())
}

fn ours_convert(src: &Path, dst: &Path, fmt: Format) -> anyhow::Result<()> {
    let opts = CreateOptions::default();
    convert::convert_path(
        src,
        Open::default(),
        dst,
        fmt,
        &opts,
        false,
        4,
        &mut |_, _| {},
    )?;
    Ok(())
}

/// A sparse image: 1 MiB of random data every 8 MiB (1/8 allocated), so the map matters.
fn make_sparse_qcow2(dir: &Path, size: u64) -> anyhow::Result<PathBuf> {
    let raw = dir.join("bench-sparse.raw");
    let mut img = RawImage::create(&raw, size)?;
    let mut rng = Xorshift(0x1234_5678);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off + (1 << 20) <= size {
        rng.fill(&mut buf);
        img.write_at(&buf, off)?;
        off += 8 << 20;
    }
    img.flush()?;
    drop(img);
    let q = dir.join("bench-sparse.qcow2");
    qemu_convert(&raw, "raw", &q, "qcow2")?;
    std::fs::remove_file(&raw)?;
    Ok(q)
}

fn make_random_raw(dir: &Path, size: u64) -> anyhow::Result<PathBuf> {
    let p = dir.join("bench-random.raw");
    let mut img = RawImage::create(&p, size)?;
    let mut rng = Xorshift(0x9abc_def0);
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        img.write_at(&buf[..n], off)?;
        off += n as u64;
    }
    img.flush()?;
    Ok(p)
}

fn settle() {
    let _ = Command::new("sync").status();
}

struct Row {
    case: String,
    ours: f64,
    peer: f64,
    /// Best-of-runs times (conversions): less sensitive to other load on a shared machine.
    best: Option<(f64, f64)>,
    unit: &'static str,
    peer_name: &'static str,
}

impl Row {
    /// corefour's time over the peer's; for rates (ops/s), the peer's rate over ours.
    fn ratio(&self) -> f64 {
        if self.unit == "s" {
            self.ours / self.peer
        } else {
            self.peer / self.ours
        }
    }
}

fn time_convert(
    rows: &mut Vec<Row>,
    runs: usize,
    case: &str,
    src: &Path,
    src_fmt: &str,
    dir: &Path,
    fmt: Format,
) -> anyhow::Result<()> {
    let dst = dir.join(format!("bench-out.{fmt}"));
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for i in 0..runs {
        // Alternate who goes first so neither always gets the warmer cache.
        for who in [i % 2, 1 - i % 2] {
            let _ = std::fs::remove_file(&dst);
            // Start each run with no dirty pages: neither side pays the other's writeback.
            settle();
            let t = Instant::now();
            if who == 0 {
                ours_convert(src, &dst, fmt)?;
                ours.push(t.elapsed().as_secs_f64());
            } else {
                qemu_convert(src, src_fmt, &dst, fmt.name())?;
                peer.push(t.elapsed().as_secs_f64());
            }
        }
    }
    let _ = std::fs::remove_file(&dst);
    rows.push(Row {
        case: case.into(),
        best: Some((
            ours.iter().copied().fold(f64::MAX, f64::min),
            peer.iter().copied().fold(f64::MAX, f64::min),
        )),
        ours: median(ours),
        peer: median(peer),
        unit: "s",
        peer_name: "qemu-img",
    });
    Ok(())
}

/// Random 4 KiB reads then writes; returns (read ops/s, write ops/s). The final flush is not
/// timed: it measures the disk, not the format layer.
fn random_io(img: &mut dyn BlockWrite, ops: u64, seed: u64) -> anyhow::Result<(f64, f64)> {
    let blocks = img.size() / 4096;
    let mut rng = Xorshift(seed);
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    for _ in 0..ops {
        let b = rng.next() % blocks;
        img.read_at(&mut buf, b * 4096)?;
    }
    let reads = ops as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..ops {
        let b = rng.next() % blocks;
        buf[0] = b as u8;
        img.write_at(&buf, b * 4096)?;
    }
    let writes = ops as f64 / t.elapsed().as_secs_f64();
    img.flush()?;
    Ok((reads, writes))
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        bail!("qemu-img is the peer of this benchmark; install qemu-utils");
    }
    let sparse_size = corefour_disk::size::parse_size(&args.sparse_size)?;
    let random_size = corefour_disk::size::parse_size(&args.random_size)?;
    let runs = args.runs.max(1);
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("corefour-bench-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = bench(&args, &dir, sparse_size, random_size, runs);
    let _ = std::fs::remove_dir_all(&dir);
    let rows = result?;
    if args.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({"case": r.case, "ours": r.ours, "peer": r.peer,
                    "peer_name": r.peer_name, "unit": r.unit, "ratio": r.ratio(),
                    "best_ratio": r.best.map(|(o, p)| o / p)})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!(
        "{:<44} {:>12} {:>12} {:>10} {:>10}  (median of {runs})",
        "case", "corefour", "peer", "ratio", "best"
    );
    for r in &rows {
        let ratio = r.ratio();
        let best = r
            .best
            .map(|(o, p)| format!("{:.2}x", o / p))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<44} {:>10.3}{:<2} {:>10.3}{:<2} {:>9.2}x {best:>10}  vs {}",
            r.case,
            r.ours,
            if r.unit == "s" { "s" } else { "k" },
            r.peer,
            if r.unit == "s" { "s" } else { "k" },
            ratio,
            r.peer_name
        );
    }
    println!(
        "ratio = corefour time / peer time (k = thousand ops/s; for rates the ratio is peer/ours),"
    );
    println!("best = best run / best run; goal <= 1.00x vs qemu-img");
    Ok(0)
}

fn bench(
    args: &Args,
    dir: &Path,
    sparse_size: u64,
    random_size: u64,
    runs: usize,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    eprintln!(
        "preparing a {} sparse qcow2 and a {} random raw in {} ...",
        args.sparse_size,
        args.random_size,
        dir.display()
    );
    let sparse = make_sparse_qcow2(dir, sparse_size)?;
    let random = make_random_raw(dir, random_size)?;
    let label = |what: &str, to: &str| format!("convert {what} -> {to}");
    let s = format!("{} sparse qcow2", args.sparse_size);
    let r = format!("{} random raw", args.random_size);
    time_convert(
        &mut rows,
        runs,
        &label(&s, "raw"),
        &sparse,
        "qcow2",
        dir,
        Format::Raw,
    )?;
    time_convert(
        &mut rows,
        runs,
        &label(&s, "qcow2"),
        &sparse,
        "qcow2",
        dir,
        Format::Qcow2,
    )?;
    time_convert(
        &mut rows,
        runs,
        &label(&r, "qcow2"),
        &random,
        "raw",
        dir,
        Format::Qcow2,
    )?;
    time_convert(
        &mut rows,
        runs,
        &label(&r, "raw"),
        &random,
        "raw",
        dir,
        Format::Raw,
    )?;

    // Random 4 KiB I/O: a fully allocated qcow2 and a raw copy, both converted from the random raw.
    let q = dir.join("bench-io.qcow2");
    ours_convert(&random, &q, Format::Qcow2)?;
    let mut qi = open(
        &q,
        Open {
            format: Some(Format::Qcow2),
            write: true,
        },
    )?;
    // The raw side gets a copy made the same way, so both files share a page-cache history.
    let rcopy = dir.join("bench-io.raw");
    ours_convert(&random, &rcopy, Format::Raw)?;
    let mut ri = open(
        &rcopy,
        Open {
            format: Some(Format::Raw),
            write: true,
        },
    )?;
    let (mut qr, mut qw, mut rr, mut rw) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs as u64 {
        settle();
        let (a, b) = random_io(qi.writer()?, args.ops, 7 + i)?;
        settle();
        let (c, d) = random_io(ri.writer()?, args.ops, 7 + i)?;
        qr.push(a / 1000.0);
        qw.push(b / 1000.0);
        rr.push(c / 1000.0);
        rw.push(d / 1000.0);
    }
    rows.push(Row {
        case: "random 4K read, qcow2 (allocated)".into(),
        best: None,
        ours: median(qr),
        peer: median(rr),
        unit: "kops",
        peer_name: "raw",
    });
    rows.push(Row {
        case: "random 4K write, qcow2 (allocated)".into(),
        best: None,
        ours: median(qw),
        peer: median(rw),
        unit: "kops",
        peer_name: "raw",
    });
    // Allocating writes: every write lands in a new cluster of an empty image.
    let mut fresh_q = Vec::new();
    let mut fresh_r = Vec::new();
    for i in 0..runs as u64 {
        let fq = dir.join("bench-fresh.qcow2");
        let fr = dir.join("bench-fresh.raw");
        let mut a = Qcow2::create(&fq, Some(random_size), &CreateOptions::default())?;
        let mut b = RawImage::create(&fr, random_size)?;
        settle();
        let (_, wq) = random_io(&mut a, args.ops / 5, 100 + i)?;
        let (_, wr) = random_io(&mut b, args.ops / 5, 100 + i)?;
        fresh_q.push(wq / 1000.0);
        fresh_r.push(wr / 1000.0);
        drop(a);
        drop(b);
        let _ = std::fs::remove_file(&fq);
        let _ = std::fs::remove_file(&fr);
    }
    rows.push(Row {
        case: "random 4K write, qcow2 (allocating)".into(),
        best: None,
        ours: median(fresh_q),
        peer: median(fresh_r),
        unit: "kops",
        peer_name: "sparse raw",
    });
    Ok(rows)
}
