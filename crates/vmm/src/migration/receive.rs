//! The target side: accept one migration, fill guest memory, hand over the state.

use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use super::disks::DiskSink;
use super::protocol::{self as p, Hello, ProtocolError};
use crate::snapshot::dirty::PAGE_SIZE;
use crate::snapshot::memfile::HostRegion;

/// One incoming migration, step by step: the VMM builds the VM between the steps.
pub struct Incoming {
    r: BufReader<TcpStream>,
    w: TcpStream,
    pub peer: String,
}

impl Incoming {
    /// Waits for a source to connect and say HELLO.
    pub fn accept(
        listener: &TcpListener,
        io_timeout: Duration,
    ) -> Result<(Self, Hello), ProtocolError> {
        let (stream, peer) = listener.accept()?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(io_timeout))?;
        stream.set_write_timeout(Some(io_timeout))?;
        let w = stream.try_clone()?;
        let mut me = Self {
            r: BufReader::with_capacity(1 << 20, stream),
            w,
            peer: peer.to_string(),
        };
        let body = p::expect(&mut me.r, p::TAG_HELLO, "HELLO")?;
        let hello: Hello = p::parse("HELLO", &body)?;
        if hello.version != p::PROTOCOL_VERSION {
            let why = format!(
                "migration protocol version {} is not supported (this corefour speaks {})",
                hello.version,
                p::PROTOCOL_VERSION
            );
            me.refuse(&why);
            return Err(ProtocolError::Refused(why));
        }
        Ok((me, hello))
    }

    /// Tells the source why this target will not take the VM (best effort).
    pub fn refuse(&mut self, why: &str) {
        let _ = p::send(&mut self.w, p::TAG_REFUSE, why.as_bytes());
    }

    pub fn ready(&mut self) -> Result<(), ProtocolError> {
        p::send(&mut self.w, p::TAG_READY, &[])
    }

    /// Writes incoming pages into `regions` (and disk frames into `disks`) until the STATE
    /// arrives; returns the state frame. Every page and disk message is bounds-checked against
    /// the layout and the announced disks: the source is not trusted to write outside guest
    /// memory or the disks it announced.
    pub fn receive_memory(
        &mut self,
        regions: &[HostRegion],
        disks: &mut DiskSink,
    ) -> Result<Vec<u8>, ProtocolError> {
        loop {
            let (tag, len) = p::recv_head(&mut self.r)?;
            match tag {
                p::TAG_PAGES => {
                    let mut head = [0u8; p::PAGES_HEAD];
                    if len < p::PAGES_HEAD as u64 {
                        return Err(malformed("PAGES", "shorter than its header".into()));
                    }
                    self.r.read_exact(&mut head)?;
                    let (region, first, count) = p::parse_pages_head(&head)
                        .ok_or_else(|| malformed("PAGES", "bad header".into()))?;
                    let h = regions
                        .get(region as usize)
                        .ok_or_else(|| malformed("PAGES", format!("no region {region}")))?;
                    let pages = h.region.size / PAGE_SIZE;
                    let fits = first.checked_add(count).is_some_and(|e| e <= pages);
                    if !fits || len - p::PAGES_HEAD as u64 != count * PAGE_SIZE {
                        return Err(malformed(
                            "PAGES",
                            format!("pages {first}+{count} do not fit region {region} or the message length"),
                        ));
                    }
                    // SAFETY: the range was just checked to lie inside the region's live
                    // mapping, and no vCPU runs on this memory yet.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            (h.host_addr as *mut u8).add((first * PAGE_SIZE) as usize),
                            (count * PAGE_SIZE) as usize,
                        )
                    };
                    self.r.read_exact(dst)?;
                }
                p::TAG_DISK => disks.receive(&mut self.r, len)?,
                p::TAG_ROUND => {
                    p::recv_body(&mut self.r, len)?;
                }
                p::TAG_DISK_SYNC => {
                    p::recv_body(&mut self.r, len)?;
                    disks.flush().map_err(|e| {
                        ProtocolError::Io(std::io::Error::other(format!(
                            "cannot flush the disk copies: {e}"
                        )))
                    })?;
                    p::send(&mut self.w, p::TAG_DISK_SYNCED, &[])?;
                    self.w.flush()?;
                }
                p::TAG_STATE => return p::recv_body(&mut self.r, len),
                p::TAG_ABORT => {
                    let b = p::recv_body(&mut self.r, len)?;
                    return Err(ProtocolError::Aborted(String::from_utf8_lossy(&b).into()));
                }
                got => {
                    return Err(ProtocolError::Unexpected {
                        got,
                        want: "PAGES or STATE",
                    })
                }
            }
        }
    }

    /// The state is loaded into the new VM; waits for the source's COMMIT.
    pub fn loaded_wait_commit(&mut self) -> Result<(), ProtocolError> {
        p::send(&mut self.w, p::TAG_LOADED, &[])?;
        self.w.flush()?;
        p::expect(&mut self.r, p::TAG_COMMIT, "COMMIT")?;
        Ok(())
    }

    /// The guest runs here now.
    pub fn started(&mut self) -> Result<(), ProtocolError> {
        p::send(&mut self.w, p::TAG_STARTED, &[])?;
        self.w.flush()?;
        Ok(())
    }
}

fn malformed(what: &'static str, reason: String) -> ProtocolError {
    ProtocolError::Malformed { what, reason }
}
