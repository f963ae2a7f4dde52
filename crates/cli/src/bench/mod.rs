//! `corefour bench TARGET`: each benchmark prints a table with its peer or baseline measured in the
//! same run, and the ratio.

mod io;
mod io_net;

use clap::Subcommand;

mod lifecycle;
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
    /// Live-migration total time and downtime (idle and busy guest), snapshot restore time.
    Migrate(migrate::Args),
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    match args.target {
        Target::Vmm(a) => vmm::run(a),
        Target::Io(a) => io::run(a),
        Target::Lifecycle(a) => lifecycle::run(a),
        Target::Migrate(a) => migrate::run(a),
    }
}
