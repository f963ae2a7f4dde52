//! VM requests and responses.

use serde::{Deserialize, Serialize};

/// `POST /v1/vms`: define a VM (and optionally start it at once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    /// `[a-z0-9][a-z0-9-_.]{0,62}`; unique among all instances.
    pub name: String,
    /// Path of the guest kernel or test binary (canonicalised by the daemon).
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Boot-time virtio-balloon target: memory the guest is asked to give back (MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon_mib: Option<u64>,
    /// "auto", "kvm" or "emu".
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Host CPUs the vCPU threads may run on (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_pin: Vec<u32>,
    /// Percent of one host CPU the whole VM may use (150 = one and a half CPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota_pct: Option<u32>,
    /// Relative CPU weight, 1..=10000 (cgroup v2 scale; 100 is the default share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetSpec>,
    /// Start the VM right after defining it.
    #[serde(default)]
    pub start: bool,
}

pub fn default_vcpus() -> u32 {
    1
}
pub fn default_memory_mib() -> u64 {
    64
}
pub fn default_backend() -> String {
    "auto".to_string()
}

/// `PATCH /v1/vms/{name}`: CPU limits enforced through the VM's cgroup, changed also while the VM
/// runs. An absent field is left as it is; 0 removes the limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmLimits {
    /// Percent of one host CPU the whole VM may use per period (150 = one and a half CPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota_pct: Option<u32>,
    /// Relative CPU weight, 1..=10000 (cgroup v2 scale; 100 is the default share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
}

/// Token-bucket rate limit passed to the VMM's virtio device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops_per_sec: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    /// The daemon-managed bridge the NIC's tap joins (created on first use).
    pub bridge: String,
    /// `02:xx:..`; generated (locally administered, unique) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// A NIC as the daemon assigned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmNic {
    pub bridge: String,
    pub tap: String,
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Defined, never started.
    Created,
    Running,
    Paused,
    Stopped,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
        }
    }

    pub fn parse(s: &str) -> Option<VmState> {
        Some(match s {
            "created" => VmState::Created,
            "running" => VmState::Running,
            "paused" => VmState::Paused,
            "stopped" => VmState::Stopped,
            _ => return None,
        })
    }

    /// Whether a VMM process exists for the VM.
    pub fn is_active(self) -> bool {
        matches!(self, VmState::Running | VmState::Paused)
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `GET /v1/vms/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmInfo {
    pub name: String,
    pub state: VmState,
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon_mib: Option<u64>,
    pub backend: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_pin: Vec<u32>,
    /// Percent of one host CPU the whole VM may use (150 = one and a half CPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota_pct: Option<u32>,
    /// Relative CPU weight, 1..=10000 (cgroup v2 scale; 100 is the default share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<VmNic>,
    /// The VMM's process id while the VM is running or paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Why the VM last stopped ("guest exited with code 0", "killed by signal 9 (SIGKILL)", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Milliseconds since the Unix epoch.
    pub created_ms: i64,
}

/// `POST /v1/vms/{name}/stop` (the body is optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Seconds to wait for a graceful shutdown before SIGKILL (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_defaults_and_round_trip() {
        let c: VmCreate = serde_json::from_str(r#"{"name":"a","kernel":"/k"}"#).unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.memory_mib, 64);
        assert_eq!(c.backend, "auto");
        assert!(!c.start);
        let back: VmCreate = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_fields_are_rejected_also_inside_flattened_limits() {
        let e = serde_json::from_str::<VmCreate>(r#"{"name":"a","kernel":"/k","vcpu":2}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vcpu"), "{e}");
        let ok: VmCreate =
            serde_json::from_str(r#"{"name":"a","kernel":"/k","cpu_quota_pct":50}"#).unwrap();
        assert_eq!(ok.cpu_quota_pct, Some(50));
        assert!(serde_json::from_str::<VmLimits>(r#"{"cpu_quota":5}"#).is_err());
        assert!(serde_json::from_str::<NetSpec>(r#"{"bridge":"b","mc":"x"}"#).is_err());
    }

    #[test]
    fn state_strings() {
        for s in [
            VmState::Created,
            VmState::Running,
            VmState::Paused,
            VmState::Stopped,
        ] {
            assert_eq!(VmState::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert_eq!(VmState::parse("gone"), None);
    }
}
