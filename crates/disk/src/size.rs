//! Sizes as qemu-img writes them: `10G`, `512M`, `4096`, `1.5T`, `+2G` (relative, for resize).

use crate::{DiskError, Result};

/// Parses a size with an optional K/M/G/T/P/E suffix (powers of 1024; a trailing `B`/`iB` is
/// allowed). A bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let bad = || DiskError::Invalid(format!("invalid size '{s}' (examples: 4096, 512M, 10G)"));
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, mult): (&str, u64) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 1 << 10),
        Some('m') => (&stripped[..stripped.len() - 1], 1 << 20),
        Some('g') => (&stripped[..stripped.len() - 1], 1 << 30),
        Some('t') => (&stripped[..stripped.len() - 1], 1 << 40),
        Some('p') => (&stripped[..stripped.len() - 1], 1 << 50),
        Some('e') => (&stripped[..stripped.len() - 1], 1 << 60),
        Some(c) if c.is_ascii_digit() => (stripped, 1),
        _ => return Err(bad()),
    };
    if num.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    if !f.is_finite() || f < 0.0 || f * mult as f64 >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok((f * mult as f64) as u64)
}

/// Human form for messages: `1.5 GiB`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.3} {}", UNITS[u]).replace(".000 ", " ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert!(parse_size("x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999E").is_err());
        assert_eq!(human(64 << 20), "64 MiB");
    }
}
