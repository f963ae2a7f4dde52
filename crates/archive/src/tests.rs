use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::*;

struct Tmp(PathBuf);
impl Tmp {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("c4-archive-{tag}-{}", std::process::id()));
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

/// A config, a 64 MiB sparse disk with two data extents, and a small plain file.
fn sample(dir: &Path) -> Vec<Member> {
    let disk = dir.join("disk.raw");
    let f = File::create(&disk).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(b"BOOTSECTOR-MARKER", 0).unwrap();
    f.write_all_at(&[0x5a; 65536], 32 << 20).unwrap();
    let state = dir.join("state.bin");
    std::fs::write(&state, b"STATE-MARKER 0123456789").unwrap();
    vec![
        Member {
            name: "config.json".into(),
            kind: "config".into(),
            source: Source::Bytes(br#"{"name":"vm1","memory_mib":64}"#.to_vec()),
            sparse: false,
        },
        Member {
            name: "disks/root.raw".into(),
            kind: "disk".into(),
            source: Source::File(disk),
            sparse: true,
        },
        Member {
            name: "snapshot/state.bin".into(),
            kind: "snapshot-state".into(),
            source: Source::File(state),
            sparse: false,
        },
    ]
}

fn make(t: &Tmp) -> PathBuf {
    let out = t.0.join("vm.tar.zst");
    let mut bytes = 0u64;
    let m = export(
        &out,
        &sample(&t.0),
        serde_json::json!({"name": "vm1"}),
        &mut |n| bytes += n,
    )
    .unwrap();
    assert_eq!(m.members.len(), 3);
    assert!(bytes > 0);
    out
}

fn raw_tar(archive: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    zstd::Decoder::new(File::open(archive).unwrap())
        .unwrap()
        .read_to_end(&mut v)
        .unwrap();
    v
}

fn rezstd(tar: &[u8], out: &Path) {
    let mut z = zstd::Encoder::new(File::create(out).unwrap(), 3).unwrap();
    z.write_all(tar).unwrap();
    z.finish().unwrap();
}

#[test]
fn round_trip_keeps_content_and_sparseness() {
    let t = Tmp::new("rt");
    let out = make(&t);
    assert!(
        std::fs::metadata(&out).unwrap().len() < 64 << 10,
        "a 64 MiB sparse disk compresses to almost nothing"
    );
    let staging = t.0.join("in");
    let m = import(&out, &staging, &mut |_| {}).unwrap();
    assert_eq!(m.meta["name"], "vm1");
    let disk = staging.join("disks/root.raw");
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        std::fs::read(t.0.join("disk.raw")).unwrap()
    );
    let md = std::fs::metadata(&disk).unwrap();
    assert_eq!(md.len(), 64 << 20);
    assert!(md.blocks() * 512 < 1 << 20, "imported disk stays sparse");
    assert_eq!(
        std::fs::read(staging.join("config.json")).unwrap(),
        br#"{"name":"vm1","memory_mib":64}"#
    );
    let d = m.member("disks/root.raw").unwrap();
    assert_eq!(d.encoding, Encoding::Sparse);
    assert_eq!(d.logical_size, 64 << 20);
    // Importing again into the same place refuses rather than mixing.
    assert!(matches!(
        import(&out, &staging, &mut |_| {}),
        Err(ArchiveError::StagingExists(_))
    ));
}

#[test]
fn truncated_archives_are_refused_and_leave_nothing() {
    let t = Tmp::new("trunc");
    let out = make(&t);
    let full = std::fs::read(&out).unwrap();
    for cut in [
        0,
        10,
        full.len() / 3,
        full.len() / 2,
        full.len() - 20,
        full.len() - 1,
    ] {
        let p = t.0.join(format!("cut{cut}.tar.zst"));
        std::fs::write(&p, &full[..cut]).unwrap();
        let staging = t.0.join(format!("s{cut}"));
        let err = import(&p, &staging, &mut |_| {}).unwrap_err();
        assert!(
            matches!(err, ArchiveError::Stream(..) | ArchiveError::NoManifest),
            "cut at {cut}: {err}"
        );
        assert!(!staging.exists(), "staging removed after a refusal");
    }
    // A tar cut cleanly before its manifest (a valid zstd stream) is refused too.
    let tar = raw_tar(&out);
    let at = find(&tar, b"manifest.json"); // a header starts with its name
    let p = t.0.join("nomanifest.tar.zst");
    rezstd(&tar[..at], &p);
    let err = import(&p, &t.0.join("nm"), &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, ArchiveError::NoManifest | ArchiveError::Stream(..)),
        "{err}"
    );
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("marker present")
}

#[test]
fn tampered_member_fails_its_checksum() {
    let t = Tmp::new("tamper");
    let out = make(&t);
    let mut tar = raw_tar(&out);
    let i = find(&tar, b"STATE-MARKER");
    tar[i] = b's';
    let p = t.0.join("tampered.tar.zst");
    rezstd(&tar, &p);
    let staging = t.0.join("s");
    let err = import(&p, &staging, &mut |_| {}).unwrap_err();
    match err {
        ArchiveError::Checksum { name, .. } => assert_eq!(name, "snapshot/state.bin"),
        other => panic!("expected a checksum error, got {other}"),
    }
    assert!(!staging.exists());

    // Tampering inside the sparse disk's data is caught the same way.
    let mut tar = raw_tar(&out);
    let i = find(&tar, b"BOOTSECTOR-MARKER");
    tar[i] = b'b';
    rezstd(&tar, &p);
    assert!(matches!(
        import(&p, &t.0.join("s2"), &mut |_| {}),
        Err(ArchiveError::Checksum { .. })
    ));

    // A flipped byte in the compressed stream: zstd's own checksum or the content hash.
    let mut z = std::fs::read(&out).unwrap();
    let mid = z.len() / 2;
    z[mid] ^= 0x10;
    std::fs::write(&p, &z).unwrap();
    assert!(import(&p, &t.0.join("s3"), &mut |_| {}).is_err());
}

#[test]
fn manifest_lies_are_refused() {
    let t = Tmp::new("lies");
    let out = make(&t);
    let tar = raw_tar(&out);
    // Rebuild the tar with a doctored manifest.
    let rebuild = |edit: &dyn Fn(&mut Manifest), name: &str| -> PathBuf {
        let mut a = tar::Archive::new(tar.as_slice());
        let p = t.0.join(name);
        let mut b = tar::Builder::new(Vec::new());
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            if path == Path::new(MANIFEST_NAME) {
                let mut m: Manifest = serde_json::from_slice(&data).unwrap();
                edit(&mut m);
                data = serde_json::to_vec(&m).unwrap();
            }
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            b.append_data(&mut h, &path, data.as_slice()).unwrap();
        }
        rezstd(&b.into_inner().unwrap(), &p);
        p
    };
    let p = rebuild(&|m| m.members.retain(|x| x.name != "config.json"), "extra");
    let err = import(&p, &t.0.join("a"), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("not listed"), "{err}");
    let p = rebuild(
        &|m| {
            let mut extra = m.members[0].clone();
            extra.name = "disks/second.raw".into();
            m.members.push(extra);
        },
        "missing",
    );
    let err = import(&p, &t.0.join("b"), &mut |_| {}).unwrap_err();
    assert!(matches!(err, ArchiveError::Missing(_)), "{err}");
    let p = rebuild(&|m| m.version = 99, "version");
    let err = import(&p, &t.0.join("c"), &mut |_| {}).unwrap_err();
    assert!(matches!(err, ArchiveError::Version { .. }), "{err}");
    let p = rebuild(&|m| m.members[1].sha256 = "0".repeat(64), "sha");
    assert!(matches!(
        import(&p, &t.0.join("d"), &mut |_| {}),
        Err(ArchiveError::Checksum { .. })
    ));
    let p = rebuild(
        &|m| m.members[0].name = "../escape".into(),
        "escape.tar.zst",
    );
    assert!(matches!(
        import(&p, &t.0.join("e"), &mut |_| {}),
        Err(ArchiveError::BadMember { .. })
    ));
    assert!(!t.0.join("escape").exists());
}

#[test]
fn random_bytes_are_refused_without_panic() {
    let t = Tmp::new("rand");
    let p = t.0.join("junk");
    let mut s = 0x1234_5678_9abc_def0u64;
    for round in 0..50 {
        let len = (round * 37) % 3000;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect();
        std::fs::write(&p, &bytes).unwrap();
        assert!(import(&p, &t.0.join(format!("s{round}")), &mut |_| {}).is_err());
    }
}
