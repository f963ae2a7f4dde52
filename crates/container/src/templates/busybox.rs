//! The busybox template: Debian's static busybox plus one link per applet, and a minimal /etc.

use std::path::Path;

use super::TemplateError;

/// Where Debian's busybox-static installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Fills `rootfs` with busybox: /bin/busybox, applet links in /bin, and the usual empty dirs.
pub fn populate(rootfs: &Path) -> Result<(), TemplateError> {
    let bb = Path::new(BUSYBOX);
    if !bb.is_file() {
        return Err(TemplateError::Missing {
            what: BUSYBOX.into(),
            package: "busybox-static".into(),
        });
    }
    let io = |what: String| move |e: std::io::Error| TemplateError::Io { what, cause: e };
    for d in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root", "var/log", "run", "home",
    ] {
        std::fs::create_dir_all(rootfs.join(d)).map_err(io(format!("mkdir {d}")))?;
    }
    let target = rootfs.join("bin/busybox");
    std::fs::copy(bb, &target).map_err(io(format!("copy {BUSYBOX}")))?;
    let out = std::process::Command::new(bb)
        .arg("--list-full")
        .output()
        .map_err(io(format!("run {BUSYBOX} --list-full")))?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet.ends_with("/busybox") || applet.contains("..") {
            continue;
        }
        let link = rootfs.join(applet);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("mkdir {}", parent.display())))?;
        }
        if std::fs::symlink_metadata(&link).is_ok() {
            continue;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link).map_err(io(format!("link {applet}")))?;
    }
    std::fs::set_permissions(
        rootfs.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .map_err(io("chmod /tmp".into()))?;
    let files = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hosts", "127.0.0.1 localhost\n"),
        (
            "etc/inittab",
            "::respawn:-/bin/sh\n::restart:/sbin/init\n::ctrlaltdel:/sbin/reboot\n",
        ),
    ];
    for (p, text) in files {
        std::fs::write(rootfs.join(p), text).map_err(io(format!("write {p}")))?;
    }
    Ok(())
}
