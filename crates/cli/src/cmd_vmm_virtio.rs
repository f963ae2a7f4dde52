//! The virtio flags of `corefour vmm` (--disk, --net, --rng, --vsock, --balloon), applied on
//! top of vm.json like the other flags.

use corefour_devices::virtio::blk::BlockConfig;
use corefour_devices::virtio::net::NetConfig as DevNetConfig;
use corefour_devices::virtio::vsock::VsockConfig as DevVsockConfig;
use corefour_vmm::config::{DiskConfig, NetConfig};
use corefour_vmm::virtio_devices::{BalloonConfig, VsockConfig};
use corefour_vmm::VmConfig;

#[derive(clap::Args, Default)]
pub struct VirtioArgs {
    /// Add a virtio-blk disk: [path=]FILE[,format=raw|qcow2|vmdk|vdi|vhd|vhdx][,ro][,direct]
    /// [,io=uring|sync][,serial=S][,bytes=N][,bytes_burst=N][,ops=N][,ops_burst=N] (rates per
    /// second; sizes take K/M/G). Without format= only .qcow2/.vmdk/.vdi/.vhd/.vhdx names are
    /// probed; a declared format must match the file. A direct raw disk keeps all the guest's
    /// requests in flight through io_uring (io=sync: one at a time). Repeatable.
    #[arg(long, value_name = "FILE[,OPTS]")]
    disk: Vec<String>,
    /// Add a virtio-net interface on tap TAP (created if missing): TAP[,mac=aa:bb:cc:dd:ee:ff]
    /// [,rx_bytes=N][,tx_bytes=N][,rx_ops=N][,tx_ops=N] (and their _burst). Repeatable.
    #[arg(long, value_name = "TAP[,OPTS]")]
    net: Vec<String>,
    /// Add a virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// Add a virtio-vsock device: CID,UDS_PATH (host connects to UDS_PATH and sends
    /// "CONNECT <port>\n"; guest connections to port P reach UDS_PATH_P).
    #[arg(long, value_name = "CID,UDS_PATH")]
    vsock: Option<String>,
    /// Add a virtio-balloon device with this initial target size in MiB (0: deflated).
    #[arg(long, value_name = "MIB", num_args = 0..=1, default_missing_value = "0")]
    balloon: Option<u64>,
    /// How virtio devices attach: mmio (virtio-mmio windows, announced on the kernel command
    /// line) or pci (PCI functions behind a host bridge, found by enumeration).
    #[arg(long, value_name = "mmio|pci")]
    virtio_transport: Option<String>,
}

impl VirtioArgs {
    pub fn apply(&self, c: &mut VmConfig) -> anyhow::Result<()> {
        for d in &self.disk {
            let b = BlockConfig::parse(d).map_err(|e| anyhow::anyhow!("--disk {d}: {e}"))?;
            c.disks.push(DiskConfig {
                path: b.path,
                read_only: b.read_only,
                direct: b.direct,
                serial: b.serial,
                rate_limit: b.rate_limit.into(),
                format: b.format.map(Into::into),
                io: Some(b.io).filter(|&e| e != Default::default()),
            });
        }
        for n in &self.net {
            let p = DevNetConfig::parse(n).map_err(|e| anyhow::anyhow!("--net {n}: {e}"))?;
            c.nets.push(NetConfig {
                tap: p.tap,
                mac: p.mac.map(|m| {
                    m.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                }),
                rx_rate_limit: p.rx_limit.into(),
                tx_rate_limit: p.tx_limit.into(),
            });
        }
        if self.rng {
            c.rng = true;
        }
        if let Some(v) = &self.vsock {
            let p = DevVsockConfig::parse(v).map_err(|e| anyhow::anyhow!("--vsock: {e}"))?;
            c.vsock = Some(VsockConfig {
                cid: p.cid,
                uds_path: p.uds_path,
            });
        }
        if let Some(t) = &self.virtio_transport {
            c.virtio_transport = t.parse().map_err(|e: String| anyhow::anyhow!("{e}"))?;
        }
        if let Some(mib) = self.balloon {
            c.balloon = Some(BalloonConfig {
                target_mib: mib,
                stats_interval_secs: Some(5),
            });
        }
        Ok(())
    }
}
