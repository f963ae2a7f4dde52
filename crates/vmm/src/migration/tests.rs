//! The migration engine against a fake VM: anonymous memory that a thread keeps writing, with
//! its own dirty bitmap, over a real TCP connection on loopback.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::snapshot::dirty::PAGE_SIZE;
use crate::snapshot::memfile::{layout, HostRegion};

struct Anon {
    ptr: usize,
    len: usize,
}
impl Anon {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh anonymous mapping, checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Self {
            ptr: p as usize,
            len,
        }
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: our live mapping.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}
impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

const PAGES: usize = 2048;

/// A "guest" thread writing pages round-robin with a stride, tracking dirty bits itself.
struct FakeVm {
    mem: Anon,
    bitmap: Vec<AtomicU64>,
    logging: AtomicBool,
    pause: AtomicBool,
    parked: AtomicBool,
    stop: AtomicBool,
    pauses: AtomicUsize,
    resumes: AtomicUsize,
    /// A disk the "guest" writes too, as a virtio-blk backend would: write, then mark.
    disk: Option<(std::fs::File, std::path::PathBuf)>,
}

impl FakeVm {
    fn new() -> Arc<Self> {
        let mem = Anon::new(PAGES * PAGE_SIZE as usize);
        // Some initial content, some zero pages.
        for pg in (0..PAGES).step_by(3) {
            // SAFETY: inside our mapping.
            unsafe { *((mem.ptr + pg * 4096) as *mut u64) = pg as u64 + 1 };
        }
        Arc::new(Self {
            mem,
            bitmap: (0..PAGES / 64).map(|_| AtomicU64::new(0)).collect(),
            logging: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            pauses: AtomicUsize::new(0),
            resumes: AtomicUsize::new(0),
            disk: None,
        })
    }

    fn with_disk(path: &std::path::Path) -> Arc<Self> {
        let mut vm = Arc::into_inner(Self::new()).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let size = f.metadata().unwrap().len();
        corefour_devices::virtio::blk_dirty::register(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            path,
            size,
            None,
        );
        vm.disk = Some((f, path.to_path_buf()));
        Arc::new(vm)
    }

    fn guest(self: Arc<Self>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !self.stop.load(Ordering::Acquire) {
                if self.pause.load(Ordering::Acquire) {
                    self.parked.store(true, Ordering::Release);
                    std::thread::yield_now();
                    continue;
                }
                self.parked.store(false, Ordering::Release);
                let pg = ((n * 7919) % 256) as usize; // a 256-page working set
                                                      // SAFETY: inside our mapping; the test reads it only while we are parked.
                unsafe { std::ptr::write_volatile((self.mem.ptr + pg * 4096 + 8) as *mut u64, n) };
                self.bitmap[pg / 64].fetch_or(1 << (pg % 64), Ordering::AcqRel);
                if let Some((f, _)) = &self.disk {
                    use std::os::unix::fs::FileExt;
                    let size = f.metadata().unwrap().len();
                    let off = (n * 7919 * 512) % (size / 2 - 512); // the upper half stays a hole
                    f.write_all_at(&n.to_le_bytes().repeat(64), off).unwrap();
                    corefour_devices::virtio::blk_dirty::mark(
                        std::os::fd::AsRawFd::as_raw_fd(f),
                        off,
                        512,
                    );
                }
                n += 1;
                if n & 63 == 0 {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        })
    }
}

impl MigrationSource for FakeVm {
    fn regions(&self) -> Vec<HostRegion> {
        let l = layout(&[(0, (PAGES as u64) * PAGE_SIZE)]).unwrap();
        vec![HostRegion {
            region: l[0],
            host_addr: self.mem.ptr,
        }]
    }
    fn config(&self) -> serde_json::Value {
        match &self.disk {
            Some((_, p)) => serde_json::json!({
                "kernel": "/k", "vcpus": 1, "memory_mib": 64, "disks": [{"path": p}]
            }),
            None => serde_json::json!({"memory_pages": PAGES}),
        }
    }
    fn start_dirty_log(&self) -> Result<(), String> {
        self.logging.store(true, Ordering::Release);
        Ok(())
    }
    fn take_dirty(&self, _index: usize) -> Result<Vec<u64>, String> {
        Ok(self
            .bitmap
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect())
    }
    fn stop_dirty_log(&self) {
        self.logging.store(false, Ordering::Release);
    }
    fn pause(&self) -> Result<(), String> {
        self.pauses.fetch_add(1, Ordering::AcqRel);
        self.pause.store(true, Ordering::Release);
        while !self.parked.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        Ok(())
    }
    fn resume(&self) -> Result<(), String> {
        self.resumes.fetch_add(1, Ordering::AcqRel);
        self.pause.store(false, Ordering::Release);
        Ok(())
    }
    fn state(&self) -> Result<Vec<u8>, String> {
        Ok(b"vcpu-and-device-state".to_vec())
    }
}

enum TargetMode {
    Accept,
    Refuse,
    /// Drop the connection after this many page messages' worth of reading.
    CutAfterHello,
    NeverCommit,
}

fn target(
    listener: TcpListener,
    mode: TargetMode,
) -> std::thread::JoinHandle<Result<Anon, String>> {
    target_with_disks(listener, mode, None)
}

/// A target; with `disks` (this side's config) the mirrored disks go into its disks.
fn target_with_disks(
    listener: TcpListener,
    mode: TargetMode,
    disks: Option<crate::config::VmConfig>,
) -> std::thread::JoinHandle<Result<Anon, String>> {
    std::thread::spawn(move || {
        let (mut inc, hello) =
            Incoming::accept(&listener, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        match mode {
            TargetMode::Refuse => {
                inc.refuse("no room for 8 MiB here");
                return Err("refused".into());
            }
            TargetMode::CutAfterHello => {
                inc.ready().map_err(|e| e.to_string())?;
                return Err("cut".into());
            }
            _ => {}
        }
        let mem = Anon::new(hello.regions[0].size as usize);
        let regions = vec![HostRegion {
            region: hello.regions[0],
            host_addr: mem.ptr,
        }];
        let mut sink = match &disks {
            Some(c) => match disks::DiskSink::open(&hello.disks, c) {
                Ok(s) => s,
                Err(e) => {
                    inc.refuse(&e);
                    return Err(e);
                }
            },
            None => Default::default(),
        };
        inc.ready().map_err(|e| e.to_string())?;
        let state = inc
            .receive_memory(&regions, &mut sink)
            .map_err(|e| e.to_string())?;
        sink.flush()?;
        assert_eq!(state, b"vcpu-and-device-state");
        if matches!(mode, TargetMode::NeverCommit) {
            // Loaded, then the link dies before LOADED reaches the source.
            return Err("dropped".into());
        }
        inc.loaded_wait_commit().map_err(|e| e.to_string())?;
        inc.started().map_err(|e| e.to_string())?;
        Ok(mem)
    })
}

fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap().to_string();
    (l, a)
}

#[test]
fn migrates_a_busy_guest_and_memory_matches() {
    let vm = FakeVm::new();
    let g = vm.clone().guest();
    let (l, addr) = listener();
    let t = target(l, TargetMode::Accept);
    let params = SendParams {
        max_downtime: Duration::from_millis(10),
        max_rounds: 10,
        io_timeout: Duration::from_secs(5),
        copy_storage: false,
        token: None,
    };
    let report = migrate(vm.as_ref(), &addr, &params).unwrap();
    // The source stays paused after a successful migration.
    assert_eq!(vm.pauses.load(Ordering::Acquire), 1);
    assert_eq!(vm.resumes.load(Ordering::Acquire), 0);
    let mem = t.join().unwrap().unwrap();
    assert!(
        mem.bytes() == vm.mem.bytes(),
        "target memory equals the paused source's"
    );
    assert!(report.zero_pages_skipped > 0);
    assert!(report.pages_per_round.len() >= 2);
    assert!(report.downtime_ms > 0.0 && report.downtime_ms <= report.total_ms);
    vm.stop.store(true, Ordering::Release);
    vm.pause.store(false, Ordering::Release);
    g.join().unwrap();
}

#[test]
fn failures_before_commit_leave_the_source_running() {
    for mode in [
        TargetMode::Refuse,
        TargetMode::CutAfterHello,
        TargetMode::NeverCommit,
    ] {
        let vm = FakeVm::new();
        let g = vm.clone().guest();
        let (l, addr) = listener();
        let t = target(l, mode);
        let params = SendParams {
            io_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        let err = migrate(vm.as_ref(), &addr, &params).unwrap_err();
        assert!(matches!(err, SendError::Failed(_)), "{err}");
        assert_eq!(
            vm.pauses.load(Ordering::Acquire),
            vm.resumes.load(Ordering::Acquire),
            "every pause was undone: {err}"
        );
        assert!(!vm.pause.load(Ordering::Acquire));
        assert!(t.join().unwrap().is_err());
        vm.stop.store(true, Ordering::Release);
        g.join().unwrap();
    }
    let vm = FakeVm::new();
    let err = migrate(vm.as_ref(), "127.0.0.1:1", &SendParams::default()).unwrap_err();
    assert!(matches!(err, SendError::Connect { .. }), "{err}");
}

#[test]
fn a_hostile_source_cannot_write_outside_guest_memory() {
    use super::protocol as p;
    use std::io::Write;
    let (l, addr) = listener();
    let t = std::thread::spawn(move || {
        let (mut inc, hello) = Incoming::accept(&l, Duration::from_secs(5)).unwrap();
        let mem = Anon::new(hello.regions[0].size as usize);
        let regions = vec![HostRegion {
            region: hello.regions[0],
            host_addr: mem.ptr,
        }];
        inc.ready().unwrap();
        inc.receive_memory(&regions, &mut Default::default())
            .map(|_| ())
    });
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    let hello = p::Hello {
        version: p::PROTOCOL_VERSION,
        config: serde_json::json!({}),
        regions: layout(&[(0, 4 * PAGE_SIZE)]).unwrap(),
        disks: Vec::new(),
        token: None,
    };
    p::send_json(&mut s, p::TAG_HELLO, &hello).unwrap();
    p::expect(&mut s, p::TAG_READY, "READY").unwrap();
    let mut body = p::pages_head(0, 3, 2).to_vec();
    body.extend_from_slice(&[1u8; 2 * 4096]);
    p::send(&mut s, p::TAG_PAGES, &body).unwrap();
    s.flush().unwrap();
    let err = t.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("do not fit"), "{err}");
}

#[test]
fn localize_takes_this_hosts_disk_paths_and_taps_and_refuses_other_devices() {
    use crate::config::VmConfig;
    let parse = |v: serde_json::Value| -> VmConfig { serde_json::from_value(v).unwrap() };
    let mut src = parse(serde_json::json!({
        "kernel": "/k", "vcpus": 1, "memory_mib": 64,
        "disks": [{"path": "/a/root.raw"}, {"path": "/shared/ro.raw", "read_only": true}],
        "nets": [{"tap": "c4t0", "mac": "02:00:00:00:00:01"}]
    }));
    let local = parse(serde_json::json!({
        "kernel": "/k", "vcpus": 1, "memory_mib": 64,
        "disks": [{"path": "/b/vms/v/disks/0-root.raw"}, {"path": "/shared/ro.raw", "read_only": true}],
        "nets": [{"tap": "c4t9", "mac": "02:00:00:00:00:01"}]
    }));
    incoming::localize(&mut src, &local).unwrap();
    assert_eq!(src.disks[0].path, local.disks[0].path);
    assert_eq!(src.nets[0].tap, "c4t9");
    assert_eq!(src, local);

    let mut other_mac = local.clone();
    other_mac.nets[0].mac = Some("02:00:00:00:00:02".into());
    let err = incoming::localize(&mut src.clone(), &other_mac).unwrap_err();
    assert!(err.contains("MAC differs"), "{err}");
    let mut fewer = local.clone();
    fewer.disks.pop();
    let err = incoming::localize(&mut src, &fewer).unwrap_err();
    assert!(err.contains("2 disks"), "{err}");
}

#[test]
fn mirrors_a_disk_the_guest_writes_during_the_migration() {
    let dir = scratch("mirror");
    let (a, b) = (dir.join("src.raw"), dir.join("dst.raw"));
    let size = 4u64 << 20;
    let mut data = vec![0u8; size as usize];
    data[..1 << 20].fill(0x5a); // data the first pass must carry; the rest is a hole
    std::fs::write(&a, &data).unwrap();
    let f = std::fs::File::create(&b).unwrap();
    f.set_len(size).unwrap();
    // The target's "device" registers its copy, as the incoming VMM's blk device would.
    corefour_devices::virtio::blk_dirty::register(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        &b,
        size,
        None,
    );
    let vm = FakeVm::with_disk(&a);
    let g = vm.clone().guest();
    std::thread::sleep(Duration::from_millis(20));
    let (l, addr) = listener();
    let local: crate::config::VmConfig = serde_json::from_value(serde_json::json!({
        "kernel": "/k", "vcpus": 1, "memory_mib": 64, "disks": [{"path": b}]
    }))
    .unwrap();
    let t = target_with_disks(l, TargetMode::Accept, Some(local));
    let params = SendParams {
        max_downtime: Duration::from_millis(10),
        max_rounds: 10,
        io_timeout: Duration::from_secs(5),
        copy_storage: true,
        token: None,
    };
    let report = migrate(vm.as_ref(), &addr, &params).unwrap();
    t.join().unwrap().unwrap();
    let d = report.disks.unwrap();
    assert_eq!((d.disks, d.bytes), (1, size));
    // The hole stayed behind in the first pass.
    assert!(d.first_pass_bytes <= 2 << 20, "{d:?}");
    assert!(!d.chunks_per_round.is_empty(), "{d:?}");
    // The source is paused: its disk is final, and the copy equals it.
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
    assert!(
        std::fs::read(&a).unwrap() != data,
        "the guest wrote meanwhile"
    );
    let tracked = corefour_devices::virtio::blk_dirty::find(&a).unwrap();
    assert!(!tracked.tracking(), "the dirty map is released");
    vm.stop.store(true, Ordering::Release);
    vm.pause.store(false, Ordering::Release);
    g.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_refused_disk_mirror_leaves_the_source_running_and_its_disk_untouched() {
    let dir = scratch("refused");
    let (a, b) = (dir.join("s2.raw"), dir.join("d2.raw"));
    std::fs::write(&a, vec![3u8; 1 << 20]).unwrap();
    // The target's copy has the wrong size: refused before any byte moves.
    let f = std::fs::File::create(&b).unwrap();
    f.set_len(2 << 20).unwrap();
    corefour_devices::virtio::blk_dirty::register(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        &b,
        2 << 20,
        None,
    );
    // No guest thread: the disk must stay exactly as it was.
    let vm = FakeVm::with_disk(&a);
    let (l, addr) = listener();
    let local: crate::config::VmConfig = serde_json::from_value(serde_json::json!({
        "kernel": "/k", "vcpus": 1, "memory_mib": 64, "disks": [{"path": b}]
    }))
    .unwrap();
    let t = target_with_disks(l, TargetMode::Accept, Some(local));
    let params = SendParams {
        copy_storage: true,
        ..Default::default()
    };
    let err = migrate(vm.as_ref(), &addr, &params).unwrap_err();
    let why = t.join().unwrap().err().unwrap();
    assert!(why.contains("bytes here"), "{why}");
    assert!(matches!(err, SendError::Failed(_)), "{err}");
    assert_eq!(vm.pauses.load(Ordering::Acquire), 0);
    assert!(!corefour_devices::virtio::blk_dirty::find(&a)
        .unwrap()
        .tracking());
    assert_eq!(std::fs::read(&a).unwrap(), vec![3u8; 1 << 20]);
    let _ = std::fs::remove_dir_all(&dir);
}

fn scratch(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("c4mig-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn an_incoming_vmm_with_a_token_takes_only_the_source_that_has_it() {
    use super::protocol as p;
    let (l, addr) = listener();
    drop(l);
    let a2 = addr.clone();
    // The receiving side: only the HELLO matters here; a real VM config is not needed to see
    // the token check (the config is refused after it, with a reason).
    let t = std::thread::spawn(move || {
        incoming::receive(
            &a2,
            corefour_devices::Console::new(Box::new(std::io::sink())),
            Duration::from_secs(5),
            None,
            Some("the-token"),
        )
        .err()
        .map(|e| e.to_string())
    });
    let hello = |token: Option<&str>| p::Hello {
        version: p::PROTOCOL_VERSION,
        config: serde_json::json!({"bogus": true}),
        regions: layout(&[(0, 4 * PAGE_SIZE)]).unwrap(),
        disks: Vec::new(),
        token: token.map(Into::into),
    };
    let connect = || loop {
        if let Ok(s) = std::net::TcpStream::connect(&addr) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    for wrong in [None, Some("not-the-token")] {
        let mut s = connect();
        p::send_json(&mut s, p::TAG_HELLO, &hello(wrong)).unwrap();
        let err = p::expect(&mut s, p::TAG_READY, "READY").unwrap_err();
        assert!(err.to_string().contains("token differs"), "{err}");
    }
    // The right one gets past the token check (and is refused for its bogus config).
    let mut s = connect();
    p::send_json(&mut s, p::TAG_HELLO, &hello(Some("the-token"))).unwrap();
    let err = p::expect(&mut s, p::TAG_READY, "READY").unwrap_err();
    assert!(err.to_string().contains("VM config"), "{err}");
    assert!(t.join().unwrap().unwrap().contains("VM config"));
}

#[test]
fn a_hostile_source_cannot_write_outside_the_announced_disks() {
    use super::protocol as p;
    let dir = scratch("hostile-disk");
    let b = dir.join("dst.raw");
    let f = std::fs::File::create(&b).unwrap();
    f.set_len(1 << 20).unwrap();
    corefour_devices::virtio::blk_dirty::register(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        &b,
        1 << 20,
        None,
    );
    let local: crate::config::VmConfig = serde_json::from_value(serde_json::json!({
        "kernel": "/k", "vcpus": 1, "memory_mib": 64, "disks": [{"path": b}]
    }))
    .unwrap();
    let announced = [disks::DiskHello {
        index: 0,
        size: 1 << 20,
    }];
    let frame = |disk: u32, off: u64, len: u64, claimed: u64| {
        let mut v = Vec::new();
        let body_len = (p::PAGES_HEAD as u64) + claimed;
        v.extend_from_slice(&p::pages_head(disk, off, len));
        v.extend(std::iter::repeat_n(7u8, claimed as usize));
        (v, body_len)
    };
    for (disk, off, len, claimed, why) in [
        (1, 0, 512, 512, "not announced"),
        (0, (1 << 20) - 256, 512, 512, "outside"),
        (0, u64::MAX - 10, 512, 512, "outside"),
        (0, 0, 512, 100, "do not match"),
        (0, 0, 2 << 20, 2 << 20, "exceed"),
    ] {
        let mut sink = disks::DiskSink::open(&announced, &local).unwrap();
        let (body, body_len) = frame(disk, off, len, claimed);
        let err = sink
            .receive(&mut body.as_slice(), body_len)
            .unwrap_err()
            .to_string();
        assert!(err.contains(why), "{why}: {err}");
    }
    // Announcing a disk this VM lacks, or of another size, is refused up front.
    let wrong = [disks::DiskHello {
        index: 0,
        size: 2 << 20,
    }];
    assert!(disks::DiskSink::open(&wrong, &local).is_err());
    let missing = [disks::DiskHello {
        index: 3,
        size: 1 << 20,
    }];
    assert!(disks::DiskSink::open(&missing, &local).is_err());
    assert_eq!(std::fs::read(&b).unwrap(), vec![0u8; 1 << 20]);
    let _ = std::fs::remove_dir_all(&dir);
}
