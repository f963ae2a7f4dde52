//! `state`: the live state of one container.

use std::path::Path;

use crate::state::ContainerState;
use crate::ContainerError;

/// Loads a container's state and corrects its status from the live system.
pub fn load(root: &Path, id: &str) -> Result<ContainerState, ContainerError> {
    if !crate::state::validate_id(id) {
        return Err(ContainerError::BadId(id.into()));
    }
    let mut st =
        ContainerState::load(root, id)?.ok_or_else(|| ContainerError::NotFound(id.into()))?;
    st.refresh_in(root);
    Ok(st)
}
