//! vCPU pinning: vCPU thread N of a VMM runs only on host CPU `cpu_pin[N % len]`.
//!
//! The VM's cpuset cgroup already confines every VMM thread to the pinned CPUs as a set; this pins
//! each vCPU to one of them, found by the thread names the VMM gives them ("vcpu0", "vcpu1", ...).

use std::time::Duration;

/// How long to look for vCPU threads after the VMM starts (it creates them during boot).
const FIND_FOR: Duration = Duration::from_secs(3);

/// The vCPU index of a thread named "vcpuN".
fn vcpu_index(comm: &str) -> Option<usize> {
    comm.trim().strip_prefix("vcpu")?.parse().ok()
}

fn pin_thread(tid: i32, cpu: u32) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is a plain bitmask for which all-zero is valid (the empty set).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu as usize >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: the index is below CPU_SETSIZE, checked above.
    unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    // SAFETY: `set` lives across the call and its size is passed with it.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Pins the VMM's vCPU threads as they appear, in the background.
pub(super) fn spawn_pinner(name: String, vmm_pid: i32, cpus: Vec<u32>, vcpus: u32) {
    if cpus.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + FIND_FOR;
        let mut pinned = std::collections::HashSet::new();
        while pinned.len() < vcpus as usize && tokio::time::Instant::now() < deadline {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{vmm_pid}/task")) else {
                return; // The VMM is gone.
            };
            for t in tasks.flatten() {
                let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                let Some(idx) = vcpu_index(&comm) else {
                    continue;
                };
                if pinned.insert(tid) {
                    let cpu = cpus[idx % cpus.len()];
                    match pin_thread(tid, cpu) {
                        Ok(()) => tracing::debug!(vm = %name, vcpu = idx, cpu, "pinned"),
                        Err(e) => tracing::warn!(vm = %name, vcpu = idx, cpu, "cannot pin: {e}"),
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(vcpu_index("vcpu0\n"), Some(0));
        assert_eq!(vcpu_index("vcpu12"), Some(12));
        assert_eq!(vcpu_index("api"), None);
        assert_eq!(vcpu_index("vcpux"), None);
    }

    #[test]
    fn pins_a_thread() {
        let h = std::thread::spawn(|| {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            pin_thread(tid, 0).unwrap();
            std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap()
        });
        let status = h.join().unwrap();
        assert!(status.contains("Cpus_allowed_list:\t0\n"), "{status}");
    }
}
