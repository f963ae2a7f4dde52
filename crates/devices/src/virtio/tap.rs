//! A tap device: created, or attached to by name, through /dev/net/tun and TUNSETIFF.
//!
//! The tap carries a 12-byte virtio-net header in front of each frame (IFF_VNET_HDR with
//! TUNSETVNETHDRSZ = 12), the same header the guest uses, so frames move between guest memory
//! and the tap with one readv/writev and no copy.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun: {0} (is the tun driver available? are you root or CAP_NET_ADMIN?)")]
    OpenTun(#[source] io::Error),
    #[error("tap name `{0}` is longer than 15 bytes or contains a NUL")]
    BadName(String),
    #[error("TUNSETIFF for tap `{name}` failed: {source} (creating a tap needs CAP_NET_ADMIN; attaching needs access to an existing persistent tap)")]
    SetIff {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("configuring tap `{name}` ({what}) failed: {source}")]
    Configure {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

const IFNAMSIZ: usize = 16;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Size of `struct virtio_net_hdr_v1` (with num_buffers), what VERSION_1 drivers use.
pub const VNET_HDR_LEN: usize = 12;

#[repr(C)]
struct IfReqFlags {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens tap `name` (created if it does not exist; an empty name lets the kernel pick
    /// `tapN`) and brings it up.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.len() >= IFNAMSIZ || name.contains('\0') {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReqFlags {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if r < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let name = CStr::from_bytes_until_nul(&req.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_else(|_| name.to_string());
        let cfg = |what, r: libc::c_int| {
            if r < 0 {
                Err(TapError::Configure {
                    name: name.clone(),
                    what,
                    source: io::Error::last_os_error(),
                })
            } else {
                Ok(())
            }
        };
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        cfg("TUNSETVNETHDRSZ", unsafe {
            libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr)
        })?;
        // No offloads: we do not offer the guest checksum/GSO features, so the tap must not
        // hand us partial-checksum or GSO frames.
        // SAFETY: TUNSETOFFLOAD takes an unsigned long by value.
        cfg("TUNSETOFFLOAD", unsafe {
            libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong)
        })?;
        let tap = Tap { file, name };
        tap.set_up().map_err(|source| TapError::Configure {
            name: tap.name.clone(),
            what: "link up",
            source,
        })?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn set_up(&self) -> io::Result<()> {
        // SAFETY: plain socket creation; the fd is wrapped in a File right away.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `s` is a fresh fd we own.
        let sock = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(s) };
        let mut req = IfReqFlags {
            name: [0; IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read/write an ifreq with the flags member.
        unsafe {
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
                return Err(io::Error::last_os_error());
            }
            req.flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// readv into `iov`; Ok(None) when nothing is waiting.
    pub fn readv(&self, iov: &[libc::iovec]) -> io::Result<Option<usize>> {
        // SAFETY: the caller's iovecs point at writable memory it keeps alive for the call.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        nonblocking(n)
    }

    /// writev one frame (virtio-net header first).
    pub fn writev(&self, iov: &[libc::iovec]) -> io::Result<Option<usize>> {
        // SAFETY: the caller's iovecs point at readable memory it keeps alive for the call.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        nonblocking(n)
    }
}

fn nonblocking(n: isize) -> io::Result<Option<usize>> {
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(e)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
