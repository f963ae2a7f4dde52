//! The VM's run state, shared by the vCPU threads, the devices (exit/reset requests), the API
//! server and the main thread that waits for the outcome.
//!
//! Lock order: `state` is never held while kicking (kickers take their own lock), so a device
//! that calls `finish` from inside a vCPU's exit handler cannot deadlock with a pause.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use corefour_devices::GuestEvents;
use corefour_hypervisor::{Regs, VcpuKicker};

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote this code to the debug-exit device.
    GuestExit(u32),
    /// Reset request or triple fault.
    Reset { vcpu: Option<u32>, what: String },
    /// `--timeout` passed.
    Timeout(Duration),
    /// Asked to stop from outside (API shutdown, SIGTERM).
    Shutdown,
    /// The VMM or the backend failed.
    Error(String),
}

impl Outcome {
    /// The process exit code, per the daemon contract.
    pub fn exit_code(&self) -> i32 {
        match self {
            // The OS keeps the low 8 bits; say so rather than surprise.
            Outcome::GuestExit(code) => (*code & 0xff) as i32,
            Outcome::Reset { .. } => 2,
            Outcome::Timeout(_) => 3,
            Outcome::Shutdown => 0,
            Outcome::Error(_) => 1,
        }
    }

    /// The line for stderr, if the outcome needs one.
    pub fn message(&self) -> Option<String> {
        match self {
            Outcome::GuestExit(code) if *code > 0xff => Some(format!(
                "guest exit code {code} does not fit a process exit status; exiting with {}",
                code & 0xff
            )),
            Outcome::GuestExit(_) | Outcome::Shutdown => None,
            Outcome::Reset { vcpu, what } => Some(match vcpu {
                Some(v) => format!("guest reset: {what} on vCPU {v}; VM stopped"),
                None => format!("guest reset: {what}; VM stopped"),
            }),
            Outcome::Timeout(t) => Some(format!(
                "guest did not exit within {:.3}s (--timeout); VM stopped",
                t.as_secs_f64()
            )),
            Outcome::Error(e) => Some(e.clone()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Paused,
    Stopping,
}

/// What a vCPU thread should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    Run,
    Stop,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("the VM is stopping")]
    Stopping,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("vCPUs did not stop within {0:?}")]
    PauseTimeout(Duration),
}

struct State {
    phase: Phase,
    /// vCPU threads parked for a pause, or halted for good.
    parked: u32,
    exited: u32,
    outcome: Option<Outcome>,
}

pub struct Control {
    vcpus: u32,
    state: Mutex<State>,
    cv: Condvar,
    kickers: Mutex<Vec<Arc<dyn VcpuKicker>>>,
    final_regs: Mutex<Vec<Option<Regs>>>,
}

const PAUSE_WAIT: Duration = Duration::from_secs(5);

impl Control {
    pub fn new(vcpus: u32) -> Arc<Self> {
        Arc::new(Self {
            vcpus,
            state: Mutex::new(State {
                phase: Phase::Running,
                parked: 0,
                exited: 0,
                outcome: None,
            }),
            cv: Condvar::new(),
            kickers: Mutex::new(Vec::new()),
            final_regs: Mutex::new(vec![None; vcpus as usize]),
        })
    }

    /// Keeps a vCPU's registers as it leaves.
    pub fn record_regs(&self, index: u32, regs: Option<Regs>) {
        let mut v = self.final_regs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = v.get_mut(index as usize) {
            *slot = regs;
        }
    }

    /// Every vCPU's registers as it left (None where unknown).
    pub fn final_regs(&self) -> Vec<Option<Regs>> {
        self.final_regs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add_kicker(&self, k: Arc<dyn VcpuKicker>) {
        self.kickers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(k);
    }

    fn kick_all(&self) {
        for k in self
            .kickers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            k.kick();
        }
    }

    /// Ends the VM with `outcome` (the first one wins) and makes every vCPU leave.
    pub fn finish(&self, outcome: Outcome) {
        {
            let mut s = self.lock();
            if s.outcome.is_none() {
                s.outcome = Some(outcome);
            }
            s.phase = Phase::Stopping;
            self.cv.notify_all();
        }
        self.kick_all();
    }

    /// "running", "paused" or "stopping" (for GET /vm).
    pub fn state_name(&self) -> &'static str {
        match self.lock().phase {
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Stopping => "stopping",
        }
    }

    /// Stops every vCPU outside the backend's run call; returns once all are parked.
    pub fn pause(&self) -> Result<(), ControlError> {
        {
            let mut s = self.lock();
            match s.phase {
                Phase::Stopping => return Err(ControlError::Stopping),
                Phase::Paused => return Err(ControlError::AlreadyPaused),
                Phase::Running => s.phase = Phase::Paused,
            }
        }
        self.kick_all();
        let deadline = Instant::now() + PAUSE_WAIT;
        let mut s = self.lock();
        while s.phase == Phase::Paused && s.parked + s.exited < self.vcpus {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ControlError::PauseTimeout(PAUSE_WAIT));
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        match s.phase {
            Phase::Stopping => Err(ControlError::Stopping),
            _ => Ok(()),
        }
    }

    pub fn resume(&self) -> Result<(), ControlError> {
        let mut s = self.lock();
        match s.phase {
            Phase::Paused => {
                s.phase = Phase::Running;
                self.cv.notify_all();
                Ok(())
            }
            Phase::Stopping => Err(ControlError::Stopping),
            Phase::Running => Err(ControlError::NotPaused),
        }
    }

    /// Called by a vCPU thread before each run: parks while paused.
    pub fn wait_runnable(&self) -> Directive {
        let mut s = self.lock();
        loop {
            match s.phase {
                Phase::Running => return Directive::Run,
                Phase::Stopping => return Directive::Stop,
                Phase::Paused => {
                    s.parked += 1;
                    self.cv.notify_all();
                    while s.phase == Phase::Paused {
                        s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
                    }
                    s.parked -= 1;
                }
            }
        }
    }

    /// A vCPU halted with no way to wake (backends without an irqchip): it waits for the end.
    pub fn halt_forever(&self) {
        let mut s = self.lock();
        s.parked += 1;
        self.cv.notify_all();
        while s.phase != Phase::Stopping {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked -= 1;
    }

    pub fn vcpu_exited(&self) {
        let mut s = self.lock();
        s.exited += 1;
        self.cv.notify_all();
    }

    /// Waits for the outcome; `tick` runs at least every `every` (console flush), and the VM
    /// is stopped with `Outcome::Timeout` once `timeout` passes.
    pub fn wait_outcome(
        &self,
        timeout: Option<Duration>,
        every: Duration,
        mut tick: impl FnMut(),
    ) -> Outcome {
        let start = Instant::now();
        loop {
            let mut wait = every;
            if let Some(t) = timeout {
                let left = t.saturating_sub(start.elapsed());
                if left.is_zero() {
                    self.finish(Outcome::Timeout(t));
                }
                wait = wait.min(left.max(Duration::from_millis(1)));
            }
            {
                let s = self.lock();
                if let Some(o) = &s.outcome {
                    return o.clone();
                }
                let (s, _) = self
                    .cv
                    .wait_timeout(s, wait)
                    .unwrap_or_else(|p| p.into_inner());
                if let Some(o) = &s.outcome {
                    return o.clone();
                }
            }
            tick();
        }
    }

    /// Waits until every vCPU thread has left, at most `limit`. Returns whether they all did.
    pub fn wait_exited(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut s = self.lock();
        while s.exited < self.vcpus {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

impl GuestEvents for Control {
    fn exit(&self, code: u32) {
        self.finish(Outcome::GuestExit(code));
    }

    fn reset(&self) {
        self.finish(Outcome::Reset {
            vcpu: None,
            what: "the guest asked for a reset (i8042)".into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Default)]
    struct CountKicks(AtomicU32);
    impl VcpuKicker for CountKicks {
        fn kick(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn first_outcome_wins_and_codes_follow_the_contract() {
        let c = Control::new(1);
        let k = Arc::new(CountKicks::default());
        c.add_kicker(k.clone());
        c.exit(7);
        c.finish(Outcome::Timeout(Duration::from_secs(1)));
        let o = c.wait_outcome(None, Duration::from_millis(10), || {});
        assert_eq!(o, Outcome::GuestExit(7));
        assert_eq!(o.exit_code(), 7);
        assert_eq!(k.0.load(Ordering::SeqCst), 2);
        assert_eq!(Outcome::GuestExit(0x101).exit_code(), 1);
        assert_eq!(Outcome::Timeout(Duration::ZERO).exit_code(), 3);
        assert_eq!(
            Outcome::Reset {
                vcpu: None,
                what: String::new()
            }
            .exit_code(),
            2
        );
        assert_eq!(c.wait_runnable(), Directive::Stop);
    }

    #[test]
    fn timeout_ends_the_wait() {
        let c = Control::new(1);
        let t = Duration::from_millis(30);
        let start = Instant::now();
        assert_eq!(
            c.wait_outcome(Some(t), Duration::from_millis(5), || {}),
            Outcome::Timeout(t)
        );
        assert!(start.elapsed() >= t);
    }

    #[test]
    fn pause_waits_for_parked_vcpus_and_resume_releases_them() {
        let c = Control::new(2);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let mut runs = 0;
                    while c.wait_runnable() == Directive::Run {
                        runs += 1;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    c.vcpu_exited();
                    runs
                })
            })
            .collect();
        c.pause().unwrap();
        assert_eq!(c.state_name(), "paused");
        assert_eq!(c.pause(), Err(ControlError::AlreadyPaused));
        c.resume().unwrap();
        assert_eq!(c.resume(), Err(ControlError::NotPaused));
        c.finish(Outcome::Shutdown);
        assert!(c.wait_exited(Duration::from_secs(5)));
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.pause(), Err(ControlError::Stopping));
    }
}
