//! The backend factory: the only place that names a backend type.

use corefour_hypervisor::{Hypervisor, HypervisorError};

use crate::config::BackendKind;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("the KVM backend is unavailable: {0} (try --backend emu)")]
    Kvm(#[source] HypervisorError),
}

/// The chosen backend and why it was chosen (for the stderr note).
pub struct Picked {
    pub hypervisor: Box<dyn Hypervisor>,
    pub why: String,
}

pub fn open(kind: BackendKind) -> Result<Picked, BackendError> {
    match kind {
        BackendKind::Kvm => Ok(Picked {
            hypervisor: Box::new(corefour_kvm::Kvm::new().map_err(BackendError::Kvm)?),
            why: "--backend kvm".into(),
        }),
        BackendKind::Emu => Ok(Picked {
            hypervisor: Box::new(corefour_emu::Emu::new()),
            why: "--backend emu".into(),
        }),
        BackendKind::Auto => match corefour_kvm::Kvm::new() {
            Ok(k) => Ok(Picked {
                hypervisor: Box::new(k),
                why: "auto: /dev/kvm is usable".into(),
            }),
            Err(e) => Ok(Picked {
                hypervisor: Box::new(corefour_emu::Emu::new()),
                why: format!("auto: KVM unavailable ({e})"),
            }),
        },
    }
}
