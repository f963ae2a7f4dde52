//! Helpers shared by the disk crate's integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

pub fn have_qemu_img() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok()
}

pub fn qemu_img(args: &[&str]) -> std::process::Output {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    out
}

pub fn qemu_ok(args: &[&str]) {
    let out = qemu_img(args);
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The whole guest content as qemu-img sees it.
pub fn qemu_read_all(img: &Path, fmt: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu-read.raw");
    qemu_ok(&[
        "convert",
        "-f",
        fmt,
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let d = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    d
}

/// `qemu-img check` exit status (0 clean, 2 corrupt, 3 leaks only).
pub fn qemu_check(img: &Path) -> (i32, String) {
    let out = qemu_img(&["check", img.to_str().unwrap()]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}
