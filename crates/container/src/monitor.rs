//! The console monitor of a system container: a small detached process that holds the pty master
//! of the container's init, appends everything it prints to console.log, and lets one client at a
//! time attach through a Unix socket (`ct console`).

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::ContainerError;

pub const SOCKET: &str = "console.sock";

/// Forks the detached monitor; returns the socket end the container's create must send the pty
/// master to. The monitor lives until the container's console closes.
pub fn spawn(dir: &Path) -> Result<OwnedFd, ContainerError> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| ContainerError::sys("console socketpair", e))?;
    let log_path = dir.join("console.log");
    let sock_path = dir.join(SOCKET);
    // SAFETY: the CLI is single-threaded; the child only runs the monitor loop below.
    match unsafe { nix::unistd::fork() }
        .map_err(|e| ContainerError::sys("fork console monitor", e))?
    {
        nix::unistd::ForkResult::Parent { child } => {
            drop(theirs);
            let _ = nix::sys::wait::waitpid(child, None);
            Ok(ours)
        }
        nix::unistd::ForkResult::Child => {
            drop(ours);
            let _ = nix::unistd::setsid();
            // SAFETY: second fork so the monitor is not our caller's child; then plain exits.
            match unsafe { nix::unistd::fork() } {
                Ok(nix::unistd::ForkResult::Child) => {
                    detach_stdio();
                    let _ = run(theirs, &log_path, &sock_path);
                    let _ = std::fs::remove_file(&sock_path);
                    // SAFETY: the monitor ends without running its parent's exit handlers.
                    unsafe { libc::_exit(0) }
                }
                // SAFETY: the intermediate process only exits.
                _ => unsafe { libc::_exit(0) },
            }
        }
    }
}

fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: dup2 of a valid descriptor onto the stdio numbers.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

fn run(from_init: OwnedFd, log_path: &Path, sock_path: &PathBuf) -> Result<(), ContainerError> {
    let master = crate::console::recv_fd(from_init.as_raw_fd())?;
    drop(from_init);
    let mut master = std::fs::File::from(master);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| ContainerError::io("open console.log", e))?;
    let _ = std::fs::remove_file(sock_path);
    let listener = UnixListener::bind(sock_path)
        .map_err(|e| ContainerError::io(format!("bind {}", sock_path.display()), e))?;
    let mut client: Option<UnixStream> = None;
    let mut buf = [0u8; 8192];
    loop {
        let mut fds = vec![
            PollFd::new(master.as_fd(), PollFlags::POLLIN),
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
        ];
        if let Some(c) = &client {
            fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(ContainerError::sys("poll console", e)),
        }
        let rev: Vec<PollFlags> = fds
            .iter()
            .map(|f| f.revents().unwrap_or(PollFlags::empty()))
            .collect();
        drop(fds);
        if rev[0].intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => return Ok(()), // EIO: the container's last tty user is gone
                Ok(n) => {
                    let _ = log.write_all(&buf[..n]);
                    if let Some(c) = &mut client {
                        if c.write_all(&buf[..n]).is_err() {
                            client = None;
                        }
                    }
                }
            }
        }
        if rev[1].contains(PollFlags::POLLIN) {
            if let Ok((mut c, _)) = listener.accept() {
                if client.is_some() {
                    let _ = c.write_all(b"console busy: another client is attached\r\n");
                } else {
                    client = Some(c);
                }
            }
        }
        if rev.len() > 2
            && rev[2].intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
        {
            let mut drop_client = false;
            if let Some(c) = &mut client {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => drop_client = true,
                    Ok(n) => {
                        let _ = master.write_all(&buf[..n]);
                    }
                }
            }
            if drop_client {
                client = None;
            }
        }
    }
}
