//! ioeventfd and irqfd: the types of the `Vm` hooks, and the two pieces a backend without
//! kernel support (the software CPU) needs to offer the same hooks: a table of ioevents its
//! vCPUs consult on each guest write, and a thread that turns irqfd writes into interrupts.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::{HypervisorError, Result};

/// Where an ioeventfd listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEventAddress {
    Pio(u16),
    Mmio(u64),
}

/// Which guest writes an ioeventfd takes: any write at the address, or only a write of this
/// exact width and value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datamatch {
    Any,
    U8(u8),
    U16(u16),
    U32(u32),
    U64(u64),
}

impl Datamatch {
    /// Whether a guest write of `data` (little-endian, its length the access width) matches.
    pub fn matches(self, data: &[u8]) -> bool {
        let value = |n: usize| -> Option<u64> {
            (data.len() == n).then(|| {
                let mut b = [0u8; 8];
                b[..n].copy_from_slice(data);
                u64::from_le_bytes(b)
            })
        };
        match self {
            Datamatch::Any => true,
            Datamatch::U8(v) => value(1) == Some(u64::from(v)),
            Datamatch::U16(v) => value(2) == Some(u64::from(v)),
            Datamatch::U32(v) => value(4) == Some(u64::from(v)),
            Datamatch::U64(v) => value(8) == Some(v),
        }
    }
}

struct IoEvent {
    addr: IoEventAddress,
    datamatch: Datamatch,
    event: EventFd,
}

/// The ioevents of a software backend: `signal` is called with every guest write before it
/// goes to the device callbacks.
#[derive(Default)]
pub struct IoEventTable {
    events: RwLock<Vec<IoEvent>>,
}

impl IoEventTable {
    pub fn register(
        &self,
        addr: IoEventAddress,
        datamatch: Datamatch,
        event: &EventFd,
    ) -> Result<()> {
        let event = event.try_clone().map_err(|source| HypervisorError::Os {
            op: "dup of an ioeventfd",
            source,
        })?;
        let mut v = self.events.write().unwrap_or_else(|e| e.into_inner());
        if v.iter().any(|e| e.addr == addr && e.datamatch == datamatch) {
            return Err(HypervisorError::Invalid(format!(
                "an ioeventfd is already registered at {addr:?} for {datamatch:?}"
            )));
        }
        v.push(IoEvent {
            addr,
            datamatch,
            event,
        });
        Ok(())
    }

    pub fn unregister(&self, addr: IoEventAddress, datamatch: Datamatch) -> Result<()> {
        let mut v = self.events.write().unwrap_or_else(|e| e.into_inner());
        let before = v.len();
        v.retain(|e| !(e.addr == addr && e.datamatch == datamatch));
        if v.len() == before {
            return Err(HypervisorError::Invalid(format!(
                "no ioeventfd registered at {addr:?} for {datamatch:?}"
            )));
        }
        Ok(())
    }

    /// Signals the ioeventfd a guest write of `data` at `addr` hits; true if one did (the
    /// write is then consumed, as KVM does).
    pub fn signal(&self, addr: IoEventAddress, data: &[u8]) -> bool {
        let v = self.events.read().unwrap_or_else(|e| e.into_inner());
        match v
            .iter()
            .find(|e| e.addr == addr && e.datamatch.matches(data))
        {
            Some(e) => {
                // Only fails when the counter would overflow: the device is then signalled.
                let _ = e.event.write(1);
                true
            }
            None => false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.events
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

const STOP: u64 = u64::MAX;

/// irqfds for a software backend: one thread waits on every registered eventfd and calls
/// `raise(gsi)` when one is written. Dropping it stops the thread.
pub struct IrqfdPump {
    epoll: Arc<Epoll>,
    stop: EventFd,
    fds: Arc<Mutex<Vec<(EventFd, u32)>>>,
    thread: Option<JoinHandle<()>>,
}

impl IrqfdPump {
    pub fn new(raise: impl Fn(u32) + Send + 'static) -> Result<Self> {
        let os = |op| move |source| HypervisorError::Os { op, source };
        let epoll = Arc::new(Epoll::new().map_err(os("epoll_create for irqfds"))?);
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(os("eventfd"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP),
            )
            .map_err(os("epoll_ctl"))?;
        let fds: Arc<Mutex<Vec<(EventFd, u32)>>> = Arc::default();
        let (ep, list) = (epoll.clone(), fds.clone());
        let thread = std::thread::Builder::new()
            .name("irqfd".into())
            .spawn(move || {
                let mut events = vec![EpollEvent::default(); 16];
                loop {
                    let n = match ep.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    };
                    for ev in &events[..n] {
                        if ev.data() == STOP {
                            return;
                        }
                        let fd = ev.data() as i32;
                        let gsi = {
                            let l = list.lock().unwrap_or_else(|e| e.into_inner());
                            l.iter()
                                .find(|(e, _)| e.as_raw_fd() == fd)
                                .and_then(|(e, gsi)| e.read().ok().map(|_| *gsi))
                        };
                        if let Some(gsi) = gsi {
                            raise(gsi);
                        }
                    }
                }
            })
            .map_err(os("spawning the irqfd thread"))?;
        Ok(Self {
            epoll,
            stop,
            fds,
            thread: Some(thread),
        })
    }

    pub fn register(&self, event: &EventFd, gsi: u32) -> Result<()> {
        let os = |op| move |source| HypervisorError::Os { op, source };
        let event = event.try_clone().map_err(os("dup of an irqfd"))?;
        let fd = event.as_raw_fd();
        let mut l = self.fds.lock().unwrap_or_else(|e| e.into_inner());
        l.push((event, gsi));
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, fd as u64),
        ) {
            l.pop();
            return Err(os("epoll_ctl for an irqfd")(e));
        }
        Ok(())
    }

    pub fn unregister(&self, event: &EventFd, gsi: u32) -> Result<()> {
        let mut l = self.fds.lock().unwrap_or_else(|e| e.into_inner());
        // Our copy is a dup: find it by the file it refers to, not the fd number.
        let target = file_id(event.as_raw_fd());
        let Some(i) = l
            .iter()
            .position(|(e, g)| *g == gsi && file_id(e.as_raw_fd()) == target)
        else {
            return Err(HypervisorError::Invalid(format!(
                "no irqfd registered for GSI {gsi}"
            )));
        };
        let (e, _) = l.remove(i);
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            e.as_raw_fd(),
            EpollEvent::default(),
        );
        Ok(())
    }
}

/// (device, inode) of an fd: equal for an fd and its dups.
fn file_id(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: fstat writes into the zeroed struct we pass and touches nothing else.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; fd is owned by the caller for the duration of the call.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

impl Drop for IrqfdPump {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    #[test]
    fn datamatch_checks_width_and_value() {
        assert!(Datamatch::Any.matches(&[1, 2]));
        assert!(Datamatch::U32(3).matches(&3u32.to_le_bytes()));
        assert!(!Datamatch::U32(3).matches(&4u32.to_le_bytes()));
        assert!(
            !Datamatch::U32(3).matches(&3u16.to_le_bytes()),
            "width differs"
        );
        assert!(Datamatch::U16(0x102).matches(&[2, 1]));
    }

    #[test]
    fn table_signals_only_matching_writes() {
        let t = IoEventTable::default();
        let ev = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        t.register(IoEventAddress::Mmio(0x1050), Datamatch::U32(1), &ev)
            .unwrap();
        assert!(t
            .register(IoEventAddress::Mmio(0x1050), Datamatch::U32(1), &ev)
            .is_err());
        assert!(!t.signal(IoEventAddress::Mmio(0x1050), &0u32.to_le_bytes()));
        assert!(!t.signal(IoEventAddress::Pio(0x50), &1u32.to_le_bytes()));
        assert!(ev.read().is_err(), "nothing signalled yet");
        assert!(t.signal(IoEventAddress::Mmio(0x1050), &1u32.to_le_bytes()));
        assert_eq!(ev.read().unwrap(), 1);
        t.unregister(IoEventAddress::Mmio(0x1050), Datamatch::U32(1))
            .unwrap();
        assert!(!t.signal(IoEventAddress::Mmio(0x1050), &1u32.to_le_bytes()));
        assert!(t.is_empty());
    }

    #[test]
    fn pump_raises_the_registered_gsi() {
        let hits = Arc::new(AtomicU32::new(0));
        let h = hits.clone();
        let pump = IrqfdPump::new(move |gsi| {
            h.fetch_add(gsi, Ordering::SeqCst);
        })
        .unwrap();
        let ev = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        pump.register(&ev, 7).unwrap();
        ev.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while hits.load(Ordering::SeqCst) != 7 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(hits.load(Ordering::SeqCst), 7);
        assert!(pump.unregister(&ev, 8).is_err());
        pump.unregister(&ev, 7).unwrap();
        ev.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            hits.load(Ordering::SeqCst),
            7,
            "unregistered fds are ignored"
        );
    }
}
