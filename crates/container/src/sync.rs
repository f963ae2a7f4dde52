//! The message channel between `create` and the container init (a SOCK_SEQPACKET socketpair:
//! one message per `send`, so no framing is needed).

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    #[error("sync socket: {0}")]
    Sys(#[from] nix::Error),
    #[error("the container init exited during setup without saying why")]
    Eof,
    #[error("unexpected message {0:?} from the other side of the sync socket")]
    Unexpected(Msg),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// parent → init: uid/gid maps written, cgroup joined; go on.
    Go,
    /// init → parent: namespaces and mounts are ready; run createRuntime/prestart hooks.
    RunHooks,
    /// parent → init: hooks done.
    HooksDone,
    /// init → parent: the PID of the real init when it had to fork once more (PID namespace joined late).
    Pid(i32),
    /// init → parent: created; waiting for `start`.
    Ready,
    /// init → parent: setup failed.
    Error(String),
}

impl Msg {
    fn encode(&self) -> Vec<u8> {
        match self {
            Msg::Go => vec![b'G'],
            Msg::RunHooks => vec![b'H'],
            Msg::HooksDone => vec![b'h'],
            Msg::Ready => vec![b'R'],
            Msg::Pid(p) => {
                let mut v = vec![b'P'];
                v.extend_from_slice(&p.to_le_bytes());
                v
            }
            Msg::Error(s) => {
                let mut v = vec![b'E'];
                v.extend_from_slice(&s.as_bytes()[..s.len().min(4000)]);
                v
            }
        }
    }

    fn decode(b: &[u8]) -> Option<Msg> {
        Some(match *b.first()? {
            b'G' => Msg::Go,
            b'H' => Msg::RunHooks,
            b'h' => Msg::HooksDone,
            b'R' => Msg::Ready,
            b'P' => Msg::Pid(i32::from_le_bytes(b.get(1..5)?.try_into().ok()?)),
            b'E' => Msg::Error(String::from_utf8_lossy(&b[1..]).into_owned()),
            _ => return None,
        })
    }
}

pub struct Channel(pub OwnedFd);

impl Channel {
    pub fn pair() -> Result<(Channel, Channel), SyncError> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((Channel(a), Channel(b)))
    }

    pub fn send(&self, msg: &Msg) -> Result<(), SyncError> {
        send(self.0.as_raw_fd(), &msg.encode(), MsgFlags::MSG_NOSIGNAL)?;
        Ok(())
    }

    pub fn recv(&self) -> Result<Msg, SyncError> {
        let mut buf = [0u8; 4096];
        loop {
            match recv(self.0.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(0) => return Err(SyncError::Eof),
                Ok(n) => {
                    return Msg::decode(&buf[..n])
                        .ok_or(SyncError::Unexpected(Msg::Error("garbage".into())))
                }
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x1234_5678u32;
        for len in 0..64 {
            let mut b = vec![0u8; len];
            for v in b.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *v = x as u8;
            }
            let _ = Msg::decode(&b);
        }
        assert_eq!(Msg::decode(b"P\x01"), None);
        assert_eq!(Msg::decode(b""), None);
    }

    #[test]
    fn roundtrip() {
        let (a, b) = Channel::pair().unwrap();
        for m in [
            Msg::Go,
            Msg::RunHooks,
            Msg::HooksDone,
            Msg::Ready,
            Msg::Pid(1234),
            Msg::Error("boom".into()),
        ] {
            a.send(&m).unwrap();
            assert_eq!(b.recv().unwrap(), m);
        }
        drop(a);
        assert!(matches!(b.recv(), Err(SyncError::Eof)));
    }
}
