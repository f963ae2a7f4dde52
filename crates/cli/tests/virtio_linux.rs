//! Our virtio devices under Linux's own drivers: Debian's cloud kernel (the fixture from
//! tests/fixtures/linux/setup.sh) on the software CPU, once over virtio-pci (found by
//! enumerating the DSDT's PCI root, interrupts by MSI-X) and once over virtio-mmio (found as
//! ACPI `LNRO0005` devices, interrupts through the I/O APIC), both boots at the same time.
//!
//! Each guest gets a virtio-blk disk holding an ext4 image made with `mkfs.ext4 -d`, a
//! virtio-net NIC on a tap in a bridge shared with an `ip netns` test host, virtio-rng, and a
//! virtio-balloon with a 16 MiB target, and virtio-vsock (CID 3) whose host side follows
//! Firecracker's convention: the guest's connection to host port 5000 lands on the Unix socket
//! `<uds>_5000`, and the host reaches the guest's port 6000 by writing `CONNECT 6000` to `<uds>`.
//! The guest's end is the fixture's /bin/c4vsock (tests/fixtures/linux/vsock.c).
//! The fixture's initramfs is reused unchanged: a second newc archive holding our /init is
//! appended to a copy of it (the kernel unpacks concatenated archives; later files win). That
//! init mounts the disk, prints the known file and writes one back (checked on the host after
//! power-off), pings the test host with a static address, reads /dev/hwrng, lists the virtio
//! interrupts, and prints a marker for each step. On PCI it then rebinds the rng function with
//! MSI disallowed (`msi_bus` = 0) and reads again: virtio-pci's legacy INTx fallback.

#[path = "common/testnet.rs"]
mod testnet;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[path = "common/linux.rs"]
mod linux;
use linux::{fixture, run, Run};

const KNOWN: &str = "corefour known file: 7f3a9c";
const HOST_IP: &str = "10.78.0.1";
/// Kernel parameters that only shorten the boot on a software CPU: no crypto self-tests at
/// boot, and no TSC stability watchdog (the emulated TSC is the VM clock). They cut the CPU
/// time to /init by about a third; the virtio paths are the same.
const FAST_BOOT: &str = "cryptomgr.notests tsc=reliable";
/// Per boot; two boots share two cores with whatever else runs.
const LIMIT: Duration = Duration::from_secs(170);

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
arg() { sed -n "s/.*[ ]$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_mmio \
    virtio-rng virtio_blk failover net_failover virtio_net vsock vmw_vsock_virtio_transport_common \
    vmw_vsock_virtio_transport; do
    insmod /lib/modules/virtio/$m.ko || echo "C4T-INSMOD-FAILED $m"
done
memfree() { sed -n 's/^MemFree: *\([0-9]*\) kB/\1/p' /proc/meminfo; }
free0=$(memfree)
insmod /lib/modules/virtio/virtio_balloon.ko || echo "C4T-INSMOD-FAILED virtio_balloon"
n=0
while [ $((free0 - $(memfree))) -lt 12288 ] && [ $n -lt 100 ]; do
    sleep 0.1
    n=$((n + 1))
done
echo "C4T-BALLOON-KB $((free0 - $(memfree)))"
n=0
while [ ! -b /dev/vda ] || [ ! -e /sys/class/net/eth0 ]; do
    [ $n -ge 100 ] && break
    sleep 0.1
    n=$((n + 1))
done
echo "C4T-VDA $(readlink -f /sys/block/vda/device)"
mkdir -p /mnt
if mount -t ext4 /dev/vda /mnt; then
    echo "C4T-FILE $(cat /mnt/known.txt)"
    echo "written by the $(arg c4t) guest" >/mnt/from-guest.txt
    umount /mnt && echo C4T-UMOUNT-OK
fi
ip link set eth0 up
ip addr add "$(arg c4ip)/24" dev eth0
ping -c 2 -W 20 "$(arg c4peer)" && echo C4T-PING-OK
echo "C4T-RNG-SRC $(cat /sys/class/misc/hw_random/rng_current)"
echo "C4T-RNG $(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
# vsock both ways: a listener on 6000 for the host, then a connection to the host's 5000.
c4vsock listen 6000 "guest-pong-$(arg c4t)" >/tmp/vsock-listen 2>&1 &
lp=$!
echo "C4T-VSOCK-REPLY $(c4vsock connect 5000 "guest-ping-$(arg c4t)" 2>&1)"
wait $lp
echo "C4T-VSOCK-HOST-SAID $(cat /tmp/vsock-listen)"
if [ "$(arg c4t)" = pci ]; then
    # virtio-pci's INTx fallback: the rng function rebound with MSI disallowed for it.
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat $d/device)" = 0x1044 ] || continue
        echo 0 >$d/msi_bus
        echo ${d##*/} >/sys/bus/pci/drivers/virtio-pci/unbind
        echo ${d##*/} >/sys/bus/pci/drivers/virtio-pci/bind
    done
    echo "C4T-INTX-RNG $(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
fi
grep virtio /proc/interrupts | sed 's/^/C4T-IRQ /'
echo C4T-DONE
poweroff -f
"#;

/// One newc (SVR4, no CRC) archive member.
fn newc_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The fixture's initrd with an archive holding our /init appended. The kernel only looks for
/// a cpio header at 4-byte aligned offsets and skips zeros, so the gzip part is padded.
fn initrd_with_our_init(fixture_initrd: &Path, out: &Path) -> std::io::Result<()> {
    let mut buf = std::fs::read(fixture_initrd)?;
    while !buf.len().is_multiple_of(512) {
        buf.push(0);
    }
    let start = buf.len();
    newc_entry(&mut buf, 1, "init", 0o100_755, INIT.as_bytes());
    newc_entry(&mut buf, 0, "TRAILER!!!", 0, &[]);
    assert!(start.is_multiple_of(4));
    std::fs::write(out, buf)
}

/// An ext4 image with known.txt, made the way a user would (`mkfs.ext4 -d`).
fn ext4_image(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let src = dir.join(format!("{name}-root"));
    std::fs::create_dir_all(&src).map_err(|e| e.to_string())?;
    std::fs::write(src.join("known.txt"), format!("{KNOWN}\n")).map_err(|e| e.to_string())?;
    let img = dir.join(format!("{name}.img"));
    let _ = std::fs::remove_file(&img);
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("16M")
        .output()
        .map_err(|e| format!("mkfs.ext4: {e} (install e2fsprogs)"))?;
    if !o.status.success() {
        return Err(format!(
            "mkfs.ext4 -d failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(img)
}

/// A file from an ext4 image, read on the host with debugfs.
fn ext4_cat(img: &Path, file: &str) -> String {
    let o = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat /{file}"))
        .arg(img)
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct Guest {
    transport: &'static str,
    tap: String,
    mac: &'static str,
    ip: &'static str,
    disk: PathBuf,
    /// Options after the disk's path (`,direct`: O_DIRECT, served through io_uring).
    disk_opts: &'static str,
    vsock: PathBuf,
}

/// What the host side of a guest's vsock saw: the line the guest sent to port 5000, and the
/// guest's answer on port 6000 (errors as text, for the failure message).
#[derive(Debug, Default)]
struct VsockHost {
    from_guest: String,
    guest_answer: String,
}

/// Serves the guest's connection to host port 5000 and connects to the guest's port 6000
/// (retrying until the guest listens, or `limit` passes, or `vm_gone`).
fn vsock_host(uds: &Path, transport: &str, limit: Duration, vm_gone: &AtomicBool) -> VsockHost {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    let deadline = std::time::Instant::now() + limit;
    let listener = match UnixListener::bind(format!("{}_5000", uds.display())) {
        Ok(l) => l,
        Err(e) => {
            return VsockHost {
                from_guest: format!("bind: {e}"),
                ..Default::default()
            }
        }
    };
    let reply = format!("host-pong-{transport}\n");
    let served = std::thread::spawn(move || -> std::io::Result<String> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut line = String::new();
        BufReader::new(s.try_clone()?).read_line(&mut line)?;
        s.write_all(reply.as_bytes())?;
        Ok(line.trim_end().to_string())
    });
    let mut guest_answer = String::from("never connected");
    while std::time::Instant::now() < deadline && !vm_gone.load(Ordering::SeqCst) {
        let attempt = || -> std::io::Result<Option<String>> {
            let mut s = UnixStream::connect(uds)?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            s.write_all(b"CONNECT 6000\n")?;
            let mut r = BufReader::new(s.try_clone()?);
            let mut ok = String::new();
            r.read_line(&mut ok)?;
            if !ok.starts_with("OK ") {
                // No listener yet: the device closed the stream.
                return Ok(None);
            }
            s.write_all(format!("host-ping-{transport}\n").as_bytes())?;
            let mut answer = String::new();
            r.read_line(&mut answer)?;
            Ok(Some(answer.trim_end().to_string()))
        };
        match attempt() {
            Ok(Some(a)) => {
                guest_answer = a;
                break;
            }
            Ok(None) => {}
            Err(e) => guest_answer = format!("error: {e}"),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // The guest connects to 5000 after its listener answered, maybe well after on the software
    // CPU: wait for that (or the VM's end) before unblocking the accept, which would otherwise
    // take the unblocking connection for the guest's.
    while !served.is_finished()
        && std::time::Instant::now() < deadline
        && !vm_gone.load(Ordering::SeqCst)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !served.is_finished() {
        let _ = UnixStream::connect(format!("{}_5000", uds.display()));
    }
    let from_guest = match served.join() {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "the accept thread panicked".into(),
    };
    VsockHost {
        from_guest,
        guest_answer,
    }
}

fn boot(kernel: &Path, initrd: &Path, g: &Guest, host_ip: &str) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_corefour"));
    cmd.args(["vmm", "--backend", "emu", "--memory", "256M"])
        .args(["--timeout", &format!("{}s", LIMIT.as_secs() - 5)])
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args([
            "--cmdline",
            &format!(
                "console=ttyS0 panic=-1 quiet {FAST_BOOT} c4t={} c4ip={} c4peer={host_ip}",
                g.transport, g.ip
            ),
        ])
        .arg("--disk")
        .arg(format!("{}{}", g.disk.display(), g.disk_opts))
        .args(["--net", &format!("{},mac={}", g.tap, g.mac)])
        .arg("--rng")
        .args(["--balloon", "16"])
        .arg("--vsock")
        .arg(format!("3,{}", g.vsock.display()))
        .args(["--virtio-transport", g.transport]);
    run(cmd, LIMIT)
}

/// The `C4T-...` lines of a run, for failure messages (the console has the whole kernel log).
fn markers(s: &str) -> String {
    s.lines()
        .filter(|l| l.starts_with("C4T") || l.contains("virtio") || l.contains("Kernel panic"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// (count, rest of line) of each `C4T-IRQ` line: `C4T-IRQ  25:  3  PCI-MSI 49153-edge virtio2-input`.
fn irqs(s: &str) -> Vec<(u64, String)> {
    s.lines()
        .filter_map(|l| l.strip_prefix("C4T-IRQ "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let _irq = w.next()?;
            let count = w.next()?.parse().ok()?;
            Some((count, w.collect::<Vec<_>>().join(" ")))
        })
        .collect()
}

fn check(g: &Guest, r: &Run, v: &VsockHost) {
    let s = &r.stdout;
    let t = g.transport;
    let ctx = || {
        format!(
            "{t} boot (exit {:?} after {:.1}s):\n{}\nstderr:\n{}",
            r.code,
            r.took.as_secs_f64(),
            markers(s),
            r.stderr
        )
    };
    assert!(!s.contains("C4T-INSMOD-FAILED"), "{}", ctx());
    // The PCI host bridge is there whatever the transport.
    assert!(
        !s.contains("No config space access function found"),
        "{}",
        ctx()
    );
    assert!(s.contains("C4T-DONE"), "the init did not finish: {}", ctx());
    assert_eq!(r.code, Some(0), "no clean power-off: {}", ctx());
    // Which bus the disk sits on: the PCI function or the ACPI-described mmio window.
    let vda = s
        .lines()
        .find_map(|l| l.strip_prefix("C4T-VDA "))
        .unwrap_or("");
    match t {
        "pci" => assert!(vda.contains("/pci0000:00/0000:00:01.0/virtio"), "{}", ctx()),
        _ => assert!(vda.contains("/LNRO0005:"), "{}", ctx()),
    }
    assert!(s.contains(&format!("C4T-FILE {KNOWN}")), "{}", ctx());
    assert!(s.contains("C4T-UMOUNT-OK"), "{}", ctx());
    assert!(
        s.contains(&format!("64 bytes from {HOST_IP}")) && s.contains("C4T-PING-OK"),
        "{}",
        ctx()
    );
    assert!(s.contains("C4T-RNG-SRC virtio_rng."), "{}", ctx());
    // Every device has a line of its own: none shares the RTC's, the SCI's or another's.
    assert!(!s.contains("genirq: Flags mismatch"), "{}", ctx());
    // The balloon's 16 MiB target: the driver took that much free memory from the guest.
    let ballooned: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("C4T-BALLOON-KB "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        ballooned >= 12 * 1024,
        "balloon inflated {ballooned} KiB: {}",
        ctx()
    );
    let rng = s
        .lines()
        .find_map(|l| l.strip_prefix("C4T-RNG "))
        .unwrap_or("");
    assert_eq!(rng.len(), 64, "32 bytes from /dev/hwrng: {}", ctx());
    assert!(rng.chars().any(|c| c != '0'), "{}", ctx());
    // vsock, guest-initiated: the line reached <uds>_5000 and the host's answer came back.
    assert_eq!(v.from_guest, format!("guest-ping-{t}"), "{}", ctx());
    assert!(
        s.contains(&format!("C4T-VSOCK-REPLY host-pong-{t}")),
        "{}",
        ctx()
    );
    // Host-initiated: CONNECT 6000 reached the guest's listener, which answered.
    assert_eq!(v.guest_answer, format!("guest-pong-{t}"), "{}", ctx());
    assert!(
        s.contains(&format!("C4T-VSOCK-HOST-SAID host-ping-{t}")),
        "{}",
        ctx()
    );
    // Interrupts, not polling, carried the I/O: the disk's and the NIC's handlers ran.
    let irqs = irqs(s);
    let fired: Vec<&String> = irqs
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(_, d)| d)
        .collect();
    match t {
        "pci" => {
            // blk and net on MSI-X vectors; the rebound rng on its INTx line (level-triggered,
            // hence fasteoi), which must have fired for the second read.
            let (msi, intx): (Vec<_>, Vec<_>) =
                irqs.iter().partition(|(_, d)| d.contains("PCI-MSI"));
            assert!(fired.iter().any(|d| d.contains("-req.")), "{}", ctx());
            assert!(fired.iter().any(|d| d.contains("-input")), "{}", ctx());
            assert!(msi.len() >= 4, "config + queue vectors: {}", ctx());
            assert!(
                intx.len() == 1 && intx[0].0 > 0 && intx[0].1.contains("IO-APIC 7-fasteoi"),
                "rng over INTx (GSI 7): {}",
                ctx()
            );
            let again = s
                .lines()
                .find_map(|l| l.strip_prefix("C4T-INTX-RNG "))
                .unwrap_or("");
            assert!(again.len() == 64 && again != rng, "{}", ctx());
        }
        _ => {
            assert!(
                irqs.iter().all(|(_, d)| d.contains("IO-APIC")),
                "virtio-mmio goes through the I/O APIC: {}",
                ctx()
            );
            assert!(fired.len() >= 3, "blk, net and rng interrupts: {}", ctx());
        }
    }
    let back = ext4_cat(&g.disk, "from-guest.txt");
    assert_eq!(
        back.trim(),
        format!("written by the {t} guest"),
        "{}",
        ctx()
    );
}

#[test]
fn linux_drives_virtio_blk_net_rng_balloon_and_vsock_over_pci_and_mmio() {
    let Some((kernel, fixture_initrd)) = fixture() else {
        eprintln!("SKIP: no fixture in .cache/linux; run tests/fixtures/linux/setup.sh");
        return;
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP: needs root and /dev/net/tun for the taps, the bridge and the netns");
        return;
    }
    for tool in ["mkfs.ext4", "debugfs"] {
        if Command::new(tool).arg("-V").output().is_err() {
            eprintln!("SKIP: {tool} is missing (install e2fsprogs)");
            return;
        }
    }
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("virtio-linux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("work dir");
    let initrd = dir.join("initrd-virtio.cpio");
    initrd_with_our_init(&fixture_initrd, &initrd).expect("build the initrd");
    let net = match testnet::TestNet::new("c4vl", HOST_IP, 2) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("SKIP: cannot build the test network: {e}");
            return;
        }
    };
    let guests = [
        Guest {
            transport: "pci",
            tap: net.taps[0].clone(),
            mac: "06:c4:00:00:4c:02",
            ip: "10.78.0.2",
            disk: ext4_image(&dir, "pci").expect("ext4 image"),
            disk_opts: ",direct",
            vsock: dir.join("vsock-pci.sock"),
        },
        Guest {
            transport: "mmio",
            tap: net.taps[1].clone(),
            mac: "06:c4:00:00:4c:03",
            ip: "10.78.0.3",
            disk: ext4_image(&dir, "mmio").expect("ext4 image"),
            disk_opts: "",
            vsock: dir.join("vsock-mmio.sock"),
        },
    ];
    let runs: Vec<(Run, VsockHost)> = std::thread::scope(|s| {
        let handles: Vec<_> = guests
            .iter()
            .map(|g| {
                let gone = Arc::new(AtomicBool::new(false));
                let g2 = gone.clone();
                let host = s.spawn(move || vsock_host(&g.vsock, g.transport, LIMIT, &g2));
                let (kernel, initrd, host_ip) = (&kernel, &initrd, &net.host_ip);
                let vm = s.spawn(move || {
                    let r = boot(kernel, initrd, g, host_ip);
                    gone.store(true, Ordering::SeqCst);
                    r
                });
                (vm, host)
            })
            .collect();
        handles
            .into_iter()
            .map(|(b, h)| {
                let run = b.join().expect("boot thread");
                (run, h.join().expect("vsock host thread"))
            })
            .collect()
    });
    for (g, (r, _)) in guests.iter().zip(&runs) {
        eprintln!(
            "{} boot: {:.1}s to power-off",
            g.transport,
            r.took.as_secs_f64()
        );
    }
    for (g, (r, v)) in guests.iter().zip(&runs) {
        check(g, r, v);
    }
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}
