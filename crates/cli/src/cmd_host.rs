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

/// Values wider than this wrap onto continuation lines, so one long list (cgroup controllers) does
/// not push every row's explanation off the screen.
const FOUND_MAX: usize = 36;

/// Splits at spaces into lines of at most `width` characters (a longer word stays whole).
fn wrap_words(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    for word in text.split(' ') {
        if !current.is_empty() && current.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(word);
    }
    lines.push(current);
    lines
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
    let value_w = width(|c| &c.value).clamp("FOUND".len(), FOUND_MAX);
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
        let value = wrap_words(&c.value, value_w);
        let first = value.first().map_or("", String::as_str);
        s.push_str(&format!(
            "{}  {:<label_w$}  {:<value_w$}  {}\n",
            status_cell(c.status, colour),
            c.label,
            first,
            c.detail
        ));
        for more in value.iter().skip(1) {
            s.push_str(&format!("{:<6}{:<label_w$}  {more}\n", "", ""));
        }
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
    fn wrapping() {
        assert_eq!(wrap_words("a bb ccc dddd", 6), vec!["a bb", "ccc", "dddd"]);
        assert_eq!(
            wrap_words("averyveryverylongword x", 4),
            vec!["averyveryverylongword", "x"]
        );
        assert_eq!(wrap_words("", 4), vec![""]);
    }

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
        // The explanation starts at the same column on every row.
        let offsets: Vec<usize> = r
            .checks
            .iter()
            .zip(&rows)
            .map(|(c, row)| row.find(&c.detail).unwrap_or(usize::MAX))
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
