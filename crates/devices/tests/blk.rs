//! virtio-blk end to end at the device level: a driver writes requests into guest memory,
//! notifies, and the disk file, used ring, status byte and interrupt are checked.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use common::Rig;
use corefour_devices::virtio::blk::{self, Block, BlockConfig};
use corefour_devices::virtio::driver::MmioDriver;
use corefour_devices::virtio::rate_limiter::RateLimit;
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(5);

fn disk(sectors: u64) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let mut data = vec![0u8; (sectors * 512) as usize];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i / 512) as u8 ^ (i as u8);
    }
    f.write_all(&data).unwrap();
    f.flush().unwrap();
    f
}

/// Submits header + data + status; returns (used len, status).
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

/// The device on `file` with the default configuration (raw, buffered, read-write).
fn plain_block(file: &tempfile::NamedTempFile) -> Block {
    Block::new(&BlockConfig {
        path: file.path().into(),
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn reads_writes_flushes_and_interrupts() {
    let file = disk(64);
    let dev = plain_block(&file);
    assert_eq!(dev.sectors(), 64);
    assert!(
        dev.mapped(),
        "buffered reads of a raw file come from its mapping"
    );
    let rig = Rig::new(Box::new(dev));
    let mut d = rig.driver(1, 128);
    assert!(rig.transport.is_activated());

    // Capacity in config space.
    let mut cap = [0u8; 8];
    corefour_devices::BusDevice::read(&*rig.transport, 0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 64);

    // Read sector 3 across two buffers.
    let irq0 = rig.irq.count();
    let buf = d.alloc(1024);
    let (len, st) = request(&mut d, blk::T_IN, 3, buf, 1024, false);
    assert_eq!((len, st), (1025, blk::S_OK));
    let mut got = vec![0u8; 1024];
    d.mem.read_slice(&mut got, buf).unwrap();
    let mut want = vec![0u8; 1024];
    let mut f = std::fs::File::open(file.path()).unwrap();
    f.seek(SeekFrom::Start(3 * 512)).unwrap();
    f.read_exact(&mut want).unwrap();
    assert_eq!(got, want);
    assert!(rig.irq.wait_past(irq0, T) > irq0, "used-buffer interrupt");
    assert_eq!(rig.transport.interrupt().isr() & 1, 1);
    d.w(0x64, 1);
    assert_eq!(rig.transport.interrupt().isr(), 0);

    // Write sector 10, flush, and the file holds the bytes.
    let data = d.alloc(512);
    d.mem.write_slice(&[0xab; 512], data).unwrap();
    assert_eq!(
        request(&mut d, blk::T_OUT, 10, data, 512, true),
        (1, blk::S_OK)
    );
    assert_eq!(
        request(&mut d, blk::T_FLUSH, 0, data, 0, false),
        (1, blk::S_OK)
    );
    let mut sector = vec![0u8; 512];
    f.seek(SeekFrom::Start(10 * 512)).unwrap();
    f.read_exact(&mut sector).unwrap();
    assert_eq!(sector, vec![0xab; 512]);

    // Past the end: IOERR, file unchanged.
    assert_eq!(
        request(&mut d, blk::T_OUT, 64, data, 512, true).1,
        blk::S_IOERR
    );
    assert_eq!(
        request(&mut d, blk::T_IN, 63, buf, 1024, false).1,
        blk::S_IOERR
    );
    // Unknown type: UNSUPP.
    assert_eq!(request(&mut d, 99, 0, buf, 512, false).1, blk::S_UNSUPP);
}

#[test]
fn get_id_discard_and_write_zeroes() {
    let file = disk(64);
    let rig = Rig::new(Box::new(
        Block::new(&BlockConfig {
            path: file.path().into(),
            serial: Some("corefour-serial-0001".into()),
            ..Default::default()
        })
        .unwrap(),
    ));
    let mut d = rig.driver(1, 64);
    let id = d.alloc(20);
    let (len, st) = request(&mut d, blk::T_GET_ID, 0, id, 20, false);
    assert_eq!((len, st), (21, blk::S_OK));
    let mut s = [0u8; 20];
    d.mem.read_slice(&mut s, id).unwrap();
    assert_eq!(&s, b"corefour-serial-0001");

    for (ty, sector) in [(blk::T_WRITE_ZEROES, 8u64), (blk::T_DISCARD, 16)] {
        let seg = d.alloc(16);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&8u32.to_le_bytes());
        d.mem.write_slice(&raw, seg).unwrap();
        assert_eq!(request(&mut d, ty, 0, seg, 16, true), (1, blk::S_OK));
    }
    let data = std::fs::read(file.path()).unwrap();
    assert!(
        data[8 * 512..24 * 512].iter().all(|&b| b == 0),
        "zeroed and discarded ranges read 0"
    );
    assert_ne!(
        data[24 * 512..25 * 512],
        vec![0u8; 512][..],
        "neighbour untouched"
    );
    assert_eq!(data.len(), 64 * 512, "size kept");
}

#[test]
fn read_only_disk_refuses_writes() {
    let file = disk(8);
    let before = std::fs::read(file.path()).unwrap();
    let rig = Rig::new(Box::new(
        Block::new(&BlockConfig {
            path: file.path().into(),
            read_only: true,
            ..Default::default()
        })
        .unwrap(),
    ));
    let mut d = rig.driver(1, 16);
    assert_ne!(d.features & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    let data = d.alloc(512);
    assert_eq!(
        request(&mut d, blk::T_OUT, 0, data, 512, true).1,
        blk::S_IOERR
    );
    assert_eq!(request(&mut d, blk::T_IN, 0, data, 512, false).1, blk::S_OK);
    assert_eq!(std::fs::read(file.path()).unwrap(), before);
}

#[test]
fn rate_limit_slows_requests() {
    let file = disk(64);
    let rig = Rig::new(Box::new(
        Block::new(&BlockConfig {
            path: file.path().into(),
            rate_limit: RateLimit {
                ops_per_sec: 20,
                ops_burst: 1,
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap(),
    ));
    let mut d = rig.driver(1, 16);
    let buf = d.alloc(512);
    let t0 = Instant::now();
    for _ in 0..40 {
        assert_eq!(request(&mut d, blk::T_IN, 0, buf, 512, false).1, blk::S_OK);
    }
    // The bucket holds one second's worth (20 ops) and refills at 20/s: 40 ops take ~1 s.
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "40 ops at 20/s: {took:?}"
    );
    assert!(
        took < Duration::from_secs(3),
        "limiter too strict: {took:?}"
    );
}

#[test]
fn reset_and_reactivate() {
    let file = disk(8);
    let rig = Rig::new(Box::new(
        Block::new(&BlockConfig {
            path: file.path().into(),
            ..Default::default()
        })
        .unwrap(),
    ));
    {
        let mut d = rig.driver(1, 16);
        let buf = d.alloc(512);
        assert_eq!(request(&mut d, blk::T_IN, 1, buf, 512, false).1, blk::S_OK);
        d.w(0x70, 0);
        assert!(!rig.transport.is_activated());
        assert_eq!(d.status(), 0);
    }
    let mut d = rig.driver(1, 16);
    let buf = d.alloc(512);
    assert_eq!(request(&mut d, blk::T_IN, 2, buf, 512, false).1, blk::S_OK);
}

#[test]
fn direct_io_aligned_and_bounced() {
    let file = disk(64);
    let Some(dev) = common::direct_block(file.path()) else {
        return;
    };
    assert!(!dev.mapped(), "O_DIRECT reads keep going through pread");
    let rig = Rig::new(Box::new(dev));
    let mut d = rig.driver(1, 64);
    let want = std::fs::read(file.path()).unwrap();
    // Aligned buffer: straight O_DIRECT. Misaligned (odd address): through the bounce buffer.
    let aligned = GuestAddress((d.alloc(8192).0 + 4095) & !4095);
    let odd = GuestAddress(d.alloc(2048).0 + 3);
    for buf in [aligned, odd] {
        assert_eq!(
            request(&mut d, blk::T_IN, 5, buf, 1024, false),
            (1025, blk::S_OK)
        );
        let mut got = vec![0u8; 1024];
        d.mem.read_slice(&mut got, buf).unwrap();
        assert_eq!(got, want[5 * 512..7 * 512]);
    }
    d.mem.write_slice(&[0x3c; 512], odd).unwrap();
    assert_eq!(
        request(&mut d, blk::T_OUT, 9, odd, 512, true),
        (1, blk::S_OK)
    );
    assert_eq!(
        std::fs::read(file.path()).unwrap()[9 * 512..10 * 512],
        [0x3c; 512]
    );
}

/// Buffered reads come from a mapping of the file: they must see what the device wrote,
/// discarded or zeroed just before, and what another writer put into the file.
#[test]
fn mapped_reads_see_writes_discards_and_other_writers() {
    use std::os::unix::fs::FileExt;
    let file = disk(64);
    let dev = plain_block(&file);
    assert!(dev.mapped());
    let rig = Rig::new(Box::new(dev));
    let mut d = rig.driver(1, 64);
    let buf = d.alloc(4096);
    let read = |d: &mut MmioDriver, sector: u64| {
        assert_eq!(
            request(d, blk::T_IN, sector, buf, 4096, false),
            (4097, blk::S_OK)
        );
        let mut got = vec![0u8; 4096];
        d.mem.read_slice(&mut got, buf).unwrap();
        got
    };
    let before = read(&mut d, 8);
    assert_eq!(
        before,
        std::fs::read(file.path()).unwrap()[8 * 512..16 * 512]
    );
    let data = d.alloc(4096);
    d.mem.write_slice(&[0x5e; 4096], data).unwrap();
    assert_eq!(
        request(&mut d, blk::T_OUT, 8, data, 4096, true),
        (1, blk::S_OK)
    );
    assert_eq!(read(&mut d, 8), vec![0x5e; 4096], "read after write");
    for (ty, want) in [(blk::T_DISCARD, 0u8), (blk::T_WRITE_ZEROES, 0)] {
        d.mem.write_slice(&[0x77; 4096], data).unwrap();
        assert_eq!(
            request(&mut d, blk::T_OUT, 8, data, 4096, true).1,
            blk::S_OK
        );
        let seg = d.alloc(16);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&8u64.to_le_bytes());
        raw[8..12].copy_from_slice(&8u32.to_le_bytes());
        d.mem.write_slice(&raw, seg).unwrap();
        assert_eq!(request(&mut d, ty, 0, seg, 16, true), (1, blk::S_OK));
        assert_eq!(read(&mut d, 8), vec![want; 4096], "read after type {ty}");
    }
    // Another writer of the file (the page cache is shared with the mapping).
    let other = std::fs::OpenOptions::new()
        .write(true)
        .open(file.path())
        .unwrap();
    other.write_all_at(&[0x42; 4096], 16 * 512).unwrap();
    assert_eq!(read(&mut d, 16), vec![0x42; 4096]);
}

/// A disk file truncated under a running device: reads of the vanished part get IOERR (the
/// SIGBUS of the mapping is caught), the VMM lives on, reads of what is left still work and,
/// once the file is long again, the whole disk reads again.
#[test]
fn truncated_disk_gives_ioerr_not_a_crash() {
    let file = disk(256);
    let want = std::fs::read(file.path()).unwrap();
    let dev = plain_block(&file);
    assert!(dev.mapped());
    let rig = Rig::new(Box::new(dev));
    let mut d = rig.driver(1, 64);
    let buf = d.alloc(8192);
    assert_eq!(
        request(&mut d, blk::T_IN, 200, buf, 8192, false),
        (8193, blk::S_OK)
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(file.path())
        .unwrap()
        .set_len(32 * 512)
        .unwrap();
    assert_eq!(
        request(&mut d, blk::T_IN, 200, buf, 8192, false).1,
        blk::S_IOERR,
        "read past the shrunk file"
    );
    assert_eq!(
        request(&mut d, blk::T_IN, 128, buf, 4096, false).1,
        blk::S_IOERR,
        "and again, now through pread"
    );
    assert_eq!(
        request(&mut d, blk::T_IN, 8, buf, 4096, false),
        (4097, blk::S_OK)
    );
    let mut got = vec![0u8; 4096];
    d.mem.read_slice(&mut got, buf).unwrap();
    assert_eq!(got, want[8 * 512..16 * 512]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(file.path())
        .unwrap()
        .set_len(256 * 512)
        .unwrap();
    assert_eq!(
        request(&mut d, blk::T_IN, 200, buf, 4096, false),
        (4097, blk::S_OK),
        "the file is long again"
    );
    d.mem.read_slice(&mut got, buf).unwrap();
    assert_eq!(got, vec![0u8; 4096], "the regrown part is a hole");
}
