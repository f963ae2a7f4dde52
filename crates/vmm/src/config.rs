//! The VM description: `vm.json`, as the daemon writes it and `corefour vmm --config` reads it.
//! Command-line flags override single fields (see `corefour vmm --help`).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 64;
/// Below this there is no room for the VMM's tables, an image at 1 MiB and a stack.
pub const MIN_MEMORY_MIB: u64 = 2;
/// An upper bound that keeps page tables small and catches typos ("64G" meant as "64M").
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;
/// APIC ids are 8 bits in CPUID leaf 1 and 0xff is the broadcast id; the backend may allow fewer.
pub const MAX_VCPUS: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid VM config: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no kernel given: pass --kernel FILE or set \"kernel\" in the config")]
    NoKernel,
    #[error("invalid memory size {0:?}: use a number of MiB or a size like 64M, 1G")]
    MemorySize(String),
    #[error("memory must be between {MIN_MEMORY_MIB} MiB and {MAX_MEMORY_MIB} MiB, got {0} MiB")]
    MemoryRange(u64),
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u32),
    #[error("invalid duration {0:?}: use e.g. 30s, 500ms, 2m or a number of seconds")]
    Duration(String),
    #[error("unknown backend {0:?}: use kvm, emu or auto")]
    Backend(String),
    #[error("{0} are not supported by this VMM yet; remove them from the config")]
    NotYet(&'static str),
}

/// Which CPU backend runs the VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// KVM where /dev/kvm opens, the software CPU otherwise.
    #[default]
    Auto,
    Kvm,
    Emu,
}

impl FromStr for BackendKind {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "emu" => Ok(Self::Emu),
            other => Err(ConfigError::Backend(other.to_string())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Bypass the host page cache (O_DIRECT).
    #[serde(default)]
    pub direct: bool,
    /// virtio-blk serial (GET_ID), at most 20 bytes.
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub rate_limit: crate::virtio_devices::RateLimitConfig,
    /// The image format; absent: guessed from the file name (.qcow2, .vmdk, .vdi, .vhd,
    /// .vhdx are probed, anything else is raw). A declared format must match the contents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// How a direct raw disk's I/O runs: "uring" (absent: the default, many requests in
    /// flight) or "sync" (one at a time). Buffered disks are always synchronous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io: Option<corefour_devices::virtio::blk::IoEngine>,
}

/// `format` of a disk in vm.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
    Vmdk,
    Vdi,
    #[serde(alias = "vpc")]
    Vhd,
    Vhdx,
}

impl From<DiskFormat> for corefour_devices::virtio::blk::DiskFormat {
    fn from(f: DiskFormat) -> Self {
        use corefour_devices::virtio::blk::DiskFormat as D;
        match f {
            DiskFormat::Raw => D::Raw,
            DiskFormat::Qcow2 => D::Qcow2,
            DiskFormat::Vmdk => D::Vmdk,
            DiskFormat::Vdi => D::Vdi,
            DiskFormat::Vhd => D::Vpc,
            DiskFormat::Vhdx => D::Vhdx,
        }
    }
}

impl From<corefour_devices::virtio::blk::DiskFormat> for DiskFormat {
    fn from(f: corefour_devices::virtio::blk::DiskFormat) -> Self {
        use corefour_devices::virtio::blk::DiskFormat as D;
        match f {
            D::Raw => DiskFormat::Raw,
            D::Qcow2 => DiskFormat::Qcow2,
            D::Vmdk => DiskFormat::Vmdk,
            D::Vdi => DiskFormat::Vdi,
            D::Vpc => DiskFormat::Vhd,
            D::Vhdx => DiskFormat::Vhdx,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub tap: String,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub rx_rate_limit: crate::virtio_devices::RateLimitConfig,
    #[serde(default)]
    pub tx_rate_limit: crate::virtio_devices::RateLimitConfig,
}

/// One VM. Field names are the contract with the daemon (notes/vmm-contract.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: PathBuf,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default)]
    pub backend: BackendKind,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// virtio-rng fed from the host's getrandom.
    #[serde(default)]
    pub rng: bool,
    #[serde(default)]
    pub vsock: Option<crate::virtio_devices::VsockConfig>,
    #[serde(default)]
    pub balloon: Option<crate::virtio_devices::BalloonConfig>,
    /// How virtio devices attach: virtio-mmio windows (default) or PCI functions.
    #[serde(default)]
    pub virtio_transport: crate::virtio_devices::VirtioTransport,
}

fn default_vcpus() -> u32 {
    DEFAULT_VCPUS
}
fn default_memory() -> u64 {
    DEFAULT_MEMORY_MIB
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            cmdline: String::new(),
            initrd: None,
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            backend: BackendKind::Auto,
            timeout_secs: None,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            vsock: None,
            balloon: None,
            virtio_transport: Default::default(),
        }
    }

    pub fn from_json(text: &str, path: &Path) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Checks what can be checked without a backend (the vCPU maximum needs one).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::NoKernel);
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::MemoryRange(self.memory_mib));
        }
        Ok(())
    }

    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_secs.map(Duration::from_secs)
    }
}

/// Parses `64M`, `1G`, `512` (MiB), `65536K` into MiB. Sizes that are not whole MiB are refused.
pub fn parse_memory_mib(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::MemorySize(s.to_string());
    let t = s.trim();
    let (num, unit_kib) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1024),
        Some((i, _)) => {
            let unit = match t[i..].to_ascii_uppercase().trim_end_matches("IB") {
                "K" => 1,
                "M" => 1024,
                "G" => 1024 * 1024,
                _ => return Err(err()),
            };
            (&t[..i], unit)
        }
    };
    let n: u64 = num.parse().map_err(|_| err())?;
    let kib = n.checked_mul(unit_kib).ok_or_else(err)?;
    if kib % 1024 != 0 {
        return Err(err());
    }
    Ok(kib / 1024)
}

/// Parses `30s`, `500ms`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let err = || ConfigError::Duration(s.to_string());
    let t = s.trim();
    let split = t
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_digit() || *c == '.'))
        .map_or(t.len(), |(i, _)| i);
    let n: f64 = t[..split].parse().map_err(|_| err())?;
    let secs = match &t[split..] {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(err()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| err())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn contract_example_parses() {
        let text = r#"{ "kernel": "/g/hello.elf", "cmdline": "x=1", "initrd": null, "vcpus": 2,
            "memory_mib": 64, "backend": "kvm", "timeout_secs": null, "disks": [], "nets": [] }"#;
        let c = VmConfig::from_json(text, Path::new("vm.json")).unwrap();
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.backend, BackendKind::Kvm);
        assert_eq!(c.kernel, PathBuf::from("/g/hello.elf"));
        c.validate().unwrap();
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = VmConfig::from_json(r#"{"kernel":"k.elf"}"#, Path::new("x")).unwrap();
        assert_eq!(c, VmConfig::new("k.elf"));
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        for bad in [
            r#"{"kernel":"k","vcpu":2}"#,
            r#"{"kernel":"k","backend":"xen"}"#,
            r#"{"kernel":"k","memory_mib":-1}"#,
            r#"{"vcpus":1}"#,
            "not json",
            "",
        ] {
            let e = VmConfig::from_json(bad, Path::new("vm.json")).unwrap_err();
            assert!(e.to_string().contains("vm.json"), "{e}");
        }
    }

    #[test]
    fn validate_catches_ranges_and_unsupported_devices() {
        let mut c = VmConfig::new("k");
        c.vcpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Vcpus(0))));
        c.vcpus = 255;
        assert!(matches!(c.validate(), Err(ConfigError::Vcpus(255))));
        c.vcpus = 1;
        c.memory_mib = 1;
        assert!(matches!(c.validate(), Err(ConfigError::MemoryRange(1))));
        c.memory_mib = 64;
        c.disks.push(DiskConfig {
            path: "d.img".into(),
            read_only: false,
            direct: false,
            serial: None,
            rate_limit: Default::default(),
            format: None,
            io: None,
        });
        assert!(c.validate().is_ok(), "disks are supported (virtio-blk)");
    }

    #[test]
    fn disk_io_engine_in_json() {
        use corefour_devices::virtio::blk::IoEngine;
        let d: DiskConfig =
            serde_json::from_str(r#"{"path": "d", "direct": true, "io": "sync"}"#).unwrap();
        assert_eq!(d.io, Some(IoEngine::Sync));
        let d: DiskConfig = serde_json::from_str(r#"{"path": "d", "direct": true}"#).unwrap();
        assert_eq!(d.io, None, "absent: the default engine");
        assert!(!serde_json::to_string(&d).unwrap().contains("\"io\""));
        assert!(serde_json::from_str::<DiskConfig>(r#"{"path": "d", "io": "aio"}"#).is_err());
    }

    #[test]
    fn disk_format_in_json() {
        let d: DiskConfig = serde_json::from_str(r#"{"path": "d.vhd", "format": "vhd"}"#).unwrap();
        assert_eq!(d.format, Some(DiskFormat::Vhd));
        let d: DiskConfig = serde_json::from_str(r#"{"path": "d", "format": "vpc"}"#).unwrap();
        assert_eq!(d.format, Some(DiskFormat::Vhd));
        let d: DiskConfig = serde_json::from_str(r#"{"path": "d"}"#).unwrap();
        assert_eq!(d.format, None);
        assert!(!serde_json::to_string(&d).unwrap().contains("format"));
        let e = serde_json::from_str::<DiskConfig>(r#"{"path": "d", "format": "iso"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `iso`"), "{e}");
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_mib("64M").unwrap(), 64);
        assert_eq!(parse_memory_mib("64").unwrap(), 64);
        assert_eq!(parse_memory_mib("1G").unwrap(), 1024);
        assert_eq!(parse_memory_mib("2GiB").unwrap(), 2048);
        assert_eq!(parse_memory_mib("4096k").unwrap(), 4);
        for bad in [
            "",
            "M",
            "1.5G",
            "100K",
            "-1M",
            "12X",
            "99999999999999999999G",
        ] {
            assert!(parse_memory_mib(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        for bad in ["", "s", "-1s", "1d", "1e400"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn config_parser_never_panics(s in ".{0,200}") {
            let _ = VmConfig::from_json(&s, Path::new("x"));
            let _ = parse_memory_mib(&s);
            let _ = parse_duration(&s);
        }
    }
}
