//! Our qcow2 write path against qemu-img as the reference: random writes and discards on images
//! qemu-img made (v2 and v3, cluster sizes from 512 B to 2 MiB, refcount widths, compressed
//! clusters, backing files), then `qemu-img check` must be clean and qemu-img must read exactly
//! what a byte model says.

mod common;
use common::*;
use corefour_disk::qcow2::Repair;
use corefour_disk::{open, BlockRead, Format, Image, Open};

const SIZE: u64 = 8 << 20;

fn run_case(
    dir: &std::path::Path,
    name: &str,
    create: &[&str],
    backing: bool,
    compressed: bool,
    seed: u64,
) {
    let img = dir.join(format!("{name}.qcow2"));
    let imgs = img.to_str().unwrap();
    let mut rng = Rng(seed);
    let mut model = vec![0u8; SIZE as usize];
    if backing {
        let base = dir.join(format!("{name}-base.raw"));
        rng.fill(&mut model[..(3 << 20)]);
        std::fs::write(&base, &model).unwrap();
        let mut args = vec!["create", "-q", "-f", "qcow2", "-F", "raw", "-b"];
        let b = base.to_str().unwrap().to_string();
        args.push(&b);
        args.extend_from_slice(create);
        args.push(imgs);
        qemu_ok(&args);
    } else if compressed {
        let src = dir.join(format!("{name}-src.raw"));
        for (i, b) in model[..(2 << 20)].iter_mut().enumerate() {
            *b = b"compressible qcow2 "[i % 19];
        }
        std::fs::write(&src, &model).unwrap();
        let mut args = vec!["convert", "-c", "-O", "qcow2"];
        args.extend_from_slice(create);
        let s = src.to_str().unwrap().to_string();
        args.push(&s);
        args.push(imgs);
        qemu_ok(&args);
    } else {
        let s = SIZE.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(create);
        args.push(imgs);
        args.push(&s);
        qemu_ok(&args);
    }
    {
        let mut im = open(
            &img,
            Open {
                format: Some(Format::Qcow2),
                write: true,
            },
        )
        .unwrap();
        for i in 0..60 {
            let len = 1 + rng.below(300_000);
            let off = rng.below(SIZE - len);
            if i % 7 == 6 {
                im.discarder().unwrap().discard(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            } else {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                im.writer().unwrap().write_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
        // Our own reads agree with the model.
        let mut back = vec![0u8; SIZE as usize];
        im.read_at(&mut back, 0).unwrap();
        assert!(
            back == model,
            "{name}: our read-back differs from the model"
        );
        im.writer().unwrap().flush().unwrap();
    }
    let (code, out) = qemu_check(&img);
    assert_eq!(code, 0, "{name}: qemu-img check: {out}");
    let theirs = qemu_read_all(&img, "qcow2", dir);
    assert!(
        theirs == model,
        "{name}: qemu-img reads something else than we wrote"
    );
    // Our check agrees.
    let Image::Qcow2(mut q) = open(&img, Open::default()).unwrap() else {
        panic!()
    };
    let r = q.check(Repair::None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{name}: {:?}", r.messages);
}

#[test]
fn our_writes_pass_qemu_check_and_read_back_in_qemu() {
    if !have_qemu_img() {
        eprintln!("SKIP: qemu-img not installed (apt-get install qemu-utils)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run_case(d, "v3", &[], false, false, 1);
    run_case(d, "v2", &["-o", "compat=0.10"], false, false, 2);
    run_case(d, "c512", &["-o", "cluster_size=512"], false, false, 3);
    run_case(d, "c2m", &["-o", "cluster_size=2M"], false, false, 4);
    run_case(
        d,
        "rc1",
        &["-o", "refcount_bits=1,cluster_size=4096"],
        false,
        false,
        5,
    );
    run_case(d, "rc64", &["-o", "refcount_bits=64"], false, false, 6);
    run_case(d, "backed3", &[], true, false, 7);
    run_case(d, "backed2", &["-o", "compat=0.10"], true, false, 8);
    run_case(d, "compressed", &[], false, true, 9);
}
