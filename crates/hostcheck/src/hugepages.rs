//! Huge pages: the hugetlb pool (/proc/meminfo, /sys/kernel/mm/hugepages) and transparent huge pages.

use serde::Serialize;

use crate::probe::HostProbe;

/// One hugetlb page size and its pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HugePageSize {
    pub size_kib: u64,
    /// nr_hugepages: pages reserved in the pool.
    pub total: u64,
    pub free: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HugePageInfo {
    /// hugetlbfs is registered.
    pub hugetlbfs: bool,
    /// The default size (Hugepagesize in /proc/meminfo).
    pub default_size_kib: Option<u64>,
    /// Every size the kernel offers, smallest first.
    pub sizes: Vec<HugePageSize>,
    /// The selected mode of /sys/kernel/mm/transparent_hugepage/enabled ("always", "madvise", "never").
    pub transparent: Option<String>,
}

impl HugePageInfo {
    pub fn reserved_pages(&self) -> u64 {
        self.sizes.iter().map(|s| s.total).sum()
    }
}

/// Reads one `Key:   value [kB]` line from /proc/meminfo.
pub fn meminfo_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.split_whitespace().next()?.parse().ok())?
    })
}

/// "always [madvise] never" → "madvise".
pub fn selected_mode(text: &str) -> Option<String> {
    let start = text.find('[')?;
    let end = text[start..].find(']')? + start;
    Some(text[start + 1..end].to_string())
}

/// "hugepages-2048kB" → 2048.
fn dir_size_kib(name: &str) -> Option<u64> {
    name.strip_prefix("hugepages-")?
        .strip_suffix("kB")?
        .parse()
        .ok()
}

pub(crate) fn probe(host: &dyn HostProbe, filesystems: &[String]) -> HugePageInfo {
    const DIR: &str = "/sys/kernel/mm/hugepages";
    let read_u64 = |path: String| {
        host.read_file(&path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
    };
    let mut sizes: Vec<HugePageSize> = host
        .list_dir(DIR)
        .unwrap_or_default()
        .iter()
        .filter_map(|name| {
            let size_kib = dir_size_kib(name)?;
            Some(HugePageSize {
                size_kib,
                total: read_u64(format!("{DIR}/{name}/nr_hugepages")).unwrap_or(0),
                free: read_u64(format!("{DIR}/{name}/free_hugepages")).unwrap_or(0),
            })
        })
        .collect();
    sizes.sort_by_key(|s| s.size_kib);
    HugePageInfo {
        hugetlbfs: filesystems.iter().any(|f| f == "hugetlbfs"),
        default_size_kib: host
            .read_file("/proc/meminfo")
            .ok()
            .and_then(|t| meminfo_value(&t, "Hugepagesize")),
        sizes,
        transparent: host
            .read_file("/sys/kernel/mm/transparent_hugepage/enabled")
            .ok()
            .and_then(|t| selected_mode(&t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeHost;
    use crate::fixtures;

    #[test]
    fn meminfo_of_this_machine() {
        assert_eq!(
            meminfo_value(fixtures::PVM_MEMINFO, "Hugepagesize"),
            Some(2048)
        );
        assert_eq!(
            meminfo_value(fixtures::PVM_MEMINFO, "HugePages_Total"),
            Some(0)
        );
        assert_eq!(meminfo_value(fixtures::PVM_MEMINFO, "NoSuchKey"), None);
        assert_eq!(meminfo_value("Hugepagesize: x kB", "Hugepagesize"), None);
    }

    #[test]
    fn thp_mode() {
        assert_eq!(
            selected_mode("always [madvise] never\n").as_deref(),
            Some("madvise")
        );
        assert_eq!(
            selected_mode("[always] madvise never").as_deref(),
            Some("always")
        );
        assert_eq!(selected_mode("]broken["), None);
    }

    #[test]
    fn pools() {
        let host = FakeHost::pvm_amd_epyc().with_file(
            "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
            "64\n",
        );
        let info = probe(&host, &["hugetlbfs".to_string()]);
        assert!(info.hugetlbfs);
        assert_eq!(info.default_size_kib, Some(2048));
        assert_eq!(
            info.sizes.iter().map(|s| s.size_kib).collect::<Vec<_>>(),
            vec![2048, 1048576]
        );
        assert_eq!(info.reserved_pages(), 64);
        assert_eq!(info.transparent.as_deref(), Some("madvise"));
    }
}
