//! `--copy-storage`: the VM's writable disks travel over the daemons' control connection.
//!
//! This is the stop-and-copy variant: the source pauses the guest, sends every writable disk,
//! then the memory pre-copy runs (it finds no dirty pages, the guest being paused) and the
//! target resumes the guest on its own copies. Downtime is therefore the disk copy time. A disk
//! goes as extents, each `[offset: u64 LE][len: u32 LE][len bytes]`, closed by a zero-length
//! extent; 4 KiB blocks of zeros are not sent, and the target's file starts sparse, so holes
//! stay holes. Read-only disks stay on shared storage (same path on the target).

use std::future::Future;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use corefour_api::{DiskSpec, VmCreate};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{Control, Msg, CONTROL_TIMEOUT};

/// The largest extent; also the read size on the source.
const EXTENT: usize = 1 << 20;
/// Zero detection granularity (the file system's usual block size).
const BLOCK: usize = 4096;
/// The qcow2 magic: such a file with a backing file would point at a path the target lacks.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// What `--copy-storage` moved, in the migration report.
#[derive(Debug, Default, Clone, Serialize)]
pub struct StorageReport {
    pub disks: usize,
    /// The disks' apparent sizes.
    pub bytes: u64,
    /// Bytes actually sent (zero blocks skipped).
    pub bytes_sent: u64,
    pub copy_ms: f64,
    /// From the pause before the disk copy to the guest running on the target.
    pub guest_paused_ms: f64,
}

/// The disks `--copy-storage` copies: every writable one, with its index in the spec.
pub(super) fn writable(spec: &VmCreate) -> impl Iterator<Item = (usize, &DiskSpec)> {
    spec.disks.iter().enumerate().filter(|(_, d)| !d.read_only)
}

/// Where the target keeps its copy of disk `index` (inside the VM's directory, so a failed
/// migration or a later delete removes it with the rest).
pub(super) fn local_copy(vm_dir: &Path, index: usize, src: &str) -> PathBuf {
    let base = Path::new(src)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("disk");
    vm_dir.join("disks").join(format!("{index}-{base}"))
}

/// Refuses, before anything is paused, a disk the copy could not carry whole: unreadable, or a
/// qcow2 overlay whose backing file would be missing on the target.
pub(super) fn check_copyable(spec: &VmCreate) -> Result<(), String> {
    for (_, d) in writable(spec) {
        let mut head = [0u8; 16];
        let f = std::fs::File::open(&d.path)
            .map_err(|e| format!("cannot open disk {}: {e}", d.path))?;
        let n = std::os::unix::fs::FileExt::read_at(&f, &mut head, 0)
            .map_err(|e| format!("cannot read disk {}: {e}", d.path))?;
        if n == 16 && &head[..4] == QCOW2_MAGIC && head[8..16] != [0u8; 8] {
            return Err(format!(
                "disk {} is a qcow2 overlay with a backing file, which --copy-storage does not \
                 carry: flatten it first (`qemu-img convert`) or use shared storage",
                d.path
            ));
        }
    }
    Ok(())
}

async fn timed_for<T>(
    limit: Duration,
    what: &str,
    f: impl Future<Output = std::io::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no progress within {limit:?}")),
    }
}

async fn timed<T>(what: &str, f: impl Future<Output = std::io::Result<T>>) -> Result<T, String> {
    timed_for(CONTROL_TIMEOUT, what, f).await
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// The non-zero runs of `buf`, in whole blocks: (start, end) byte ranges.
fn nonzero_runs(buf: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < buf.len() {
        let end = (i + BLOCK).min(buf.len());
        if is_zero(&buf[i..end]) {
            i = end;
            continue;
        }
        let mut j = end;
        while j < buf.len() {
            let e = (j + BLOCK).min(buf.len());
            if is_zero(&buf[j..e]) {
                break;
            }
            j = e;
        }
        runs.push((i, j));
        i = j;
    }
    runs
}

/// The source side: sends every writable disk of `spec` (the guest is paused). A write that
/// makes no progress for `io_timeout` (a cut link) fails the copy.
pub(super) async fn send_disks(
    c: &mut Control,
    spec: &VmCreate,
    io_timeout: Duration,
) -> Result<StorageReport, String> {
    let t = Instant::now();
    let mut r = StorageReport::default();
    let mut buf = vec![0u8; EXTENT];
    for (index, d) in writable(spec) {
        let what = format!("disk {}", d.path);
        let mut f = timed(&what, tokio::fs::File::open(&d.path)).await?;
        let size = timed(&what, f.metadata()).await?.len();
        c.send(&Msg::Disk { index, size })
            .await
            .map_err(|e| format!("sending {what}: {e}"))?;
        let mut off = 0u64;
        while off < size {
            let want = (size - off).min(EXTENT as u64) as usize;
            timed(&what, f.read_exact(&mut buf[..want])).await?;
            for (a, b) in nonzero_runs(&buf[..want]) {
                let mut head = [0u8; 12];
                head[..8].copy_from_slice(&(off + a as u64).to_le_bytes());
                head[8..].copy_from_slice(&((b - a) as u32).to_le_bytes());
                timed_for(io_timeout, "sending a disk extent", c.w.write_all(&head)).await?;
                timed_for(
                    io_timeout,
                    "sending a disk extent",
                    c.w.write_all(&buf[a..b]),
                )
                .await?;
                r.bytes_sent += (b - a) as u64;
            }
            off += want as u64;
        }
        timed_for(
            io_timeout,
            "sending a disk's end",
            c.w.write_all(&[0u8; 12]),
        )
        .await?;
        timed_for(io_timeout, "sending a disk's end", c.w.flush()).await?;
        r.disks += 1;
        r.bytes += size;
    }
    r.copy_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(r)
}

/// The target side: receives every writable disk of `spec` into `vm_dir/disks/` and points
/// `spec` at the copies. On error the caller removes `vm_dir` (and so every copy).
pub(super) async fn receive_disks(
    c: &mut Control,
    spec: &mut VmCreate,
    vm_dir: &Path,
) -> Result<(), String> {
    let wanted: Vec<usize> = writable(spec).map(|(i, _)| i).collect();
    let dir = vm_dir.join("disks");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut buf = vec![0u8; EXTENT];
    for index in wanted {
        let size = match c.recv(CONTROL_TIMEOUT).await {
            Ok(Msg::Disk { index: i, size }) if i == index => size,
            Ok(Msg::Abort { reason }) => return Err(format!("the source aborted: {reason}")),
            Ok(other) => return Err(format!("expected disk {index}, got {other:?}")),
            Err(e) => return Err(format!("waiting for disk {index}: {e}")),
        };
        let path = local_copy(vm_dir, index, &spec.disks[index].path);
        let what = format!("writing {}", path.display());
        let mut f = timed(&what, tokio::fs::File::create(&path)).await?;
        timed(&what, f.set_len(size)).await?;
        loop {
            let mut head = [0u8; 12];
            timed("receiving a disk extent", c.r.read_exact(&mut head)).await?;
            let mut o = [0u8; 8];
            o.copy_from_slice(&head[..8]);
            let mut l = [0u8; 4];
            l.copy_from_slice(&head[8..]);
            let (off, len) = (u64::from_le_bytes(o), u32::from_le_bytes(l) as usize);
            if len == 0 {
                break;
            }
            if len > EXTENT || off.checked_add(len as u64).is_none_or(|e| e > size) {
                return Err(format!(
                    "disk {index}: an extent of {len} bytes at {off} lies outside its {size} bytes"
                ));
            }
            timed("receiving a disk extent", c.r.read_exact(&mut buf[..len])).await?;
            timed(&what, f.seek(SeekFrom::Start(off))).await?;
            timed(&what, f.write_all(&buf[..len])).await?;
        }
        timed(&what, f.sync_all()).await?;
        spec.disks[index].path = path.to_string_lossy().into_owned();
    }
    Ok(())
}

/// How long the guest stayed paused, for the report.
pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_are_skipped_and_runs_merge() {
        let mut b = vec![0u8; 5 * BLOCK + 100];
        b[BLOCK + 1] = 1;
        b[2 * BLOCK + 7] = 2;
        b[5 * BLOCK + 99] = 3;
        assert_eq!(
            nonzero_runs(&b),
            vec![(BLOCK, 3 * BLOCK), (5 * BLOCK, 5 * BLOCK + 100)]
        );
        assert!(nonzero_runs(&vec![0u8; 3 * BLOCK]).is_empty());
    }

    #[test]
    fn copies_live_in_the_vm_directory() {
        let p = local_copy(Path::new("/s/vms/a"), 2, "/x/y/root.qcow2");
        assert_eq!(p, Path::new("/s/vms/a/disks/2-root.qcow2"));
        assert_eq!(
            local_copy(Path::new("/d"), 0, "/"),
            Path::new("/d/disks/0-disk")
        );
    }

    #[tokio::test]
    async fn a_disk_arrives_whole_and_sparse_and_bad_extents_are_refused() {
        let dir = std::env::temp_dir().join(format!("c4mdisk{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src.raw");
        let mut data = vec![0u8; 3 * EXTENT + 512];
        data[10] = 7;
        data[EXTENT + 4095] = 9;
        data[3 * EXTENT + 511] = 1;
        std::fs::write(&src, &data).unwrap();
        let spec: VmCreate = serde_json::from_value(serde_json::json!({
            "name": "v", "kernel": "/k",
            "disks": [{"path": src}, {"path": "/ro", "read_only": true}]
        }))
        .unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let s2 = spec.clone();
        let sender = tokio::spawn(async move {
            let mut c = Control::new(tokio::net::TcpStream::connect(addr).await.unwrap());
            send_disks(&mut c, &s2, CONTROL_TIMEOUT).await.unwrap()
        });
        let (s, _) = l.accept().await.unwrap();
        let mut c = Control::new(s);
        let mut got = spec.clone();
        let vm_dir = dir.join("vm");
        receive_disks(&mut c, &mut got, &vm_dir).await.unwrap();
        let r = sender.await.unwrap();
        assert_eq!((r.disks, r.bytes), (1, data.len() as u64));
        // Two whole blocks and the 512-byte tail.
        assert_eq!(r.bytes_sent, 2 * BLOCK as u64 + 512);
        assert_eq!(got.disks[1].path, "/ro");
        assert_eq!(std::fs::read(&got.disks[0].path).unwrap(), data);

        // An extent past the disk's end is refused.
        let sender = tokio::spawn(async move {
            let mut c = Control::new(tokio::net::TcpStream::connect(addr).await.unwrap());
            c.send(&Msg::Disk {
                index: 0,
                size: 100,
            })
            .await
            .unwrap();
            let mut h = [0u8; 12];
            h[..8].copy_from_slice(&90u64.to_le_bytes());
            h[8..].copy_from_slice(&20u32.to_le_bytes());
            c.w.write_all(&h).await.unwrap();
            c.w.write_all(&[1u8; 20]).await.unwrap();
            c.w.flush().await.unwrap();
        });
        let (s, _) = l.accept().await.unwrap();
        let mut c = Control::new(s);
        let mut got = spec.clone();
        let err = receive_disks(&mut c, &mut got, &dir.join("vm2"))
            .await
            .unwrap_err();
        assert!(err.contains("outside its 100 bytes"), "{err}");
        sender.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
