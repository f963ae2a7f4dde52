//! Which namespaces a container creates, which it joins, and the user namespace's ID maps.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use oci_spec::runtime::{LinuxIdMapping, LinuxNamespace, LinuxNamespaceType};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NamespaceError {
    #[error("cannot open namespace {path}: {cause}")]
    Open {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot join {kind} namespace {path}: {cause}")]
    Join {
        kind: String,
        path: PathBuf,
        cause: nix::Error,
    },
    #[error("cannot write {path}: {cause}")]
    Map {
        path: PathBuf,
        cause: std::io::Error,
    },
}

pub fn flag(t: LinuxNamespaceType) -> CloneFlags {
    match t {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        // CLONE_NEWTIME (0x80) is not in nix's CloneFlags.
        LinuxNamespaceType::Time => CloneFlags::from_bits_retain(0x80),
    }
}

/// The namespaces of a config split into those to create and those to join.
#[derive(Debug, Clone)]
pub struct Plan {
    pub new: CloneFlags,
    pub join: Vec<(LinuxNamespaceType, PathBuf)>,
}

impl Plan {
    pub fn from_spec(list: &[LinuxNamespace]) -> Self {
        let mut plan = Plan {
            new: CloneFlags::empty(),
            join: Vec::new(),
        };
        for ns in list {
            match ns.path() {
                Some(p) => plan.join.push((ns.typ(), p.clone())),
                None => plan.new |= flag(ns.typ()),
            }
        }
        // The user namespace is joined first: the others are owned by it.
        plan.join
            .sort_by_key(|(t, _)| *t != LinuxNamespaceType::User);
        plan
    }

    pub fn creates(&self, t: LinuxNamespaceType) -> bool {
        self.new.contains(flag(t))
    }

    pub fn joins(&self, t: LinuxNamespaceType) -> bool {
        self.join.iter().any(|(k, _)| *k == t)
    }

    pub fn has(&self, t: LinuxNamespaceType) -> bool {
        self.creates(t) || self.joins(t)
    }
}

/// Joins the namespace at `path` (a /proc/PID/ns/* file or a bind mount of one).
pub fn join(kind: LinuxNamespaceType, path: &Path) -> Result<(), NamespaceError> {
    let f = std::fs::File::open(path).map_err(|cause| NamespaceError::Open {
        path: path.into(),
        cause,
    })?;
    setns(f.as_fd(), flag(kind)).map_err(|cause| NamespaceError::Join {
        kind: kind.to_string(),
        path: path.into(),
        cause,
    })
}

fn map_text(maps: &[LinuxIdMapping]) -> String {
    maps.iter()
        .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
        .collect()
}

/// Writes uid_map and gid_map of `pid`'s new user namespace (from the parent, which holds
/// CAP_SETUID/CAP_SETGID in the namespace's parent).
pub fn write_id_maps(
    pid: i32,
    uid: &[LinuxIdMapping],
    gid: &[LinuxIdMapping],
) -> Result<(), NamespaceError> {
    let w = |name: &str, text: String| {
        let path = PathBuf::from(format!("/proc/{pid}/{name}"));
        crate::util::write_file(&path, &text).map_err(|cause| NamespaceError::Map { path, cause })
    };
    w("uid_map", map_text(uid))?;
    if !nix::unistd::geteuid().is_root() {
        // An unprivileged writer may only map its own gid, and only after giving up setgroups.
        w("setgroups", "deny".into())?;
    }
    w("gid_map", map_text(gid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxIdMappingBuilder, LinuxNamespaceBuilder};

    #[test]
    fn plan_splits_new_and_joined_user_first() {
        let list = vec![
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Network)
                .path("/proc/1/ns/net")
                .build()
                .unwrap(),
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Mount)
                .build()
                .unwrap(),
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::User)
                .path("/proc/1/ns/user")
                .build()
                .unwrap(),
        ];
        let plan = Plan::from_spec(&list);
        assert_eq!(plan.new, CloneFlags::CLONE_NEWNS);
        assert_eq!(plan.join[0].0, LinuxNamespaceType::User);
        assert!(plan.joins(LinuxNamespaceType::Network));
        assert!(!plan.has(LinuxNamespaceType::Pid));
    }

    #[test]
    fn map_format() {
        let m = LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(1000u32)
            .size(65536u32)
            .build()
            .unwrap();
        assert_eq!(map_text(&[m]), "0 1000 65536\n");
    }
}
