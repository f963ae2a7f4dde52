//! MSI-X for virtio-pci functions (PCI Local Bus 3.0, 6.8.2; virtio spec 4.1.4.5): the
//! capability's message control, the vector table and the pending-bit array in the BAR, and
//! the virtio side of it (which vector the config change and each queue use).
//!
//! A vector that fires while masked (its own mask bit or the function mask) sets its pending
//! bit and is sent when unmasked, as the PCI spec requires. With MSI-X disabled, every signal
//! falls back to the INTx line and the ISR (the `Interrupt` asks [`Msix::used`] /
//! [`Msix::config`] first).

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::interrupt::MessageInterrupts;
use super::state::StateError;

/// Where one function's MSI messages go: a write of `data` to `address` as the function would
/// do on the bus, for its table entry `vector`. The VMM implements it with the backend's MSI
/// injection (KVM_SIGNAL_MSI, the software CPU's local APICs) or, on KVM, with one GSI route
/// and irqfd per vector (the sink then reprograms a vector's route when its message changes).
/// Masking and pending bits are handled here before `send`; a sink only delivers.
pub trait MsiSink: Send + Sync {
    fn send(&self, vector: u16, address: u64, data: u32);
}

/// "No vector": the driver did not assign one (or asked for one past the table).
pub const NO_VECTOR: u16 = 0xffff;
/// Size of one table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
const MASK_BIT: u32 = 1;
/// Message control bits.
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;

/// One function's MSI-X state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixSnap {
    /// (address, data, vector control) per table entry.
    pub entries: Vec<(u64, u32, u32)>,
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub function_mask: bool,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
}

#[derive(Clone, Copy)]
struct Entry {
    address: u64,
    data: u32,
    control: u32,
}

struct State {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_mask: bool,
    config_vector: u16,
    queue_vectors: Vec<u16>,
}

/// One function's MSI-X state, shared by its config space (message control), its BAR (table
/// and PBA), its common config (vector assignment) and its `Interrupt`.
pub struct Msix {
    state: Mutex<State>,
    sink: Arc<dyn MsiSink>,
}

impl Msix {
    /// A table of `vectors` entries (all masked, as after reset) for a device with `queues`
    /// queues.
    pub fn new(vectors: u16, queues: usize, sink: Arc<dyn MsiSink>) -> Self {
        let n = usize::from(vectors.max(1));
        Self {
            state: Mutex::new(State {
                entries: vec![
                    Entry {
                        address: 0,
                        data: 0,
                        control: MASK_BIT,
                    };
                    n
                ],
                pending: vec![false; n],
                enabled: false,
                function_mask: false,
                config_vector: NO_VECTOR,
                queue_vectors: vec![NO_VECTOR; queues],
            }),
            sink,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here panics while holding the lock; a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn table_size(&self) -> u16 {
        self.lock().entries.len() as u16
    }

    /// Bytes the table takes in the BAR.
    pub fn table_len(&self) -> u64 {
        u64::from(self.table_size()) * ENTRY_SIZE
    }

    /// The message control word of the capability.
    pub fn control(&self) -> u16 {
        let s = self.lock();
        let mut v = (s.entries.len() as u16 - 1) & 0x7ff;
        if s.enabled {
            v |= CTRL_ENABLE;
        }
        if s.function_mask {
            v |= CTRL_FUNCTION_MASK;
        }
        v
    }

    /// A driver write of the message control word (only enable and function mask are writable).
    pub fn set_control(&self, v: u16) {
        let due = {
            let mut s = self.lock();
            s.enabled = v & CTRL_ENABLE != 0;
            s.function_mask = v & CTRL_FUNCTION_MASK != 0;
            Self::take_unmasked_pending(&mut s)
        };
        self.send_all(&due);
    }

    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// Reads `data.len()` bytes of the table at `offset`.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        let mut bytes = Vec::with_capacity(s.entries.len() * ENTRY_SIZE as usize);
        for e in &s.entries {
            bytes.extend_from_slice(&e.address.to_le_bytes());
            bytes.extend_from_slice(&e.data.to_le_bytes());
            bytes.extend_from_slice(&e.control.to_le_bytes());
        }
        super::read_config_bytes(&bytes, offset, data);
    }

    /// A driver write into the table (4- or 8-byte accesses inside one entry).
    pub fn table_write(&self, offset: u64, data: &[u8]) {
        let due = {
            let mut s = self.lock();
            let index = (offset / ENTRY_SIZE) as usize;
            let within = (offset % ENTRY_SIZE) as usize;
            let Some(e) = s.entries.get_mut(index) else {
                return;
            };
            let mut raw = [0u8; ENTRY_SIZE as usize];
            raw[..8].copy_from_slice(&e.address.to_le_bytes());
            raw[8..12].copy_from_slice(&e.data.to_le_bytes());
            raw[12..].copy_from_slice(&e.control.to_le_bytes());
            let n = data.len().min(raw.len() - within);
            raw[within..within + n].copy_from_slice(&data[..n]);
            let word =
                |at: usize| u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
            e.address = u64::from(word(0)) | (u64::from(word(4)) << 32);
            e.data = word(8);
            // Only the mask bit of vector control is defined; the rest reads as zero.
            e.control = word(12) & MASK_BIT;
            Self::take_unmasked_pending(&mut s)
        };
        self.send_all(&due);
    }

    /// Reads the pending-bit array (one bit per vector, in 64-bit words).
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        let mut words = vec![0u64; s.pending.len().div_ceil(64)];
        for (i, p) in s.pending.iter().enumerate() {
            if *p {
                words[i / 64] |= 1 << (i % 64);
            }
        }
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        super::read_config_bytes(&bytes, offset, data);
    }

    /// The vector the config change uses (common config `msix_config`).
    pub fn config_vector(&self) -> u16 {
        self.lock().config_vector
    }

    /// The driver assigns the config vector; one past the table reads back as NO_VECTOR,
    /// which tells the driver the assignment failed.
    pub fn set_config_vector(&self, v: u16) {
        let mut s = self.lock();
        s.config_vector = Self::valid(&s, v);
    }

    pub fn queue_vector(&self, queue: usize) -> u16 {
        self.lock()
            .queue_vectors
            .get(queue)
            .copied()
            .unwrap_or(NO_VECTOR)
    }

    pub fn set_queue_vector(&self, queue: usize, v: u16) {
        let mut s = self.lock();
        let v = Self::valid(&s, v);
        if let Some(q) = s.queue_vectors.get_mut(queue) {
            *q = v;
        }
    }

    /// A device reset: vector assignments go back to NO_VECTOR (the table is the driver's).
    pub fn reset_vectors(&self) {
        let mut s = self.lock();
        s.config_vector = NO_VECTOR;
        s.queue_vectors.fill(NO_VECTOR);
    }

    pub fn save(&self) -> MsixSnap {
        let s = self.lock();
        MsixSnap {
            entries: s
                .entries
                .iter()
                .map(|e| (e.address, e.data, e.control))
                .collect(),
            pending: s.pending.clone(),
            enabled: s.enabled,
            function_mask: s.function_mask,
            config_vector: s.config_vector,
            queue_vectors: s.queue_vectors.clone(),
        }
    }

    /// Loads saved state into a table of the same shape; nothing is sent (pending vectors
    /// stay pending until the guest unmasks them, as they were).
    pub fn restore(&self, saved: &MsixSnap) -> Result<(), StateError> {
        let mut s = self.lock();
        if saved.entries.len() != s.entries.len()
            || saved.pending.len() != s.entries.len()
            || saved.queue_vectors.len() != s.queue_vectors.len()
        {
            return Err(StateError::Mismatch(format!(
                "saved MSI-X table has {} vectors for {} queues; this function has {} for {}",
                saved.entries.len(),
                saved.queue_vectors.len(),
                s.entries.len(),
                s.queue_vectors.len()
            )));
        }
        for (e, &(address, data, control)) in s.entries.iter_mut().zip(&saved.entries) {
            *e = Entry {
                address,
                data,
                control: control & MASK_BIT,
            };
        }
        s.pending.clone_from(&saved.pending);
        s.enabled = saved.enabled;
        s.function_mask = saved.function_mask;
        s.config_vector = Self::valid(&s, saved.config_vector);
        for (q, &v) in saved.queue_vectors.iter().enumerate() {
            s.queue_vectors[q] = Self::valid(&s, v);
        }
        Ok(())
    }

    fn valid(s: &State, v: u16) -> u16 {
        if usize::from(v) < s.entries.len() {
            v
        } else {
            NO_VECTOR
        }
    }

    /// Fires `vector`: sent now, or left pending while masked. Returns the message to send.
    fn fire(s: &mut State, vector: u16) -> Option<(u16, u64, u32)> {
        let i = usize::from(vector);
        let e = *s.entries.get(i)?;
        if s.function_mask || e.control & MASK_BIT != 0 {
            s.pending[i] = true;
            return None;
        }
        Some((vector, e.address, e.data))
    }

    fn take_unmasked_pending(s: &mut State) -> Vec<(u16, u64, u32)> {
        if !s.enabled || s.function_mask {
            return Vec::new();
        }
        let mut due = Vec::new();
        for i in 0..s.entries.len() {
            let e = s.entries[i];
            if s.pending[i] && e.control & MASK_BIT == 0 {
                s.pending[i] = false;
                due.push((i as u16, e.address, e.data));
            }
        }
        due
    }

    fn send_all(&self, due: &[(u16, u64, u32)]) {
        for &(vector, address, data) in due {
            self.sink.send(vector, address, data);
        }
    }

    /// Fires each distinct vector in `vectors` (NO_VECTOR skipped); false if MSI-X is off.
    fn signal(&self, vectors: impl Fn(&State) -> Vec<u16>) -> bool {
        let due = {
            let mut s = self.lock();
            if !s.enabled {
                return false;
            }
            let mut vs = vectors(&s);
            vs.sort_unstable();
            vs.dedup();
            vs.into_iter()
                .filter(|&v| v != NO_VECTOR)
                .filter_map(|v| Self::fire(&mut s, v))
                .collect::<Vec<_>>()
        };
        self.send_all(&due);
        true
    }
}

impl MessageInterrupts for Msix {
    /// Devices report "a used ring changed" without naming the queue, so every queue's vector
    /// fires; a driver's handler for a queue with nothing new returns quickly (Linux's
    /// vring_interrupt checks the used index first).
    fn used(&self) -> bool {
        self.signal(|s| s.queue_vectors.clone())
    }

    fn used_queue(&self, queue: usize) -> bool {
        self.signal(|s| vec![s.queue_vectors.get(queue).copied().unwrap_or(NO_VECTOR)])
    }

    fn config(&self) -> bool {
        self.signal(|s| vec![s.config_vector])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Sent(Mutex<Vec<(u64, u32)>>);
    impl MsiSink for Sent {
        fn send(&self, vector: u16, address: u64, data: u32) {
            // The tests program vector n with data 0x?(n+1).
            assert_eq!(
                u32::from(vector),
                (data & 0xf) - 1,
                "vector index passed along"
            );
            self.0.lock().unwrap().push((address, data));
        }
    }
    impl Sent {
        fn take(&self) -> Vec<(u64, u32)> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn program(m: &Msix, vector: u64, address: u64, data: u32, masked: bool) {
        let at = vector * ENTRY_SIZE;
        m.table_write(at, &address.to_le_bytes());
        m.table_write(at + 8, &data.to_le_bytes());
        m.table_write(at + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn disabled_msix_leaves_the_signal_to_intx() {
        let sent = Arc::new(Sent::default());
        let m = Msix::new(3, 2, sent.clone());
        assert_eq!(m.control(), 2, "table size - 1");
        assert!(!m.used());
        assert!(!m.config());
        assert!(sent.take().is_empty());
    }

    #[test]
    fn queue_and_config_vectors_send_their_messages() {
        let sent = Arc::new(Sent::default());
        let m = Msix::new(3, 2, sent.clone());
        program(&m, 0, 0xfee0_0000, 0x41, false);
        program(&m, 1, 0xfee0_1000, 0x42, false);
        program(&m, 2, 0xfee0_2000, 0x43, false);
        m.set_control(CTRL_ENABLE);
        m.set_config_vector(0);
        m.set_queue_vector(0, 1);
        m.set_queue_vector(1, 2);
        assert!(m.used());
        assert_eq!(sent.take(), vec![(0xfee0_1000, 0x42), (0xfee0_2000, 0x43)]);
        assert!(m.config());
        assert_eq!(sent.take(), vec![(0xfee0_0000, 0x41)]);
        // One queue named: only its vector.
        assert!(m.used_queue(1));
        assert_eq!(sent.take(), vec![(0xfee0_2000, 0x43)]);
        assert!(m.used_queue(7), "a queue the device lacks sends nothing");
        assert!(sent.take().is_empty());
        // Both queues on one vector: one message.
        m.set_queue_vector(1, 1);
        assert!(m.used());
        assert_eq!(sent.take(), vec![(0xfee0_1000, 0x42)]);
    }

    #[test]
    fn out_of_range_vectors_read_back_as_no_vector() {
        let m = Msix::new(2, 1, Arc::new(Sent::default()));
        m.set_queue_vector(0, 2);
        assert_eq!(m.queue_vector(0), NO_VECTOR);
        m.set_queue_vector(5, 0);
        assert_eq!(m.queue_vector(5), NO_VECTOR);
        m.set_config_vector(1);
        assert_eq!(m.config_vector(), 1);
        m.reset_vectors();
        assert_eq!(m.config_vector(), NO_VECTOR);
    }

    #[test]
    fn masked_vectors_stay_pending_until_unmasked() {
        let sent = Arc::new(Sent::default());
        let m = Msix::new(2, 1, sent.clone());
        program(&m, 1, 0xfee0_0000, 0x52, true);
        m.set_control(CTRL_ENABLE);
        m.set_queue_vector(0, 1);
        assert!(m.used());
        assert!(sent.take().is_empty());
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        m.table_write(ENTRY_SIZE + 12, &0u32.to_le_bytes());
        assert_eq!(sent.take(), vec![(0xfee0_0000, 0x52)]);
        m.pba_read(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0);
        // The function mask holds every vector back the same way.
        m.set_control(CTRL_ENABLE | CTRL_FUNCTION_MASK);
        assert!(m.used());
        assert!(sent.take().is_empty());
        m.set_control(CTRL_ENABLE);
        assert_eq!(sent.take(), vec![(0xfee0_0000, 0x52)]);
    }

    #[test]
    fn state_round_trips_and_a_wrong_shape_is_refused() {
        let sent = Arc::new(Sent::default());
        let m = Msix::new(3, 2, sent.clone());
        program(&m, 2, 0xfee0_0000, 0x63, true);
        m.set_control(CTRL_ENABLE);
        m.set_queue_vector(1, 2);
        assert!(m.used());
        let snap = m.save();
        let json = serde_json::to_string(&snap).unwrap();
        let back: MsixSnap = serde_json::from_str(&json).unwrap();
        let fresh = Msix::new(3, 2, sent.clone());
        fresh.restore(&back).unwrap();
        assert_eq!(fresh.save(), snap);
        assert!(sent.take().is_empty(), "restore sends nothing");
        fresh.table_write(2 * ENTRY_SIZE + 12, &0u32.to_le_bytes());
        assert_eq!(sent.take(), vec![(0xfee0_0000, 0x63)], "the pending vector");
        let small = Msix::new(2, 1, sent);
        assert!(small.restore(&back).is_err());
    }

    #[test]
    fn table_reads_back_what_was_written_and_ignores_stray_accesses() {
        let m = Msix::new(2, 1, Arc::new(Sent::default()));
        program(&m, 1, 0x1_fee0_0000, 0x77, true);
        let mut b = [0u8; 16];
        m.table_read(ENTRY_SIZE, &mut b);
        assert_eq!(
            u64::from_le_bytes(b[..8].try_into().unwrap()),
            0x1_fee0_0000
        );
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 0x77);
        assert_eq!(u32::from_le_bytes(b[12..].try_into().unwrap()), 1);
        // Past the table, odd sizes, reserved control bits: no effect, no panic.
        m.table_write(100 * ENTRY_SIZE, &[1, 2, 3, 4]);
        m.table_write(ENTRY_SIZE + 15, &[0xff; 8]);
        m.table_write(12, &0xffff_fffeu32.to_le_bytes());
        let mut c = [0u8; 4];
        m.table_read(12, &mut c);
        assert_eq!(u32::from_le_bytes(c), 0);
        let mut far = [0xaau8; 4];
        m.table_read(1 << 40, &mut far);
        assert_eq!(far, [0; 4]);
    }
}
