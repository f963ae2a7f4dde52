//! Randomized hostile drivers (the in-suite counterpart of the cargo-fuzz targets): random
//! descriptor tables, avail entries and register writes. The device must never panic or hang;
//! after a reset it serves a well-formed request again.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{Rig, HEAP, MEM_SIZE};
use corefour_devices::virtio::blk::{self, Block, BlockConfig};
use corefour_devices::virtio::driver::{Desc, MmioDriver};
use corefour_devices::virtio::rng::Rng;
use corefour_devices::virtio::VirtioDevice;
use corefour_devices::BusDevice;
use vm_memory::{Bytes, GuestAddress};

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn random_desc(r: &mut XorShift, qsize: u16) -> Desc {
    let addr = match r.below(4) {
        0 => r.next(),
        1 => MEM_SIZE as u64 - r.below(4096),
        _ => HEAP + r.below(1 << 20),
    };
    let len = match r.below(4) {
        0 => r.next() as u32,
        1 => 16,
        2 => 1,
        _ => r.below(8192) as u32,
    };
    Desc {
        addr,
        len,
        flags: r.below(8) as u16,
        next: if r.below(4) == 0 {
            r.next() as u16
        } else {
            r.below(u64::from(qsize)) as u16
        },
    }
}

/// Lets the device work on whatever was offered, bounded: returns once the used index stops
/// moving or the device asks for a reset.
fn settle(d: &MmioDriver) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = d.used_idx(0);
    let mut quiet = 0;
    while quiet < 5 {
        assert!(
            Instant::now() < deadline,
            "device still busy after 5 s: hang"
        );
        std::thread::sleep(Duration::from_millis(1));
        let now = d.used_idx(0);
        if now == last {
            quiet += 1;
        } else {
            quiet = 0;
            last = now;
        }
    }
}

fn fuzz_device(
    make: &dyn Fn() -> Box<dyn VirtioDevice>,
    seed: u64,
    rounds: usize,
    good: &dyn Fn(&mut MmioDriver),
) {
    let mut r = XorShift(seed);
    let rig = Rig::new(make());
    for round in 0..rounds {
        let qsize = 1u16 << (1 + r.below(6));
        let mut d = rig.driver(1, qsize);
        // Random garbage in the data area the descriptors point at (headers, segments).
        let mut junk = vec![0u8; 4096];
        for b in junk.iter_mut() {
            *b = r.next() as u8;
        }
        if r.below(2) == 0 {
            junk[0] = r.below(16) as u8; // often a valid request type
        }
        d.mem
            .write_slice(&junk, GuestAddress((HEAP + r.below(1 << 20)) & !7))
            .unwrap();
        let descs: Vec<Desc> = (0..qsize).map(|_| random_desc(&mut r, qsize)).collect();
        d.write_descs(0, &descs).unwrap();
        for _ in 0..r.below(u64::from(qsize) + 1) {
            let head = if r.below(8) == 0 {
                r.next() as u16
            } else {
                r.below(u64::from(qsize)) as u16
            };
            d.push_avail(0, head).unwrap();
        }
        if r.below(10) == 0 {
            d.set_avail_idx(0, r.next() as u16).unwrap();
            d.notify(0);
        } else {
            d.publish(0).unwrap();
        }
        settle(&d);
        // Random register traffic, including config space and bogus sizes.
        for _ in 0..r.below(4) {
            let off = r.below(0x200);
            let mut b = vec![0u8; [1, 2, 4, 8][r.below(4) as usize]];
            if r.below(2) == 0 {
                rig.transport.read(off, &mut b);
            } else if off != 0x70 {
                b.iter_mut().for_each(|x| *x = r.next() as u8);
                rig.transport.write(off, &b);
            }
        }
        // Reset and check the device still serves a good request.
        d.w(0x70, 0);
        let mut d = rig.driver(1, 16);
        good(&mut d);
        let _ = round;
    }
}

#[test]
fn random_blk_chains() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&vec![0x33; 64 * 512]).unwrap();
    let path = f.path().to_path_buf();
    fuzz_device(
        &|| {
            Box::new(
                Block::new(&BlockConfig {
                    path: path.clone(),
                    ..Default::default()
                })
                .unwrap(),
            )
        },
        0x9e37_79b9_7f4a_7c15,
        150,
        &|d| {
            let buf = d.alloc(512);
            good_read(d, buf, 512);
        },
    );
}

#[test]
fn random_rng_chains() {
    fuzz_device(&|| Box::new(Rng::new()), 0x1234_5678_9abc_def1, 150, &|d| {
        let buf = d.alloc(64);
        d.mem.write_slice(&[0u8; 64], buf).unwrap();
        d.submit(0, &[(buf, 64, true)]).unwrap();
        let (_, len) = d.wait_used(0, Duration::from_secs(5)).expect("rng served");
        assert_eq!(len, 64);
        let mut got = [0u8; 64];
        d.mem.read_slice(&mut got, buf).unwrap();
        assert!(got.iter().any(|&b| b != 0), "random bytes delivered");
    });
}

/// Random bytes through `MmioDriver::feed_raw`, the same path the cargo-fuzz targets take.
fn feed_random(
    make: &dyn Fn() -> Box<dyn VirtioDevice>,
    nqueues: u32,
    q: usize,
    seed: u64,
    rounds: usize,
) {
    let mut r = XorShift(seed);
    let rig = Rig::new(make());
    for _ in 0..rounds {
        let size = 1u16 << (1 + r.below(6));
        let mut d = MmioDriver::init(
            &*rig.transport,
            rig.mem.clone(),
            nqueues,
            size,
            common::RINGS,
            HEAP,
            u64::MAX,
        )
        .expect("driver init");
        let data: Vec<u8> = (0..r.below(4096)).map(|_| r.next() as u8).collect();
        d.feed_raw(q, &data, MEM_SIZE as u64).unwrap();
        assert!(d.settle(q, Duration::from_secs(5)), "device hung");
        d.w(0x70, 0);
    }
}

#[test]
fn random_vsock_packets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    feed_random(
        &|| {
            Box::new(corefour_devices::virtio::vsock::Vsock::new(
                corefour_devices::virtio::vsock::VsockConfig {
                    cid: 3,
                    uds_path: path.clone(),
                },
            ))
        },
        3,
        1,
        0xfeed_f00d_dead_beef,
        100,
    );
}

#[test]
fn random_balloon_pfns() {
    feed_random(
        &|| Box::new(corefour_devices::virtio::balloon::Balloon::new(0, None)),
        3,
        0,
        0x0bad_cafe_1234_5678,
        100,
    );
}

/// As `random_blk_chains` on an O_DIRECT disk, where reads and writes go through io_uring:
/// hostile chains (heads offered twice while in flight, buffers outside memory, odd lengths)
/// reach the engine between resets, which must drain what it submitted.
#[test]
fn random_blk_chains_through_io_uring() {
    let f = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
    f.as_file().set_len(64 * 512).unwrap();
    let path = f.path().to_path_buf();
    let open = || {
        Block::new(&BlockConfig {
            path: path.clone(),
            direct: true,
            ..Default::default()
        })
    };
    match open() {
        Err(e) => return eprintln!("SKIP: O_DIRECT not supported on /var/tmp: {e}"),
        Ok(b) if b.io_engine() != blk::IoEngine::Uring => {
            return eprintln!("SKIP: io_uring unavailable here");
        }
        Ok(_) => {}
    }
    fuzz_device(
        &|| Box::new(open().unwrap()),
        0x51f1_5eed_c0ff_ee00,
        150,
        &|d| {
            let buf = GuestAddress((d.alloc(8192).0 + 4095) & !4095);
            good_read(d, buf, 4096);
        },
    );
}

/// A well-formed read of `len` bytes of sector 2 into `buf` after the hostile chains: it is
/// served whole, with an OK status.
fn good_read(d: &mut MmioDriver, buf: GuestAddress, len: u32) {
    let h = common::blk_header(d, blk::T_IN, 2);
    let st = d.alloc(1);
    d.submit(0, &[(h, 16, false), (buf, len, true), (st, 1, true)])
        .unwrap();
    let (_, used) = d
        .wait_used(0, Duration::from_secs(5))
        .expect("good request served");
    assert_eq!(used, len + 1);
    assert_eq!(d.mem.read_obj::<u8>(st).unwrap(), blk::S_OK);
}
