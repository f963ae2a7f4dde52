//! The thread that runs an activated device: it waits (epoll) on one eventfd per queue (written
//! by the transport on QueueNotify, or by KVM directly when registered as an ioeventfd), on the
//! device's own fds (tap, sockets) and on a stop eventfd, and calls the [`QueueHandler`].

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::state::{QueueSnap, StateError};
use super::{Interrupt, QueueHandler};

/// Tokens at or above this are the worker's own (queue events and stop).
pub const RESERVED_TOKENS: u64 = 1 << 62;
const STOP_TOKEN: u64 = u64::MAX;

/// Lets a handler add and remove fds it watches (vsock connections come and go).
pub struct Poller {
    epoll: Epoll,
}

impl Poller {
    pub fn add(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    pub fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    pub fn remove(&self, fd: RawFd) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// What the owner asks of the worker thread; `stop` (the eventfd) wakes it to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Run,
    Park,
    Stop,
}

/// The thread's side of a park: parked with the queue state it saw, or gone.
#[derive(Default)]
struct Parked {
    queues: Option<Vec<QueueSnap>>,
    exited: bool,
}

struct Ctl {
    cmd: Command,
    parked: Parked,
}

/// Shared between the owner and the thread; the condvar signals both ways.
struct Control {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    /// Set with every command: a worker polling its queues looks here (a plain load) rather
    /// than at the stop eventfd, so a driver that never stops submitting cannot starve a park.
    attention: AtomicBool,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How long `park` waits for the thread to finish its current pass.
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

/// A running device worker; dropping it stops and joins the thread.
pub struct Worker {
    stop: EventFd,
    control: Arc<Control>,
    thread: Option<JoinHandle<Box<dyn QueueHandler>>>,
}

impl Worker {
    /// Starts `handler` on a new thread named `name`. `queue_events[i]` signals queue `i`.
    pub fn spawn(
        name: &str,
        mut handler: Box<dyn QueueHandler>,
        queue_events: Vec<Arc<EventFd>>,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop_clone = stop.try_clone()?;
        let control = Arc::new(Control {
            ctl: Mutex::new(Ctl {
                cmd: Command::Run,
                parked: Parked::default(),
            }),
            cv: Condvar::new(),
            attention: AtomicBool::new(false),
        });
        let thread_control = control.clone();
        let poller = Poller {
            epoll: Epoll::new()?,
        };
        for (i, ev) in queue_events.iter().enumerate() {
            poller.add(ev.as_raw_fd(), RESERVED_TOKENS + i as u64, EventSet::IN)?;
        }
        poller.add(stop_clone.as_raw_fd(), STOP_TOKEN, EventSet::IN)?;
        for (fd, token) in handler.fds() {
            poller.add(fd, token, EventSet::IN | EventSet::EDGE_TRIGGERED)?;
        }
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                run(
                    &mut *handler,
                    &poller,
                    &queue_events,
                    &interrupt,
                    &stop_clone,
                    &thread_control,
                );
                thread_control.lock().parked.exited = true;
                thread_control.cv.notify_all();
                drop(stop_clone);
                handler
            })?;
        Ok(Self {
            stop,
            control,
            thread: Some(thread),
        })
    }

    /// Stops the thread between two passes over its queues and returns their state. The
    /// device touches neither guest memory nor its backend until [`Worker::unpark`]: every
    /// request it took is complete and in the used ring.
    pub fn park(&self) -> Result<Vec<QueueSnap>, StateError> {
        let mut c = self.control.lock();
        if c.parked.exited {
            return Err(StateError::WorkerGone);
        }
        if let Some(q) = &c.parked.queues {
            return Ok(q.clone());
        }
        c.cmd = Command::Park;
        self.control.attention.store(true, Ordering::SeqCst);
        // Cannot fail short of counter overflow; the thread rereads `cmd` on every wake.
        let _ = self.stop.write(1);
        let deadline = Instant::now() + PARK_TIMEOUT;
        loop {
            if let Some(q) = &c.parked.queues {
                return Ok(q.clone());
            }
            if c.parked.exited {
                return Err(StateError::WorkerGone);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                c.cmd = Command::Run;
                return Err(StateError::ParkTimeout(PARK_TIMEOUT.as_millis() as u64));
            }
            c = self
                .control
                .cv
                .wait_timeout(c, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets a parked thread go on where it stopped.
    pub fn unpark(&self) {
        let mut c = self.control.lock();
        if c.cmd == Command::Park {
            c.cmd = Command::Run;
            self.control.cv.notify_all();
        }
    }

    /// Stops the thread and gives the handler back.
    pub fn stop(mut self) -> Option<Box<dyn QueueHandler>> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Option<Box<dyn QueueHandler>> {
        let thread = self.thread.take()?;
        self.control.lock().cmd = Command::Stop;
        self.control.attention.store(true, Ordering::SeqCst);
        self.control.cv.notify_all();
        // The eventfd write can only fail on counter overflow, which a stop never reaches.
        let _ = self.stop.write(1);
        thread.join().ok()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// How long a polling device keeps looking at its rings after work before it sleeps, at most
/// and at least. A driver that submits in a steady stream then costs neither a notification
/// (its kicks stay suppressed while the device polls) nor a wake-up (vhost's busyloop, in
/// small); one that submits now and then costs only a short spin per request.
const POLL_MAX: Duration = Duration::from_micros(50);
const POLL_MIN: Duration = Duration::from_micros(4);
/// How long a device whose requests are in flight on the disk (`awaiting_completions`) keeps
/// polling after its last work: KVM's halt_poll_ns. Waking this worker on a completion costs
/// tens of microseconds on a virtual host, during which the disk runs below the queue depth
/// (`bench io` 4K direct against a host io_uring loop at the same depth: 0.81-0.92x with
/// the 50 us window, 0.94-1.02x with this one).
const POLL_IN_FLIGHT: Duration = Duration::from_micros(200);

/// Serves the handler's queues while work keeps coming, then re-enables notifications
/// (`before_sleep`) and returns when none arrived for `window`. The window adapts: it doubles
/// (up to [`POLL_MAX`]) when polling found work and halves (down to [`POLL_MIN`]) when it
/// spun for nothing.
fn poll(
    handler: &mut dyn QueueHandler,
    poller: &Poller,
    control: &Control,
    window: &mut Duration,
) -> Result<(), super::DeviceError> {
    let mut until = Instant::now() + *window;
    let mut last_work = Instant::now();
    let mut spins = 0u32;
    let mut found = false;
    loop {
        if control.attention.load(Ordering::Relaxed) {
            return Ok(());
        }
        if let Some(q) = handler.pending_queue() {
            handler.queue_notified(q, poller)?;
            if spins > 0 && !found {
                found = true;
                *window = (*window * 2).min(POLL_MAX);
            }
            last_work = Instant::now();
            until = last_work + *window;
            continue;
        }
        spins += 1;
        // Reading the clock every few spins keeps the loop cheap.
        if spins.is_multiple_of(16) && Instant::now() >= until {
            if handler.awaiting_completions() && last_work.elapsed() < POLL_IN_FLIGHT {
                continue;
            }
            if handler.before_sleep() {
                until = Instant::now() + *window;
                continue;
            }
            if !found {
                *window = (*window / 2).max(POLL_MIN);
            }
            return Ok(());
        }
        // No sched_yield here: under EEVDF it pushes this thread a whole slice back behind any
        // other runnable task (a loaded host's compiler), and a driver thread woken on this
        // core preempts the spin anyway.
        std::hint::spin_loop();
    }
}

/// Acts on the owner's command after a wake on the stop eventfd; false means exit.
fn obey(
    handler: &mut dyn QueueHandler,
    stop: &EventFd,
    control: &Control,
    interrupt: &Interrupt,
) -> bool {
    let _ = stop.read();
    // Requests still in flight finish before the state is taken (outside the lock: a disk may
    // take a while, and `park` keeps its own timeout).
    if control.lock().cmd == Command::Park {
        if let Err(e) = handler.quiesce() {
            tracing::warn!("virtio device stopped, driver must reset it: {e}");
            interrupt.set_needs_reset();
        }
    }
    let mut c = control.lock();
    control.attention.store(false, Ordering::SeqCst);
    if c.cmd == Command::Park {
        c.parked.queues = Some(handler.queue_states());
        control.cv.notify_all();
        while c.cmd == Command::Park {
            c = control.cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
        c.parked.queues = None;
    }
    c.cmd != Command::Stop
}

fn run(
    handler: &mut dyn QueueHandler,
    poller: &Poller,
    queue_events: &[Arc<EventFd>],
    interrupt: &Interrupt,
    stop: &EventFd,
    control: &Control,
) {
    let mut events = vec![EpollEvent::default(); 32];
    let mut window = POLL_MAX;
    let mut failed = false;
    loop {
        let next = if failed { None } else { handler.next_timer() };
        if next == Some(Duration::ZERO) {
            // Due now, even if fds keep the loop busy: a throttled device must not starve.
            if let Err(e) = handler.timer(poller) {
                tracing::warn!("virtio device stopped, driver must reset it: {e}");
                interrupt.set_needs_reset();
                failed = true;
            }
            continue;
        }
        let attention = control.attention.load(Ordering::Relaxed);
        if !failed && !attention && handler.before_sleep() {
            // Work arrived after the handler's last pass; its notification may never come.
            if let Err(e) = poll(handler, poller, control, &mut window) {
                tracing::warn!("virtio device stopped, driver must reset it: {e}");
                interrupt.set_needs_reset();
                failed = true;
            }
            continue;
        }
        let timeout = match next {
            Some(d) => i32::try_from(d.as_millis() + 1).unwrap_or(i32::MAX),
            None => -1,
        };
        let n = match poller.epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio worker: epoll_wait failed: {e}");
                interrupt.set_needs_reset();
                return;
            }
        };
        let mut result = Ok(());
        for ev in &events[..n] {
            let token = ev.data();
            if token == STOP_TOKEN {
                if !obey(handler, stop, control, interrupt) {
                    return;
                }
                continue;
            }
            if failed {
                // Drain notifications so a level-triggered fd does not spin us.
                if let Some(q) = queue_events.get((token.wrapping_sub(RESERVED_TOKENS)) as usize) {
                    let _ = q.read();
                }
                continue;
            }
            result = result.and_then(|()| {
                if token >= RESERVED_TOKENS {
                    let q = (token - RESERVED_TOKENS) as usize;
                    if let Some(evfd) = queue_events.get(q) {
                        // Non-blocking read of the counter: EAGAIN means a spurious wakeup.
                        let _ = evfd.read();
                    }
                    handler.queue_notified(q, poller)
                } else {
                    handler.fd_ready(token, ev.events(), poller)
                }
            });
        }
        if result.is_ok() && !failed && n > 0 {
            result = poll(handler, poller, control, &mut window);
        }
        if let Err(e) = result {
            tracing::warn!("virtio device stopped, driver must reset it: {e}");
            interrupt.set_needs_reset();
            failed = true;
        }
    }
}
