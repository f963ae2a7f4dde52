//! The live-migration wire protocol over one TCP connection.
//!
//! Every message is `tag u32 LE | length u64 LE | body`. The source drives:
//! ```text
//! source                                   target
//! HELLO {version, config, regions}   ->
//!                                    <-    READY | REFUSE {reason}
//! PAGES {region, first, count, data} ->    (repeated: pre-copy rounds, then the last copy)
//! DISK {disk, offset, len, data}     ->    (with copy_storage, beside PAGES: see `disks`)
//! DISK_SYNC                          ->
//!                                    <-    DISK_SYNCED (the copies are durable so far)
//! ROUND {n, pages}                   ->
//! STATE (a CRC'd format frame)       ->
//!                                    <-    LOADED | REFUSE {reason}
//! COMMIT                             ->
//!                                    <-    STARTED
//! ```
//! The target runs the guest only after COMMIT, and the source stops for good only after
//! STARTED, so a cut link before COMMIT leaves exactly one copy running: the source's. An ABORT
//! from the source makes the target drop everything.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::snapshot::memfile::RamRegion;

/// 2: HELLO lists mirrored disks and DISK frames may follow.
pub const PROTOCOL_VERSION: u32 = 2;
/// Bodies larger than this are refused before allocation (pages go in chunks well below it).
pub const MAX_BODY: u64 = 64 << 20;
/// Pages per PAGES message.
pub const CHUNK_PAGES: u64 = 256;

pub const TAG_HELLO: u32 = 1;
pub const TAG_READY: u32 = 2;
pub const TAG_REFUSE: u32 = 3;
pub const TAG_PAGES: u32 = 4;
pub const TAG_ROUND: u32 = 5;
pub const TAG_STATE: u32 = 6;
pub const TAG_LOADED: u32 = 7;
pub const TAG_COMMIT: u32 = 8;
pub const TAG_STARTED: u32 = 9;
pub const TAG_ABORT: u32 = 10;
pub const TAG_DISK: u32 = 11;
pub const TAG_DISK_SYNC: u32 = 12;
pub const TAG_DISK_SYNCED: u32 = 13;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer sent a {0}-byte message, more than the {MAX_BODY}-byte limit")]
    TooLarge(u64),
    #[error("peer sent message {got} where {want} was expected")]
    Unexpected { got: u32, want: &'static str },
    #[error("peer sent a malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("the target refused: {0}")]
    Refused(String),
    #[error("the source aborted: {0}")]
    Aborted(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub config: serde_json::Value,
    pub regions: Vec<RamRegion>,
    /// The disks whose contents follow as DISK frames (`copy_storage`).
    #[serde(default)]
    pub disks: Vec<super::disks::DiskHello>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    pub n: u32,
    pub pages: u64,
}

pub fn send(w: &mut impl Write, tag: u32, body: &[u8]) -> Result<(), ProtocolError> {
    let mut head = [0u8; 12];
    head[..4].copy_from_slice(&tag.to_le_bytes());
    head[4..].copy_from_slice(&(body.len() as u64).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(body)?;
    Ok(())
}

pub fn send_json<T: Serialize>(w: &mut impl Write, tag: u32, v: &T) -> Result<(), ProtocolError> {
    let body = serde_json::to_vec(v).map_err(|e| ProtocolError::Malformed {
        what: "message",
        reason: e.to_string(),
    })?;
    send(w, tag, &body)
}

/// Reads one message head: (tag, body length).
pub fn recv_head(r: &mut impl Read) -> Result<(u32, u64), ProtocolError> {
    let mut head = [0u8; 12];
    r.read_exact(&mut head)?;
    let tag = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let mut l = [0u8; 8];
    l.copy_from_slice(&head[4..]);
    let len = u64::from_le_bytes(l);
    if len > MAX_BODY {
        return Err(ProtocolError::TooLarge(len));
    }
    Ok((tag, len))
}

pub fn recv_body(r: &mut impl Read, len: u64) -> Result<Vec<u8>, ProtocolError> {
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    Ok(body)
}

pub fn parse<T: serde::de::DeserializeOwned>(
    what: &'static str,
    body: &[u8],
) -> Result<T, ProtocolError> {
    serde_json::from_slice(body).map_err(|e| ProtocolError::Malformed {
        what,
        reason: e.to_string(),
    })
}

/// Reads a message that must be `want` (or a REFUSE/ABORT, turned into the error it means).
pub fn expect(r: &mut impl Read, want: u32, name: &'static str) -> Result<Vec<u8>, ProtocolError> {
    let (tag, len) = recv_head(r)?;
    let body = recv_body(r, len)?;
    match tag {
        t if t == want => Ok(body),
        TAG_REFUSE => Err(ProtocolError::Refused(
            String::from_utf8_lossy(&body).into(),
        )),
        TAG_ABORT => Err(ProtocolError::Aborted(
            String::from_utf8_lossy(&body).into(),
        )),
        got => Err(ProtocolError::Unexpected { got, want: name }),
    }
}

/// The fixed part of a PAGES body before the page data.
pub const PAGES_HEAD: usize = 4 + 8 + 8;

pub fn pages_head(region: u32, first: u64, count: u64) -> [u8; PAGES_HEAD] {
    let mut h = [0u8; PAGES_HEAD];
    h[..4].copy_from_slice(&region.to_le_bytes());
    h[4..12].copy_from_slice(&first.to_le_bytes());
    h[12..].copy_from_slice(&count.to_le_bytes());
    h
}

pub fn parse_pages_head(b: &[u8]) -> Option<(u32, u64, u64)> {
    if b.len() < PAGES_HEAD {
        return None;
    }
    let region = u32::from_le_bytes(b[..4].try_into().ok()?);
    let first = u64::from_le_bytes(b[4..12].try_into().ok()?);
    let count = u64::from_le_bytes(b[12..20].try_into().ok()?);
    Some((region, first, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_limits_hold() {
        let mut buf = Vec::new();
        send_json(&mut buf, TAG_ROUND, &Round { n: 3, pages: 9 }).unwrap();
        send(&mut buf, TAG_REFUSE, b"no room").unwrap();
        let mut r = buf.as_slice();
        let b = expect(&mut r, TAG_ROUND, "ROUND").unwrap();
        let round: Round = parse("ROUND", &b).unwrap();
        assert_eq!((round.n, round.pages), (3, 9));
        let err = expect(&mut r, TAG_READY, "READY").unwrap_err();
        assert!(matches!(err, ProtocolError::Refused(ref s) if s == "no room"));
        let mut huge = Vec::new();
        huge.extend_from_slice(&TAG_PAGES.to_le_bytes());
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            recv_head(&mut huge.as_slice()),
            Err(ProtocolError::TooLarge(_))
        ));
        let h = pages_head(2, 77, 5);
        assert_eq!(parse_pages_head(&h), Some((2, 77, 5)));
        assert_eq!(parse_pages_head(&h[..5]), None);
    }
}
