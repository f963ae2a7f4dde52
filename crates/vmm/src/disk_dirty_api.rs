//! `/vm/disks/dirty`: the virtio-blk dirty-chunk maps over the VMM's API, for incremental
//! copies driven from outside (a backup tool, a mirror run by another process).
//!
//! `PUT /vm/disks/dirty {"track": true}` starts a map on every writable disk (empty: what the
//! guest writes from now on), `{"track": false}` drops them; `GET /vm/disks/dirty` returns the
//! written byte ranges of each disk since the start or the previous GET, and clears them
//! (fetch-and-clear). A migration that mirrors the disks owns the maps meanwhile: requests
//! here get 409 until it ends, and the reverse.

use corefour_devices::virtio::blk_dirty::{self, BlkDirtyError, CHUNK};
use serde::{Deserialize, Serialize};

const OWNER: &str = "the API (/vm/disks/dirty)";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrackRequest {
    track: bool,
}

#[derive(Debug, Serialize)]
struct DiskDirty {
    path: String,
    size: u64,
    chunk_size: u64,
    /// `[offset, length]` byte ranges written since the last fetch.
    dirty: Vec<(u64, u64)>,
    dirty_bytes: u64,
}

fn status(e: &BlkDirtyError) -> u16 {
    match e {
        BlkDirtyError::Busy { .. } | BlkDirtyError::NotTracked { .. } => 409,
        _ => 500,
    }
}

/// Answers one request on `/vm/disks/dirty`: (status, JSON body or fault message).
pub fn handle(method: &str, body: &[u8]) -> Result<Option<serde_json::Value>, (u16, String)> {
    let disks = blk_dirty::all();
    match method {
        "PUT" => {
            let req: TrackRequest = serde_json::from_slice(body).map_err(|e| {
                (
                    400,
                    format!("disk dirty request: {e} (expected {{\"track\": true|false}})"),
                )
            })?;
            if req.track {
                for (n, d) in disks.iter().enumerate() {
                    if let Err(e) = d.start(OWNER) {
                        disks[..n].iter().for_each(|d| d.stop(OWNER));
                        return Err((status(&e), e.to_string()));
                    }
                }
            } else {
                disks.iter().for_each(|d| d.stop(OWNER));
            }
            Ok(None)
        }
        "GET" => {
            let mut out = Vec::new();
            for d in &disks {
                let bits = d.take(OWNER).map_err(|e| (status(&e), e.to_string()))?;
                let dirty = d.ranges(&bits);
                out.push(DiskDirty {
                    path: d.path().display().to_string(),
                    size: d.size(),
                    chunk_size: CHUNK,
                    dirty_bytes: dirty.iter().map(|r| r.1).sum(),
                    dirty,
                });
            }
            serde_json::to_value(out)
                .map(Some)
                .map_err(|e| (500, e.to_string()))
        }
        m => Err((400, format!("{m} is not allowed on /vm/disks/dirty"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_fetch_and_clear_and_stop() {
        let dir = std::env::temp_dir().join(format!("c4-ddapi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.raw");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(4 * CHUNK).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        blk_dirty::register(fd, &p, 4 * CHUNK, None);
        assert_eq!(handle("GET", b"").unwrap_err().0, 409);
        assert_eq!(handle("PUT", b"{\"track\":1}").unwrap_err().0, 400);
        assert_eq!(handle("POST", b"").unwrap_err().0, 400);
        handle("PUT", br#"{"track": true}"#).unwrap();
        blk_dirty::mark(fd, 2 * CHUNK + 5, 10);
        let v = handle("GET", b"").unwrap().unwrap();
        let mine = v
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["path"] == p.canonicalize().unwrap().to_str().unwrap())
            .unwrap()
            .clone();
        assert_eq!(mine["dirty"], serde_json::json!([[2 * CHUNK, CHUNK]]));
        let v = handle("GET", b"").unwrap().unwrap();
        assert!(v.to_string().contains("\"dirty_bytes\":0"), "{v}");
        handle("PUT", br#"{"track": false}"#).unwrap();
        assert!(!blk_dirty::find(&p).unwrap().tracking());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
