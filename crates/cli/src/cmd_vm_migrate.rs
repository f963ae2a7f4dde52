//! `corefour vm migrate NAME --to HOST[:PORT]`: live migration through the daemons.

use std::io::IsTerminal;
use std::time::Duration;

use crate::cmd_vm::{encode, hyper_method, Api};

pub(crate) fn migrate(
    api: &Api,
    name: &str,
    to: &str,
    max_downtime: &str,
    copy_storage: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let downtime = corefour_vmm::config::parse_duration(max_downtime)?;
    let body = serde_json::to_vec(&serde_json::json!({
        "to": to,
        "max_downtime_ms": u64::try_from(downtime.as_millis()).unwrap_or(u64::MAX),
        "copy_storage": copy_storage,
    }))?;
    // One request that returns when the guest runs on the target (or stays here); a spinner
    // on a terminal meanwhile.
    let spinner = if std::io::stderr().is_terminal() && !json {
        let s = indicatif::ProgressBar::new_spinner();
        s.set_message(format!("migrating {name} to {to}"));
        s.enable_steady_tick(Duration::from_millis(100));
        s
    } else {
        indicatif::ProgressBar::hidden()
    };
    let r: anyhow::Result<serde_json::Value> = api.call(
        hyper_method::Method::POST,
        &format!("/v1/vms/{}/migrate", encode(name)),
        Some(body),
    );
    spinner.finish_and_clear();
    let r = r?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(0);
    }
    let vmm = &r["vmm"];
    println!(
        "{name}: migrated to {} in {:.0} ms (downtime {:.2} ms, {} pre-copy rounds, {} pages)",
        r["to"].as_str().unwrap_or(to),
        r["total_ms"].as_f64().unwrap_or(0.0),
        vmm["downtime_ms"].as_f64().unwrap_or(0.0),
        vmm["rounds"],
        vmm["pages_sent"]
    );
    if let Some(s) = r.get("storage") {
        println!(
            "{name}: mirrored {} disk(s), {} MiB ({} MiB sent; first pass {:.0} ms while the \
             guest ran); the guest was paused {:.2} ms",
            s["disks"],
            s["bytes"].as_u64().unwrap_or(0) >> 20,
            s["bytes_sent"].as_u64().unwrap_or(0) >> 20,
            s["first_pass_ms"].as_f64().unwrap_or(0.0),
            s["guest_paused_ms"].as_f64().unwrap_or(0.0)
        );
    }
    if r["target_confirmed"] != true {
        eprintln!(
            "corefour: warning: the guest runs on the target, but its daemon did not confirm \
             the registration: check `corefour vm list` there"
        );
    }
    Ok(0)
}
