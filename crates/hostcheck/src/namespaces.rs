//! Namespaces the kernel offers (/proc/self/ns) and whether user namespaces may be created.

use serde::Serialize;

use crate::probe::HostProbe;

/// The eight namespace types a container runtime uses, as named in /proc/self/ns.
pub const NAMESPACES: [&str; 8] = ["cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamespaceInfo {
    /// Of [`NAMESPACES`], those the kernel has, in that order.
    pub available: Vec<String>,
    /// Of [`NAMESPACES`], those it lacks.
    pub missing: Vec<String>,
    /// /proc/sys/user/max_user_namespaces (None when unreadable).
    pub max_user_namespaces: Option<u64>,
    /// Debian's kernel.unprivileged_userns_clone, where the kernel has it.
    pub unprivileged_userns_clone: Option<bool>,
    /// Ubuntu's kernel.apparmor_restrict_unprivileged_userns, where the kernel has it.
    pub apparmor_restrict_unprivileged_userns: Option<bool>,
}

impl NamespaceInfo {
    /// Root can create user namespaces.
    pub fn user_namespaces_enabled(&self) -> bool {
        self.available.iter().any(|n| n == "user") && self.max_user_namespaces.is_none_or(|m| m > 0)
    }

    /// Unprivileged users can create them too (rootless containers).
    pub fn unprivileged_user_namespaces(&self) -> bool {
        self.user_namespaces_enabled()
            && self.unprivileged_userns_clone != Some(false)
            && self.apparmor_restrict_unprivileged_userns != Some(true)
    }
}

fn read_number(host: &dyn HostProbe, path: &str) -> Option<u64> {
    host.read_file(path).ok()?.trim().parse().ok()
}

pub(crate) fn probe(host: &dyn HostProbe) -> NamespaceInfo {
    let entries = host.list_dir("/proc/self/ns").unwrap_or_default();
    let (available, missing): (Vec<&str>, Vec<&str>) = NAMESPACES
        .iter()
        .partition(|ns| entries.iter().any(|e| e == *ns));
    NamespaceInfo {
        available: available.into_iter().map(str::to_string).collect(),
        missing: missing.into_iter().map(str::to_string).collect(),
        max_user_namespaces: read_number(host, "/proc/sys/user/max_user_namespaces"),
        unprivileged_userns_clone: read_number(host, "/proc/sys/kernel/unprivileged_userns_clone")
            .map(|v| v != 0),
        apparmor_restrict_unprivileged_userns: read_number(
            host,
            "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
        )
        .map(|v| v != 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeHost;

    #[test]
    fn this_machine_has_all_eight() {
        let ns = probe(&FakeHost::pvm_amd_epyc());
        assert_eq!(ns.available, NAMESPACES.to_vec());
        assert!(ns.missing.is_empty());
        assert_eq!(ns.max_user_namespaces, Some(96365));
        assert_eq!(ns.unprivileged_userns_clone, None);
        assert!(ns.user_namespaces_enabled() && ns.unprivileged_user_namespaces());
    }

    #[test]
    fn user_namespaces_switched_off() {
        let host = FakeHost::pvm_amd_epyc().with_file("/proc/sys/user/max_user_namespaces", "0\n");
        let ns = probe(&host);
        assert!(!ns.user_namespaces_enabled());
        let host =
            FakeHost::pvm_amd_epyc().with_file("/proc/sys/kernel/unprivileged_userns_clone", "0\n");
        let ns = probe(&host);
        assert!(ns.user_namespaces_enabled() && !ns.unprivileged_user_namespaces());
    }

    #[test]
    fn old_kernel_without_time_and_cgroup() {
        let host = FakeHost::pvm_amd_epyc().with_dir(
            "/proc/self/ns",
            &["ipc", "mnt", "net", "pid", "user", "uts"],
        );
        let ns = probe(&host);
        assert_eq!(ns.missing, vec!["cgroup", "time"]);
    }
}
