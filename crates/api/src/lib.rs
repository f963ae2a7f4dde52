//! REST types shared by the daemon, the VMM and the CLI.
//!
//! Every request type rejects unknown fields, so a typo in a script fails loudly instead of being
//! ignored. The OpenAPI document describing these types is kept beside this crate
//! (`openapi.json`) and served by the daemon at `GET /openapi.json`.

pub mod ct;
pub mod event;
pub mod fault;
pub mod vm;

pub use ct::{CtCreate, CtExport, CtInfo, CtLimits, CtNet};
pub use event::Event;
pub use fault::Fault;
pub use vm::{
    DiskSpec, NetSpec, RateLimit, StopRequest, VmCreate, VmInfo, VmLimits, VmNic, VmState,
};

/// The OpenAPI document for the daemon's REST API, as kept in the repository.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// The API version prefix of every daemon route.
pub const API_PREFIX: &str = "/v1";
