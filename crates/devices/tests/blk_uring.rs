//! virtio-blk's io_uring engine on an O_DIRECT raw disk, end to end at the device level: many
//! requests published at once, completed out of order, checked against the file; errors among
//! good requests; flush ordering; a snapshot taken with requests in flight; bounce buffers.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::Rig;
use corefour_devices::virtio::blk::{self, Block, BlockConfig, IoEngine};
use corefour_devices::virtio::driver::{CountingIrq, MmioDriver};
use corefour_devices::virtio::state::SaveRestore;
use corefour_devices::virtio::MmioTransport;
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(10);
const SECTORS: u64 = 4096; // 2 MiB

/// A disk file on a real file system (O_DIRECT is refused on some tmpfs), sector `s` filled
/// with a pattern of `s`.
fn disk() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
    let mut data = vec![0u8; (SECTORS * 512) as usize];
    for (i, b) in data.iter_mut().enumerate() {
        *b = pattern(i as u64 / 512, i % 512);
    }
    std::fs::write(f.path(), &data).unwrap();
    f
}

fn pattern(sector: u64, i: usize) -> u8 {
    (sector as u8).wrapping_mul(31) ^ (i as u8) ^ (sector >> 8) as u8
}

/// The device with the io_uring engine, or None (printed) where the host cannot give it.
fn uring_block(file: &tempfile::NamedTempFile) -> Option<Block> {
    let dev = common::direct_block(file.path())?;
    if let Err(e) = blk::probe_io_uring() {
        eprintln!("SKIP: io_uring unavailable here: {e}");
        assert_eq!(dev.io_engine(), IoEngine::Sync, "falls back to sync");
        return None;
    }
    assert_eq!(dev.io_engine(), IoEngine::Uring);
    Some(dev)
}

/// [`uring_block`] behind the virtio-mmio transport.
fn uring_rig(file: &tempfile::NamedTempFile) -> Option<Rig> {
    Some(Rig::new(Box::new(uring_block(file)?)))
}

/// The disk file still has its own size (a request past the end did not extend it).
fn assert_not_extended(file: &tempfile::NamedTempFile) {
    assert_eq!(
        std::fs::metadata(file.path()).unwrap().len(),
        SECTORS * 512,
        "file not extended"
    );
}

/// A page-aligned guest buffer of `len` bytes.
fn aligned(d: &mut MmioDriver, len: u64) -> GuestAddress {
    GuestAddress((d.alloc(len + 4096).0 + 4095) & !4095)
}

struct Req {
    head: u16,
    status: GuestAddress,
}

/// Queues (without publishing) header + data + status; `into_guest`: the device writes the
/// data (a read).
fn queue(
    d: &mut MmioDriver,
    ty: u32,
    sector: u64,
    data: GuestAddress,
    len: u32,
    into_guest: bool,
) -> Req {
    let h = common::blk_header(d, ty, sector);
    let status = d.alloc(1);
    d.mem.write_obj(0xffu8, status).unwrap();
    let mut bufs = vec![(h, 16, false)];
    if len > 0 {
        bufs.push((data, len, into_guest));
    }
    bufs.push((status, 1, true));
    let head = d.queue_chain(0, &bufs).unwrap();
    Req { head, status }
}

/// Waits for `n` used entries: head -> (position in the used ring, used length).
fn collect(d: &mut MmioDriver, n: usize) -> HashMap<u16, (usize, u32)> {
    let mut got = HashMap::new();
    for i in 0..n {
        let (id, len) = d
            .wait_used(0, T)
            .unwrap_or_else(|| panic!("{i} of {n} completed"));
        assert!(
            got.insert(id as u16, (i, len)).is_none(),
            "head {id} completed twice"
        );
    }
    got
}

fn status(d: &MmioDriver, r: &Req) -> u8 {
    d.mem.read_obj(r.status).unwrap()
}

fn file_sectors(file: &tempfile::NamedTempFile, sector: u64, n: u64) -> Vec<u8> {
    std::fs::read(file.path()).unwrap()[(sector * 512) as usize..((sector + n) * 512) as usize]
        .to_vec()
}

/// 40 writes and 40 reads of other sectors in one batch (240 of the queue's 256 descriptors),
/// then the written sectors read back in a second batch: every byte checked against the file.
#[test]
fn many_concurrent_reads_and_writes() {
    let file = disk();
    let Some(rig) = uring_rig(&file) else {
        return;
    };
    let mut d = rig.driver(1, 256);
    let mut reads = Vec::new();
    let mut writes = Vec::new();
    for i in 0..40u64 {
        // Writes of 4 KiB to sectors 0..512 (stride 8), reads of 8 KiB from 1024.. (stride 16).
        let w = aligned(&mut d, 4096);
        d.mem.write_slice(&[0x40 + i as u8; 4096], w).unwrap();
        writes.push((i * 8, queue(&mut d, blk::T_OUT, i * 8, w, 4096, false)));
        let r = aligned(&mut d, 8192);
        reads.push((
            r,
            1024 + i * 16,
            queue(&mut d, blk::T_IN, 1024 + i * 16, r, 8192, true),
        ));
    }
    d.publish(0).unwrap();
    let used = collect(&mut d, 80);
    for (sector, w) in &writes {
        assert_eq!(used[&w.head].1, 1, "write at {sector}: status only");
        assert_eq!(status(&d, w), blk::S_OK);
    }
    for (buf, sector, r) in &reads {
        assert_eq!(used[&r.head].1, 8193, "read at {sector}: data + status");
        assert_eq!(status(&d, r), blk::S_OK);
        let mut got = vec![0u8; 8192];
        d.mem.read_slice(&mut got, *buf).unwrap();
        assert_eq!(got, file_sectors(&file, *sector, 16), "read at {sector}");
    }
    for (i, (sector, _)) in writes.iter().enumerate() {
        assert_eq!(
            file_sectors(&file, *sector, 8),
            vec![0x40 + i as u8; 4096],
            "file at {sector}"
        );
    }
    // And back through the device.
    let back: Vec<_> = writes
        .iter()
        .map(|(sector, _)| {
            let b = aligned(&mut d, 4096);
            (b, queue(&mut d, blk::T_IN, *sector, b, 4096, true))
        })
        .collect();
    d.publish(0).unwrap();
    collect(&mut d, back.len());
    for (i, (b, r)) in back.iter().enumerate() {
        assert_eq!(status(&d, r), blk::S_OK);
        let mut got = vec![0u8; 4096];
        d.mem.read_slice(&mut got, *b).unwrap();
        assert_eq!(got, vec![0x40 + i as u8; 4096]);
    }
}

/// A read past the end of the disk in a batch of good ones: it alone gets IOERR.
#[test]
fn a_failing_request_among_good_ones() {
    let file = disk();
    let Some(rig) = uring_rig(&file) else {
        return;
    };
    let mut d = rig.driver(1, 256);
    let mut reqs = Vec::new();
    for i in 0..24u64 {
        let b = aligned(&mut d, 4096);
        let sector = if i == 11 { SECTORS - 4 } else { i * 8 };
        reqs.push((b, sector, queue(&mut d, blk::T_IN, sector, b, 4096, true)));
    }
    // A write past the end too, in the middle of the batch.
    let w = aligned(&mut d, 4096);
    let bad_write = queue(&mut d, blk::T_OUT, SECTORS, w, 4096, false);
    d.publish(0).unwrap();
    let used = collect(&mut d, 25);
    for (b, sector, r) in &reqs {
        if *sector == SECTORS - 4 {
            assert_eq!(status(&d, r), blk::S_IOERR, "read across the end");
            assert_eq!(used[&r.head].1, 1, "no data reported for a failed read");
            continue;
        }
        assert_eq!(status(&d, r), blk::S_OK, "read at {sector}");
        let mut got = vec![0u8; 4096];
        d.mem.read_slice(&mut got, *b).unwrap();
        assert_eq!(got, file_sectors(&file, *sector, 8));
    }
    assert_eq!(status(&d, &bad_write), blk::S_IOERR, "write past the end");
    assert_not_extended(&file);
}

/// A flush published behind a batch of writes completes after all of them.
#[test]
fn flush_completes_after_the_writes_before_it() {
    let file = disk();
    let Some(rig) = uring_rig(&file) else {
        return;
    };
    let mut d = rig.driver(1, 256);
    let mut writes = Vec::new();
    for i in 0..32u64 {
        let w = aligned(&mut d, 8192);
        d.mem.write_slice(&[0x90 ^ i as u8; 8192], w).unwrap();
        writes.push(queue(&mut d, blk::T_OUT, 2048 + i * 16, w, 8192, false));
    }
    let flush = queue(&mut d, blk::T_FLUSH, 0, GuestAddress(0), 0, false);
    d.publish(0).unwrap();
    let used = collect(&mut d, 33);
    assert_eq!(status(&d, &flush), blk::S_OK);
    let flushed_at = used[&flush.head].0;
    for (i, w) in writes.iter().enumerate() {
        assert_eq!(status(&d, w), blk::S_OK);
        assert!(
            used[&w.head].0 < flushed_at,
            "write {i} completed after the flush that followed it"
        );
        assert_eq!(
            file_sectors(&file, 2048 + i as u64 * 16, 16),
            vec![0x90 ^ i as u8; 8192]
        );
    }
}

/// Buffers the disk cannot take directly (odd addresses, lengths of 512 split oddly) go through
/// the bounce buffer, in a batch with aligned ones.
#[test]
fn unaligned_buffers_among_aligned_ones() {
    let file = disk();
    let Some(rig) = uring_rig(&file) else {
        return;
    };
    let mut d = rig.driver(1, 256);
    let odd_w = GuestAddress(aligned(&mut d, 4096).0 + 3);
    d.mem.write_slice(&[0x3c; 1024], odd_w).unwrap();
    let mut reqs = Vec::new();
    for i in 0..8u64 {
        let b = aligned(&mut d, 4096);
        reqs.push((b, i * 8, queue(&mut d, blk::T_IN, i * 8, b, 4096, true)));
        if i == 4 {
            let odd = GuestAddress(aligned(&mut d, 4096).0 + 1);
            reqs.push((odd, 100, queue(&mut d, blk::T_IN, 100, odd, 1536, true)));
        }
    }
    let w = queue(&mut d, blk::T_OUT, 3000, odd_w, 1024, false);
    d.publish(0).unwrap();
    let used = collect(&mut d, reqs.len() + 1);
    for (b, sector, r) in &reqs {
        assert_eq!(status(&d, r), blk::S_OK, "read at {sector}");
        let n = used[&r.head].1 as usize - 1;
        let mut got = vec![0u8; n];
        d.mem.read_slice(&mut got, *b).unwrap();
        assert_eq!(got, file_sectors(&file, *sector, n as u64 / 512));
    }
    assert_eq!(status(&d, &w), blk::S_OK);
    assert_eq!(file_sectors(&file, 3000, 2), vec![0x3c; 1024]);
}

/// A snapshot taken while writes are in flight: every request the device took is complete and
/// in the used ring when the state is saved, and a device restored from it finishes the rest.
#[test]
fn snapshot_with_requests_in_flight_loses_nothing() {
    let file = disk();
    let Some(rig) = uring_rig(&file) else {
        return;
    };
    let mut d = rig.driver(1, 256);
    let mut writes = Vec::new();
    for i in 0..64u64 {
        let w = aligned(&mut d, 16384);
        d.mem.write_slice(&[0x11 + i as u8; 16384], w).unwrap();
        writes.push(queue(&mut d, blk::T_OUT, 64 + i * 32, w, 16384, false));
    }
    d.publish(0).unwrap();
    // Park the device as soon as its first write completed: the rest of what it took is
    // then most likely still on the disk.
    let t0 = std::time::Instant::now();
    while d.used_idx(0) == 0 {
        assert!(t0.elapsed() < T, "no write completed");
        std::hint::spin_loop();
    }
    let saved = rig.transport.save_state().unwrap();
    let q = &saved.queues[0];
    assert_eq!(
        q.next_avail, q.next_used,
        "every request taken from the ring is in the used ring"
    );
    assert_eq!(
        d.used_idx(0),
        q.next_used,
        "the used index in memory agrees"
    );
    let taken = usize::from(q.next_used);
    for w in &writes[..taken] {
        assert_eq!(status(&d, w), blk::S_OK, "a taken request has its status");
    }
    for w in &writes[taken..] {
        assert_eq!(status(&d, w), 0xff, "an untaken request is untouched");
    }

    let irq = Arc::new(CountingIrq::default());
    let fresh = MmioTransport::new(
        Box::new(uring_block(&file).expect("available above")),
        rig.mem.clone(),
        irq,
    )
    .unwrap();
    fresh.restore_state(&saved).unwrap();
    d.dev = &fresh;
    collect(&mut d, 64);
    for (i, w) in writes.iter().enumerate() {
        assert_eq!(status(&d, w), blk::S_OK, "write {i}");
        assert_eq!(
            file_sectors(&file, 64 + i as u64 * 32, 32),
            vec![0x11 + i as u8; 16384],
            "write {i} in the file"
        );
    }
    eprintln!("{taken} of 64 writes were taken before the snapshot");
}

/// `io=sync` and buffered disks keep the synchronous engine.
#[test]
fn engine_choice() {
    let file = disk();
    let c = BlockConfig::parse(&format!("{},direct,io=sync", file.path().display())).unwrap();
    assert_eq!(c.io, IoEngine::Sync);
    if let Ok(dev) = Block::new(&c) {
        assert_eq!(dev.io_engine(), IoEngine::Sync);
    }
    let buffered = Block::new(&BlockConfig {
        path: file.path().into(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(buffered.io_engine(), IoEngine::Sync);
    let e = BlockConfig::parse(&format!("{},io=uring", file.path().display())).unwrap_err();
    assert!(e.contains("io=uring needs direct"), "{e}");
    assert!(BlockConfig::parse("/x,direct,io=posix").is_err());
}

/// Truncates or extends the disk file under the running device to `sectors`.
fn resize_disk(path: &std::path::Path, sectors: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(sectors * 512)
        .unwrap()
}

/// A disk file shrunk under the running device: a read across the new end is cut short by the
/// kernel, resubmitted for the rest, meets end of file and answers IOERR (never OK with part
/// of the data); reads before the end still work, and after the file grows back, all do.
#[test]
fn short_read_at_a_shrunk_end_is_an_error() {
    let file = disk();
    let Some(rig) = uring_rig(&file) else {
        return;
    };
    let mut d = rig.driver(1, 256);
    let resize = |sectors: u64| resize_disk(file.path(), sectors);
    resize(1000);
    let across = aligned(&mut d, 8192);
    let inside = aligned(&mut d, 8192);
    let a = queue(&mut d, blk::T_IN, 996, across, 8192, true);
    let b = queue(&mut d, blk::T_IN, 900, inside, 8192, true);
    d.publish(0).unwrap();
    let used = collect(&mut d, 2);
    assert_eq!(
        status(&d, &a),
        blk::S_IOERR,
        "read across the end of the file"
    );
    assert_eq!(used[&a.head].1, 1);
    assert_eq!(status(&d, &b), blk::S_OK);
    let mut got = vec![0u8; 8192];
    d.mem.read_slice(&mut got, inside).unwrap();
    assert_eq!(got, file_sectors(&file, 900, 16));
    resize(SECTORS);
    let again = queue(&mut d, blk::T_IN, 996, across, 8192, true);
    d.publish(0).unwrap();
    collect(&mut d, 1);
    assert_eq!(status(&d, &again), blk::S_OK, "the file is long again");
    d.mem.read_slice(&mut got, across).unwrap();
    assert_eq!(got[..2048], file_sectors(&file, 996, 4)[..]);
    assert!(
        got[2048..].iter().all(|&b| b == 0),
        "the regrown part is a hole"
    );
}

/// The rate limiter admits each request before it is submitted: 30 reads published at once
/// against 20 ops/s (one second's worth in the bucket) take the last 10 at the refill rate.
#[test]
fn rate_limit_holds_back_submissions() {
    let file = disk();
    let dev = match Block::new(&BlockConfig {
        path: file.path().into(),
        direct: true,
        rate_limit: corefour_devices::virtio::rate_limiter::RateLimit {
            ops_per_sec: 20,
            ops_burst: 1,
            ..Default::default()
        },
        ..Default::default()
    }) {
        Ok(d) if d.io_engine() == IoEngine::Uring => d,
        _ => return eprintln!("SKIP: no O_DIRECT on /var/tmp or no io_uring here"),
    };
    let rig = Rig::new(Box::new(dev));
    let mut d = rig.driver(1, 256);
    let t0 = std::time::Instant::now();
    let reqs: Vec<_> = (0..30u64)
        .map(|i| {
            let b = aligned(&mut d, 4096);
            queue(&mut d, blk::T_IN, i * 8, b, 4096, true)
        })
        .collect();
    d.publish(0).unwrap();
    collect(&mut d, 30);
    let took = t0.elapsed();
    for r in &reqs {
        assert_eq!(status(&d, r), blk::S_OK);
    }
    assert!(
        took >= Duration::from_millis(400),
        "30 ops at 20/s: {took:?}"
    );
    assert!(
        took < Duration::from_secs(3),
        "limiter too strict: {took:?}"
    );
}

/// Makes io_uring_setup fail with EPERM on the calling thread and the threads it starts (a
/// seccomp filter, as a container runtime's default profile has).
fn deny_io_uring() {
    let filter = [
        // Load the system call number (offset 0 of seccomp_data).
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_io_uring_setup as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with integer arguments; no_new_privs only narrows this thread's rights.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    assert_eq!(r, 0, "no_new_privs: {}", std::io::Error::last_os_error());
    // SAFETY: `prog` points at `filter`, both alive for the call (the kernel copies them);
    // without SECCOMP_FILTER_FLAG_TSYNC the filter applies to this thread only.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
        )
    };
    assert_eq!(r, 0, "seccomp: {}", std::io::Error::last_os_error());
}

/// Where io_uring is refused, the device serves requests synchronously: one created there
/// says so, and one created before (io_uring worked) falls back when activated there.
#[test]
fn falls_back_to_sync_where_io_uring_is_refused() {
    let file = disk();
    let Some(before) = uring_block(&file) else {
        return;
    };
    let path = file.path().to_path_buf();
    std::thread::spawn(move || {
        deny_io_uring();
        assert!(
            blk::probe_io_uring().is_err(),
            "the filter refuses io_uring"
        );
        let inside = Block::new(&BlockConfig {
            path,
            direct: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(inside.io_engine(), IoEngine::Sync);
        for dev in [before, inside] {
            // The worker thread starts here, under the filter.
            let rig = Rig::new(Box::new(dev));
            let mut d = rig.driver(1, 256);
            let reqs: Vec<_> = (0..8u64)
                .map(|i| {
                    let b = aligned(&mut d, 4096);
                    (b, i, queue(&mut d, blk::T_IN, i * 8, b, 4096, true))
                })
                .collect();
            d.publish(0).unwrap();
            collect(&mut d, reqs.len());
            for (b, i, r) in &reqs {
                assert_eq!(status(&d, r), blk::S_OK);
                let mut got = vec![0u8; 4096];
                d.mem.read_slice(&mut got, *b).unwrap();
                let want: Vec<u8> = (0..4096)
                    .map(|j| pattern(i * 8 + j as u64 / 512, j % 512))
                    .collect();
                assert_eq!(got, want);
            }
        }
    })
    .join()
    .unwrap();
}

/// Runs of adjacent writes and reads published together (merged into one SQE each, split at
/// the 1 MiB group cap), in requests of mixed sizes: every byte checked in the file and in the
/// guest, every request OK with its own used length.
#[test]
fn merged_reads_and_writes_move_every_byte() {
    let file = disk();
    let Some(rig) = uring_rig(&file) else {
        return;
    };
    let mut d = rig.driver(1, 256);
    // 24 writes of 4, 8, 128 KiB laid end to end from sector 8 (1.1 MiB: two groups).
    let sizes = [4096u32, 8192, 131072];
    let mut writes = Vec::new();
    let mut sector = 8u64;
    for i in 0..24usize {
        let len = sizes[i % 3];
        let w = aligned(&mut d, u64::from(len));
        let fill: Vec<u8> = (0..len).map(|j| (i as u8) ^ (j / 512) as u8).collect();
        d.mem.write_slice(&fill, w).unwrap();
        writes.push((
            sector,
            fill,
            queue(&mut d, blk::T_OUT, sector, w, len, false),
        ));
        sector += u64::from(len) / 512;
    }
    assert!(sector < SECTORS);
    d.publish(0).unwrap();
    let used = collect(&mut d, writes.len());
    for (sector, fill, w) in &writes {
        assert_eq!(status(&d, w), blk::S_OK, "write at {sector}");
        assert_eq!(used[&w.head].1, 1);
        assert_eq!(
            &file_sectors(&file, *sector, fill.len() as u64 / 512),
            fill,
            "file at {sector}"
        );
    }
    // The same range read back in runs of other sizes, plus the untouched sectors around it.
    let mut reads = Vec::new();
    let mut at = 0u64;
    let mut i = 0;
    while at < sector + 8 {
        let len = [16384u32, 4096, 32768][i % 3].min(((sector + 8 - at) * 512) as u32);
        let b = aligned(&mut d, u64::from(len));
        reads.push((at, b, len, queue(&mut d, blk::T_IN, at, b, len, true)));
        at += u64::from(len) / 512;
        i += 1;
    }
    d.publish(0).unwrap();
    let used = collect(&mut d, reads.len());
    for (at, b, len, r) in &reads {
        assert_eq!(status(&d, r), blk::S_OK, "read at {at}");
        assert_eq!(used[&r.head].1, len + 1, "read at {at}: data + status");
        let mut got = vec![0u8; *len as usize];
        d.mem.read_slice(&mut got, *b).unwrap();
        assert_eq!(got, file_sectors(&file, *at, u64::from(*len) / 512), "{at}");
    }
}

/// Adjacent requests whose run reaches past the end of the disk: the member that does is not
/// merged (the synchronous path answers it IOERR, writing nothing), the ones before and after
/// it are served OK with their data.
#[test]
fn an_out_of_range_member_is_not_merged() {
    let file = disk();
    let Some(rig) = uring_rig(&file) else {
        return;
    };
    let mut d = rig.driver(1, 256);
    // Reads at END-24, END-16, then 16 sectors at END-8 (across the end), then END-8 again.
    let end = SECTORS;
    let plan = [
        (end - 24, 4096u32),
        (end - 16, 4096),
        (end - 8, 8192),
        (end - 8, 4096),
    ];
    let reads: Vec<_> = plan
        .iter()
        .map(|&(s, len)| {
            let b = aligned(&mut d, u64::from(len));
            (s, b, len, queue(&mut d, blk::T_IN, s, b, len, true))
        })
        .collect();
    // Writes: two adjacent good ones, one past the end, one good one after.
    let wplan = [(64u64, 0x11u8), (72, 0x22), (end, 0x33), (80, 0x44)];
    let writes: Vec<_> = wplan
        .iter()
        .map(|&(s, fill)| {
            let b = aligned(&mut d, 4096);
            d.mem.write_slice(&[fill; 4096], b).unwrap();
            (s, fill, queue(&mut d, blk::T_OUT, s, b, 4096, false))
        })
        .collect();
    d.publish(0).unwrap();
    let used = collect(&mut d, reads.len() + writes.len());
    for (i, (s, b, len, r)) in reads.iter().enumerate() {
        if i == 2 {
            assert_eq!(status(&d, r), blk::S_IOERR, "read across the end");
            assert_eq!(used[&r.head].1, 1, "no data for a failed read");
            continue;
        }
        assert_eq!(status(&d, r), blk::S_OK, "read at {s}");
        assert_eq!(used[&r.head].1, len + 1);
        let mut got = vec![0u8; *len as usize];
        d.mem.read_slice(&mut got, *b).unwrap();
        assert_eq!(got, file_sectors(&file, *s, u64::from(*len) / 512));
    }
    for (s, fill, w) in &writes {
        if *s == end {
            assert_eq!(status(&d, w), blk::S_IOERR, "write past the end");
            continue;
        }
        assert_eq!(status(&d, w), blk::S_OK, "write at {s}");
        assert_eq!(file_sectors(&file, *s, 8), vec![*fill; 4096]);
    }
    assert_not_extended(&file);
}

/// A merged run of reads across a shrunk end of the file: the merged SQE comes back short,
/// its remainder meets end of file, and the members are redone one by one: those before the
/// end OK with their data, the one across it and the one past it IOERR (never OK with part of
/// the data). Then a run of writes over the same range once the file is long again.
#[test]
fn a_short_merged_sqe_gives_each_member_its_own_status() {
    let file = disk();
    let Some(rig) = uring_rig(&file) else {
        return;
    };
    let mut d = rig.driver(1, 256);
    let resize = |sectors: u64| resize_disk(file.path(), sectors);
    resize(1004);
    // 4 KiB each from sector 984: 984 and 992 inside, 1000 across the end, 1008 past it.
    let reads: Vec<_> = [984u64, 992, 1000, 1008]
        .iter()
        .map(|&s| {
            let b = aligned(&mut d, 4096);
            d.mem.write_slice(&[0xee; 4096], b).unwrap();
            (s, b, queue(&mut d, blk::T_IN, s, b, 4096, true))
        })
        .collect();
    d.publish(0).unwrap();
    let used = collect(&mut d, reads.len());
    for (s, b, r) in &reads {
        if *s >= 1000 {
            assert_eq!(status(&d, r), blk::S_IOERR, "read at {s}");
            assert_eq!(used[&r.head].1, 1, "no data reported for read at {s}");
            continue;
        }
        assert_eq!(status(&d, r), blk::S_OK, "read at {s}");
        assert_eq!(used[&r.head].1, 4097);
        let mut got = vec![0u8; 4096];
        d.mem.read_slice(&mut got, *b).unwrap();
        assert_eq!(got, file_sectors(&file, *s, 8), "read at {s}");
    }
    resize(SECTORS);
    let writes: Vec<_> = [984u64, 992, 1000, 1008]
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let b = aligned(&mut d, 4096);
            d.mem.write_slice(&[0xa0 + i as u8; 4096], b).unwrap();
            (s, i, queue(&mut d, blk::T_OUT, s, b, 4096, false))
        })
        .collect();
    d.publish(0).unwrap();
    collect(&mut d, writes.len());
    for (s, i, w) in &writes {
        assert_eq!(status(&d, w), blk::S_OK, "write at {s}");
        assert_eq!(file_sectors(&file, *s, 8), vec![0xa0 + *i as u8; 4096]);
    }
}
