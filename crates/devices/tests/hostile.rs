//! A hostile driver: descriptor chains that loop, point outside guest memory, are too long, go
//! the wrong way or have bad lengths; rings that lie. The device answers with its error status
//! or DEVICE_NEEDS_RESET, never panics or hangs, and keeps serving well-formed requests.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{Rig, MEM_SIZE};
use corefour_devices::virtio::blk::{self, Block, BlockConfig};
use corefour_devices::virtio::driver::{
    Desc, MmioDriver, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
};
use corefour_devices::virtio::rng::Rng;
use corefour_devices::virtio::status;
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(5);
const OUTSIDE: u64 = 0x7fff_0000_0000;

fn blk_rig() -> (Rig, tempfile::NamedTempFile) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&vec![0x5a; 16 * 512]).unwrap();
    let dev = Block::new(&BlockConfig {
        path: f.path().into(),
        ..Default::default()
    })
    .unwrap();
    (Rig::new(Box::new(dev)), f)
}

fn header(d: &mut MmioDriver, ty: u32, sector: u64) -> u64 {
    let h = d.alloc(16);
    let mut raw = [0u8; 16];
    raw[0..4].copy_from_slice(&ty.to_le_bytes());
    raw[8..16].copy_from_slice(&sector.to_le_bytes());
    d.mem.write_slice(&raw, h).unwrap();
    h.0
}

/// Offers `descs` (slot-relative `next` fixed up by the caller) and returns (used len, status).
fn offer(d: &mut MmioDriver, descs: &[Desc], status_at: Option<u64>) -> (u32, Option<u8>) {
    if let Some(s) = status_at {
        d.mem.write_obj(0xeeu8, GuestAddress(s)).unwrap();
    }
    let head = d.write_descs(0, descs).unwrap();
    d.push_avail(0, head).unwrap();
    d.publish(0).unwrap();
    let (id, len) = d.wait_used(0, T).expect("device returned the chain");
    assert_eq!(id, u32::from(head));
    (
        len,
        status_at.map(|s| d.mem.read_obj::<u8>(GuestAddress(s)).unwrap()),
    )
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Desc {
    Desc {
        addr,
        len,
        flags,
        next,
    }
}

/// A chain of `(addr, len, flags)` buffers, each linked to the next, laid out from the slot the
/// driver writes next.
fn chain(d: &mut MmioDriver, bufs: &[(u64, u32, u16)]) -> Vec<Desc> {
    let slot = d.write_descs(0, &[]).unwrap();
    let last = bufs.len() - 1;
    bufs.iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            if i == last {
                desc(addr, len, flags, 0)
            } else {
                desc(addr, len, flags | DESC_F_NEXT, slot + i as u16 + 1)
            }
        })
        .collect()
}

/// A well-formed read still works: the device was not wedged by what came before.
fn still_works(d: &mut MmioDriver) {
    let h = header(d, blk::T_IN, 1);
    let buf = d.alloc(512);
    let st = d.alloc(1);
    d.submit(
        0,
        &[
            (GuestAddress(h), 16, false),
            (buf, 512, true),
            (st, 1, true),
        ],
    )
    .unwrap();
    let (_, len) = d.wait_used(0, T).expect("good request completes");
    assert_eq!(len, 513);
    assert_eq!(d.mem.read_obj::<u8>(st).unwrap(), blk::S_OK);
    let mut data = [0u8; 512];
    d.mem.read_slice(&mut data, buf).unwrap();
    assert_eq!(data, [0x5a; 512]);
}

#[test]
fn looping_chain_terminates() {
    let (rig, _f) = blk_rig();
    let mut d = rig.driver(1, 16);
    let h = header(&mut d, blk::T_IN, 0);
    // Slot 0 -> 1 -> 0 -> ... forever.
    let descs = [desc(h, 16, DESC_F_NEXT, 1), desc(h, 16, DESC_F_NEXT, 0)];
    let (len, _) = offer(&mut d, &descs, None);
    assert_eq!(len, 0, "no writable status: returned untouched");
    still_works(&mut d);
}

#[test]
fn looping_chain_with_writable_tail_gets_ioerr() {
    let (rig, _f) = blk_rig();
    let mut d = rig.driver(1, 16);
    let h = header(&mut d, blk::T_IN, 0);
    let st = d.alloc(1).0;
    let descs = [
        desc(h, 16, DESC_F_NEXT, 1),
        desc(st, 1, DESC_F_NEXT | DESC_F_WRITE, 1),
    ];
    let (_, status) = offer(&mut d, &descs, Some(st));
    // The loop yields a readable-after-writable or over-long chain: an error either way.
    assert_eq!(status, Some(blk::S_IOERR));
    still_works(&mut d);
}

#[test]
fn buffers_outside_guest_memory() {
    let (rig, f) = blk_rig();
    let before = std::fs::read(f.path()).unwrap();
    let mut d = rig.driver(1, 16);
    let st = d.alloc(1).0;
    let cases = [
        // Data outside memory on a write.
        (blk::T_OUT, OUTSIDE, 0),
        // Straddling the end of memory on a read.
        (blk::T_IN, MEM_SIZE as u64 - 256, DESC_F_WRITE),
        // Address arithmetic that wraps.
        (blk::T_IN, u64::MAX - 8, DESC_F_WRITE),
    ];
    for (ty, addr, flags) in cases {
        let h = header(&mut d, ty, 0);
        let descs = chain(
            &mut d,
            &[(h, 16, 0), (addr, 512, flags), (st, 1, DESC_F_WRITE)],
        );
        let got = offer(&mut d, &descs, Some(st));
        assert_eq!(got, (1, Some(blk::S_IOERR)), "data at {addr:#x}");
    }
    // Header outside memory, status outside memory: nothing can be written back.
    let descs = chain(&mut d, &[(OUTSIDE, 16, 0), (OUTSIDE, 1, DESC_F_WRITE)]);
    assert_eq!(offer(&mut d, &descs, None).0, 0);
    assert_eq!(std::fs::read(f.path()).unwrap(), before, "disk untouched");
    still_works(&mut d);
}

#[test]
fn wrong_direction_and_bad_lengths() {
    let (rig, f) = blk_rig();
    let before = std::fs::read(f.path()).unwrap();
    let mut d = rig.driver(1, 64);
    let st = d.alloc(1).0;
    let buf = d.alloc(4096).0;
    let cases: Vec<(u32, u32, u16)> = vec![
        // (type, data len, data flags)
        (blk::T_IN, 512, 0),             // read into a device-readable buffer
        (blk::T_OUT, 512, DESC_F_WRITE), // write from a device-writable buffer
        (blk::T_IN, 100, DESC_F_WRITE),  // not a multiple of 512
        (blk::T_OUT, 513, 0),
        (blk::T_DISCARD, 15, 0),      // partial segment
        (blk::T_DISCARD, 16 * 33, 0), // too many segments
    ];
    for (ty, len, flags) in cases {
        let h = header(&mut d, ty, 0);
        let descs = chain(
            &mut d,
            &[(h, 16, 0), (buf, len, flags), (st, 1, DESC_F_WRITE)],
        );
        let (_, status) = offer(&mut d, &descs, Some(st));
        assert_eq!(
            status,
            Some(blk::S_IOERR),
            "type {ty} len {len} flags {flags}"
        );
    }
    // Header shorter than 16 bytes; header device-writable.
    for (hlen, hflags) in [(8u32, 0u16), (16, DESC_F_WRITE)] {
        let h = header(&mut d, blk::T_IN, 0);
        let descs = chain(&mut d, &[(h, hlen, hflags), (st, 1, DESC_F_WRITE)]);
        let (_, status) = offer(&mut d, &descs, Some(st));
        assert_eq!(
            status,
            Some(blk::S_IOERR),
            "header len {hlen} flags {hflags}"
        );
    }
    assert_eq!(std::fs::read(f.path()).unwrap(), before);
    still_works(&mut d);
}

#[test]
fn oversized_indirect_table_and_head_past_ring() {
    let (rig, _f) = blk_rig();
    let mut d = rig.driver(1, 16);
    let table = d.alloc(16 * 64).0;
    // An indirect table far larger than the queue, and one whose length is not a multiple of 16.
    for len in [16 * 0xffff, 17] {
        let descs = [desc(table, len, DESC_F_INDIRECT, 0)];
        assert_eq!(offer(&mut d, &descs, None).0, 0);
    }
    // A head index beyond the ring cannot be returned; the device skips it and goes on.
    d.push_avail(0, 999).unwrap();
    d.publish(0).unwrap();
    still_works(&mut d);
    assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn avail_index_running_ahead_needs_reset() {
    let (rig, _f) = blk_rig();
    let mut d = rig.driver(1, 16);
    d.set_avail_idx(0, 1000).unwrap();
    d.notify(0);
    let mut st = 0;
    for _ in 0..500 {
        st = d.status();
        if st & status::DEVICE_NEEDS_RESET != 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_ne!(st & status::DEVICE_NEEDS_RESET, 0, "status {st:#x}");
    assert_ne!(
        rig.transport.interrupt().isr() & 2,
        0,
        "config interrupt raised"
    );
    // Further kicks are ignored without spinning; a reset brings the device back.
    d.notify(0);
    d.w(0x70, 0);
    let mut d = rig.driver(1, 16);
    still_works(&mut d);
}

#[test]
fn rings_outside_memory_fail_activation() {
    let rig = Rig::new(Box::new(Rng::new()));
    let t = &*rig.transport;
    let w = |off: u64, v: u32| corefour_devices::BusDevice::write(t, off, &v.to_le_bytes());
    w(0x70, 0);
    w(0x70, 3);
    w(0x24, 1);
    w(0x20, 1); // VERSION_1
    w(0x70, 3 | 8);
    w(0x30, 0);
    w(0x38, 16);
    w(0x80, 0);
    w(0x84, 0x7fff); // descriptor table far outside memory
    w(0x44, 1);
    w(0x70, 3 | 8 | 4);
    let mut b = [0u8; 4];
    corefour_devices::BusDevice::read(t, 0x70, &mut b);
    let st = u32::from_le_bytes(b);
    assert_ne!(st & status::FAILED, 0, "status {st:#x}");
    assert!(!rig.transport.is_activated());
}

#[test]
fn features_without_version_1_are_refused() {
    let rig = Rig::new(Box::new(Rng::new()));
    let t = &*rig.transport;
    let w = |off: u64, v: u32| corefour_devices::BusDevice::write(t, off, &v.to_le_bytes());
    w(0x70, 3);
    w(0x70, 3 | 8);
    let mut b = [0u8; 4];
    corefour_devices::BusDevice::read(t, 0x70, &mut b);
    assert_eq!(u32::from_le_bytes(b) & 8, 0, "legacy-only driver refused");
}
