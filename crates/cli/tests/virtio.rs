//! virtio devices end to end: the guests in guests/ (vblk, vrng, vnet; built with
//! `make -C guests -f virtio.mk`) drive virtio-mmio devices through the real `corefour vmm` on
//! KVM. Without /dev/kvm (or, for the network test, root and tun) the tests print why and skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "common/guests.rs"]
#[macro_use]
mod guests;
use guests::{repo, virtio_guest as guest};
#[path = "common/testnet.rs"]
mod testnet;
use testnet::TestNet;

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_corefour"))
        .arg("vmm")
        .args(args)
        .output()
        .expect("run corefour vmm")
}

fn run_guest(name: &str, extra: &[&str]) -> Output {
    let k = guest(name);
    let mut args = vec!["--kernel", k.to_str().unwrap(), "--timeout", "30s"];
    args.extend_from_slice(extra);
    vmm(&args)
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The guest ended with `code`; on failure both streams are shown.
fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        out(o),
        err(o)
    );
}

fn disk_image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.img");
    let mut d = vec![0u8; 1 << 20];
    for (i, b) in d[..16].iter_mut().enumerate() {
        *b = 0xa0 + i as u8;
    }
    d[512..1024].fill(0x77);
    std::fs::write(&p, &d).unwrap();
    p
}

/// The guest printed sector 0 of `disk_image` as it read it (`why` says what that shows).
fn assert_saw_sector0(o: &Output, why: &str) {
    assert!(
        out(o)
            .lines()
            .any(|l| l == "SECTOR0 a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"),
        "{why}; stdout:\n{}",
        out(o)
    );
}

/// vblk's write landed: "COREFOUR" starts sector 1 and the rest of the sector is kept.
fn assert_sector1_written(d: &[u8]) {
    assert_eq!(&d[512..520], b"COREFOUR");
    assert!(
        d[520..1024].iter().all(|&b| b == 0x77),
        "rest of sector 1 kept"
    );
}

/// `corefour disk create` of a qcow2 `overlay` over the raw `base`.
fn qcow2_overlay(base: &Path, overlay: &Path) {
    let o = disk_cmd(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        overlay.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "disk create: {}", err(&o));
}

#[test]
fn vblk_reads_sector0_and_writes_sector1() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let img = disk_image(dir.path());
    let o = run_guest("vblk", &["--disk", img.to_str().unwrap()]);
    assert_exit(&o, 0);
    assert_saw_sector0(&o, "the guest read sector 0");
    let d = std::fs::read(&img).unwrap();
    assert_sector1_written(&d);
    assert_eq!(d.len(), 1 << 20);
}

fn disk_cmd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_corefour"))
        .arg("disk")
        .args(args)
        .output()
        .expect("run corefour disk")
}

#[test]
fn vblk_on_a_qcow2_overlay_reads_the_base_and_writes_the_overlay() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let base = disk_image(dir.path());
    let before = std::fs::read(&base).unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    qcow2_overlay(&base, &overlay);
    let o = run_guest("vblk", &["--disk", overlay.to_str().unwrap()]);
    assert_exit(&o, 0);
    assert_saw_sector0(&o, "the guest sees the base's bytes, not the qcow2 header");
    assert_eq!(std::fs::read(&base).unwrap(), before, "base unchanged");
    let flat = dir.path().join("flat.raw");
    let o = disk_cmd(&[
        "convert",
        "-O",
        "raw",
        overlay.to_str().unwrap(),
        flat.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "disk convert: {}", err(&o));
    let d = std::fs::read(&flat).unwrap();
    assert_eq!(&d[..16], &before[..16]);
    assert_sector1_written(&d);
}

/// The `irqs=N` the interrupt-driven vblk prints.
fn irqs(o: &Output) -> u64 {
    out(o)
        .lines()
        .find_map(|l| {
            l.split_once(" irqs=")
                .map(|(_, n)| n.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

/// vblk with `irq=1` HLTs (IF=1) until the device's used-ring interrupt after each of its
/// four requests and reads the used ring only then; a missing interrupt is a 5 s timeout and
/// exit 1. On KVM virtio-mmio interrupts come through an irqfd and notifications through an
/// ioeventfd; PCI INTx is level-triggered through the IOAPIC; the software CPU emulates both.
#[test]
fn vblk_waits_for_used_ring_interrupts() {
    let mut runs = vec![("emu", "mmio"), ("emu", "pci")];
    if let Some(why) = guests::kvm_missing() {
        eprintln!("SKIP (KVM part): {why}");
    } else {
        runs.extend([("kvm", "mmio"), ("kvm", "pci")]);
    }
    for (backend, transport) in runs {
        let dir = tempfile::tempdir().unwrap();
        let img = disk_image(dir.path());
        let o = run_guest(
            "vblk",
            &[
                "--backend",
                backend,
                "--virtio-transport",
                transport,
                "--cmdline",
                "irq=1",
                "--disk",
                img.to_str().unwrap(),
            ],
        );
        assert_exit(&o, 0);
        assert!(
            out(&o).contains(&format!("transport={transport}")),
            "{}",
            out(&o)
        );
        assert!(
            irqs(&o) >= 4,
            "{backend}/{transport}: one interrupt per request at least; stdout:\n{}",
            out(&o)
        );
        let d = std::fs::read(&img).unwrap();
        assert_eq!(&d[512..520], b"COREFOUR", "{backend}/{transport}");
        // One queue notification through an ioeventfd on every backend here; the irqfd
        // carries virtio-mmio's edge; on KVM PCI has an irqfd per MSI-X vector (2) and a
        // resampled one for INTx; emu's PCI interrupts go through set_irq_line/signal_msi.
        let irqfds = match (backend, transport) {
            (_, "mmio") => "1 irqfd",
            ("kvm", _) => "3 irqfds",
            _ => "0 irqfds",
        };
        assert!(
            err(&o).contains(&format!("virtio: 1 ioeventfd, {irqfds}")),
            "{backend}/{transport}: {}",
            err(&o)
        );
    }
}

/// The `name=N` counters of the `corefour vmm virtio:` line `--stats` prints.
fn virtio_stat(o: &Output, name: &str) -> u64 {
    err(o)
        .lines()
        .find_map(|l| l.strip_prefix("corefour vmm virtio: "))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in stderr:\n{}", err(o)))
}

/// vblk with `irq=2` switches its PCI function to MSI-X and waits for each completion's
/// message; with `movebar=1` it first moves the BAR 8 MiB up. On KVM every message leaves
/// through the vector's irqfd (one route installed for it), and INTx through a resampled
/// irqfd; on both backends the queue ioeventfd follows the BAR, so no notification takes the
/// bus path. On emu messages go through signal_msi.
#[test]
fn pci_msix_irqfds_and_ioeventfds_follow_the_bar() {
    let mut backends = vec!["emu"];
    if let Some(why) = guests::kvm_missing() {
        eprintln!("SKIP (KVM part): {why}");
    } else {
        backends.push("kvm");
    }
    for backend in backends {
        for cmdline in ["irq=2 movebar=1", "irq=1"] {
            let dir = tempfile::tempdir().unwrap();
            let img = disk_image(dir.path());
            let o = run_guest(
                "vblk",
                &[
                    "--backend",
                    backend,
                    "--virtio-transport",
                    "pci",
                    "--cmdline",
                    cmdline,
                    "--disk",
                    img.to_str().unwrap(),
                    "--stats",
                ],
            );
            assert_exit(&o, 0);
            let what = format!("{backend} {cmdline}");
            assert!(irqs(&o) >= 4, "{what}: stdout:\n{}", out(&o));
            assert_eq!(&std::fs::read(&img).unwrap()[512..520], b"COREFOUR");
            assert_eq!(virtio_stat(&o, "pci_notify_exits"), 0, "{what}");
            if cmdline.contains("movebar") {
                assert!(out(&o).contains("vblk: BAR moved"), "{what}");
                assert!(out(&o).contains("msix=1"), "{what}");
                assert_eq!(virtio_stat(&o, "bar_moves"), 1, "{what}");
                assert_eq!(virtio_stat(&o, "ioeventfds_moved"), 1, "{what}");
                let (irqfd, ioctl) = if backend == "kvm" {
                    (virtio_stat(&o, "msix_irqfd"), 0)
                } else {
                    (0, virtio_stat(&o, "msix_ioctl"))
                };
                assert!(irqfd + ioctl >= 4, "{what}: one message per request");
                assert_eq!(virtio_stat(&o, "msix_ioctl"), ioctl, "{what}");
                assert_eq!(virtio_stat(&o, "msix_irqfd"), irqfd, "{what}");
                if backend == "kvm" {
                    // One vector programmed once: one routing update.
                    assert_eq!(virtio_stat(&o, "route_updates"), 1, "{what}");
                }
            } else {
                assert_eq!(virtio_stat(&o, "msix_irqfd"), 0, "{what}: INTx only");
                assert_eq!(virtio_stat(&o, "msix_ioctl"), 0, "{what}: INTx only");
            }
        }
    }
}

#[test]
fn disk_format_is_declared_and_checked_against_the_file() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let base = disk_image(dir.path());
    // A qcow2 image under a name that is not probed: only format=qcow2 opens it as one.
    let overlay = dir.path().join("overlay.img");
    qcow2_overlay(&base, &overlay);
    let arg = format!("path={},format=qcow2", overlay.display());
    let o = run_guest("vblk", &["--disk", &arg]);
    assert_exit(&o, 0);
    assert_saw_sector0(&o, "format=qcow2: the guest sees the base's bytes");
    for (file, declared, found) in [
        (&overlay, "raw", "qcow2"),
        (&base, "qcow2", "raw"),
        (&base, "vhdx", "raw"),
    ] {
        let arg = format!("path={},format={declared}", file.display());
        let o = run_guest("vblk", &["--disk", &arg]);
        assert_eq!(o.status.code(), Some(1), "{}", err(&o));
        let e = err(&o);
        assert!(
            e.contains(&format!(
                "is declared format={declared} but its contents are {found}"
            )),
            "{e}"
        );
        assert_eq!(e.trim().lines().count(), 1, "one error line: {e}");
    }
    let o = vmm(&["--kernel", "/nonexistent.elf", "--disk", "x.img,format=iso"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("unknown disk format `iso`"), "{}", err(&o));
}

#[test]
fn vblk_and_vrng_over_virtio_pci() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let img = disk_image(dir.path());
    let o = run_guest(
        "vblk",
        &["--disk", img.to_str().unwrap(), "--virtio-transport", "pci"],
    );
    assert_exit(&o, 0);
    assert!(
        out(&o).contains("SECTOR0 a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"),
        "{}",
        out(&o)
    );
    assert!(out(&o).contains("transport=pci"), "{}", out(&o));
    assert_eq!(&std::fs::read(&img).unwrap()[512..520], b"COREFOUR");
    let o = run_guest("vrng", &["--rng", "--virtio-transport", "pci"]);
    assert_eq!(o.status.code(), Some(0), "stdout:\n{}", out(&o));
    let o = run_guest("vrng", &["--rng", "--virtio-transport", "isa"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("unknown virtio transport"), "{}", err(&o));
}

#[test]
fn vblk_read_only_disk_refuses_the_write() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let img = disk_image(dir.path());
    let before = std::fs::read(&img).unwrap();
    let arg = format!("{},ro", img.display());
    let o = run_guest("vblk", &["--disk", &arg]);
    assert_eq!(o.status.code(), Some(1), "stdout:\n{}", out(&o));
    assert!(out(&o).contains("SECTOR0 a0a1"), "reads still work");
    assert!(
        out(&o).contains("vblk: FAIL status for type 0x1"),
        "{}",
        out(&o)
    );
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

#[test]
fn vblk_from_vm_json_disks() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let img = disk_image(dir.path());
    let k = guest("vblk");
    let cfg = dir.path().join("vm.json");
    let json = serde_json::json!({
        "kernel": k,
        "memory_mib": 32,
        "disks": [{ "path": img, "serial": "c4-test" }],
        "timeout_secs": 30
    });
    std::fs::write(&cfg, json.to_string()).unwrap();
    let o = vmm(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "stderr:\n{}", err(&o));
    assert_eq!(&std::fs::read(&img).unwrap()[512..520], b"COREFOUR");
}

#[test]
fn bad_disk_arguments_fail_with_one_clear_line() {
    let o = vmm(&["--kernel", "/nonexistent.elf", "--disk", "x.img,bogus"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).contains("unknown disk option `bogus`"),
        "{}",
        err(&o)
    );
    need_kvm!();
    let o = run_guest("vblk", &["--disk", "/nonexistent/disk.img"]);
    assert_eq!(o.status.code(), Some(1));
    let e = err(&o);
    assert!(e.contains("cannot open disk /nonexistent/disk.img"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn vrng_reads_random_bytes() {
    need_kvm!();
    let o = run_guest("vrng", &["--rng"]);
    assert_eq!(o.status.code(), Some(0), "stdout:\n{}", out(&o));
    let lines: Vec<_> = out(&o)
        .lines()
        .filter(|l| l.starts_with("RNG "))
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 2);
    assert_ne!(lines[0], lines[1]);
    // Without the device the guest finds nothing and says so.
    let o = run_guest("vrng", &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("vrng: FAIL init step"), "{}", out(&o));
}

#[test]
fn vnet_arps_and_pings_a_test_host_through_a_bridge() {
    need_kvm!();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP: needs root and /dev/net/tun for tap, bridge and netns");
        return;
    }
    let net = match TestNet::new("c4vn", "10.77.0.1", 1) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("SKIP: cannot build the test network: {e}");
            return;
        }
    };
    let arg = format!("{},mac=06:c4:00:00:00:42", net.taps[0]);
    for (transport, irq) in [("mmio", "0"), ("pci", "0"), ("mmio", "1"), ("pci", "1")] {
        let cmdline = format!("irq={irq}");
        let o = run_guest(
            "vnet",
            &[
                "--net",
                &arg,
                "--virtio-transport",
                transport,
                "--cmdline",
                &cmdline,
            ],
        );
        let s = out(&o);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{transport}: stdout:\n{s}\nstderr:\n{}",
            err(&o)
        );
        assert!(s.contains("VNET mac 06c400000042"), "{s}");
        assert!(s.contains("VNET arp "), "{s}");
        let reply = format!("VNET ping reply from {}", net.host_ip);
        assert!(s.contains(&reply), "{s}");
        if irq == "1" {
            // Each of the (at least two) TX completions is waited for with HLT; interrupts
            // pending at once merge into one in the local APIC, so no more is certain.
            let n: u64 = s
                .lines()
                .find_map(|l| l.strip_prefix("VNET irqs="))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0);
            assert!(n >= 2, "{transport}: interrupts taken: {n}; stdout:\n{s}");
        }
    }
}

#[test]
fn vvsock_talks_both_ways_over_unix_sockets() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::process::Stdio;
    need_kvm!();
    let k = guest("vvsock");
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    // Guest-initiated connections to port 5000 land here.
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let host5000 = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        s.write_all(b"hello from host\n").unwrap();
        line
    });
    let vsock = format!("7,{}", uds.display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_corefour"))
        .args([
            "vmm",
            "--kernel",
            k.to_str().unwrap(),
            "--vsock",
            &vsock,
            "--timeout",
            "30s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
        if line.starts_with("VSOCK listening 1234") {
            break;
        }
    }
    assert!(seen.contains("VSOCK from host: hello from host"), "{seen}");
    assert_eq!(host5000.join().unwrap(), "hello from guest\n");
    // Host-initiated: CONNECT to the guest's port 1234.
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(b"CONNECT 1234\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut ok = String::new();
    r.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "{ok:?}");
    s.write_all(b"ping\n").unwrap();
    let mut pong = [0u8; 5];
    r.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"pong\n");
    drop(r);
    drop(s);
    let st = child.wait().unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(st.code(), Some(0), "{seen}{rest}");
    assert!(rest.contains("VSOCK got: ping"), "{rest}");
    assert!(rest.contains("vvsock: ok"), "{rest}");
}

/// Guest RAM resident at exit, from `corefour vmm --stats`.
fn guest_resident_kib(o: &Output) -> u64 {
    err(o)
        .split_whitespace()
        .find_map(|w| w.strip_prefix("guest_resident_kib="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no stats in {}", err(o)))
}

#[test]
fn vballoon_returns_inflated_memory_to_the_host() {
    need_kvm!();
    let full = run_guest(
        "vballoon",
        &["--balloon", "0", "--stats", "--cmdline", "touch=24"],
    );
    assert_eq!(full.status.code(), Some(0), "{}", out(&full));
    let ballooned = run_guest(
        "vballoon",
        &["--balloon", "16", "--stats", "--cmdline", "touch=24"],
    );
    assert_eq!(ballooned.status.code(), Some(0), "{}", out(&ballooned));
    assert!(
        out(&ballooned).contains("VBALLOON target=4096 inflated=4096"),
        "{}",
        out(&ballooned)
    );
    let (a, b) = (guest_resident_kib(&full), guest_resident_kib(&ballooned));
    assert!(a >= 24 * 1024, "the guest touched 24 MiB: {a} KiB");
    assert!(
        a - b >= 15 * 1024,
        "16 MiB inflated should leave guest RAM: {a} KiB -> {b} KiB"
    );
}

fn http(sock: &Path, req: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect API socket");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn balloon_target_through_the_vmm_api() {
    need_kvm!();
    // `hang` idles until shut down; the devices do not need a driver to be configured.
    let k = {
        let lock = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guests.lock");
        let st = Command::new("flock")
            .arg(&lock)
            .args(["make", "-s", "-C"])
            .arg(repo().join("guests"))
            .status()
            .unwrap();
        assert!(st.success());
        repo().join("guests/build/hang.elf")
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_corefour"))
        .args([
            "vmm",
            "--kernel",
            k.to_str().unwrap(),
            "--balloon",
            "4",
            "--timeout",
            "30s",
        ])
        .arg("--api-sock")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // The socket file appears at bind(), a moment before listen(): wait until it accepts.
    while std::os::unix::net::UnixStream::connect(&sock).is_err()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let get = "GET /balloon HTTP/1.1\r\nConnection: close\r\n\r\n";
    let r = http(&sock, get);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("\"target_mib\":4"), "{r}");
    let r = http(
        &sock,
        "PUT /balloon?target_mib=12 HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 204"), "{r}");
    assert!(http(&sock, get).contains("\"target_mib\":12"));
    let r = http(
        &sock,
        "PUT /balloon?target_mib=lots HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    http(
        &sock,
        "PUT /vm/shutdown HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
