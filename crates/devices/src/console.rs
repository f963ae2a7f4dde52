//! Where the serial port's output goes: a line-buffered sink shared by every serial register
//! window (port 0x3f8 and its MMIO mirror) and flushed by the VMM when the guest idles or exits.
//!
//! vm-superio flushes its writer after every byte; a write(2) per byte would cost a syscall per
//! character, so `flush` here only pushes complete lines and `flush_all` pushes the rest.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};

/// Lines longer than this go out without waiting for the newline.
const MAX_PENDING: usize = 4096;

struct Inner {
    pending: Vec<u8>,
    out: Box<dyn Write + Send>,
    /// Set once the sink failed (e.g. EPIPE): output is dropped from then on, the guest goes on.
    broken: bool,
}

/// A shared, cloneable handle to the console sink.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Mutex<Inner>>,
}

impl Console {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                pending: Vec::with_capacity(256),
                out,
                broken: false,
            })),
        }
    }

    /// The process's standard output, written to directly (no second buffer in between).
    pub fn stdout() -> Self {
        Self::new(Box::new(io::stdout()))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the buffer inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes what is pending, including a partial line.
    pub fn flush_all(&self) {
        let mut g = self.lock();
        push(&mut g, usize::MAX);
    }
}

fn push(g: &mut Inner, upto: usize) {
    let n = upto.min(g.pending.len());
    if n == 0 {
        return;
    }
    if !g.broken {
        let Inner { pending, out, .. } = &mut *g;
        if out
            .write_all(&pending[..n])
            .and_then(|_| out.flush())
            .is_err()
        {
            g.broken = true;
        }
    }
    g.pending.drain(..n);
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.lock().pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut g = self.lock();
        let upto = match g.pending.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None if g.pending.len() >= MAX_PENDING => g.pending.len(),
            None => 0,
        };
        push(&mut g, upto);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn pushes_whole_lines_then_the_rest_on_flush_all() {
        let sink = Shared::default();
        let mut c = Console::new(Box::new(sink.clone()));
        c.write_all(b"hel").unwrap();
        c.flush().unwrap();
        assert!(sink.0.lock().unwrap().is_empty());
        c.write_all(b"lo\nwor").unwrap();
        c.flush().unwrap();
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hello\n");
        c.flush_all();
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hello\nwor");
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_broken_sink_drops_output_without_failing() {
        let mut c = Console::new(Box::new(Broken));
        c.write_all(b"x\n").unwrap();
        c.flush().unwrap();
        c.write_all(b"y\n").unwrap();
        c.flush().unwrap();
        c.flush_all();
    }
}
