//! Live block mirroring (`copy_storage`): the VM's writable disks travel in the migration
//! stream beside its memory, while the guest runs (as QEMU's drive-mirror under libvirt's
//! `--copy-storage-all`).
//!
//! Before round 0 every writable disk starts a dirty-chunk map (`blk_dirty`, kept by the
//! virtio-blk backend). Round 0 sends every allocated run of each disk (holes and unallocated
//! clusters stay behind: the target's fresh copy reads them as zeros), skipping 4 KiB blocks of
//! zeros; each later round re-sends the chunks the guest wrote meanwhile, together with the
//! memory pages it dirtied; the stop phase, with the devices parked, sends the last dirty
//! chunks. The source waits for the target to make its copies durable (DISK_SYNC) after the
//! first pass and before the pause, so writing back the bulk never lands in the downtime and
//! the target never lags behind the stop phase. A DISK frame is `[disk u32][offset u64][len u64][len bytes]`, guest-visible bytes
//! at a guest offset, so a raw or qcow2 source copies into a raw or qcow2 target alike. The
//! source only reads its disks: a failed migration leaves them as they were.

use std::io::{Read, Write};
use std::sync::Arc;

use corefour_devices::virtio::blk_dirty::{self, DiskIo, TrackedDisk, CHUNK};
use serde::{Deserialize, Serialize};

use super::protocol::{self as p, ProtocolError};
use crate::config::VmConfig;

/// The owner name in `blk_dirty` while a migration tracks a disk.
const OWNER: &str = "a migration";
/// The largest DISK frame's data; also the source's read size.
pub const MAX_FRAME: u64 = 1 << 20;
/// Zero detection granularity in round 0.
const BLOCK: usize = 4096;

/// One mirrored disk, as HELLO announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskHello {
    /// Its index in the VM config's `disks`.
    pub index: u32,
    /// Guest-visible bytes.
    pub size: u64,
}

/// What the mirror moved, in the migration report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiskReport {
    pub disks: usize,
    /// The disks' guest-visible sizes.
    pub bytes: u64,
    /// Disk bytes sent in all rounds (zero blocks and holes skipped in round 0).
    pub bytes_sent: u64,
    /// Round 0's share of `bytes_sent`.
    pub first_pass_bytes: u64,
    pub first_pass_ms: f64,
    /// Dirty chunks re-sent per round after round 0, the stop phase's last.
    pub chunks_per_round: Vec<u64>,
}

/// The source side: the writable disks of the VM, tracked.
pub struct Mirror {
    disks: Vec<(u32, Arc<TrackedDisk>, DiskIo)>,
    buf: Vec<u8>,
    pub report: DiskReport,
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

fn write_frame(w: &mut impl Write, disk: u32, off: u64, data: &[u8]) -> Result<u64, ProtocolError> {
    let head = p::pages_head(disk, off, data.len() as u64);
    let len = (head.len() + data.len()) as u64;
    w.write_all(&p::TAG_DISK.to_le_bytes())?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(&head)?;
    w.write_all(data)?;
    Ok(12 + len)
}

impl Mirror {
    /// Finds every writable disk of the VM (`config`, as the source's VMM serves it) among the
    /// registered virtio-blk backends.
    pub fn of(config: &serde_json::Value) -> Result<Mirror, String> {
        let cfg: VmConfig =
            serde_json::from_value(config.clone()).map_err(|e| format!("the VM config: {e}"))?;
        let mut disks = Vec::new();
        for (i, d) in cfg.disks.iter().enumerate() {
            if d.read_only {
                continue;
            }
            let t = blk_dirty::find(&d.path).ok_or_else(|| {
                format!(
                    "disk {} is not attached to a virtio-blk device here",
                    d.path.display()
                )
            })?;
            let io = t.io(false).map_err(|e| e.to_string())?;
            disks.push((i as u32, t, io));
        }
        let report = DiskReport {
            disks: disks.len(),
            bytes: disks.iter().map(|(_, t, _)| t.size()).sum(),
            ..Default::default()
        };
        Ok(Mirror {
            disks,
            buf: vec![0u8; MAX_FRAME as usize],
            report,
        })
    }

    pub fn hello(&self) -> Vec<DiskHello> {
        self.disks
            .iter()
            .map(|(index, t, _)| DiskHello {
                index: *index,
                size: t.size(),
            })
            .collect()
    }

    /// Starts every disk's dirty map; on failure none stays started.
    pub fn start(&self) -> Result<(), String> {
        for (n, (_, t, _)) in self.disks.iter().enumerate() {
            if let Err(e) = t.start(OWNER) {
                self.disks[..n].iter().for_each(|(_, t, _)| t.stop(OWNER));
                return Err(e.to_string());
            }
        }
        Ok(())
    }

    pub fn stop(&self) {
        self.disks.iter().for_each(|(_, t, _)| t.stop(OWNER));
    }

    /// Round 0: every allocated, non-zero 4 KiB block of every disk. Returns the bytes sent.
    pub fn send_all(&mut self, w: &mut impl Write) -> Result<u64, String> {
        let t = std::time::Instant::now();
        let mut sent = 0u64;
        for (index, _, io) in &mut self.disks {
            let size = io.size();
            let mut off = 0u64;
            while off < size {
                let Some((at, len)) = io.next_data(off, MAX_FRAME).map_err(|e| e.to_string())?
                else {
                    break;
                };
                let len = len.min(MAX_FRAME).min(size - at) as usize;
                if len == 0 {
                    break;
                }
                let buf = &mut self.buf[..len];
                io.read_at(buf, at).map_err(|e| e.to_string())?;
                let mut i = 0usize;
                while i < len {
                    let end = (i + BLOCK).min(len);
                    if is_zero(&buf[i..end]) {
                        i = end;
                        continue;
                    }
                    let mut j = end;
                    while j < len && !is_zero(&buf[j..(j + BLOCK).min(len)]) {
                        j = (j + BLOCK).min(len);
                    }
                    write_frame(w, *index, at + i as u64, &buf[i..j]).map_err(|e| e.to_string())?;
                    sent += (j - i) as u64;
                    i = j;
                }
                off = at + len as u64;
            }
        }
        self.report.bytes_sent += sent;
        self.report.first_pass_bytes = sent;
        self.report.first_pass_ms = t.elapsed().as_secs_f64() * 1e3;
        Ok(sent)
    }

    /// Fetches and clears every disk's dirty map.
    pub fn take(&self) -> Result<Vec<Vec<u64>>, String> {
        self.disks
            .iter()
            .map(|(_, t, _)| t.take(OWNER).map_err(|e| e.to_string()))
            .collect()
    }

    /// Bytes the chunks in `maps` hold.
    pub fn pending_bytes(&self, maps: &[Vec<u64>]) -> u64 {
        self.disks
            .iter()
            .zip(maps)
            .map(|((_, t, _), m)| t.ranges(m).iter().map(|r| r.1).sum::<u64>())
            .sum()
    }

    /// Sends the chunks set in `maps` whole. Returns the bytes sent.
    pub fn send_dirty(&mut self, w: &mut impl Write, maps: &[Vec<u64>]) -> Result<u64, String> {
        let mut sent = 0u64;
        let mut chunks = 0u64;
        for ((index, t, io), m) in self.disks.iter_mut().zip(maps) {
            for (off, len) in t.ranges(m) {
                chunks += len.div_ceil(CHUNK);
                let mut at = off;
                while at < off + len {
                    let n = (off + len - at).min(MAX_FRAME) as usize;
                    let buf = &mut self.buf[..n];
                    io.read_at(buf, at).map_err(|e| e.to_string())?;
                    write_frame(w, *index, at, buf).map_err(|e| e.to_string())?;
                    sent += n as u64;
                    at += n as u64;
                }
            }
        }
        self.report.bytes_sent += sent;
        self.report.chunks_per_round.push(chunks);
        Ok(sent)
    }
}

/// ORs `b` into `a` (maps of the same disks).
pub fn merge(a: &mut [Vec<u64>], b: &[Vec<u64>]) {
    for (x, y) in a.iter_mut().zip(b) {
        for (u, v) in x.iter_mut().zip(y) {
            *u |= *v;
        }
    }
}

/// The target side: the local copies the DISK frames go into, by config index.
#[derive(Default)]
pub struct DiskSink {
    disks: Vec<(u32, DiskIo)>,
    buf: Vec<u8>,
    /// Frames written since the last flush.
    unflushed: bool,
}

impl DiskSink {
    /// Opens this VMM's copies of the disks HELLO announced. `config` is the target's own (its
    /// paths); the devices built for it registered the disks. A disk that is missing, read-only
    /// here or of another size is refused.
    pub fn open(announced: &[DiskHello], config: &VmConfig) -> Result<DiskSink, String> {
        let mut disks = Vec::new();
        for h in announced {
            let d = config.disks.get(h.index as usize).ok_or_else(|| {
                format!(
                    "the source mirrors disk {} but this VM has {} disks",
                    h.index,
                    config.disks.len()
                )
            })?;
            if d.read_only {
                return Err(format!(
                    "the source mirrors disk {} ({}) which is read-only here",
                    h.index,
                    d.path.display()
                ));
            }
            let t = blk_dirty::find(&d.path)
                .ok_or_else(|| format!("disk {} is not attached here", d.path.display()))?;
            if t.size() != h.size {
                return Err(format!(
                    "disk {} ({}) has {} bytes here but {} on the source: the copy must be \
                     created with the source's virtual size",
                    h.index,
                    d.path.display(),
                    t.size(),
                    h.size
                ));
            }
            disks.push((h.index, t.io(true).map_err(|e| e.to_string())?));
        }
        Ok(DiskSink {
            disks,
            buf: Vec::new(),
            unflushed: false,
        })
    }

    /// Reads one DISK frame's body (`len` bytes, its head not yet read) and writes it.
    pub fn receive(&mut self, r: &mut impl Read, len: u64) -> Result<(), ProtocolError> {
        let bad = |reason: String| ProtocolError::Malformed {
            what: "DISK",
            reason,
        };
        if len < p::PAGES_HEAD as u64 {
            return Err(bad("shorter than its header".into()));
        }
        let mut head = [0u8; p::PAGES_HEAD];
        r.read_exact(&mut head)?;
        let (index, off, n) = p::parse_pages_head(&head).ok_or_else(|| bad("bad header".into()))?;
        if n > MAX_FRAME || len - p::PAGES_HEAD as u64 != n {
            return Err(bad(format!(
                "{n} bytes at {off} do not match the message length or exceed {MAX_FRAME}"
            )));
        }
        let io = self
            .disks
            .iter_mut()
            .find(|(i, _)| *i == index)
            .map(|(_, io)| io)
            .ok_or_else(|| bad(format!("disk {index} was not announced")))?;
        self.buf.resize(n as usize, 0);
        r.read_exact(&mut self.buf)?;
        self.unflushed = true;
        io.write_at(&self.buf, off).map_err(|e| bad(e.to_string()))
    }

    /// Makes every copy durable: when the source asks (DISK_SYNC: after the first pass and
    /// before it pauses the guest, so the bulk is written back while the guest still runs)
    /// and before the target says LOADED (then only the last chunks are left, inside the
    /// downtime).
    pub fn flush(&mut self) -> Result<(), String> {
        if !self.unflushed {
            return Ok(());
        }
        for (_, io) in &mut self.disks {
            io.flush().map_err(|e| e.to_string())?;
        }
        self.unflushed = false;
        Ok(())
    }
}
