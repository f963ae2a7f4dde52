//! `corefour bench io`: the virtio device paths against the same I/O done directly on the host,
//! measured in the same run.
//!
//! virtio-blk: a driver in this process (corefour_devices::virtio::driver, the same one the
//! device tests use) puts requests on the ring of a real virtio-blk device behind the
//! virtio-mmio transport; the device's worker thread serves them from the file. The peer does
//! the same reads and writes with pread/pwrite on the same file. Both go through the host page
//! cache. No vCPU is involved: this measures the device model, not guest exits. The device
//! serves buffered reads of the raw file from a shared mapping of it (`virtio::blk_map`), the
//! peer with pread: the table's footnote says so. The device's interrupt costs it an eventfd
//! write, as KVM's irqfd would (`driver::IrqfdLine`), and the driver sleeps on that eventfd.
//!
//! virtio-net: frames from the driver's TX ring through the tap into a UDP socket in a network
//! namespace, against the same frames written into one end of a veth pair (AF_PACKET) and
//! received by a UDP socket in another namespace.

use std::fs::{File, OpenOptions};
use std::io::IsTerminal;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use corefour_devices::virtio::blk::{self, Block, BlockConfig};
use corefour_devices::virtio::driver::{IrqfdLine, MmioDriver};
use corefour_devices::virtio::MmioTransport;
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(clap::Args)]
pub struct Args {
    /// Size of the test disk file in MiB.
    #[arg(long, default_value_t = 256)]
    size_mb: u64,
    /// Directory for the test disk file (a real file system, not tmpfs, for honest numbers).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Requests kept in flight on the virtio queue.
    #[arg(long, default_value_t = 32)]
    queue_depth: usize,
    /// Random 4 KiB operations per random test.
    #[arg(long, default_value_t = 40_000)]
    random_ops: u64,
    /// Random 4 KiB operations per random test with O_DIRECT (each waits for the disk).
    #[arg(long, default_value_t = 4_000)]
    direct_random_ops: u64,
    /// Skip the network part (it needs root, tun and `ip`).
    #[arg(long)]
    no_net: bool,
    /// Also print the CPU time (all threads) per operation of each run and the device's
    /// interrupts per operation: the cost that sets the pace on a loaded host.
    #[arg(long)]
    cpu: bool,
    /// Run only the blk tests whose name contains this text (e.g. "rand read 4K buffered").
    #[arg(long, value_name = "TEXT")]
    only: Option<String>,
    /// Print results as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
pub(super) struct Row {
    pub(super) test: String,
    /// Bytes per second through the virtio device.
    pub(super) virtio_bps: f64,
    pub(super) virtio_iops: f64,
    /// Bytes per second of the peer (host file I/O or veth).
    pub(super) peer_bps: f64,
    pub(super) peer_iops: f64,
    pub(super) ratio: f64,
    pub(super) peer: String,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    if args.size_mb < 8 {
        bail!("--size-mb must be at least 8");
    }
    let mut rows = blk_bench(&args)?;
    if !args.no_net {
        match super::io_net::net_bench(&progress) {
            Ok(mut r) => rows.append(&mut r),
            Err(e) => eprintln!("corefour: net part skipped: {e:#}"),
        }
    }
    let text = if args.json {
        serde_json::to_string_pretty(&rows)? + "\n"
    } else {
        table(&rows, args.queue_depth)
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
    Ok(0)
}

pub(super) fn progress(msg: &str) {
    if std::io::stderr().is_terminal() {
        eprintln!("… {msg}");
    }
}

fn table(rows: &[Row], qd: usize) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<32} {:>12} {:>10} {:>12} {:>10} {:>7}  peer",
        "test", "virtio MB/s", "kIOPS", "peer MB/s", "kIOPS", "ratio"
    );
    for r in rows {
        let _ = writeln!(
            t,
            "{:<32} {:>12.1} {:>10.1} {:>12.1} {:>10.1} {:>6.2}x  {}",
            r.test,
            r.virtio_bps / 1e6,
            r.virtio_iops / 1e3,
            r.peer_bps / 1e6,
            r.peer_iops / 1e3,
            r.ratio,
            r.peer
        );
    }
    let _ = writeln!(
        t,
        "(virtio-blk: in-process driver, queue depth {qd}; `buffered` through the host page cache on both sides, `direct` with O_DIRECT on both; goal >= 0.90x)"
    );
    let _ = writeln!(
        t,
        "(the device serves buffered reads by copying from a read-only shared mapping of the raw file, no system call on a page-cache hit; `pread` rows: the same device with the mapping off; its writes, and all direct I/O, use pwrite/pread; the peer always uses pread/pwrite)"
    );
    t
}

#[derive(Clone, Copy)]
enum Pattern {
    SeqRead,
    SeqWrite,
    RandRead,
    RandWrite,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::SeqRead => "blk seq read 128K",
            Pattern::SeqWrite => "blk seq write 128K",
            Pattern::RandRead => "blk rand read 4K",
            Pattern::RandWrite => "blk rand write 4K",
        }
    }
    fn block(self) -> u64 {
        match self {
            Pattern::SeqRead | Pattern::SeqWrite => 128 << 10,
            _ => 4 << 10,
        }
    }
    fn write(self) -> bool {
        matches!(self, Pattern::SeqWrite | Pattern::RandWrite)
    }
    /// The offsets to touch, the same list for device and host.
    fn offsets(self, size: u64, random_ops: u64) -> Vec<u64> {
        let bs = self.block();
        match self {
            Pattern::SeqRead | Pattern::SeqWrite => (0..size / bs).map(|i| i * bs).collect(),
            _ => {
                let mut x: u64 = 0x2545_f491_4f6c_dd1d;
                (0..random_ops)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (x % (size / bs)) * bs
                    })
                    .collect()
            }
        }
    }
}

struct TempDisk(PathBuf);
impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn blk_bench(args: &Args) -> anyhow::Result<Vec<Row>> {
    let size = args.size_mb << 20;
    let path = args
        .dir
        .join(format!("corefour-bench-io-{}.img", std::process::id()));
    let disk = TempDisk(path.clone());
    progress(&format!(
        "writing a {} MiB test disk at {}",
        args.size_mb,
        path.display()
    ));
    {
        let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let chunk = vec![0x5au8; 1 << 20];
        for i in 0..args.size_mb {
            f.write_all_at(&chunk, i << 20)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        f.sync_all()?;
    }
    let mut rows = Vec::new();
    // Buffered reads run twice: as the device serves them (from its mapping of the file) and
    // with the mapping off (pread, as the peer), so the table shows what each path gives.
    let mut runs = Vec::new();
    for direct in [false, true] {
        for p in [
            Pattern::SeqRead,
            Pattern::SeqWrite,
            Pattern::RandRead,
            Pattern::RandWrite,
        ] {
            runs.push((direct, p, true));
            if !direct && !p.write() {
                runs.push((direct, p, false));
            }
        }
    }
    for (direct, p, map) in runs {
        let mode = if direct { "direct" } else { "buffered" };
        let name = format!("{} {mode}{}", p.name(), if map { "" } else { " pread" });
        if args
            .only
            .as_ref()
            .is_some_and(|o| !name.contains(o.as_str()))
        {
            continue;
        }
        progress(&name);
        let ops = if direct {
            args.direct_random_ops
        } else {
            args.random_ops
        };
        let offsets = p.offsets(size, ops);
        // Host and device take turns, three times each, and each keeps its best time: a
        // burst of load on this shared machine then hits both sides, not one.
        let mut host = Duration::MAX;
        let mut dev = Duration::MAX;
        for _ in 0..3 {
            let c0 = cpu_time();
            host = host.min(host_run(&path, p, &offsets, args.queue_depth, direct)?);
            let c1 = cpu_time();
            let (t, irqs) = device_run(&path, p, &offsets, args.queue_depth, direct, map)?;
            dev = dev.min(t);
            let c2 = cpu_time();
            if args.cpu {
                let n = offsets.len() as f64;
                eprintln!(
                    "{name}: CPU per op: host {:.2} us, virtio {:.2} us; interrupts per op {:.3}",
                    (c1 - c0) * 1e6 / n,
                    (c2 - c1) * 1e6 / n,
                    irqs as f64 / n
                );
            }
        }
        let bytes = offsets.len() as f64 * p.block() as f64;
        let n = offsets.len() as f64;
        rows.push(Row {
            test: name,
            virtio_bps: bytes / dev.as_secs_f64(),
            virtio_iops: n / dev.as_secs_f64(),
            peer_bps: bytes / host.as_secs_f64(),
            peer_iops: n / host.as_secs_f64(),
            ratio: host.as_secs_f64() / dev.as_secs_f64(),
            peer: format!("host pread/pwrite, same file, {mode}"),
        });
    }
    drop(disk);
    Ok(rows)
}

/// CPU seconds this process has used (all threads).
fn cpu_time() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(r.ru_utime) + tv(r.ru_stime)
}

/// A page-aligned host buffer (O_DIRECT needs aligned memory).
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> anyhow::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096)?;
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            bail!("cannot allocate {len} bytes");
        }
        Ok(Self { ptr, layout })
    }
    fn slice(&mut self, at: usize, len: usize) -> &mut [u8] {
        assert!(at + len <= self.layout.size());
        // SAFETY: in bounds of our allocation (checked above), uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

fn host_run(
    path: &Path,
    p: Pattern,
    offsets: &[u64],
    qd: usize,
    direct: bool,
) -> anyhow::Result<Duration> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .with_context(|| format!("opening {} (direct: {direct})", path.display()))?;
    // Dirty pages from the previous run are written back before the clock starts.
    f.sync_all()?;
    // As many buffers as the device path has in flight, used in turn: the same memory
    // footprint (and cache behaviour) as the guest buffers.
    let bs = p.block() as usize;
    let qd = qd.clamp(1, 64);
    let mut bufs = AlignedBuf::new(bs * qd)?;
    let t = Instant::now();
    for (i, &off) in offsets.iter().enumerate() {
        let b = bufs.slice((i % qd) * bs, bs);
        if p.write() {
            f.write_all_at(b, off)?;
        } else {
            f.read_exact_at(b, off)?;
        }
    }
    Ok(t.elapsed())
}

/// How long the driver polls for an interrupt before it sleeps. KVM polls a halted vCPU up to
/// halt_poll_ns, but on a host with more runnable threads than cores (this bench's usual
/// setting) a polling driver takes the CPU from the device it waits for: 0.3-0.45x instead of
/// 0.6-1.1x on rand read 4K buffered at load 8 on 2 cores. So it sleeps at once.
const HALT_POLL: Duration = Duration::ZERO;

fn device_run(
    path: &Path,
    p: Pattern,
    offsets: &[u64],
    qd: usize,
    direct: bool,
    map: bool,
) -> anyhow::Result<(Duration, u64)> {
    let bs = p.block();
    let qd = qd.clamp(1, 64);
    const HDRS: u64 = 0x10_0000;
    const STATUS: u64 = 0x11_0000;
    const DATA: u64 = 0x20_0000;
    let mem_size = (DATA + qd as u64 * bs + 0xfff) & !0xfff;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size as usize)])
        .context("allocating guest memory")?;
    // A running guest's buffers are resident; fault them in before the clock starts.
    mem.write_slice(
        &vec![0u8; (qd.clamp(1, 64) as u64 * bs) as usize],
        GuestAddress(DATA),
    )?;
    File::open(path)?.sync_all()?;
    let irq = Arc::new(IrqfdLine::new().context("creating the interrupt eventfd")?);
    let dev = Block::new(&BlockConfig {
        path: path.to_path_buf(),
        direct,
        ..Default::default()
    })?;
    let dev = if map { dev } else { dev.unmapped() };
    let t = MmioTransport::new(Box::new(dev), mem.clone(), irq.clone())?;
    let d = MmioDriver::init(&t, mem, 1, 256, 0x1000, DATA, u64::MAX)
        .map_err(|e| anyhow::anyhow!("virtio-blk driver init: {e}"))?;
    let mut ring = GuestRing::new(&d)?;
    let ty = if p.write() { blk::T_OUT } else { blk::T_IN };
    let hdrs = ring.ptr(HDRS, 16 * qd)?;
    let stats = ring.ptr(STATUS, qd)?;
    // Chain heads are the first descriptor of each 3-descriptor chain: map them back to slots.
    let mut slot_of_head = vec![usize::MAX; 256];
    let mut free: Vec<usize> = (0..qd).rev().collect();
    let mut next = 0usize;
    let mut done = 0usize;
    // Refill in batches, as a loaded guest's block layer does (plugging): one kick (when the
    // device sleeps) and one interrupt per batch rather than per request.
    let batch = (qd / 4).max(1);
    // Eighths of the in-flight requests to wait for before an interrupt (adapted below).
    let mut eighths = 6usize;
    let mut woke = false;
    let start = Instant::now();
    while done < offsets.len() {
        if free.len() >= batch || free.len() == qd {
            let mut queued = false;
            while next < offsets.len() {
                let Some(slot) = free.pop() else { break };
                let mut raw = [0u8; 16];
                raw[0..4].copy_from_slice(&ty.to_le_bytes());
                raw[8..16].copy_from_slice(&(offsets[next] / 512).to_le_bytes());
                // SAFETY: slot < qd, so the 16 bytes lie in the header area resolved above,
                // which the guest memory `d.mem` keeps mapped.
                unsafe { std::ptr::write_volatile(hdrs.add(16 * slot).cast::<[u8; 16]>(), raw) };
                let head = ring.add(&[
                    (HDRS + slot as u64 * 16, 16, false),
                    (DATA + slot as u64 * bs, bs as u32, !p.write()),
                    (STATUS + slot as u64, 1, true),
                ]);
                slot_of_head[usize::from(head)] = slot;
                next += 1;
                queued = true;
            }
            if queued && ring.publish() {
                d.notify(0);
            }
        }
        let pop = |ring: &mut GuestRing, free: &mut Vec<usize>| -> anyhow::Result<usize> {
            let mut got = 0;
            while let Some(id) = ring.pop_used() {
                let slot = slot_of_head[id as usize % 256];
                // SAFETY: slots are < qd: the status area resolved above.
                if unsafe { std::ptr::read_volatile(stats.add(slot)) } != blk::S_OK {
                    bail!("virtio-blk returned an error status during the benchmark");
                }
                free.push(slot);
                got += 1;
            }
            Ok(got)
        };
        let got = pop(&mut ring, &mut free)?;
        done += got;
        if std::mem::take(&mut woke) && next < offsets.len() {
            // Ran dry while this thread woke: ask earlier next time; else later (fewer wake-ups).
            eighths = if next == done {
                (eighths - 1).max(2)
            } else {
                (eighths + 1).min(7)
            };
        }
        if got > 0 {
            continue;
        }
        // Nothing new: sleep until part of what is in flight completed (all of it at the end),
        // asking for one interrupt then (event idx), and look once more in case they completed
        // meanwhile. Each wake-up costs this host ~6 us (eventfd write, poll, two context
        // switches), so the fewer the better, but the device must not run dry while this thread
        // wakes: waiting for most of the queue is best when both threads share a core, 1/4 when
        // each has one (a wake-up across cores takes longer than the last quarter of the
        // queue). The driver adapts between 2/8 and 7/8, as interrupt coalescing does, and
        // always waits at least for a refill batch. (A 6/8 cap, virtqueue_enable_cb_delayed's
        // 3/4, cost 0.97-1.66 us of CPU per rand read 4K at load 6-7; 7/8 0.90-1.01 us.)
        let outstanding = next - done;
        let want = if next < offsets.len() {
            (outstanding * eighths / 8).max(batch.saturating_sub(free.len()))
        } else {
            outstanding
        };
        let want = want.clamp(1, outstanding.max(1));
        let seen = irq.count();
        ring.arm_interrupt_after(u16::try_from(want).unwrap_or(1));
        let got = pop(&mut ring, &mut free)?;
        done += got;
        if got == 0 {
            if irq.wait_past(seen, HALT_POLL, Duration::from_secs(10)) == seen {
                bail!("virtio-blk made no progress for 10 s");
            }
            woke = true;
        }
    }
    Ok((start.elapsed(), irq.count()))
}

/// The driver's side of queue 0 as a guest driver keeps it: plain stores into its ring and
/// buffers, atomics where the device synchronizes. `MmioDriver` does the handshake and the ring
/// layout; going through its vm-memory accessors for every field afterwards would bill the
/// benchmark's "guest" for lookups no guest does.
struct GuestRing {
    mem: GuestMemoryMmap,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    size: u16,
    event_idx: bool,
    next_desc: u16,
    avail_idx: u16,
    published: u16,
    last_used: u16,
}

impl GuestRing {
    fn new(d: &MmioDriver) -> anyhow::Result<Self> {
        let q = d.queues[0];
        let n = usize::from(q.size);
        let mut r = Self {
            mem: d.mem.clone(),
            desc: std::ptr::null_mut(),
            avail: std::ptr::null_mut(),
            used: std::ptr::null_mut(),
            size: q.size,
            event_idx: d.features & corefour_devices::virtio::features::RING_EVENT_IDX != 0,
            next_desc: 0,
            avail_idx: 0,
            published: 0,
            last_used: 0,
        };
        r.desc = r.ptr(q.desc.0, 16 * n)?;
        r.avail = r.ptr(q.avail.0, 6 + 2 * n)?;
        r.used = r.ptr(q.used.0, 6 + 8 * n)?;
        Ok(r)
    }

    /// The host address of `len` bytes of guest memory at `at`, all in one region.
    fn ptr(&self, at: u64, len: usize) -> anyhow::Result<*mut u8> {
        corefour_devices::virtio::chain::host_ptr(&self.mem, GuestAddress(at), len)
            .ok_or_else(|| anyhow::anyhow!("benchmark ring or buffers span memory regions"))
    }

    fn u16_at(&self, p: *mut u8, off: usize) -> &std::sync::atomic::AtomicU16 {
        // SAFETY: every offset passed lies inside a ring area resolved in `new` (kept mapped
        // by `self.mem`) and is even; ring areas are 2-aligned (virtio-queue enforces it).
        unsafe { std::sync::atomic::AtomicU16::from_ptr(p.add(off).cast()) }
    }

    /// Writes a chain into the descriptor table and the avail ring (not yet published).
    fn add(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let slot = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let flags: u16 = if write { 2 } else { 0 } | if i + 1 < bufs.len() { 1 } else { 0 };
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&self.next_desc.to_le_bytes());
            // SAFETY: slot < size: inside the descriptor table resolved in `new`.
            unsafe { std::ptr::write_volatile(self.desc.add(16 * usize::from(slot)).cast(), raw) };
        }
        let at = 4 + 2 * usize::from(self.avail_idx % self.size);
        self.u16_at(self.avail, at)
            .store(head.to_le(), std::sync::atomic::Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        head
    }

    /// Makes the added chains visible; returns whether the device asked to be notified.
    fn publish(&mut self) -> bool {
        use std::sync::atomic::{fence, Ordering};
        let old = self.published;
        self.published = self.avail_idx;
        self.u16_at(self.avail, 2)
            .store(self.avail_idx.to_le(), Ordering::Release);
        fence(Ordering::SeqCst);
        if !self.event_idx {
            return self.u16_at(self.used, 0).load(Ordering::Relaxed) & 1 == 0;
        }
        let n = usize::from(self.size);
        let event = u16::from_le(self.u16_at(self.used, 4 + 8 * n).load(Ordering::Relaxed));
        self.avail_idx.wrapping_sub(event).wrapping_sub(1) < self.avail_idx.wrapping_sub(old)
    }

    /// The head of the next used chain, if any.
    fn pop_used(&mut self) -> Option<u32> {
        use std::sync::atomic::Ordering;
        let idx = u16::from_le(self.u16_at(self.used, 2).load(Ordering::Acquire));
        if idx == self.last_used {
            return None;
        }
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: inside the used ring resolved in `new`; 4-aligned; written by the device
        // before the used index it published (acquire above).
        let id = unsafe { std::ptr::read_volatile(self.used.add(4 + 8 * slot).cast::<u32>()) };
        self.last_used = self.last_used.wrapping_add(1);
        Some(u32::from_le(id))
    }

    /// Asks for an interrupt once `n` more chains are used (used_event).
    fn arm_interrupt_after(&mut self, n: u16) {
        use std::sync::atomic::{fence, Ordering};
        let event = self.last_used.wrapping_add(n.max(1) - 1);
        let at = 4 + 2 * usize::from(self.size);
        self.u16_at(self.avail, at)
            .store(event.to_le(), Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }
}
