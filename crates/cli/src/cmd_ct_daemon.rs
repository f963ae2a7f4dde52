//! `corefour ct ...` through the daemon's REST API (`/v1/cts`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use corefour_api::{CtCreate, CtInfo, CtLimits, CtNet, Event, StopRequest};
use corefour_daemon::client::blocking::Client;
use corefour_daemon::client::{fault_text, Method};
use serde::de::DeserializeOwned;

use super::Cmd;
use crate::cmd_vm::encode;

/// A connection to one daemon.
pub(crate) struct CtApi {
    client: Client,
    pub(crate) socket: PathBuf,
}

impl CtApi {
    pub(crate) fn new(socket: &Path) -> anyhow::Result<CtApi> {
        Ok(CtApi {
            client: Client::new().context("cannot start the I/O runtime")?,
            socket: socket.to_path_buf(),
        })
    }

    pub(crate) fn unreachable(
        &self,
        e: impl std::fmt::Display,
        unreachable: bool,
    ) -> anyhow::Error {
        if unreachable {
            anyhow::anyhow!(
                "cannot reach the corefour daemon at {}: is it running? start it with `corefour daemon` (or use `ct --direct`)",
                self.socket.display()
            )
        } else {
            anyhow::anyhow!("{e}")
        }
    }

    pub(crate) fn raw(
        &self,
        method: Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Vec<u8>> {
        let (status, bytes) = self
            .client
            .call(&self.socket, method, uri, body)
            .map_err(|e| {
                let u = e.is_unreachable();
                self.unreachable(e, u)
            })?;
        if !status.is_success() {
            bail!("{}", fault_text(&bytes));
        }
        Ok(bytes.to_vec())
    }

    pub(crate) fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<T> {
        let bytes = self.raw(method, uri, body)?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("the daemon's answer to {uri} is not what this CLI expects"))
    }

    pub(crate) fn info(&self, name: &str) -> anyhow::Result<CtInfo> {
        self.call(Method::GET, &format!("/v1/cts/{}", encode(name)), None)
    }

    pub(crate) fn verb(
        &self,
        name: &str,
        verb: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<CtInfo> {
        self.call(
            Method::POST,
            &format!("/v1/cts/{}/{verb}", encode(name)),
            body,
        )
    }

    pub(crate) fn stop(&self, name: &str, timeout_secs: u64) -> anyhow::Result<CtInfo> {
        let body = serde_json::to_vec(&StopRequest {
            timeout_secs: Some(timeout_secs),
        })?;
        self.verb(name, "stop", Some(body))
    }

    pub(crate) fn delete(&self, name: &str, force: bool) -> anyhow::Result<()> {
        self.raw(
            Method::DELETE,
            &format!("/v1/cts/{}?force={force}", encode(name)),
            None,
        )?;
        Ok(())
    }
}

pub(crate) fn run(socket: &Path, cmd: Cmd, json: bool) -> anyhow::Result<i32> {
    let api = CtApi::new(socket)?;
    match cmd {
        Cmd::Create(c) => {
            let req = CtCreate {
                name: c.name.clone(),
                template: c.template.clone(),
                memory_bytes: c.memory_bytes()?,
                cpu_quota_pct: c.cpus().map(|c| (c * 100.0).round() as u32),
                cpu_weight: c.cpu_weight,
                pids: c.pids,
                net: c.bridge()?.map(|b| CtNet {
                    bridge: b.bridge,
                    subnet: b.subnet,
                }),
                start: c.start,
            };
            let info: CtInfo =
                api.call(Method::POST, "/v1/cts", Some(serde_json::to_vec(&req)?))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                let addr = info
                    .address
                    .as_ref()
                    .map(|a| format!(" address {a}"))
                    .unwrap_or_default();
                println!("created {} from {}{addr}", info.name, info.template);
            }
        }
        Cmd::Start { names } => each(&names, json, |n| api.verb(n, "start", None))?,
        Cmd::Stop { names, timeout } => {
            let t = super::parse_secs(&timeout)?;
            each(&names, json, |n| api.stop(n, t))?
        }
        Cmd::Kill { names } => each(&names, json, |n| api.verb(n, "kill", None))?,
        Cmd::Pause { names } => each(&names, json, |n| api.verb(n, "pause", None))?,
        Cmd::Resume { names } => each(&names, json, |n| api.verb(n, "resume", None))?,
        Cmd::Delete { names, force } => {
            need(&names)?;
            for n in &names {
                api.delete(n, force)?;
                if json {
                    println!("{}", serde_json::json!({"name": n, "deleted": true}));
                }
            }
        }
        Cmd::List => {
            let all: Vec<CtInfo> = api.call(Method::GET, "/v1/cts", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!(
                    "{:<20} {:<8} {:<9} {:<16} {:>8}  REASON",
                    "NAME", "STATE", "TEMPLATE", "IPV4", "PID"
                );
                for c in &all {
                    println!(
                        "{:<20} {:<8} {:<9} {:<16} {:>8}  {}",
                        c.name,
                        c.state.as_str(),
                        c.template,
                        c.address.as_deref().unwrap_or("-"),
                        c.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                        c.stop_reason.as_deref().unwrap_or("")
                    );
                }
            }
        }
        Cmd::Info { name } => {
            let i = api.info(&name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                print_info(&i);
            }
        }
        Cmd::Exec { name, command } => {
            // The daemon's containers live on this host: run the runtime's exec here, in the
            // daemon's container directory, so the terminal and exit code are ours.
            let i = api.info(&name)?;
            let sys = corefour_container::system::System::new(Path::new(&i.runtime_dir));
            return Ok(sys.exec(&name, &command)?);
        }
        Cmd::Console { name, log, follow } => {
            let i = api.info(&name)?;
            match (&i.console_socket, log || follow) {
                (Some(sock), false) => super::attach(&name, Path::new(sock))?,
                _ => {
                    if !log && !follow {
                        eprintln!("{name} has no interactive console (not running, or its init has no tty); its log:");
                    }
                    let uri = format!("/v1/cts/{}/console?follow={follow}", encode(&name));
                    let mut out = std::io::stdout();
                    let status = api
                        .client
                        .stream(&api.socket, &uri, |d| {
                            out.write_all(d)?;
                            out.flush()
                        })
                        .map_err(|e| {
                            let u = e.is_unreachable();
                            api.unreachable(e, u)
                        })?;
                    if !status.is_success() {
                        bail!("cannot read the console of {name:?}: HTTP {status}");
                    }
                }
            }
        }
        Cmd::Events {
            name,
            since,
            limit,
            follow,
        } => events(&api, name.as_deref(), since, limit, follow, json)?,
        Cmd::Set(s) => {
            let l = CtLimits {
                cpu_quota_pct: s.cpu_quota,
                cpu_weight: s.cpu_weight,
                memory_bytes: s.memory_bytes()?,
                pids: s.pids,
            };
            if l == CtLimits::default() {
                bail!("ct set: give at least one of --cpu-quota, --cpu-weight, --memory, --pids");
            }
            let i: CtInfo = api.call(
                Method::PATCH,
                &format!("/v1/cts/{}", encode(&s.name)),
                Some(serde_json::to_vec(&l)?),
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            }
        }
        Cmd::Export { name, file, full } => {
            super::transfer::export(&api, &name, &file, full, json)?
        }
        Cmd::Import { file, name, start } => {
            super::transfer::import(&api, &file, name.as_deref(), start, json)?
        }
        Cmd::Move {
            name,
            to,
            full,
            timeout,
        } => super::transfer::move_ct(&api, &name, &to, full, super::parse_secs(&timeout)?, json)?,
        Cmd::Shim { .. } => unreachable!("handled before"),
    }
    Ok(0)
}

fn need(names: &[String]) -> anyhow::Result<()> {
    if names.is_empty() {
        bail!("name at least one container");
    }
    Ok(())
}

/// Runs a verb on every name; all are tried, the first error is returned.
fn each(
    names: &[String],
    json: bool,
    f: impl Fn(&str) -> anyhow::Result<CtInfo>,
) -> anyhow::Result<()> {
    need(names)?;
    let mut first_err = None;
    for n in names {
        match f(n) {
            Ok(i) if json => println!("{}", serde_json::to_string(&i)?),
            Ok(_) => {}
            Err(e) => {
                if names.len() > 1 {
                    eprintln!("corefour: {n}: {e:#}");
                }
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn events(
    api: &CtApi,
    name: Option<&str>,
    since: Option<i64>,
    limit: u32,
    follow: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut since = since;
    loop {
        let mut uri = format!("/v1/cts/events?limit={limit}");
        if let Some(s) = since {
            uri.push_str(&format!("&since={s}"));
        }
        if let Some(n) = name {
            uri.push_str(&format!("&name={}", encode(n)));
        }
        let evs: Vec<Event> = api.call(Method::GET, &uri, None)?;
        for e in &evs {
            if json {
                println!("{}", serde_json::to_string(e)?);
            } else {
                println!(
                    "{:>6}  {}  {:<16} {:<10} {}",
                    e.id,
                    fmt_time(e.time_ms),
                    e.instance,
                    e.kind,
                    e.message
                );
            }
        }
        let _ = std::io::stdout().flush();
        if let Some(last) = evs.last() {
            since = Some(last.id);
        } else if since.is_none() {
            since = Some(0);
        }
        if !follow {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn fmt_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}Z", ms.rem_euclid(1000))
}

fn print_info(i: &CtInfo) {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "unlimited".into());
    println!("name:       {}", i.name);
    println!("state:      {}", i.state);
    println!("template:   {}", i.template);
    println!(
        "pid:        {}",
        i.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
    );
    println!("rootfs:     {}", i.rootfs);
    println!(
        "memory:     {}",
        opt(i.memory_bytes.map(|m| format!("{} MiB", m >> 20)))
    );
    println!(
        "cpu quota:  {}",
        opt(i.cpu_quota_pct.map(|q| format!("{q}%")))
    );
    println!(
        "cpu weight: {}",
        i.cpu_weight
            .map(|w| w.to_string())
            .unwrap_or_else(|| "100 (default)".into())
    );
    println!("pids:       {}", opt(i.pids.map(|p| p.to_string())));
    match (&i.net, &i.address) {
        (Some(n), Some(a)) => println!("network:    {a} on {} ({})", n.bridge, n.subnet),
        _ => println!("network:    none (loopback only)"),
    }
    if let Some(r) = &i.stop_reason {
        println!("stopped:    {r}");
    }
    println!("created:    {}", fmt_time(i.created_ms));
}
