//! Where the serial port's output goes: a line-buffered sink shared by every serial register
//! window (port 0x3f8 and its MMIO mirror) and flushed by the VMM when the guest idles or exits.
//!
//! vm-superio flushes its writer after every byte; a write(2) per byte would cost a syscall per
//! character, so `flush` here pushes complete lines, and a partial line only when output is
//! sparse (nothing went out for `SPARSE` — the first byte of a boot, a prompt): bulk output is
//! batched, a lone character is not held back. `flush_all` pushes the rest.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Lines longer than this go out without waiting for the newline.
const MAX_PENDING: usize = 4096;
/// A partial line goes out at once when nothing was written for this long.
const SPARSE: Duration = Duration::from_millis(5);

struct Inner {
    pending: Vec<u8>,
    out: Box<dyn Write + Send>,
    /// Set once the sink failed (e.g. EPIPE): output is dropped from then on, the guest goes on.
    broken: bool,
    last_push: Option<Instant>,
    sparse: Duration,
}

/// A shared, cloneable handle to the console sink.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Mutex<Inner>>,
}

impl Console {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self::with_sparse(out, SPARSE)
    }

    /// As `new`, with the quiet time after which a partial line goes out at once.
    pub fn with_sparse(out: Box<dyn Write + Send>, sparse: Duration) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                pending: Vec::with_capacity(256),
                out,
                broken: false,
                last_push: None,
                sparse,
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
    g.last_push = Some(Instant::now());
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.lock().pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut g = self.lock();
        let sparse = g.last_push.is_none_or(|t| t.elapsed() >= g.sparse);
        let upto = match g.pending.iter().rposition(|&b| b == b'\n') {
            _ if sparse || g.pending.len() >= MAX_PENDING => g.pending.len(),
            Some(i) => i + 1,
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
    fn first_byte_goes_out_then_whole_lines_then_the_rest_on_flush_all() {
        let sink = Shared::default();
        // A long quiet time, so a slow test machine cannot make the output look sparse.
        let mut c = Console::with_sparse(Box::new(sink.clone()), Duration::from_secs(600));
        c.write_all(b"h").unwrap();
        c.flush().unwrap();
        assert_eq!(
            sink.0.lock().unwrap().as_slice(),
            b"h",
            "sparse output is not held"
        );
        c.write_all(b"el").unwrap();
        c.flush().unwrap();
        assert_eq!(
            sink.0.lock().unwrap().as_slice(),
            b"h",
            "busy output waits for the line"
        );
        c.write_all(b"lo\nwor").unwrap();
        c.flush().unwrap();
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hello\n");
        c.flush_all();
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hello\nwor");

        let sink = Shared::default();
        let mut c = Console::with_sparse(Box::new(sink.clone()), Duration::from_millis(1));
        c.write_all(b"a\n").unwrap();
        c.flush().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        c.write_all(b"?").unwrap();
        c.flush().unwrap();
        assert_eq!(
            sink.0.lock().unwrap().as_slice(),
            b"a\n?",
            "a prompt after quiet goes out"
        );
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
