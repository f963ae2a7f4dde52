//! virtio-blk on a qcow2 overlay: the guest sees the backing file's bytes through the format
//! layer, and its writes land in the overlay while the base stays byte-identical.

mod common;

use std::io::Write;
use std::time::Duration;

use common::Rig;
use corefour_devices::virtio::blk::{self, Block, BlockConfig};
use corefour_devices::virtio::driver::MmioDriver;
use corefour_disk::qcow2::{CreateOptions, Qcow2};
use corefour_disk::{BlockRead, Format, Open};
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(5);
const SECTORS: u64 = 64;

fn request(
    d: &mut MmioDriver,
    ty: u32,
    sector: u64,
    data: GuestAddress,
    len: u32,
    write: bool,
) -> (u32, u8) {
    let h = common::blk_header(d, ty, sector);
    let st = d.alloc(1);
    d.mem.write_obj(0xffu8, st).unwrap();
    let mut bufs = vec![(h, 16, false)];
    if len > 0 {
        bufs.push((data, len, !write));
    }
    bufs.push((st, 1, true));
    let head = d.submit(0, &bufs).unwrap();
    let (id, used_len) = d.wait_used(0, T).expect("request completed");
    assert_eq!(id, u32::from(head));
    (used_len, d.mem.read_obj::<u8>(st).unwrap())
}

fn base_bytes() -> Vec<u8> {
    (0..SECTORS * 512)
        .map(|i| ((i / 512) as u8).wrapping_mul(7) ^ (i as u8))
        .collect()
}

#[test]
fn qcow2_overlay_reads_base_and_writes_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let overlay = dir.path().join("overlay.qcow2");
    let want = base_bytes();
    std::fs::File::create(&base)
        .unwrap()
        .write_all(&want)
        .unwrap();
    let opts = CreateOptions {
        backing_file: Some(base.display().to_string()),
        backing_format: Some(Format::Raw),
        ..Default::default()
    };
    drop(Qcow2::create(&overlay, None, &opts).unwrap());

    let dev = Block::new(&BlockConfig {
        path: overlay.clone(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(dev.sectors(), SECTORS, "capacity is the virtual size");
    assert!(!dev.mapped(), "image formats read through the format layer");
    let rig = Rig::new(Box::new(dev));
    let mut d = rig.driver(1, 128);

    // Read sectors 2..4: the base's bytes, not qcow2 metadata.
    let buf = d.alloc(1024);
    assert_eq!(
        request(&mut d, blk::T_IN, 2, buf, 1024, false),
        (1025, blk::S_OK)
    );
    let mut got = vec![0u8; 1024];
    d.mem.read_slice(&mut got, buf).unwrap();
    assert_eq!(got, want[1024..2048]);

    // Write sector 1 and flush: the overlay holds it, the base does not change.
    let data = d.alloc(512);
    d.mem.write_slice(&[0xc4; 512], data).unwrap();
    assert_eq!(
        request(&mut d, blk::T_OUT, 1, data, 512, true),
        (1, blk::S_OK)
    );
    assert_eq!(
        request(&mut d, blk::T_FLUSH, 0, data, 0, false),
        (1, blk::S_OK)
    );
    // Read back through the device.
    let back = d.alloc(512);
    assert_eq!(
        request(&mut d, blk::T_IN, 1, back, 512, false),
        (513, blk::S_OK)
    );
    let mut sector = vec![0u8; 512];
    d.mem.read_slice(&mut sector, back).unwrap();
    assert_eq!(sector, vec![0xc4; 512]);

    // Past the end: an I/O error, not a panic.
    assert_eq!(
        request(&mut d, blk::T_IN, SECTORS, back, 512, false).1,
        blk::S_IOERR
    );

    // Write-zeroes on sector 3 goes through the format too.
    let seg = d.alloc(16);
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&3u64.to_le_bytes());
    s[8..12].copy_from_slice(&1u32.to_le_bytes());
    d.mem.write_slice(&s, seg).unwrap();
    assert_eq!(
        request(&mut d, blk::T_WRITE_ZEROES, 0, seg, 16, true),
        (1, blk::S_OK)
    );
    drop(d);
    drop(rig);

    assert_eq!(std::fs::read(&base).unwrap(), want, "base file untouched");
    let mut img = corefour_disk::open(&overlay, Open::default()).unwrap();
    let mut all = vec![0u8; want.len()];
    img.read_at(&mut all, 0).unwrap();
    assert_eq!(all[..512], want[..512]);
    assert_eq!(all[512..1024], [0xc4; 512]);
    assert_eq!(all[1024..1536], want[1024..1536]);
    assert_eq!(all[1536..2048], [0u8; 512]);
    assert_eq!(all[2048..], want[2048..]);
}

#[test]
fn read_only_qcow2_refuses_writes() {
    // A qcow2 opened with ro: writes fail with IOERR, reads work.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.qcow2");
    drop(Qcow2::create(&img, Some(SECTORS * 512), &CreateOptions::default()).unwrap());
    let dev = Block::new(&BlockConfig {
        path: img,
        read_only: true,
        ..Default::default()
    })
    .unwrap();
    let rig = Rig::new(Box::new(dev));
    let mut d = rig.driver(1, 128);
    let buf = d.alloc(512);
    assert_eq!(
        request(&mut d, blk::T_IN, 0, buf, 512, false),
        (513, blk::S_OK)
    );
    let mut got = vec![0xffu8; 512];
    d.mem.read_slice(&mut got, buf).unwrap();
    assert_eq!(got, vec![0u8; 512], "a fresh qcow2 reads as zeros");
    assert_eq!(
        request(&mut d, blk::T_OUT, 0, buf, 512, true).1,
        blk::S_IOERR
    );
}

#[test]
fn large_requests_cross_bounce_chunks_intact() {
    // Longer than the 1 MiB bounce buffer, and not a multiple of it.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.qcow2");
    drop(Qcow2::create(&img, Some(4 << 20), &CreateOptions::default()).unwrap());
    let dev = Block::new(&BlockConfig {
        path: img.clone(),
        ..Default::default()
    })
    .unwrap();
    let rig = Rig::new(Box::new(dev));
    let mut d = rig.driver(1, 128);
    let len: u32 = (3 << 20) + 512;
    let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let src = d.alloc(u64::from(len));
    d.mem.write_slice(&pattern, src).unwrap();
    assert_eq!(
        request(&mut d, blk::T_OUT, 1, src, len, true),
        (1, blk::S_OK)
    );
    let dst = d.alloc(u64::from(len));
    assert_eq!(
        request(&mut d, blk::T_IN, 1, dst, len, false),
        (len + 1, blk::S_OK)
    );
    let mut got = vec![0u8; len as usize];
    d.mem.read_slice(&mut got, dst).unwrap();
    assert!(got == pattern, "read-back differs from what was written");
    drop(d);
    drop(rig);
    let mut image = corefour_disk::open(&img, Open::default()).unwrap();
    let mut first = vec![0u8; 1024];
    image.read_at(&mut first, 0).unwrap();
    assert_eq!(first[..512], [0u8; 512]);
    assert_eq!(first[512..], pattern[..512]);
}
