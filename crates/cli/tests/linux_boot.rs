//! A stock Linux (Debian's cloud kernel) with the busybox initramfs from
//! tests/fixtures/linux/setup.sh: QEMU TCG proves the fixture; `corefour vmm --backend emu` must
//! print the init's marker line and power off cleanly (exit 0).
//!
//! The fixture is not downloaded here (tests stay off the network): run
//! `tests/fixtures/linux/setup.sh` first; without it the tests skip and say so.

use std::process::Command;
use std::time::Duration;

#[path = "common/linux.rs"]
mod linux;
use linux::{fixture, run};

const MARKER: &str = "COREFOUR-LINUX-OK";
const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// Flip to true when the software CPU boots the fixture (crates/emu): the emu test then asserts
/// the marker and the clean power-off instead of probing how far the boot gets.
const EMU_BOOTS_LINUX: bool = true;

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn qemu_tcg_boots_the_fixture_to_the_marker() {
    let Some((kernel, initrd)) = fixture() else {
        eprintln!("SKIP: no fixture in .cache/linux; run tests/fixtures/linux/setup.sh");
        return;
    };
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: qemu-system-x86_64 is not installed (Debian package qemu-system-x86)");
        return;
    }
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-accel",
        "tcg",
        "-m",
        "256",
        "-nographic",
        "-no-reboot",
        "-nodefaults",
    ])
    .args(["-serial", "stdio", "-kernel"])
    .arg(&kernel)
    .arg("-initrd")
    .arg(&initrd)
    .args(["-append", CMDLINE]);
    let r = run(c, Duration::from_secs(90));
    assert!(
        r.stdout.contains(MARKER),
        "no marker after {:?}: {}\n{}",
        r.took,
        tail(&r.stdout, 20),
        r.stderr
    );
    assert!(r.stdout.contains("modules loaded: "), "{}", r.stdout);
    assert_eq!(
        r.code,
        Some(0),
        "qemu did not power off: {}",
        tail(&r.stdout, 5)
    );
}

#[test]
fn emu_boots_the_fixture_and_powers_off() {
    let Some((kernel, initrd)) = fixture() else {
        eprintln!("SKIP: no fixture in .cache/linux; run tests/fixtures/linux/setup.sh");
        return;
    };
    let limit = if EMU_BOOTS_LINUX { 150 } else { 20 };
    let mut c = Command::new(env!("CARGO_BIN_EXE_corefour"));
    c.args(["vmm", "--backend", "emu", "--memory", "256M"])
        .arg("--timeout")
        .arg(format!("{limit}s"))
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", CMDLINE]);
    let r = run(c, Duration::from_secs(limit + 15));
    let booted = r.stdout.contains(MARKER) && r.code == Some(0);
    if !EMU_BOOTS_LINUX && !booted {
        let last = tail(&r.stdout, 3);
        eprintln!(
            "SKIP: the software CPU does not boot Linux yet (EMU_BOOTS_LINUX = false). A {limit}s \
             probe ended with exit {:?} after {:?}; serial output ends: {:?}; stderr: {}",
            r.code,
            r.took,
            if last.is_empty() {
                "(nothing)"
            } else {
                last.as_str()
            },
            tail(&r.stderr, 3)
        );
        return;
    }
    assert!(
        r.stdout.contains(MARKER),
        "no {MARKER} in {:?}: {}\nstderr: {}",
        r.took,
        tail(&r.stdout, 30),
        tail(&r.stderr, 10)
    );
    assert_eq!(
        r.code,
        Some(0),
        "no clean power-off (PM1a_CNT S5 -> exit 0): {}",
        tail(&r.stderr, 10)
    );
}
