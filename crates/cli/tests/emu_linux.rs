//! Stage 2 of the software CPU: Debian's cloud kernel on `corefour vmm --backend emu`.
//! The fixture is the one tests/fixtures/linux/setup.sh builds (and `bench emu` and
//! linux_boot.rs use): Debian's linux-image-*-cloud-amd64 from the Debian archive through apt,
//! and a busybox-static initramfs whose /init loads the virtio modules, prints
//! COREFOUR-LINUX-OK and powers off. The kernel boots to userspace, busybox prints the marker on
//! the serial console and `poweroff -f` goes out through the ACPI PM1a control (exit 0).
//! The stock command line: the emu's 8254 PIT calibrates the TSC (port 0x61, channel 2) and
//! drives IRQ0 through I/O APIC pin 2, so the kernel's IO-APIC timer check passes.

use std::path::{Path, PathBuf};
use std::process::Command;

const MARKER: &str = "COREFOUR-LINUX-OK";

/// The fixture's kernel and initramfs: setup.sh reuses its cache and only downloads or
/// builds what is missing; it prints "kernel PATH" and "initrd PATH".
fn fixture() -> Result<(PathBuf, PathBuf), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/linux/setup.sh");
    let o = Command::new(&script)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !o.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            script.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let out = String::from_utf8_lossy(&o.stdout);
    let path = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key).map(|p| PathBuf::from(p.trim())))
            .filter(|p| p.is_file())
            .ok_or_else(|| format!("setup.sh printed no {key}line with an existing file:\n{out}"))
    };
    Ok((path("kernel ")?, path("initrd ")?))
}

/// Boots the Debian fixture on `--backend emu` with `vcpus` vCPUs; None (with the reason
/// printed) where the fixture cannot be prepared.
fn boot_on_emu(vcpus: u32, timeout: &str) -> Option<std::process::Output> {
    let (k, initrd) = match fixture() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("SKIP: cannot prepare the Debian kernel and initramfs: {e}");
            return None;
        }
    };
    let o = Command::new(env!("CARGO_BIN_EXE_corefour"))
        .args([
            "vmm",
            "--backend",
            "emu",
            "--memory",
            "256M",
            "--timeout",
            timeout,
        ])
        .args(["--vcpus", &vcpus.to_string()])
        .arg("--kernel")
        .arg(&k)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", "console=ttyS0 panic=-1"])
        .output()
        .expect("run corefour vmm");
    Some(o)
}

#[test]
fn debian_kernel_boots_to_the_marker_and_powers_off_on_emu() {
    let Some(o) = boot_on_emu(1, "150s") else {
        return;
    };
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Linux version 6."), "no kernel banner:\n{out}");
    assert!(
        out.contains("Run /init as init process"),
        "the kernel did not reach /init:\n{}",
        &out[out.len().saturating_sub(4000)..]
    );
    assert!(!out.contains("Kernel panic"), "kernel panic:\n{out}");
    assert!(out.contains(MARKER), "no marker from /init:\n{out}");
    assert_eq!(
        o.status.code(),
        Some(0),
        "no clean power-off: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Two vCPUs: the AP starts through INIT/SIPI and both run the kernel's cross-CPU handshakes
/// (queued spinlocks, IPIs, TSC sync). A locked update that was not atomic against the other
/// vCPU's plain stores used to livelock about every second boot in the spinlock slow path.
#[test]
fn debian_kernel_boots_with_two_vcpus_on_emu() {
    let Some(o) = boot_on_emu(2, "90s") else {
        return;
    };
    let out = String::from_utf8_lossy(&o.stdout);
    let tail = &out[out.len().saturating_sub(4000)..];
    assert!(
        out.contains("smp: Brought up 1 node, 2 CPUs"),
        "the second vCPU did not come up:\n{tail}"
    );
    assert!(!out.contains("Kernel panic"), "kernel panic:\n{out}");
    assert!(out.contains(MARKER), "no marker from /init:\n{tail}");
    assert_eq!(
        o.status.code(),
        Some(0),
        "no clean power-off: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
