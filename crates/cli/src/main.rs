//! `corefour`: one binary for host check, the VMM, VMs, disks, containers and benchmarks.
//! Each subcommand tree lives in its own module; this file only dispatches.

mod bench;
mod cmd_ct;
mod cmd_daemon;
mod cmd_disk;
mod cmd_host;
mod cmd_oci;
mod cmd_vm;
mod cmd_vm_export;
mod cmd_vm_migrate;
mod cmd_vmm;
mod cmd_vmm_virtio;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "corefour",
    version,
    about = "Linux virtualization: VMs on KVM or a software CPU, containers, disks, migration"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check whether this host can virtualize, and how.
    Host(cmd_host::Args),
    /// Run one VM in the foreground (Firecracker-style).
    Vmm(Box<cmd_vmm::Args>),
    /// Manage VMs through the daemon.
    Vm(cmd_vm::Args),
    /// Inspect, create, convert and check disk images.
    Disk(cmd_disk::Args),
    /// System containers from templates.
    Ct(cmd_ct::Args),
    /// OCI runtime (runc-compatible command line).
    Oci(cmd_oci::Args),
    /// Run the corefour daemon (REST over a Unix socket).
    Daemon(cmd_daemon::Args),
    /// Benchmarks, each against its peer or baseline measured in the same run.
    Bench(bench::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Host(a) => cmd_host::run(a),
        Command::Vmm(a) => cmd_vmm::run(*a),
        Command::Vm(a) => cmd_vm::run(a),
        Command::Disk(a) => cmd_disk::run(a),
        Command::Ct(a) => cmd_ct::run(a),
        Command::Oci(a) => cmd_oci::run(a),
        Command::Daemon(a) => cmd_daemon::run(a),
        Command::Bench(a) => bench::run(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("corefour: {e:#}");
            std::process::exit(1);
        }
    }
}
