//! `corefour host check` run live on this host, through the real binary.

use std::process::Command;

fn corefour(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_corefour"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("the corefour binary runs")
}

/// The flavour /sys/module shows, decided independently of the crate under test.
fn sys_module_flavour() -> &'static str {
    let has = |m: &str| std::path::Path::new(&format!("/sys/module/{m}")).exists();
    if has("kvm_intel") {
        "kvm_intel"
    } else if has("kvm_amd") {
        "kvm_amd"
    } else if has("kvm_pvm") {
        "kvm_pvm"
    } else if std::fs::read_dir("/sys/module")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("kvm"))
        })
        .unwrap_or(false)
    {
        "other"
    } else {
        "none"
    }
}

#[test]
fn host_check_json_matches_this_host() {
    let out = corefour(&["host", "check", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let doc: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("--json is not JSON ({e}): {stdout}"));
    assert_eq!(doc["schema_version"], 1);

    assert_eq!(doc["kvm"]["flavour"], sys_module_flavour(), "{stdout}");
    let kvm_present = std::path::Path::new("/dev/kvm").exists();
    assert_eq!(doc["kvm"]["present"], kvm_present);
    if doc["kvm"]["openable"] == true {
        assert_eq!(doc["kvm"]["api_version"], 12);
        let caps = doc["kvm"]["capabilities"]
            .as_array()
            .expect("capabilities is a list");
        assert!(caps
            .iter()
            .any(|c| c["name"] == "USER_MEMORY" && c["value"].as_i64() > Some(0)));
    } else {
        eprintln!("/dev/kvm does not open here: {}", doc["kvm"]["open_error"]);
    }

    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_flag = |f: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|w| w == f))
    };
    assert_eq!(doc["cpu"]["vmx"], has_flag("vmx"));
    assert_eq!(doc["cpu"]["svm"], has_flag("svm"));
    assert_eq!(doc["cpu"]["hypervisor"], has_flag("hypervisor"));

    let overlay = std::fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"));
    assert_eq!(doc["overlayfs"], overlay);

    let checks = doc["checks"].as_array().expect("checks is a list");
    assert!(checks.len() >= 15, "{} checks", checks.len());
    for c in checks {
        assert!(
            matches!(c["status"].as_str(), Some("pass" | "warn" | "fail")),
            "{c}"
        );
        assert!(c["detail"].as_str().is_some_and(|d| !d.is_empty()), "{c}");
    }

    let verdict = doc["verdict"]["id"]
        .as_str()
        .expect("verdict.id is a string");
    let expected = match (
        doc["kvm"]["flavour"].as_str(),
        doc["kvm"]["openable"] == true,
    ) {
        (Some("kvm_pvm"), true) => "kvm_without_vmx_svm",
        (Some("kvm_intel" | "kvm_amd"), true) if has_flag("vmx") || has_flag("svm") => {
            "hardware_virtualization"
        }
        (_, false) => "software_emulation_only",
        _ => verdict,
    };
    assert_eq!(verdict, expected);
    // The software CPU always runs on x86_64, so a VM backend is always available here.
    assert_eq!(doc["verdict"]["vm_backend_available"], true);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn host_check_table_ends_with_the_verdict() {
    let out = corefour(&["host", "check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains('\x1b'),
        "no colour when stdout is not a terminal"
    );
    for label in [
        "/dev/kvm",
        "KVM API version",
        "KVM flavour",
        "cgroups",
        "namespaces",
        "overlayfs",
        "/dev/net/tun",
        "hugepages",
    ] {
        assert!(
            text.lines().any(|l| l.contains(label)),
            "no {label} line:\n{text}"
        );
    }
    let flavour_line = text
        .lines()
        .find(|l| l.contains("KVM flavour"))
        .unwrap_or("");
    assert!(
        flavour_line.contains(sys_module_flavour()),
        "{flavour_line}"
    );
    let verdict = text
        .lines()
        .find(|l| l.starts_with("Verdict: "))
        .unwrap_or("");
    let known = [
        "hardware virtualization (KVM with vmx/svm)",
        "KVM without vmx/svm (kvm_pvm: only custom/PVM guests; full OSes use the software CPU)",
        "software emulation only",
        "containers only",
    ];
    assert!(
        known.iter().any(|k| verdict.ends_with(k)),
        "verdict line: {verdict:?}\n{text}"
    );
}

#[test]
fn host_without_subcommand_is_a_clear_error() {
    let out = corefour(&["host"]);
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("check"), "{err}");
}
