//! `corefour vm export NAME FILE.tar.zst` and `corefour vm import FILE [--name N] [--dir D]`:
//! a stopped VM's config, kernel, initrd and disks (sparse-aware), optionally a memory
//! snapshot, in one verified archive (crates/archive). Import checks every member's SHA-256
//! before it registers anything with the daemon; on any failure nothing is registered and the
//! unpacked files are removed.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use corefour_api::{DiskSpec, NetSpec, VmCreate, VmInfo, VmState};
use corefour_archive::{Member, Source};

use crate::cmd_vm::{encode, hyper_method::Method, Api};

fn progress(total: u64, what: &str) -> (indicatif::ProgressBar, impl FnMut(u64)) {
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(what.to_string());
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let b2 = bar.clone();
    (bar, move |n| b2.inc(n))
}

pub fn export(
    api: &Api,
    name: &str,
    file: &Path,
    snapshot: Option<&Path>,
    json: bool,
) -> anyhow::Result<i32> {
    let vm: VmInfo = api.call(Method::GET, &format!("/v1/vms/{}", encode(name)), None)?;
    if matches!(vm.state, VmState::Running | VmState::Paused) {
        bail!(
            "VM {name} is {}: stop it first (or take `corefour vm snapshot` and pass --snapshot DIR)",
            vm.state
        );
    }
    let mut members = vec![Member {
        name: "kernel".into(),
        kind: "kernel".into(),
        source: Source::File(PathBuf::from(&vm.kernel)),
        sparse: false,
    }];
    if let Some(i) = &vm.initrd {
        members.push(Member {
            name: "initrd".into(),
            kind: "initrd".into(),
            source: Source::File(PathBuf::from(i)),
            sparse: false,
        });
    }
    let mut disks = Vec::new();
    for (i, d) in vm.disks.iter().enumerate() {
        let base = Path::new(&d.path)
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| {
                n.chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || "._-".contains(c) {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect::<String>()
            })
            .unwrap_or_else(|| "disk".into());
        let member = format!("disks/{i}-{base}");
        members.push(Member {
            name: member.clone(),
            kind: "disk".into(),
            source: Source::File(PathBuf::from(&d.path)),
            sparse: true,
        });
        disks.push(DiskSpec {
            path: member,
            read_only: d.read_only,
            rate_limit: d.rate_limit.clone(),
        });
    }
    if let Some(dir) = snapshot {
        for (f, kind, sparse) in [
            ("state.bin", "snapshot-state", false),
            ("memory.bin", "snapshot-memory", true),
        ] {
            members.push(Member {
                name: format!("snapshot/{f}"),
                kind: kind.into(),
                source: Source::File(dir.join(f)),
                sparse,
            });
        }
    }
    let config = VmCreate {
        name: vm.name.clone(),
        kernel: "kernel".into(),
        cmdline: vm.cmdline.clone(),
        initrd: vm.initrd.as_ref().map(|_| "initrd".into()),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        backend: vm.backend.clone(),
        cpu_pin: vm.cpu_pin.clone(),
        cpu_quota_pct: vm.cpu_quota_pct,
        cpu_weight: vm.cpu_weight,
        balloon_mib: vm.balloon_mib,
        disks,
        nets: vm
            .nics
            .iter()
            .map(|n| NetSpec {
                bridge: n.bridge.clone(),
                // A new identity on import: the daemon assigns a fresh MAC.
                mac: None,
                rate_limit: n.rate_limit.clone(),
            })
            .collect(),
        start: false,
    };
    members.insert(
        0,
        Member {
            name: "config.json".into(),
            kind: "config".into(),
            source: Source::Bytes(serde_json::to_vec_pretty(&config)?),
            sparse: false,
        },
    );
    let total = corefour_archive::total_len(&members);
    let (bar, mut tick) = progress(total, "export");
    let meta = serde_json::json!({"vm": vm.name, "writer": format!("corefour {}", env!("CARGO_PKG_VERSION"))});
    let manifest = corefour_archive::export(file, &members, meta, &mut tick)
        .with_context(|| format!("export {name} to {}", file.display()))?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string(&manifest)?);
    } else {
        println!(
            "exported {name} to {} ({} members, {} bytes)",
            file.display(),
            manifest.members.len(),
            std::fs::metadata(file).map(|m| m.len()).unwrap_or(0)
        );
    }
    Ok(0)
}

pub fn import(
    api: &Api,
    file: &Path,
    name: Option<&str>,
    dir: Option<&Path>,
    json: bool,
) -> anyhow::Result<i32> {
    let size = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let staging = match dir {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from(corefour_daemon::DEFAULT_STATE_DIR)
            .join("imports")
            .join(format!("{}-{stamp}", name.unwrap_or("vm"))),
    };
    let staging = if staging.is_relative() {
        std::env::current_dir()?.join(staging)
    } else {
        staging
    };
    let (bar, mut tick) = progress(size, "import");
    let manifest = corefour_archive::import(file, &staging, &mut tick)
        .with_context(|| format!("import {} (nothing was registered)", file.display()))?;
    bar.finish_and_clear();
    let result = register(api, &staging, &manifest, name);
    match result {
        Ok(vm) => {
            if json {
                println!("{}", serde_json::to_string(&vm)?);
            } else {
                println!(
                    "imported {} into {} (every member's SHA-256 checked)",
                    vm.name,
                    staging.display()
                );
            }
            Ok(0)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e.context(
                "the archive was valid but the daemon refused the VM; nothing was registered",
            ))
        }
    }
}

fn register(
    api: &Api,
    staging: &Path,
    m: &corefour_archive::Manifest,
    name: Option<&str>,
) -> anyhow::Result<VmInfo> {
    if m.member("config.json").is_none() {
        bail!("the archive has no config.json: not a corefour VM export");
    }
    let text = std::fs::read(staging.join("config.json"))?;
    let mut c: VmCreate = serde_json::from_slice(&text).context("config.json")?;
    let inside = |p: &str| -> anyhow::Result<String> {
        if m.member(p).is_none() {
            bail!("config.json names {p}, which the archive does not hold");
        }
        Ok(staging.join(p).display().to_string())
    };
    c.kernel = inside(&c.kernel)?;
    if let Some(i) = &c.initrd {
        c.initrd = Some(inside(i)?);
    }
    for d in &mut c.disks {
        d.path = inside(&d.path)?;
    }
    if let Some(n) = name {
        c.name = n.to_string();
    }
    c.start = false;
    api.call(Method::POST, "/v1/vms", Some(serde_json::to_vec(&c)?))
}
