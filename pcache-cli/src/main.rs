//! `pcache`: format, inspect, check, attach and detach persistent-memory cache devices.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod attach;
mod check;
mod detach;
mod format;
mod inspect;
mod units;

/// Persistent memory as a crash-safe write-back cache for block devices.
#[derive(Debug, Parser)]
#[command(name = "pcache", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Format a pmem device (or an ordinary file standing in for one).
    Format {
        /// Device DAX (/dev/daxX.Y), a file on a DAX filesystem, a block
        /// device, or an ordinary file.
        device: PathBuf,
        /// Create DEVICE as a sparse file of this size (e.g. 1G, 512M).
        #[arg(long, value_parser = units::parse_size)]
        size: Option<u64>,
        /// Overwrite an existing pcache format, destroying every cache on it.
        #[arg(long)]
        force: bool,
    },
    /// Show what a device holds: superblock, backing table, caches, key logs.
    Inspect {
        /// The device.
        device: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Verify every record of a device, read-only. Exit status: 0 clean,
    /// 1 problems found, 2 the device could not be read.
    Check {
        /// The device.
        device: PathBuf,
        /// Skip verifying the data CRCs of cached data (faster).
        #[arg(long)]
        no_data: bool,
    },
    /// Cache backing devices on a pmem device and serve each as an NBD
    /// export, until SIGINT or SIGTERM (the cache stays warm).
    Attach(attach::AttachArgs),
    /// Write every dirty block of a backing device's cache back to it, then
    /// give the cache up (offline: the device must not be attached).
    Detach {
        /// The pmem device.
        device: PathBuf,
        /// The backing device whose cache to give up.
        #[arg(long)]
        backing: PathBuf,
    },
}

/// Exit status of a command line that cannot be understood (sysexits'
/// EX_USAGE): distinct from `check`'s 1 (problems found) and 2 (could not
/// read), so scripts can tell a typo from a damaged device.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PCACHE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let code = match cli.command {
        Command::Format { device, size, force } => format::run(&device, size, force),
        Command::Inspect { device, json } => inspect::run(&device, json),
        Command::Check { device, no_data } => check::run(&device, !no_data),
        Command::Detach { device, backing } => detach::run(&device, &backing),
        Command::Attach(args) => attach::run(args),
    };
    ExitCode::from(code)
}
