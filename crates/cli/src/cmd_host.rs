//! `corefour host check [--json]`: can this host virtualize, and how.

use std::io::{IsTerminal, Write};

use anyhow::Context;
use clap::Subcommand;
use corefour_hostcheck::{Check, HostReport, Status};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: HostCommand,
}

#[derive(Subcommand)]
enum HostCommand {
    /// Check CPU virtualization, KVM, cgroups, namespaces, overlayfs, tun and huge pages.
    ///
    /// Exits 0 when some VM backend can run here (KVM or the software CPU), 1 otherwise.
    Check {
        /// Print the report as JSON (stable document; see `schema_version`).
        #[arg(long)]
        json: bool,
    },
}

/// Returns the process exit code.
pub fn run(args: Args) -> anyhow::Result<i32> {
    match args.command {
        HostCommand::Check { json } => check(json),
    }
}

fn check(json: bool) -> anyhow::Result<i32> {
    let report = corefour_hostcheck::check_host();
    let stdout = std::io::stdout();
    let colour = stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let mut out = stdout.lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &report).context("writing the JSON report")?;
        writeln!(out)?;
    } else {
        out.write_all(render(&report, colour).as_bytes())?;
    }
    out.flush().context("writing the report")?;
    Ok(report.exit_code())
}

fn group_title(group: &str) -> &str {
    match group {
        "cpu" => "CPU",
        "kvm" => "KVM",
        "kvm_caps" => "KVM capabilities",
        "containers" => "Containers and networking",
        "memory" => "Memory",
        other => other,
    }
}

fn paint(text: &str, code: &str, colour: bool) -> String {
    if colour {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

fn status_cell(status: Status, colour: bool) -> String {
    let (text, code) = match status {
        Status::Pass => ("PASS", "32"),
        Status::Warn => ("WARN", "33"),
        Status::Fail => ("FAIL", "31;1"),
    };
    paint(text, code, colour)
}

/// The human table: one aligned row per check, grouped, then the verdict.
fn render(r: &HostReport, colour: bool) -> String {
    let width = |f: fn(&Check) -> &str| {
        r.checks
            .iter()
            .map(|c| f(c).chars().count())
            .max()
            .unwrap_or(0)
    };
    let label_w = width(|c| &c.label).max("CHECK".len());
    let value_w = width(|c| &c.value).max("FOUND".len());
    let mut s = String::new();
    s.push_str(&format!(
        "corefour host check: Linux {} on {}\n\n",
        r.kernel.as_deref().unwrap_or("(unknown kernel)"),
        r.arch
    ));
    s.push_str(&paint(
        &format!(
            "{:<6}{:<label_w$}  {:<value_w$}  WHY / WHAT TO DO",
            "", "CHECK", "FOUND"
        ),
        "1",
        colour,
    ));
    s.push('\n');
    let mut group = "";
    for c in &r.checks {
        if c.group != group {
            group = c.group;
            s.push_str(&paint(&format!("-- {}", group_title(group)), "1", colour));
            s.push('\n');
        }
        s.push_str(&format!(
            "{}  {:<label_w$}  {:<value_w$}  {}\n",
            status_cell(c.status, colour),
            c.label,
            c.value,
            c.detail
        ));
    }
    let v = &r.verdict;
    let verdict_code = match v.id {
        corefour_hostcheck::Verdict::HardwareVirtualization => "32;1",
        corefour_hostcheck::Verdict::ContainersOnly => "31;1",
        _ => "33;1",
    };
    s.push('\n');
    s.push_str(&format!(
        "{} pass, {} warn, {} fail\n",
        r.counts.pass, r.counts.warn, r.counts.fail
    ));
    s.push_str(&format!(
        "Verdict: {}\n",
        paint(v.summary, verdict_code, colour)
    ));
    let backends = if v.backends.is_empty() {
        "none".to_string()
    } else {
        v.backends
            .iter()
            .map(|b| match *b {
                "kvm" if v.id == corefour_hostcheck::Verdict::KvmWithoutVmxSvm => {
                    "kvm (custom/PVM guests)"
                }
                "kvm" => "kvm",
                "emu" => "emu (software CPU, any guest)",
                other => other,
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    s.push_str(&format!("VM backends: {backends}\n"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use corefour_hostcheck::RealHost;

    #[test]
    fn table_is_aligned_and_plain_without_colour() {
        let r = HostReport::probe(&RealHost, true);
        let text = render(&r, false);
        assert!(!text.contains('\x1b'));
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("PASS") || l.starts_with("WARN") || l.starts_with("FAIL"))
            .collect();
        assert_eq!(rows.len(), r.checks.len());
        // The FOUND column starts at the same offset on every row.
        let offsets: Vec<usize> = r
            .checks
            .iter()
            .zip(&rows)
            .map(|(c, row)| row.find(&format!("  {}  ", c.value)).unwrap_or(usize::MAX))
            .collect();
        assert!(
            offsets.windows(2).all(|w| w[0] == w[1]),
            "{offsets:?}\n{text}"
        );
        assert!(text.contains("Verdict: "));
        let coloured = render(&r, true);
        assert!(coloured.contains("\x1b[32m") || coloured.contains("\x1b[33m"));
    }
}
