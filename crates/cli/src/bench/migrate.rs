//! `corefour bench migrate`: live-migration total time and downtime for an idle and a busy
//! (memory-writing) guest over loopback TCP, and snapshot restore time; each against a
//! baseline measured in the same run:
//! - migration total vs a plain copy of the guest's memory size over loopback TCP (what moving
//!   the memory costs with no VMM in the way);
//! - a cold restore (`corefour vmm --restore`, a new process and a new KVM VM) vs reading the
//!   snapshot's memory file into RAM (what a restore that copies memory, instead of mapping it
//!   MAP_PRIVATE, would pay at least);
//! - a warm restore (`PUT /vm/restore` to a `corefour vmm --prewarm` whose KVM VM, memory slots
//!   and vCPUs already exist) vs the cold one, both to the guest's first output after the
//!   restore;
//! - `copy_storage` (live disk mirroring, a disk-writing guest): total vs a TCP copy of the
//!   memory and disk data, downtime vs the same guest migrated on shared storage (memory only)
//!   in the same run.

use std::io::{IsTerminal, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

#[derive(clap::Args)]
pub struct Args {
    /// Runs per measurement (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// Where `make -C guests` put counter.elf and dirtier.elf.
    #[arg(long, default_value = "guests/build")]
    guests: PathBuf,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    metric: String,
    unit: &'static str,
    corefour: f64,
    baseline: Option<f64>,
    baseline_is: &'static str,
    ratio: Option<f64>,
    goal: &'static str,
    met: Option<bool>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

struct Child2 {
    child: Child,
}
impl Drop for Child2 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn me() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find the corefour binary")
}

fn wait_path(p: &Path, what: &str) -> anyhow::Result<()> {
    let t = Instant::now();
    while !p.exists() {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("{what} did not appear within 20 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn wait_text(p: &Path, text: &str) -> anyhow::Result<()> {
    let t = Instant::now();
    while !std::fs::read_to_string(p)
        .unwrap_or_default()
        .contains(text)
    {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("{} never showed {text:?}", p.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn put(sock: &Path, path: &str, body: Option<&str>) -> anyhow::Result<(u16, String)> {
    let r = corefour_vmm::api_client::call(sock, "PUT", path, body, Duration::from_secs(300))?;
    Ok((r.status, r.body))
}

/// Starts `corefour vmm --incoming` on a free loopback port (with `config` for its devices) and
/// waits until it listens: the target, its API socket and the port.
fn incoming_target(dir: &Path, config: Option<&Path>) -> anyhow::Result<(Child2, PathBuf, u16)> {
    let port = free_port()?;
    let tsock = dir.join("dst.sock");
    let terr = dir.join("dst.err");
    let _ = std::fs::remove_file(&tsock);
    let mut cmd = Command::new(me()?);
    cmd.args(["vmm", "--incoming", &format!("127.0.0.1:{port}")]);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let target = cmd
        .arg("--api-sock")
        .arg(&tsock)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&terr)?)
        .spawn()
        .context("cannot start the target VMM")?;
    let target = Child2 { child: target };
    wait_text(&terr, "waiting for a migration")?;
    Ok((target, tsock, port))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts a source VM running `kernel` and waits until it printed `ready`.
fn source(
    dir: &Path,
    kernel: &Path,
    cmdline: &str,
    mib: u64,
    ready: &str,
) -> anyhow::Result<(Child2, PathBuf)> {
    let sock = dir.join("src.sock");
    let out = dir.join("src.out");
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(me()?)
        .arg("vmm")
        .arg("--kernel")
        .arg(kernel)
        .args([
            "--memory",
            &format!("{mib}M"),
            "--cmdline",
            cmdline,
            "--timeout",
            "300s",
        ])
        .arg("--api-sock")
        .arg(&sock)
        .stdout(std::fs::File::create(&out)?)
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the source VMM")?;
    let c = Child2 { child };
    wait_path(&sock, "the source's API socket")?;
    wait_text(&out, ready)?;
    Ok((c, sock))
}

#[derive(serde::Deserialize)]
struct Report {
    total_ms: f64,
    downtime_ms: f64,
    rounds: u32,
    pages_sent: u64,
}

fn migrate_once(
    dir: &Path,
    kernel: &Path,
    cmdline: &str,
    mib: u64,
    ready: &str,
) -> anyhow::Result<Report> {
    let (mut target, tsock, port) = incoming_target(dir, None)?;
    let (mut src, ssock) = source(dir, kernel, cmdline, mib, ready)?;
    let (code, body) = put(
        &ssock,
        "/vm/migrate",
        Some(&format!(
            r#"{{"to": "127.0.0.1:{port}", "max_downtime_ms": 10}}"#
        )),
    )?;
    if code != 200 {
        bail!("migration failed ({code}): {body}");
    }
    let r: Report = serde_json::from_str(&body).context("migration report")?;
    wait_path(&tsock, "the target's API socket")?;
    let _ = put(&tsock, "/vm/shutdown", None);
    let _ = target.child.wait();
    let _ = src.child.wait();
    Ok(r)
}

/// Milliseconds to push `bytes` through a loopback TCP connection (1 MiB writes).
fn tcp_copy_ms(bytes: u64) -> anyhow::Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let rx = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = s.read(&mut buf)?;
            if k == 0 {
                return Ok(n);
            }
            n += k as u64;
        }
    });
    // Non-zero data, so nothing can shortcut it.
    let buf: Vec<u8> = (0..1usize << 20).map(|i| (i * 31) as u8).collect();
    let t = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&buf)?;
        sent += buf.len() as u64;
    }
    drop(s);
    let got = rx
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if got != sent {
        bail!("loopback copy lost bytes ({got} of {sent})");
    }
    Ok(ms)
}

/// One cold restore: `corefour vmm --restore SNAP` spawned, timed from the spawn to the first
/// byte of guest output on its stdout (process start, dynamic linking, KVM set-up, state, the
/// guest's first serial write). Also returns the VMM's own figure (reading the snapshot to the
/// state loaded).
fn restore_cold(snap: &Path) -> anyhow::Result<(f64, f64)> {
    let t = Instant::now();
    let child = Command::new(me()?)
        .args(["vmm", "--restore"])
        .arg(snap)
        .args(["--timeout", "2s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run corefour vmm --restore")?;
    let mut c = Child2 { child };
    let first = first_output_ms(&mut c, t)?;
    let _ = c.child.kill();
    let _ = c.child.wait();
    let mut err = String::new();
    if let Some(mut e) = c.child.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    let internal = err
        .lines()
        .find_map(|l| l.split_once(" in ").and_then(|(_, r)| r.split_once(" ms")))
        .and_then(|(n, _)| n.trim().parse::<f64>().ok())
        .with_context(|| format!("restore printed no timing: {err}"))?;
    Ok((first, internal))
}

/// Milliseconds from `since` to the first byte on the child's stdout.
fn first_output_ms(c: &mut Child2, since: Instant) -> anyhow::Result<f64> {
    let Some(out) = c.child.stdout.as_mut() else {
        bail!("the VMM has no stdout pipe");
    };
    let mut b = [0u8; 1];
    let n = out
        .read(&mut b)
        .context("reading the restored guest's output")?;
    if n == 0 {
        bail!("the restored VMM exited without guest output");
    }
    Ok(since.elapsed().as_secs_f64() * 1e3)
}

/// A warm VMM (`corefour vmm --prewarm`) of the snapshot's shape, started and ready before
/// the clock starts; then `PUT /vm/restore`, timed to its reply (state loaded, vCPU threads
/// starting) and to the first byte of guest output.
fn restore_warm(dir: &Path, snap: &Path, mib: u64) -> anyhow::Result<(f64, f64)> {
    let sock = dir.join("warm.sock");
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(me()?)
        .args(["vmm", "--prewarm", "--vcpus", "1", "--memory"])
        .arg(format!("{mib}M"))
        .args(["--timeout", "2s", "--api-sock"])
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run corefour vmm --prewarm")?;
    let mut c = Child2 { child };
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("the warm VMM never served its socket");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let body = format!(r#"{{"path": "{}"}}"#, snap.display());
    let t = Instant::now();
    let (code, reply) = put(&sock, "/vm/restore", Some(&body))?;
    let replied = t.elapsed().as_secs_f64() * 1e3;
    if code != 200 {
        bail!("warm restore failed ({code}): {reply}");
    }
    let first = first_output_ms(&mut c, t)?;
    Ok((replied, first))
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let counter = a.guests.join("counter.elf");
    let dirtier = a.guests.join("dirtier.elf");
    for g in [&counter, &dirtier] {
        if !g.exists() {
            bail!("{} is missing: run `make -C guests` first", g.display());
        }
    }
    let dir = std::env::temp_dir().join(format!("corefour-bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = measure(&a, &dir, &counter, &dirtier).and_then(|mut rows| {
        rows.extend(copy_storage_rows(&a, &dir)?);
        Ok(rows)
    });
    let _ = std::fs::remove_dir_all(&dir);
    let rows = result?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    Ok(0)
}

fn measure(a: &Args, dir: &Path, counter: &Path, dirtier: &Path) -> anyhow::Result<Vec<Row>> {
    let tty = std::io::stderr().is_terminal();
    let note = |s: &str| {
        if tty {
            eprintln!("bench migrate: {s}");
        }
    };
    let mib = a.memory_mib;
    let (mut idle_total, mut idle_down, mut busy_total, mut busy_down, mut tcp) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut busy_rounds = vec![];
    let mut busy_pages = vec![];
    for i in 0..a.runs {
        note(&format!("run {}/{}: idle guest", i + 1, a.runs));
        let r = migrate_once(dir, counter, "spin=100000000", mib, "counter: start")?;
        idle_total.push(r.total_ms);
        idle_down.push(r.downtime_ms);
        note("busy guest");
        let r = migrate_once(dir, dirtier, "ws=64 spin=2000", mib, "dirtier: pass")?;
        busy_total.push(r.total_ms);
        busy_down.push(r.downtime_ms);
        busy_rounds.push(f64::from(r.rounds));
        busy_pages.push(r.pages_sent as f64);
        tcp.push(tcp_copy_ms(mib << 20)?);
    }
    note("snapshot restore");
    // A guest that prints all the time, so the first output after a restore comes at once.
    let (mut src, sock) = source(dir, counter, "spin=20000", mib, "count=")?;
    let snap = dir.join("snap");
    let (code, body) = put(
        &sock,
        "/vm/snapshot",
        Some(&format!(r#"{{"path": "{}"}}"#, snap.display())),
    )?;
    if code != 200 {
        bail!("snapshot failed ({code}): {body}");
    }
    let _ = put(&sock, "/vm/shutdown", None);
    let _ = src.child.wait();
    let (mut cold_first, mut cold_internal, mut warm_reply, mut warm_first, mut read) =
        (vec![], vec![], vec![], vec![], vec![]);
    // Interleaved, so both ways see the same host load.
    for _ in 0..a.runs.max(7) {
        let (first, internal) = restore_cold(&snap)?;
        cold_first.push(first);
        cold_internal.push(internal);
        let (reply, first) = restore_warm(dir, &snap, mib)?;
        warm_reply.push(reply);
        warm_first.push(first);
        let t = Instant::now();
        let bytes = std::fs::read(snap.join("memory.bin"))?;
        read.push(t.elapsed().as_secs_f64() * 1e3);
        drop(bytes);
    }
    let tcp_ms = median(tcp);
    let read_ms = median(read);
    let row = |metric: String,
               v: f64,
               base: Option<f64>,
               baseline_is: &'static str,
               goal: &'static str,
               limit: Option<f64>| Row {
        metric,
        unit: "ms",
        corefour: v,
        baseline: base,
        baseline_is,
        ratio: base.map(|b| v / b),
        goal,
        met: limit.map(|l| v <= l),
    };
    Ok(vec![
        row(
            format!("migration total, idle {mib} MiB"),
            median(idle_total),
            Some(tcp_ms),
            "TCP copy of the memory size",
            "",
            None,
        ),
        row(
            "migration downtime, idle".into(),
            median(idle_down),
            None,
            "",
            "<= 10 ms",
            Some(10.0),
        ),
        row(
            format!(
                "migration total, busy (64 MiB ws, {:.0} rounds, {:.0} pages)",
                median(busy_rounds),
                median(busy_pages)
            ),
            median(busy_total),
            Some(tcp_ms),
            "TCP copy of the memory size",
            "",
            None,
        ),
        row(
            "migration downtime, busy".into(),
            median(busy_down),
            None,
            "",
            "",
            None,
        ),
        row(
            "restore, cold: spawn `vmm --restore` to first guest output".into(),
            median(cold_first.clone()),
            Some(read_ms),
            "read of memory.bin into RAM",
            "",
            None,
        ),
        row(
            "restore, cold: inside the VMM (read snapshot..state loaded)".into(),
            median(cold_internal),
            Some(read_ms),
            "read of memory.bin into RAM",
            "",
            None,
        ),
        row(
            "restore, warm: PUT /vm/restore to its reply (state loaded)".into(),
            median(warm_reply),
            Some(median(cold_first.clone())),
            "cold restore to first output",
            "",
            None,
        ),
        row(
            "restore, warm: PUT /vm/restore to first guest output".into(),
            median(warm_first),
            Some(median(cold_first)),
            "cold restore to first output",
            "<= 5 ms",
            Some(5.0),
        ),
    ])
}

/// Disk size and data for the `copy_storage` rows.
const DISK_MIB: u64 = 256;
const DISK_DATA_MIB: u64 = 64;

/// One live migration of vblkloop (writing its 64 sectors 64 KiB apart) with a DISK_MIB disk
/// holding DISK_DATA_MIB of data, with `copy_storage` or on shared storage (the target opens
/// the same file): (total ms, downtime ms).
fn copy_storage_once(
    dir: &Path,
    vblkloop: &Path,
    mib: u64,
    data: &[u8],
    copy: bool,
) -> anyhow::Result<(f64, f64)> {
    let (src_disk, dst_disk) = (dir.join("src-disk.raw"), dir.join("dst-disk.raw"));
    std::fs::write(&src_disk, data)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src_disk)?
        .set_len(DISK_MIB << 20)?;
    let f = std::fs::File::create(&dst_disk)?;
    f.set_len(DISK_MIB << 20)?;
    let local = dir.join("dst.json");
    std::fs::write(
        &local,
        serde_json::json!({"kernel": vblkloop, "memory_mib": mib,
                           "disks": [{"path": if copy { &dst_disk } else { &src_disk }}]})
        .to_string(),
    )?;
    let (mut target, tsock, port) = incoming_target(dir, Some(&local))?;
    let sock = dir.join("src.sock");
    let out = dir.join("src.out");
    let _ = std::fs::remove_file(&sock);
    let src = Command::new(me()?)
        .arg("vmm")
        .arg("--kernel")
        .arg(vblkloop)
        .args([
            "--memory",
            &format!("{mib}M"),
            "--cmdline",
            "spin=200000 stride=128",
        ])
        .args(["--timeout", "300s"])
        .arg("--disk")
        .arg(&src_disk)
        .arg("--api-sock")
        .arg(&sock)
        .stdout(std::fs::File::create(&out)?)
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the source VMM")?;
    let mut src = Child2 { child: src };
    wait_path(&sock, "the source's API socket")?;
    wait_text(&out, "count=3")?;
    let (code, body) = put(
        &sock,
        "/vm/migrate",
        Some(&format!(
            r#"{{"to": "127.0.0.1:{port}", "max_downtime_ms": 10, "copy_storage": {copy}}}"#
        )),
    )?;
    if code != 200 {
        bail!("migration with copy_storage failed ({code}): {body}");
    }
    let r: Report = serde_json::from_str(&body).context("migration report")?;
    wait_path(&tsock, "the target's API socket")?;
    let _ = put(&tsock, "/vm/shutdown", None);
    let _ = target.child.wait();
    let _ = src.child.wait();
    Ok((r.total_ms, r.downtime_ms))
}

/// The `copy_storage` rows; none (with a note) when vblkloop is not built.
fn copy_storage_rows(a: &Args, dir: &Path) -> anyhow::Result<Vec<Row>> {
    let vblkloop = a.guests.join("vblkloop.elf");
    if !vblkloop.exists() {
        eprintln!(
            "bench migrate: {} is missing (make -C guests -f virtio.mk): no copy-storage rows",
            vblkloop.display()
        );
        return Ok(Vec::new());
    }
    if std::io::stderr().is_terminal() {
        eprintln!("bench migrate: copy-storage migrations");
    }
    let data: Vec<u8> = (0..(DISK_DATA_MIB << 20) as usize)
        .map(|i| (i / 4096) as u8 | 1)
        .collect();
    let (mut total, mut down, mut tcp, mut shared) = (vec![], vec![], vec![], vec![]);
    for _ in 0..a.runs {
        let (t, d) = copy_storage_once(dir, &vblkloop, a.memory_mib, &data, true)?;
        total.push(t);
        down.push(d);
        tcp.push(tcp_copy_ms((a.memory_mib + DISK_DATA_MIB) << 20)?);
        shared.push(copy_storage_once(dir, &vblkloop, a.memory_mib, &data, false)?.1);
    }
    let row = |metric: String, v: f64, base: f64, baseline_is: &'static str| Row {
        metric,
        unit: "ms",
        corefour: v,
        baseline: Some(base),
        baseline_is,
        ratio: Some(v / base),
        goal: "",
        met: None,
    };
    Ok(vec![
        row(
            format!(
                "migration total, --copy-storage ({DISK_MIB} MiB disk, {DISK_DATA_MIB} MiB data, guest writing)"
            ),
            median(total),
            median(tcp),
            "TCP copy of memory + disk data",
        ),
        row(
            "migration downtime, --copy-storage".into(),
            median(down),
            median(shared),
            "same guest, shared storage",
        ),
    ])
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<58} {:>10} {:>10} {:>7}  {:<10} baseline is",
        "metric (ms)", "corefour", "baseline", "ratio", "goal"
    );
    for r in rows {
        let b = r.baseline.map_or("-".into(), |b| format!("{b:.2}"));
        let ratio = r.ratio.map_or("-".into(), |x| format!("{x:.2}x"));
        let goal = match r.met {
            Some(true) => format!("{} ok", r.goal),
            Some(false) => format!("{} MISSED", r.goal),
            None => r.goal.to_string(),
        };
        println!(
            "{:<58} {:>10.2} {:>10} {:>7}  {:<10} {}",
            r.metric, r.corefour, b, ratio, goal, r.baseline_is
        );
    }
}
