//! `corefour vmm --incoming HOST:PORT`: wait for one migration and build the VM from it.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use corefour_devices::Console;

use super::disks::DiskSink;
use super::protocol::ProtocolError;
use super::receive::Incoming;
use crate::builder::Vmm;
use crate::config::VmConfig;
use crate::memory;
use crate::snapshot::format;
use crate::snapshot::machine_state::MachineState;
use crate::snapshot::memfile;
use crate::snapshot::restore::{host_regions, load, prepare};

#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("incoming migration failed: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("incoming migration refused: {0}")]
    Refused(String),
}

/// A VM received from a source, loaded and committed; call `started` once it runs.
pub struct Received {
    pub vmm: Vmm,
    pub conn: Incoming,
    pub receive_ms: f64,
}

/// Puts this host's own resources into the source's config: each disk's path (the target may
/// hold a copy elsewhere, `--copy-storage`) and each NIC's tap (taps are per host). The guest
/// sees the same devices in the same order, so the counts must match.
pub fn localize(config: &mut VmConfig, local: &VmConfig) -> Result<(), String> {
    if config.disks.len() != local.disks.len() || config.nets.len() != local.nets.len() {
        return Err(format!(
            "the source's VM has {} disks and {} NICs, this host's config {} and {}",
            config.disks.len(),
            config.nets.len(),
            local.disks.len(),
            local.nets.len()
        ));
    }
    for (d, l) in config.disks.iter_mut().zip(&local.disks) {
        d.path = l.path.clone();
    }
    for (n, l) in config.nets.iter_mut().zip(&local.nets) {
        if n.mac != l.mac {
            return Err(format!(
                "a NIC's MAC differs: {:?} on the source, {:?} here",
                n.mac, l.mac
            ));
        }
        n.tap = l.tap.clone();
    }
    Ok(())
}

/// Whether `got` is the expected token (constant time in the token's bytes).
fn token_matches(want: &str, got: Option<&str>) -> bool {
    let Some(got) = got else {
        return false;
    };
    let (a, b) = (want.as_bytes(), got.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Listens on `addr`, accepts one migration and builds the VM. The source keeps its copy until
/// this side has loaded the state and the source commits. `local`, this host's config of the
/// VM, supplies the disk paths and taps (see `localize`). With a `token` only a source whose
/// HELLO carries it is taken; any other connection is refused and the wait goes on.
pub fn receive(
    addr: &str,
    console: Console,
    io_timeout: Duration,
    local: Option<&VmConfig>,
    token: Option<&str>,
) -> Result<Received, IncomingError> {
    let listener = TcpListener::bind(addr).map_err(|source| IncomingError::Listen {
        addr: addr.into(),
        source,
    })?;
    eprintln!(
        "corefour vmm: waiting for a migration on {addr}{}",
        if token.is_some() {
            " (only from the source with this VMM's token)"
        } else {
            ""
        }
    );
    let (mut conn, hello) = loop {
        let (mut conn, hello) = match Incoming::accept(&listener, io_timeout) {
            Ok(x) => x,
            // Without a token the first peer is the migration; with one, a peer that fails
            // (junk, a port scan) does not end the wait for the real source.
            Err(e) if token.is_some() => {
                eprintln!("corefour vmm: dropped a connection: {e}");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match token {
            Some(t) if !token_matches(t, hello.token.as_deref()) => {
                eprintln!(
                    "corefour vmm: refused a migration from {} without this VMM's token",
                    conn.peer
                );
                conn.refuse("this VMM waits for another source (the migration token differs)");
            }
            _ => break (conn, hello),
        }
    };
    let t = Instant::now();
    let refuse = |conn: &mut Incoming, why: String| {
        conn.refuse(&why);
        IncomingError::Refused(why)
    };
    let mut config: VmConfig = match serde_json::from_value(hello.config.clone()) {
        Ok(c) => c,
        Err(e) => return Err(refuse(&mut conn, format!("VM config: {e}"))),
    };
    if let Some(l) = local {
        if let Err(e) = localize(&mut config, l) {
            return Err(refuse(&mut conn, e));
        }
    }
    if let Err(e) = config.validate() {
        return Err(refuse(&mut conn, e.to_string()));
    }
    let mem = match memory::allocate(config.memory_mib) {
        Ok(m) => m,
        Err(e) => return Err(refuse(&mut conn, e.to_string())),
    };
    let layout = hello.regions.clone();
    if let Err(e) = memfile::validate(&layout) {
        return Err(refuse(&mut conn, e.to_string()));
    }
    let host = host_regions(&mem, &layout);
    // The memory this VMM builds for the config must match the source's layout.
    let same = host.len() == layout.len()
        && vm_memory_layout(&mem)
            == layout
                .iter()
                .map(|r| (r.guest_phys_addr, r.size))
                .collect::<Vec<_>>();
    if !same {
        return Err(refuse(
            &mut conn,
            "the source's memory layout differs from what this corefour builds for the config"
                .into(),
        ));
    }
    // Everything that does not need the final state happens now, while the source still runs.
    let disk_config = config.clone();
    let prepared = match prepare(config, &mem, console) {
        Ok(p) => p,
        Err(e) => return Err(refuse(&mut conn, e.to_string())),
    };
    // The devices just built registered this VMM's disks: the mirrored ones go there.
    let mut disks = match DiskSink::open(&hello.disks, &disk_config) {
        Ok(d) => d,
        Err(e) => return Err(refuse(&mut conn, e)),
    };
    conn.ready()?;
    let frame = conn.receive_memory(&host, &mut disks)?;
    if let Err(e) = disks.flush() {
        return Err(refuse(
            &mut conn,
            format!("cannot flush the disk copies: {e}"),
        ));
    }
    let mut state: MachineState = match format::decode(format::KIND_MIGRATION_STATE, &frame) {
        Ok(s) => s,
        Err(e) => return Err(refuse(&mut conn, e.to_string())),
    };
    if let Some(l) = local {
        // The state carries the source's config too; `load` checks it against the prepared one.
        let localized = serde_json::from_value::<VmConfig>(state.config.clone())
            .map_err(|e| format!("the state's VM config: {e}"))
            .and_then(|mut c| {
                localize(&mut c, l)?;
                serde_json::to_value(c).map_err(|e| e.to_string())
            });
        match localized {
            Ok(v) => state.config = v,
            Err(e) => return Err(refuse(&mut conn, e)),
        }
    }
    let vmm = match load(prepared, &state, mem) {
        Ok(v) => v,
        Err(e) => return Err(refuse(&mut conn, e.to_string())),
    };
    conn.loaded_wait_commit()?;
    Ok(Received {
        vmm,
        conn,
        receive_ms: t.elapsed().as_secs_f64() * 1e3,
    })
}

fn vm_memory_layout(mem: &memory::GuestMem) -> Vec<(u64, u64)> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}
