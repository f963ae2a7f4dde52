//! Filesystems the kernel has registered (/proc/filesystems).

/// Parses /proc/filesystems: one filesystem per line, optionally preceded by "nodev".
pub fn parse_filesystems(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.split_whitespace().last())
        .filter(|name| *name != "nodev")
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    #[test]
    fn this_machine_has_overlay_and_hugetlbfs() {
        let fs = parse_filesystems(fixtures::PVM_FILESYSTEMS);
        for want in ["overlay", "hugetlbfs", "cgroup2", "ext4", "tmpfs"] {
            assert!(fs.iter().any(|f| f == want), "{want} missing from {fs:?}");
        }
        assert_eq!(fs.len(), 31);
    }

    #[test]
    fn without_overlay() {
        let fs = parse_filesystems(fixtures::NO_VIRT_FILESYSTEMS);
        assert!(!fs.iter().any(|f| f == "overlay"));
        assert!(fs.iter().any(|f| f == "ext4"));
        assert!(parse_filesystems("\n  \nnodev\n").is_empty());
    }
}
