//! `corefour disk` end to end, with qemu-img as the reference both ways: images qemu-img made
//! are converted by us, our outputs are read and checked by qemu-img, and `qemu-img compare`
//! judges the bytes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_corefour"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "corefour {args:?} failed ({:?}): {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn qemu(args: &[&str]) -> Output {
    Command::new("qemu-img").args(args).output().unwrap()
}

fn qemu_ok(args: &[&str]) -> String {
    let o = qemu(args);
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn have_qemu() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok()
}

/// A scratch directory for a test that needs qemu-img, or None (with the reason printed).
fn qemu_tempdir() -> Option<tempfile::TempDir> {
    if !have_qemu() {
        eprintln!("SKIP: qemu-img not installed (apt-get install qemu-utils)");
        return None;
    }
    Some(tempfile::tempdir().unwrap())
}

/// `qemu-img convert <lead> <opts> src dst`.
fn qemu_convert(lead: &[&str], opts: &[&str], src: &Path, dst: &Path) {
    let mut a = vec!["convert"];
    a.extend_from_slice(lead);
    a.extend_from_slice(opts);
    a.push(s(src));
    a.push(s(dst));
    qemu_ok(&a);
}

/// Runs qemu-io on an image (e.g. `-c "write -P 0x61 0 1M"`).
fn qemu_io(args: &[&str]) {
    Command::new("qemu-io").args(args).output().unwrap();
}

/// `corefour` with JSON output, parsed.
fn ok_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).unwrap()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Random data, a hole, compressible text, another hole, random data at the very end.
fn make_source(dir: &Path) -> PathBuf {
    let p = dir.join("src.raw");
    let size = 12 << 20;
    let mut d = vec![0u8; size];
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut fill = |b: &mut [u8]| {
        for c in b.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
    };
    fill(&mut d[..(1 << 20) + 4321]);
    for (i, b) in d[(4 << 20)..(5 << 20)].iter_mut().enumerate() {
        *b = b"corefour "[i % 9];
    }
    fill(&mut d[(7 << 20) + 512..(7 << 20) + 70000]);
    fill(&mut d[size - 3000..]);
    std::fs::write(&p, &d).unwrap();
    // Make the zero ranges real holes.
    Command::new("fallocate").args(["-d", s(&p)]).status().ok();
    p
}

const SOURCES: &[(&str, &str, &[&str])] = &[
    ("raw", "raw", &[]),
    ("qcow2", "qcow2", &[]),
    (
        "qcow2-v2",
        "qcow2",
        &["-o", "compat=0.10,cluster_size=4096"],
    ),
    ("qcow2-compressed", "qcow2", &["-c"]),
    ("vmdk", "vmdk", &[]),
    ("vmdk-flat", "vmdk", &["-o", "subformat=monolithicFlat"]),
    ("vmdk-stream", "vmdk", &["-o", "subformat=streamOptimized"]),
    (
        "vmdk-split",
        "vmdk",
        &["-o", "subformat=twoGbMaxExtentSparse"],
    ),
    ("vdi", "vdi", &[]),
    ("vdi-fixed", "vdi", &["-o", "static=on"]),
    ("vhd", "vpc", &["-o", "force_size=on"]),
    ("vhd-fixed", "vpc", &["-o", "subformat=fixed,force_size=on"]),
    ("vhdx", "vhdx", &[]),
    ("vhdx-fixed", "vhdx", &["-o", "subformat=fixed"]),
];

#[test]
fn convert_every_format_pair_against_qemu_img() {
    let Some(dir) = qemu_tempdir() else { return };
    let d = dir.path();
    let src = make_source(d);
    for (name, fmt, opts) in SOURCES {
        let img = d.join(format!("in-{name}.{fmt}"));
        qemu_convert(&["-O", fmt], opts, &src, &img);
        for out_fmt in ["raw", "qcow2"] {
            let out = d.join(format!("out-{name}.{out_fmt}"));
            // qemu-img's output read by us...
            ok(&[
                "disk",
                "convert",
                "-f",
                fmt,
                "-O",
                out_fmt,
                s(&img),
                s(&out),
            ]);
            // ...and our output read by qemu-img.
            let cmp = qemu(&["compare", "-f", "raw", "-F", out_fmt, s(&src), s(&out)]);
            assert!(
                cmp.status.success(),
                "{name} -> {out_fmt}: {}",
                String::from_utf8_lossy(&cmp.stdout)
            );
            if out_fmt == "qcow2" {
                let c = qemu(&["check", s(&out)]);
                assert!(
                    c.status.success(),
                    "{name}: qemu-img check: {}",
                    String::from_utf8_lossy(&c.stdout)
                );
                // qemu-img turns our qcow2 into every format, and that still compares equal.
                let again = d.join(format!("again-{name}.{fmt}"));
                qemu_convert(&["-f", "qcow2", "-O", fmt], opts, &out, &again);
                qemu_ok(&["compare", "-f", "raw", "-F", fmt, s(&src), s(&again)]);
            }
            std::fs::remove_file(&out).unwrap();
        }
    }
}

#[test]
fn convert_keeps_sparse_sources_sparse() {
    use std::os::unix::fs::MetadataExt;
    let Some(dir) = qemu_tempdir() else { return };
    let d = dir.path();
    let q = d.join("sparse.qcow2");
    qemu_ok(&["create", "-q", "-f", "qcow2", s(&q), "1G"]);
    qemu_io(&[
        "-c",
        "write -P 0x61 100M 1M",
        "-c",
        "write -z 200M 64M",
        s(&q),
    ]);
    let raw = d.join("out.raw");
    ok(&["disk", "convert", "-O", "raw", s(&q), s(&raw)]);
    let m = std::fs::metadata(&raw).unwrap();
    assert_eq!(m.len(), 1 << 30);
    assert!(
        m.blocks() * 512 < 4 << 20,
        "raw output uses {} bytes",
        m.blocks() * 512
    );
    qemu_ok(&["compare", s(&q), s(&raw)]);
    let q2 = d.join("back.qcow2");
    ok(&["disk", "convert", "-O", "qcow2", s(&raw), s(&q2)]);
    assert!(std::fs::metadata(&q2).unwrap().len() < 4 << 20);
    qemu_ok(&["compare", s(&q), s(&q2)]);
    // Map agrees with qemu-img about where data is.
    let ours = ok_json(&["disk", "map", "--json", s(&q2)]);
    let data: u64 = ours
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(data, 1 << 20);
}

#[test]
fn backing_chain_info_map_convert() {
    let Some(dir) = qemu_tempdir() else { return };
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_ok(&["create", "-q", "-f", "qcow2", s(&base), "16M"]);
    qemu_io(&["-c", "write -P 0x11 0 4M", s(&base)]);
    // The middle layer is ours, created qemu-img style with -b/-F and a relative name.
    ok(&[
        "disk",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&d.join("mid.qcow2")),
    ]);
    qemu_io(&["-c", "write -P 0x22 1M 1M", s(&d.join("mid.qcow2"))]);
    let top = d.join("top.qcow2");
    ok(&[
        "disk",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "backing_file=mid.qcow2,backing_fmt=qcow2",
        s(&top),
        "24M",
    ]);
    qemu_io(&[
        "-c",
        "write -P 0x33 1536K 64K",
        "-c",
        "write -P 0x44 20M 64K",
        s(&top),
    ]);
    assert_eq!(qemu(&["check", s(&top)]).status.code(), Some(0));
    let info = ok_json(&["disk", "info", "--backing-chain", "--json", s(&top)]);
    let chain = info.as_array().unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[0]["virtual-size"], 24 << 20);
    assert_eq!(chain[1]["backing-filename"], "base.qcow2");
    let map = ok_json(&["disk", "map", "--output", "json", s(&top)]);
    let depths: Vec<u64> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["depth"].as_u64().unwrap())
        .collect();
    assert!(
        depths.contains(&0) && depths.contains(&1) && depths.contains(&2),
        "{map}"
    );
    for fmt in ["raw", "qcow2"] {
        let out = d.join(format!("flat.{fmt}"));
        ok(&["disk", "convert", "-O", fmt, s(&top), s(&out)]);
        qemu_ok(&["compare", s(&top), s(&out)]);
    }
}

#[test]
fn backing_file_loop_is_an_error() {
    let Some(dir) = qemu_tempdir() else { return };
    let d = dir.path();
    let a = d.join("a.qcow2");
    let b = d.join("b.qcow2");
    qemu_ok(&["create", "-q", "-f", "qcow2", s(&a), "1M"]);
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "qcow2",
        "-b",
        "a.qcow2",
        s(&b),
        "1M",
    ]);
    qemu_ok(&["rebase", "-u", "-F", "qcow2", "-b", "b.qcow2", s(&a)]);
    let before = std::fs::read(&a).unwrap();
    for args in [
        vec!["disk", "info", s(&a)],
        vec!["disk", "convert", "-O", "raw", s(&a), s(&d.join("x.raw"))],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("backing file loop"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert_eq!(std::fs::read(&a).unwrap(), before);
}

/// Writes `bytes` at `off` in a copy of `src`.
fn patched(src: &Path, dst: &Path, off: u64, bytes: &[u8]) {
    let mut d = std::fs::read(src).unwrap();
    d[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
    std::fs::write(dst, d).unwrap();
}

#[test]
fn corrupt_images_fail_cleanly_and_are_never_written() {
    let Some(dir) = qemu_tempdir() else { return };
    let d = dir.path();
    let src = make_source(d);
    let good = d.join("good.qcow2");
    qemu_ok(&["convert", "-O", "qcow2", s(&src), s(&good)]);
    let len = std::fs::metadata(&good).unwrap().len();
    // Default qemu layout: L1 at 0x30000, first L2 table at 0x40000.
    let cases: Vec<(&str, u64, Vec<u8>, &str)> = vec![
        (
            "l2-past-eof",
            0x40000,
            (0x8000_0000_0000_0000u64 | (1 << 40))
                .to_be_bytes()
                .to_vec(),
            "offset 0x40000",
        ),
        (
            "l1-past-eof",
            0x30000,
            (0x8000_0000_0000_0000u64 | (1 << 40))
                .to_be_bytes()
                .to_vec(),
            "offset 0x30000",
        ),
        (
            "l1-unaligned",
            0x30000,
            0x8000_0000_0004_0200u64.to_be_bytes().to_vec(),
            "unaligned",
        ),
        (
            "cluster-bits",
            20,
            40u32.to_be_bytes().to_vec(),
            "cluster_bits",
        ),
        ("l1-size", 36, 0u32.to_be_bytes().to_vec(), "L1 table"),
        (
            "refcount-table-misaligned",
            48,
            0x1234u64.to_be_bytes().to_vec(),
            "not cluster-aligned",
        ),
    ];
    for (name, off, bytes, want) in cases {
        let bad = d.join(format!("{name}.qcow2"));
        patched(&good, &bad, off, &bytes);
        let before = std::fs::read(&bad).unwrap();
        let out = d.join(format!("{name}.raw"));
        let o = run(&["disk", "convert", "-O", "raw", s(&bad), s(&out)]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(s(&bad)) && err.contains(want), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert!(!out.exists(), "{name}: partial output left behind");
        assert_eq!(
            std::fs::read(&bad).unwrap(),
            before,
            "{name}: source modified"
        );
    }
    // Truncated images of every format.
    for (name, fmt, opts) in SOURCES
        .iter()
        .filter(|s| s.0 != "raw" && !s.0.contains("flat") && !s.0.contains("split"))
    {
        let img = d.join(format!("t-{name}.{fmt}"));
        qemu_convert(&["-O", fmt], opts, &src, &img);
        for cut in [100u64, 700, 70_000] {
            let data = std::fs::read(&img).unwrap();
            if (cut as usize) >= data.len() {
                continue;
            }
            let t = d.join(format!("cut-{name}.{fmt}"));
            std::fs::write(&t, &data[..cut as usize]).unwrap();
            let o = run(&[
                "disk",
                "convert",
                "-f",
                fmt,
                "-O",
                "raw",
                s(&t),
                s(&d.join("cut.raw")),
            ]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!err.contains("panicked"), "{name} cut at {cut}: {err}");
            if !o.status.success() {
                assert!(err.contains(s(&t)), "{name} cut at {cut}: {err}");
            }
            let _ = std::fs::remove_file(d.join("cut.raw"));
        }
    }
    let _ = len;
}

#[test]
fn create_check_resize_with_qemu_habits() {
    let Some(dir) = qemu_tempdir() else { return };
    let d = dir.path();
    let q = d.join("n.qcow2");
    ok(&[
        "disk",
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096,compat=0.10",
        s(&q),
        "1.5G",
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&qemu_ok(&["info", "--output=json", s(&q)])).unwrap();
    assert_eq!(info["virtual-size"], 1536u64 << 20);
    assert_eq!(info["cluster-size"], 4096);
    assert_eq!(info["format-specific"]["data"]["compat"], "0.10");
    qemu_io(&["-c", "write -P 0x77 1G 1M", s(&q)]);
    ok(&["disk", "resize", s(&q), "+2G"]);
    assert_eq!(qemu(&["check", s(&q)]).status.code(), Some(0));
    let info = ok_json(&["disk", "info", "--json", s(&q)]);
    assert_eq!(info["virtual-size"], (1536u64 << 20) + (2 << 30));
    let o = run(&["disk", "resize", s(&q), "1G"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--shrink"));
    ok(&["disk", "resize", "--shrink", s(&q), "1G"]);
    assert_eq!(qemu(&["check", s(&q)]).status.code(), Some(0));
    let c = ok_json(&["disk", "check", "--json", s(&q)]);
    assert_eq!(c["corruptions"], 0);
    assert_eq!(c["leaks"], 0);
    // A raw image grows and shrinks too.
    let r = d.join("r.raw");
    ok(&["disk", "create", "-f", "raw", s(&r), "10M"]);
    ok(&["disk", "resize", s(&r), "+10M"]);
    assert_eq!(std::fs::metadata(&r).unwrap().len(), 20 << 20);
    // Bad input is one clear line.
    for args in [
        vec!["disk", "create", "-f", "qcow2", s(&q), "12Q"],
        vec!["disk", "create", "-f", "vmdk", s(&d.join("v.vmdk")), "1M"],
        vec![
            "disk",
            "create",
            "-f",
            "qcow2",
            "-o",
            "bogus=1",
            s(&d.join("z.qcow2")),
            "1M",
        ],
        vec!["disk", "info", s(&d.join("missing.qcow2"))],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn check_finds_and_repairs_leaks_like_qemu() {
    let Some(dir) = qemu_tempdir() else { return };
    let q = dir.path().join("leak.qcow2");
    qemu_ok(&["create", "-q", "-f", "qcow2", s(&q), "8M"]);
    qemu_io(&["-c", "write 0 1M", s(&q)]);
    // Leak one cluster: bump the refcount of a cluster past the end of the used space.
    let mut d = std::fs::read(&q).unwrap();
    let clusters = d.len() as u64 / 65536;
    let e = 0x20000 + (clusters as usize) * 2;
    d[e..e + 2].copy_from_slice(&1u16.to_be_bytes());
    d.resize(d.len() + 65536, 0);
    std::fs::write(&q, &d).unwrap();
    assert_eq!(qemu(&["check", s(&q)]).status.code(), Some(3));
    let o = run(&["disk", "check", s(&q)]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    ok(&["disk", "check", "-r", "leaks", s(&q)]);
    assert_eq!(qemu(&["check", s(&q)]).status.code(), Some(0));
    assert_eq!(run(&["disk", "check", s(&q)]).status.code(), Some(0));
    // Checking needs only the image itself, not its backing file.
    let top = dir.path().join("orphan.qcow2");
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        s(&q),
        s(&top),
    ]);
    std::fs::remove_file(&q).unwrap();
    assert_eq!(run(&["disk", "check", s(&top)]).status.code(), Some(0));
    let o = run(&["disk", "info", s(&top)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot open backing file"));
}

fn sha256_of(p: &Path) -> String {
    let o = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn import_physical_from_image_and_loop_device() {
    let Some(dir) = qemu_tempdir() else { return };
    let d = dir.path();
    let src = make_source(d);
    let out = d.join("p2v.qcow2");
    let r = ok_json(&["disk", "import-physical", "--json", s(&src), s(&out)]);
    assert_eq!(r["sha256"], sha256_of(&src));
    assert_eq!(r["verified"], true);
    assert!(r["bytes_written"].as_u64().unwrap() < 4 << 20);
    qemu_ok(&["compare", s(&src), s(&out)]);
    assert_eq!(qemu(&["check", s(&out)]).status.code(), Some(0));

    // A real block device: a loop device over the same bytes.
    if !is_root() {
        eprintln!("SKIP loop-device half: needs root for losetup");
        return;
    }
    let lo = Command::new("losetup")
        .args(["-f", "--show", "-r", s(&src)])
        .output();
    let dev = match lo {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        other => {
            eprintln!("SKIP loop-device half: losetup failed: {other:?}");
            return;
        }
    };
    let out2 = d.join("dev.qcow2");
    let res = run(&["disk", "import-physical", "--json", &dev, s(&out2)]);
    Command::new("losetup").args(["-d", &dev]).status().ok();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    assert_eq!(r["sha256"], sha256_of(&src));
    qemu_ok(&["compare", s(&src), s(&out2)]);
}

#[test]
fn import_physical_from_tree_reports_guest_needs() {
    if Command::new("mkfs.ext4").arg("-V").output().is_err() {
        eprintln!("SKIP: mkfs.ext4 not installed (apt-get install e2fsprogs)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tree = d.join("root");
    let w = |p: &str, c: &str| {
        let f = tree.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, c).unwrap();
    };
    let uuid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    w(
        "etc/fstab",
        &format!("UUID={uuid} / ext4 defaults 0 1\n/dev/sdb1 /data xfs defaults 0 2\n"),
    );
    w("etc/hostname", "p2v-guest\n");
    w(
        "etc/network/interfaces",
        "auto lo\niface lo inet loopback\nauto enp3s0f1\niface enp3s0f1 inet dhcp\n",
    );
    w(
        "lib/modules/6.1.0-test/kernel/drivers/block/virtio_blk.ko",
        "x",
    );
    w(
        "lib/modules/6.1.0-test/modules.builtin",
        "kernel/drivers/virtio/virtio_pci.ko\nkernel/fs/ext4/ext4.ko\n",
    );
    w("boot/initrd.img-6.1.0-test", "070701 no virtio here");
    let out = d.join("tree.qcow2");
    let r = ok_json(&[
        "disk",
        "import-physical",
        "--json",
        "--from-tree",
        s(&tree),
        s(&out),
    ]);
    assert_eq!(r["filesystem_uuid"], uuid, "root UUID from fstab is kept");
    let text = r["findings"].to_string();
    assert!(text.contains("/dev/sdb1"), "{text}");
    assert!(text.contains("enp3s0f1"), "{text}");
    assert!(
        text.contains("virtio_net"),
        "missing virtio_net not reported: {text}"
    );
    assert!(
        text.contains("lacks virtio_blk"),
        "initramfs without virtio_blk not reported: {text}"
    );
    // The image holds a clean ext4 filesystem with the tree's files.
    if !have_qemu() {
        eprintln!("SKIP content check: qemu-img not installed");
        return;
    }
    let raw = d.join("tree.raw");
    qemu_ok(&["convert", "-O", "raw", s(&out), s(&raw)]);
    let fsck = Command::new("e2fsck")
        .args(["-fn", s(&raw)])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let cat = Command::new("debugfs")
        .args(["-R", "cat /etc/hostname", s(&raw)])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "p2v-guest\n");

    // A live root has other filesystems mounted inside it; they stay out of the image. The
    // tmpfs is mounted in a private mount namespace so the host never sees it.
    if !is_root() || Command::new("unshare").arg("--version").output().is_err() {
        eprintln!("SKIP submount half: needs root and unshare (util-linux)");
        return;
    }
    std::fs::create_dir_all(tree.join("proc")).unwrap();
    let out2 = d.join("live.qcow2");
    let script = r#"mount -t tmpfs none "$1/proc" && echo secret > "$1/proc/mounted-file" && exec "$2" disk import-physical --json --from-tree "$1" "$3""#;
    let o = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&tree)
        .arg(env!("CARGO_BIN_EXE_corefour"))
        .arg(&out2)
        .output()
        .unwrap();
    if !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("mount:") {
        eprintln!(
            "SKIP submount half: cannot mount here: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        return;
    }
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        r["findings"].to_string().contains("left out 1 filesystem"),
        "{r}"
    );
    let raw2 = d.join("live.raw");
    qemu_ok(&["convert", "-O", "raw", s(&out2), s(&raw2)]);
    let ls = Command::new("debugfs")
        .args(["-R", "ls /proc", s(&raw2)])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&ls.stdout).contains("mounted-file"));
    let cat = Command::new("debugfs")
        .args(["-R", "cat /etc/hostname", s(&raw2)])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "p2v-guest\n");
}
