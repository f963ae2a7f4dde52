//! `corefour bench TARGET`: each benchmark prints a table with its peer or baseline measured in the
//! same run, and the ratio.

use clap::Subcommand;

mod emu;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    target: Target,
}

#[derive(Subcommand)]
enum Target {
    /// VMM start-up, overhead memory and exit round trip vs a raw KVM_RUN loop in C.
    Vmm,
    /// Software CPU: guest MIPS on a guest CPU loop, with KVM on the same loop.
    Emu(emu::Args),
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    match args.target {
        Target::Vmm => anyhow::bail!("`corefour bench vmm` is not built yet"),
        Target::Emu(a) => emu::run(a),
    }
}
