//! What a device may ask of the machine as a whole. The VMM implements it; devices hold it as
//! `Arc<dyn GuestEvents>` so they never see the VMM's types.

pub trait GuestEvents: Send + Sync {
    /// The guest asked to stop the VM with `code` (debug-exit device).
    fn exit(&self, code: u32);
    /// The guest asked for a reset (i8042 0xFE).
    fn reset(&self);
}
