//! `corefour vm clone`, driven through the real binary and a daemon with its own state dir.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use corefour_daemon::client::Method;
use serde_json::{json, Value};

#[path = "common/daemon.rs"]
mod harness;
use harness::*;

#[path = "common/guests.rs"]
mod guests;
use guests::{counts, without_vmm_lines};

fn read_disk(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut img = corefour_disk::open(
        path,
        corefour_disk::Open {
            format: None,
            write: false,
        },
    )
    .unwrap();
    let mut buf = vec![0u8; len];
    img.reader().read_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn clone_overlays_disks_with_new_identity() {
    let tools = tempfile::tempdir().unwrap();
    let d = Daemon::start_with("clone", Some(fake_vmm(tools.path())));
    // A 1 MiB raw disk: 0x5a everywhere.
    let base = tools.path().join("base.raw");
    std::fs::write(&base, vec![0x5au8; 1 << 20]).unwrap();
    let base = base.canonicalize().unwrap();
    d.ok(
        Method::POST,
        "/v1/vms",
        Some(
            &json!({"name": "src", "kernel": EXE, "disks": [{"path": base}],
                    "nets": [{"bridge": "c4clonebr"}]})
            .to_string(),
        ),
    );

    let out = d.cli(&["--json", "clone", "src", "dst"]);
    assert!(out.status.success(), "{out:?}\n{}", d.log());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], "dst");
    assert_eq!(v["state"], "created");
    let src = d.ok(Method::GET, "/v1/vms/src", None);
    assert_ne!(v["nics"][0]["mac"], src["nics"][0]["mac"], "fresh MAC: {v}");
    assert_ne!(v["nics"][0]["tap"], src["nics"][0]["tap"], "own tap: {v}");
    let overlay = PathBuf::from(v["disks"][0]["path"].as_str().unwrap());
    assert_ne!(overlay, base);

    // The overlay is a qcow2 backed by the source's disk: nothing was copied.
    let info = Command::new(EXE)
        .args(["disk", "info", "--json"])
        .arg(&overlay)
        .output()
        .unwrap();
    assert!(info.status.success(), "{info:?}");
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains("qcow2"), "{text}");
    assert!(
        text.contains(base.to_str().unwrap()),
        "backing file: {text}"
    );
    assert!(std::fs::metadata(&overlay).unwrap().len() < 1 << 20);
    assert_eq!(read_disk(&overlay, 4096, 16), vec![0x5au8; 16]);

    // A write in the clone stays in the clone.
    {
        let mut img = corefour_disk::open(
            &overlay,
            corefour_disk::Open {
                format: None,
                write: true,
            },
        )
        .unwrap();
        let w = img.writer().unwrap();
        w.write_at(&[0xa5u8; 4096], 0).unwrap();
        w.flush().unwrap();
    }
    assert_eq!(read_disk(&overlay, 0, 8), vec![0xa5u8; 8]);
    assert_eq!(read_disk(&overlay, 8192, 8), vec![0x5au8; 8]);
    assert_eq!(std::fs::read(&base).unwrap(), vec![0x5au8; 1 << 20]);

    // Errors: a taken name, a missing source, its own name, a malformed body.
    let (s, e) = d.req(
        Method::POST,
        "/v1/vms/src/clone",
        Some(r#"{"name": "dst"}"#),
    );
    assert_eq!(s, 409, "{e}");
    let (s, _) = d.req(Method::POST, "/v1/vms/nope/clone", Some(r#"{"name": "x"}"#));
    assert_eq!(s, 404);
    let (s, _) = d.req(
        Method::POST,
        "/v1/vms/src/clone",
        Some(r#"{"name": "src"}"#),
    );
    assert_eq!(s, 400);
    let (s, e) = d.req(Method::POST, "/v1/vms/src/clone", Some(r#"{"nam": "y"}"#));
    assert_eq!(s, 400, "{e}");
    assert!(d.req(Method::GET, "/v1/vms/y", None).0 == 404);
    // Deleting the clone removes its overlay, never the source's disk.
    d.ok(Method::DELETE, "/v1/vms/dst", None);
    assert!(!overlay.exists());
    assert!(base.exists());
}

#[test]
fn running_source_is_refused_and_clone_runs_independently() {
    let tools = tempfile::tempdir().unwrap();
    let d = Daemon::start_with("clone", Some(fake_vmm(tools.path())));
    let base = tools.path().join("b.raw");
    std::fs::write(&base, vec![0u8; 65536]).unwrap();
    d.ok(
        Method::POST,
        "/v1/vms",
        Some(
            &json!({"name": "a", "kernel": EXE, "disks": [{"path": base}], "start": true})
                .to_string(),
        ),
    );
    // A running source is snapshotted through its VMM; this stand-in VMM has no API, so the
    // clone fails with the reason and leaves nothing behind.
    let out = d.cli(&["clone", "a", "b"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not answer"), "{err}");
    assert!(!d.state_dir().join("vms/b").exists());
    assert_eq!(
        d.req(Method::GET, "/v1/vms/b", None).0,
        404,
        "nothing registered"
    );

    d.ok(Method::POST, "/v1/vms/a/kill", None);
    let out = d.cli(&["clone", "a", "b", "--start"]);
    assert!(out.status.success(), "{out:?}\n{}", d.log());
    d.ok(Method::POST, "/v1/vms/a/start", None);
    let a = d.ok(Method::GET, "/v1/vms/a", None);
    let b = d.ok(Method::GET, "/v1/vms/b", None);
    assert_eq!(a["state"], "running", "{a}");
    assert_eq!(b["state"], "running", "{b}");
    assert_ne!(a["pid"], b["pid"]);
    // The clone's VMM was given the overlay, the source's its own disk.
    let cfg = std::fs::read_to_string(d.state_dir().join("vms/b/vm.json")).unwrap();
    assert!(cfg.contains("disk0.qcow2"), "{cfg}");
}

#[test]
fn restore_continues_the_counter() {
    let Some(counter) = guest("counter") else {
        eprintln!("skipped: guests not built (make -C guests)");
        return;
    };
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let d = Daemon::start("clone");
    let tmp = tempfile::tempdir().unwrap();
    d.ok(
        Method::POST,
        "/v1/vms",
        Some(
            &json!({"name": "c", "kernel": counter, "cmdline": "spin=1000000", "start": true})
                .to_string(),
        ),
    );
    wait_console_until(&d, "c", |t| counts(t).len() >= 5);
    d.ok(Method::POST, "/v1/vms/c/pause", None);
    std::thread::sleep(Duration::from_millis(200));
    let snap = tmp.path().join("snap");
    let out = d.cli(&["snapshot", "c", "--path", snap.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    d.ok(Method::POST, "/v1/vms/c/kill", None);
    let before = console(&d, "c");
    let last = *counts(&before).last().unwrap();

    // Restoring a running VM is refused; a stopped one continues its count.
    let out = d.cli(&["restore", "c", "--from", snap.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}\n{}", d.log());
    let (s, e) = d.req(
        Method::POST,
        "/v1/vms/c/restore",
        Some(&json!({"path": snap}).to_string()),
    );
    assert_eq!(s, 409, "{e}");
    let text = wait_console_until(&d, "c", |t| {
        t.len() > before.len() && counts(&t[before.len()..]).len() >= 3
    });
    let after = &text[before.len()..];
    assert!(after.contains("restored"), "{after}");
    // The VMM's own lines can land in the middle of a guest line; without them the guest's
    // output must read as one run: no count missing, none repeated.
    let guest_only = without_vmm_lines(&text);
    let all = counts(&guest_only);
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1),
        "the count has a gap or repeat:\n{guest_only}"
    );
    assert!(*all.last().unwrap() >= last + 3, "{after}");

    // A plain start afterwards boots again (the restore applies once).
    d.ok(Method::POST, "/v1/vms/c/kill", None);
    let (s, e) = d.req(
        Method::POST,
        "/v1/vms/c/restore",
        Some(r#"{"path": "relative/snap"}"#),
    );
    assert_eq!(s, 400, "{e}");
    let mark = console(&d, "c").len();
    d.ok(Method::POST, "/v1/vms/c/start", None);
    let text = wait_console_until(&d, "c", |t| {
        t.len() > mark && !counts(&t[mark..]).is_empty()
    });
    assert!(counts(&text[mark..])[0] <= 1, "{}", &text[mark..]);
}

#[test]
fn clone_of_a_running_vm_continues_in_both() {
    let Some(counter) = guest("counter") else {
        eprintln!("skipped: guests not built (make -C guests)");
        return;
    };
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let d = Daemon::start("clone");
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.raw");
    std::fs::write(&base, vec![0x77u8; 1 << 20]).unwrap();
    let base = base.canonicalize().unwrap();
    d.ok(
        Method::POST,
        "/v1/vms",
        Some(
            &json!({"name": "src", "kernel": counter, "cmdline": "spin=1000000",
                    "disks": [{"path": base}], "start": true})
            .to_string(),
        ),
    );
    wait_console_until(&d, "src", |t| counts(t).len() >= 5);
    let out = d.cli(&["--json", "clone", "src", "dst", "--start"]);
    assert!(out.status.success(), "{out:?}\n{}", d.log());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "running", "{v}");
    let at_clone = console(&d, "src");
    let last_src = *counts(&without_vmm_lines(&at_clone)).last().unwrap();

    // The clone starts at the snapshot instant, not from a boot, and counts on.
    let text = wait_console_until(&d, "dst", |t| counts(t).len() >= 3);
    // (Its first line may be the rest of one the source had half printed.)
    let c = counts(&without_vmm_lines(&text));
    assert!(
        c[0] > 1 && c[0] <= last_src + 2,
        "clone began at {}: {text}",
        c[0]
    );
    assert!(c.windows(2).all(|w| w[1] == w[0] + 1), "{text}");
    assert!(text.contains("restored"), "{text}");

    // The source went on from the same instant on a new VMM, without a gap or repeat.
    let text = wait_console_until(&d, "src", |t| {
        t.len() > at_clone.len() && counts(&t[at_clone.len()..]).len() >= 3
    });
    let all = counts(&without_vmm_lines(&text));
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{text}");
    assert_eq!(d.ok(Method::GET, "/v1/vms/src", None)["state"], "running");

    // Both write to their own overlay now; the disk they share stays as it was.
    let src = d.ok(Method::GET, "/v1/vms/src", None);
    let dst = d.ok(Method::GET, "/v1/vms/dst", None);
    let (sp, dp) = (
        src["disks"][0]["path"].as_str().unwrap().to_string(),
        dst["disks"][0]["path"].as_str().unwrap().to_string(),
    );
    assert!(
        sp.ends_with(".qcow2") && dp.ends_with(".qcow2") && sp != dp,
        "{sp} {dp}"
    );
    for p in [&sp, &dp] {
        assert_eq!(read_disk(Path::new(p), 4096, 8), vec![0x77u8; 8]);
    }
    assert_eq!(std::fs::read(&base).unwrap(), vec![0x77u8; 1 << 20]);
    // Each has its own identity: name and VMM.
    assert_ne!(src["pid"], dst["pid"]);
}
