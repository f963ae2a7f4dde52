//! The non-memory state of a whole VM: backend VM state, every vCPU, the devices. Shared by
//! snapshots (inside `VmSnapshot`) and the last step of a migration.

use corefour_devices::legacy::serial::SerialState;
use corefour_devices::virtio::state::TransportSnap;
use corefour_hypervisor::CpuState;
use serde::{Deserialize, Serialize};

/// COM1's registers; a serde mirror of vm-superio's `SerialState`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnap {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnap {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnap> for SerialState {
    fn from(s: &SerialSnap) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStates {
    pub serial: SerialSnap,
    /// Every virtio device with its transport, in config order (disks, nets, rng, vsock,
    /// balloon). Absent in format 1.0 files, which only VMs without virtio devices have.
    #[serde(default)]
    pub virtio: Vec<TransportSnap>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// The VMM config (`VmConfig`'s serde form).
    pub config: serde_json::Value,
    pub vm: CpuState,
    pub vcpus: Vec<CpuState>,
    pub devices: DeviceStates,
}
