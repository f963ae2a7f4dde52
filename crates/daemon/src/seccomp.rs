//! The seccomp filter every VMM runs under.
//!
//! A deny list, not an allow list: the VMM belongs to another helper and grows syscalls as devices
//! land, and an allow list it did not write would turn each new feature into a SIGSYS. What a VMM
//! never needs — and what an attacker who took over one would reach for first (loading kernel code,
//! mounting, entering namespaces, tracing other processes, rebooting) — fails with EPERM.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the VMM seccomp filter: {0}")]
    Build(String),
}

const DENIED: &[i64] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_bpf,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_quotactl,
    libc::SYS_fanotify_init,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
];

/// The compiled filter.
pub fn vmm_filter() -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| SeccompError::Build(e.to_string()))
}

/// Makes `cmd` install the filter in the child right before exec. When the filter cannot be built
/// the VMM must not start unfiltered, so the spawn fails instead.
pub fn apply_to(cmd: &mut std::process::Command) {
    let prog = vmm_filter();
    // SAFETY: the closure runs between fork and exec in the (single-threaded) shim's child; it only
    // calls prctl/seccomp through `apply_filter` on a program built before the fork.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || match &prog {
            Ok(p) => seccompiler::apply_filter(p)
                .map_err(|e| std::io::Error::other(format!("seccomp: {e}"))),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filtered_child_cannot_mount_or_unshare_but_runs() {
        let script = "unshare -m true 2>/dev/null && echo unshared; echo ran";
        let plain = std::process::Command::new("/bin/sh")
            .args(["-c", script])
            .output()
            .unwrap();
        if !String::from_utf8_lossy(&plain.stdout).contains("unshared") {
            eprintln!(
                "skipped: `unshare -m` does not work here even without the filter (not root?)"
            );
            return;
        }
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", script]);
        apply_to(&mut cmd);
        let out = cmd.output().unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(s.contains("ran"), "{s}");
        assert!(!s.contains("unshared"), "{s}");
    }
}
