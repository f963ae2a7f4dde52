//! Loading the guest image: an ELF64 x86-64 executable (segments at their physical addresses,
//! through linux-loader) or, for files named `*.bin`, a flat binary at 1 MiB.
//!
//! The program headers are checked here first so a bad file gets a message that says what is
//! wrong with it (linux-loader's errors do not name the segment or the memory size).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use super::shown;
use crate::layout::KERNEL_MIN_ADDR;
use crate::memory::GuestMem;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot open kernel {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} is not an ELF64 x86-64 executable ({why}); name a flat binary *.bin")]
    NotElf { path: String, why: &'static str },
    #[error("kernel {path}: {why}")]
    BadElf { path: String, why: String },
    #[error("kernel {path} is empty")]
    Empty { path: String },
    #[error(
        "memory too small for kernel {path}: it ends at {end:#x} but RAM below the MMIO hole \
         ends at {ram_end:#x} (raise --memory)"
    )]
    TooBig {
        path: String,
        end: u64,
        ram_end: u64,
    },
    #[error("cannot load kernel {path}: {why}")]
    Load { path: String, why: String },
}

/// Where the image landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    pub entry: u64,
    pub start: u64,
    pub end: u64,
}

const PT_LOAD: u32 = 1;

/// Segment bounds read from the program headers, before anything is written to guest memory.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ElfPlan {
    pub entry: u64,
    pub start: u64,
    pub end: u64,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Checks the ELF header and program headers of `file` (`len` bytes).
pub(crate) fn plan_elf<R: Read + Seek>(
    file: &mut R,
    len: u64,
    path: &str,
) -> Result<ElfPlan, ImageError> {
    let not_elf = |why| ImageError::NotElf {
        path: path.to_string(),
        why,
    };
    let bad = |why: String| ImageError::BadElf {
        path: path.to_string(),
        why,
    };
    let mut eh = [0u8; 64];
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut eh))
        .map_err(|_| not_elf("shorter than an ELF header"))?;
    if &eh[0..4] != b"\x7fELF" {
        return Err(not_elf("no ELF magic"));
    }
    if eh[4] != 2 {
        return Err(not_elf("not 64-bit"));
    }
    if eh[5] != 1 {
        return Err(not_elf("not little-endian"));
    }
    if u16_at(&eh, 18) != 62 {
        return Err(not_elf("not x86-64"));
    }
    if u16_at(&eh, 16) != 2 {
        return Err(bad(
            "not an executable (ET_EXEC); link with -static -no-pie".into(),
        ));
    }
    let entry = u64_at(&eh, 24);
    let phoff = u64_at(&eh, 32);
    let phentsize = u16_at(&eh, 54);
    let phnum = u16_at(&eh, 56);
    if phentsize != 56 {
        return Err(bad(format!("program header size {phentsize}, expected 56")));
    }
    if phnum == 0 {
        return Err(bad("no program headers".into()));
    }
    phoff
        .checked_add(u64::from(phnum) * 56)
        .filter(|e| *e <= len)
        .ok_or_else(|| bad("program headers lie outside the file".into()))?;
    let mut table = vec![0u8; usize::from(phnum) * 56];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut table))
        .map_err(|e| bad(format!("cannot read program headers: {e}")))?;

    let (mut start, mut end) = (u64::MAX, 0u64);
    let mut entry_in_segment = false;
    for (i, ph) in table.chunks_exact(56).enumerate() {
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let (offset, paddr) = (u64_at(ph, 8), u64_at(ph, 24));
        let (filesz, memsz) = (u64_at(ph, 32), u64_at(ph, 40));
        if filesz > memsz {
            return Err(bad(format!("segment {i}: file size exceeds memory size")));
        }
        if offset.checked_add(filesz).is_none_or(|e| e > len) {
            return Err(bad(format!("segment {i}: data lies outside the file")));
        }
        let seg_end = paddr
            .checked_add(memsz)
            .ok_or_else(|| bad(format!("segment {i}: address overflows")))?;
        if paddr < KERNEL_MIN_ADDR {
            return Err(bad(format!(
                "segment {i} loads at {paddr:#x}, below {KERNEL_MIN_ADDR:#x} where the VMM \
                 keeps its tables"
            )));
        }
        let vaddr = u64_at(ph, 16);
        if (vaddr..vaddr.saturating_add(memsz)).contains(&entry) {
            entry_in_segment = true;
        }
        start = start.min(paddr);
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err(bad("no loadable segments".into()));
    }
    if !entry_in_segment {
        return Err(bad(format!(
            "entry point {entry:#x} is outside every segment"
        )));
    }
    Ok(ElfPlan { entry, start, end })
}

/// Loads the image into `mem`; everything must end below `ram_end`.
pub fn load(mem: &GuestMem, path: &Path, ram_end: u64) -> Result<Loaded, ImageError> {
    let p = shown(path);
    let mut file = File::open(path).map_err(|source| ImageError::Open {
        path: p.clone(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| ImageError::Open {
            path: p.clone(),
            source,
        })?
        .len();
    if len == 0 {
        return Err(ImageError::Empty { path: p });
    }
    let too_big = |end| ImageError::TooBig {
        path: p.clone(),
        end,
        ram_end,
    };
    let flat = path.extension().is_some_and(|e| e == "bin");
    if flat {
        let end = KERNEL_MIN_ADDR + len;
        if end > ram_end {
            return Err(too_big(end));
        }
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .map_err(|source| ImageError::Open {
                path: p.clone(),
                source,
            })?;
        mem.write_slice(&data, GuestAddress(KERNEL_MIN_ADDR))
            .map_err(|e| ImageError::Load {
                path: p.clone(),
                why: e.to_string(),
            })?;
        return Ok(Loaded {
            entry: KERNEL_MIN_ADDR,
            start: KERNEL_MIN_ADDR,
            end,
        });
    }
    let plan = plan_elf(&mut file, len, &p)?;
    if plan.end > ram_end {
        return Err(too_big(plan.end));
    }
    Elf::load(mem, None, &mut file, Some(GuestAddress(KERNEL_MIN_ADDR))).map_err(|e| {
        ImageError::Load {
            path: p.clone(),
            why: e.to_string(),
        }
    })?;
    Ok(Loaded {
        entry: plan.entry,
        start: plan.start,
        end: plan.end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    /// A minimal ELF64 with one PT_LOAD segment at `paddr` holding `code`.
    pub(crate) fn tiny_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 120];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[24..32].copy_from_slice(&paddr.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut f[64..120];
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[8..16].copy_from_slice(&120u64.to_le_bytes());
        ph[16..24].copy_from_slice(&paddr.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&(code.len() as u64 + 0x1000).to_le_bytes());
        f.extend_from_slice(code);
        f
    }

    fn plan(bytes: &[u8]) -> Result<ElfPlan, ImageError> {
        plan_elf(&mut Cursor::new(bytes), bytes.len() as u64, "k")
    }

    #[test]
    fn accepts_a_good_elf() {
        let f = tiny_elf(0x10_0000, &[0xf4]);
        assert_eq!(
            plan(&f).unwrap(),
            ElfPlan {
                entry: 0x10_0000,
                start: 0x10_0000,
                end: 0x10_1001
            }
        );
    }

    #[test]
    fn refuses_bad_headers_with_reasons() {
        let good = tiny_elf(0x10_0000, &[0xf4]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"MZ\x90\x00garbage".to_vec(), "shorter"),
            (vec![0u8; 200], "no ELF magic"),
            (
                {
                    let mut f = good.clone();
                    f[4] = 1;
                    f
                },
                "not 64-bit",
            ),
            (
                {
                    let mut f = good.clone();
                    f[18] = 3;
                    f
                },
                "not x86-64",
            ),
            (
                {
                    let mut f = good.clone();
                    f[16] = 3;
                    f
                },
                "ET_EXEC",
            ),
            (tiny_elf(0x1000, &[0xf4]), "below"),
            (
                {
                    let mut f = good.clone();
                    f[56] = 200;
                    f
                },
                "outside the file",
            ),
            (
                {
                    let mut f = good.clone();
                    f[27] = 0x40;
                    f
                },
                "entry point",
            ),
        ];
        for (bytes, want) in cases {
            let e = plan(&bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
    }

    #[test]
    fn loads_into_memory_and_checks_size() {
        let dir = std::env::temp_dir().join(format!("c4-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let elf = dir.join("k.elf");
        std::fs::write(&elf, tiny_elf(0x10_0000, &[0xf4, 0x90])).unwrap();
        let mem = crate::memory::allocate(4).unwrap();
        let l = load(&mem, &elf, 4 << 20).unwrap();
        assert_eq!(l.entry, 0x10_0000);
        let b: u8 = mem.read_obj(GuestAddress(0x10_0001)).unwrap();
        assert_eq!(b, 0x90);
        let e = load(&mem, &elf, 0x10_0800).unwrap_err();
        assert!(matches!(e, ImageError::TooBig { .. }), "{e}");
        let flat = dir.join("k.bin");
        std::fs::write(&flat, [0xeb, 0xfe]).unwrap();
        assert_eq!(load(&mem, &flat, 4 << 20).unwrap().entry, 0x10_0000);
        let garbage = dir.join("k.img");
        std::fs::write(&garbage, b"hello world, not a kernel").unwrap();
        assert!(matches!(
            load(&mem, &garbage, 4 << 20),
            Err(ImageError::NotElf { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = plan(&bytes);
        }

        #[test]
        fn corrupted_headers_never_panic(i in 0usize..120, v in any::<u8>()) {
            let mut f = tiny_elf(0x10_0000, &[0xf4]);
            f[i] = v;
            let _ = plan(&f);
        }
    }
}
