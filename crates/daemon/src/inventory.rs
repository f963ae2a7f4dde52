//! The inventory: instances, their config, disks, NICs, networks, snapshots and events in SQLite.
//!
//! One connection behind a mutex serialises writers inside the daemon; WAL mode lets `sqlite3` and a
//! restarted daemon read while another writes, and every multi-row change runs in one transaction so
//! concurrent creates and deletes can neither lose nor duplicate rows. Unique names are enforced by
//! the schema, not by a check-then-insert race.

use std::path::Path;
use std::sync::Mutex;

use corefour_api::{Event, VmCreate, VmNic, VmState};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot open the inventory {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("an instance named {0:?} already exists")]
    Exists(String),
    #[error("MAC address {0} is already used by another NIC")]
    MacInUse(String),
    #[error("no instance named {0:?}")]
    NotFound(String),
    #[error("the inventory row of {name:?} is corrupt: {what}")]
    Corrupt { name: String, what: String },
    #[error("inventory query failed: {0}")]
    Sql(#[from] rusqlite::Error),
}

/// Process identity of a running VM: the shim that waits for the VMM, and the VMM itself. The start
/// time (clock ticks since boot, /proc/PID/stat field 22) tells a live process from a recycled pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pids {
    pub shim_pid: i32,
    pub shim_start: u64,
    pub vmm_pid: i32,
}

#[derive(Debug, Clone)]
pub struct VmRecord {
    pub id: i64,
    pub name: String,
    pub state: VmState,
    pub spec: VmCreate,
    pub nics: Vec<VmNic>,
    pub pids: Option<Pids>,
    pub stop_reason: Option<String>,
    pub exit_code: Option<i32>,
    pub created_ms: i64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS instances (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL CHECK (kind IN ('vm', 'ct')),
    config      TEXT NOT NULL,
    state       TEXT NOT NULL,
    shim_pid    INTEGER,
    shim_start  INTEGER,
    vmm_pid     INTEGER,
    stop_reason TEXT,
    exit_code   INTEGER,
    created_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS disks (
    instance_id INTEGER NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    path        TEXT NOT NULL,
    read_only   INTEGER NOT NULL,
    rate_limit  TEXT,
    PRIMARY KEY (instance_id, idx)
);
CREATE TABLE IF NOT EXISTS networks (
    name        TEXT PRIMARY KEY,
    created_ms  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nics (
    instance_id INTEGER NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    network     TEXT NOT NULL REFERENCES networks(name),
    tap         TEXT NOT NULL UNIQUE,
    mac         TEXT NOT NULL UNIQUE,
    rate_limit  TEXT,
    PRIMARY KEY (instance_id, idx)
);
CREATE TABLE IF NOT EXISTS snapshots (
    instance_id INTEGER NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    path        TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    PRIMARY KEY (instance_id, name)
);
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms     INTEGER NOT NULL,
    instance    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    message     TEXT NOT NULL
);
";

/// Events beyond this many are pruned, oldest first, so the inventory does not grow without bound.
const EVENTS_KEPT: i64 = 20_000;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub struct Inventory {
    conn: Mutex<Connection>,
    /// Start of every tap name this inventory hands out.
    tap_prefix: String,
}

impl Inventory {
    /// `tap_prefix` (at most 6 characters) starts the tap names of generated NICs.
    pub fn open(path: &Path, tap_prefix: &str) -> Result<Inventory, InventoryError> {
        let open_err = |source| InventoryError::Open {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        Ok(Inventory {
            conn: Mutex::new(conn),
            tap_prefix: tap_prefix.chars().take(6).collect(),
        })
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll back
        // on drop), so a poisoned lock is safe to keep using.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts a VM with its disks and NICs; NICs without a MAC get a generated one, and every NIC a
    /// tap name. Returns the stored record.
    pub fn insert_vm(&self, spec: &VmCreate) -> Result<VmRecord, InventoryError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let now = now_ms();
        let mut stored = spec.clone();
        stored.start = false;
        let config = spec_json(&spec.name, &stored)?;
        let id = insert_instance(&tx, Kind::Vm, &spec.name, &config, now)?;
        for (i, d) in spec.disks.iter().enumerate() {
            let rate = d
                .rate_limit
                .as_ref()
                .and_then(|r| serde_json::to_string(r).ok());
            exec(
                &tx,
                "INSERT INTO disks (instance_id, idx, path, read_only, rate_limit) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, i as i64, d.path, d.read_only, rate],
            )?;
        }
        let mut nics = Vec::new();
        for (i, n) in spec.nets.iter().enumerate() {
            exec(
                &tx,
                "INSERT OR IGNORE INTO networks (name, created_ms) VALUES (?1, ?2)",
                params![n.bridge, now],
            )?;
            let mac = n.mac.clone().unwrap_or_else(|| generated_mac(id, i));
            let tap = format!("{}t{id}n{i}", self.tap_prefix);
            let rate = n
                .rate_limit
                .as_ref()
                .and_then(|r| serde_json::to_string(r).ok());
            if let Err(e) = exec(
                &tx,
                "INSERT INTO nics (instance_id, idx, network, tap, mac, rate_limit) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![id, i as i64, n.bridge, tap, mac, rate],
            ) {
                return Err(if is_unique_violation(&e) {
                    InventoryError::MacInUse(mac)
                } else {
                    e.into()
                });
            }
            nics.push(VmNic {
                bridge: n.bridge.clone(),
                tap,
                mac,
                rate_limit: n.rate_limit.clone(),
            });
        }
        insert_event(&tx, &spec.name, "created", "defined")?;
        tx.commit()?;
        Ok(VmRecord::new(
            InstanceRow::created(id, spec.name.clone(), stored, now),
            nics,
        ))
    }

    pub fn get_vm(&self, name: &str) -> Result<VmRecord, InventoryError> {
        let conn = self.lock();
        let raw = get_instance(&conn, Kind::Vm, name)?;
        finish_record(&conn, raw)
    }

    pub fn list_vms(&self) -> Result<Vec<VmRecord>, InventoryError> {
        let conn = self.lock();
        let raws = list_instances(&conn, Kind::Vm)?;
        raws.into_iter().map(|r| finish_record(&conn, r)).collect()
    }

    /// Removes the VM and (by cascade) its disks, NICs and snapshots.
    pub fn delete_vm(&self, name: &str) -> Result<(), InventoryError> {
        self.delete_instance(Kind::Vm, name, "deleted")
    }

    pub fn set_running(&self, name: &str, pids: Pids) -> Result<(), InventoryError> {
        self.set_instance_running(Kind::Vm, name, pids, format!("VMM pid {}", pids.vmm_pid))
    }

    pub fn set_state(&self, name: &str, state: VmState, event: &str) -> Result<(), InventoryError> {
        self.set_instance_state(Kind::Vm, name, state, event)
    }

    /// Marks the VM stopped, unless it was deleted meanwhile or already stopped by another path.
    pub fn set_stopped(
        &self,
        name: &str,
        reason: &str,
        exit_code: Option<i32>,
    ) -> Result<(), InventoryError> {
        self.set_instance_stopped(Kind::Vm, name, reason, exit_code)
    }

    pub fn set_limits(
        &self,
        name: &str,
        cpu_quota_pct: Option<u32>,
        cpu_weight: Option<u32>,
    ) -> Result<VmRecord, InventoryError> {
        let mut rec = self.get_vm(name)?;
        rec.spec.cpu_quota_pct = cpu_quota_pct;
        rec.spec.cpu_weight = cpu_weight;
        let config = spec_json(name, &rec.spec)?;
        self.update(
            name,
            "UPDATE instances SET config = ?2, updated_ms = ?3 WHERE name = ?1",
            params![name, config, now_ms()],
            (
                "limits",
                format!("cpu_quota_pct={cpu_quota_pct:?} cpu_weight={cpu_weight:?}"),
            ),
        )?;
        Ok(rec)
    }

    /// Points the VM's disks at new files (a running clone's source moves onto its overlays).
    pub fn set_disk_paths(&self, name: &str, paths: &[String]) -> Result<VmRecord, InventoryError> {
        let mut rec = self.get_vm(name)?;
        for (d, p) in rec.spec.disks.iter_mut().zip(paths) {
            d.path = p.clone();
        }
        let config = spec_json(name, &rec.spec)?;
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        exec(
            &tx,
            "UPDATE instances SET config = ?2, updated_ms = ?3 WHERE name = ?1",
            params![name, config, now_ms()],
        )?;
        for (i, p) in paths.iter().enumerate() {
            exec(
                &tx,
                "UPDATE disks SET path = ?3 WHERE instance_id = ?1 AND idx = ?2",
                params![rec.id, i as i64, p],
            )?;
        }
        insert_event(&tx, name, "disks", &format!("now {}", paths.join(", ")))?;
        tx.commit()?;
        Ok(rec)
    }

    /// Removes an instance's row (and by cascade what hangs off it), recording `event`.
    pub(crate) fn delete_instance(
        &self,
        kind: Kind,
        name: &str,
        event: &str,
    ) -> Result<(), InventoryError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let n = exec(
            &tx,
            "DELETE FROM instances WHERE kind = ?2 AND name = ?1",
            params![name, kind.as_str()],
        )?;
        if n == 0 {
            return Err(InventoryError::NotFound(name.to_string()));
        }
        insert_event(&tx, name, "deleted", event)?;
        tx.commit()?;
        Ok(())
    }

    /// Records a started instance's processes; `event` says which pid is its main one.
    pub(crate) fn set_instance_running(
        &self,
        kind: Kind,
        name: &str,
        pids: Pids,
        event: String,
    ) -> Result<(), InventoryError> {
        self.update(
            name,
            "UPDATE instances SET state = 'running', shim_pid = ?2, shim_start = ?3, vmm_pid = ?4,
                 stop_reason = NULL, exit_code = NULL, updated_ms = ?5 WHERE kind = ?6 AND name = ?1",
            params![
                name,
                pids.shim_pid,
                pids.shim_start as i64,
                pids.vmm_pid,
                now_ms(),
                kind.as_str()
            ],
            ("started", event),
        )
    }

    pub(crate) fn set_instance_stopped(
        &self,
        kind: Kind,
        name: &str,
        reason: &str,
        exit_code: Option<i32>,
    ) -> Result<(), InventoryError> {
        self.update(
            name,
            "UPDATE instances SET state = 'stopped', shim_pid = NULL, shim_start = NULL, vmm_pid = NULL,
                 stop_reason = ?2, exit_code = ?3, updated_ms = ?4 WHERE kind = ?5 AND name = ?1",
            params![name, reason, exit_code, now_ms(), kind.as_str()],
            ("stopped", reason.to_string()),
        )
    }

    /// running <-> paused (and what reconciling finds), with `event` as the event's kind.
    pub(crate) fn set_instance_state(
        &self,
        kind: Kind,
        name: &str,
        state: VmState,
        event: &str,
    ) -> Result<(), InventoryError> {
        self.update(
            name,
            "UPDATE instances SET state = ?2, updated_ms = ?3 WHERE kind = ?4 AND name = ?1",
            params![name, state.as_str(), now_ms(), kind.as_str()],
            (event, state.as_str().to_string()),
        )
    }

    pub(crate) fn update(
        &self,
        name: &str,
        sql: &str,
        p: impl rusqlite::Params,
        event: (&str, String),
    ) -> Result<(), InventoryError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        if exec(&tx, sql, p)? == 0 {
            return Err(InventoryError::NotFound(name.to_string()));
        }
        insert_event(&tx, name, event.0, &event.1)?;
        tx.commit()?;
        Ok(())
    }

    pub fn add_event(
        &self,
        instance: &str,
        kind: &str,
        message: &str,
    ) -> Result<(), InventoryError> {
        let conn = self.lock();
        insert_event(&conn, instance, kind, message)
    }

    /// Events with an id above `since`, oldest first, at most `limit`.
    pub fn events_since(&self, since: i64, limit: u32) -> Result<Vec<Event>, InventoryError> {
        let conn = self.lock();
        let mut st = conn.prepare(
            "SELECT id, time_ms, instance, kind, message FROM events WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = st.query_map(params![since, limit], |r| {
            Ok(Event {
                id: r.get(0)?,
                time_ms: r.get(1)?,
                instance: r.get(2)?,
                kind: r.get(3)?,
                message: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// The newest `n` events, oldest first.
    pub fn last_events(&self, n: u32) -> Result<Vec<Event>, InventoryError> {
        let since = {
            let conn = self.lock();
            let max: i64 =
                conn.query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))?;
            max - i64::from(n)
        };
        self.events_since(since, n)
    }

    pub fn networks(&self) -> Result<Vec<String>, InventoryError> {
        let conn = self.lock();
        let mut st = conn.prepare("SELECT name FROM networks ORDER BY name")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

/// Which kind of instance a row of `instances` holds (its `kind` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Vm,
    Ct,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Vm => "vm",
            Kind::Ct => "ct",
        }
    }
}

/// What every instance row holds, VM or container; `S` is the kind's create request, stored (with
/// `start` cleared) as the row's `config`.
#[derive(Debug, Clone)]
pub struct InstanceRow<S> {
    pub id: i64,
    pub name: String,
    pub state: VmState,
    pub spec: S,
    /// The shim and the instance's main process (VMM, or a container's init) while it runs.
    pub pids: Option<Pids>,
    pub stop_reason: Option<String>,
    pub exit_code: Option<i32>,
    pub created_ms: i64,
}

impl<S> InstanceRow<S> {
    /// The row just inserted for a new instance.
    pub(crate) fn created(id: i64, name: String, spec: S, now: i64) -> InstanceRow<S> {
        InstanceRow {
            id,
            name,
            state: VmState::Created,
            spec,
            pids: None,
            stop_reason: None,
            exit_code: None,
            created_ms: now,
        }
    }
}

impl VmRecord {
    fn new(r: InstanceRow<VmCreate>, nics: Vec<VmNic>) -> VmRecord {
        VmRecord {
            id: r.id,
            name: r.name,
            state: r.state,
            spec: r.spec,
            nics,
            pids: r.pids,
            stop_reason: r.stop_reason,
            exit_code: r.exit_code,
            created_ms: r.created_ms,
        }
    }
}

/// An `instances` row as SQLite returns it, before its text columns are parsed.
pub(crate) struct RawInstance {
    id: i64,
    name: String,
    state: String,
    config: String,
    shim_pid: Option<i32>,
    shim_start: Option<i64>,
    vmm_pid: Option<i32>,
    stop_reason: Option<String>,
    exit_code: Option<i32>,
    created_ms: i64,
}

const SELECT_INSTANCE: &str = "SELECT id, name, state, config, shim_pid, shim_start, vmm_pid, stop_reason, exit_code, created_ms FROM instances";

fn row_to_raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawInstance> {
    Ok(RawInstance {
        id: r.get(0)?,
        name: r.get(1)?,
        state: r.get(2)?,
        config: r.get(3)?,
        shim_pid: r.get(4)?,
        shim_start: r.get(5)?,
        vmm_pid: r.get(6)?,
        stop_reason: r.get(7)?,
        exit_code: r.get(8)?,
        created_ms: r.get(9)?,
    })
}

pub(crate) fn get_instance(
    conn: &Connection,
    kind: Kind,
    name: &str,
) -> Result<RawInstance, InventoryError> {
    conn.prepare_cached(&format!("{SELECT_INSTANCE} WHERE kind = ?1 AND name = ?2"))?
        .query_row(params![kind.as_str(), name], row_to_raw)
        .optional()?
        .ok_or_else(|| InventoryError::NotFound(name.to_string()))
}

/// Every instance of `kind`, by name.
pub(crate) fn list_instances(
    conn: &Connection,
    kind: Kind,
) -> Result<Vec<RawInstance>, InventoryError> {
    let mut st =
        conn.prepare_cached(&format!("{SELECT_INSTANCE} WHERE kind = ?1 ORDER BY name"))?;
    let rows = st.query_map(params![kind.as_str()], row_to_raw)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

impl RawInstance {
    /// Parses the state and config; a row that does not parse is reported as corrupt.
    pub(crate) fn parse<S: DeserializeOwned>(self) -> Result<InstanceRow<S>, InventoryError> {
        let corrupt = |what: String| InventoryError::Corrupt {
            name: self.name.clone(),
            what,
        };
        let state = VmState::parse(&self.state)
            .ok_or_else(|| corrupt(format!("state {:?}", self.state)))?;
        let spec: S =
            serde_json::from_str(&self.config).map_err(|e| corrupt(format!("config: {e}")))?;
        let pids = match (self.shim_pid, self.shim_start, self.vmm_pid) {
            (Some(shim_pid), Some(start), Some(vmm_pid)) => Some(Pids {
                shim_pid,
                shim_start: u64::try_from(start).unwrap_or(0),
                vmm_pid,
            }),
            _ => None,
        };
        Ok(InstanceRow {
            id: self.id,
            name: self.name,
            state,
            spec,
            pids,
            stop_reason: self.stop_reason,
            exit_code: self.exit_code,
            created_ms: self.created_ms,
        })
    }
}

fn finish_record(conn: &Connection, raw: RawInstance) -> Result<VmRecord, InventoryError> {
    let row = raw.parse::<VmCreate>()?;
    let mut st = conn.prepare_cached(
        "SELECT network, tap, mac, rate_limit FROM nics WHERE instance_id = ?1 ORDER BY idx",
    )?;
    let nics = st
        .query_map(params![row.id], |r| {
            let rate: Option<String> = r.get(3)?;
            Ok(VmNic {
                bridge: r.get(0)?,
                tap: r.get(1)?,
                mac: r.get(2)?,
                rate_limit: rate.and_then(|s| serde_json::from_str(&s).ok()),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VmRecord::new(row, nics))
}

/// The `config` column of a spec.
pub(crate) fn spec_json<S: Serialize>(name: &str, spec: &S) -> Result<String, InventoryError> {
    serde_json::to_string(spec).map_err(|e| InventoryError::Corrupt {
        name: name.to_string(),
        what: e.to_string(),
    })
}

/// Inserts the `instances` row of a new instance and returns its id; the schema keeps names
/// unique among all kinds.
pub(crate) fn insert_instance(
    conn: &Connection,
    kind: Kind,
    name: &str,
    config: &str,
    now: i64,
) -> Result<i64, InventoryError> {
    if let Err(e) = exec(
        conn,
        "INSERT INTO instances (name, kind, config, state, created_ms, updated_ms)
         VALUES (?1, ?2, ?3, 'created', ?4, ?4)",
        params![name, kind.as_str(), config, now],
    ) {
        return Err(if is_unique_violation(&e) {
            InventoryError::Exists(name.to_string())
        } else {
            e.into()
        });
    }
    Ok(conn.last_insert_rowid())
}

pub(crate) fn insert_event(
    conn: &Connection,
    instance: &str,
    kind: &str,
    message: &str,
) -> Result<(), InventoryError> {
    exec(
        conn,
        "INSERT INTO events (time_ms, instance, kind, message) VALUES (?1, ?2, ?3, ?4)",
        params![now_ms(), instance, kind, message],
    )?;
    let id = conn.last_insert_rowid();
    if id % 1000 == 0 {
        exec(
            conn,
            "DELETE FROM events WHERE id <= ?1",
            params![id - EVENTS_KEPT],
        )?;
    }
    Ok(())
}

/// Runs one statement through SQLite's statement cache (parsing SQL was a visible share of the
/// daemon's time per VM in `corefour bench lifecycle`).
pub(crate) fn exec(
    conn: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(p)
}

pub(crate) fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ConstraintViolation)
}

/// Locally administered unicast MAC derived from the instance id and NIC index: unique while ids are
/// below 2^24, and stable across daemon restarts.
pub fn generated_mac(id: i64, idx: usize) -> String {
    let id = id as u64;
    format!(
        "02:c4:{:02x}:{:02x}:{:02x}:{:02x}",
        (id >> 16) & 0xff,
        (id >> 8) & 0xff,
        id & 0xff,
        idx & 0xff
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use corefour_api::NetSpec;

    fn spec(name: &str) -> VmCreate {
        serde_json::from_value(serde_json::json!({"name": name, "kernel": "/k"})).unwrap()
    }

    #[test]
    fn insert_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let inv = Inventory::open(&dir.path().join("db"), "c4ab12").unwrap();
        inv.insert_vm(&spec("b")).unwrap();
        inv.insert_vm(&spec("a")).unwrap();
        assert!(matches!(
            inv.insert_vm(&spec("a")),
            Err(InventoryError::Exists(_))
        ));
        let names: Vec<_> = inv
            .list_vms()
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(inv.get_vm("a").unwrap().state, VmState::Created);
        inv.delete_vm("a").unwrap();
        assert!(matches!(inv.get_vm("a"), Err(InventoryError::NotFound(_))));
        assert!(matches!(
            inv.delete_vm("a"),
            Err(InventoryError::NotFound(_))
        ));
        let kinds: Vec<_> = inv
            .events_since(0, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, ["created", "created", "deleted"]);
    }

    #[test]
    fn nics_get_unique_macs_and_taps_and_cascade() {
        let dir = tempfile::tempdir().unwrap();
        let inv = Inventory::open(&dir.path().join("db"), "c4ab12").unwrap();
        let mut s = spec("n");
        s.nets = vec![
            NetSpec {
                bridge: "br0".into(),
                mac: None,
                rate_limit: None,
            },
            NetSpec {
                bridge: "br0".into(),
                mac: None,
                rate_limit: None,
            },
        ];
        let rec = inv.insert_vm(&s).unwrap();
        assert_ne!(rec.nics[0].mac, rec.nics[1].mac);
        assert_ne!(rec.nics[0].tap, rec.nics[1].tap);
        assert!(rec.nics.iter().all(|n| n.tap.len() <= 15));
        assert_eq!(inv.get_vm("n").unwrap().nics, rec.nics);
        let mut clash = spec("m");
        clash.nets = vec![NetSpec {
            bridge: "br0".into(),
            mac: Some(rec.nics[0].mac.clone()),
            rate_limit: None,
        }];
        assert!(matches!(
            inv.insert_vm(&clash),
            Err(InventoryError::MacInUse(_))
        ));
        // The failed insert rolled back whole: no half-defined "m".
        assert!(matches!(inv.get_vm("m"), Err(InventoryError::NotFound(_))));
        inv.delete_vm("n").unwrap();
        let conn = inv.lock();
        let left: i64 = conn
            .query_row("SELECT COUNT(*) FROM nics", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
    }

    #[test]
    fn running_and_stopped_states() {
        let dir = tempfile::tempdir().unwrap();
        let inv = Inventory::open(&dir.path().join("db"), "c4ab12").unwrap();
        inv.insert_vm(&spec("r")).unwrap();
        let pids = Pids {
            shim_pid: 10,
            shim_start: 99,
            vmm_pid: 11,
        };
        inv.set_running("r", pids).unwrap();
        let rec = inv.get_vm("r").unwrap();
        assert_eq!((rec.state, rec.pids), (VmState::Running, Some(pids)));
        inv.set_stopped("r", "guest exited with code 0", Some(0))
            .unwrap();
        let rec = inv.get_vm("r").unwrap();
        assert_eq!(rec.state, VmState::Stopped);
        assert_eq!(rec.pids, None);
        assert_eq!(rec.stop_reason.as_deref(), Some("guest exited with code 0"));
        let rec = inv.set_limits("r", Some(50), Some(200)).unwrap();
        assert_eq!(rec.spec.cpu_quota_pct, Some(50));
        assert_eq!(inv.get_vm("r").unwrap().spec.cpu_weight, Some(200));
    }
}
