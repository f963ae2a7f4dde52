//! PC legacy devices: the 16550 UART, the debug-exit port (and its MMIO twin for ring-3 code),
//! and the i8042 reset line.

pub mod debug_exit;
pub mod i8042;
pub mod serial;

pub use debug_exit::{DebugExitMmio, DebugExitPort, DEBUG_EXIT_PORT, MMIO_EXIT_MAGIC};
pub use i8042::I8042;
pub use serial::Serial;
