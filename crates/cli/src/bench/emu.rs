//! `corefour bench emu`: guest MIPS of the software CPU on a guest CPU loop, with KVM on the
//! same binary measured in the same run (on kvm_pvm hosts that is kvm_pvm's own ring-0
//! instruction emulator; on a vmx/svm host it is the real CPU).
//!
//! The guest is a flat image (`*.bin`, entered in 64-bit ring 0 at 1 MiB, see
//! guests/CONTRACT.md) running an 8-instruction loop of ALU, load, store, LEA, shift and a
//! conditional branch `n` times, then exiting through port 0xf4. The rate is
//! (8 n) / (t(n) - t(0)): the n = 0 run takes out VMM start-up and teardown. Both wall time and
//! the VMM process's CPU time (user + system, from /proc/self/stat's children times) are
//! reported: on a shared, loaded host the CPU-time rate is what the CPU model achieves, the
//! wall rate what a user waits. The minimum of `runs` runs is kept.
//!
//! The Linux row boots the fixture kernel + initramfs (tests/fixtures/linux/setup.sh) to its
//! marker line on `corefour vmm --backend emu` and on `qemu-system-x86_64 -accel tcg` (the peer)
//! with the same kernel, initramfs, memory and command line (bench/linux_peer.rs), one after
//! the other in the same run, and reports both times and the ratio.
//!
//! The software CPU is measured twice: `emu` with its JIT (hot blocks translated to host
//! code, the default) and `emu-interp` with `COREFOUR_EMU_JIT=0` (the interpreter alone).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::linux_peer;
use serde::Serialize;

/// Instructions per loop iteration in [`loop_image`].
const PER_ITER: u64 = 8;

#[derive(clap::Args)]
pub struct Args {
    /// Loop iterations on the software CPU (8 instructions each).
    #[arg(long, default_value_t = 25_000_000)]
    iterations: u64,
    /// Loop iterations on KVM (kept small: kvm_pvm emulates ring-0 code at ~1 us/instruction).
    #[arg(long, default_value_t = 200_000)]
    kvm_iterations: u64,
    /// Runs per measurement (the fastest is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Linux boots per backend (the fastest is reported); 0 skips the Linux row.
    #[arg(long, default_value_t = 1)]
    linux_runs: usize,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// One backend's boot of the fixture to its marker line.
#[derive(Serialize)]
struct LinuxRow {
    backend: &'static str,
    /// Wall seconds from process start to the marker line.
    to_marker_seconds: f64,
    /// CPU seconds (user + system) the whole run used, power-off included.
    cpu_seconds: f64,
}

#[derive(Serialize)]
struct Row {
    backend: &'static str,
    instructions: u64,
    wall_seconds: f64,
    cpu_seconds: f64,
    mips_wall: f64,
    mips_cpu: f64,
}

/// CPU time used by this process's reaped children so far (clock ticks of 10 ms).
fn children_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(13).copied().unwrap_or(0) + f.get(14).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

#[derive(Serialize)]
struct Report {
    rows: Vec<Row>,
    /// emu MIPS / KVM MIPS on the same loop.
    ratio_emu_to_kvm: Option<f64>,
    linux: Vec<LinuxRow>,
    /// emu time to the marker / QEMU TCG time to the marker (below 1: emu is faster).
    linux_ratio_emu_to_qemu: Option<f64>,
    /// The same for the interpreter alone.
    linux_ratio_emu_interp_to_qemu: Option<f64>,
    /// emu (JIT) MIPS / emu-interp MIPS on the loop (CPU time).
    ratio_jit_to_interp: Option<f64>,
    /// Why the Linux row is missing or partial, if it is.
    linux_note: Option<String>,
}

/// The loop as a flat 64-bit image (hand-assembled: the CLI carries no assembler).
fn loop_image(n: u64) -> anyhow::Result<Vec<u8>> {
    let n = u32::try_from(n).context("at most 2^32-1 iterations")?;
    let mut c = Vec::new();
    c.push(0xb9); // mov ecx, n
    c.extend_from_slice(&n.to_le_bytes());
    c.extend_from_slice(&[0x48, 0xc7, 0xc6, 0x00, 0x00, 0x20, 0x00]); // mov rsi, 0x200000
    c.extend_from_slice(&[0x31, 0xc0, 0x31, 0xd2]); // xor eax, eax; xor edx, edx
    c.extend_from_slice(&[0x85, 0xc9, 0x74, 0x18]); // test ecx, ecx; jz done
    let top = c.len();
    c.extend_from_slice(&[0x48, 0x01, 0xc8]); // add rax, rcx
    c.extend_from_slice(&[0x48, 0x31, 0xc2]); // xor rdx, rax
    c.extend_from_slice(&[0x48, 0x89, 0x16]); // mov [rsi], rdx
    c.extend_from_slice(&[0x4c, 0x8b, 0x06]); // mov r8, [rsi]
    c.extend_from_slice(&[0x4a, 0x8d, 0x04, 0x40]); // lea rax, [rax + r8*2]
    c.extend_from_slice(&[0x48, 0xc1, 0xea, 0x03]); // shr rdx, 3
    c.extend_from_slice(&[0xff, 0xc9]); // dec ecx
    let back = top as i64 - (c.len() as i64 + 2);
    c.extend_from_slice(&[0x75, back as i8 as u8]); // jnz top
    debug_assert_eq!(c.len() - top, 0x18);
    c.extend_from_slice(&[0x31, 0xc0, 0xe6, 0xf4, 0xf4]); // xor eax, eax; out 0xf4, al; hlt
    Ok(c)
}

/// Wall and CPU time of one `corefour vmm` run of the loop.
fn run_once(exe: &Path, image: &Path, backend: &str) -> anyhow::Result<(Duration, Duration)> {
    let cpu0 = children_cpu();
    let start = Instant::now();
    let mut cmd = Command::new(exe);
    jit_env(&mut cmd, backend);
    let out = cmd
        .args([
            "vmm",
            "--backend",
            vmm_backend(backend),
            "--memory",
            "64M",
            "--timeout",
            "600s",
            "--kernel",
        ])
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {} vmm", exe.display()))?;
    let took = start.elapsed();
    let cpu = children_cpu().saturating_sub(cpu0);
    if !out.status.success() {
        bail!(
            "the loop guest failed on {backend} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((took, cpu))
}

/// The `corefour vmm --backend` behind a row's name.
fn vmm_backend(row: &str) -> &str {
    if row == EMU_INTERP {
        "emu"
    } else {
        row
    }
}

/// Row name of the software CPU without its JIT.
const EMU_INTERP: &str = "emu-interp";

/// Turns the software CPU's JIT off for the `emu-interp` row and on (whatever the caller's
/// environment says) for the `emu` row.
fn jit_env(cmd: &mut Command, row: &str) {
    if row == EMU_INTERP {
        cmd.env("COREFOUR_EMU_JIT", "0");
    } else {
        cmd.env_remove("COREFOUR_EMU_JIT");
    }
}

fn fastest(
    exe: &Path,
    image: &Path,
    backend: &str,
    runs: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let (mut wall, mut cpu) = (Duration::MAX, Duration::MAX);
    for _ in 0..runs.max(1) {
        let (w, c) = run_once(exe, image, backend)?;
        wall = wall.min(w);
        cpu = cpu.min(c);
    }
    Ok((wall, cpu))
}

fn measure(
    exe: &Path,
    dir: &Path,
    backend: &'static str,
    n: u64,
    runs: usize,
) -> anyhow::Result<Row> {
    let zero = dir.join(format!("loop-{backend}-0.bin"));
    let full = dir.join(format!("loop-{backend}-{n}.bin"));
    std::fs::write(&zero, loop_image(0)?).context("writing the loop image")?;
    std::fs::write(&full, loop_image(n)?).context("writing the loop image")?;
    let (w0, c0) = fastest(exe, &zero, backend, runs)?;
    let (w1, c1) = fastest(exe, &full, backend, runs)?;
    let wall = w1.saturating_sub(w0).as_secs_f64().max(1e-9);
    let cpu = c1.saturating_sub(c0).as_secs_f64().max(1e-3);
    let instructions = n * PER_ITER;
    Ok(Row {
        backend,
        instructions,
        wall_seconds: wall,
        cpu_seconds: cpu,
        mips_wall: instructions as f64 / wall / 1e6,
        mips_cpu: instructions as f64 / cpu / 1e6,
    })
}

/// The fastest of `runs` boots of `cmd()` to the marker: (wall to marker, CPU of that run).
fn linux_boot(
    backend: &'static str,
    cmd: &dyn Fn() -> Command,
    runs: usize,
    timeout: Duration,
) -> anyhow::Result<LinuxRow> {
    let mut best: Option<(Duration, Duration)> = None;
    for _ in 0..runs.max(1) {
        let cpu0 = children_cpu();
        let b = linux_peer::time_to_marker(cmd(), timeout)?;
        let cpu = children_cpu().saturating_sub(cpu0);
        let Some(t) = b.to_marker else {
            bail!(
                "{backend} did not print {} within {timeout:?}; its output ends: {}",
                linux_peer::MARKER,
                linux_peer::tail(&b.output, 600)
            );
        };
        if best.is_none_or(|(w, _)| t < w) {
            best = Some((t, cpu));
        }
    }
    let (w, c) = best.unwrap_or_default();
    Ok(LinuxRow {
        backend,
        to_marker_seconds: w.as_secs_f64(),
        cpu_seconds: c.as_secs_f64(),
    })
}

/// Time to the marker of row `a` over that of row `b`.
fn linux_ratio(rows: &[LinuxRow], a: &str, b: &str) -> Option<f64> {
    match (
        rows.iter().find(|r| r.backend == a),
        rows.iter().find(|r| r.backend == b),
    ) {
        (Some(x), Some(y)) if y.to_marker_seconds > 0.0 => {
            Some(x.to_marker_seconds / y.to_marker_seconds)
        }
        _ => None,
    }
}

/// The Linux rows: emu (JIT), emu-interp and QEMU TCG on the same fixture, one after the
/// other.
fn linux_rows(exe: &Path, runs: usize) -> (Vec<LinuxRow>, Option<f64>, Option<String>) {
    let timeout = Duration::from_secs(300);
    let f = match linux_peer::fixture() {
        Ok(f) => f,
        Err(e) => return (Vec::new(), None, Some(format!("Linux row skipped: {e:#}"))),
    };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    match linux_boot(
        "emu",
        &|| {
            let mut c = linux_peer::corefour_emu(exe, &f, timeout);
            jit_env(&mut c, "emu");
            c
        },
        runs,
        timeout,
    ) {
        Ok(r) => rows.push(r),
        Err(e) => notes.push(format!("emu: {e:#}")),
    }
    match linux_boot(
        EMU_INTERP,
        &|| {
            let mut c = linux_peer::corefour_emu(exe, &f, timeout);
            jit_env(&mut c, EMU_INTERP);
            c
        },
        runs,
        timeout,
    ) {
        Ok(r) => rows.push(r),
        Err(e) => notes.push(format!("{EMU_INTERP}: {e:#}")),
    }
    let qemu_ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if qemu_ok {
        match linux_boot("qemu-tcg", &|| linux_peer::qemu_tcg(&f), runs, timeout) {
            Ok(r) => rows.push(r),
            Err(e) => notes.push(format!("qemu-tcg: {e:#}")),
        }
    } else {
        notes.push("qemu-system-x86_64 is not installed (Debian package qemu-system-x86); the peer is not measured".into());
    }
    let ratio = linux_ratio(&rows, "emu", "qemu-tcg");
    (rows, ratio, (!notes.is_empty()).then(|| notes.join("; ")))
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("finding the corefour binary")?;
    let dir = std::env::temp_dir().join(format!("corefour-bench-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = (|| {
        let mut rows = vec![
            measure(&exe, &dir, "emu", args.iterations, args.runs)?,
            measure(&exe, &dir, EMU_INTERP, args.iterations, args.runs)?,
        ];
        let kvm_ok = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if kvm_ok {
            rows.push(measure(&exe, &dir, "kvm", args.kvm_iterations, args.runs)?);
        } else if !args.json {
            eprintln!("note: /dev/kvm is not usable; KVM is not measured");
        }
        let ratio = rows
            .iter()
            .find(|r| r.backend == "kvm")
            .map(|k| rows[0].mips_wall / k.mips_wall);
        let jit_ratio = Some(rows[0].mips_cpu / rows[1].mips_cpu.max(1e-9));
        let (linux, emu_to_qemu, linux_note) = if args.linux_runs == 0 {
            (
                Vec::new(),
                None,
                Some("Linux row skipped (--linux-runs 0)".to_string()),
            )
        } else {
            linux_rows(&exe, args.linux_runs)
        };
        let interp_to_qemu = linux_ratio(&linux, EMU_INTERP, "qemu-tcg");
        Ok::<_, anyhow::Error>(Report {
            linux_ratio_emu_interp_to_qemu: interp_to_qemu,
            rows,
            ratio_emu_to_kvm: ratio,
            linux,
            linux_ratio_emu_to_qemu: emu_to_qemu,
            ratio_jit_to_interp: jit_ratio,
            linux_note,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(0);
    }
    println!(
        "guest CPU loop (8-instruction ALU/load/store/branch loop, ring 0, fastest of {} runs)",
        args.runs
    );
    println!(
        "{:<10} {:>14} {:>9} {:>9} {:>11} {:>10}",
        "backend", "instructions", "wall s", "cpu s", "MIPS(wall)", "MIPS(cpu)"
    );
    for r in &report.rows {
        println!(
            "{:<10} {:>14} {:>9.3} {:>9.3} {:>11.1} {:>10.1}",
            r.backend, r.instructions, r.wall_seconds, r.cpu_seconds, r.mips_wall, r.mips_cpu
        );
    }
    if let Some(x) = report.ratio_jit_to_interp {
        println!("ratio emu/emu-interp (MIPS, cpu): {x:.2}x");
    }
    if let Some(x) = report.ratio_emu_to_kvm {
        println!(
            "ratio emu/kvm (wall): {x:.2}x (KVM here is kvm_pvm's ring-0 emulator unless the host has vmx/svm)"
        );
    }
    if !report.linux.is_empty() {
        println!();
        println!(
            "Linux boot to {} (Debian cloud kernel + busybox initramfs, {} MiB, \"{}\", fastest of {})",
            linux_peer::MARKER,
            linux_peer::MEMORY_MIB,
            linux_peer::CMDLINE,
            args.linux_runs
        );
        println!("{:<10} {:>14} {:>9}", "backend", "to marker s", "cpu s");
        for r in &report.linux {
            println!(
                "{:<10} {:>14.2} {:>9.2}",
                r.backend, r.to_marker_seconds, r.cpu_seconds
            );
        }
        for (name, x) in [
            ("emu", report.linux_ratio_emu_to_qemu),
            (EMU_INTERP, report.linux_ratio_emu_interp_to_qemu),
        ] {
            if let Some(x) = x {
                let how = if x <= 1.0 { "faster" } else { "slower" };
                println!(
                    "ratio {name}/qemu-tcg (time to marker): {x:.2}x ({name} is {:.2}x {how})",
                    if x <= 1.0 { 1.0 / x } else { x }
                );
            }
        }
    }
    if let Some(n) = &report.linux_note {
        eprintln!("note: {n}");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_image_branches_back_to_its_top() {
        let c = loop_image(5).unwrap();
        assert_eq!(&c[1..5], &5u32.to_le_bytes());
        // The jnz displacement lands on the ADD at the loop top.
        let jnz = c.iter().rposition(|&b| b == 0x75).unwrap();
        let target = (jnz as i64 + 2 + c[jnz + 1] as i8 as i64) as usize;
        assert_eq!(&c[target..target + 3], &[0x48, 0x01, 0xc8]);
        assert!(loop_image(1 << 40).is_err());
    }
}
