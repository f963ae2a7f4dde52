//! Snapshots of a running VM: the versioned, checksummed state file (`format`), guest memory
//! written sparse and restored MAP_PRIVATE (`memfile`), and the dirty-log helpers that diff
//! snapshots and migration share (`dirty`).
//!
//! A snapshot is a directory:
//! ```text
//! DIR/state.bin    format::KIND_VM_STATE frame around a `VmSnapshot`
//! DIR/memory.bin   guest RAM (sparse; for a diff snapshot only the dirty pages)
//! ```

pub mod dirty;
pub mod format;
pub mod handle;
pub mod machine_state;
pub mod memfile;
pub mod restore;
pub mod shell;
pub mod warm;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use machine_state::MachineState;

use dirty::PageRun;
use memfile::{MemFileInfo, RamRegion};

pub const STATE_FILE: &str = "state.bin";
pub const MEMORY_FILE: &str = "memory.bin";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Format(#[from] format::FormatError),
    #[error(transparent)]
    Memory(#[from] memfile::MemFileError),
    #[error("snapshot {dir}: {reason}")]
    Invalid { dir: String, reason: String },
}

/// How a diff snapshot relates to the one before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffRecord {
    /// The snapshot directory this one applies on top of (absolute, or relative to this one).
    pub parent: PathBuf,
    /// Dirty page runs per memory region, in `MemoryRecord::regions` order.
    pub runs: Vec<Vec<PageRun>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRecord {
    pub regions: Vec<RamRegion>,
    pub file: MemFileInfo,
    pub diff: Option<DiffRecord>,
}

/// Everything in `state.bin`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// The corefour release that wrote it (informational; the frame carries the format version).
    pub writer: String,
    pub created_unix_ms: u64,
    pub memory: MemoryRecord,
    /// Config, backend VM state, vCPUs, devices.
    pub machine: MachineState,
}

impl VmSnapshot {
    pub fn write(&self, dir: &Path) -> Result<(), SnapshotError> {
        format::write_file(&dir.join(STATE_FILE), format::KIND_VM_STATE, self)?;
        Ok(())
    }

    /// Reads and checks `DIR/state.bin`, and checks what can be checked without reading the
    /// memory: a sane layout, diff runs inside it, the memory file's size.
    pub fn read(dir: &Path) -> Result<Self, SnapshotError> {
        let s: Self = format::read_file(&dir.join(STATE_FILE), format::KIND_VM_STATE)?;
        let invalid = |reason: String| SnapshotError::Invalid {
            dir: dir.display().to_string(),
            reason,
        };
        memfile::validate(&s.memory.regions)?;
        if memfile::file_size(&s.memory.regions) != s.memory.file.size {
            return Err(invalid(
                "memory layout and memory file size disagree".into(),
            ));
        }
        if let Some(d) = &s.memory.diff {
            memfile::validate_runs(&s.memory.regions, &d.runs)?;
        }
        if s.machine.vcpus.is_empty() {
            return Err(invalid("no vCPU state".into()));
        }
        memfile::open_checked(&dir.join(MEMORY_FILE), s.memory.file.size)?;
        Ok(s)
    }

    /// The chain of snapshot directories to apply, base first, ending with `dir`.
    pub fn chain(dir: &Path) -> Result<Vec<(PathBuf, VmSnapshot)>, SnapshotError> {
        let mut out = Vec::new();
        let mut cur = dir.to_path_buf();
        loop {
            let s = Self::read(&cur)?;
            let parent = s.memory.diff.as_ref().map(|d| cur.join(&d.parent));
            if let Some(first) = out.first() {
                let (_, f): &(PathBuf, VmSnapshot) = first;
                if f.memory.regions != s.memory.regions {
                    return Err(SnapshotError::Invalid {
                        dir: cur.display().to_string(),
                        reason: "its memory layout differs from the diff snapshot built on it"
                            .into(),
                    });
                }
            }
            out.push((cur.clone(), s));
            match parent {
                None => break,
                Some(p) => {
                    if out.len() > 64 {
                        return Err(SnapshotError::Invalid {
                            dir: dir.display().to_string(),
                            reason: "more than 64 diff snapshots chained (or a loop)".into(),
                        });
                    }
                    cur = p;
                }
            }
        }
        out.reverse();
        Ok(out)
    }
}

/// Milliseconds since the epoch, for `created_unix_ms`.
/// Makes `dst` a copy of the full snapshot in `src` whose VM config is changed by `edit` (a
/// clone's disks, MACs): the state file is rewritten with its own checksum, the memory file is
/// hard-linked (copied where a link cannot be made), so restoring it costs no more than the
/// original. `dst` must not exist.
pub fn derive(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut crate::config::VmConfig),
) -> Result<(), SnapshotError> {
    let invalid = |reason: String| SnapshotError::Invalid {
        dir: dst.display().to_string(),
        reason,
    };
    let mut s = VmSnapshot::read(src)?;
    if s.memory.diff.is_some() {
        return Err(invalid(
            "a diff snapshot cannot be derived from; take a full one".into(),
        ));
    }
    let mut config: crate::config::VmConfig = serde_json::from_value(s.machine.config.clone())
        .map_err(|e| invalid(format!("its VM config: {e}")))?;
    edit(&mut config);
    s.machine.config = serde_json::to_value(&config).map_err(|e| invalid(e.to_string()))?;
    std::fs::create_dir(dst).map_err(|e| invalid(format!("cannot create it: {e}")))?;
    let (from, to) = (src.join(MEMORY_FILE), dst.join(MEMORY_FILE));
    if std::fs::hard_link(&from, &to).is_err() {
        std::fs::copy(&from, &to)
            .map_err(|e| invalid(format!("cannot copy {}: {e}", from.display())))?;
    }
    s.write(dst)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
