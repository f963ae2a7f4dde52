//! P2V: turn a physical disk (a block device or an image of one) or a running system's root
//! filesystem tree into a VM disk, and report what the guest will need to boot as a VM.

use crate::convert::{self, create_output};
use crate::qcow2::CreateOptions;
use crate::raw::RawImage;
use crate::storage::FileStorage;
use crate::{is_zero, BlockRead, DiskError, ExtentKind, Format, Open, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bytes per sequential read of the source.
const CHUNK: usize = 4 << 20;

/// What `import-physical SOURCE OUT` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceReport {
    pub source: String,
    pub output: String,
    pub format: Format,
    pub size: u64,
    /// SHA-256 of every byte of the source, zeros included.
    pub sha256: String,
    /// The output read back through the image layer hashes to the same value.
    pub verified: bool,
    pub bytes_written: u64,
    pub seconds: f64,
}

fn open_source(src: &Path) -> Result<RawImage> {
    let file = std::fs::File::open(src).map_err(|e| DiskError::io(src, "open", 0, e))?;
    advise_sequential(&file);
    RawImage::open(src, Box::new(FileStorage::new(file)), false)
}

fn advise_sequential(file: &std::fs::File) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: posix_fadvise only takes a descriptor we own and integers; it is a hint, so its
    // result is ignored.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
    }
}

/// The size of a block device or image file.
pub fn source_size(src: &Path) -> Result<u64> {
    Ok(crate::DiskSize::size(&open_source(src)?))
}

/// Hashes the whole guest view of `img`, reading data extents and hashing zeros for the rest.
fn hash_image(img: &mut dyn BlockRead) -> Result<String> {
    let size = img.size();
    let mut h = Sha256::new();
    let zeros = vec![0u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0;
    while off < size {
        let e = img.extent(off, size - off)?;
        let end = off + e.length.max(1).min(size - off);
        while off < end {
            let n = ((end - off) as usize).min(CHUNK);
            if e.kind == ExtentKind::Zero {
                h.update(&zeros[..n]);
            } else {
                img.read_at(&mut buf[..n], off)?;
                h.update(&buf[..n]);
            }
            off += n as u64;
        }
    }
    Ok(hex(&h.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Copies a block device (or a raw image of one) sequentially into a new image, skipping zero
/// blocks and computing the source's SHA-256; then verifies the output against it.
pub fn import_device(
    src: &Path,
    out: &Path,
    format: Format,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<DeviceReport> {
    let t = std::time::Instant::now();
    let mut source = open_source(src)?;
    let size = crate::DiskSize::size(&source);
    let qopts = CreateOptions::default();
    let mut dst = create_output(out, format, size, &qopts)?;
    let gran = if format == Format::Qcow2 {
        qopts.cluster_size as usize
    } else {
        4096
    };
    let mut hasher = Sha256::new();
    let zeros = vec![0u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut off = 0u64;
    while off < size {
        // Holes of an image file need not be read (a block device is all data).
        let e = source.extent(off, size - off)?;
        let end = off + e.length.max(1).min(size - off);
        while off < end {
            let n = ((end - off) as usize).min(CHUNK - (off as usize % CHUNK));
            if e.kind == ExtentKind::Zero {
                hasher.update(&zeros[..n]);
            } else {
                source.read_at(&mut buf[..n], off)?;
                hasher.update(&buf[..n]);
                let mut i = 0;
                while i < n {
                    let j = (i + gran).min(n);
                    if !is_zero(&buf[i..j]) {
                        // Coalesce consecutive non-zero blocks into one write.
                        let mut k = j;
                        while k < n {
                            let l = (k + gran).min(n);
                            if is_zero(&buf[k..l]) {
                                break;
                            }
                            k = l;
                        }
                        dst.write_at(&buf[i..k], off + i as u64)?;
                        written += (k - i) as u64;
                        i = k;
                    } else {
                        i = j;
                    }
                }
            }
            off += n as u64;
            progress(off, size);
        }
    }
    dst.flush()?;
    drop(dst);
    let sha256 = hex(&hasher.finalize());
    let mut check = crate::open(
        out,
        Open {
            format: Some(format),
            write: false,
        },
    )?;
    let verified = hash_image(check.reader())? == sha256;
    if !verified {
        return Err(DiskError::Invalid(format!(
            "{}: the output does not read back as the source (SHA-256 mismatch); the source may have changed during the copy",
            out.display()
        )));
    }
    Ok(DeviceReport {
        source: src.display().to_string(),
        output: out.display().to_string(),
        format,
        size,
        sha256,
        verified,
        bytes_written: written,
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// One thing the guest needs before (or right after) it boots as a VM.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Finding {
    /// "ok", "action" or "warning".
    pub level: &'static str,
    pub topic: &'static str,
    pub message: String,
}

/// What `import-physical --from-tree` did and found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TreeReport {
    pub tree: String,
    pub output: String,
    pub format: Format,
    pub filesystem: &'static str,
    pub filesystem_uuid: String,
    pub size: u64,
    pub files: u64,
    pub findings: Vec<Finding>,
}

impl TreeReport {
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "output: {} ({}, {} bytes)\nfilesystem: {} UUID={} ({} files from {})\n",
            self.output,
            self.format,
            self.size,
            self.filesystem,
            self.filesystem_uuid,
            self.files,
            self.tree
        );
        s.push_str("what the guest needs:\n");
        for f in &self.findings {
            s.push_str(&format!("  [{}] {}: {}\n", f.level, f.topic, f.message));
        }
        s
    }
}

/// Counts the tree's own filesystem only: other filesystems mounted below it (/proc, /sys, a
/// separate /home) are not copied either.
fn tree_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).map(|m| m.dev()).unwrap_or(0);
    let (mut bytes, mut files) = (0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            files += 1;
            // Round every file up to a 4 KiB block, plus an inode's worth.
            bytes += m.size().div_ceil(4096) * 4096 + 256;
            if m.is_dir() && m.dev() == dev {
                stack.push(e.path());
            }
        }
    }
    (bytes, files)
}

/// Mount points strictly below `tree`, from /proc/self/mountinfo.
fn submounts(tree: &Path) -> Vec<PathBuf> {
    let Ok(canon) = std::fs::canonicalize(tree) else {
        return Vec::new();
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let unescape = |s: &str| {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
    };
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape(m)))
        .filter(|m| m.starts_with(&canon) && *m != canon)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The root filesystem's UUID from the tree's fstab, so the new filesystem can keep it.
fn fstab_root_uuid(tree: &Path) -> Option<String> {
    let fstab = std::fs::read_to_string(tree.join("etc/fstab")).ok()?;
    fstab.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let (dev, mnt) = (it.next()?, it.next()?);
        if dev.starts_with('#') || mnt != "/" {
            return None;
        }
        let u = dev.strip_prefix("UUID=")?.trim_matches('"');
        let valid = u.len() == 36 && u.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        valid.then(|| u.to_string())
    })
}

fn ext4_uuid(img: &Path) -> Result<String> {
    let f = std::fs::File::open(img).map_err(|e| DiskError::io(img, "open", 0, e))?;
    let mut sb = [0u8; 16];
    use std::os::unix::fs::FileExt;
    f.read_exact_at(&mut sb, 1024 + 0x68)
        .map_err(|e| DiskError::io(img, "read superblock", 1024, e))?;
    let h = hex(&sb);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// Builds an ext4 image from a root filesystem tree with `mkfs.ext4 -d`, converts it to
/// `format`, and inspects the tree for what it needs to boot as a VM.
pub fn from_tree(tree: &Path, out: &Path, format: Format, size: Option<u64>) -> Result<TreeReport> {
    if !tree.is_dir() {
        return Err(DiskError::Invalid(format!(
            "{}: not a directory",
            tree.display()
        )));
    }
    let (used, files) = tree_usage(tree);
    let size = match size {
        Some(s) => s,
        None => (used + used * 3 / 10 + (64 << 20)).div_ceil(1 << 20) << 20,
    };
    let tmp = tmp_path(out);
    let _cleanup = RemoveOnDrop(tmp.clone());
    RawImage::create(&tmp, size)?;
    let keep_uuid = fstab_root_uuid(tree);
    let mounts = submounts(tree);
    let mnt = tmp.with_extension("root");
    let _cleanup_mnt = RemoveDirOnDrop(mnt.clone());
    let mut cmd = if mounts.is_empty() {
        let mut c = Command::new("mkfs.ext4");
        c.args(["-q", "-F", "-L", "root", "-d"]).arg(tree);
        c
    } else {
        // A running system's root has /proc, /sys, /dev... mounted inside it. A non-recursive
        // bind mount shows only the tree's own filesystem; doing it in a private mount
        // namespace leaves the host's mount table untouched.
        // SAFETY: geteuid only reads the process's credentials.
        if unsafe { libc::geteuid() } != 0 {
            return Err(DiskError::Invalid(format!(
                "{} has other filesystems mounted below it ({}); run as root so only its own filesystem is copied",
                tree.display(),
                mounts.iter().take(5).map(|m| m.display().to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
        std::fs::create_dir_all(&mnt).map_err(|e| DiskError::io(&mnt, "mkdir", 0, e))?;
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$1" "$2" && shift 2 && exec mkfs.ext4 "$@""#)
            .arg("sh")
            .arg(tree)
            .arg(&mnt)
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(&mnt);
        c
    };
    if let Some(u) = &keep_uuid {
        cmd.args(["-U", u]);
    }
    cmd.arg(&tmp);
    let outp = cmd.output().map_err(|e| {
        DiskError::Invalid(format!(
            "cannot run mkfs.ext4 ({e}); install e2fsprogs (1.43 or newer for -d)"
        ))
    })?;
    if !outp.status.success() {
        return Err(DiskError::Invalid(format!(
            "mkfs.ext4 -d {} failed: {}",
            tree.display(),
            String::from_utf8_lossy(&outp.stderr).trim()
        )));
    }
    let uuid = ext4_uuid(&tmp)?;
    match format {
        Format::Raw => {
            std::fs::rename(&tmp, out).map_err(|e| DiskError::io(out, "rename", 0, e))?
        }
        _ => {
            let mut src = crate::open(
                &tmp,
                Open {
                    format: Some(Format::Raw),
                    write: false,
                },
            )?;
            convert::convert(
                src.reader(),
                out,
                format,
                &CreateOptions::default(),
                true,
                &mut |_, _| {},
            )?;
        }
    }
    let mut findings = Vec::new();
    if !mounts.is_empty() {
        finding(
            &mut findings,
            "ok",
            "filesystems",
            format!(
                "left out {} filesystem(s) mounted below the tree ({}); give separate ones (e.g. /home) their own disk",
                mounts.len(),
                mounts.iter().take(8).map(|m| m.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        );
    }
    inspect_fstab(tree, &uuid, keep_uuid.is_some(), &mut findings);
    inspect_drivers(tree, &mut findings);
    inspect_network(tree, &mut findings);
    Ok(TreeReport {
        tree: tree.display().to_string(),
        output: out.display().to_string(),
        format,
        filesystem: "ext4",
        filesystem_uuid: uuid,
        size,
        files,
        findings,
    })
}

struct RemoveDirOnDrop(PathBuf);
impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn tmp_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    out.with_file_name(format!(".{name}.ext4-{}.tmp", std::process::id()))
}

fn finding(v: &mut Vec<Finding>, level: &'static str, topic: &'static str, message: String) {
    v.push(Finding {
        level,
        topic,
        message,
    });
}

fn inspect_fstab(tree: &Path, uuid: &str, kept: bool, out: &mut Vec<Finding>) {
    let Ok(fstab) = std::fs::read_to_string(tree.join("etc/fstab")) else {
        finding(
            out,
            "action",
            "fstab",
            format!("no /etc/fstab; mount the root filesystem by UUID={uuid} (root=UUID={uuid} on the kernel command line)"),
        );
        return;
    };
    let mut root_seen = false;
    for line in fstab.lines() {
        let mut it = line.split_whitespace();
        let (Some(dev), Some(mnt)) = (it.next(), it.next()) else {
            continue;
        };
        if dev.starts_with('#') {
            continue;
        }
        if mnt == "/" {
            root_seen = true;
        }
        let by_name = [
            "/dev/sd",
            "/dev/hd",
            "/dev/nvme",
            "/dev/xvd",
            "/dev/vd",
            "/dev/mmcblk",
        ]
        .iter()
        .any(|p| dev.starts_with(p));
        if by_name {
            let fix = if mnt == "/" {
                format!("use UUID={uuid}")
            } else {
                "use its UUID= or LABEL=".into()
            };
            finding(
                out,
                "action",
                "fstab",
                format!("{mnt} is mounted by device name {dev}, which changes in a VM (virtio disks are /dev/vdX); {fix}"),
            );
        } else if mnt == "/" && dev.starts_with("UUID=") {
            if kept {
                finding(
                    out,
                    "ok",
                    "fstab",
                    format!("/ is mounted by UUID; the new filesystem keeps UUID={uuid}"),
                );
            } else {
                finding(
                    out,
                    "action",
                    "fstab",
                    format!("/ is mounted by {dev} but the new filesystem has UUID={uuid}; update /etc/fstab"),
                );
            }
        } else if mnt != "/"
            && mnt != "none"
            && !matches!(
                mnt,
                "swap" | "/proc" | "/sys" | "/dev/pts" | "/dev/shm" | "/tmp"
            )
            && !dev.starts_with("UUID=")
            && !dev.starts_with("LABEL=")
            && dev.starts_with('/')
        {
            finding(
                out,
                "warning",
                "fstab",
                format!("{mnt} comes from {dev}, which is not part of this image"),
            );
        }
    }
    if !root_seen {
        finding(
            out,
            "action",
            "fstab",
            format!("no entry for /; add `UUID={uuid} / ext4 defaults 0 1`"),
        );
    }
}

fn kernel_versions(tree: &Path) -> Vec<(String, PathBuf)> {
    let mut v = Vec::new();
    for base in ["lib/modules", "usr/lib/modules"] {
        if let Ok(rd) = std::fs::read_dir(tree.join(base)) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.path().is_dir() && !v.iter().any(|(n, _)| *n == name) {
                    v.push((name, e.path()));
                }
            }
        }
    }
    v.sort();
    v
}

fn has_module(moddir: &Path, name: &str) -> bool {
    if let Ok(b) = std::fs::read_to_string(moddir.join("modules.builtin")) {
        if b.lines().any(|l| {
            l.rsplit('/')
                .next()
                .is_some_and(|f| f.starts_with(&format!("{name}.ko")))
        }) {
            return true;
        }
    }
    let mut stack = vec![moddir.join("kernel")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{name}.ko"))
            {
                return true;
            }
        }
    }
    false
}

/// Looks for `needle` in an initramfs: uncompressed cpio or gzip; other compressions are
/// reported as not inspectable.
fn initramfs_contains(path: &Path, needle: &[u8]) -> Option<bool> {
    use std::io::Read;
    let data = std::fs::read(path).ok()?;
    let found = |hay: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    if found(&data) {
        return Some(true);
    }
    if data.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        let mut d = flate2::read::MultiGzDecoder::new(&data[..]).take(1 << 30);
        d.read_to_end(&mut out).ok()?;
        return Some(found(&out));
    }
    if data.starts_with(b"070701") {
        return Some(false);
    }
    None
}

fn inspect_drivers(tree: &Path, out: &mut Vec<Finding>) {
    let kernels = kernel_versions(tree);
    if kernels.is_empty() {
        finding(out, "action", "kernel", "no kernel modules under /lib/modules; boot it with an external kernel that has virtio_blk, virtio_net and virtio_pci built in".into());
        return;
    }
    for (ver, dir) in &kernels {
        let missing: Vec<&str> = ["virtio_pci", "virtio_blk", "virtio_net", "ext4"]
            .into_iter()
            .filter(|m| !has_module(dir, m))
            .collect();
        if missing.is_empty() {
            finding(
                out,
                "ok",
                "kernel",
                format!("{ver} has virtio_pci, virtio_blk, virtio_net and ext4"),
            );
        } else {
            finding(
                out,
                "action",
                "kernel",
                format!(
                    "{ver} lacks {}; install a kernel with virtio support",
                    missing.join(", ")
                ),
            );
        }
        let initrd = ["boot/initrd.img-", "boot/initramfs-"]
            .iter()
            .map(|p| tree.join(format!("{p}{ver}")))
            .chain(std::iter::once(
                tree.join(format!("boot/initramfs-{ver}.img")),
            ))
            .find(|p| p.exists());
        match initrd {
            None => finding(out, "warning", "initramfs", format!("no initramfs for {ver} in /boot; if the root disk driver is a module, build one with virtio_blk")),
            Some(p) => match initramfs_contains(&p, b"virtio_blk") {
                Some(true) => finding(out, "ok", "initramfs", format!("{} contains virtio_blk", p.display())),
                Some(false) => finding(out, "action", "initramfs", format!("{} lacks virtio_blk: add virtio_blk, virtio_pci to /etc/initramfs-tools/modules (or dracut add_drivers) and rebuild it", p.display())),
                None => finding(out, "warning", "initramfs", format!("{} uses a compression this check cannot read; make sure it includes virtio_blk and virtio_pci", p.display())),
            },
        }
    }
}

fn inspect_network(tree: &Path, out: &mut Vec<Finding>) {
    let mut names: Vec<(String, String)> = Vec::new();
    let mut add = |n: &str, src: &str| {
        let n = n.trim().trim_end_matches(':').to_string();
        if !n.is_empty() && n != "lo" && !names.iter().any(|(x, _)| *x == n) {
            names.push((n, src.to_string()));
        }
    };
    if let Ok(s) = std::fs::read_to_string(tree.join("etc/network/interfaces")) {
        for l in s.lines() {
            let mut it = l.split_whitespace();
            if matches!(
                it.next(),
                Some("iface") | Some("auto") | Some("allow-hotplug")
            ) {
                for n in it.take(1) {
                    add(n, "/etc/network/interfaces");
                }
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(tree.join("etc/netplan")) {
        for e in rd.flatten() {
            let Ok(s) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            let mut in_eth = false;
            for l in s.lines() {
                let t = l.trim_start();
                let indent = l.len() - t.len();
                if t.starts_with("ethernets:") {
                    in_eth = true;
                    continue;
                }
                if in_eth && indent <= 2 && !t.is_empty() {
                    in_eth = false;
                }
                if in_eth && indent == 4 && t.ends_with(':') {
                    add(t, "netplan");
                }
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(tree.join("etc/systemd/network")) {
        for e in rd.flatten() {
            let Ok(s) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            for l in s.lines() {
                if let Some(n) = l.trim().strip_prefix("Name=") {
                    add(n, "systemd-networkd");
                }
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(tree.join("etc/sysconfig/network-scripts")) {
        for e in rd.flatten() {
            let Ok(s) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            for l in s.lines() {
                if let Some(n) = l.trim().strip_prefix("DEVICE=") {
                    add(n.trim_matches('"'), "network-scripts");
                }
            }
        }
    }
    for (n, src) in &names {
        let virtio_like =
            n == "eth0" || n.starts_with("ens") || n.starts_with("enp0s") || n.contains('*');
        if virtio_like {
            finding(out, "warning", "network", format!("{src} configures {n}; a virtio NIC is named eth0, ens3 or enp0sN depending on slot and naming policy: check it matches"));
        } else {
            finding(out, "action", "network", format!("{src} configures {n}, a name tied to the physical NIC; the VM's virtio NIC will have another name (e.g. ens3): rename it or match by driver"));
        }
    }
    if tree
        .join("etc/udev/rules.d/70-persistent-net.rules")
        .exists()
    {
        finding(out, "action", "network", "/etc/udev/rules.d/70-persistent-net.rules pins names to the old MAC addresses; delete it".into());
    }
    if names.is_empty() {
        finding(
            out,
            "ok",
            "network",
            "no static interface names configured (DHCP on whatever NIC appears)".into(),
        );
    }
}
