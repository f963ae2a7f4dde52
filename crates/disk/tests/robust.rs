//! Random bytes against every header and table parser: mutated and truncated versions of real
//! images (made by qemu-img) must open with an error or read without panicking.

use corefour_disk::fuzzing::exercise;
use corefour_disk::Format;
use std::process::Command;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: deterministic, so a failure reproduces.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

fn qemu_img() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok()
}

fn make(dir: &std::path::Path, name: &str, fmt: &str, opts: &[&str]) -> Vec<u8> {
    let src = dir.join("src.raw");
    if !src.exists() {
        let mut data = vec![0u8; 4 << 20];
        let mut r = Rng(7);
        for chunk in data[..256 << 10].chunks_mut(8) {
            chunk.copy_from_slice(&r.next().to_le_bytes());
        }
        // Compressible text so compressed clusters/grains exist.
        for (i, b) in data[1 << 20..(1 << 20) + (300 << 10)]
            .iter_mut()
            .enumerate()
        {
            *b = b"corefour disk "[i % 14];
        }
        std::fs::write(&src, &data).unwrap();
    }
    let out = dir.join(name);
    let st = Command::new("qemu-img")
        .args(["convert", "-O", fmt])
        .args(opts)
        .arg(&src)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert to {name}");
    std::fs::read(&out).unwrap()
}

fn mutate(base: &[u8], r: &mut Rng) -> Vec<u8> {
    let mut d = base.to_vec();
    match r.below(4) {
        0 => {
            // Flip bytes in the metadata-heavy first 320 KiB.
            let window = if r.below(2) == 0 { 4096 } else { 320 << 10 };
            let span = d.len().min(window) as u64;
            for _ in 0..1 + r.below(8) {
                let i = r.below(span) as usize;
                d[i] = r.next() as u8;
            }
        }
        1 => {
            let n = r.below(d.len() as u64) as usize;
            d.truncate(n);
        }
        2 => {
            // Extreme values in an aligned header or table field.
            let window = if r.below(2) == 0 { 4096 } else { 320 << 10 };
            let span = (d.len().min(window) as u64 / 8).max(1);
            let i = r.below(span) as usize * 8;
            if i + 8 > d.len() {
                return d;
            }
            let v: u64 = match r.below(5) {
                0 => 0,
                1 => u64::MAX,
                2 => 1 << 63,
                3 => 0x7fff_ffff,
                _ => r.next(),
            };
            d[i..i + 8].copy_from_slice(&v.to_be_bytes());
        }
        _ => {
            // Also mutate the tail (VHD footers, VMDK footers).
            let len = d.len() as u64;
            for _ in 0..1 + r.below(4) {
                let i = (len - 1 - r.below(len.min(1536))) as usize;
                d[i] = r.next() as u8;
            }
        }
    }
    d
}

#[test]
fn random_bytes_never_panic_any_parser() {
    if !qemu_img() {
        eprintln!(
            "SKIP: qemu-img not installed (apt-get install qemu-utils); no base images to mutate"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bases: Vec<(Format, Vec<u8>)> = vec![
        (Format::Qcow2, make(d, "a.qcow2", "qcow2", &[])),
        (
            Format::Qcow2,
            make(
                d,
                "b.qcow2",
                "qcow2",
                &["-o", "compat=0.10,cluster_size=4096"],
            ),
        ),
        (Format::Qcow2, make(d, "c.qcow2", "qcow2", &["-c"])),
        (Format::Vmdk, make(d, "a.vmdk", "vmdk", &[])),
        (
            Format::Vmdk,
            make(d, "s.vmdk", "vmdk", &["-o", "subformat=streamOptimized"]),
        ),
        (Format::Vdi, make(d, "a.vdi", "vdi", &[])),
        (Format::Vpc, make(d, "a.vhd", "vpc", &[])),
        (
            Format::Vpc,
            make(d, "f.vhd", "vpc", &["-o", "subformat=fixed"]),
        ),
        (Format::Vhdx, make(d, "a.vhdx", "vhdx", &[])),
    ];
    let mut r = Rng(0x5eed_1234);
    for (fmt, base) in &bases {
        assert!(
            exercise(*fmt, base, false),
            "{fmt}: unmodified image must open"
        );
        let mut opened = 0;
        for _ in 0..150 {
            let m = mutate(base, &mut r);
            if exercise(*fmt, &m, true) {
                opened += 1;
            }
        }
        eprintln!("{fmt}: {opened}/150 mutants opened, none panicked");
    }
    // Pure noise, and every format on every other format's bytes.
    for _ in 0..100 {
        let n = r.below(70_000) as usize;
        let noise: Vec<u8> = (0..n).map(|_| r.next() as u8).collect();
        for fmt in [
            Format::Qcow2,
            Format::Vmdk,
            Format::Vdi,
            Format::Vpc,
            Format::Vhdx,
        ] {
            exercise(fmt, &noise, true);
        }
    }
    for (_, base) in &bases {
        for fmt in [
            Format::Qcow2,
            Format::Vmdk,
            Format::Vdi,
            Format::Vpc,
            Format::Vhdx,
        ] {
            exercise(fmt, base, false);
        }
    }
}
