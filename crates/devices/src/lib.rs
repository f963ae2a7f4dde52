//! Legacy and virtio devices. A device sees only an offset into its own range on the bus and,
//! once activated, guest memory; it never sees the backend.

pub mod bus;
pub mod console;
pub mod events;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, IrqLine};
pub use console::Console;
pub use events::GuestEvents;
