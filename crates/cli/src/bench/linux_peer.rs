//! The Linux part of `corefour bench emu`: boots the fixture kernel + initramfs
//! (tests/fixtures/linux/setup.sh) and times how long it takes to print the marker line, on
//! qemu-system-x86_64 with TCG (the peer) or on `corefour vmm --backend emu`. bench/emu.rs calls
//! [`fixture`], [`qemu_tcg`] / [`corefour_emu`] and [`time_to_marker`]; both boots use the same
//! kernel, initramfs, memory and command line.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// What the fixture's /init prints before `poweroff -f`.
pub const MARKER: &str = "COREFOUR-LINUX-OK";
pub const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";
pub const MEMORY_MIB: u64 = 256;

pub struct Fixture {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The fixture in `$COREFOUR_LINUX_CACHE`, else `.cache/linux` of the source tree; built with
/// tests/fixtures/linux/setup.sh when missing (it downloads Debian's cloud kernel through apt).
pub fn fixture() -> anyhow::Result<Fixture> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cache = std::env::var_os("COREFOUR_LINUX_CACHE")
        .map_or_else(|| repo.join(".cache/linux"), PathBuf::from);
    let f = Fixture {
        kernel: cache.join("vmlinuz"),
        initrd: cache.join("initrd.cpio.gz"),
    };
    if f.kernel.is_file() && f.initrd.is_file() {
        return Ok(f);
    }
    let script = repo.join("tests/fixtures/linux/setup.sh");
    let st = Command::new(&script)
        .arg(&cache)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !st.success() || !f.kernel.is_file() {
        bail!(
            "{} failed ({st}); it needs apt access to the Debian archive",
            script.display()
        );
    }
    Ok(f)
}

/// The peer: QEMU's software CPU on the same kernel, initramfs, memory and command line.
pub fn qemu_tcg(f: &Fixture) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "tcg", "-m", &MEMORY_MIB.to_string()])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&f.kernel)
        .arg("-initrd")
        .arg(&f.initrd)
        .args(["-append", CMDLINE]);
    c
}

/// corefour's software CPU on the same boot (`exe` is the corefour binary).
pub fn corefour_emu(exe: &Path, f: &Fixture, timeout: Duration) -> Command {
    let mut c = Command::new(exe);
    c.args(["vmm", "--backend", "emu", "--memory"])
        .arg(format!("{MEMORY_MIB}M"))
        .arg("--timeout")
        .arg(format!("{}s", timeout.as_secs().max(1)))
        .arg("--kernel")
        .arg(&f.kernel)
        .arg("--initrd")
        .arg(&f.initrd)
        .args(["--cmdline", CMDLINE]);
    c
}

/// One boot: when the marker appeared, when the process ended, how, and what it printed.
#[derive(Debug)]
pub struct Boot {
    pub to_marker: Option<Duration>,
    pub total: Duration,
    /// The exit code; None when killed at the timeout or by a signal.
    pub exit_code: Option<i32>,
    pub output: String,
}

/// Runs `cmd` (stdin closed, stdout read as it comes), notes when `MARKER` appears, and waits
/// for the exit; kills it after `timeout`.
pub fn time_to_marker(mut cmd: Command, timeout: Duration) -> anyhow::Result<Boot> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    let mut out = child.stdout.take().context("no stdout pipe")?;
    let mut err = child.stderr.take().context("no stderr pipe")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut marked = None;
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if marked.is_none() && contains(&seen, MARKER.as_bytes()) {
                marked = Some(start.elapsed());
                let _ = tx.send(());
            }
        }
        (marked, seen)
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().context("wait for the guest")? {
            break Some(st);
        }
        if start.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        let _ = rx.recv_timeout(Duration::from_millis(20));
    };
    let total = start.elapsed();
    let (to_marker, stdout) = reader.join().unwrap_or((None, Vec::new()));
    let stderr = err_reader.join().unwrap_or_default();
    let mut output = String::from_utf8_lossy(&stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&stderr));
    Ok(Boot {
        to_marker,
        total,
        exit_code: status.and_then(|s| s.code()),
        output,
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The last `n` bytes of `s` (on a char boundary), for error messages.
pub fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_timing_and_exit_of_a_process() {
        let mut c = Command::new("sh");
        c.args(["-c", &format!("sleep 0.2; echo {MARKER}; exit 7")]);
        let b = time_to_marker(c, Duration::from_secs(10)).unwrap();
        let t = b.to_marker.unwrap();
        assert!(t >= Duration::from_millis(150), "{t:?}");
        assert_eq!(b.exit_code, Some(7));
        let mut c = Command::new("sh");
        c.args(["-c", "echo nothing; exec sleep 5"]);
        let b = time_to_marker(c, Duration::from_millis(300)).unwrap();
        assert_eq!((b.to_marker, b.exit_code), (None, None));
        assert!(b.output.contains("nothing"));
        assert_eq!(tail("héllo", 4), "llo");
    }
}
