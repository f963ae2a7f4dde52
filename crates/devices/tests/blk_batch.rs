//! virtio-blk batches: several requests made available at once, as a driver with many in
//! flight does. Adjacent reads or writes are merged into one preadv/pwritev by the device
//! (`virtio::blk_batch`); every request must still get its own status, its own data and its
//! place in the driver's order, whatever its neighbours are.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::Rig;
use corefour_devices::virtio::blk::{self, Block, BlockConfig};
use corefour_devices::virtio::driver::{Desc, MmioDriver, DESC_F_NEXT, DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(5);
const K64: u32 = 64 << 10;
const OUTSIDE: u64 = 0x7fff_0000_0000;

/// A disk of `sectors` whose every byte tells where it is.
fn disk(sectors: u64) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let data: Vec<u8> = (0..sectors * 512)
        .map(|i| (i / 512) as u8 ^ (i as u8).rotate_left(3))
        .collect();
    f.write_all(&data).unwrap();
    f.flush().unwrap();
    f
}

fn open(file: &tempfile::NamedTempFile, direct: bool, read_only: bool) -> Option<Block> {
    match Block::new(&BlockConfig {
        path: file.path().into(),
        direct,
        read_only,
        // The synchronous path merges; direct disks otherwise default to io_uring.
        io: blk::IoEngine::Sync,
        ..Default::default()
    }) {
        Ok(b) => Some(b),
        Err(e) if direct => {
            eprintln!("SKIP direct part: O_DIRECT not supported where the temp file lives: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// One queued request: its chain head, status byte and data buffer.
struct Req {
    head: u16,
    st: GuestAddress,
    data: GuestAddress,
    len: u32,
}

fn pattern(seed: u8, len: u32) -> Vec<u8> {
    (0..len).map(|i| seed ^ (i as u8).wrapping_mul(7)).collect()
}

/// Queues (does not publish) a request of type `ty` at `sector` with `len` data bytes in two
/// descriptors (4 KiB-aligned, so O_DIRECT takes them as they are); a write carries
/// `pattern(seed)`.
fn queue(d: &mut MmioDriver, ty: u32, sector: u64, len: u32, seed: u8) -> Req {
    queue_as(d, ty, sector, len, seed, ty != blk::T_IN)
}

/// As [`queue`], with the data device-readable (`write`) or device-writable whatever `ty`.
fn queue_as(d: &mut MmioDriver, ty: u32, sector: u64, len: u32, seed: u8, write: bool) -> Req {
    let h = common::blk_header(d, ty, sector);
    let st = d.alloc(1);
    d.mem.write_obj(0xeeu8, st).unwrap();
    let data = GuestAddress((d.alloc(u64::from(len) + 4096).0 + 4095) & !4095);
    if write && len > 0 {
        d.mem.write_slice(&pattern(seed, len), data).unwrap();
    }
    let mut bufs = vec![(h, 16, false)];
    if len > 4096 {
        bufs.push((data, 4096, !write));
        bufs.push((GuestAddress(data.0 + 4096), len - 4096, !write));
    } else if len > 0 {
        bufs.push((data, len, !write));
    }
    bufs.push((st, 1, true));
    let head = d.queue_chain(0, &bufs).unwrap();
    Req {
        head,
        st,
        data,
        len,
    }
}

/// Publishes what was queued and waits for `n` completions: used length by chain head.
fn run(d: &mut MmioDriver, n: usize) -> HashMap<u16, u32> {
    d.publish(0).unwrap();
    let mut used = HashMap::new();
    for _ in 0..n {
        let (id, len) = d
            .wait_used(0, T)
            .expect("every request of the batch completes");
        assert!(
            used.insert(id as u16, len).is_none(),
            "chain {id} returned twice"
        );
    }
    assert!(d.pop_used(0).is_none(), "more completions than requests");
    used
}

/// (used length, status byte) of `r`.
fn outcome(d: &MmioDriver, used: &HashMap<u16, u32>, r: &Req) -> (u32, u8) {
    (used[&r.head], d.mem.read_obj::<u8>(r.st).unwrap())
}

fn data(d: &MmioDriver, r: &Req) -> Vec<u8> {
    let mut v = vec![0u8; r.len as usize];
    d.mem.read_slice(&mut v, r.data).unwrap();
    v
}

/// Equal bytes (without printing megabytes when they are not).
#[track_caller]
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: differs at byte {i}: {} != {}", got[i], want[i]);
    }
}

fn file_at(file: &tempfile::NamedTempFile, off: u64, len: u32) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    std::fs::File::open(file.path())
        .unwrap()
        .read_exact_at(&mut v, off)
        .unwrap();
    v
}

/// Adjacent writes (merged) land in the file, then adjacent reads (merged: over the mapping's
/// size limit) and small adjacent reads (the mapping) return them; buffered and O_DIRECT.
#[test]
fn adjacent_writes_then_reads_in_one_batch() {
    for direct in [false, true] {
        let file = disk(2048);
        let Some(dev) = open(&file, direct, false) else {
            continue;
        };
        let rig = Rig::new(Box::new(dev));
        let mut d = rig.driver(1, 256);
        let writes: Vec<Req> = (0..8)
            .map(|i| queue(&mut d, blk::T_OUT, 128 * i, K64, i as u8 + 1))
            .collect();
        let used = run(&mut d, writes.len());
        for (i, w) in writes.iter().enumerate() {
            assert_eq!(outcome(&d, &used, w), (1, blk::S_OK), "write {i}");
            same(
                &file_at(&file, 128 * 512 * i as u64, K64),
                &pattern(i as u8 + 1, K64),
                &format!("write {i} in the file (direct: {direct})"),
            );
        }
        let reads: Vec<Req> = (0..8)
            .map(|i| queue(&mut d, blk::T_IN, 128 * i, K64, 0))
            .collect();
        let used = run(&mut d, reads.len());
        for (i, r) in reads.iter().enumerate() {
            assert_eq!(outcome(&d, &used, r), (K64 + 1, blk::S_OK), "read {i}");
            same(
                &data(&d, r),
                &pattern(i as u8 + 1, K64),
                &format!("read {i}"),
            );
        }
        // 64 KiB of small reads (one preadv) and 16 KiB (buffered: from the mapping).
        for n in [16, 4] {
            let small: Vec<Req> = (0..n)
                .map(|i| queue(&mut d, blk::T_IN, 8 * i, 4096, 0))
                .collect();
            let used = run(&mut d, small.len());
            let first = pattern(1, K64);
            for (i, r) in small.iter().enumerate() {
                assert_eq!(outcome(&d, &used, r), (4097, blk::S_OK), "small read {i}");
                same(
                    &data(&d, r),
                    &first[i * 4096..(i + 1) * 4096],
                    &format!("small {i} of {n}"),
                );
            }
        }
    }
}

/// Adjacent, gapped, out-of-order, past-the-end, hostile and wrong-direction requests and a
/// flush in one batch: each gets its own status, good neighbours of bad requests succeed.
#[test]
fn mixed_batch_gets_each_request_its_status() {
    let file = disk(2048);
    let before = std::fs::read(file.path()).unwrap();
    let dev = open(&file, false, false).unwrap();
    let rig = Rig::new(Box::new(dev));
    let mut d = rig.driver(1, 256);
    let a = queue(&mut d, blk::T_OUT, 0, K64, 0xa1);
    let b = queue(&mut d, blk::T_OUT, 128, K64, 0xb2);
    // Data outside guest memory, continuing a and b: refused, neither it nor they harmed.
    let hostile = {
        let h = d.alloc(16);
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&blk::T_OUT.to_le_bytes());
        raw[8..16].copy_from_slice(&256u64.to_le_bytes());
        d.mem.write_slice(&raw, h).unwrap();
        let st = d.alloc(1);
        d.mem.write_obj(0xeeu8, st).unwrap();
        let head = d
            .queue_chain(
                0,
                &[
                    (h, 16, false),
                    (GuestAddress(OUTSIDE), K64, false),
                    (st, 1, true),
                ],
            )
            .unwrap();
        Req {
            head,
            st,
            data: h,
            len: 0,
        }
    };
    let c = queue(&mut d, blk::T_OUT, 256, K64, 0xc3);
    let gap = queue(&mut d, blk::T_OUT, 1024, K64, 0xd4);
    let earlier = queue(&mut d, blk::T_OUT, 512, K64, 0xe5);
    let past_end = queue(&mut d, blk::T_OUT, 2048 - 64, K64, 0xf6);
    // A descriptor loop with a writable tail, between two adjacent writes.
    let x = queue(&mut d, blk::T_OUT, 640, K64, 0x17);
    let looping = {
        let h = d.alloc(16);
        d.mem.write_slice(&[0u8; 16], h).unwrap();
        let st = d.alloc(1);
        d.mem.write_obj(0xeeu8, st).unwrap();
        let slot = d.write_descs(0, &[]).unwrap();
        let descs = [
            Desc {
                addr: h.0,
                len: 16,
                flags: DESC_F_NEXT,
                next: slot + 1,
            },
            Desc {
                addr: st.0,
                len: 1,
                flags: DESC_F_NEXT | DESC_F_WRITE,
                next: slot + 1,
            },
        ];
        let head = d.write_descs(0, &descs).unwrap();
        d.push_avail(0, head).unwrap();
        Req {
            head,
            st,
            data: h,
            len: 0,
        }
    };
    let y = queue(&mut d, blk::T_OUT, 768, K64, 0x28);
    let flush = queue(&mut d, blk::T_FLUSH, 0, 0, 0);
    let ra = queue(&mut d, blk::T_IN, 0, K64, 0);
    let rb = queue(&mut d, blk::T_IN, 128, K64, 0);
    // A read whose data the device would read: wrong direction.
    let wrong = queue_as(&mut d, blk::T_IN, 384, K64, 0x39, true);
    let rc = queue(&mut d, blk::T_IN, 256, 2 * K64, 0);
    let read_past = queue(&mut d, blk::T_IN, 2048 - 64, K64, 0);
    let rlast = queue(&mut d, blk::T_IN, 2048 - 128, K64, 0);
    let all = [
        &a, &b, &hostile, &c, &gap, &earlier, &past_end, &x, &looping, &y, &flush, &ra, &rb,
        &wrong, &rc, &read_past, &rlast,
    ];
    let used = run(&mut d, all.len());

    for (name, r) in [("a", &a), ("b", &b), ("c", &c), ("gap", &gap)]
        .into_iter()
        .chain([
            ("earlier", &earlier),
            ("x", &x),
            ("y", &y),
            ("flush", &flush),
        ])
    {
        assert_eq!(outcome(&d, &used, r), (1, blk::S_OK), "{name}");
    }
    assert_eq!(outcome(&d, &used, &hostile).1, blk::S_IOERR, "hostile");
    assert_eq!(outcome(&d, &used, &looping).1, blk::S_IOERR, "looping");
    assert_eq!(outcome(&d, &used, &past_end), (1, blk::S_IOERR), "past end");
    assert_eq!(
        outcome(&d, &used, &read_past),
        (1, blk::S_IOERR),
        "read past"
    );
    assert_eq!(
        outcome(&d, &used, &wrong),
        (1, blk::S_IOERR),
        "wrong direction"
    );

    let file_now = std::fs::read(file.path()).unwrap();
    let at = |sector: usize| &file_now[sector * 512..sector * 512 + K64 as usize];
    same(at(0), &pattern(0xa1, K64), "a");
    same(at(128), &pattern(0xb2, K64), "b");
    same(
        at(256),
        &pattern(0xc3, K64),
        "c (the hostile write before it did nothing)",
    );
    same(at(384), &before[384 * 512..512 * 512], "untouched between");
    same(at(512), &pattern(0xe5, K64), "earlier");
    same(at(640), &pattern(0x17, K64), "x");
    same(at(768), &pattern(0x28, K64), "y");
    same(at(1024), &pattern(0xd4, K64), "gap");
    same(
        at(2048 - 128),
        &before[(2048 - 128) * 512..],
        "the end, untouched by the refused write past it",
    );

    for (r, want) in [(&ra, pattern(0xa1, K64)), (&rb, pattern(0xb2, K64))] {
        assert_eq!(outcome(&d, &used, r), (K64 + 1, blk::S_OK));
        same(&data(&d, r), &want, "reads after the flush see the writes");
    }
    assert_eq!(outcome(&d, &used, &rc), (2 * K64 + 1, blk::S_OK));
    same(&data(&d, &rc), &file_now[256 * 512..512 * 512], "rc");
    assert_eq!(outcome(&d, &used, &rlast), (K64 + 1, blk::S_OK));
    same(&data(&d, &rlast), at(2048 - 128), "rlast");
}

/// A merged read the file cannot satisfy (truncated under the device) is redone request by
/// request: those inside the file succeed with their data, the others fail alone. A read-only
/// disk refuses every write of a batch and still serves its reads.
#[test]
fn failing_group_gives_per_request_statuses() {
    let file = disk(1024);
    let want = std::fs::read(file.path()).unwrap();
    let dev = open(&file, false, false).unwrap();
    let rig = Rig::new(Box::new(dev));
    let mut d = rig.driver(1, 256);
    // 200 KiB left: the first three 64 KiB reads fit, the fourth crosses the end, the fifth
    // is past it.
    std::fs::OpenOptions::new()
        .write(true)
        .open(file.path())
        .unwrap()
        .set_len(200 << 10)
        .unwrap();
    let reads: Vec<Req> = (0..5)
        .map(|i| queue(&mut d, blk::T_IN, 128 * i, K64, 0))
        .collect();
    let used = run(&mut d, reads.len());
    for (i, r) in reads.iter().enumerate() {
        if i < 3 {
            assert_eq!(outcome(&d, &used, r), (K64 + 1, blk::S_OK), "read {i}");
            let off = i * K64 as usize;
            same(
                &data(&d, r),
                &want[off..off + K64 as usize],
                &format!("read {i}"),
            );
        } else {
            assert_eq!(outcome(&d, &used, r), (1, blk::S_IOERR), "read {i}");
        }
    }

    let file = disk(1024);
    let dev = open(&file, false, true).unwrap();
    let rig = Rig::new(Box::new(dev));
    let mut d = rig.driver(1, 256);
    let mut batch: Vec<Req> = (0..4)
        .map(|i| queue(&mut d, blk::T_OUT, 128 * i, K64, 9))
        .collect();
    batch.extend((0..4).map(|i| queue(&mut d, blk::T_IN, 128 * i, K64, 0)));
    let used = run(&mut d, batch.len());
    for (i, r) in batch.iter().enumerate() {
        if i < 4 {
            assert_eq!(outcome(&d, &used, r), (1, blk::S_IOERR), "write {i}");
        } else {
            assert_eq!(outcome(&d, &used, r), (K64 + 1, blk::S_OK), "read {i}");
            let off = (i - 4) * K64 as usize;
            same(
                &data(&d, r),
                &want[off..off + K64 as usize],
                &format!("read {i}"),
            );
        }
    }
    assert_eq!(
        std::fs::read(file.path()).unwrap(),
        want,
        "read-only disk unchanged"
    );
}

/// Every write of a merged group is marked in the dirty map snapshots copy from.
#[test]
fn merged_writes_are_all_marked_dirty() {
    use corefour_devices::virtio::blk_dirty;
    let file = disk(4096);
    let dev = open(&file, false, false).unwrap();
    let tracked = blk_dirty::find(file.path()).expect("the device registered its disk");
    tracked.start("blk_batch test").unwrap();
    let rig = Rig::new(Box::new(dev));
    let mut d = rig.driver(1, 256);
    let mut batch: Vec<Req> = (0..4)
        .map(|i| queue(&mut d, blk::T_OUT, 128 * i, K64, i as u8))
        .collect();
    batch.push(queue(&mut d, blk::T_OUT, 2048, K64, 7));
    let used = run(&mut d, batch.len());
    for (i, r) in batch.iter().enumerate() {
        assert_eq!(outcome(&d, &used, r), (1, blk::S_OK), "write {i}");
    }
    let bits = tracked.take("blk_batch test").unwrap();
    assert_eq!(
        tracked.ranges(&bits),
        [(0, 4 * u64::from(K64)), (1 << 20, u64::from(K64))]
    );
    tracked.stop("blk_batch test");
}

/// A rate-limited device still merges what it admits and serves the rest of the batch when
/// its bucket refills: every request completes, in order on the disk, none twice.
#[test]
fn rate_limited_batch_completes_every_request() {
    use corefour_devices::virtio::rate_limiter::RateLimit;
    let file = disk(1024);
    let dev = Block::new(&BlockConfig {
        path: file.path().into(),
        rate_limit: RateLimit {
            ops_per_sec: 20,
            ops_burst: 1,
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    let rig = Rig::new(Box::new(dev));
    let mut d = rig.driver(1, 256);
    let t0 = std::time::Instant::now();
    let writes: Vec<Req> = (0..30)
        .map(|i| queue(&mut d, blk::T_OUT, 8 * i, 4096, i as u8))
        .collect();
    d.publish(0).unwrap();
    let mut used = HashMap::new();
    for _ in 0..writes.len() {
        let (id, len) = d
            .wait_used(0, Duration::from_secs(10))
            .expect("throttled requests complete once admitted");
        assert!(used.insert(id as u16, len).is_none(), "chain {id} twice");
    }
    let took = t0.elapsed();
    // 20 ops at once, then 20/s: the last 10 take about half a second.
    assert!(took >= Duration::from_millis(400), "not limited: {took:?}");
    for (i, w) in writes.iter().enumerate() {
        assert_eq!(outcome(&d, &used, w), (1, blk::S_OK), "write {i}");
        same(
            &file_at(&file, 8 * 512 * i as u64, 4096),
            &pattern(i as u8, 4096),
            &format!("write {i}"),
        );
    }
}

/// Random batches (runs of adjacent requests, gaps, overlaps, reads of what the batch just
/// wrote, requests past the end, flushes) against a model disk applied in the driver's order:
/// merging must not change any request's status or data. Buffered and O_DIRECT.
#[test]
fn random_batches_match_a_model_disk() {
    const SECTORS: u64 = 512;
    for direct in [false, true] {
        let file = disk(SECTORS);
        let mut model = std::fs::read(file.path()).unwrap();
        let Some(dev) = open(&file, direct, false) else {
            continue;
        };
        let rig = Rig::new(Box::new(dev));
        let mut d = rig.driver(1, 256);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for round in 0..12 {
            // Guest memory is reused each round: the driver's heap only grows.
            let mut batch = Vec::new();
            let mut next = rnd(SECTORS);
            for _ in 0..24 {
                let ty = match rnd(10) {
                    0 => blk::T_FLUSH,
                    1..=4 => blk::T_IN,
                    _ => blk::T_OUT,
                };
                // Mostly continuing the previous request, sometimes anywhere (or past the end).
                let sector = if rnd(3) > 0 { next } else { rnd(SECTORS + 16) };
                let sectors = 1 + rnd(24);
                next = sector + sectors;
                let len = if ty == blk::T_FLUSH {
                    0
                } else {
                    sectors as u32 * 512
                };
                let seed = rnd(256) as u8;
                batch.push((queue(&mut d, ty, sector, len, seed), ty, sector, seed));
            }
            let used = run(&mut d, batch.len());
            for (i, (r, ty, sector, seed)) in batch.iter().enumerate() {
                let what = format!("direct {direct} round {round} request {i}");
                let (off, len) = ((sector * 512) as usize, r.len as usize);
                let fits = off + len <= model.len();
                let (got_len, status) = outcome(&d, &used, r);
                match *ty {
                    blk::T_FLUSH => assert_eq!((got_len, status), (1, blk::S_OK), "{what}"),
                    _ if !fits => assert_eq!((got_len, status), (1, blk::S_IOERR), "{what}"),
                    blk::T_OUT => {
                        assert_eq!((got_len, status), (1, blk::S_OK), "{what}");
                        model[off..off + len].copy_from_slice(&pattern(*seed, r.len));
                    }
                    _ => {
                        assert_eq!((got_len, status), (r.len + 1, blk::S_OK), "{what}");
                        same(&data(&d, r), &model[off..off + len], &what);
                    }
                }
            }
        }
        same(
            &std::fs::read(file.path()).unwrap(),
            &model,
            &format!("the disk at the end (direct {direct})"),
        );
    }
}
