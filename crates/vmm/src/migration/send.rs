//! The source side: pre-copy rounds with dirty logging, then a short stop-and-copy.
//!
//! Round 0 sends every non-zero page while the guest runs (the target's fresh memory is
//! already zero). Each later round sends what the dirty log caught during the one before.
//! When the pages left would go out within the downtime target at the bandwidth the last round
//! achieved (or the round limit is hit), the guest is paused, the last pages and the vCPU and
//! device state are sent, and the target is asked to take over. Until the COMMIT is on the
//! wire every failure resumes the guest here and reports why.
//!
//! With `copy_storage` the writable disks go the same way (`disks`): their first pass before
//! memory's round 0, their dirty chunks with each round's pages, counted in what the downtime
//! estimate waits for.

use std::io::{BufWriter, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::disks::{self, DiskReport, Mirror};
use super::protocol::{self as p, Hello, ProtocolError, Round};
use crate::snapshot::dirty::{all_dirty, count_dirty, page_runs, PAGE_SIZE};
use crate::snapshot::memfile::HostRegion;

/// What the migration needs from the running VM.
pub trait MigrationSource {
    /// Guest RAM, in the layout the target must build.
    fn regions(&self) -> Vec<HostRegion>;
    /// The VM config, as the target's VMM reads it.
    fn config(&self) -> serde_json::Value;
    /// Starts logging writes; the first `take_dirty` then returns what was written since.
    fn start_dirty_log(&self) -> Result<(), String>;
    /// Returns and clears the dirty bitmap of region `index`.
    fn take_dirty(&self, index: usize) -> Result<Vec<u64>, String>;
    fn stop_dirty_log(&self);
    /// Stops every vCPU (out of KVM_RUN, parked).
    fn pause(&self) -> Result<(), String>;
    fn resume(&self) -> Result<(), String>;
    /// The vCPU + VM + device state of the paused VM, as a checksummed frame.
    fn state(&self) -> Result<Vec<u8>, String>;
}

#[derive(Debug, Clone)]
pub struct SendParams {
    pub max_downtime: Duration,
    pub max_rounds: u32,
    /// How long any one read or write on the connection may block (a cut link surfaces here).
    pub io_timeout: Duration,
    /// Mirror the VM's writable disks to the target (live block mirroring).
    pub copy_storage: bool,
}

impl Default for SendParams {
    fn default() -> Self {
        Self {
            max_downtime: Duration::from_millis(10),
            max_rounds: 30,
            io_timeout: Duration::from_secs(5),
            copy_storage: false,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SendReport {
    pub total_ms: f64,
    /// From the pause here to the target's STARTED.
    pub downtime_ms: f64,
    pub rounds: u32,
    pub pages_sent: u64,
    pub zero_pages_skipped: u64,
    pub last_copy_pages: u64,
    pub bytes_sent: u64,
    pub pages_per_round: Vec<u64>,
    /// With `copy_storage`: what the disk mirror moved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disks: Option<DiskReport>,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to {to}: {source}")]
    Connect {
        to: String,
        #[source]
        source: std::io::Error,
    },
    #[error("migration failed, the VM keeps running here: {0}")]
    Failed(String),
    #[error(
        "the target loaded the VM but did not confirm it started ({0}); the VM stays paused \
         here so it never runs twice: check the target, then resume or shut down this one"
    )]
    Unconfirmed(String),
}

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (h, m, t) = unsafe { page.align_to::<u64>() };
    h.iter().all(|&b| b == 0) && m.iter().all(|&w| w == 0) && t.iter().all(|&b| b == 0)
}

struct Sender<'a> {
    w: BufWriter<TcpStream>,
    r: TcpStream,
    src: &'a dyn MigrationSource,
    regions: Vec<HostRegion>,
    report: SendReport,
    mirror: Option<Mirror>,
}

impl Sender<'_> {
    /// Sends the pages set in `bitmaps`; in round 0 all-zero pages are skipped.
    fn send_pages(&mut self, bitmaps: &[Vec<u64>], skip_zero: bool) -> Result<u64, ProtocolError> {
        let mut sent = 0u64;
        let regions = self.regions.clone();
        for (idx, (h, bm)) in regions.iter().zip(bitmaps).enumerate() {
            let base = h.host_addr as *const u8;
            for run in page_runs(bm, h.region.size / PAGE_SIZE) {
                let mut first = run.first;
                let end = run.first + run.count;
                while first < end {
                    let count = (end - first).min(p::CHUNK_PAGES);
                    // SAFETY: the run lies inside the region (page_runs is bounded by its
                    // page count) and the mapping lives as long as the VM. The guest may be
                    // writing these pages right now; a torn page is sent again in the next
                    // round because the dirty log caught the write.
                    let bytes = unsafe {
                        std::slice::from_raw_parts(
                            base.add((first * PAGE_SIZE) as usize),
                            (count * PAGE_SIZE) as usize,
                        )
                    };
                    if skip_zero {
                        // Split the chunk around zero pages.
                        let mut i = 0u64;
                        while i < count {
                            let pg = |k: u64| {
                                &bytes[(k * PAGE_SIZE) as usize..((k + 1) * PAGE_SIZE) as usize]
                            };
                            if is_zero(pg(i)) {
                                self.report.zero_pages_skipped += 1;
                                i += 1;
                                continue;
                            }
                            let mut j = i + 1;
                            while j < count && !is_zero(pg(j)) {
                                j += 1;
                            }
                            self.write_pages(
                                idx,
                                first + i,
                                &bytes[(i * PAGE_SIZE) as usize..(j * PAGE_SIZE) as usize],
                            )?;
                            sent += j - i;
                            i = j;
                        }
                    } else {
                        self.write_pages(idx, first, bytes)?;
                        sent += count;
                    }
                    first += count;
                }
            }
        }
        self.report.pages_sent += sent;
        Ok(sent)
    }

    fn write_pages(&mut self, region: usize, first: u64, data: &[u8]) -> Result<(), ProtocolError> {
        let count = data.len() as u64 / PAGE_SIZE;
        let head = p::pages_head(region as u32, first, count);
        let len = (head.len() + data.len()) as u64;
        self.w.write_all(&p::TAG_PAGES.to_le_bytes())?;
        self.w.write_all(&len.to_le_bytes())?;
        self.w.write_all(&head)?;
        self.w.write_all(data)?;
        self.report.bytes_sent += 12 + len;
        Ok(())
    }

    /// The disks' dirty chunks (none without a mirror).
    fn take_disk_dirty(&self) -> Result<Vec<Vec<u64>>, String> {
        self.mirror.as_ref().map_or(Ok(Vec::new()), |m| m.take())
    }

    fn disk_pending(&self, maps: &[Vec<u64>]) -> u64 {
        self.mirror.as_ref().map_or(0, |m| m.pending_bytes(maps))
    }

    fn send_disk_dirty(&mut self, maps: &[Vec<u64>]) -> Result<u64, String> {
        match self.mirror.as_mut() {
            Some(m) => {
                let n = m.send_dirty(&mut self.w, maps)?;
                self.report.bytes_sent += n;
                Ok(n)
            }
            None => Ok(0),
        }
    }

    fn take_all_dirty(&self) -> Result<Vec<Vec<u64>>, String> {
        (0..self.regions.len())
            .map(|i| self.src.take_dirty(i))
            .collect()
    }
}

/// Migrates the VM behind `src` to the target listening at `to`.
pub fn migrate(
    src: &dyn MigrationSource,
    to: &str,
    params: &SendParams,
) -> Result<SendReport, SendError> {
    let t0 = Instant::now();
    let addr = std::net::ToSocketAddrs::to_socket_addrs(to)
        .map_err(|source| SendError::Connect {
            to: to.into(),
            source,
        })?
        .next()
        .ok_or_else(|| SendError::Connect {
            to: to.into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        })?;
    // A target VMM started a moment ago (by its daemon) may not listen yet: retry a refused
    // connection until the I/O timeout.
    let stream = loop {
        match TcpStream::connect_timeout(&addr, params.io_timeout) {
            Ok(s) => break s,
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && t0.elapsed() < params.io_timeout =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(source) => {
                return Err(SendError::Connect {
                    to: to.into(),
                    source,
                })
            }
        }
    };
    let setup = |s: &TcpStream| -> std::io::Result<()> {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(params.io_timeout))?;
        s.set_write_timeout(Some(params.io_timeout))
    };
    setup(&stream).map_err(|e| SendError::Failed(format!("socket setup: {e}")))?;
    let r = stream
        .try_clone()
        .map_err(|e| SendError::Failed(format!("socket setup: {e}")))?;
    let mirror = if params.copy_storage {
        Some(
            Mirror::of(&src.config())
                .map_err(|e| SendError::Failed(format!("copy storage: {e}")))?,
        )
    } else {
        None
    };
    let mut s = Sender {
        w: BufWriter::with_capacity(1 << 20, stream),
        r,
        src,
        regions: src.regions(),
        report: SendReport::default(),
        mirror,
    };
    let mut paused_at: Option<Instant> = None;
    let result = run(&mut s, params, &mut paused_at);
    src.stop_dirty_log();
    if let Some(m) = s.mirror.take() {
        m.stop();
        s.report.disks = Some(m.report);
    }
    match result {
        Ok(()) => {
            let mut report = s.report;
            report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
            Ok(report)
        }
        Err(Stage::BeforeCommit(why)) => {
            // Tell the target (best effort) and bring the guest back.
            let _ = p::send(&mut s.w, p::TAG_ABORT, why.as_bytes());
            let _ = s.w.flush();
            if paused_at.is_some() {
                if let Err(e) = src.resume() {
                    return Err(SendError::Failed(format!(
                        "{why}; and resuming failed: {e}"
                    )));
                }
            }
            Err(SendError::Failed(why))
        }
        Err(Stage::AfterCommit(why)) => Err(SendError::Unconfirmed(why)),
    }
}

enum Stage {
    BeforeCommit(String),
    AfterCommit(String),
}

fn run(s: &mut Sender, params: &SendParams, paused_at: &mut Option<Instant>) -> Result<(), Stage> {
    let pe = |e: ProtocolError| Stage::BeforeCommit(e.to_string());
    let hello = Hello {
        version: p::PROTOCOL_VERSION,
        config: s.src.config(),
        regions: s.regions.iter().map(|h| h.region).collect(),
        disks: s.mirror.as_ref().map(Mirror::hello).unwrap_or_default(),
    };
    p::send_json(&mut s.w, p::TAG_HELLO, &hello).map_err(pe)?;
    s.w.flush().map_err(|e| pe(e.into()))?;
    p::expect(&mut s.r, p::TAG_READY, "READY").map_err(pe)?;
    s.src.start_dirty_log().map_err(Stage::BeforeCommit)?;

    // Round 0: everything, the disks first (the dirty maps start before their first read).
    let mut round = 0u32;
    let t = Instant::now();
    let mut disk_bytes = 0u64;
    if let Some(m) = s.mirror.as_mut() {
        m.start().map_err(Stage::BeforeCommit)?;
        disk_bytes = m.send_all(&mut s.w).map_err(Stage::BeforeCommit)?;
        s.report.bytes_sent += disk_bytes;
        sync_disks(s).map_err(pe)?;
    }
    let all: Vec<Vec<u64>> = s.regions.iter().map(|h| all_dirty(h.region.size)).collect();
    let sent = s.send_pages(&all, true).map_err(pe)?;
    s.w.flush().map_err(|e| pe(e.into()))?;
    let mut bw = bandwidth(sent * PAGE_SIZE + disk_bytes, t.elapsed());
    s.report.pages_per_round.push(sent);
    p::send_json(
        &mut s.w,
        p::TAG_ROUND,
        &Round {
            n: round,
            pages: sent,
        },
    )
    .map_err(pe)?;

    let mut disk_dirty = s.take_disk_dirty().map_err(Stage::BeforeCommit)?;
    let mut dirty = s.take_all_dirty().map_err(Stage::BeforeCommit)?;
    loop {
        let pending: u64 = dirty
            .iter()
            .zip(&s.regions)
            .map(|(b, h)| count_dirty(b, h.region.size / PAGE_SIZE))
            .sum();
        let pending_bytes = pending * PAGE_SIZE + s.disk_pending(&disk_dirty);
        let eta = Duration::from_secs_f64(pending_bytes as f64 / bw);
        round += 1;
        if eta <= params.max_downtime / 2 || round >= params.max_rounds {
            break;
        }
        let t = Instant::now();
        let disk_sent = s
            .send_disk_dirty(&disk_dirty)
            .map_err(Stage::BeforeCommit)?;
        let sent = s.send_pages(&dirty, false).map_err(pe)?;
        s.w.flush().map_err(|e| pe(e.into()))?;
        if sent > 0 || disk_sent > 0 {
            bw = bandwidth(sent * PAGE_SIZE + disk_sent, t.elapsed()).max(bw / 4.0);
        }
        s.report.pages_per_round.push(sent);
        p::send_json(
            &mut s.w,
            p::TAG_ROUND,
            &Round {
                n: round,
                pages: sent,
            },
        )
        .map_err(pe)?;
        disk_dirty = s.take_disk_dirty().map_err(Stage::BeforeCommit)?;
        dirty = s.take_all_dirty().map_err(Stage::BeforeCommit)?;
    }

    // The copies durable up to the last round, so the downtime writes back only its chunks.
    if s.mirror.is_some() {
        sync_disks(s).map_err(pe)?;
    }
    // Stop and copy.
    s.src.pause().map_err(Stage::BeforeCommit)?;
    *paused_at = Some(Instant::now());
    // The devices are parked: no disk write is in flight, the maps are final.
    let last_disk = s.take_disk_dirty().map_err(Stage::BeforeCommit)?;
    disks::merge(&mut disk_dirty, &last_disk);
    s.send_disk_dirty(&disk_dirty)
        .map_err(Stage::BeforeCommit)?;
    let last = s.take_all_dirty().map_err(Stage::BeforeCommit)?;
    for (d, l) in dirty.iter_mut().zip(&last) {
        crate::snapshot::dirty::merge(d, l);
    }
    let sent = s.send_pages(&dirty, false).map_err(pe)?;
    s.report.last_copy_pages = sent;
    s.report.pages_per_round.push(sent);
    s.report.rounds = round;
    let state = s.src.state().map_err(Stage::BeforeCommit)?;
    p::send(&mut s.w, p::TAG_STATE, &state).map_err(pe)?;
    s.w.flush().map_err(|e| pe(e.into()))?;
    p::expect(&mut s.r, p::TAG_LOADED, "LOADED").map_err(pe)?;
    // From here on the target may run the guest: never resume here.
    let ac = |e: ProtocolError| Stage::AfterCommit(e.to_string());
    p::send(&mut s.w, p::TAG_COMMIT, &[]).map_err(ac)?;
    s.w.flush().map_err(|e| ac(e.into()))?;
    p::expect(&mut s.r, p::TAG_STARTED, "STARTED").map_err(ac)?;
    s.report.downtime_ms = paused_at.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
    Ok(())
}

/// Waits until the target made its disk copies durable so far.
fn sync_disks(s: &mut Sender) -> Result<(), ProtocolError> {
    p::send(&mut s.w, p::TAG_DISK_SYNC, &[])?;
    s.w.flush()?;
    p::expect(&mut s.r, p::TAG_DISK_SYNCED, "DISK_SYNCED")?;
    Ok(())
}

/// Bytes per second of a round (a floor keeps a tiny round from predicting nonsense).
fn bandwidth(bytes: u64, took: Duration) -> f64 {
    let secs = took.as_secs_f64().max(1e-4);
    (bytes as f64 / secs).max(50e6)
}
