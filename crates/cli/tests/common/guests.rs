//! What the VMM-level tests share: the repo root, the test guests (built on demand, serialized
//! with flock because nextest runs each test as its own process) and whether KVM can run here.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn build_and_find(makefile: Option<&str>, name: &str) -> PathBuf {
    let lock = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guests.lock");
    let mut cmd = Command::new("flock");
    cmd.arg(&lock)
        .args(["make", "-s", "-C"])
        .arg(repo().join("guests"));
    if let Some(f) = makefile {
        cmd.args(["-f", f]);
    }
    let st = cmd.status().expect("run flock make -C guests");
    assert!(st.success(), "make -C guests {makefile:?} failed");
    let p = repo().join("guests/build").join(format!("{name}.elf"));
    assert!(p.exists(), "{} was not built", p.display());
    p
}

/// A guest from guests/Makefile.
pub fn guest(name: &str) -> PathBuf {
    build_and_find(None, name)
}

/// A guest from guests/virtio.mk (the virtio drivers).
pub fn virtio_guest(name: &str) -> PathBuf {
    build_and_find(Some("virtio.mk"), name)
}

/// Why KVM tests cannot run here, if they cannot.
pub fn kvm_missing() -> Option<String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .err()
        .map(|e| format!("/dev/kvm is not usable ({e}); `corefour host check` says more"))
}

/// Returns from the test with a printed reason where KVM cannot run.
#[allow(unused_macros)]
macro_rules! need_kvm {
    () => {
        if let Some(why) = $crate::guests::kvm_missing() {
            eprintln!("SKIP: {why}");
            return;
        }
    };
}

/// The `N` of every complete `count=N` line of a counting guest's output.
pub fn counts(text: &str) -> Vec<u64> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim_end().strip_prefix("count="))
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// `text` with every "corefour vmm: ...\n" message cut out.
pub fn without_vmm_lines(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("corefour vmm:") {
        out.push_str(&rest[..i]);
        rest = rest[i..].split_once('\n').map_or("", |(_, r)| r);
    }
    out.push_str(rest);
    out
}

/// A scratch directory under the test target dir, named `{tag}-{pid}`, removed on drop.
pub struct Tmp(pub PathBuf);

impl Tmp {
    pub fn new(tag: &str) -> Self {
        let p =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
