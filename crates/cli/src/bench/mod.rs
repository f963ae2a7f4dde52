//! `corefour bench TARGET`: each benchmark prints a table with its peer or baseline measured in the
//! same run, and the ratio.

mod disk;
mod io;
mod io_net;

use clap::Subcommand;

mod ct;
mod ct_lifecycle;
mod emu;
mod lifecycle;
// The Linux boot timing for bench/emu.rs (qemu TCG peer and corefour emu on the same fixture).
#[allow(dead_code)]
pub(crate) mod linux_peer;
mod migrate;
mod vmm;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    target: Target,
}

#[derive(Subcommand)]
enum Target {
    /// VMM start-up, overhead memory and exit round trip vs a raw KVM_RUN loop in C.
    Vmm(vmm::Args),
    /// virtio-blk and virtio-net throughput vs the same I/O on the host file / a veth pair.
    Io(io::Args),
    /// Create, boot and destroy N VMs through the daemon API vs raw `corefour vmm` one-shots.
    Lifecycle(lifecycle::Args),
    /// Disk image conversion vs qemu-img convert, and random 4 KiB I/O through qcow2 vs raw.
    Disk(disk::Args),
    /// OCI runtime: create+start+delete of a busybox /bin/true bundle vs runc and crun.
    Ct(ct::Args),
    /// System containers through the daemon vs the daemonless `ct --direct` path.
    CtLifecycle(ct_lifecycle::Args),
    /// Software CPU: guest MIPS on a guest CPU loop, with KVM on the same loop.
    Emu(emu::Args),
    /// Live-migration total time and downtime (idle and busy guest), snapshot restore time.
    Migrate(migrate::Args),
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    match args.target {
        Target::Vmm(a) => vmm::run(a),
        Target::Io(a) => io::run(a),
        Target::Lifecycle(a) => lifecycle::run(a),
        Target::Disk(a) => disk::run(a),
        Target::Ct(a) => ct::run(a),
        Target::CtLifecycle(a) => ct_lifecycle::run(a),
        Target::Emu(a) => emu::run(a),
        Target::Migrate(a) => migrate::run(a),
    }
}
