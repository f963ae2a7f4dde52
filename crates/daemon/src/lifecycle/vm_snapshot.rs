//! `POST /v1/vms/{name}/snapshot`: a snapshot of a running VM through its VMM's API socket
//! (`PUT /vm/snapshot`), into the VM's state directory unless a path is given.

use std::path::PathBuf;
use std::sync::Arc;

use hyper::Method;
use serde::Deserialize;

use super::Daemon;
use crate::error::DaemonError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Where to write it (a new or empty directory); default `VMDIR/snapshots/<unix ms>`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Only the pages written since this VMM's previous snapshot.
    #[serde(default)]
    pub diff: bool,
}

impl Daemon {
    pub async fn snapshot(
        self: &Arc<Self>,
        name: &str,
        req: SnapshotRequest,
    ) -> Result<serde_json::Value, DaemonError> {
        let _g = self.op_lock(name).await;
        self.running_handle(name)?;
        let path = match req.path {
            Some(p) if p.is_absolute() => p,
            Some(p) => {
                return Err(DaemonError::BadRequest(format!(
                    "snapshot path {} must be absolute (the daemon resolves no relative paths)",
                    p.display()
                )))
            }
            None => {
                let ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0);
                self.vm_dir(name).join("snapshots").join(ms.to_string())
            }
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| DaemonError::io(format!("cannot create {}", parent.display()), e))?;
        }
        let body = serde_json::json!({"path": path, "diff": req.diff}).to_string();
        let (status, resp) = crate::client::call(
            &self.api_sock(name),
            Method::PUT,
            "/vm/snapshot",
            Some(body.into_bytes()),
        )
        .await
        .map_err(|source| DaemonError::VmmUnreachable {
            name: name.to_string(),
            source,
        })?;
        if !status.is_success() {
            return Err(DaemonError::Vmm {
                name: name.to_string(),
                message: crate::client::fault_text(&resp),
            });
        }
        serde_json::from_slice(&resp).map_err(|e| DaemonError::Vmm {
            name: name.to_string(),
            message: format!("malformed snapshot report: {e}"),
        })
    }
}
