//! `start`: release the waiting init (connect to its socket), wait for its exec, run poststart.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::state::{ContainerState, Status, INIT_SOCKET};
use crate::ContainerError;

pub fn start(root: &Path, id: &str) -> Result<ContainerState, ContainerError> {
    let mut st = crate::container_state::load(root, id)?;
    if st.oci.status != Status::Created {
        return Err(ContainerError::WrongStatus {
            id: id.into(),
            status: st.oci.status.to_string(),
            what: "only a created container can be started".into(),
        });
    }
    let sock = ContainerState::dir(root, id).join(INIT_SOCKET);
    let mut conn = UnixStream::connect(&sock).map_err(|e| {
        ContainerError::io(
            format!("connect to the container init at {}", sock.display()),
            e,
        )
    })?;
    // The socket file marks "created": gone means started (see `ContainerState::refresh_in`).
    let _ = std::fs::remove_file(&sock);
    conn.write_all(b"S")
        .map_err(|e| ContainerError::io("release the container init", e))?;
    // EOF arrives when the init's exec closes the socket; any bytes before it are an error message.
    let mut msg = String::new();
    let _ = conn.read_to_string(&mut msg);
    if !msg.is_empty() {
        return Err(ContainerError::Init(msg));
    }
    // No state write: with the init socket gone, `refresh` reports a live init as running.
    st.oci.status = Status::Running;
    if let Some(h) = st.hooks.as_ref().and_then(|h| h.poststart().clone()) {
        // The spec says a failing poststart hook is only a warning.
        if let Err(e) = crate::hooks::run("poststart", &h, &st.oci) {
            eprintln!("corefour: warning: {e}");
        }
    }
    Ok(st)
}
