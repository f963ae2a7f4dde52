//! `corefour bench TARGET`: each benchmark prints a table with its peer or baseline measured in the
//! same run, and the ratio.

use clap::Subcommand;

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
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    match args.target {
        Target::Vmm(a) => vmm::run(a),
    }
}
