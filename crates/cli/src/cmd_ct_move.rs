//! `corefour ct export|import|move`: a stopped container as a verified archive (the daemon builds
//! and checks it; see corefour_daemon::ct::archive), streamed over the daemon's socket, and the
//! stop-copy move between two daemons built from the two.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{bail, Context};
use corefour_api::{CtExport, CtInfo, VmState};
use corefour_daemon::client::{fault_text, Method};
use corefour_daemon::ct::transfer::blocking::{download, upload};

use super::daemon::CtApi;
use crate::cmd_vm::encode;

/// A byte counter on a terminal, nothing otherwise.
fn bar(total: Option<u64>, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let (b, tpl) = match total {
        Some(t) => (
            indicatif::ProgressBar::new(t),
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        ),
        None => (
            indicatif::ProgressBar::new_spinner(),
            "{msg} {spinner} {bytes} {bytes_per_sec}",
        ),
    };
    b.set_style(
        indicatif::ProgressStyle::with_template(tpl)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_message(what.to_string());
    b
}

/// Downloads the archive of `name` from `api` into `file`.
fn fetch_archive(api: &CtApi, name: &str, file: &Path, full: bool) -> anyhow::Result<()> {
    let b = bar(None, &format!("export {name}"));
    let body = serde_json::to_vec(&CtExport { full })?;
    let (status, err) = download(
        &api.socket,
        Method::POST,
        &format!("/v1/cts/{}/export", encode(name)),
        Some(body),
        file,
        &mut |n| b.inc(n),
    )
    .map_err(|e| {
        let u = matches!(&e, corefour_daemon::ct::transfer::TransferError::Connect { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused));
        api.unreachable(e, u)
    })?;
    b.finish_and_clear();
    if !status.is_success() {
        bail!("export of {name} refused: {}", fault_text(&err));
    }
    Ok(())
}

/// Uploads `file` to `api`'s import; the daemon verifies it in full before registering.
fn send_archive(
    api: &CtApi,
    file: &Path,
    name: Option<&str>,
    start: bool,
) -> anyhow::Result<CtInfo> {
    let len = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    let b = bar(Some(len), "import");
    let b2 = b.clone();
    let mut uri = format!("/v1/cts/import?start={start}");
    if let Some(n) = name {
        uri.push_str(&format!("&name={}", encode(n)));
    }
    let (status, body) = upload(&api.socket, &uri, file, Box::new(move |n| b2.inc(n)))
        .map_err(|e| {
            let u = matches!(&e, corefour_daemon::ct::transfer::TransferError::Connect { source, .. }
                if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused));
            api.unreachable(e, u)
        })?;
    b.finish_and_clear();
    if !status.is_success() {
        bail!("{}", fault_text(&body));
    }
    serde_json::from_slice(&body).context("the daemon's answer to the import is not a container")
}

pub(crate) fn export(
    api: &CtApi,
    name: &str,
    file: &Path,
    full: bool,
    json: bool,
) -> anyhow::Result<()> {
    fetch_archive(api, name, file, full)?;
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    if json {
        println!(
            "{}",
            serde_json::json!({"name": name, "file": file, "bytes": size, "full": full})
        );
    } else {
        println!("exported {name} to {} ({size} bytes)", file.display());
    }
    Ok(())
}

pub(crate) fn import(
    api: &CtApi,
    file: &Path,
    name: Option<&str>,
    start: bool,
    json: bool,
) -> anyhow::Result<()> {
    // From standard input (`ct move` to another host pipes it through ssh): spooled to a file
    // first, since the daemon verifies the whole archive before it registers anything.
    let spool = (file == Path::new("-")).then(|| {
        std::env::temp_dir().join(format!("corefour-ct-import-{}.tar.zst", std::process::id()))
    });
    if let Some(sp) = &spool {
        let mut out =
            std::fs::File::create(sp).with_context(|| format!("cannot create {}", sp.display()))?;
        let r = std::io::copy(&mut std::io::stdin().lock(), &mut out);
        if let Err(e) = r {
            let _ = std::fs::remove_file(sp);
            return Err(
                anyhow::Error::from(e).context("cannot read the archive from standard input")
            );
        }
    }
    let path = spool.as_deref().unwrap_or(file);
    let r = send_archive(api, path, name, start);
    if let Some(sp) = &spool {
        let _ = std::fs::remove_file(sp);
    }
    let info = r.with_context(|| format!("import of {} failed", file.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!(
            "imported {} (every member's SHA-256 checked){}",
            info.name,
            if start { ", started" } else { "" }
        );
    }
    Ok(())
}

/// Where `ct move` sends a container.
enum Target {
    /// A daemon on this host, by its socket.
    Local(CtApi),
    /// The daemon on another host, through `ssh HOST corefour ct ...`.
    Ssh { host: String },
}

impl Target {
    fn parse(to: &str) -> anyhow::Result<Target> {
        if let Some(host) = to.strip_prefix("ssh://") {
            return Target::ssh(host);
        }
        if to.contains('/') || Path::new(to).exists() {
            return Ok(Target::Local(CtApi::new(Path::new(to))?));
        }
        Target::ssh(to)
    }

    fn ssh(host: &str) -> anyhow::Result<Target> {
        let ok = !host.is_empty()
            && !host.starts_with('-')
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_@:[]".contains(c));
        if !ok {
            bail!("--to {host:?}: give a socket path, or a host name for ssh");
        }
        Ok(Target::Ssh {
            host: host.to_string(),
        })
    }

    fn describe(&self) -> String {
        match self {
            Target::Local(api) => api.socket.display().to_string(),
            Target::Ssh { host } => format!("ssh://{host}"),
        }
    }

    /// `ssh HOST corefour ct ARGS --json` with `stdin`; the remote stdout parsed as JSON.
    fn remote<T: serde::de::DeserializeOwned>(
        host: &str,
        args: &[&str],
        stdin: Option<&Path>,
    ) -> anyhow::Result<T> {
        let ssh = std::env::var("COREFOUR_SSH").unwrap_or_else(|_| "ssh".into());
        let bin = std::env::var("COREFOUR_REMOTE_BIN").unwrap_or_else(|_| "corefour".into());
        let mut cmd = std::process::Command::new(&ssh);
        cmd.arg(host).arg(&bin).arg("ct").args(args).arg("--json");
        cmd.stdin(match stdin {
            Some(p) => std::process::Stdio::from(
                std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?,
            ),
            None => std::process::Stdio::null(),
        });
        let out = cmd
            .output()
            .with_context(|| format!("cannot run {ssh} (set COREFOUR_SSH to the ssh command)"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            bail!(
                "on {host}: {}",
                err.lines()
                    .last()
                    .unwrap_or("the remote command failed")
                    .trim()
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("on {host}: `corefour ct {}` printed no JSON", args[0]))
    }

    fn list(&self) -> anyhow::Result<Vec<CtInfo>> {
        match self {
            Target::Local(api) => api.call(Method::GET, "/v1/cts", None),
            Target::Ssh { host } => Self::remote(host, &["list"], None),
        }
    }

    fn import(&self, file: &Path, start: bool) -> anyhow::Result<CtInfo> {
        match self {
            Target::Local(api) => send_archive(api, file, None, start),
            Target::Ssh { host } => {
                let mut args = vec!["import", "-"];
                if start {
                    args.push("--start");
                }
                Self::remote(host, &args, Some(file))
            }
        }
    }

    fn delete(&self, name: &str) {
        match self {
            Target::Local(api) => {
                let _ = api.delete(name, true);
            }
            Target::Ssh { host } => {
                let _ = Self::remote::<serde_json::Value>(host, &["delete", "--force", name], None);
            }
        }
    }
}

/// Stop, copy, start on the target; delete the source only once the target runs it. On any
/// failure before that the source is started again (if it ran) and the target keeps nothing.
pub(crate) fn move_ct(
    src: &CtApi,
    name: &str,
    to: &str,
    full: bool,
    timeout: u64,
    json: bool,
) -> anyhow::Result<()> {
    let dst = Target::parse(to)?;
    if let Target::Local(d) = &dst {
        if std::fs::canonicalize(&d.socket).ok() == std::fs::canonicalize(&src.socket).ok() {
            bail!("--to {to} is the source daemon itself");
        }
    }
    // Both daemons must answer before anything is stopped.
    let before = src.info(name)?;
    let there = dst
        .list()
        .context("the target daemon does not answer; nothing was changed")?;
    if there.iter().any(|c| c.name == name) {
        bail!(
            "the target already has a container named {name}; nothing was changed (delete it there first)"
        );
    }
    let was_running = before.state == VmState::Running;
    let t0 = std::time::Instant::now();
    if was_running {
        src.stop(name, timeout)?;
    }
    let stopped_at = std::time::Instant::now();
    let tmp = std::env::temp_dir().join(format!(
        "corefour-ct-move-{name}-{}.tar.zst",
        std::process::id()
    ));
    let copied = (|| -> anyhow::Result<CtInfo> {
        fetch_archive(src, name, &tmp, full)?;
        dst.import(&tmp, was_running)
    })();
    let _ = std::fs::remove_file(&tmp);
    let info = match copied {
        Ok(i) => i,
        Err(e) => {
            // The import either registered nothing, or registered but could not start: make
            // sure the target holds nothing of it (it had no container of this name before).
            dst.delete(name);
            if was_running {
                if let Err(se) = src.verb(name, "start", None) {
                    return Err(e.context(format!(
                        "the move failed, and restarting {name} on the source failed too: {se:#}"
                    )));
                }
            }
            return Err(e.context(format!(
                "the move of {name} failed; the source keeps it{}",
                if was_running { " (restarted)" } else { "" }
            )));
        }
    };
    // Out of service from the stop request until the target confirmed; of that, the copy and the
    // start on the target after the source had stopped.
    let downtime = t0.elapsed();
    let copy = stopped_at.elapsed();
    // The target confirmed (registered, and running if it ran before): the source goes.
    if let Err(e) = src.delete(name, true) {
        eprintln!(
            "corefour: warning: {name} now lives on {}, but deleting it on the source failed: {e:#}",
            dst.describe()
        );
    }
    let total = t0.elapsed();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "name": name,
                "to": dst.describe(),
                "state": info.state,
                "total_ms": total.as_millis() as u64,
                "downtime_ms": if was_running { downtime.as_millis() as u64 } else { 0 },
                "copy_ms": copy.as_millis() as u64,
            })
        );
    } else {
        println!(
            "moved {name} to {} in {:.0} ms ({}, {})",
            dst.describe(),
            total.as_secs_f64() * 1000.0,
            info.state,
            if was_running {
                format!(
                    "downtime {:.0} ms: stop {:.0} ms, copy and start {:.0} ms",
                    downtime.as_secs_f64() * 1000.0,
                    (downtime - copy).as_secs_f64() * 1000.0,
                    copy.as_secs_f64() * 1000.0
                )
            } else {
                "it was not running".into()
            }
        );
    }
    Ok(())
}
