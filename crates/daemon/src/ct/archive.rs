//! Export and import of a stopped system container with the same verified archive as `vm export`
//! (crates/archive: tar + zstd, a manifest with the SHA-256 of every member, all checked before
//! anything is used).
//!
//! Members: `container.json` (the create request and which layers follow) and `rootfs.tar`, the
//! container's overlay upper layer, or with `full` its whole merged root filesystem. The layer is
//! packed with GNU tar rather than the tar crate: overlayfs records deletions as 0:0 character
//! devices and opaque directories as `trusted.overlay.opaque` xattrs, and the tar crate neither
//! restores device nodes nor writes xattrs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use corefour_api::{CtCreate, CtInfo};
use corefour_archive::{Member, Source};
use corefour_container::system::{Layers, System};
use serde::{Deserialize, Serialize};

use super::{blocking, ct_error, Cts};
use crate::error::DaemonError;

pub const CONFIG_MEMBER: &str = "container.json";
pub const ROOTFS_MEMBER: &str = "rootfs.tar";
const FORMAT: &str = "corefour-ct";
const VERSION: u32 = 1;

/// `container.json` in the archive.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtArchiveConfig {
    pub format: String,
    pub version: u32,
    pub spec: CtCreate,
    /// `upper`: rootfs.tar is the upper layer over the named template; `full`: the whole root.
    pub layers: String,
}

fn err(what: impl Into<String>) -> DaemonError {
    DaemonError::Container(what.into())
}

/// GNU tar with the options that keep an overlay layer intact (owners by number, modes,
/// xattrs including overlayfs' own, device nodes, sparse files).
fn tar(args: &[&std::ffi::OsStr]) -> Result<(), DaemonError> {
    let out = Command::new("tar")
        .args([
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=trusted.*",
            "--xattrs-include=user.*",
            "--xattrs-include=security.*",
        ])
        .args(args)
        .output()
        .map_err(|e| err(format!("cannot run tar (install GNU tar): {e}")))?;
    if !out.status.success() {
        return Err(err(format!(
            "tar failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Packs `dir` into the tar file `out`.
fn pack(dir: &Path, out: &Path) -> Result<(), DaemonError> {
    tar(&[
        "--create".as_ref(),
        "--sparse".as_ref(),
        "--file".as_ref(),
        out.as_os_str(),
        "--directory".as_ref(),
        dir.as_os_str(),
        ".".as_ref(),
    ])
}

/// Unpacks a verified tar into `dir`. GNU tar refuses members with `..` or absolute names.
fn unpack(tarball: &Path, dir: &Path) -> Result<(), DaemonError> {
    tar(&[
        "--extract".as_ref(),
        "--same-owner".as_ref(),
        "--same-permissions".as_ref(),
        "--file".as_ref(),
        tarball.as_os_str(),
        "--directory".as_ref(),
        dir.as_os_str(),
    ])
}

/// A work directory under the daemon's container base, removed on drop.
pub(super) struct Scratch(pub PathBuf);

impl Scratch {
    pub(super) fn new(base: &Path, what: &str, name: &str) -> Result<Scratch, DaemonError> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = base.join("transfer").join(format!("{what}-{name}-{stamp}"));
        std::fs::create_dir_all(&p)
            .map_err(|e| DaemonError::io(format!("cannot create {}", p.display()), e))?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the archive of the stopped container `name` to `out` (blocking).
pub fn export(
    sys: &System,
    spec: &CtCreate,
    full: bool,
    work: &Path,
    out: &Path,
) -> Result<corefour_archive::Manifest, DaemonError> {
    let name = &spec.name;
    let layer = work.join(ROOTFS_MEMBER);
    if full {
        sys.mount_rootfs(name).map_err(ct_error)?;
        let r = pack(&sys.dir(name).join("rootfs"), &layer);
        sys.unmount_rootfs(name);
        r?;
    } else {
        pack(&sys.dir(name).join("upper"), &layer)?;
    }
    let mut stored = spec.clone();
    stored.start = false;
    let cfg = CtArchiveConfig {
        format: FORMAT.into(),
        version: VERSION,
        spec: stored,
        layers: if full { "full" } else { "upper" }.into(),
    };
    let members = vec![
        Member {
            name: CONFIG_MEMBER.into(),
            kind: "ct-config".into(),
            source: Source::Bytes(serde_json::to_vec_pretty(&cfg).map_err(|e| err(e.to_string()))?),
            sparse: false,
        },
        Member {
            name: ROOTFS_MEMBER.into(),
            kind: "ct-rootfs".into(),
            source: Source::File(layer),
            sparse: false,
        },
    ];
    let meta = serde_json::json!({
        "ct": name,
        "writer": format!("corefour {}", env!("CARGO_PKG_VERSION")),
    });
    corefour_archive::export(out, &members, meta, &mut |_| {})
        .map_err(|e| err(format!("export of {name} failed: {e}")))
}

/// Verifies the archive (every member's SHA-256) into `staging` and reads its config (blocking).
fn verify(archive: &Path, staging: &Path) -> Result<CtArchiveConfig, DaemonError> {
    let m = corefour_archive::import(archive, staging, &mut |_| {}).map_err(|e| {
        DaemonError::BadRequest(format!("archive refused, nothing was registered: {e}"))
    })?;
    let bad = |what: String| DaemonError::BadRequest(format!("archive refused: {what}"));
    if m.member(CONFIG_MEMBER).is_none() || m.member(ROOTFS_MEMBER).is_none() {
        return Err(bad(format!(
            "it lacks {CONFIG_MEMBER} or {ROOTFS_MEMBER}: not a corefour container export"
        )));
    }
    let text = std::fs::read(staging.join(CONFIG_MEMBER))
        .map_err(|e| DaemonError::io("cannot read the unpacked container.json", e))?;
    let cfg: CtArchiveConfig =
        serde_json::from_slice(&text).map_err(|e| bad(format!("{CONFIG_MEMBER}: {e}")))?;
    if cfg.format != FORMAT || cfg.version != VERSION {
        return Err(bad(format!(
            "format {} version {} (this corefour reads {FORMAT} version {VERSION})",
            cfg.format, cfg.version
        )));
    }
    if cfg.layers != "upper" && cfg.layers != "full" {
        return Err(bad(format!("unknown layers {:?}", cfg.layers)));
    }
    Ok(cfg)
}

impl Cts {
    /// Exports a stopped container into `out` under the container's lock.
    pub async fn export(
        self: &Arc<Self>,
        name: &str,
        full: bool,
        out: PathBuf,
        work: PathBuf,
    ) -> Result<corefour_archive::Manifest, DaemonError> {
        let _g = self.op_lock(name).await;
        let rec = self.inv().get_ct(name)?;
        if rec.state.is_active() || self.is_active(name) {
            return Err(DaemonError::Conflict(format!(
                "container {name:?} is {}: stop it first (export copies a stopped container)",
                rec.state
            )));
        }
        let sys = self.sys();
        let spec = rec.spec.clone();
        let m = blocking(move || export(&sys, &spec, full, &work, &out)).await?;
        let _ = self.inv().add_event(
            name,
            "exported",
            &format!(
                "{} archive, {} members",
                if full { "full" } else { "upper-layer" },
                m.members.len()
            ),
        );
        Ok(m)
    }

    /// Verifies `archive` in full and only then registers the container it holds (under
    /// `rename` if given). On any failure nothing is registered and nothing is left.
    pub async fn import(
        self: &Arc<Self>,
        archive: PathBuf,
        rename: Option<String>,
        start: bool,
    ) -> Result<CtInfo, DaemonError> {
        let work = Scratch::new(&self.base, "import", "archive")?;
        let staging = work.0.join("staging");
        let st = staging.clone();
        let cfg = blocking(move || verify(&archive, &st)).await?;
        let mut spec = cfg.spec;
        if let Some(n) = rename {
            spec.name = n;
        }
        spec.start = false;
        super::verbs::validate(&spec)?;
        let name = spec.name.clone();
        let g = self.op_lock(&name).await;
        self.inv()
            .insert_ct(&spec, "imported from an archive (every SHA-256 verified)")?;
        let sys = self.sys();
        let req = super::verbs::create_request(&spec);
        let layers = if cfg.layers == "full" {
            Layers::FullRootfs
        } else {
            Layers::Template
        };
        let _building = match layers {
            Layers::Template => self.template_guard(&spec.template).await,
            Layers::FullRootfs => None,
        };
        let tarball = staging.join(ROOTFS_MEMBER);
        let made = blocking(move || {
            super::verbs::remove_orphan(&sys, &req.name);
            sys.create_with(&req, layers, |upper| {
                unpack(&tarball, upper).map_err(|e| {
                    corefour_container::ContainerError::Init(format!(
                        "unpacking the root file system: {e}"
                    ))
                })
            })
            .map_err(ct_error)
        })
        .await;
        drop(work);
        if let Err(e) = made {
            let _ = self.inv().delete_ct(&name, "import failed");
            return Err(e);
        }
        tracing::info!(ct = %name, "container imported");
        drop(g);
        if start {
            return self.start(&name).await;
        }
        self.info(&name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> CtCreate {
        serde_json::from_value(serde_json::json!({"name": name, "pids": 10})).unwrap()
    }

    /// A container directory as `System::create` leaves it, without the template.
    fn fake_container(base: &Path, name: &str) -> System {
        let upper = base.join("containers").join(name).join("upper");
        std::fs::create_dir_all(upper.join("root")).unwrap();
        std::fs::write(upper.join("root/file"), b"payload").unwrap();
        System::new(base)
    }

    #[test]
    fn export_verifies_and_bad_archives_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let sys = fake_container(t.path(), "a");
        let work = t.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        let out = t.path().join("a.tar.zst");
        let m = export(&sys, &spec("a"), false, &work, &out).unwrap();
        assert!(m.member(CONFIG_MEMBER).is_some() && m.member(ROOTFS_MEMBER).is_some());
        let cfg = verify(&out, &t.path().join("s1")).unwrap();
        assert_eq!(
            (cfg.spec.name.as_str(), cfg.layers.as_str()),
            ("a", "upper")
        );
        assert_eq!(cfg.spec.pids, Some(10));
        let dst = t.path().join("unpacked");
        std::fs::create_dir_all(&dst).unwrap();
        unpack(&t.path().join("s1").join(ROOTFS_MEMBER), &dst).unwrap();
        assert_eq!(std::fs::read(dst.join("root/file")).unwrap(), b"payload");

        // Random bytes, a flipped byte, a cut archive: refused, staging removed.
        let bytes = std::fs::read(&out).unwrap();
        let mut seed = 0x9e37_79b9_u32;
        for case in 0..12 {
            let mut b = bytes.clone();
            match case % 3 {
                0 => {
                    b = (0..bytes.len())
                        .map(|_| {
                            seed ^= seed << 13;
                            seed ^= seed >> 17;
                            seed ^= seed << 5;
                            seed as u8
                        })
                        .collect()
                }
                1 => {
                    let i = (seed as usize + case * 7919) % b.len();
                    b[i] ^= 0x40;
                }
                _ => b.truncate(b.len() * case / 13),
            }
            let bad = t.path().join(format!("bad{case}.tar.zst"));
            std::fs::write(&bad, &b).unwrap();
            let staging = t.path().join(format!("st{case}"));
            match verify(&bad, &staging) {
                Err(e) => {
                    assert!(matches!(e, DaemonError::BadRequest(_)), "{e}");
                    assert!(!staging.exists());
                }
                // A flipped bit zstd never reads for output (e.g. the frame's window size) leaves
                // every member and checksum as it was: accepting that archive loses nothing.
                Ok(got) => {
                    assert_eq!(case % 3, 1, "case {case}: damaged archive accepted");
                    assert_eq!(got.spec.pids, Some(10));
                    assert_eq!(
                        std::fs::read(staging.join(ROOTFS_MEMBER)).unwrap(),
                        std::fs::read(t.path().join("s1").join(ROOTFS_MEMBER)).unwrap()
                    );
                }
            }
        }

        // A valid archive of another format or version.
        let other = t.path().join("other.tar.zst");
        let cfg = serde_json::json!({"format": FORMAT, "version": 99, "spec": spec("a"), "layers": "upper"});
        let members = vec![
            Member {
                name: CONFIG_MEMBER.into(),
                kind: "ct-config".into(),
                source: Source::Bytes(serde_json::to_vec(&cfg).unwrap()),
                sparse: false,
            },
            Member {
                name: ROOTFS_MEMBER.into(),
                kind: "ct-rootfs".into(),
                source: Source::Bytes(Vec::new()),
                sparse: false,
            },
        ];
        corefour_archive::export(&other, &members, serde_json::json!({}), &mut |_| {}).unwrap();
        let e = verify(&other, &t.path().join("st-other")).unwrap_err();
        assert!(e.to_string().contains("version 99"), "{e}");
    }
}
