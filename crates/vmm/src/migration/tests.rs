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
        })
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
        serde_json::json!({"memory_pages": PAGES})
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
        inc.ready().map_err(|e| e.to_string())?;
        let state = inc.receive_memory(&regions).map_err(|e| e.to_string())?;
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
        inc.receive_memory(&regions).map(|_| ())
    });
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    let hello = p::Hello {
        version: p::PROTOCOL_VERSION,
        config: serde_json::json!({}),
        regions: layout(&[(0, 4 * PAGE_SIZE)]).unwrap(),
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
