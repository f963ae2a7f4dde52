//! The VM-wide platform state of the software backend for snapshots: I/O APIC, PIT, PIC, CMOS
//! clock and the VM clock (local APICs travel with their vCPUs). The clock is saved so that a restored
//! VM's time continues from where it stopped: every timer deadline (PIT channels, LAPIC timers)
//! is in VM nanoseconds and stays valid.

use corefour_hypervisor::{CpuState, HypervisorError, Result};
use serde::{Deserialize, Serialize};

use super::ioapic::Ioapic;
use super::pic::Pic;
use super::pit::Pit;
use super::rtc::Rtc;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlatformSnap {
    /// VM time (ns) when saved.
    pub now_ns: u64,
    pub ioapic: Ioapic,
    pub pit: Pit,
    pub pic: Pic,
    /// The CMOS clock and NVRAM (absent in snapshots from before it existed).
    #[serde(default)]
    pub rtc: Option<Rtc>,
}

impl PlatformSnap {
    pub fn encode(&self) -> Result<CpuState> {
        let payload = serde_json::to_vec(self)
            .map_err(|e| HypervisorError::GuestState(format!("serialising VM state: {e}")))?;
        Ok(CpuState {
            backend: "emu".into(),
            payload,
        })
    }

    pub fn decode(state: &CpuState) -> Result<Self> {
        if state.backend != "emu" {
            return Err(HypervisorError::Invalid(format!(
                "VM state was saved by the {} backend, not emu",
                state.backend
            )));
        }
        serde_json::from_slice(&state.payload)
            .map_err(|e| HypervisorError::GuestState(format!("VM state is corrupt: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_backends_and_garbage() {
        let s = PlatformSnap {
            now_ns: 123,
            ioapic: Ioapic::default(),
            pit: Pit::default(),
            pic: Pic::default(),
            rtc: Some(Rtc::at(86_400)),
        };
        let c = s.encode().unwrap();
        let back = PlatformSnap::decode(&c).unwrap();
        assert_eq!(back.now_ns, 123);
        assert!(
            back.rtc.is_some(),
            "the CMOS clock travels with the snapshot"
        );
        let kvm = CpuState {
            backend: "kvm".into(),
            payload: c.payload.clone(),
        };
        assert!(PlatformSnap::decode(&kvm).is_err());
        let bad = CpuState {
            backend: "emu".into(),
            payload: b"{\"now_ns\":1}".to_vec(),
        };
        assert!(PlatformSnap::decode(&bad).is_err());
    }
}
