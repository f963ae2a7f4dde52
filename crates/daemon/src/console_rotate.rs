//! Console logs of VMs and containers grow as long as their guest writes: above a size cap the log
//! is copied to `console.log.1` (replacing the older one) and truncated in place.
//!
//! Copy-and-truncate, not rename: the writers (a VMM's stdout, a container's console monitor)
//! hold the file open with O_APPEND and are not told, so after the truncation their next write
//! lands at the start of the same file. Bytes written between the copy and the truncation are
//! lost, which is the usual price of this scheme (logrotate's copytruncate). Readers following
//! the log notice the file shrank and start over (server::LogTail).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Size above which a console log is rotated.
pub const MAX_BYTES: u64 = 8 << 20;
/// How often the logs are checked.
const PERIOD: Duration = Duration::from_secs(2);

/// Rotates `log` if it is larger than `cap`; returns whether it did.
pub fn rotate_if_larger(log: &Path, cap: u64) -> std::io::Result<bool> {
    let len = match std::fs::metadata(log) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= cap {
        return Ok(false);
    }
    let old = old_path(log);
    let tmp = log.with_extension("log.1.tmp");
    std::fs::copy(log, &tmp)?;
    std::fs::rename(&tmp, &old)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)?;
    Ok(true)
}

/// `console.log` -> `console.log.1`.
pub fn old_path(log: &Path) -> PathBuf {
    let mut s = log.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// Every console log under the state directory: VMs' and containers'.
fn logs(state_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for (dir, file) in [
        (state_dir.join("vms"), crate::shim::CONSOLE_LOG),
        (
            state_dir.join(crate::ct::CT_DIR).join("containers"),
            "console.log",
        ),
    ] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            out.extend(rd.flatten().map(|e| e.path().join(file)));
        }
    }
    out
}

/// Checks every console log periodically, for the daemon's lifetime.
pub fn spawn(state_dir: PathBuf, cap: u64) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(PERIOD).await;
            let dir = state_dir.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for log in logs(&dir) {
                    match rotate_if_larger(&log, cap) {
                        Ok(true) => tracing::info!(log = %log.display(), "console log rotated"),
                        Ok(false) => {}
                        Err(e) => tracing::warn!(log = %log.display(), "cannot rotate: {e}"),
                    }
                }
            })
            .await;
        }
    });
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn rotates_above_the_cap_keeping_one_old_file_and_the_writer_goes_on() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("console.log");
        let mut w = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        w.write_all(b"0123456789").unwrap();
        assert!(!rotate_if_larger(&log, 10).unwrap());
        w.write_all(b"abc").unwrap();
        assert!(rotate_if_larger(&log, 10).unwrap());
        assert_eq!(std::fs::read(old_path(&log)).unwrap(), b"0123456789abc");
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        // The writer, unaware, appends at the new start.
        w.write_all(b"after").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"after");
        w.write_all(b"-more-than-ten").unwrap();
        assert!(rotate_if_larger(&log, 10).unwrap());
        // Only one old file, the newest.
        assert_eq!(
            std::fs::read(old_path(&log)).unwrap(),
            b"after-more-than-ten"
        );
        assert!(!t.path().join("console.log.2").exists());
        assert!(!rotate_if_larger(&t.path().join("none.log"), 1).unwrap());
    }
}
