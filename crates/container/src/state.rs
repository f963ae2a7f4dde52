//! What a container leaves in `<root>/<id>/state.json`, and the OCI state it reports.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Hooks;
use serde::{Deserialize, Serialize};

use crate::cgroups::{CgroupConfig, CgroupManager};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: corrupt state file ({msg}); `delete --force` removes it")]
    Corrupt { path: PathBuf, msg: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

/// The state document of the OCI runtime spec, as `state` prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OciState {
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    pub id: String,
    pub status: Status,
    pub pid: i32,
    pub bundle: PathBuf,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

/// Everything the later verbs need, written once by `create` and updated by `start`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerState {
    #[serde(flatten)]
    pub oci: OciState,
    pub rootfs: PathBuf,
    pub created: String,
    /// Start time of the init in clock ticks: guards against a recycled PID.
    pub init_start_ticks: u64,
    pub cgroup: CgroupConfig,
    #[serde(default)]
    pub hooks: Option<Hooks>,
    pub owner: u32,
}

pub const STATE_FILE: &str = "state.json";
pub const INIT_SOCKET: &str = "init.sock";

impl ContainerState {
    pub fn dir(root: &Path, id: &str) -> PathBuf {
        root.join(id)
    }

    pub fn load(root: &Path, id: &str) -> Result<Option<Self>, StateError> {
        let path = Self::dir(root, id).join(STATE_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(cause) => return Err(StateError::Io { path, cause }),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                path,
                msg: e.to_string(),
            })
    }

    /// Writes the state atomically (temp file + rename) so a reader never sees half a file.
    pub fn save(&self, root: &Path) -> Result<(), StateError> {
        let dir = Self::dir(root, &self.oci.id);
        let tmp = dir.join(".state.json.tmp");
        let path = dir.join(STATE_FILE);
        let data = serde_json::to_vec(self).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        std::fs::write(&tmp, data).map_err(|cause| StateError::Io {
            path: tmp.clone(),
            cause,
        })?;
        std::fs::rename(&tmp, &path).map_err(|cause| StateError::Io { path, cause })
    }

    /// Whether the init process recorded at create time still exists (and is not a zombie).
    pub fn init_alive(&self) -> bool {
        match crate::util::process_start_ticks(self.oci.pid) {
            Some((ticks, state)) => ticks == self.init_start_ticks && state != 'Z' && state != 'X',
            None => false,
        }
    }

    /// The live status: the recorded one, corrected by whether the init still runs, whether
    /// `start` consumed the init socket, and the freezer. Needs the state root to find the socket.
    pub fn refresh_in(&mut self, root: &Path) {
        let alive = self.init_alive();
        let started = !Self::dir(root, &self.oci.id).join(INIT_SOCKET).exists();
        self.oci.status = match (self.oci.status, alive) {
            (_, false) => Status::Stopped,
            (Status::Creating, true) => Status::Creating,
            (Status::Created, true) if !started => Status::Created,
            (_, true) => {
                if crate::cgroups::manager(&self.cgroup)
                    .map(|m| m.is_frozen())
                    .unwrap_or(false)
                {
                    Status::Paused
                } else {
                    Status::Running
                }
            }
        };
    }
}

/// Checks a container ID the way runc does: no path tricks, nothing odd in a directory name.
pub fn validate_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("abc-1.2_x"));
        assert!(!validate_id("../etc"));
        assert!(!validate_id(".."));
        assert!(!validate_id(""));
        assert!(!validate_id("a/b"));
        assert!(!validate_id(&"x".repeat(129)));
    }

    #[test]
    fn corrupt_state_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("c1")).unwrap();
        std::fs::write(
            root.path().join("c1").join(STATE_FILE),
            b"{\"ociVersion\": 1",
        )
        .unwrap();
        let e = ContainerState::load(root.path(), "c1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("corrupt state file") && e.contains("delete --force"),
            "{e}"
        );
        assert!(ContainerState::load(root.path(), "nope").unwrap().is_none());
        // delete --force clears what it cannot parse.
        assert!(crate::container_delete::delete(root.path(), "c1", false).is_err());
        crate::container_delete::delete(root.path(), "c1", true).unwrap();
        assert!(!root.path().join("c1").exists());
    }

    #[test]
    fn oci_state_json_shape() {
        let s = OciState {
            oci_version: "1.0.2".into(),
            id: "c1".into(),
            status: Status::Created,
            pid: 42,
            bundle: "/b".into(),
            annotations: HashMap::new(),
        };
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(v["ociVersion"], "1.0.2");
        assert_eq!(v["status"], "created");
        assert_eq!(v["pid"], 42);
        assert!(v.get("annotations").is_none());
    }
}
