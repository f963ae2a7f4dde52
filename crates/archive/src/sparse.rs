//! The sparse encoding of a disk member:
//! ```text
//! "C4SPARS1" | logical size u64 LE | extent count u64 LE | count × (offset u64, len u64) | data
//! ```
//! The data of every extent follows the table, in table order. Extents come from
//! SEEK_DATA/SEEK_HOLE, so holes are never read on export; on import they are never written.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

pub const MAGIC: [u8; 8] = *b"C4SPARS1";
/// A table larger than this is refused on import (16 MiB of extents; a real disk has far fewer).
pub const MAX_EXTENTS: u64 = 1 << 20;

/// The data extents of `f` (offset, length), in order.
pub fn extents(f: &File) -> std::io::Result<Vec<(u64, u64)>> {
    let len = f.metadata()?.len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        // SAFETY: lseek on an fd we own; it only moves the file position.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // No data after `pos`: the rest is a hole.
                Some(libc::ENXIO) => break,
                // A filesystem without hole reporting: treat everything as data.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    return Ok(if len > 0 { vec![(0, len)] } else { vec![] })
                }
                _ => return Err(e),
            }
        }
        let data = data as u64;
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64).min(len);
        if hole > data {
            out.push((data, hole - data));
        }
        pos = hole;
    }
    Ok(out)
}

/// Bytes of the encoding of a file with these extents.
pub fn encoded_len(extents: &[(u64, u64)]) -> u64 {
    24 + 16 * extents.len() as u64 + extents.iter().map(|e| e.1).sum::<u64>()
}

/// Reads a file as its sparse encoding (for `tar::Builder::append_data`).
pub struct Encoder {
    file: File,
    head: Vec<u8>,
    head_pos: usize,
    extents: Vec<(u64, u64)>,
    ext: usize,
    done_in_ext: u64,
}

impl Encoder {
    pub fn new(file: File) -> std::io::Result<Self> {
        let logical = file.metadata()?.len();
        let extents = extents(&file)?;
        let mut head = Vec::with_capacity(24 + 16 * extents.len());
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&logical.to_le_bytes());
        head.extend_from_slice(&(extents.len() as u64).to_le_bytes());
        for (o, l) in &extents {
            head.extend_from_slice(&o.to_le_bytes());
            head.extend_from_slice(&l.to_le_bytes());
        }
        Ok(Self {
            file,
            head,
            head_pos: 0,
            extents,
            ext: 0,
            done_in_ext: 0,
        })
    }

    pub fn len(&self) -> u64 {
        encoded_len(&self.extents)
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Read for Encoder {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.head_pos < self.head.len() {
            let n = buf.len().min(self.head.len() - self.head_pos);
            buf[..n].copy_from_slice(&self.head[self.head_pos..self.head_pos + n]);
            self.head_pos += n;
            return Ok(n);
        }
        while let Some(&(off, len)) = self.extents.get(self.ext) {
            if self.done_in_ext == len {
                self.ext += 1;
                self.done_in_ext = 0;
                continue;
            }
            let want = (len - self.done_in_ext).min(buf.len() as u64) as usize;
            let n = self
                .file
                .read_at(&mut buf[..want], off + self.done_in_ext)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shrank while it was being exported",
                ));
            }
            self.done_in_ext += n as u64;
            return Ok(n);
        }
        Ok(0)
    }
}

enum Stage {
    Header,
    Table,
    Data,
}

/// Writes a sparse encoding, as it streams in, out to a sparse file. Every field is checked:
/// the stream comes from an archive that is not yet verified.
pub struct Decoder {
    file: File,
    stage: Stage,
    buf: Vec<u8>,
    need: usize,
    logical: u64,
    count: u64,
    extents: Vec<(u64, u64)>,
    ext: usize,
    done_in_ext: u64,
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

impl Decoder {
    pub fn new(file: File) -> Self {
        Self {
            file,
            stage: Stage::Header,
            buf: Vec::new(),
            need: 24,
            logical: 0,
            count: 0,
            extents: Vec::new(),
            ext: 0,
            done_in_ext: 0,
        }
    }

    fn parse_header(&mut self) -> std::io::Result<()> {
        if self.buf[..8] != MAGIC {
            return Err(invalid("sparse member has a bad magic".into()));
        }
        let u = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
        self.logical = u(&self.buf[8..16]);
        self.count = u(&self.buf[16..24]);
        if self.count > MAX_EXTENTS {
            return Err(invalid(format!(
                "sparse member lists {} extents (limit {MAX_EXTENTS})",
                self.count
            )));
        }
        self.buf.clear();
        self.stage = Stage::Table;
        self.need = (self.count * 16) as usize;
        Ok(())
    }

    fn parse_table(&mut self) -> std::io::Result<()> {
        let mut end = 0u64;
        for c in self.buf.chunks_exact(16) {
            let off = u64::from_le_bytes(c[..8].try_into().unwrap_or([0; 8]));
            let len = u64::from_le_bytes(c[8..].try_into().unwrap_or([0; 8]));
            let stop = off.checked_add(len);
            if len == 0 || off < end || !matches!(stop, Some(s) if s <= self.logical) {
                return Err(invalid(format!(
                    "sparse extent {off}+{len} is empty, out of order or past the {}-byte file",
                    self.logical
                )));
            }
            end = off + len;
            self.extents.push((off, len));
        }
        self.buf.clear();
        self.stage = Stage::Data;
        Ok(())
    }

    /// Checks that every extent arrived and sizes the file (the tail may be a hole).
    pub fn finish(self) -> std::io::Result<File> {
        let complete = matches!(self.stage, Stage::Data) && self.ext == self.extents.len();
        if !complete {
            return Err(invalid("sparse member ends before its data does".into()));
        }
        self.file.set_len(self.logical)?;
        Ok(self.file)
    }
}

impl Write for Decoder {
    fn write(&mut self, mut data: &[u8]) -> std::io::Result<usize> {
        let total = data.len();
        while !data.is_empty() {
            match self.stage {
                Stage::Header | Stage::Table => {
                    let n = (self.need - self.buf.len()).min(data.len());
                    self.buf.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.buf.len() == self.need {
                        if matches!(self.stage, Stage::Header) {
                            self.parse_header()?;
                        }
                        if matches!(self.stage, Stage::Table) && self.buf.len() == self.need {
                            self.parse_table()?;
                        }
                    }
                }
                Stage::Data => {
                    let Some(&(off, len)) = self.extents.get(self.ext) else {
                        return Err(invalid(
                            "sparse member has bytes after its last extent".into(),
                        ));
                    };
                    let n = ((len - self.done_in_ext) as usize).min(data.len());
                    self.file.write_all_at(&data[..n], off + self.done_in_ext)?;
                    self.done_in_ext += n as u64;
                    data = &data[n..];
                    if self.done_in_ext == len {
                        self.ext += 1;
                        self.done_in_ext = 0;
                    }
                }
            }
        }
        Ok(total)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("c4-sparse-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trips_a_sparse_file_and_keeps_it_sparse() {
        let d = tmp("rt");
        let src = d.join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(&[7u8; 8192], 20 << 20).unwrap();
        drop(f);
        let enc = Encoder::new(File::open(&src).unwrap()).unwrap();
        let len = enc.len();
        assert!(len < 1 << 20, "holes are not encoded ({len} bytes)");
        let mut bytes = Vec::new();
        let mut enc = enc;
        enc.read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, len);

        let dst = d.join("dst");
        let mut dec = Decoder::new(File::create(&dst).unwrap());
        for c in bytes.chunks(1000) {
            dec.write_all(c).unwrap();
        }
        dec.finish().unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 1 << 20);

        // Cut short: refused at finish.
        let mut dec = Decoder::new(File::create(d.join("cut")).unwrap());
        dec.write_all(&bytes[..bytes.len() - 1]).unwrap();
        assert!(dec.finish().is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn hostile_tables_are_refused() {
        let d = tmp("bad");
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&100u64.to_le_bytes());
        head.extend_from_slice(&1u64.to_le_bytes());
        head.extend_from_slice(&90u64.to_le_bytes());
        head.extend_from_slice(&20u64.to_le_bytes());
        let mut dec = Decoder::new(File::create(d.join("x")).unwrap());
        assert!(dec.write_all(&head).is_err(), "extent past the end");
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&1u64.to_le_bytes());
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        let mut dec = Decoder::new(File::create(d.join("y")).unwrap());
        assert!(dec.write_all(&huge).is_err(), "absurd extent count");
        let mut dec = Decoder::new(File::create(d.join("z")).unwrap());
        assert!(dec.write_all(&[0u8; 24]).is_err(), "bad magic");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
