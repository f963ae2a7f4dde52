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
//! Host and device take turns in short pieces of each test (`interleaved`), so that the
//! moment-to-moment speed of this shared machine weighs on both alike.
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
    /// Pin threads: the device's worker and the host peer's I/O share one core, the driver
    /// (polling like KVM's halt polling) another. `auto` pins on a quiet machine only (1-minute
    /// load below 3/4 of the CPUs): next to other busy processes pinned threads cannot get
    /// away from them (rand write 4K 0.4x pinned against 1.0x unpinned at load 4 on 2 CPUs).
    #[arg(long, value_enum, default_value_t = Pin::Auto)]
    pin: Pin,
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
    /// Passes over each test's offsets, taken by host and device in interleaved pieces.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Print results as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pin {
    Auto,
    Yes,
    No,
}

/// Whether to pin, for `--pin auto` by the load of the machine when the test starts.
fn pin_threads(pin: Pin) -> bool {
    match pin {
        Pin::Yes => true,
        Pin::No => false,
        Pin::Auto => {
            let load = std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok());
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            load.is_some_and(|l| cpus >= 2 && l < 0.75 * cpus as f64)
        }
    }
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
        "{:<38} {:>12} {:>10} {:>12} {:>10} {:>7}  peer",
        "test", "virtio MB/s", "kIOPS", "peer MB/s", "kIOPS", "ratio"
    );
    for r in rows {
        let _ = writeln!(
            t,
            "{:<38} {:>12.1} {:>10.1} {:>12.1} {:>10.1} {:>6.2}x  {}",
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
        "(each test: host and device take turns in 8 pieces per pass, 3 passes, each side flushing first from its own I/O thread; `pinned`: the device's worker and the host's I/O share one core, the driver (the guest's vCPU) polls on another, as KVM's halt polling; `--pin auto` pins only on a quiet machine)"
    );
    let _ = writeln!(
        t,
        "(the device serves buffered reads by copying from a read-only shared mapping of the raw file, no system call on a page-cache hit; `pread` rows: the same device with the mapping off; its buffered writes use pwrite; its direct I/O goes through io_uring with the whole queue in flight; the peer uses pread/pwrite one call at a time, or in `peer qd` rows io_uring with as many operations in flight as the driver)"
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
            runs.push((direct, p, true, false));
            if !direct && !p.write() {
                runs.push((direct, p, false, false));
            }
            if direct {
                runs.push((direct, p, true, true));
            }
        }
    }
    for (direct, p, map, peer_qd) in runs {
        let mode = if direct { "direct" } else { "buffered" };
        let name = format!(
            "{} {mode}{}{}",
            p.name(),
            if map { "" } else { " pread" },
            if peer_qd { ", peer qd" } else { "" }
        );
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
        let run = Run {
            p,
            direct,
            map,
            peer_qd,
        };
        let (host, dev, pinned) = interleaved(args, &path, &run, &offsets, &name)?;
        let n = offsets.len() as f64 * f64::from(args.rounds.max(1));
        let bytes = n * p.block() as f64;
        rows.push(Row {
            test: name,
            virtio_bps: bytes / dev.as_secs_f64(),
            virtio_iops: n / dev.as_secs_f64(),
            peer_bps: bytes / host.as_secs_f64(),
            peer_iops: n / host.as_secs_f64(),
            ratio: host.as_secs_f64() / dev.as_secs_f64(),
            peer: format!(
                "{}, same file, {mode}{}",
                if peer_qd {
                    format!("host io_uring, {} in flight", args.queue_depth.clamp(1, 64))
                } else {
                    "host pread/pwrite".to_string()
                },
                if pinned { ", pinned" } else { "" }
            ),
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

/// Runs the test as `rounds` passes over the offsets, each pass cut into `CHUNKS` pieces that
/// host and device take in turns (who goes first alternates); each side's times are summed.
/// Every piece starts after its side wrote the file back from its own I/O thread (fdatasync on
/// the host, a virtio-blk flush request on the device): writeback walks the pages the other side
/// just wrote, which are the ones this piece writes, and leaves them warm in the cache of the
/// core that ran it. A sync from the main thread gave the host peer, which runs there, that
/// head start on every piece (device 15-20% behind on rand write 4K). The cost of a 4 KiB page-cache write here swings
/// 6-30 us from one second to the next (ext4 walks every buffer head of the large folio the page
/// sits in; its cache misses follow the physical host's load), so whole runs taken in turn gave
/// ratios of 0.5-1.3x for the same code. Pieces of ~10 ms in turn give both sides the same
/// weather. The device lives through all of it as a running VM's does: opened once, its mapping
/// and ring warm after the first piece, as the host's page cache is.
/// One test: the pattern, the cache mode, whether the device uses its file mapping, and
/// whether the peer keeps the driver's queue depth in flight (io_uring) instead of one
/// synchronous call at a time.
struct Run {
    p: Pattern,
    direct: bool,
    map: bool,
    peer_qd: bool,
}

fn interleaved(
    args: &Args,
    path: &Path,
    run: &Run,
    offsets: &[u64],
    name: &str,
) -> anyhow::Result<(Duration, Duration, bool)> {
    const CHUNKS: usize = 8;
    let Run {
        p,
        direct,
        map,
        peer_qd,
    } = *run;
    let mut host = HostSide::open(path, p, args.queue_depth, direct, peer_qd)?;
    let mut dev = DeviceSide::new(path, p, args.queue_depth, direct, map)?;
    let pins = if pin_threads(args.pin) {
        Pins::new(&dev)?
    } else {
        None
    };
    if pins.is_some() {
        dev.halt_poll = HALT_POLL;
    }
    let piece = offsets.len().div_ceil(CHUNKS).max(1);
    let (mut host_t, mut dev_t) = (Duration::ZERO, Duration::ZERO);
    let n = offsets.len() as f64;
    for round in 0..args.rounds.max(1) as usize {
        let (h0, d0) = (host_t, dev_t);
        let (mut host_cpu, mut dev_cpu) = (0.0, 0.0);
        let irqs0 = dev.irq.count();
        for (i, chunk) in offsets.chunks(piece).enumerate() {
            for host_turn in [(round + i) % 2 == 0, (round + i) % 2 != 0] {
                if let Some(p) = &pins {
                    p.place(host_turn)?;
                }
                if host_turn {
                    host.file.sync_data()?;
                    let c0 = cpu_time();
                    host_t += host.run(chunk)?;
                    host_cpu += cpu_time() - c0;
                } else {
                    dev.flush()?;
                    let c0 = cpu_time();
                    dev_t += dev.run(chunk)?;
                    dev_cpu += cpu_time() - c0;
                }
            }
        }
        if args.cpu {
            eprintln!(
                "{name}: round {round}: time per op: host {:.2} us, virtio {:.2} us; CPU per op: host {:.2} us, virtio {:.2} us; interrupts per op {:.3}",
                (host_t - h0).as_secs_f64() * 1e6 / n,
                (dev_t - d0).as_secs_f64() * 1e6 / n,
                host_cpu * 1e6 / n,
                dev_cpu * 1e6 / n,
                (dev.irq.count() - irqs0) as f64 / n
            );
        }
    }
    if let Some(p) = &pins {
        p.release()?;
    }
    Ok((host_t, dev_t, pins.is_some()))
}

/// Where the threads run. The cost of the same file operation differs between this machine's
/// cores from one moment to the next (they are threads of a shared physical host) and with
/// which core last touched the pages, so every file operation of both sides runs on one core:
/// the device's worker thread is pinned to it, and the host peer moves there for its turns. The
/// driver, standing in for the guest's vCPU, stays on another core, as a VMM pins vCPUs and
/// I/O threads apart (libvirt's vcpupin and iothreadpin).
struct Pins {
    io_cpu: usize,
    driver_cpu: usize,
    all: libc::cpu_set_t,
}

impl Pins {
    /// None on a host with one usable CPU.
    fn new(dev: &DeviceSide) -> anyhow::Result<Option<Self>> {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
        let mut all: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above, with the set's true size.
        if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut all) }
            != 0
        {
            return Err(std::io::Error::last_os_error()).context("reading this thread's CPUs");
        }
        // SAFETY: CPU_ISSET reads the set in bounds (cpu < CPU_SETSIZE).
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &all) })
            .collect();
        let [driver_cpu, io_cpu, ..] = cpus[..] else {
            return Ok(None);
        };
        let worker = dev.worker_tid()?;
        set_affinity(worker, io_cpu)?;
        Ok(Some(Self {
            io_cpu,
            driver_cpu,
            all,
        }))
    }

    /// Moves this thread to the I/O core for the host's turn, to the driver's core otherwise.
    fn place(&self, host_turn: bool) -> anyhow::Result<()> {
        set_affinity(
            0,
            if host_turn {
                self.io_cpu
            } else {
                self.driver_cpu
            },
        )
    }

    fn release(&self) -> anyhow::Result<()> {
        // SAFETY: restores the set read in `new`.
        if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.all) }
            != 0
        {
            return Err(std::io::Error::last_os_error()).context("restoring this thread's CPUs");
        }
        Ok(())
    }
}

/// Pins thread `tid` (0: the calling thread) to `cpu`.
fn set_affinity(tid: libc::pid_t, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in bounds (cpu came from
    // CPU_ISSET over the set's range).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: a valid set of its true size.
    if unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pinning thread {tid} to CPU {cpu}"));
    }
    Ok(())
}

/// The peer: the same reads and writes with pread/pwrite on its own descriptor of the file.
struct HostSide {
    file: File,
    write: bool,
    bs: usize,
    qd: usize,
    bufs: AlignedBuf,
    /// Keep `qd` operations in flight through this ring instead of one call at a time.
    uring: Option<io_uring::IoUring>,
}

impl HostSide {
    fn open(
        path: &Path,
        p: Pattern,
        qd: usize,
        direct: bool,
        in_flight: bool,
    ) -> anyhow::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(path)
            .with_context(|| format!("opening {} (direct: {direct})", path.display()))?;
        // As many buffers as the device path has in flight, used in turn: the same memory
        // footprint (and cache behaviour) as the guest buffers.
        let bs = p.block() as usize;
        let qd = qd.clamp(1, 64);
        let mut bufs = AlignedBuf::new(bs * qd)?;
        bufs.slice(0, bs * qd).fill(0);
        let uring = if in_flight {
            Some(
                io_uring::IoUring::new(64)
                    .context("creating an io_uring for the peer (is io_uring disabled?)")?,
            )
        } else {
            None
        };
        Ok(Self {
            file,
            write: p.write(),
            bs,
            qd,
            bufs,
            uring,
        })
    }

    fn run(&mut self, offsets: &[u64]) -> anyhow::Result<Duration> {
        if self.uring.is_some() {
            return self.run_in_flight(offsets);
        }
        let t = Instant::now();
        for (i, &off) in offsets.iter().enumerate() {
            let b = self.bufs.slice((i % self.qd) * self.bs, self.bs);
            if self.write {
                self.file.write_all_at(b, off)?;
            } else {
                self.file.read_exact_at(b, off)?;
            }
        }
        Ok(t.elapsed())
    }

    /// The same operations with `qd` of them in flight, as fio's io_uring engine at that
    /// iodepth: each completion submits the next.
    fn run_in_flight(&mut self, offsets: &[u64]) -> anyhow::Result<Duration> {
        use io_uring::{opcode, types};
        let Some(ring) = self.uring.as_mut() else {
            bail!("no io_uring");
        };
        let fd = types::Fd(std::os::fd::AsRawFd::as_raw_fd(&self.file));
        let mut free: Vec<usize> = (0..self.qd).collect();
        let (mut next, mut done) = (0usize, 0usize);
        let t = Instant::now();
        while done < offsets.len() {
            while next < offsets.len() {
                let Some(slot) = free.pop() else { break };
                let buf = self.bufs.slice(slot * self.bs, self.bs).as_mut_ptr();
                let len = self.bs as u32;
                let sqe = if self.write {
                    opcode::Write::new(fd, buf, len)
                        .offset(offsets[next])
                        .build()
                } else {
                    opcode::Read::new(fd, buf, len)
                        .offset(offsets[next])
                        .build()
                };
                // SAFETY: the buffer is slot `slot` of `self.bufs`, which outlives the ring's
                // use of it: the slot returns to `free` only after its completion, and this
                // function waits for every completion before it returns.
                if unsafe { ring.submission().push(&sqe.user_data(slot as u64)) }.is_err() {
                    free.push(slot);
                    break;
                }
                next += 1;
            }
            ring.submit_and_wait(1).context("io_uring submit")?;
            for cqe in ring.completion() {
                if cqe.result() != self.bs as i32 {
                    bail!(
                        "peer io_uring operation returned {} (expected {} bytes)",
                        cqe.result(),
                        self.bs
                    );
                }
                free.push(cqe.user_data() as usize);
                done += 1;
            }
        }
        Ok(t.elapsed())
    }
}

/// How long the driver polls for an interrupt before it sleeps when it has a core of its own:
/// KVM's default halt_poll_ns. Waking a halted vCPU of this (itself virtual) machine takes tens
/// of microseconds, during which the device ran dry (rand read 4K pread 0.51-0.75x asleep at
/// once, 0.88-0.92x polling). Without its own core a polling driver takes the CPU from the
/// device it waits for (0.3-0.45x instead of 0.6-1.1x at load 8 on 2 cores), so then it
/// sleeps at once.
const HALT_POLL: Duration = Duration::from_micros(200);

const HDRS: u64 = 0x10_0000;
const STATUS: u64 = 0x11_0000;
const DATA: u64 = 0x20_0000;

/// The device under test with the driver's side of its queue: a virtio-blk device behind the
/// virtio-mmio transport, and the in-process driver that feeds it.
struct DeviceSide {
    transport: MmioTransport,
    irq: Arc<IrqfdLine>,
    ring: GuestRing,
    ty: u32,
    bs: u64,
    qd: usize,
    write: bool,
    hdrs: *mut u8,
    stats: *mut u8,
    /// Chain heads are the first descriptor of each 3-descriptor chain: map them back to slots.
    slot_of_head: Vec<usize>,
    free: Vec<usize>,
    /// Eighths of the in-flight requests to wait for before an interrupt (adapted in `run`).
    eighths: usize,
    /// How long to poll before sleeping on the interrupt (see [`HALT_POLL`]).
    halt_poll: Duration,
    /// O_DIRECT: the driver works per completion (see `run`).
    direct: bool,
}

impl DeviceSide {
    fn new(path: &Path, p: Pattern, qd: usize, direct: bool, map: bool) -> anyhow::Result<Self> {
        let bs = p.block();
        let qd = qd.clamp(1, 64);
        let mem_size = (DATA + qd as u64 * bs + 0xfff) & !0xfff;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size as usize)])
            .context("allocating guest memory")?;
        // A running guest's buffers are resident; fault them in before the clock starts.
        mem.write_slice(&vec![0u8; (qd as u64 * bs) as usize], GuestAddress(DATA))?;
        let irq = Arc::new(IrqfdLine::new().context("creating the interrupt eventfd")?);
        let dev = Block::new(&BlockConfig {
            path: path.to_path_buf(),
            direct,
            ..Default::default()
        })?;
        let dev = if map { dev } else { dev.unmapped() };
        let transport = MmioTransport::new(Box::new(dev), mem.clone(), irq.clone())?;
        let ring = {
            let d = MmioDriver::init(&transport, mem, 1, 256, 0x1000, DATA, u64::MAX)
                .map_err(|e| anyhow::anyhow!("virtio-blk driver init: {e}"))?;
            GuestRing::new(&d)?
        };
        let hdrs = ring.ptr(HDRS, 16 * qd)?;
        let stats = ring.ptr(STATUS, qd)?;
        Ok(Self {
            transport,
            irq,
            ring,
            ty: if p.write() { blk::T_OUT } else { blk::T_IN },
            bs,
            qd,
            write: p.write(),
            hdrs,
            stats,
            slot_of_head: vec![usize::MAX; 256],
            free: (0..qd).rev().collect(),
            eighths: 6,
            halt_poll: Duration::ZERO,
            direct,
        })
    }

    /// The device's worker thread, found by the name it gives itself once it runs.
    fn worker_tid(&self) -> anyhow::Result<libc::pid_t> {
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            for e in
                std::fs::read_dir("/proc/self/task").context("listing this process's threads")?
            {
                let e = e?;
                let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                if comm.trim() == "virtio-blk" {
                    if let Some(tid) = e.file_name().to_str().and_then(|t| t.parse().ok()) {
                        return Ok(tid);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        bail!("the virtio-blk worker thread is not running (no thread named virtio-blk)")
    }

    fn notify(&self) {
        // QueueNotify of the virtio-mmio register block, queue 0.
        corefour_devices::BusDevice::write(&self.transport, 0x50, &0u32.to_le_bytes());
    }

    /// Sends a flush request and waits for it: the device writes the file back on its worker.
    fn flush(&mut self) -> anyhow::Result<()> {
        let Some(slot) = self.free.pop() else {
            bail!("benchmark flush with requests in flight");
        };
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&blk::T_FLUSH.to_le_bytes());
        // SAFETY: slot < qd: inside the header area resolved in `new`.
        unsafe { std::ptr::write_volatile(self.hdrs.add(16 * slot).cast::<[u8; 16]>(), raw) };
        let head = self.ring.add(&[
            (HDRS + slot as u64 * 16, 16, false),
            (STATUS + slot as u64, 1, true),
        ]);
        self.slot_of_head[usize::from(head)] = slot;
        if self.ring.publish() {
            self.notify();
        }
        let seen = self.irq.count();
        self.ring.arm_interrupt_after(1);
        while self.pop()? == 0 {
            if self
                .irq
                .wait_past(seen, self.halt_poll, Duration::from_secs(60))
                == seen
            {
                bail!("virtio-blk did not complete a flush in 60 s");
            }
        }
        Ok(())
    }

    /// Takes the used chains off the ring, checks their status and frees their slots.
    fn pop(&mut self) -> anyhow::Result<usize> {
        let mut got = 0;
        while let Some(id) = self.ring.pop_used() {
            let slot = self.slot_of_head[id as usize % 256];
            // SAFETY: slots are < qd: the status area resolved in `new`.
            if unsafe { std::ptr::read_volatile(self.stats.add(slot)) } != blk::S_OK {
                bail!("virtio-blk returned an error status during the benchmark");
            }
            self.free.push(slot);
            got += 1;
        }
        Ok(got)
    }

    /// Puts the requests for `offsets` through the device, QD at a time; returns when all are
    /// done.
    fn run(&mut self, offsets: &[u64]) -> anyhow::Result<Duration> {
        let qd = self.qd;
        let mut next = 0usize;
        let mut done = 0usize;
        // Refill in batches, as a loaded guest's block layer does (plugging): one kick (when
        // the device sleeps) and one interrupt per batch rather than per request. Direct I/O
        // waits on the disk, not the CPU: there the driver refills and hears of every
        // completion, as Linux's virtio-blk does, so the disk always has the whole queue
        // (batching held it at 8-24 in flight against the peer's 32: 0.55-0.8x).
        let per_completion = self.direct;
        let batch = if per_completion { 1 } else { (qd / 4).max(1) };
        let mut woke = false;
        let start = Instant::now();
        while done < offsets.len() {
            if self.free.len() >= batch || self.free.len() == qd {
                let mut queued = false;
                while next < offsets.len() {
                    let Some(slot) = self.free.pop() else { break };
                    let mut raw = [0u8; 16];
                    raw[0..4].copy_from_slice(&self.ty.to_le_bytes());
                    raw[8..16].copy_from_slice(&(offsets[next] / 512).to_le_bytes());
                    // SAFETY: slot < qd, so the 16 bytes lie in the header area resolved in
                    // `new`, which the guest memory `self.ring.mem` keeps mapped.
                    unsafe {
                        std::ptr::write_volatile(self.hdrs.add(16 * slot).cast::<[u8; 16]>(), raw)
                    };
                    let head = self.ring.add(&[
                        (HDRS + slot as u64 * 16, 16, false),
                        (DATA + slot as u64 * self.bs, self.bs as u32, !self.write),
                        (STATUS + slot as u64, 1, true),
                    ]);
                    self.slot_of_head[usize::from(head)] = slot;
                    next += 1;
                    queued = true;
                }
                if queued && self.ring.publish() {
                    self.notify();
                }
            }
            let got = self.pop()?;
            done += got;
            if std::mem::take(&mut woke) && next < offsets.len() {
                // Ran dry while this thread woke: ask earlier next time; else later (fewer
                // wake-ups).
                self.eighths = if next == done {
                    (self.eighths - 1).max(2)
                } else {
                    (self.eighths + 1).min(7)
                };
            }
            if got > 0 {
                continue;
            }
            // Nothing new: sleep until part of what is in flight completed (all of it at the
            // end), asking for one interrupt then (event idx), and look once more in case they
            // completed meanwhile. Each wake-up costs this host ~6 us (eventfd write, poll, two
            // context switches), so the fewer the better, but the device must not run dry while
            // this thread wakes: waiting for most of the queue is best when both threads share a
            // core, 1/4 when each has one (a wake-up across cores takes longer than the last
            // quarter of the queue). The driver adapts between 2/8 and 7/8, as interrupt
            // coalescing does, and always waits at least for a refill batch. (A 6/8 cap,
            // virtqueue_enable_cb_delayed's 3/4, cost 0.97-1.66 us of CPU per rand read 4K at
            // load 6-7; 7/8 0.90-1.01 us.)
            let outstanding = next - done;
            let want = if per_completion {
                1
            } else if next < offsets.len() {
                (outstanding * self.eighths / 8).max(batch.saturating_sub(self.free.len()))
            } else {
                outstanding
            };
            let want = want.clamp(1, outstanding.max(1));
            let seen = self.irq.count();
            self.ring
                .arm_interrupt_after(u16::try_from(want).unwrap_or(1));
            let got = self.pop()?;
            done += got;
            if got == 0 {
                if self
                    .irq
                    .wait_past(seen, self.halt_poll, Duration::from_secs(10))
                    == seen
                {
                    bail!("virtio-blk made no progress for 10 s");
                }
                woke = true;
            }
        }
        Ok(start.elapsed())
    }
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
