//! `list`: every container under the state root.

use std::path::Path;

use crate::state::ContainerState;
use crate::ContainerError;

pub fn list(root: &Path) -> Result<Vec<ContainerState>, ContainerError> {
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ContainerError::io(format!("read {}", root.display()), e)),
    };
    let mut out = Vec::new();
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        // A directory without a state file is a create in progress (or a crash): skip it.
        if let Ok(Some(mut st)) = ContainerState::load(root, &name) {
            st.refresh_in(root);
            out.push(st);
        }
    }
    out.sort_by(|a, b| a.created.cmp(&b.created));
    Ok(out)
}
