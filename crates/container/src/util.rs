//! Small helpers shared by the runtime modules.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

/// Writes `data` to an existing file (cgroup, /proc and sysctl files) in one `write`.
pub fn write_file(path: &Path, data: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    f.write_all(data.as_bytes())
}

/// Resolves `unsafe_path` inside `root` as if `root` were `/`: symlinks (absolute or relative) and
/// `..` never leave `root`. Components that do not exist are appended as they are.
pub fn secure_join(root: &Path, unsafe_path: &Path) -> PathBuf {
    let mut pending: Vec<std::ffi::OsString> = unsafe_path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(resolved.iter());
        candidate.push(&part);
        match std::fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() && links < 255 => {
                links += 1;
                let Ok(target) = std::fs::read_link(&candidate) else {
                    resolved.push(part);
                    continue;
                };
                if target.is_absolute() {
                    resolved.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => resolved.push(part),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(resolved.iter());
    out
}

/// RFC 3339 UTC timestamp with nanoseconds, as runc prints `created`.
pub fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs() as i64, now.subsec_nanos())
}

pub fn rfc3339(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// The process start time in clock ticks since boot (field 22 of /proc/PID/stat): with the PID it
/// names one process for good, so a recycled PID is never mistaken for the container.
pub fn process_start_ticks(pid: i32) -> Option<(u64, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let mut fields = after.split(' ');
    let state = fields.next()?.chars().next()?;
    // `after` starts at field 3 (state); start time is field 22.
    let ticks = fields.nth(18)?.parse().ok()?;
    Some((ticks, state))
}

/// Creates `path` as an empty regular file (a bind-mount target) if nothing is there.
pub fn ensure_file(path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(1_700_000_000, 5), "2023-11-14T22:13:20.000000005Z");
        assert_eq!(rfc3339(951_782_400, 0), "2000-02-29T00:00:00.000000000Z");
    }

    #[test]
    fn secure_join_stays_in_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.join("etc/up")).unwrap();
        assert_eq!(
            secure_join(root, Path::new("/abs/passwd")),
            root.join("etc/passwd")
        );
        assert_eq!(secure_join(root, Path::new("/etc/up/x")), root.join("x"));
        assert_eq!(secure_join(root, Path::new("../../x")), root.join("x"));
        assert_eq!(secure_join(root, Path::new("/a/b")), root.join("a/b"));
    }

    #[test]
    fn start_ticks_of_self() {
        let (ticks, state) = process_start_ticks(std::process::id() as i32).unwrap();
        assert!(ticks > 0);
        assert!(matches!(state, 'R' | 'S'), "{state}");
        assert!(process_start_ticks(-5).is_none());
    }
}
