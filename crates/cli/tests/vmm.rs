//! `corefour vmm` end to end: every test guest through the real binary, on KVM.
//! Guests are built with `make -C guests` (serialized with flock: nextest runs tests as
//! separate processes). Without a usable /dev/kvm the tests print why and skip.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "common/guests.rs"]
#[macro_use]
mod guests;
use guests::{guest, repo};

fn corefour() -> Command {
    Command::new(env!("CARGO_BIN_EXE_corefour"))
}

fn vmm(args: &[&str]) -> Output {
    corefour()
        .arg("vmm")
        .args(args)
        .output()
        .expect("run corefour vmm")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn run_guest(name: &str, extra: &[&str]) -> Output {
    let k = guest(name);
    let mut args = vec!["--kernel", k.to_str().unwrap(), "--timeout", "30s"];
    args.extend_from_slice(extra);
    vmm(&args)
}

#[test]
fn hello_prints_and_exits_zero() {
    need_kvm!();
    let o = run_guest(
        "hello",
        &["--cmdline", "console=ttyS0 x=1", "--memory", "32M"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("Hello from corefour guest\n"), "{out}");
    assert!(
        out.contains("vcpus=1 mem_mib=32 cmdline=\"console=ttyS0 x=1\""),
        "{out}"
    );
    assert!(stderr(&o).contains("backend kvm"), "{}", stderr(&o));
}

#[test]
fn memory_above_the_mmio_hole_and_an_initrd() {
    need_kvm!();
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vmm-initrd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let initrd = dir.join("initrd.bin");
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&initrd, &data).unwrap();
    let sum: u64 = data.iter().map(|&b| u64::from(b)).sum();
    // 4 GiB: 3 GiB below the MMIO hole and 1 GiB above 4 GiB (untouched RAM costs nothing).
    let o = run_guest(
        "hello",
        &["--memory", "4G", "--initrd", initrd.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("mem_mib=4096"), "{out}");
    assert!(out.contains("high_mem_mib=1024\n"), "{out}");
    assert!(
        out.contains(&format!("initrd_bytes=1000 initrd_sum={sum}\n")),
        "{out}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The same guests on the software CPU must print the same. Skips (saying why) while the
/// emu backend cannot run them yet. (Final registers are not compared: after the debug exit
/// a backend may run on until the VMM's kick lands.)
#[test]
fn same_serial_output_on_kvm_and_emu() {
    need_kvm!();
    for (name, args) in [
        ("hello", vec!["--cmdline", "a=1"]),
        ("exitcode", vec!["--cmdline", "code=9"]),
        ("smp", vec!["--vcpus", "2"]),
    ] {
        let mut kvm_args = args.clone();
        kvm_args.extend(["--backend", "kvm"]);
        let kvm = run_guest(name, &kvm_args);
        let mut emu_args = args.clone();
        emu_args.extend(["--backend", "emu"]);
        let emu = run_guest(name, &emu_args);
        if emu.status.code() == Some(1) && stderr(&emu).contains("not supported") {
            eprintln!(
                "SKIP: the emu backend cannot run guests yet: {}",
                stderr(&emu).trim()
            );
            return;
        }
        assert_eq!(
            emu.status.code(),
            kvm.status.code(),
            "{name}: {}",
            stderr(&emu)
        );
        let (mut k, mut e): (Vec<_>, Vec<_>) = (
            stdout(&kvm).lines().map(String::from).collect(),
            stdout(&emu).lines().map(String::from).collect(),
        );
        // vCPUs check in in any order.
        k.sort();
        e.sort();
        assert_eq!(e, k, "{name}: serial output differs");
    }
}

#[test]
fn final_registers_are_deterministic_after_a_debug_exit() {
    need_kvm!();
    let dump = |n: u32| {
        let file = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("regs-{n}-{}.json", std::process::id()));
        let o = run_guest(
            "exitcode",
            &["--cmdline", "code=7", "--dump-regs", file.to_str().unwrap()],
        );
        assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        std::fs::remove_file(&file).unwrap();
        v
    };
    let (a, b) = (dump(1), dump(2));
    assert_eq!(a[0]["rax"], 7, "{a}");
    let rip = a[0]["rip"].as_u64().unwrap();
    assert!(
        (0x10_0000..0x20_0000).contains(&rip),
        "rip {rip:#x} is in the image"
    );
    assert_eq!(a, b, "the boot vCPU stops right after its OUT, every time");
}

#[test]
fn stdin_reaches_the_guest_serial_port() {
    need_kvm!();
    let k = guest("echo");
    let mut child = corefour()
        .args(["vmm", "--kernel", k.to_str().unwrap(), "--timeout", "30s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn corefour vmm");
    // More than the UART's 64-byte FIFO, so the VMM has to wait for the guest to drain it.
    let line = "the quick brown fox jumps over the lazy dog, twice: the quick brown fox jumps";
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{line}").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("echo: ready\necho: {line}\n"));
}

#[test]
fn exitcode_guest_exits_with_the_given_code() {
    need_kvm!();
    for code in [0, 7, 42, 255] {
        let cmdline = format!("code={code}");
        let o = run_guest("exitcode", &["--cmdline", &cmdline]);
        assert_eq!(o.status.code(), Some(code), "{}", stderr(&o));
        assert!(stdout(&o).contains(&format!("exiting with {code}")));
    }
}

#[test]
fn triple_fault_and_reset_exit_2_with_a_message() {
    need_kvm!();
    let o = run_guest("fault", &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stdout(&o).contains("about to triple-fault"));
    assert!(!stdout(&o).contains("still alive"));
    assert!(
        stderr(&o).contains("corefour: guest reset: triple fault"),
        "{}",
        stderr(&o)
    );

    let o = run_guest("fault", &["--cmdline", "how=1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("reset (i8042)"), "{}", stderr(&o));
}

#[test]
fn smp_every_vcpu_checks_in() {
    need_kvm!();
    for n in [1u32, 4] {
        let o = run_guest("smp", &["--vcpus", &n.to_string()]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let out = stdout(&o);
        for i in 0..n {
            let line = format!("smp: cpu {i} online\n");
            assert_eq!(out.matches(&line).count(), 1, "{line:?} in {out}");
        }
        assert!(
            out.ends_with(&format!("smp: all {n} cpus checked in\n")),
            "{out}"
        );
    }
}

fn field(line: &str, key: &str) -> u64 {
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} missing in {line}"));
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap(),
        None => v.parse().unwrap(),
    }
}

#[test]
fn memtest_checksum_matches() {
    need_kvm!();
    let o = run_guest("memtest", &["--memory", "48M", "--vcpus", "2"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let line = out
        .lines()
        .find(|l| l.starts_with("memtest: ok"))
        .unwrap_or_else(|| panic!("no result in {out}"));
    let (start, end) = (field(line, "start="), field(line, "end="));
    assert_eq!(end, 48 << 20, "sweep must reach the end of RAM");
    assert!(
        start < 2 << 20,
        "sweep must start right after the image: {start:#x}"
    );
    assert_eq!(field(line, "high="), 0);
    assert_eq!(field(line, "pages="), (end - start) / 4096);
    let mut sum = 0u64;
    let mut a = start;
    while a < end {
        sum = sum.wrapping_add(a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5555_5555_5555_5555);
        a += 8;
    }
    assert_eq!(field(line, "checksum="), sum, "{line}");
}

#[test]
fn timeout_stops_halted_and_spinning_guests() {
    need_kvm!();
    let k = guest("hang");
    for mode in ["mode=0", "mode=1"] {
        let start = Instant::now();
        let o = vmm(&[
            "--kernel",
            k.to_str().unwrap(),
            "--cmdline",
            mode,
            "--timeout",
            "300ms",
        ]);
        assert_eq!(o.status.code(), Some(3), "{mode}: {}", stderr(&o));
        assert!(start.elapsed() < Duration::from_secs(5), "{mode}");
        assert!(
            stderr(&o).contains("did not exit within 0.300s"),
            "{}",
            stderr(&o)
        );
    }
}

/// Every bad input: exit 1, exactly one line on stderr starting "corefour: ", no panic.
#[test]
fn bad_input_gets_one_clear_line() {
    let hello = guest("hello");
    let h = hello.to_str().unwrap();
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vmm-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage.elf");
    std::fs::write(
        &garbage,
        b"\x7fELF\x02\x01\x01 this is not really an ELF file",
    )
    .unwrap();
    let text = dir.join("notes.txt");
    std::fs::write(&text, "hello").unwrap();
    let empty = dir.join("empty.elf");
    std::fs::write(&empty, b"").unwrap();
    let bad_json = dir.join("bad.json");
    std::fs::write(&bad_json, "{\"kernel\": \"x\", \"vcpu\": 2}").unwrap();
    let disks = dir.join("disks.json");
    std::fs::write(
        &disks,
        format!("{{\"kernel\": \"{h}\", \"disks\": [{{\"path\": \"d.img\"}}]}}"),
    )
    .unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--kernel", "/nonexistent/k.elf"], "cannot open kernel"),
        (vec!["--kernel", garbage.to_str().unwrap()], "kernel"),
        (vec!["--kernel", text.to_str().unwrap()], "not an ELF64"),
        (vec!["--kernel", empty.to_str().unwrap()], "is empty"),
        (
            vec!["--kernel", h, "--memory", "1M"],
            "memory must be between",
        ),
        (
            vec!["--kernel", h, "--memory", "2M", "--vcpus", "200"],
            "memory too small",
        ),
        (
            vec!["--kernel", h, "--memory", "lots"],
            "invalid memory size",
        ),
        (vec!["--kernel", h, "--vcpus", "0"], "vcpus must be between"),
        (
            vec!["--kernel", h, "--vcpus", "100000"],
            "vcpus must be between",
        ),
        (vec!["--kernel", h, "--backend", "xen"], "unknown backend"),
        (vec!["--kernel", h, "--timeout", "soon"], "invalid duration"),
        (vec![], "no kernel given"),
        (
            vec!["--config", bad_json.to_str().unwrap()],
            "not a valid VM config",
        ),
        (vec!["--config", "/nonexistent/vm.json"], "cannot read"),
        (
            vec!["--config", disks.to_str().unwrap()],
            "cannot open disk d.img",
        ),
    ];
    for (args, want) in cases {
        let o = vmm(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        let lines: Vec<_> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: want one line, got {err:?}");
        assert!(lines[0].starts_with("corefour: "), "{args:?}: {err}");
        assert!(
            lines[0].contains(want),
            "{args:?}: {err:?} should say {want:?}"
        );
        assert!(stdout(&o).is_empty(), "{args:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_file_with_flag_overrides() {
    need_kvm!();
    let k = guest("exitcode");
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vmm-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("vm.json");
    let json = serde_json::json!({
        "kernel": k, "cmdline": "code=5", "initrd": null, "vcpus": 2, "memory_mib": 16,
        "backend": "kvm", "timeout_secs": 30, "disks": [], "nets": []
    });
    std::fs::write(&cfg, json.to_string()).unwrap();
    let c = cfg.to_str().unwrap();
    let o = vmm(&["--config", c]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let o = vmm(&["--config", c, "--cmdline", "code=6"]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Starts the spinning guest and waits for its first line, so the vCPU is running.
fn spawn_spinning(extra: &[&str]) -> (Child, BufReader<std::process::ChildStdout>) {
    let k = guest("hang");
    let mut child = corefour()
        .args([
            "vmm",
            "--kernel",
            k.to_str().unwrap(),
            "--cmdline",
            "mode=1 ticks=1",
        ])
        .args(["--timeout", "60s"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn corefour vmm");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "hang: spinning in ring 3\n");
    (child, out)
}

fn http(sock: &Path, method: &str, path: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("connect to the API socket");
    write!(s, "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    None
}

#[test]
fn api_socket_pause_resume_shutdown() {
    need_kvm!();
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vmm-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vmm.sock");
    let (mut child, out) = spawn_spinning(&["--api-sock", sock.to_str().unwrap(), "--vcpus", "2"]);
    // Serial lines as they arrive (the guest prints a tick about every 0.1 s while it runs).
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    assert_eq!(
        lines.recv_timeout(Duration::from_secs(10)).as_deref(),
        Ok("hang: tick"),
        "the guest ticks while running"
    );

    let (st, body) = http(&sock, "GET", "/vm");
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "running");
    assert_eq!(v["vcpus"], 2);
    assert_eq!(v["memory_mib"], 64);
    assert_eq!(v["backend"], "kvm");
    assert_eq!(v["pid"], child.id());

    assert_eq!(http(&sock, "PUT", "/vm/pause").0, 204);
    let (_, body) = http(&sock, "GET", "/vm");
    assert!(body.contains("\"paused\""), "{body}");
    assert_eq!(http(&sock, "PUT", "/vm/pause").0, 409);
    // While paused the guest makes no progress: after what was already in flight, no tick.
    std::thread::sleep(Duration::from_millis(100));
    while lines.try_recv().is_ok() {}
    assert!(
        lines.recv_timeout(Duration::from_millis(800)).is_err(),
        "a paused guest printed"
    );
    assert_eq!(http(&sock, "PUT", "/vm/resume").0, 204);
    assert_eq!(
        lines.recv_timeout(Duration::from_secs(10)).as_deref(),
        Ok("hang: tick"),
        "the guest runs again after resume"
    );
    assert_eq!(http(&sock, "PUT", "/vm/resume").0, 409);
    let (st, body) = http(&sock, "GET", "/nothing");
    assert_eq!(st, 404);
    assert!(body.contains("fault_message"));

    assert_eq!(http(&sock, "PUT", "/vm/shutdown").0, 204);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(10)), Some(0));
    assert!(!sock.exists(), "the VMM removes its socket");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sigterm_shuts_down_gracefully() {
    need_kvm!();
    let (mut child, _out) = spawn_spinning(&[]);
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(wait_exit(&mut child, Duration::from_secs(10)), Some(0));
}

#[test]
fn bench_vmm_runs_and_reports_json() {
    need_kvm!();
    guest("hello"); // builds every guest and the C baseline
    let dir = repo().join("guests/build");
    let o = corefour()
        .args([
            "bench", "vmm", "--runs", "1", "--exits", "200", "--json", "--guests",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v["rows"].as_array().unwrap();
    let metrics: Vec<_> = rows.iter().map(|r| r["metric"].as_str().unwrap()).collect();
    assert!(
        metrics.contains(&"start -> first serial byte"),
        "{metrics:?}"
    );
    assert!(metrics.contains(&"PIO exit round trip"), "{metrics:?}");
    for r in rows {
        let (c, b) = (
            r["corefour"].as_f64().unwrap(),
            r["baseline"].as_f64().unwrap(),
        );
        assert!(c.is_finite() && b.is_finite(), "{r}");
    }
}
