//! The VM's virtio devices, in this order: disks, nets, rng, vsock, balloon; one GSI each from
//! `VIRTIO_GSIS`.
//! - `mmio` (default): each behind a virtio-mmio window (Firecracker style) from
//!   `VIRTIO_MMIO_BASE` upwards, edge-triggered on its GSI. Linux learns of them from the
//!   DSDT (`LNRO0005` devices, see `acpi_devices`; what a distro kernel without
//!   CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES needs) and from `virtio_mmio.device=4K@<base>:<gsi>`
//!   entries this module appends to the command line (for kernels without ACPI; a kernel with
//!   both finds each window twice and the second probe fails with EBUSY, harmlessly). The
//!   test guests scan the windows.
//! - `pci`: PCI functions 00:01.0 onwards behind a host bridge (ports 0xcf8/0xcfc, `\_SB.PCI0`
//!   in the DSDT with a `_PRT`), BARs pre-assigned in `PCI_BAR_WINDOW`. MSI-X (one vector per
//!   queue plus config) sent through `Vm::signal_msi`; legacy INTx on the same GSIs when the
//!   driver leaves MSI-X off. Found by enumeration.
//!
//! Queue notifications reach the device worker through an ioeventfd and virtio-mmio interrupts
//! go out through an irqfd where the backend has them (`virtio_eventfd`); otherwise through
//! the MMIO exit (the transport writes the queue's eventfd) and `Vm::set_irq_line`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use corefour_devices::virtio::balloon::{Balloon, BalloonHandle};
use corefour_devices::virtio::blk::{Block, BlockConfig, BlockError};
use corefour_devices::virtio::mmio::MMIO_SIZE;
use corefour_devices::virtio::net::{parse_mac, Net, NetConfig as DevNetConfig};
use corefour_devices::virtio::pci::{
    PciBarWindow, PciRoot, VirtioPciDevice, CONFIG_ADDRESS_PORT, CONFIG_PORTS_LEN,
};
use corefour_devices::virtio::rate_limiter::RateLimit;
use corefour_devices::virtio::rng::Rng;
use corefour_devices::virtio::state::SaveRestore;
use corefour_devices::virtio::tap::TapError;
use corefour_devices::virtio::vsock::{Vsock, VsockConfig as DevVsockConfig};
use corefour_devices::virtio::{MmioTransport, VirtioDevice};
use corefour_devices::IrqLine;
use corefour_hypervisor::Vm;
use serde::{Deserialize, Serialize};

use crate::acpi::{AcpiDevices, PciHostBridge};
use crate::config::VmConfig;
use crate::machine::BusEntry;
use crate::memory::GuestMem;
use crate::virtio_eventfd::{IoeventMover, MsiRouter, Resampler, SignalMsi, VirtioCounters};

pub const VIRTIO_MMIO_BASE: u64 = 0xd100_0000;
/// The IOAPIC pins the devices take, in device order: 5..=23 without the ones the platform
/// owns (COM1 has 4, the CMOS RTC 8, the ACPI SCI 9, the PS/2 mouse 12): a Linux guest
/// refuses to share an edge-triggered line with the RTC's ("genirq: Flags mismatch").
/// guests/virtio/virtio.c keeps the same table.
pub const VIRTIO_GSIS: [u32; 15] = [5, 6, 7, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22];
pub const MAX_VIRTIO_DEVICES: usize = VIRTIO_GSIS.len();
/// Where PCI BARs live (inside the MMIO hole, clear of the VMM's own pages).
pub const PCI_BAR_WINDOW: (u64, u64) = (0xe000_0000, 0x100_0000);

/// How virtio devices attach to the machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VirtioTransport {
    #[default]
    Mmio,
    Pci,
}

impl std::str::FromStr for VirtioTransport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mmio" => Ok(Self::Mmio),
            "pci" => Ok(Self::Pci),
            other => Err(format!(
                "unknown virtio transport {other:?}: use mmio or pci"
            )),
        }
    }
}

/// A token-bucket limit as it appears in vm.json (0 = unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    #[serde(default)]
    pub bytes_per_sec: u64,
    #[serde(default)]
    pub bytes_burst: u64,
    #[serde(default)]
    pub ops_per_sec: u64,
    #[serde(default)]
    pub ops_burst: u64,
}

impl From<RateLimitConfig> for RateLimit {
    fn from(r: RateLimitConfig) -> Self {
        RateLimit {
            bytes_per_sec: r.bytes_per_sec,
            bytes_burst: r.bytes_burst,
            ops_per_sec: r.ops_per_sec,
            ops_burst: r.ops_burst,
        }
    }
}

impl From<RateLimit> for RateLimitConfig {
    fn from(r: RateLimit) -> Self {
        RateLimitConfig {
            bytes_per_sec: r.bytes_per_sec,
            bytes_burst: r.bytes_burst,
            ops_per_sec: r.ops_per_sec,
            ops_burst: r.ops_burst,
        }
    }
}

/// virtio-vsock: the guest's CID and the host Unix socket (Firecracker's convention).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub cid: u64,
    pub uds_path: PathBuf,
}

/// virtio-balloon: the initial target and how often to refresh guest statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    #[serde(default)]
    pub target_mib: u64,
    #[serde(default)]
    pub stats_interval_secs: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum VirtioSetupError {
    #[error("too many virtio devices: {0} (at most {MAX_VIRTIO_DEVICES})")]
    TooMany(usize),
    #[error("disk {index}: {source}")]
    Disk {
        index: usize,
        #[source]
        source: BlockError,
    },
    #[error("network interface {index}: {source}")]
    Net {
        index: usize,
        #[source]
        source: TapError,
    },
    #[error("network interface {index}: bad MAC {mac:?}, want aa:bb:cc:dd:ee:ff")]
    Mac { index: usize, mac: String },
    #[error("vsock CID {0} is reserved (use 3 or above)")]
    VsockCid(u64),
    #[error("cannot set up the {kind} transport: {source}")]
    Transport {
        kind: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What `create` built: entries for the two buses, and host handles.
#[derive(Default)]
pub struct VirtioDevices {
    pub mmio: Vec<BusEntry>,
    pub pio: Vec<BusEntry>,
    /// (kind, base or PCI slot, gsi), for logs and tests.
    pub placed: Vec<(&'static str, u64, u32)>,
    pub balloon: Option<BalloonHandle>,
    /// Which notifications and interrupts skip the VMM's vCPU exit handling.
    pub eventfds: crate::virtio_eventfd::EventfdUse,
    /// Every device's transport, in creation order: what snapshots save and restore.
    pub saveable: Vec<Arc<dyn SaveRestore>>,
    /// What the interrupt and notify paths did (MSI-X by irqfd or ioctl, resamples, BAR
    /// moves), and the PCI functions whose notify exits count.
    pub stats: VirtioStats,
}

/// Run-time counters of the virtio devices (`corefour vmm --stats`).
#[derive(Default, Clone)]
pub struct VirtioStats {
    pub counters: Arc<VirtioCounters>,
    pub pci: Vec<Arc<VirtioPciDevice>>,
}

impl VirtioStats {
    pub fn describe(&self) -> String {
        let exits = self.pci.iter().map(|d| d.notify_exits()).sum();
        self.counters.describe(exits)
    }
}

fn count(config: &VmConfig) -> usize {
    config.disks.len()
        + config.nets.len()
        + usize::from(config.rng)
        + usize::from(config.vsock.is_some())
        + usize::from(config.balloon.is_some())
}

/// Appends one `virtio_mmio.device=` entry per device to the command line (for Linux).
pub fn add_to_cmdline(mut config: VmConfig) -> VmConfig {
    if config.virtio_transport == VirtioTransport::Pci {
        return config;
    }
    for i in 0..count(&config) {
        let (base, gsi) = slot(i);
        if !config.cmdline.is_empty() {
            config.cmdline.push(' ');
        }
        config
            .cmdline
            .push_str(&format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
    }
    config
}

/// What the DSDT says about the virtio devices `create` will build for `config`: the mmio
/// windows as `LNRO0005` devices, or the PCI host bridge with each slot's INTA# GSI.
pub fn acpi_devices(config: &VmConfig) -> AcpiDevices {
    let n = count(config).min(MAX_VIRTIO_DEVICES);
    match config.virtio_transport {
        // The host bridge is always there (with no functions behind it here), so a kernel
        // finds PCI config access instead of complaining that it has none.
        VirtioTransport::Mmio => AcpiDevices {
            virtio_mmio: (0..n).map(slot).collect(),
            pci: Some(PciHostBridge {
                mem_window: PCI_BAR_WINDOW,
                intx: Vec::new(),
            }),
        },
        VirtioTransport::Pci => AcpiDevices {
            virtio_mmio: Vec::new(),
            pci: Some(PciHostBridge {
                mem_window: PCI_BAR_WINDOW,
                // PciRoot::add_virtio puts device i in slot i + 1 (the host bridge is slot 0).
                intx: (0..n).map(|i| ((i + 1) as u8, slot(i).1)).collect(),
            }),
        },
    }
}

fn slot(i: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + i as u64 * MMIO_SIZE,
        VIRTIO_GSIS[i.min(MAX_VIRTIO_DEVICES - 1)],
    )
}

/// An edge on a GSI of the backend's interrupt controller. A backend without one (software
/// CPU without an IOAPIC yet) drops it; the test guests poll.
struct GsiEdge {
    vm: Arc<dyn Vm>,
    gsi: u32,
}

impl IrqLine for GsiEdge {
    fn trigger(&self) {
        let _ = self.vm.set_irq_line(self.gsi, true);
        let _ = self.vm.set_irq_line(self.gsi, false);
    }
    fn set_level(&self, level: bool) {
        let _ = self.vm.set_irq_line(self.gsi, level);
    }
}

/// Opens every backend (disk files, taps, sockets) and wraps each device in its transport.
pub fn create(
    config: &VmConfig,
    mem: &GuestMem,
    vm: &Arc<dyn Vm>,
) -> Result<VirtioDevices, VirtioSetupError> {
    let n = count(config);
    if n > MAX_VIRTIO_DEVICES {
        return Err(VirtioSetupError::TooMany(n));
    }
    let mut devs: Vec<(&'static str, Box<dyn VirtioDevice>)> = Vec::new();
    for (index, d) in config.disks.iter().enumerate() {
        let blk = Block::new(&BlockConfig {
            path: d.path.clone(),
            read_only: d.read_only,
            direct: d.direct,
            serial: d.serial.clone(),
            rate_limit: d.rate_limit.into(),
            format: d.format.map(Into::into),
            io: d.io.unwrap_or_default(),
        })
        .map_err(|source| VirtioSetupError::Disk { index, source })?;
        devs.push(("blk", Box::new(blk)));
    }
    for (index, n) in config.nets.iter().enumerate() {
        let mac = match &n.mac {
            Some(m) => Some(parse_mac(m).ok_or_else(|| VirtioSetupError::Mac {
                index,
                mac: m.clone(),
            })?),
            None => None,
        };
        let net = Net::new(&DevNetConfig {
            tap: n.tap.clone(),
            mac,
            rx_limit: n.rx_rate_limit.into(),
            tx_limit: n.tx_rate_limit.into(),
        })
        .map_err(|source| VirtioSetupError::Net { index, source })?;
        devs.push(("net", Box::new(net)));
    }
    if config.rng {
        devs.push(("rng", Box::new(Rng::new())));
    }
    if let Some(v) = &config.vsock {
        if v.cid < 3 || v.cid >= u64::from(u32::MAX) {
            return Err(VirtioSetupError::VsockCid(v.cid));
        }
        devs.push((
            "vsock",
            Box::new(Vsock::new(DevVsockConfig {
                cid: v.cid,
                uds_path: v.uds_path.clone(),
            })),
        ));
    }
    let mut out = VirtioDevices::default();
    if let Some(b) = &config.balloon {
        let pages = u32::try_from(b.target_mib.saturating_mul(256)).unwrap_or(u32::MAX);
        let balloon = Balloon::new(pages, b.stats_interval_secs.map(Duration::from_secs));
        out.balloon = Some(balloon.handle());
        devs.push(("balloon", Box::new(balloon)));
    }
    let counters = out.stats.counters.clone();
    let pci = config.virtio_transport == VirtioTransport::Pci;
    // The host bridge answers config cycles whatever the transport (see `acpi_devices`).
    let mut root = PciRoot::new(PCI_BAR_WINDOW.0, PCI_BAR_WINDOW.1);
    // On KVM each MSI-X vector gets a GSI route and an irqfd (`MsiRouter`); elsewhere the
    // messages go through `Vm::signal_msi`. INTx is a level with a resamplefd where the
    // backend has one, else `set_irq_line`.
    let router = if pci && n > 0 {
        MsiRouter::probe(vm, counters.clone())
    } else {
        None
    };
    // Resampled irqfds need the same in-kernel irqchip as MSI routes: no thread elsewhere.
    let resampler = if router.is_some() {
        Resampler::new(counters.clone()).ok()
    } else {
        None
    };
    let mover = Arc::new(IoeventMover {
        vm: vm.clone(),
        window: PCI_BAR_WINDOW,
        counters: counters.clone(),
    });
    for (i, (kind, dev)) in devs.into_iter().enumerate() {
        let (base, gsi) = slot(i);
        let line: Arc<dyn IrqLine> = Arc::new(GsiEdge {
            vm: vm.clone(),
            gsi,
        });
        let err = |source| VirtioSetupError::Transport { kind, source };
        if pci {
            let sink = match &router {
                Some(r) => {
                    r.function_sink(dev.queue_max_sizes().len() as u16 + 1, &mut out.eventfds)
                }
                None => Arc::new(SignalMsi {
                    vm: vm.clone(),
                    counters: counters.clone(),
                }),
            };
            let resampled = resampler
                .as_ref()
                .and_then(|r| r.line(vm.as_ref(), gsi, &mut out.eventfds));
            let (line, isr) = match resampled {
                Some((l, isr)) => (l, Some(isr)),
                None => (line, None),
            };
            // GSIs 5..23 fit the u8 interrupt-line register.
            let (pci_slot, pci_dev) = root
                .add_virtio_with_msi(dev, mem.clone(), line, gsi as u8, Some(sink))
                .map_err(err)?;
            if let Some(isr) = isr {
                let _ = isr.set(Arc::downgrade(pci_dev.interrupt()));
            }
            crate::virtio_eventfd::register_pci_notify(
                vm.as_ref(),
                &pci_dev.notify_events(),
                &mut out.eventfds,
            );
            pci_dev.set_bar_listener(mover.clone());
            out.stats.pci.push(pci_dev.clone());
            out.saveable.push(pci_dev);
            out.placed.push((kind, pci_slot as u64, gsi));
        } else {
            // virtio-mmio interrupts are edges: an irqfd carries them as they are.
            let line = crate::virtio_eventfd::edge_irqfd(vm.as_ref(), gsi, &mut out.eventfds)
                .unwrap_or(line);
            let transport = Arc::new(MmioTransport::new(dev, mem.clone(), line).map_err(err)?);
            crate::virtio_eventfd::register_mmio_notify(
                vm.as_ref(),
                base,
                transport.queue_events(),
                &mut out.eventfds,
            );
            out.saveable.push(transport.clone());
            out.mmio.push((transport, base, MMIO_SIZE));
            out.placed.push((kind, base, gsi));
        }
    }
    let root = Arc::new(root);
    out.pio
        .push((root.clone(), CONFIG_ADDRESS_PORT, CONFIG_PORTS_LEN));
    if root.has_functions() {
        out.mmio.push((
            Arc::new(PciBarWindow::new(root)),
            PCI_BAR_WINDOW.0,
            PCI_BAR_WINDOW.1,
        ));
    }
    Ok(out)
}

/// The balloon's API resource: `GET /balloon` reports it, `PUT /balloon?target_mib=N` sets the
/// target (the guest driver then inflates or deflates). Returns (HTTP status, JSON body).
pub fn balloon_api(
    handle: Option<&BalloonHandle>,
    method: &str,
    query: &str,
) -> (u16, Option<String>) {
    let fault = |status, msg: String| {
        (
            status,
            Some(serde_json::json!({ "fault_message": msg }).to_string()),
        )
    };
    let Some(h) = handle else {
        return fault(
            404,
            "this VM has no balloon (start it with --balloon)".into(),
        );
    };
    match method {
        "GET" => {
            let s = h.status();
            let stats: serde_json::Map<String, serde_json::Value> = s
                .stats
                .iter()
                .map(|(tag, v)| (stat_name(*tag), serde_json::Value::from(*v)))
                .collect();
            let body = serde_json::json!({
                "target_mib": u64::from(s.target_pages) / 256,
                "actual_mib": u64::from(s.actual_pages) / 256,
                "inflated_mib": s.inflated_pages / 256,
                "stats": stats,
            });
            (200, Some(body.to_string()))
        }
        "PUT" => {
            let target = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("target_mib="))
                .and_then(|v| v.parse::<u64>().ok());
            match target {
                Some(mib) => match u32::try_from(mib.saturating_mul(256)) {
                    Ok(pages) => {
                        h.set_target_pages(pages);
                        (204, None)
                    }
                    Err(_) => fault(400, format!("target_mib={mib} is too large")),
                },
                None => fault(400, "want PUT /balloon?target_mib=N".into()),
            }
        }
        other => fault(400, format!("{other} is not allowed on /balloon")),
    }
}

/// Statistic tags of the virtio spec (5.5.6.3).
fn stat_name(tag: u16) -> String {
    match tag {
        0 => "swap_in",
        1 => "swap_out",
        2 => "major_faults",
        3 => "minor_faults",
        4 => "free_memory",
        5 => "total_memory",
        6 => "available_memory",
        7 => "disk_caches",
        8 => "hugetlb_allocations",
        9 => "hugetlb_failures",
        _ => return format!("tag_{tag}"),
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_lists_each_device_window() {
        let mut c = VmConfig::new("k");
        c.cmdline = "console=ttyS0".into();
        c.rng = true;
        c.balloon = Some(BalloonConfig::default());
        let c = add_to_cmdline(c);
        assert_eq!(
            c.cmdline,
            "console=ttyS0 virtio_mmio.device=4K@0xd1000000:5 virtio_mmio.device=4K@0xd1001000:6"
        );
        let mut p = VmConfig::new("k");
        p.rng = true;
        p.virtio_transport = VirtioTransport::Pci;
        assert_eq!(
            add_to_cmdline(p).cmdline,
            "",
            "PCI devices are found by enumeration"
        );
    }

    #[test]
    fn acpi_describes_the_devices_create_builds() {
        let mut c = VmConfig::new("k");
        c.rng = true;
        c.balloon = Some(BalloonConfig::default());
        let a = acpi_devices(&c);
        assert_eq!(a.virtio_mmio, vec![(0xd100_0000, 5), (0xd100_1000, 6)]);
        let bridge = a.pci.expect("a host bridge with the mmio transport too");
        assert!(bridge.intx.is_empty(), "no PCI functions behind it");
        c.virtio_transport = VirtioTransport::Pci;
        let a = acpi_devices(&c);
        assert!(a.virtio_mmio.is_empty());
        let pci = a.pci.expect("a PCI root bridge");
        assert_eq!(pci.mem_window, PCI_BAR_WINDOW);
        // Slot 0 is the host bridge; devices follow in creation order with their GSIs.
        assert_eq!(pci.intx, vec![(1, 5), (2, 6)]);
        assert!(acpi_devices(&VmConfig::new("k")).virtio_mmio.is_empty());
    }

    #[test]
    fn balloon_api_sets_and_reports_the_target() {
        assert_eq!(balloon_api(None, "GET", "").0, 404);
        let b = Balloon::new(256, None);
        let h = b.handle();
        let (st, body) = balloon_api(Some(&h), "GET", "");
        assert_eq!(st, 200);
        assert!(body.unwrap_or_default().contains("\"target_mib\":1"));
        assert_eq!(balloon_api(Some(&h), "PUT", "target_mib=64").0, 204);
        assert_eq!(h.status().target_pages, 64 * 256);
        assert_eq!(balloon_api(Some(&h), "PUT", "target_mib=x").0, 400);
        assert_eq!(
            balloon_api(Some(&h), "PUT", "target_mib=99999999999").0,
            400
        );
        assert_eq!(balloon_api(Some(&h), "POST", "").0, 400);
    }
}
