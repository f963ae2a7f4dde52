//! `pause` and `resume`: the cgroup freezer.

use std::path::Path;

use crate::cgroups::CgroupManager;
use crate::state::Status;
use crate::ContainerError;

pub fn pause(root: &Path, id: &str) -> Result<(), ContainerError> {
    let st = crate::container_state::load(root, id)?;
    if st.oci.status != Status::Running {
        return Err(ContainerError::WrongStatus {
            id: id.into(),
            status: st.oci.status.to_string(),
            what: "only a running container can be paused".into(),
        });
    }
    crate::cgroups::manager(&st.cgroup)?.freeze(true)?;
    Ok(())
}

pub fn resume(root: &Path, id: &str) -> Result<(), ContainerError> {
    let st = crate::container_state::load(root, id)?;
    if st.oci.status != Status::Paused {
        return Err(ContainerError::WrongStatus {
            id: id.into(),
            status: st.oci.status.to_string(),
            what: "only a paused container can be resumed".into(),
        });
    }
    crate::cgroups::manager(&st.cgroup)?.freeze(false)?;
    Ok(())
}
