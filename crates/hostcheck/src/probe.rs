//! The OS behind a trait, so every check can be fed canned files in tests (STYLE.md #9).

use std::io;

use crate::kvm::KvmError;

/// An open KVM system file descriptor, reduced to the two questions the host check asks it.
pub trait KvmHandle {
    /// `KVM_GET_API_VERSION` (12 on every kernel since 2.6.22).
    fn api_version(&self) -> i32;
    /// `KVM_CHECK_EXTENSION` with a raw `KVM_CAP_*` number: 0 when absent, else a positive value
    /// whose meaning depends on the capability (a count, a size, a bitmask).
    fn check_extension(&self, cap: u32) -> i32;
}

/// Everything the host check reads from the OS.
pub trait HostProbe {
    /// The whole text of a file (procfs, sysfs).
    fn read_file(&self, path: &str) -> io::Result<String>;
    /// At most `limit` bytes from the start of a file: /proc/cpuinfo is generated per CPU and can be
    /// hundreds of KiB on large hosts, while the check only needs the first processor's block.
    fn read_file_prefix(&self, path: &str, limit: usize) -> io::Result<String> {
        let mut s = self.read_file(path)?;
        if s.len() > limit {
            let mut end = limit;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
        Ok(s)
    }
    fn path_exists(&self, path: &str) -> bool;
    /// Names of a directory's entries, unsorted.
    fn list_dir(&self, path: &str) -> io::Result<Vec<String>>;
    /// Opens a device read-write and closes it again (/dev/net/tun: opening has no side effect).
    fn open_rw(&self, path: &str) -> io::Result<()>;
    /// Opens the KVM device.
    fn open_kvm(&self, path: &str) -> Result<Box<dyn KvmHandle>, KvmError>;
}

/// The running host.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealHost;

struct RealKvm(kvm_ioctls::Kvm);

impl KvmHandle for RealKvm {
    fn api_version(&self) -> i32 {
        self.0.get_api_version()
    }

    fn check_extension(&self, cap: u32) -> i32 {
        self.0.check_extension_raw(cap.into())
    }
}

impl HostProbe for RealHost {
    fn read_file(&self, path: &str) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn read_file_prefix(&self, path: &str, limit: usize) -> io::Result<String> {
        use std::io::Read;
        let file = std::fs::File::open(path)?;
        let mut buf = Vec::with_capacity(limit.min(64 * 1024));
        let limit = u64::try_from(limit).unwrap_or(u64::MAX);
        file.take(limit).read_to_end(&mut buf)?;
        // A cut in the middle of a UTF-8 sequence only loses the partial character.
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn path_exists(&self, path: &str) -> bool {
        std::path::Path::new(path).exists()
    }

    fn list_dir(&self, path: &str) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn open_rw(&self, path: &str) -> io::Result<()> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(drop)
    }

    fn open_kvm(&self, path: &str) -> Result<Box<dyn KvmHandle>, KvmError> {
        let cpath = std::ffi::CString::new(path).map_err(|_| KvmError::Open {
            path: path.to_string(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        match kvm_ioctls::Kvm::new_with_path(&cpath) {
            Ok(kvm) => Ok(Box::new(RealKvm(kvm))),
            Err(e) => Err(KvmError::Open {
                path: path.to_string(),
                source: io::Error::from_raw_os_error(e.errno()),
            }),
        }
    }
}
