//! Container rows in the inventory: the `instances` table with kind 'ct' (one name space with the
//! VMs, as Incus has), the init's pid in the `vmm_pid` column, events in the shared table.

use corefour_api::{CtCreate, Event, VmState};
use rusqlite::params;

use crate::inventory::{
    get_instance, insert_event, insert_instance, list_instances, now_ms, spec_json, InstanceRow,
    Inventory, InventoryError, Kind, Pids, RawInstance,
};

/// A container as the inventory records it; the init's pid is `pids.vmm_pid`.
pub type CtRecord = InstanceRow<CtCreate>;

fn config_json(spec: &CtCreate) -> Result<String, InventoryError> {
    let mut stored = spec.clone();
    stored.start = false;
    spec_json(&spec.name, &stored)
}

impl Inventory {
    /// Inserts a container; the name must be free among all instances.
    pub fn insert_ct(&self, spec: &CtCreate, event: &str) -> Result<CtRecord, InventoryError> {
        let config = config_json(spec)?;
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let now = now_ms();
        let id = insert_instance(&tx, Kind::Ct, &spec.name, &config, now)?;
        insert_event(&tx, &spec.name, "created", event)?;
        tx.commit()?;
        let mut stored = spec.clone();
        stored.start = false;
        Ok(InstanceRow::created(id, spec.name.clone(), stored, now))
    }

    pub fn get_ct(&self, name: &str) -> Result<CtRecord, InventoryError> {
        let raw = get_instance(&self.lock(), Kind::Ct, name)?;
        raw.parse()
    }

    pub fn list_cts(&self) -> Result<Vec<CtRecord>, InventoryError> {
        let raws = list_instances(&self.lock(), Kind::Ct)?;
        raws.into_iter().map(RawInstance::parse).collect()
    }

    pub fn delete_ct(&self, name: &str, event: &str) -> Result<(), InventoryError> {
        self.delete_instance(Kind::Ct, name, event)
    }

    pub fn set_ct_running(&self, name: &str, pids: Pids) -> Result<(), InventoryError> {
        self.set_instance_running(Kind::Ct, name, pids, format!("init pid {}", pids.vmm_pid))
    }

    pub fn set_ct_stopped(
        &self,
        name: &str,
        reason: &str,
        exit_code: Option<i32>,
    ) -> Result<(), InventoryError> {
        self.set_instance_stopped(Kind::Ct, name, reason, exit_code)
    }

    /// running <-> paused.
    pub fn set_ct_state(&self, name: &str, state: VmState) -> Result<(), InventoryError> {
        let event = match state {
            VmState::Paused => "paused",
            _ => "resumed",
        };
        self.set_instance_state(Kind::Ct, name, state, event)
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
