//! The little AML the DSDT needs, encoded by hand (ACPI 6.4, chapter 20): names, integers,
//! strings, packages, buffers, scopes and devices, and the resource descriptors of a `_CRS`.
//! No AML compiler runs at build time and no crate in the field encodes AML on its own (see
//! tables.rs), so these few encoders live here; `tests` checks them against known bytes.

const NAME_OP: u8 = 0x08;
const SCOPE_OP: u8 = 0x10;
const BUFFER_OP: u8 = 0x11;
const PACKAGE_OP: u8 = 0x12;
const STRING_PREFIX: u8 = 0x0d;
const BYTE_PREFIX: u8 = 0x0a;
const WORD_PREFIX: u8 = 0x0b;
const DWORD_PREFIX: u8 = 0x0c;
const QWORD_PREFIX: u8 = 0x0e;
const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const EXT_OP_PREFIX: u8 = 0x5b;
const DEVICE_OP: u8 = 0x82;
const ROOT_CHAR: u8 = b'\\';

/// A PkgLength (20.2.4) for `body` bytes that follow it; the length counts itself.
fn pkg_length(body: usize) -> Vec<u8> {
    if body < 0x3f {
        return vec![(body + 1) as u8];
    }
    for n in 2..=4usize {
        let total = body + n;
        if total < 1 << (4 + 8 * (n - 1)) {
            let mut v = vec![(((n - 1) as u8) << 6) | (total & 0xf) as u8];
            for i in 0..n - 1 {
                v.push((total >> (4 + 8 * i)) as u8);
            }
            return v;
        }
    }
    // 2^28 bytes of AML cannot occur here: the tables must fit the 128 KiB BIOS area.
    vec![0xff, 0xff, 0xff, 0xff]
}

/// A NameString: `\` prefixes the root, dots separate 4-character segments (padded with `_`).
pub fn name(path: &str) -> Vec<u8> {
    let mut v = Vec::new();
    let rest = match path.strip_prefix('\\') {
        Some(r) => {
            v.push(ROOT_CHAR);
            r
        }
        None => path,
    };
    let segs: Vec<[u8; 4]> = rest
        .split('.')
        .map(|s| {
            let mut seg = [b'_'; 4];
            for (d, c) in seg.iter_mut().zip(s.bytes()) {
                *d = c;
            }
            seg
        })
        .collect();
    match segs.len() {
        1 => {}
        2 => v.push(0x2e),
        n => {
            v.push(0x2f);
            v.push(n as u8);
        }
    }
    for s in segs {
        v.extend_from_slice(&s);
    }
    v
}

/// The smallest encoding of an integer constant.
pub fn int(x: u64) -> Vec<u8> {
    match x {
        0 => vec![ZERO_OP],
        1 => vec![ONE_OP],
        2..=0xff => vec![BYTE_PREFIX, x as u8],
        0x100..=0xffff => {
            let mut v = vec![WORD_PREFIX];
            v.extend_from_slice(&(x as u16).to_le_bytes());
            v
        }
        0x1_0000..=0xffff_ffff => {
            let mut v = vec![DWORD_PREFIX];
            v.extend_from_slice(&(x as u32).to_le_bytes());
            v
        }
        _ => {
            let mut v = vec![QWORD_PREFIX];
            v.extend_from_slice(&x.to_le_bytes());
            v
        }
    }
}

/// A 32-bit constant always encoded as a DWord (for addresses in `_PRT`, as compilers emit).
pub fn dword(x: u32) -> Vec<u8> {
    let mut v = vec![DWORD_PREFIX];
    v.extend_from_slice(&x.to_le_bytes());
    v
}

pub fn string(s: &str) -> Vec<u8> {
    let mut v = vec![STRING_PREFIX];
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

/// EISAID("PNP0A03"): three letters in 5 bits each and four hex digits, stored big-endian.
pub fn eisa_id(id: &str) -> Vec<u8> {
    let b = id.as_bytes();
    let letter = |i: usize| u32::from(b.get(i).copied().unwrap_or(b'@').wrapping_sub(0x40) & 0x1f);
    let hex = u32::from_str_radix(id.get(3..7).unwrap_or("0000"), 16).unwrap_or(0);
    let v = (letter(0) << 26) | (letter(1) << 21) | (letter(2) << 16) | hex;
    dword(v.swap_bytes())
}

/// Name(path, value).
pub fn name_decl(path: &str, value: &[u8]) -> Vec<u8> {
    let mut v = vec![NAME_OP];
    v.extend(name(path));
    v.extend_from_slice(value);
    v
}

/// Package(n) { elements }.
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![elements.len() as u8];
    for e in elements {
        body.extend_from_slice(e);
    }
    let mut v = vec![PACKAGE_OP];
    v.extend(pkg_length(body.len()));
    v.extend(body);
    v
}

/// Buffer() { bytes }.
pub fn buffer(bytes: &[u8]) -> Vec<u8> {
    let mut body = int(bytes.len() as u64);
    body.extend_from_slice(bytes);
    let mut v = vec![BUFFER_OP];
    v.extend(pkg_length(body.len()));
    v.extend(body);
    v
}

fn named_block(op: &[u8], path: &str, terms: &[Vec<u8>]) -> Vec<u8> {
    let mut body = name(path);
    for t in terms {
        body.extend_from_slice(t);
    }
    let mut v = op.to_vec();
    v.extend(pkg_length(body.len()));
    v.extend(body);
    v
}

pub fn scope(path: &str, terms: &[Vec<u8>]) -> Vec<u8> {
    named_block(&[SCOPE_OP], path, terms)
}

pub fn device(path: &str, terms: &[Vec<u8>]) -> Vec<u8> {
    named_block(&[EXT_OP_PREFIX, DEVICE_OP], path, terms)
}

/// Resource descriptors (6.4) for a `_CRS` buffer; [`resources`] adds the end tag.
pub mod res {
    /// Word Address Space Descriptor: a range the device decodes for its children.
    /// `kind`: 1 = I/O, 2 = bus numbers.
    pub fn word_range(kind: u8, min: u16, max: u16) -> Vec<u8> {
        const MIN_MAX_FIXED: u8 = 0x0c;
        // I/O: ISA and non-ISA ranges both decoded.
        let type_flags = if kind == 1 { 0x03 } else { 0 };
        let mut v = vec![0x88, 0x0d, 0x00, kind, MIN_MAX_FIXED, type_flags];
        for x in [0, min, max, 0, max.wrapping_sub(min).wrapping_add(1)] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    /// DWord Address Space Descriptor for a read-write, non-prefetchable memory window.
    pub fn dword_memory(min: u32, max: u32) -> Vec<u8> {
        const MIN_MAX_FIXED: u8 = 0x0c;
        const READ_WRITE: u8 = 0x01;
        let mut v = vec![0x87, 0x17, 0x00, 0, MIN_MAX_FIXED, READ_WRITE];
        for x in [0, min, max, 0, max.wrapping_sub(min).wrapping_add(1)] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    /// I/O Port Descriptor, 16-bit decode, fixed at `port`.
    pub fn io(port: u16, len: u8) -> Vec<u8> {
        let mut v = vec![0x47, 0x01];
        v.extend_from_slice(&port.to_le_bytes());
        v.extend_from_slice(&port.to_le_bytes());
        v.push(1);
        v.push(len);
        v
    }

    /// 32-bit Fixed Memory Range Descriptor, read-write.
    pub fn memory32_fixed(base: u32, len: u32) -> Vec<u8> {
        let mut v = vec![0x86, 0x09, 0x00, 0x01];
        v.extend_from_slice(&base.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v
    }

    /// Extended Interrupt Descriptor: one GSI the device consumes, active high, exclusive.
    pub fn interrupt(gsi: u32, edge: bool) -> Vec<u8> {
        const CONSUMER: u8 = 0x01;
        const EDGE: u8 = 0x02;
        let flags = CONSUMER | if edge { EDGE } else { 0 };
        let mut v = vec![0x89, 0x06, 0x00, flags, 1];
        v.extend_from_slice(&gsi.to_le_bytes());
        v
    }

    /// The descriptors followed by the end tag (checksum 0: "treat as correct").
    pub fn resources(descriptors: &[Vec<u8>]) -> Vec<u8> {
        let mut v: Vec<u8> = descriptors.concat();
        v.extend_from_slice(&[0x79, 0x00]);
        super::buffer(&v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_lengths_count_themselves() {
        assert_eq!(pkg_length(0), vec![1]);
        assert_eq!(pkg_length(0x3e), vec![0x3f]);
        // 0x3f bytes + 2 length bytes = 0x41: low nibble 1, then 0x04.
        assert_eq!(pkg_length(0x3f), vec![0x41, 0x04]);
        assert_eq!(pkg_length(0xffd), vec![0x4f, 0xff]);
        // 0xffe + 3 = 0x1001.
        assert_eq!(pkg_length(0xffe), vec![0x81, 0x00, 0x01]);
    }

    #[test]
    fn names_integers_and_ids() {
        assert_eq!(name("\\_SB"), b"\\_SB_".to_vec());
        assert_eq!(name("PCI0"), b"PCI0".to_vec());
        assert_eq!(name("\\_SB.PCI0"), b"\\\x2e_SB_PCI0".to_vec());
        assert_eq!(int(0), vec![0]);
        assert_eq!(int(1), vec![1]);
        assert_eq!(int(5), vec![0x0a, 5]);
        assert_eq!(int(0x1234), vec![0x0b, 0x34, 0x12]);
        assert_eq!(int(0x1_0000), vec![0x0c, 0, 0, 1, 0]);
        // What iasl emits for EISAID("PNP0A03").
        assert_eq!(eisa_id("PNP0A03"), vec![0x0c, 0x41, 0xd0, 0x0a, 0x03]);
        assert_eq!(string("LNRO0005"), b"\x0dLNRO0005\0".to_vec());
    }

    #[test]
    fn a_device_with_a_resource_template() {
        let crs = res::resources(&[res::memory32_fixed(0xd100_0000, 0x1000)]);
        // Buffer: op, pkglen, size (byte 14), 12 descriptor bytes, end tag.
        assert_eq!(crs[..3], [0x11, 17, 0x0a]);
        assert_eq!(crs[3], 14);
        let d = device("VR00", &[name_decl("_UID", &int(0))]);
        assert_eq!(d[..2], [0x5b, 0x82]);
        assert_eq!(
            usize::from(d[2]),
            d.len() - 2,
            "pkglen covers name and terms"
        );
        assert_eq!(&d[3..7], b"VR00");
    }
}
