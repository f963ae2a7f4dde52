//! Terminals: the init makes a pty inside the container and sends its master over the
//! `--console-socket` (SCM_RIGHTS), as runc does; the receiving side is here too.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    connect, recvmsg, sendmsg, socket, AddressFamily, ControlMessage, ControlMessageOwned,
    MsgFlags, SockFlag, SockType, UnixAddr,
};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsoleError {
    #[error("console socket {path}: {cause}")]
    Connect { path: String, cause: nix::Error },
    #[error("console: {what}: {cause}")]
    Sys {
        what: &'static str,
        cause: nix::Error,
    },
    #[error("console: no file descriptor arrived")]
    NoFd,
}

/// Connects to the console socket (done by `create`, before the init leaves the host's mounts).
pub fn connect_socket(path: &Path) -> Result<OwnedFd, ConsoleError> {
    let err = |cause| ConsoleError::Connect {
        path: path.display().to_string(),
        cause,
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err)?;
    let addr = UnixAddr::new(path).map_err(err)?;
    connect(fd.as_raw_fd(), &addr).map_err(err)?;
    Ok(fd)
}

/// Opens a new pty in the container's devpts; returns (master, slave).
pub fn open_pty() -> Result<(OwnedFd, OwnedFd), ConsoleError> {
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let sys = |what| move |cause| ConsoleError::Sys { what, cause };
    let master = posix_openpt(
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC,
    )
    .map_err(sys("open /dev/ptmx"))?;
    grantpt(&master).map_err(sys("grantpt"))?;
    unlockpt(&master).map_err(sys("unlockpt"))?;
    let name = ptsname_r(&master).map_err(sys("ptsname"))?;
    let slave = nix::fcntl::open(
        name.as_str(),
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(sys("open pty slave"))?;
    // SAFETY: PtyMaster owns the fd; into_raw_fd hands ownership to the OwnedFd.
    let master = unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(master)) };
    Ok((master, slave))
}

pub fn send_fd(sock: RawFd, fd: RawFd) -> Result<(), ConsoleError> {
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(b"/dev/ptmx")];
    sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::empty(), None).map_err(|cause| {
        ConsoleError::Sys {
            what: "send pty master",
            cause,
        }
    })?;
    Ok(())
}

pub fn recv_fd(sock: RawFd) -> Result<OwnedFd, ConsoleError> {
    let mut buf = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC).map_err(
        |cause| ConsoleError::Sys {
            what: "receive pty master",
            cause,
        },
    )?;
    for c in msg.cmsgs().map_err(|cause| ConsoleError::Sys {
        what: "control message",
        cause,
    })? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this fd for us; nobody else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(ConsoleError::NoFd)
}

/// Makes `slave` the controlling terminal and stdio of the calling (init) process.
pub fn become_tty(slave: &OwnedFd) -> Result<(), ConsoleError> {
    let sys = |what| move |cause| ConsoleError::Sys { what, cause };
    nix::unistd::setsid().map_err(sys("setsid"))?;
    // SAFETY: TIOCSCTTY on a valid tty fd with argument 0.
    if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } < 0 {
        return Err(ConsoleError::Sys {
            what: "TIOCSCTTY",
            cause: nix::Error::last(),
        });
    }
    for target in 0..3 {
        // SAFETY: dup2 onto the stdio numbers; both are valid descriptors.
        if unsafe { libc::dup2(slave.as_raw_fd(), target) } < 0 {
            return Err(ConsoleError::Sys {
                what: "dup2 pty",
                cause: nix::Error::last(),
            });
        }
    }
    Ok(())
}
