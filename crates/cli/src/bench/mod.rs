//! `corefour bench TARGET`: each benchmark prints a table with its peer or baseline measured in the
//! same run, and the ratio.

mod disk;

use clap::Subcommand;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    target: Target,
}

#[derive(Subcommand)]
enum Target {
    /// VMM start-up, overhead memory and exit round trip vs a raw KVM_RUN loop in C.
    Vmm,
    /// Disk image conversion vs qemu-img convert, and random 4 KiB I/O through qcow2 vs raw.
    Disk(disk::Args),
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    match args.target {
        Target::Vmm => anyhow::bail!("`corefour bench vmm` is not built yet"),
        Target::Disk(a) => disk::run(a),
    }
}
