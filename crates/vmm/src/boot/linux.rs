//! The Linux x86 boot protocol, 64-bit entry (Documentation/arch/x86/boot.rst): a bzImage's
//! protected-mode kernel at 1 MiB, the zero page (`boot_params`) with the setup header copied from
//! the image, the command line, an initrd placed as high as the kernel allows, an e820 map of the
//! VMM's memory layout, and ACPI tables. The boot vCPU enters `startup_64` (load address + 0x200)
//! in long mode with `rsi` = the zero page. The same plan serves KVM and the software CPU.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use corefour_hypervisor::{DescriptorTable, Regs, Vcpu};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::{shown, BootError, BootPlan};
use crate::config::VmConfig;
use crate::layout::{self, HIGH_RAM_START, KERNEL_MIN_ADDR, MMIO_HOLE_START, PAGE_SIZE};
use crate::memory::GuestMem;

/// Where the zero page goes (below the page tables, above the VMM's GDT and command line).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// A GDT with the selectors the protocol names: __BOOT_CS 0x10, __BOOT_DS 0x18.
pub const LINUX_GDT_ADDR: u64 = 0x4000;
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
/// The boot vCPU's stack until the kernel sets its own (0x4020 up to here is free).
pub const LINUX_STACK_TOP: u64 = 0x7000;
/// The 64-bit entry point is this far into the protected-mode kernel.
pub const STARTUP_64_OFFSET: u64 = 0x200;

const SETUP_HEADER_OFFSET: usize = 0x1f1;
const HDRS_MAGIC: &[u8; 4] = b"HdrS";
const MIN_PROTOCOL: u16 = 0x020c; // 2.12: the first with xloadflags (XLF_KERNEL_64)
const XLF_KERNEL_64: u16 = 1;
const LOADED_HIGH: u8 = 1;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Conventional memory ends where the EBDA/VGA area starts.
const LOW_RAM_END: u64 = 0xa_0000;

#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error("cannot read kernel {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "kernel {path} uses boot protocol {major}.{minor:02}; a 64-bit entry needs 2.12 or newer \
         (Linux 3.8+)"
    )]
    OldProtocol {
        path: String,
        major: u16,
        minor: u16,
    },
    #[error("kernel {path} has no 64-bit entry point (XLF_KERNEL_64 clear in xloadflags)")]
    No64BitEntry { path: String },
    #[error("kernel {path} is not a bzImage the VMM can load: {why}")]
    Load { path: String, why: String },
    #[error("command line is {len} bytes; kernel {path} takes at most {max}")]
    Cmdline { path: String, len: usize, max: u32 },
    #[error(
        "memory too small for kernel {path}: it needs RAM up to {need:#x} (load address + \
         init_size{initrd}) but RAM below the MMIO hole ends at {have:#x} (raise --memory)"
    )]
    TooSmall {
        path: String,
        need: u64,
        have: u64,
        initrd: &'static str,
    },
    #[error(transparent)]
    Acpi(#[from] crate::acpi::AcpiError),
    #[error("cannot write boot data into guest memory: {0}")]
    Memory(String),
}

/// True when `path` is a bzImage ("HdrS" at 0x202); false for anything else, including files
/// too short to tell (the ELF loader then says what is wrong).
pub fn is_bzimage(path: &Path) -> bool {
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    let mut magic = [0u8; 4];
    f.seek(SeekFrom::Start(0x202)).is_ok()
        && f.read_exact(&mut magic).is_ok()
        && &magic == HDRS_MAGIC
}

/// Where everything went; what the unit tests and `setup_vcpu` read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxPlan {
    pub load_addr: u64,
    pub entry: u64,
    pub zero_page: u64,
    pub initrd: Option<(u64, u64)>,
    pub rsdp: u64,
}

/// The e820 map for `mem_bytes` of RAM laid out as `layout::ram_ranges` says.
pub fn e820(mem_bytes: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, ty: u32| boot_e820_entry {
        addr,
        size,
        r#type: ty,
    };
    let low_end = mem_bytes.min(MMIO_HOLE_START);
    let mut v = vec![
        entry(0, LOW_RAM_END, E820_RAM),
        // VGA window, option ROMs and the BIOS area, where the ACPI tables live.
        entry(LOW_RAM_END, KERNEL_MIN_ADDR - LOW_RAM_END, E820_RESERVED),
        entry(KERNEL_MIN_ADDR, low_end - KERNEL_MIN_ADDR, E820_RAM),
    ];
    // MMIO_HOLE_START..4 GiB is left out: a hole, where the kernel may place PCI BARs.
    if mem_bytes > low_end {
        v.push(entry(HIGH_RAM_START, mem_bytes - low_end, E820_RAM));
    }
    v
}

/// Loads the kernel and initrd, writes the zero page, command line, ACPI tables, page tables
/// and the boot GDT.
pub fn prepare(mem: &GuestMem, config: &VmConfig) -> Result<BootPlan, BootError> {
    let plan = load(mem, config)?;
    Ok(BootPlan {
        entry: plan.entry,
        stacks_base: LINUX_STACK_TOP - layout::STACK_SIZE,
        vcpus: config.vcpus,
        linux: Some(plan),
    })
}

fn load(mem: &GuestMem, config: &VmConfig) -> Result<LinuxPlan, LinuxError> {
    let path = shown(&config.kernel);
    let read_err = |source| LinuxError::Read {
        path: path.clone(),
        source,
    };
    let mut file = File::open(&config.kernel).map_err(read_err)?;
    let mut head = vec![0u8; SETUP_HEADER_OFFSET + std::mem::size_of::<boot_params>()];
    let got = read_up_to(&mut file, &mut head).map_err(read_err)?;
    head.truncate(got);
    let mut params = boot_params::default();
    // The setup header runs from 0x1f1 to 0x202 + the byte at 0x201 (boot.rst); copy just that.
    let hdr_end = head
        .get(0x201)
        .map_or(0, |&j| 0x202 + usize::from(j))
        .min(SETUP_HEADER_OFFSET + std::mem::size_of_val(&{ params.hdr }))
        .min(head.len());
    if hdr_end > SETUP_HEADER_OFFSET {
        params.as_mut_slice()[SETUP_HEADER_OFFSET..hdr_end]
            .copy_from_slice(&head[SETUP_HEADER_OFFSET..hdr_end]);
    }
    let hdr = params.hdr;
    let version = hdr.version;
    if version < MIN_PROTOCOL {
        return Err(LinuxError::OldProtocol {
            path,
            major: version >> 8,
            minor: version & 0xff,
        });
    }
    if hdr.xloadflags & XLF_KERNEL_64 == 0 || hdr.loadflags & LOADED_HIGH == 0 {
        return Err(LinuxError::No64BitEntry { path });
    }
    let cmdline = config.cmdline.as_bytes();
    let cmdline_max = hdr.cmdline_size;
    if cmdline.len() > layout::CMDLINE_MAX || cmdline.len() as u64 > u64::from(cmdline_max) {
        return Err(LinuxError::Cmdline {
            path,
            len: cmdline.len(),
            max: cmdline_max.min(layout::CMDLINE_MAX as u32),
        });
    }

    let mem_bytes = config.memory_mib << 20;
    let low_end = mem_bytes.min(MMIO_HOLE_START);
    // The decompressor runs where it is loaded and decompresses to pref_address (or the load
    // address, if higher); both need init_size bytes.
    let load_addr = KERNEL_MIN_ADDR;
    let kernel_top = load_addr
        .max(hdr.pref_address)
        .saturating_add(u64::from(hdr.init_size));
    if kernel_top > low_end {
        return Err(LinuxError::TooSmall {
            path,
            need: kernel_top,
            have: low_end,
            initrd: "",
        });
    }
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    BzImage::load(
        mem,
        Some(GuestAddress(load_addr)),
        &mut file,
        Some(GuestAddress(KERNEL_MIN_ADDR)),
    )
    .map_err(|e| LinuxError::Load {
        path: path.clone(),
        why: e.to_string(),
    })?;

    let initrd = match &config.initrd {
        None => None,
        Some(p) => {
            let data = std::fs::read(p).map_err(|source| LinuxError::Read {
                path: shown(p),
                source,
            })?;
            let size = data.len() as u64;
            // As high as possible: below initrd_addr_max and the end of low RAM, page-aligned,
            // above everything the kernel will occupy.
            let top = low_end.min(u64::from(hdr.initrd_addr_max) + 1);
            let at = top.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
            match at {
                Some(at) if at >= kernel_top => {
                    write(mem, at, &data)?;
                    Some((at, size))
                }
                _ => {
                    return Err(LinuxError::TooSmall {
                        path,
                        need: kernel_top.saturating_add(size),
                        have: top,
                        initrd: " + the initrd",
                    })
                }
            }
        }
    };

    write(mem, layout::CMDLINE_ADDR, cmdline)?;
    write(mem, layout::CMDLINE_ADDR + cmdline.len() as u64, &[0])?;
    let devices = crate::virtio_devices::acpi_devices(config);
    let rsdp = crate::acpi::write_tables(mem, config.vcpus, &devices)?;

    params.hdr.type_of_loader = 0xff;
    params.hdr.code32_start = load_addr as u32;
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.ext_cmd_line_ptr = 0;
    params.hdr.vid_mode = 0xffff; // "normal"
    let (ramdisk, ramdisk_size) = initrd.unwrap_or((0, 0));
    params.hdr.ramdisk_image = ramdisk as u32;
    params.hdr.ramdisk_size = ramdisk_size as u32;
    params.ext_ramdisk_image = (ramdisk >> 32) as u32;
    params.ext_ramdisk_size = (ramdisk_size >> 32) as u32;
    params.acpi_rsdp_addr = rsdp;
    let map = e820(mem_bytes);
    params.e820_entries = map.len() as u8;
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = e;
    }
    write(mem, ZERO_PAGE_ADDR, params.as_slice())?;

    super::longmode::write_tables(mem, mem_bytes).map_err(|e| memory_err(e.to_string()))?;
    write(mem, LINUX_GDT_ADDR, &boot_gdt())?;

    Ok(LinuxPlan {
        load_addr,
        entry: load_addr + STARTUP_64_OFFSET,
        zero_page: ZERO_PAGE_ADDR,
        initrd,
        rsdp,
    })
}

fn boot_gdt() -> Vec<u8> {
    [
        0u64,
        0,
        0x00af_9b00_0000_ffff, // 0x10 __BOOT_CS: 64-bit code, flat
        0x00cf_9300_0000_ffff, // 0x18 __BOOT_DS: data, flat
    ]
    .iter()
    .flat_map(|d| d.to_le_bytes())
    .collect()
}

/// The boot vCPU enters startup_64; the others stay in their reset state waiting for
/// INIT/SIPI, as application processors do on real hardware (the kernel starts them).
pub fn setup_vcpu(
    vcpu: &mut dyn Vcpu,
    plan: &BootPlan,
    linux: &LinuxPlan,
    index: u32,
) -> Result<(), BootError> {
    if index != 0 {
        return Ok(());
    }
    let err = |source| BootError::Vcpu { index, source };
    super::longmode::setup_vcpu(vcpu, plan, index).map_err(err)?;
    let mut s = vcpu.sregs().map_err(err)?;
    s.gdt = DescriptorTable {
        base: LINUX_GDT_ADDR,
        limit: 4 * 8 - 1,
    };
    s.cs.selector = BOOT_CS;
    for seg in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
        seg.selector = BOOT_DS;
    }
    vcpu.set_sregs(&s).map_err(err)?;
    vcpu.set_regs(&Regs {
        rip: linux.entry,
        rsp: LINUX_STACK_TOP,
        rsi: linux.zero_page,
        rflags: 0x2,
        ..Default::default()
    })
    .map_err(err)
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn memory_err(why: String) -> LinuxError {
    LinuxError::Memory(why)
}

fn write(mem: &GuestMem, addr: u64, data: &[u8]) -> Result<(), LinuxError> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|e| memory_err(format!("{e} at {addr:#x}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::PathBuf;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("c4-linux-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    /// A bzImage-shaped file: one setup sector after the boot sector, then `payload`.
    fn fake_bzimage(version: u16, xloadflags: u16, init_size: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 2 * 512];
        f[0x1f1] = 1; // setup_sects
        f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        f[0x201] = 0x6a; // header runs to 0x26c
        f[0x202..0x206].copy_from_slice(b"HdrS");
        f[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        f[0x211] = LOADED_HIGH;
        f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        f[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        f[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        f[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
        f[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
        f[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn zero_page(mem: &GuestMem) -> boot_params {
        mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap()
    }

    #[test]
    fn detects_bzimages_only() {
        let bz = tmp("bz");
        std::fs::write(&bz, fake_bzimage(0x020f, 1, 0x10_0000, b"k")).unwrap();
        assert!(is_bzimage(&bz));
        let short = tmp("short");
        std::fs::write(&short, b"\x7fELF").unwrap();
        assert!(!is_bzimage(&short));
        assert!(!is_bzimage(&tmp("missing")));
    }

    #[test]
    fn e820_has_the_pc_holes() {
        let m = e820(256 << 20);
        let t: Vec<(u64, u64, u32)> = m.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            t,
            vec![
                (0, 0xa_0000, 1),
                (0xa_0000, 0x6_0000, 2),
                (0x10_0000, (256 << 20) - 0x10_0000, 1)
            ]
        );
        let big = e820(4 << 30);
        assert_eq!(big.len(), 4);
        assert_eq!(big[2].addr + big[2].size, MMIO_HOLE_START);
        assert_eq!((big[3].addr, big[3].size), (HIGH_RAM_START, 1 << 30));
    }

    #[test]
    fn fills_the_zero_page_and_places_the_initrd_high() {
        let k = tmp("k-ok");
        std::fs::write(&k, fake_bzimage(0x020f, 1, 0x20_0000, b"KERNEL")).unwrap();
        let rd = tmp("rd-ok");
        std::fs::write(&rd, vec![0x5a; 10_000]).unwrap();
        let mut c = VmConfig::new(&k);
        c.memory_mib = 64;
        c.cmdline = "console=ttyS0 panic=-1".into();
        c.initrd = Some(rd);
        let mem = crate::memory::allocate(64).unwrap();
        let plan = prepare(&mem, &c).unwrap();
        let l = plan.linux.unwrap();
        assert_eq!(l.entry, 0x10_0200);
        let p = zero_page(&mem);
        let hdr = p.hdr;
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, layout::CMDLINE_ADDR as u32);
        let (at, size) = l.initrd.unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(at % PAGE_SIZE, 0);
        assert!(
            at + size <= 64 << 20 && at + size + PAGE_SIZE > 64 << 20,
            "{at:#x}"
        );
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (at as u32, 10_000)
        );
        let b: u8 = mem.read_obj(GuestAddress(at + 9_999)).unwrap();
        assert_eq!(b, 0x5a);
        let mut kb = [0u8; 6];
        mem.read_slice(&mut kb, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&kb, b"KERNEL");
        assert_eq!({ p.acpi_rsdp_addr }, crate::acpi::RSDP_ADDR);
        assert_eq!(p.e820_entries, 3);
    }

    #[test]
    fn refuses_what_it_cannot_boot() {
        let mem = crate::memory::allocate(64).unwrap();
        let run = |name: &str, bytes: Vec<u8>, f: &dyn Fn(&mut VmConfig)| {
            let k = tmp(name);
            std::fs::write(&k, bytes).unwrap();
            let mut c = VmConfig::new(&k);
            f(&mut c);
            match prepare(&mem, &c) {
                Err(BootError::Linux(e)) => e,
                other => panic!("{name}: {other:?}"),
            }
        };
        let e = run("old", fake_bzimage(0x0206, 1, 0x1000, b"k"), &|_| {});
        assert!(matches!(e, LinuxError::OldProtocol { minor: 6, .. }), "{e}");
        let e = run("no64", fake_bzimage(0x020f, 0, 0x1000, b"k"), &|_| {});
        assert!(matches!(e, LinuxError::No64BitEntry { .. }), "{e}");
        let e = run("cmd", fake_bzimage(0x020f, 1, 0x1000, b"k"), &|c| {
            c.cmdline = "x".repeat(3000);
        });
        assert!(matches!(e, LinuxError::Cmdline { max: 2047, .. }), "{e}");
        let e = run("big", fake_bzimage(0x020f, 1, 0x1000_0000, b"k"), &|_| {});
        assert!(matches!(e, LinuxError::TooSmall { .. }), "{e}");
        assert!(e.to_string().contains("raise --memory"), "{e}");
        let rd = tmp("rd-big");
        std::fs::write(&rd, vec![0u8; 60 << 20]).unwrap();
        let e = run("rdbig", fake_bzimage(0x020f, 1, 0x20_0000, b"k"), &|c| {
            c.initrd = Some(rd.clone());
        });
        assert!(
            matches!(
                e,
                LinuxError::TooSmall {
                    initrd: " + the initrd",
                    ..
                }
            ),
            "{e}"
        );
    }

    /// The real Debian cloud kernel, when tests/fixtures/linux/setup.sh has fetched it.
    fn debian_fixture() -> Option<(PathBuf, PathBuf)> {
        let dir = std::env::var_os("COREFOUR_LINUX_CACHE").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/linux"),
            PathBuf::from,
        );
        let (k, i) = (dir.join("vmlinuz"), dir.join("initrd.cpio.gz"));
        (k.is_file() && i.is_file()).then_some((k, i))
    }

    #[test]
    fn debian_bzimage_zero_page_round_trips() {
        let Some((k, rd)) = debian_fixture() else {
            eprintln!(
                "SKIP debian_bzimage_zero_page_round_trips: no Debian kernel in .cache/linux \
                 (run tests/fixtures/linux/setup.sh)"
            );
            return;
        };
        let image = std::fs::read(&k).unwrap();
        let mut c = VmConfig::new(&k);
        c.memory_mib = 256;
        c.cmdline = "console=ttyS0 panic=-1 quiet".into();
        c.initrd = Some(rd.clone());
        let mem = crate::memory::allocate(256).unwrap();
        let plan = prepare(&mem, &c).unwrap();
        let l = plan.linux.unwrap();
        let p = zero_page(&mem);
        let hdr = p.hdr;
        // The setup header is the image's own, with the loader's fields filled in.
        let on_disk = &image[0x1f1..0x202 + usize::from(image[0x201])];
        let mut in_mem = p.as_slice()[0x1f1..0x1f1 + on_disk.len()].to_vec();
        for (o, n) in [(0x210, 1), (0x214, 4), (0x218, 8), (0x228, 4), (0x1fa, 2)] {
            in_mem[o - 0x1f1..o - 0x1f1 + n].copy_from_slice(&on_disk[o - 0x1f1..o - 0x1f1 + n]);
        }
        assert_eq!(in_mem, on_disk, "setup header copied verbatim");
        assert!({ hdr.version } >= 0x020f, "Debian 6.1 speaks protocol 2.15");
        assert_ne!({ hdr.xloadflags } & XLF_KERNEL_64, 0);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!(l.entry, KERNEL_MIN_ADDR + 0x200);
        // The protected-mode kernel is at 1 MiB.
        let setup = (usize::from(image[0x1f1]).max(4) + 1) * 512;
        let mut pm = vec![0u8; 4096];
        mem.read_slice(&mut pm, GuestAddress(KERNEL_MIN_ADDR))
            .unwrap();
        assert_eq!(pm, image[setup..setup + 4096]);
        // Command line.
        let mut cl = vec![0u8; c.cmdline.len() + 1];
        mem.read_slice(&mut cl, GuestAddress(u64::from(hdr.cmd_line_ptr)))
            .unwrap();
        assert_eq!(&cl[..c.cmdline.len()], c.cmdline.as_bytes());
        assert_eq!(cl[c.cmdline.len()], 0);
        // Initrd: high, below initrd_addr_max, above the decompressed kernel, intact.
        let want = std::fs::read(&rd).unwrap();
        let (at, size) = (u64::from(hdr.ramdisk_image), u64::from(hdr.ramdisk_size));
        assert_eq!(size, want.len() as u64);
        assert!(at + size <= u64::from(hdr.initrd_addr_max) + 1);
        assert!(
            at >= { hdr.pref_address } + u64::from(hdr.init_size),
            "{at:#x}"
        );
        assert!(
            at + size > (256 << 20) - 2 * PAGE_SIZE - size,
            "placed high: {at:#x}"
        );
        let mut got = vec![0u8; want.len()];
        mem.read_slice(&mut got, GuestAddress(at)).unwrap();
        assert!(got == want, "initrd bytes differ");
        // e820 and ACPI.
        let n = usize::from(p.e820_entries);
        let e820: Vec<(u64, u64, u32)> = p.e820_table[..n]
            .iter()
            .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
            .collect();
        assert_eq!(e820.len(), 3);
        assert_eq!(
            e820[2],
            (KERNEL_MIN_ADDR, (256 << 20) - KERNEL_MIN_ADDR, E820_RAM)
        );
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(p.acpi_rsdp_addr))
            .unwrap();
        assert_eq!(&sig, b"RSD PTR ");
    }

    proptest! {
        #[test]
        fn hostile_headers_never_panic(hdr in proptest::collection::vec(any::<u8>(), 0x80),
                                       tail in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut f = fake_bzimage(0x020f, 1, 0x1000, &tail);
            f[0x1f1..0x271].copy_from_slice(&hdr);
            f[0x202..0x206].copy_from_slice(b"HdrS");
            let k = tmp(&format!("fuzz-{}", std::thread::current().name().unwrap_or("t").len()));
            std::fs::write(&k, &f).unwrap();
            let mut c = VmConfig::new(&k);
            c.memory_mib = 32;
            let mem = crate::memory::allocate(32).unwrap();
            let _ = prepare(&mem, &c);
        }
    }
}
