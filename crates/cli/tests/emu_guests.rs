//! The software CPU end to end: every test guest through `corefour vmm --backend emu` must give
//! the same serial output and exit code as on KVM (the oracle). Without /dev/kvm the emu runs
//! are still checked against the guests' known output.

use std::path::Path;
use std::process::{Command, Output};

#[path = "common/guests.rs"]
#[macro_use]
mod guests;
use guests::guest;

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn run(backend: &str, kernel: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_corefour"))
        .args(["vmm", "--backend", backend, "--timeout", "60s", "--kernel"])
        .arg(kernel)
        .args(extra)
        .output()
        .expect("run corefour vmm")
}

/// Serial lines; sorted when vCPUs print concurrently (their order is a race on any backend).
fn lines(o: &Output, sort: bool) -> Vec<String> {
    let mut v: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    if sort {
        v.sort();
    }
    v
}

/// Runs `name` on emu (and KVM when usable) and checks both agree; returns the emu run.
fn same_on_both(name: &str, extra: &[&str], sort: bool) -> Output {
    let k = guest(name);
    let emu = run("emu", &k, extra);
    assert!(
        String::from_utf8_lossy(&emu.stderr).contains("backend emu"),
        "stderr should name the backend: {}",
        String::from_utf8_lossy(&emu.stderr)
    );
    if kvm_usable() {
        let kvm = run("kvm", &k, extra);
        assert_eq!(
            lines(&emu, sort),
            lines(&kvm, sort),
            "{name} {extra:?}: serial output differs from KVM"
        );
        assert_eq!(
            emu.status.code(),
            kvm.status.code(),
            "{name} {extra:?}: exit code differs from KVM"
        );
    } else {
        eprintln!(
            "NOTE: /dev/kvm is not usable; {name} checked on emu only, against its known output"
        );
    }
    emu
}

#[test]
fn hello_matches_kvm() {
    let o = same_on_both("hello", &["--cmdline", "a=1"], false);
    assert_eq!(o.status.code(), Some(0));
    assert!(lines(&o, false)
        .iter()
        .any(|l| l == "Hello from corefour guest"));
}

#[test]
fn exitcode_matches_kvm() {
    for code in ["0", "7", "200"] {
        let arg = format!("code={code}");
        let o = same_on_both("exitcode", &["--cmdline", &arg], false);
        assert_eq!(o.status.code(), Some(code.parse().unwrap()));
    }
}

#[test]
fn smp_matches_kvm() {
    for n in ["2", "4"] {
        let o = same_on_both("smp", &["--vcpus", n], true);
        assert_eq!(o.status.code(), Some(0));
        let want = format!("smp: all {n} cpus checked in");
        assert!(lines(&o, false).contains(&want), "{:?}", lines(&o, false));
    }
}

#[test]
fn memtest_matches_kvm() {
    let o = same_on_both("memtest", &["--memory", "32M"], false);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        lines(&o, false)
            .iter()
            .any(|l| l.starts_with("memtest: ok ")),
        "{:?}",
        lines(&o, false)
    );
}

#[test]
fn faults_match_kvm() {
    let o = same_on_both("fault", &[], false);
    assert_eq!(o.status.code(), Some(2), "triple fault ends the VM with 2");
    let o = same_on_both("fault", &["--cmdline", "how=1"], false);
    assert_eq!(o.status.code(), Some(2), "i8042 reset ends the VM with 2");
}

#[test]
fn hang_times_out_on_emu() {
    let k = guest("hang");
    let o = Command::new(env!("CARGO_BIN_EXE_corefour"))
        .args(["vmm", "--backend", "emu", "--timeout", "1s", "--kernel"])
        .arg(&k)
        .args(["--cmdline", "mode=1"])
        .output()
        .expect("run corefour vmm");
    assert_eq!(
        o.status.code(),
        Some(3),
        "a ring-3 spin is stopped by --timeout"
    );
}

#[test]
fn unimplemented_instruction_is_ud_and_named() {
    // A flat image whose first instruction is AVX (not advertised): #UD with no IDT
    // triple-faults, and the trace names the instruction.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("emu-unimpl");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("avx.bin");
    std::fs::write(&img, [0xc5, 0xf8, 0x77, 0xf4]).unwrap(); // vzeroupper; hlt
    let o = Command::new(env!("CARGO_BIN_EXE_corefour"))
        .env("COREFOUR_EMU_TRACE_UNIMPL", "1")
        .args(["vmm", "--backend", "emu", "--timeout", "10s", "--kernel"])
        .arg(&img)
        .output()
        .expect("run corefour vmm");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(
        err.contains("unimplemented instruction Vzeroupper"),
        "stderr: {err}"
    );
}
