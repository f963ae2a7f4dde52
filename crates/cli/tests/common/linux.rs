//! What the Linux-guest tests share: the Debian fixture built by tests/fixtures/linux/setup.sh and
//! a VMM run with a time limit.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The fixture's kernel and initramfs (in .cache/linux or $COREFOUR_LINUX_CACHE), if built.
pub fn fixture() -> Option<(PathBuf, PathBuf)> {
    let dir = std::env::var_os("COREFOUR_LINUX_CACHE").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/linux"),
        PathBuf::from,
    );
    let (k, i) = (dir.join("vmlinuz"), dir.join("initrd.cpio.gz"));
    (k.is_file() && i.is_file()).then_some((k, i))
}

pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

/// Runs `cmd`, killing it after `limit`.
pub fn run(mut cmd: Command, limit: Duration) -> Run {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn corefour vmm");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let code = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run {
        code,
        stdout: o.join().unwrap_or_default(),
        stderr: e.join().unwrap_or_default(),
        took: start.elapsed(),
    }
}
