//! `PATCH /v1/vms/{name}`: CPU quota and weight, applied to a running VM's cgroup at once.

use std::sync::Arc;

use corefour_api::{VmInfo, VmLimits};

use super::Daemon;
use crate::error::DaemonError;

impl Daemon {
    pub async fn set_limits(
        self: &Arc<Self>,
        name: &str,
        req: VmLimits,
    ) -> Result<VmInfo, DaemonError> {
        let _g = self.op_lock(name).await;
        let rec = self.inv.get_vm(name)?;
        // Absent: unchanged; 0: back to no limit.
        let pick = |new: Option<u32>, old: Option<u32>| match new {
            Some(0) => None,
            Some(v) => Some(v),
            None => old,
        };
        let quota = pick(req.cpu_quota_pct, rec.spec.cpu_quota_pct);
        let weight = pick(req.cpu_weight, rec.spec.cpu_weight);
        if self.is_active(name) {
            let Some(cgs) = &self.cgroups else {
                return Err(DaemonError::Conflict(format!(
                    "VM {name:?} runs without a cgroup (none usable on this host): cannot change its limits"
                )));
            };
            cgs.vm(name).set_cpu(quota, weight)?;
        } else {
            // Validate now, apply at the next start.
            crate::cgroup::check_cpu(quota, weight)?;
        }
        self.inv.set_limits(name, quota, weight)?;
        self.info(name)
    }
}
