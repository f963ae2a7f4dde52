//! Every daemon error becomes an HTTP status and a `{"fault_message": ...}` body here, and only here.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use corefour_api::Fault;

use crate::cgroup::CgroupError;
use crate::client::ClientError;
use crate::inventory::InventoryError;
use crate::names::NameError;
use crate::network::NetworkError;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("the VMM of {name:?} did not answer: {source}")]
    VmmUnreachable {
        name: String,
        #[source]
        source: ClientError,
    },
    #[error("the VMM of {name:?} refused: {message}")]
    Vmm { name: String, message: String },
    #[error("cannot start the VMM of {name:?}: {message}")]
    Start { name: String, message: String },
    /// A host-side failure of the container runtime or the archive (500).
    #[error("{0}")]
    Container(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl DaemonError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> DaemonError {
        DaemonError::Io {
            what: what.into(),
            source,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            DaemonError::BadRequest(_) | DaemonError::Name(_) => StatusCode::BAD_REQUEST,
            DaemonError::NotFound(_) => StatusCode::NOT_FOUND,
            DaemonError::Conflict(_) => StatusCode::CONFLICT,
            DaemonError::Inventory(e) => match e {
                InventoryError::Exists(_) | InventoryError::MacInUse(_) => StatusCode::CONFLICT,
                InventoryError::NotFound(_) => StatusCode::NOT_FOUND,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            DaemonError::Cgroup(CgroupError::Quota(_) | CgroupError::Weight(_))
            | DaemonError::Network(NetworkError::Name(_)) => StatusCode::BAD_REQUEST,
            DaemonError::Vmm { .. } => StatusCode::CONFLICT,
            DaemonError::VmmUnreachable { .. } => StatusCode::BAD_GATEWAY,
            DaemonError::Cgroup(_)
            | DaemonError::Network(_)
            | DaemonError::Start { .. }
            | DaemonError::Container(_)
            | DaemonError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for DaemonError {
    fn into_response(self) -> Response {
        let status = self.status();
        let msg = error_chain(&self);
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), "{msg}");
        } else {
            tracing::debug!(status = status.as_u16(), "{msg}");
        }
        (status, axum::Json(Fault::new(msg))).into_response()
    }
}

/// "outer: inner: innermost", skipping sources already spelled out by their parent's message.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        src = s.source();
    }
    msg
}
