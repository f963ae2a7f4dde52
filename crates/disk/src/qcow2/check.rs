//! `check`: recount every cluster reference from the metadata, compare with the stored
//! refcounts, report leaks and corruptions, and optionally repair them.

use super::refcount::Update;
use super::{header, Cluster, Qcow2, COPIED, OFFSET_MASK};
use crate::host::{be16, be32, be64};
use crate::Result;

/// What to repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    None,
    /// Clusters with a refcount but no reference.
    Leaks,
    /// Leaks, too-low refcounts and wrong COPIED flags.
    All,
}

/// The outcome of a check, with qemu-img's counters.
#[derive(Clone, Debug, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    pub filename: String,
    pub format: String,
    pub corruptions: u64,
    pub leaks: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub allocated_clusters: u64,
    pub total_clusters: u64,
    pub compressed_clusters: u64,
    pub image_end_offset: u64,
    pub messages: Vec<String>,
}

impl CheckReport {
    /// qemu-img's exit status: 0 clean, 2 corruptions, 3 only leaks.
    pub fn exit_code(&self) -> i32 {
        if self.corruptions > self.corruptions_fixed {
            2
        } else if self.leaks > self.leaks_fixed {
            3
        } else {
            0
        }
    }
}

const MAX_MESSAGES: usize = 100;

struct Counter {
    refs: Vec<u32>,
    cluster_bits: u32,
    file_len: u64,
    corruptions: u64,
    messages: Vec<String>,
}

impl Counter {
    fn note(&mut self, msg: String) {
        self.corruptions += 1;
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg);
        }
    }

    fn add(&mut self, off: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let end = off.saturating_add(len);
        if end > self.file_len.div_ceil(1 << self.cluster_bits) << self.cluster_bits {
            self.note(format!(
                "ERROR {what} at {off:#x}+{len:#x} is past the end of the file ({:#x})",
                self.file_len
            ));
            return;
        }
        let a = off >> self.cluster_bits;
        let b = (end - 1) >> self.cluster_bits;
        for c in a..=b {
            if let Some(r) = self.refs.get_mut(c as usize) {
                *r = r.saturating_add(1);
            }
        }
    }
}

impl Qcow2 {
    fn read_table(&self, off: u64, entries: u64, what: &str) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; (entries * 8) as usize];
        self.host.read_exact(&mut raw, off, what)?;
        Ok(raw.chunks_exact(8).map(|c| be64(c, 0)).collect())
    }

    /// Counts an L1 table's L2 tables and their data clusters.
    fn count_l1(&mut self, cnt: &mut Counter, l1: &[u64], l1_off: u64, report: &mut CheckReport) {
        let cs = self.cluster_size;
        for (i, e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if l2 & (cs - 1) != 0 {
                cnt.note(format!(
                    "ERROR L1 entry at {:#x}: unaligned L2 offset {l2:#x}",
                    l1_off + i as u64 * 8
                ));
                continue;
            }
            cnt.add(l2, cs, "L2 table");
            let table = match self.read_table(l2, cs / 8, "L2 table") {
                Ok(t) => t,
                Err(e) => {
                    cnt.note(format!("ERROR {e}"));
                    continue;
                }
            };
            for (j, entry) in table.iter().enumerate() {
                match self.decode(*entry, l2 + j as u64 * 8) {
                    Ok(Cluster::Normal { host, .. }) => {
                        report.allocated_clusters += 1;
                        cnt.add(host, cs, "data cluster");
                    }
                    Ok(Cluster::Zero {
                        prealloc: Some(host),
                    }) => cnt.add(host, cs, "preallocated zero cluster"),
                    Ok(Cluster::Compressed { host, len }) => {
                        report.allocated_clusters += 1;
                        report.compressed_clusters += 1;
                        let a = host & !(cs - 1);
                        let b = (host + len).div_ceil(cs) * cs;
                        cnt.add(a, b - a, "compressed cluster");
                    }
                    Ok(_) => {}
                    Err(e) => cnt.note(format!("ERROR {e}")),
                }
            }
        }
    }

    /// Counts the internal snapshot table and the tables each snapshot keeps alive.
    fn count_snapshots(&mut self, cnt: &mut Counter, report: &mut CheckReport) {
        let mut off = self.h.snapshots_offset;
        let start = off;
        for s in 0..self.h.nb_snapshots.min(65536) {
            let mut hdr = [0u8; 40];
            if let Err(e) = self.host.read_exact(&mut hdr, off, "snapshot header") {
                cnt.note(format!("ERROR snapshot {s}: {e}"));
                return;
            }
            let l1_off = be64(&hdr, 0);
            let l1_size = be32(&hdr, 8) as u64;
            let id_len = be16(&hdr, 12) as u64;
            let name_len = be16(&hdr, 14) as u64;
            let extra = be32(&hdr, 36) as u64;
            if l1_size * 8 > header::MAX_L1_BYTES || l1_off & (self.cluster_size - 1) != 0 {
                cnt.note(format!("ERROR snapshot {s} at {off:#x}: invalid L1 table"));
            } else {
                cnt.add(l1_off, l1_size * 8, "snapshot L1 table");
                match self.read_table(l1_off, l1_size, "snapshot L1 table") {
                    Ok(l1) => {
                        let mut dummy = CheckReport::default();
                        self.count_l1(cnt, &l1, l1_off, &mut dummy);
                    }
                    Err(e) => cnt.note(format!("ERROR {e}")),
                }
            }
            off += (40 + extra + id_len + name_len).div_ceil(8) * 8;
        }
        let _ = report;
        cnt.add(start, off - start, "snapshot table");
    }

    /// Checks the image; repairs what `repair` asks for (the image must be writable for that).
    pub fn check(&mut self, repair: Repair) -> Result<CheckReport> {
        let cs = self.cluster_size;
        let mut report = CheckReport {
            filename: self.host.path.display().to_string(),
            format: "qcow2".into(),
            total_clusters: self.h.size.div_ceil(cs),
            ..Default::default()
        };
        self.file_len = self.host.len()?;
        let nclusters = self.file_len.div_ceil(cs);
        let mut cnt = Counter {
            refs: vec![0; nclusters as usize],
            cluster_bits: self.cluster_bits,
            file_len: self.file_len,
            corruptions: 0,
            messages: Vec::new(),
        };
        cnt.add(0, cs, "header");
        cnt.add(
            self.h.l1_table_offset,
            self.h.l1_size as u64 * 8,
            "L1 table",
        );
        let l1 = self.l1.clone();
        let l1_off = self.h.l1_table_offset;
        self.count_l1(&mut cnt, &l1, l1_off, &mut report);
        cnt.add(
            self.h.refcount_table_offset,
            self.h.refcount_table_clusters as u64 * cs,
            "refcount table",
        );
        let rb_bits = self.cluster_bits + 3 - self.h.refcount_order;
        let mut covered = 0u64;
        for (i, e) in self.reftable.clone().iter().enumerate() {
            let rb = e & OFFSET_MASK;
            if rb == 0 {
                continue;
            }
            if rb & (cs - 1) != 0 {
                cnt.note(format!(
                    "ERROR refcount block {i}: unaligned offset {rb:#x}"
                ));
                continue;
            }
            cnt.add(rb, cs, "refcount block");
            covered = covered.max((i as u64 + 1) << rb_bits);
        }
        if self.h.nb_snapshots > 0 {
            self.count_snapshots(&mut cnt, &mut report);
        }
        report.corruptions = cnt.corruptions;
        report.messages = std::mem::take(&mut cnt.messages);
        let fix_leaks = repair != Repair::None;
        let fix_all = repair == Repair::All;
        let mut changed = false;
        for c in 0..nclusters.max(covered.min(nclusters + (1 << rb_bits))) {
            let computed = cnt.refs.get(c as usize).copied().unwrap_or(0) as u64;
            let stored = match self.refcount(c) {
                Ok(s) => s,
                Err(e) => {
                    report.corruptions += 1;
                    if report.messages.len() < MAX_MESSAGES {
                        report.messages.push(format!("ERROR {e}"));
                    }
                    continue;
                }
            };
            if stored == computed {
                continue;
            }
            let off = c << self.cluster_bits;
            if stored > computed {
                report.leaks += 1;
                if report.messages.len() < MAX_MESSAGES {
                    report.messages.push(format!(
                        "Leaked cluster {c} (offset {off:#x}) refcount={stored} reference={computed}"
                    ));
                }
                if fix_leaks {
                    self.update_refcounts(c, 1, Update::Set(computed))?;
                    report.leaks_fixed += 1;
                    changed = true;
                }
            } else {
                report.corruptions += 1;
                if report.messages.len() < MAX_MESSAGES {
                    report.messages.push(format!(
                        "ERROR cluster {c} (offset {off:#x}) refcount={stored} reference={computed}"
                    ));
                }
                if fix_all && computed <= self.max_refcount() {
                    self.update_refcounts(c, 1, Update::Set(computed))?;
                    report.corruptions_fixed += 1;
                    changed = true;
                }
            }
        }
        self.check_copied_flags(&mut report, fix_all)?;
        report.image_end_offset = self.host.len()?;
        if changed || report.corruptions_fixed > 0 {
            self.host.sync()?;
            // Repairs can allocate refcount blocks: recount to report the state left behind.
            let after = self.check(Repair::None)?;
            if after.corruptions == 0 {
                report.corruptions_fixed = report.corruptions;
                self.clear_flags(header::INCOMPAT_CORRUPT | header::INCOMPAT_DIRTY)?;
            }
            if after.leaks == 0 {
                report.leaks_fixed = report.leaks;
            }
            report.image_end_offset = after.image_end_offset;
        }
        Ok(report)
    }

    fn clear_flags(&mut self, bits: u64) -> Result<()> {
        if self.h.version >= 3 && self.h.incompatible & bits != 0 && self.writable {
            self.h.incompatible &= !bits;
            self.host.write(
                &self.h.incompatible.to_be_bytes(),
                header::field::INCOMPATIBLE,
            )?;
            self.host.sync()?;
        }
        Ok(())
    }

    /// COPIED must be set exactly on entries whose cluster has refcount 1.
    fn check_copied_flags(&mut self, report: &mut CheckReport, fix: bool) -> Result<()> {
        let cs = self.cluster_size;
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let l2 = e & OFFSET_MASK;
            if l2 == 0 || l2 & (cs - 1) != 0 || l2 >= self.file_len {
                continue;
            }
            let rc = self.refcount(l2 >> self.cluster_bits)?;
            if (e & COPIED != 0) != (rc == 1) {
                report.corruptions += 1;
                report.messages.push(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:#x} refcount={rc}"
                ));
                if fix {
                    let v = if rc == 1 { e | COPIED } else { e & !COPIED };
                    self.l1[i] = v;
                    self.host
                        .write(&v.to_be_bytes(), self.h.l1_table_offset + i as u64 * 8)?;
                    report.corruptions_fixed += 1;
                }
            }
            let Ok(mut table) = self.read_table(l2, cs / 8, "L2 table") else {
                continue;
            };
            let mut dirty = false;
            for (j, entry) in table.iter_mut().enumerate() {
                let Ok(Cluster::Normal { host, copied }) = self.decode(*entry, l2 + j as u64 * 8)
                else {
                    continue;
                };
                let rc = self.refcount(host >> self.cluster_bits)?;
                if copied != (rc == 1) {
                    report.corruptions += 1;
                    if report.messages.len() < MAX_MESSAGES {
                        report.messages.push(format!(
                            "ERROR OFLAG_COPIED data cluster: l2_entry={entry:#x} refcount={rc}"
                        ));
                    }
                    if fix {
                        *entry = if rc == 1 {
                            *entry | COPIED
                        } else {
                            *entry & !COPIED
                        };
                        dirty = true;
                        report.corruptions_fixed += 1;
                    }
                }
            }
            if dirty {
                let raw: Vec<u8> = table.iter().flat_map(|v| v.to_be_bytes()).collect();
                self.host.write(&raw, l2)?;
                self.l2.remove(l2);
            }
        }
        Ok(())
    }
}
