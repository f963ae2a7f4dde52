//! Container rows in the inventory: the `instances` table with kind 'ct' (one name space with the
//! VMs, as Incus has), the init's pid in the `vmm_pid` column, events in the shared table.

use corefour_api::{CtCreate, Event, VmState};
use rusqlite::{params, OptionalExtension};

use crate::inventory::{
    exec, insert_event, is_unique_violation, now_ms, Inventory, InventoryError, Pids,
};

/// A container as the inventory records it.
#[derive(Debug, Clone)]
pub struct CtRecord {
    pub id: i64,
    pub name: String,
    pub state: VmState,
    pub spec: CtCreate,
    /// The shim and the container's init (in `vmm_pid`) while it runs.
    pub pids: Option<Pids>,
    pub stop_reason: Option<String>,
    pub exit_code: Option<i32>,
    pub created_ms: i64,
}

const SELECT_CT: &str = "SELECT id, name, state, config, shim_pid, shim_start, vmm_pid, stop_reason, exit_code, created_ms FROM instances WHERE kind = 'ct'";

type RawRow = (
    i64,
    String,
    String,
    String,
    Option<i32>,
    Option<i64>,
    Option<i32>,
    Option<String>,
    Option<i32>,
    i64,
);

fn raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
    ))
}

fn finish(r: RawRow) -> Result<CtRecord, InventoryError> {
    let (id, name, state, config, shim_pid, shim_start, init_pid, stop_reason, exit_code, created) =
        r;
    let corrupt = |what: String| InventoryError::Corrupt {
        name: name.clone(),
        what,
    };
    let state = VmState::parse(&state).ok_or_else(|| corrupt(format!("state {state:?}")))?;
    let spec: CtCreate =
        serde_json::from_str(&config).map_err(|e| corrupt(format!("config: {e}")))?;
    let pids = match (shim_pid, shim_start, init_pid) {
        (Some(shim_pid), Some(start), Some(vmm_pid)) => Some(Pids {
            shim_pid,
            shim_start: u64::try_from(start).unwrap_or(0),
            vmm_pid,
        }),
        _ => None,
    };
    Ok(CtRecord {
        id,
        name,
        state,
        spec,
        pids,
        stop_reason,
        exit_code,
        created_ms: created,
    })
}

fn config_json(spec: &CtCreate) -> Result<String, InventoryError> {
    let mut stored = spec.clone();
    stored.start = false;
    serde_json::to_string(&stored).map_err(|e| InventoryError::Corrupt {
        name: spec.name.clone(),
        what: e.to_string(),
    })
}

impl Inventory {
    /// Inserts a container; the name must be free among all instances.
    pub fn insert_ct(&self, spec: &CtCreate, event: &str) -> Result<CtRecord, InventoryError> {
        let config = config_json(spec)?;
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let now = now_ms();
        if let Err(e) = exec(
            &tx,
            "INSERT INTO instances (name, kind, config, state, created_ms, updated_ms)
             VALUES (?1, 'ct', ?2, 'created', ?3, ?3)",
            params![spec.name, config, now],
        ) {
            return Err(if is_unique_violation(&e) {
                InventoryError::Exists(spec.name.clone())
            } else {
                e.into()
            });
        }
        let id = tx.last_insert_rowid();
        insert_event(&tx, &spec.name, "created", event)?;
        tx.commit()?;
        let mut stored = spec.clone();
        stored.start = false;
        Ok(CtRecord {
            id,
            name: spec.name.clone(),
            state: VmState::Created,
            spec: stored,
            pids: None,
            stop_reason: None,
            exit_code: None,
            created_ms: now,
        })
    }

    pub fn get_ct(&self, name: &str) -> Result<CtRecord, InventoryError> {
        let conn = self.lock();
        let r = conn
            .query_row(&format!("{SELECT_CT} AND name = ?1"), params![name], raw)
            .optional()?
            .ok_or_else(|| InventoryError::NotFound(name.to_string()))?;
        drop(conn);
        finish(r)
    }

    pub fn list_cts(&self) -> Result<Vec<CtRecord>, InventoryError> {
        let raws = {
            let conn = self.lock();
            let mut st = conn.prepare_cached(&format!("{SELECT_CT} ORDER BY name"))?;
            let rows = st.query_map([], raw)?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        raws.into_iter().map(finish).collect()
    }

    pub fn delete_ct(&self, name: &str, event: &str) -> Result<(), InventoryError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let n = exec(
            &tx,
            "DELETE FROM instances WHERE kind = 'ct' AND name = ?1",
            params![name],
        )?;
        if n == 0 {
            return Err(InventoryError::NotFound(name.to_string()));
        }
        insert_event(&tx, name, "deleted", event)?;
        tx.commit()?;
        Ok(())
    }

    pub fn set_ct_running(&self, name: &str, pids: Pids) -> Result<(), InventoryError> {
        self.update(
            name,
            "UPDATE instances SET state = 'running', shim_pid = ?2, shim_start = ?3, vmm_pid = ?4,
                 stop_reason = NULL, exit_code = NULL, updated_ms = ?5 WHERE kind = 'ct' AND name = ?1",
            params![
                name,
                pids.shim_pid,
                pids.shim_start as i64,
                pids.vmm_pid,
                now_ms()
            ],
            ("started", format!("init pid {}", pids.vmm_pid)),
        )
    }

    pub fn set_ct_stopped(
        &self,
        name: &str,
        reason: &str,
        exit_code: Option<i32>,
    ) -> Result<(), InventoryError> {
        self.update(
            name,
            "UPDATE instances SET state = 'stopped', shim_pid = NULL, shim_start = NULL, vmm_pid = NULL,
                 stop_reason = ?2, exit_code = ?3, updated_ms = ?4 WHERE kind = 'ct' AND name = ?1",
            params![name, reason, exit_code, now_ms()],
            ("stopped", reason.to_string()),
        )
    }

    /// running <-> paused.
    pub fn set_ct_state(&self, name: &str, state: VmState) -> Result<(), InventoryError> {
        self.update(
            name,
            "UPDATE instances SET state = ?2, updated_ms = ?3 WHERE kind = 'ct' AND name = ?1",
            params![name, state.as_str(), now_ms()],
            (
                match state {
                    VmState::Paused => "paused",
                    _ => "resumed",
                },
                state.as_str().to_string(),
            ),
        )
    }

    pub fn set_ct_spec(&self, spec: &CtCreate, event: &str) -> Result<(), InventoryError> {
        let config = config_json(spec)?;
        self.update(
            &spec.name,
            "UPDATE instances SET config = ?2, updated_ms = ?3 WHERE kind = 'ct' AND name = ?1",
            params![spec.name, config, now_ms()],
            ("limits", event.to_string()),
        )
    }

    /// Events of containers: of the one named, or of every container that exists.
    pub fn ct_events(
        &self,
        name: Option<&str>,
        since: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Event>, InventoryError> {
        let conn = self.lock();
        let filter = match name {
            Some(_) => "instance = ?3",
            None => "instance IN (SELECT name FROM instances WHERE kind = 'ct')",
        };
        // Newest `limit` when no `since` is given, returned oldest first either way.
        let sql = match since {
            Some(_) => format!(
                "SELECT id, time_ms, instance, kind, message FROM events
                 WHERE id > ?1 AND {filter} ORDER BY id LIMIT ?2"
            ),
            None => format!(
                "SELECT * FROM (SELECT id, time_ms, instance, kind, message FROM events
                 WHERE id > ?1 AND {filter} ORDER BY id DESC LIMIT ?2) ORDER BY id"
            ),
        };
        let mut st = conn.prepare_cached(&sql)?;
        let map = |r: &rusqlite::Row<'_>| {
            Ok(Event {
                id: r.get(0)?,
                time_ms: r.get(1)?,
                instance: r.get(2)?,
                kind: r.get(3)?,
                message: r.get(4)?,
            })
        };
        let since = since.unwrap_or(0);
        let rows = match name {
            Some(n) => st
                .query_map(params![since, limit, n], map)?
                .collect::<Result<Vec<_>, _>>()?,
            None => st
                .query_map(params![since, limit], map)?
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> CtCreate {
        serde_json::from_value(serde_json::json!({"name": name, "memory_bytes": 1 << 26})).unwrap()
    }

    #[test]
    fn rows_round_trip_and_share_the_name_space() {
        let t = tempfile::tempdir().unwrap();
        let inv = Inventory::open(&t.path().join("i.db"), "t").unwrap();
        let r = inv.insert_ct(&spec("a"), "defined").unwrap();
        assert_eq!(r.state, VmState::Created);
        assert!(matches!(
            inv.insert_ct(&spec("a"), "x"),
            Err(InventoryError::Exists(_))
        ));
        let pids = Pids {
            shim_pid: 10,
            shim_start: 20,
            vmm_pid: 30,
        };
        inv.set_ct_running("a", pids).unwrap();
        let g = inv.get_ct("a").unwrap();
        assert_eq!((g.state, g.pids), (VmState::Running, Some(pids)));
        assert_eq!(g.spec.memory_bytes, Some(1 << 26));
        // A VM listing does not see containers.
        assert!(inv.list_vms().unwrap().is_empty());
        assert!(inv.get_vm("a").is_err());
        inv.set_ct_stopped("a", "init exited with code 0", Some(0))
            .unwrap();
        let g = inv.get_ct("a").unwrap();
        assert_eq!(g.state, VmState::Stopped);
        assert_eq!(g.pids, None);
        assert_eq!(g.stop_reason.as_deref(), Some("init exited with code 0"));
        inv.insert_ct(&spec("b"), "defined").unwrap();
        let evs = inv.ct_events(Some("a"), None, 100).unwrap();
        let kinds: Vec<_> = evs.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["created", "started", "stopped"]);
        assert_eq!(inv.ct_events(None, None, 2).unwrap().len(), 2);
        let after = inv.ct_events(None, Some(evs[1].id), 100).unwrap();
        assert_eq!(after.len(), 2);
        inv.delete_ct("a", "deleted").unwrap();
        assert!(matches!(inv.get_ct("a"), Err(InventoryError::NotFound(_))));
        assert_eq!(inv.list_cts().unwrap().len(), 1);
    }
}
