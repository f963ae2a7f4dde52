//! Stage 2 of the software CPU: Debian's cloud kernel on `corefour vmm --backend emu`.
//! The setup downloads linux-image-*-cloud-amd64 with `apt-get download` (never a kernel from
//! elsewhere), unpacks it with `dpkg-deb -x`, and builds a busybox-static initramfs whose /init
//! prints a marker and powers off. The kernel boots to userspace, busybox prints the marker on
//! the serial console and `poweroff -f` goes out through the ACPI PM1a control (exit 0).
//! The stock command line: the emu's 8254 PIT calibrates the TSC (port 0x61, channel 2) and
//! drives IRQ0 through I/O APIC pin 2, so the kernel's IO-APIC timer check passes.

use std::path::{Path, PathBuf};
use std::process::Command;

fn work() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("emu-linux")
}

/// Downloads and unpacks the newest cloud kernel; returns its vmlinuz, or why not.
fn kernel() -> Result<PathBuf, String> {
    let dir = work();
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let search = Command::new("apt-cache")
        .args([
            "search",
            "--names-only",
            "^linux-image-[0-9.-]*-cloud-amd64-unsigned$",
        ])
        .output()
        .map_err(|e| format!("apt-cache: {e}"))?;
    let mut names: Vec<String> = String::from_utf8_lossy(&search.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    names.sort();
    let pkg = names
        .pop()
        .ok_or("no linux-image-*-cloud-amd64 package in apt's lists")?;
    let unpacked = dir.join(&pkg);
    if !unpacked.join("boot").exists() {
        let st = Command::new("apt-get")
            .args(["download", &pkg])
            .current_dir(&dir)
            .status()
            .map_err(|e| format!("apt-get: {e}"))?;
        if !st.success() {
            return Err(format!("apt-get download {pkg} failed"));
        }
        let deb = std::fs::read_dir(&dir)
            .map_err(|e| e.to_string())?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.extension().is_some_and(|x| x == "deb")
                    && p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&pkg))
            })
            .ok_or("the downloaded .deb is missing")?;
        let st = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&unpacked)
            .status()
            .map_err(|e| format!("dpkg-deb: {e}"))?;
        if !st.success() {
            return Err("dpkg-deb -x failed".into());
        }
    }
    std::fs::read_dir(unpacked.join("boot"))
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| "no vmlinuz in the package".into())
}

/// A gzip'd newc cpio with busybox and an /init that prints the marker and powers off.
fn initramfs() -> Result<PathBuf, String> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        return Err("busybox-static is not installed (/bin/busybox)".into());
    }
    let root = work().join("initramfs");
    for d in ["bin", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
    }
    std::fs::copy(busybox, root.join("bin/busybox")).map_err(|e| e.to_string())?;
    std::fs::write(
        root.join("init"),
        "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n\
         echo COREFOUR-LINUX-UP\n/bin/busybox poweroff -f\n",
    )
    .map_err(|e| e.to_string())?;
    Command::new("chmod")
        .args(["+x"])
        .arg(root.join("init"))
        .status()
        .map_err(|e| e.to_string())?;
    let out = work().join("initrd.cpio.gz");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc 2>/dev/null | gzip > '{}'",
            root.display(),
            out.display()
        ))
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err("cpio/gzip failed (install cpio)".into());
    }
    Ok(out)
}

#[test]
fn debian_kernel_boots_to_the_marker_and_powers_off_on_emu() {
    let (k, initrd) = match (kernel(), initramfs()) {
        (Ok(k), Ok(i)) => (k, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("SKIP: cannot prepare the Debian kernel and initramfs: {e}");
            return;
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
            "150s",
        ])
        .arg("--kernel")
        .arg(&k)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", "console=ttyS0 panic=-1"])
        .output()
        .expect("run corefour vmm");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Linux version 6."), "no kernel banner:\n{out}");
    assert!(
        out.contains("Run /init as init process"),
        "the kernel did not reach /init:\n{}",
        &out[out.len().saturating_sub(4000)..]
    );
    assert!(!out.contains("Kernel panic"), "kernel panic:\n{out}");
    assert!(
        out.contains("COREFOUR-LINUX-UP"),
        "no marker from /init:\n{out}"
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "no clean power-off: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
