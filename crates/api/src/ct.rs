//! System container requests and responses (`/v1/cts`).

use serde::{Deserialize, Serialize};

use crate::vm::VmState;

/// `POST /v1/cts`: define a system container from a template (and optionally start it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtCreate {
    /// `[a-z0-9][a-z0-9-_.]{0,62}`; unique among all instances (VMs and containers).
    pub name: String,
    /// `busybox` or `debian` (built and cached on first use).
    #[serde(default = "default_template")]
    pub template: String,
    /// Memory limit in bytes (cgroup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<i64>,
    /// Percent of one host CPU the container may use (150 = one and a half CPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota_pct: Option<u32>,
    /// Relative CPU weight, 1..=10000 (cgroup v2 scale; 100 is the default share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// Maximum number of processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<i64>,
    /// Attach to this bridge with an address from its subnet; absent: loopback only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<CtNet>,
    /// Start the container right after defining it.
    #[serde(default)]
    pub start: bool,
}

pub fn default_template() -> String {
    "busybox".to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtNet {
    /// Linux bridge (created if missing).
    pub bridge: String,
    /// The bridge's IPv4 range, e.g. 10.88.0.0/24; its first address is the bridge's.
    pub subnet: String,
}

/// `PATCH /v1/cts/{name}`: limits, applied at once to a running container's cgroup and kept for
/// its next start. An absent field is left as it is; 0 removes the limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota_pct: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<i64>,
}

/// `GET /v1/cts/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtInfo {
    pub name: String,
    /// created, running or stopped.
    pub state: VmState,
    pub template: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota_pct: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<CtNet>,
    /// The container's IPv4 address on its bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The init's process id (host pid namespace) while the container runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// The merged root filesystem (mounted while the container runs).
    pub rootfs: String,
    /// The console monitor's socket, for an interactive attach on this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_socket: Option<String>,
    /// The directory the container runtime keeps state in (for `ct exec` on this host).
    pub runtime_dir: String,
    /// Why the container last stopped ("init exited with code 0", "killed by signal 9", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Milliseconds since the Unix epoch.
    pub created_ms: i64,
}

/// `POST /v1/cts/{name}/export` (the body is optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtExport {
    /// The whole merged root filesystem instead of the upper layer only: the archive then does
    /// not need the template on the importing host.
    #[serde(default)]
    pub full: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field the types serialise is described in openapi.json, and nothing more.
    #[test]
    fn openapi_schemas_match_the_types() {
        let doc: serde_json::Value = serde_json::from_str(crate::OPENAPI_JSON).unwrap();
        let net = CtNet {
            bridge: "b".into(),
            subnet: "10.0.0.0/24".into(),
        };
        let full = [
            (
                "CtCreate",
                serde_json::to_value(CtCreate {
                    name: "a".into(),
                    template: "busybox".into(),
                    memory_bytes: Some(1),
                    cpu_quota_pct: Some(1),
                    cpu_weight: Some(1),
                    pids: Some(1),
                    net: Some(net.clone()),
                    start: true,
                })
                .unwrap(),
            ),
            (
                "CtInfo",
                serde_json::to_value(CtInfo {
                    name: "a".into(),
                    state: VmState::Running,
                    template: "busybox".into(),
                    memory_bytes: Some(1),
                    cpu_quota_pct: Some(1),
                    cpu_weight: Some(1),
                    pids: Some(1),
                    net: Some(net.clone()),
                    address: Some("10.0.0.2".into()),
                    pid: Some(1),
                    rootfs: "/r".into(),
                    console_socket: Some("/s".into()),
                    runtime_dir: "/d".into(),
                    stop_reason: Some("x".into()),
                    exit_code: Some(0),
                    created_ms: 1,
                })
                .unwrap(),
            ),
            (
                "CtLimits",
                serde_json::to_value(CtLimits {
                    cpu_quota_pct: Some(1),
                    cpu_weight: Some(1),
                    memory_bytes: Some(1),
                    pids: Some(1),
                })
                .unwrap(),
            ),
            ("CtNet", serde_json::to_value(net).unwrap()),
            (
                "CtExport",
                serde_json::to_value(CtExport { full: true }).unwrap(),
            ),
        ];
        for (name, v) in full {
            let schema = &doc["components"]["schemas"][name]["properties"];
            let props: Vec<&String> = schema.as_object().unwrap().keys().collect();
            let fields: Vec<&String> = v.as_object().unwrap().keys().collect();
            for f in &fields {
                assert!(props.contains(f), "{name}.{f} is not in openapi.json");
            }
            for p in &props {
                assert!(fields.contains(p), "openapi.json {name}.{p} is no field");
            }
        }
    }

    #[test]
    fn defaults_and_unknown_fields() {
        let c: CtCreate = serde_json::from_str(r#"{"name":"a"}"#).unwrap();
        assert_eq!(c.template, "busybox");
        assert!(c.net.is_none() && !c.start);
        let e = serde_json::from_str::<CtCreate>(r#"{"name":"a","memory":5}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory"), "{e}");
        assert!(serde_json::from_str::<CtLimits>(r#"{"cpu":1}"#).is_err());
        let back: CtCreate = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
