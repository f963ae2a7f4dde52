//! kill -9 in the middle of writes: the image must pass our check and `qemu-img check` (leaked
//! clusters allowed, nothing else), and every write acknowledged after a flush must be there.

mod common;
use common::*;
use corefour_disk::qcow2::Repair;
use corefour_disk::{open, BlockRead, Format, Image, Open};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

const SIZE: u64 = 32 << 20;

/// Write number `n`: (offset, data). Deterministic so the parent can replay it.
fn nth_write(n: u64) -> (u64, Vec<u8>) {
    let mut r = Rng(n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let len = 512 + r.below(200_000);
    let off = r.below(SIZE - len);
    let mut data = vec![0u8; len as usize];
    r.fill(&mut data);
    (off, data)
}

#[test]
#[ignore = "child half of kill9_mid_write_leaves_consistent_image; run by it"]
fn crash_writer_child() {
    let Ok(path) = std::env::var("COREFOUR_CRASH_IMAGE") else {
        return;
    };
    let mut img = open(
        std::path::Path::new(&path),
        Open {
            format: Some(Format::Qcow2),
            write: true,
        },
    )
    .unwrap();
    let stdout = std::io::stdout();
    for n in 0.. {
        let (off, data) = nth_write(n);
        let w = img.writer().unwrap();
        w.write_at(&data, off).unwrap();
        w.flush().unwrap();
        let mut o = stdout.lock();
        writeln!(o, "ACK {n}").unwrap();
        o.flush().unwrap();
    }
}

#[test]
fn kill9_mid_write_leaves_consistent_image() {
    if !have_qemu_img() {
        eprintln!("SKIP: qemu-img not installed (apt-get install qemu-utils)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mut model = vec![0u8; SIZE as usize];
    Rng(99).fill(&mut model[..(8 << 20)]);
    std::fs::write(&base, &model).unwrap();
    let img = dir.path().join("crash.qcow2");
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        base.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);

    for round in 0..3u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_writer_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("COREFOUR_CRASH_IMAGE", &img)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acked: Option<u64> = None;
        let target = 20 + round * 7;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("ACK ") {
                acked = Some(n.trim().parse().unwrap());
                if acked >= Some(target) {
                    break;
                }
            }
        }
        // Land the kill at a random point inside a later write, not right after an ack.
        std::thread::sleep(std::time::Duration::from_micros(
            Rng(round + 11).below(3000),
        ));
        child.kill().unwrap(); // SIGKILL
        for line in lines.map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("ACK ") {
                acked = Some(n.trim().parse().unwrap());
            }
        }
        child.wait().unwrap();
        let acked = acked.expect("child acknowledged no write");
        // Every round restarts the sequence from write 0, on top of what the last round left.
        for n in 0..=acked {
            let (off, data) = nth_write(n);
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        let (inflight_off, inflight) = nth_write(acked + 1);
        let mut back = vec![0u8; SIZE as usize];
        let mut im = open(&img, Open::default()).unwrap();
        im.read_at(&mut back, 0).unwrap();
        let lo = inflight_off as usize;
        let hi = lo + inflight.len();
        // The write in flight may be anywhere between absent and complete.
        for (i, (a, b)) in back.iter().zip(model.iter()).enumerate() {
            if (i < lo || i >= hi) && a != b {
                panic!("round {round}: acknowledged data lost at byte {i:#x} (acked up to write {acked})");
            }
        }
        model[lo..hi].copy_from_slice(&back[lo..hi]);
        let Image::Qcow2(mut q) = im else { panic!() };
        let r = q.check(Repair::None).unwrap();
        assert_eq!(
            r.corruptions, 0,
            "round {round}: our check: {:?}",
            r.messages
        );
        let (code, out) = qemu_check(&img);
        assert!(
            code == 0 || code == 3,
            "round {round}: qemu-img check exit {code}: {out}"
        );
        eprintln!(
            "round {round}: killed after write {acked}; leaks={} (qemu-img check exit {code})",
            r.leaks
        );
    }
    // Leaks are repairable, after which both checkers call the image clean.
    let mut q = corefour_disk::qcow2::Qcow2::open_for_repair(&img).unwrap();
    q.check(Repair::Leaks).unwrap();
    drop(q);
    let (code, out) = qemu_check(&img);
    assert_eq!(code, 0, "after repair: {out}");
}
