//! `corefour vm snapshot` takes the VM's disks at the same instant as its memory: the guest
//! (vblkloop, which reads back what it wrote the iteration before) writes on after the
//! snapshot, is stopped, and a restore from the snapshot finds the disk as it was; twice from
//! the same snapshot, and the frozen file never changes again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use corefour_daemon::client::Method;
use serde_json::{json, Value};

#[path = "common/daemon.rs"]
mod harness;
use harness::*;

#[path = "common/guests.rs"]
mod guests;
use guests::{counts, without_vmm_lines};

/// vblkloop's pattern for iteration `n`, in sector 1 + n % 64.
fn holds(disk: &[u8], n: u64) -> bool {
    let at = (1 + n % 64) as usize * 512;
    let s = &disk[at..at + 512];
    s[..8] == n.to_le_bytes() && (8..512).all(|j| s[j] == (n + j as u64) as u8)
}

/// Restores `name` from `snap` and waits until the guest ran 80 more iterations there (so
/// every one of its 64 sectors was read back once): the console after the restore.
fn restore_and_run(d: &Daemon, name: &str, snap: &Path) -> String {
    let mark = console(d, name).len();
    let out = d.cli(&["restore", name, "--from", snap.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}\n{}", d.log());
    let text = wait_console_until(d, name, |t| {
        t.len() > mark && (counts(&t[mark..]).len() >= 80 || t[mark..].contains("FAIL"))
    });
    text[mark..].to_string()
}

#[test]
fn a_restore_sees_the_disk_as_it_was_at_the_snapshot() {
    let Some(vblkloop) = guest("vblkloop") else {
        eprintln!("SKIP: guests not built (make -C guests -f virtio.mk)");
        return;
    };
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("SKIP: /dev/kvm is not usable");
        return;
    }
    let d = Daemon::start("snapdisk");
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("root.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk = disk.canonicalize().unwrap();
    d.ok(
        Method::POST,
        "/v1/vms",
        Some(
            &json!({"name": "v", "kernel": vblkloop, "cmdline": "spin=200000",
                    "disks": [{"path": disk}], "start": true})
            .to_string(),
        ),
    );
    wait_console_until(&d, "v", |t| counts(t).len() >= 10);
    // The VMM's dirty-chunk map (what the live mirror uses) through its own API: the guest
    // writes only sectors 1..=64, all in the first 64 KiB chunk.
    let sock = d.state_dir().join("vms/v/vmm.sock");
    let dirty = |method: &str, body: Option<&str>| {
        corefour_vmm::api_client::call(
            &sock,
            method,
            "/vm/disks/dirty",
            body,
            Duration::from_secs(5),
        )
        .unwrap()
    };
    assert_eq!(dirty("GET", None).status, 409, "not tracking yet");
    assert_eq!(dirty("PUT", Some(r#"{"track": true}"#)).status, 204);
    let n = counts(&console(&d, "v")).len();
    wait_console_until(&d, "v", |t| counts(t).len() > n + 3);
    let r = dirty("GET", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v[0]["path"], disk.to_str().unwrap(), "{v}");
    assert_eq!(v[0]["dirty"], json!([[0, 65536]]), "{v}");
    assert_eq!(dirty("PUT", Some(r#"{"track": false}"#)).status, 204);
    let snap = tmp.path().join("snap");
    // The guest prints a count after its write completes, so the snapshot holds at least the
    // last count seen before the request (the console read after it may already show counts
    // the resumed guest wrote to its overlay).
    let pre_snap = *counts(&without_vmm_lines(&console(&d, "v")))
        .last()
        .unwrap();
    let out = d.cli(&["--json", "snapshot", "v", "--path", snap.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}\n{}", d.log());
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let frozen = &r["disks"][0];
    assert_eq!(frozen["frozen"], disk.to_str().unwrap(), "{r}");
    let running = PathBuf::from(frozen["running"].as_str().unwrap());
    assert!(running.starts_with(d.state_dir()), "{r}");
    // The record follows the VM onto its overlay.
    let v = d.ok(Method::GET, "/v1/vms/v", None);
    assert_eq!(v["disks"][0]["path"], running.to_str().unwrap(), "{v}");

    // The guest writes on, well past a whole turn of its 64 sectors, then stops.
    let at_snap = console(&d, "v");
    wait_console_until(&d, "v", |t| {
        t.len() > at_snap.len() && counts(&t[at_snap.len()..]).len() >= 150
    });
    d.ok(Method::POST, "/v1/vms/v/kill", None);
    d.wait_state("v", "stopped", Duration::from_secs(10));
    let last = *counts(&without_vmm_lines(&console(&d, "v")))
        .last()
        .unwrap();
    // The frozen file holds what the guest wrote up to the snapshot and nothing after.
    let base = std::fs::read(&disk).unwrap();
    assert!(
        !(0..64).any(|k| holds(&base, last - k)),
        "the frozen disk got writes from after the snapshot"
    );
    let snap_count = *counts(&without_vmm_lines(&at_snap)).last().unwrap();
    let frozen_at = (pre_snap..=snap_count)
        .rev()
        .find(|&n| holds(&base, n))
        .expect("the frozen disk lacks the writes from before the snapshot");

    // Restored, the guest reads back the sectors it wrote before the snapshot (they were
    // overwritten after it on the overlay): no FAIL, and the count goes on from the snapshot.
    for round in 0..2 {
        let after = restore_and_run(&d, "v", &snap);
        assert!(
            !after.contains("FAIL"),
            "restore {round} saw a disk from after the snapshot:\n{after}"
        );
        let c = counts(&without_vmm_lines(&after));
        assert!(
            c[0] <= frozen_at + 2 && c[0] + 2 >= frozen_at,
            "restore {round} began at {} (snapshot's disk at {frozen_at})",
            c[0]
        );
        d.ok(Method::POST, "/v1/vms/v/kill", None);
        d.wait_state("v", "stopped", Duration::from_secs(10));
    }
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        base,
        "the frozen file changed"
    );
    // A memory-only snapshot leaves the disks alone.
    let mark = console(&d, "v").len();
    d.ok(Method::POST, "/v1/vms/v/start", None);
    wait_console_until(&d, "v", |t| {
        t.len() > mark && t[mark..].contains("vblkloop: start")
    });
    let before = d.ok(Method::GET, "/v1/vms/v", None)["disks"][0]["path"].clone();
    let out = d.cli(&["--json", "snapshot", "v", "--memory-only"]);
    assert!(out.status.success(), "{out:?}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r.get("disks").is_none(), "{r}");
    assert_eq!(
        d.ok(Method::GET, "/v1/vms/v", None)["disks"][0]["path"],
        before
    );
}
