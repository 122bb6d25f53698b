//! `pcache`: format, inspect, check, attach and detach persistent-memory cache devices.

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

mod attach;
mod check;
mod detach;
mod format;
mod inspect;
mod manual;
mod open;
mod rename;
mod repair;
mod signatures;
mod status;
mod units;

/// Persistent memory as a crash-safe write-back cache for block devices.
#[derive(Debug, Parser)]
#[command(
    name = "pcache",
    version,
    about,
    propagate_version = true,
    after_help = manual::SHORT_HELP,
    after_long_help = manual::long_help("pcache")
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Format a pmem device (or an ordinary file standing in for one).
    ///
    /// Refuses a device that holds a filesystem, a partition table, LVM,
    /// swap, LUKS, md RAID, bcache, dm-pcache or pcache, unless --force. A
    /// file is allocated in full (fallocate), and refused if its filesystem
    /// cannot hold it.
    #[command(after_help = manual::SHORT_HELP, after_long_help = manual::long_help("format"))]
    Format {
        /// Device DAX (/dev/daxX.Y), a file on a DAX filesystem, a block
        /// device, or an ordinary file.
        device: PathBuf,
        /// Create DEVICE as a file of this size (e.g. 1G, 512M), all of it
        /// allocated.
        #[arg(long, value_parser = units::parse_size)]
        size: Option<u64>,
        /// Format even a device that holds something (a filesystem, a
        /// partition table, a cache...), destroying it.
        #[arg(long)]
        force: bool,
        /// Leave a file sparse instead of allocating it: for tests and
        /// benchmarks only, since a write to a hole then fails (SIGBUS) when
        /// its filesystem is full.
        #[arg(long)]
        sparse: bool,
        /// The on-media dialect: rfc-v1 (several caches per device, made by
        /// `pcache attach`), or dm-pcache (what Linux's dm-pcache target
        /// writes when it first loads a device: one cache owning it all).
        #[arg(long, default_value = "rfc-v1", value_parser = parse_dialect)]
        dialect: pcache_format::Dialect,
        /// dm-pcache only: the cache keeps a CRC of its data (the target's
        /// `data_crc true`, which must then be given to dmsetup too).
        #[arg(long)]
        data_crc: bool,
    },
    /// Show what a device holds: superblock, backing table, caches, key logs.
    #[command(after_help = manual::SHORT_HELP, after_long_help = manual::long_help("inspect"))]
    Inspect {
        /// The device: pmem of either dialect (rfc-v1, or Linux dm-pcache),
        /// or an NVDIMM namespace image holding one (found by its info
        /// block).
        device: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Where the pmem device starts in DEVICE, in bytes, for an image
        /// whose start is not found by itself.
        #[arg(long, value_parser = units::parse_size)]
        offset: Option<u64>,
    },
    /// Verify every record of a device, read-only. Exit status: 0 clean,
    /// 1 problems found, 2 the device could not be read.
    #[command(after_help = manual::SHORT_HELP, after_long_help = manual::long_help("check"))]
    Check {
        /// The device (as for inspect).
        device: PathBuf,
        /// Skip verifying the data CRCs of cached data (faster).
        #[arg(long)]
        no_data: bool,
        /// Print one JSON object (`problems`, `notes`, counts) instead of
        /// lines; the exit status is the same.
        #[arg(long)]
        json: bool,
        /// Where the pmem device starts in DEVICE, in bytes (as for inspect).
        #[arg(long, value_parser = units::parse_size)]
        offset: Option<u64>,
    },
    /// Show a running attach's figures, per export: hits and misses, dirty
    /// and clean bytes, segments in use, writeback rate and backlog, GC,
    /// errors and health, through its control socket.
    #[command(after_help = manual::SHORT_HELP, after_long_help = manual::long_help("status"))]
    Status {
        /// The pmem device the attach runs on (its control socket's default
        /// place is derived from it).
        device: Option<PathBuf>,
        /// The control socket, when attach was given --control.
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Print the JSON the control socket answers.
        #[arg(long)]
        json: bool,
        /// Print again every SECS seconds, until interrupted.
        #[arg(long, value_name = "SECS")]
        watch: Option<u64>,
    },
    /// Change a running cache: `gc-percent N` (0 to 90, persisted in the
    /// cache's record as `dmsetup message ... gc_percent` persists it) or
    /// `writeback-rate RATE` (bytes a second such as 100M, or none; until
    /// the next start).
    #[command(after_help = manual::SHORT_HELP, after_long_help = manual::long_help("set"))]
    Set {
        /// The export, as attach names it.
        export: String,
        /// What to set.
        #[arg(value_parser = ["gc-percent", "writeback-rate"])]
        key: String,
        /// Its value.
        value: String,
        /// The pmem device the attach runs on.
        #[arg(long)]
        device: Option<PathBuf>,
        /// The control socket, when attach was given --control.
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Cache backing devices on a pmem device and serve each as an NBD
    /// export, until SIGINT or SIGTERM (the cache stays warm).
    #[command(after_help = manual::SHORT_HELP, after_long_help = manual::long_help("attach"))]
    Attach(Box<attach::AttachArgs>),
    /// Write every dirty block of a backing device's cache back to it, then
    /// give the cache up (offline: the device must not be attached). On a
    /// Linux dm-pcache device (which stores no backing path: BACKING is
    /// the disk the cache was created over), write every dirty key back and
    /// mark the cache clean, keeping it: the kernel module then loads it
    /// clean, its data still cached.
    #[command(after_help = manual::SHORT_HELP, after_long_help = manual::long_help("detach"))]
    Detach {
        /// The pmem device.
        device: PathBuf,
        /// The backing device whose cache to give up.
        #[arg(long)]
        backing: PathBuf,
        /// Write back every dirty extent that reads correctly, skip and list
        /// (`lost: ...`) those that do not, then give the cache up anyway.
        /// Exit status 3: detached with data lost.
        #[arg(long)]
        salvage: bool,
        /// Give the cache up WITHOUT writing anything back, for a backing
        /// device that is gone for good: its dirty data is lost. BACKING is
        /// the name the cache stores (as `pcache inspect` shows it) and
        /// need not exist.
        #[arg(long, conflicts_with = "salvage")]
        discard: bool,
        /// dm-pcache: list what would be written back, write nothing.
        #[arg(long, conflicts_with_all = ["salvage", "discard"])]
        dry_run: bool,
        /// dm-pcache: where the pmem device starts in DEVICE, in bytes (an
        /// NVDIMM namespace image is found by its info block without it).
        #[arg(long, value_parser = units::parse_size)]
        offset: Option<u64>,
    },
    /// Show, then with --yes carry out, repairs of the backing table: the
    /// second copy of entries that have one, a new entry for a cache whose
    /// entry was lost (for the backing device named with --backing), and
    /// damaged entries freed once no lost cache needs them. Offline.
    #[command(after_help = manual::SHORT_HELP, after_long_help = manual::long_help("repair"))]
    Repair {
        /// The pmem device.
        device: PathBuf,
        /// The backing device a lost cache belongs to (its entry cannot
        /// say: the user must).
        #[arg(long)]
        backing: Option<PathBuf>,
        /// The first device segment of the lost cache to rebuild, when
        /// there are several (as `pcache check` shows them).
        #[arg(long, value_name = "SEGMENT")]
        cache_segment: Option<u32>,
        /// Carry the repairs out (without it, only show them).
        #[arg(long)]
        yes: bool,
    },
    /// Point the cache of a backing device at the device's new name (a
    /// disk that moved from /dev/sdb to /dev/sdc, a file that was moved).
    /// The new device must have the size stored for the cache. Offline.
    #[command(after_help = manual::SHORT_HELP, after_long_help = manual::long_help("rename"))]
    Rename {
        /// The pmem device.
        device: PathBuf,
        /// The backing device's name as the cache stores it (as `pcache
        /// inspect` shows it).
        #[arg(long)]
        backing: PathBuf,
        /// Its new name.
        #[arg(long)]
        to: PathBuf,
    },
    /// Print the shell completion script for pcache.
    ///
    /// Bash: save it as /usr/share/bash-completion/completions/pcache; zsh:
    /// as _pcache in a directory of $fpath (/usr/share/zsh/vendor-completions);
    /// fish: as /usr/share/fish/vendor_completions.d/pcache.fish.
    #[command(after_help = manual::SHORT_HELP, after_long_help = manual::long_help("completions"))]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page pcache(1), or write every page into DIR.
    ///
    /// The pages: pcache(1), and one per command (pcache-attach(1), ...).
    #[command(after_help = manual::SHORT_HELP, after_long_help = manual::long_help("manpage"))]
    Manpage {
        /// Where to write pcache.1 and pcache-COMMAND.1 (created if need
        /// be), e.g. /usr/share/man/man1.
        dir: Option<PathBuf>,
    },
}

/// Refuses an rfc-v1 command on a dm-pcache device, saying why and what does
/// apply there.
fn dm_only(what: &str, device: &std::path::Path, why: &str) -> u8 {
    eprintln!(
        "pcache: {} is a Linux dm-pcache device: {what} ({why}); `pcache check` verifies its one cache and \
         `pcache detach --backing DISK` writes it back",
        device.display()
    );
    1
}

/// A dialect by its name.
fn parse_dialect(s: &str) -> Result<pcache_format::Dialect, String> {
    pcache_format::Dialect::from_name(s).ok_or_else(|| format!("'{s}' is no dialect: rfc-v1 or dm-pcache"))
}

/// Exit status of a command line that cannot be understood (sysexits'
/// EX_USAGE): distinct from `check`'s 1 (problems found) and 2 (could not
/// read), so scripts can tell a typo from a damaged device.
const EXIT_USAGE: u8 = 64;

/// The log filter `PCACHE_LOG` asks for.
#[derive(Debug)]
struct LogFilter {
    filter: EnvFilter,
    /// What to print when the value is not usable: then logging is at info.
    warning: Option<String>,
}

/// The log filter for the value of `PCACHE_LOG` (`None`: unset).
///
/// `tracing`'s own parser takes a bare word it does not know as a target
/// name (`verbose` would enable only a target called "verbose": no line at
/// all), so a bare word must be a level or name one of pcache's own targets
/// (`pcache`, `pcache_pmem`, ...); anything else, or a value the parser
/// rejects, is warned about.
fn log_filter(value: Option<&str>) -> LogFilter {
    let fallback = || EnvFilter::new("info");
    let Some(value) = value.filter(|v| !v.trim().is_empty()) else {
        return LogFilter { filter: fallback(), warning: None };
    };
    let bare_word_ok =
        |d: &str| d.contains(['=', '[', ':']) || d.parse::<LevelFilter>().is_ok() || d.starts_with("pcache");
    let known = value.split(',').map(str::trim).filter(|d| !d.is_empty()).all(bare_word_ok);
    match EnvFilter::try_new(value) {
        Ok(filter) if known => LogFilter { filter, warning: None },
        _ => LogFilter {
            filter: fallback(),
            warning: Some(format!(
                "pcache: PCACHE_LOG={value} is not a log level (error, warn, info, debug, trace, or a tracing \
                 filter such as pcache_pmem=debug); logging at info"
            )),
        },
    }
}

/// Ends the process quietly, as a shell expects of a command whose reader
/// went away (`pcache inspect | head`), when printing to stdout fails with a
/// broken pipe; any other panic is reported as before. (SIGPIPE is ignored,
/// as Rust programs do, so that `attach` sees a closed socket as an error.)
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            // 128 + SIGPIPE: what the shell reports for a command killed by it.
            std::process::exit(manual::EXIT_BROKEN_PIPE.into());
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_broken_pipe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    let value = std::env::var_os("PCACHE_LOG").map(|v| v.to_string_lossy().into_owned());
    let LogFilter { filter, warning } = log_filter(value.as_deref());
    if let Some(warning) = warning {
        eprintln!("{warning}");
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .init();
    let code = match cli.command {
        Command::Format { device, size, force, sparse, dialect, data_crc } => {
            format::run(&device, size, force, sparse, format::Target { dialect, data_crc })
        }
        Command::Inspect { device, json, offset } => inspect::run(&device, json, offset),
        Command::Check { device, no_data, json, offset } => check::run(&device, !no_data, json, offset),
        Command::Detach { device, discard: true, .. } if detach::is_dm_pcache(&device, None) => dm_only(
            "detach --discard does not apply",
            &device,
            "to drop its cache and its dirty data for good, `pcache format --dialect dm-pcache --force` it",
        ),
        Command::Detach { device, backing, discard: true, .. } => detach::discard(&device, &backing),
        Command::Detach { device, backing, salvage, dry_run, offset, .. } => {
            if detach::is_dm_pcache(&device, offset) {
                detach::dm(&device, &backing, dry_run, salvage, offset)
            } else if offset.is_some() {
                eprintln!(
                    "pcache detach: {}: no dm-pcache cache there; --offset is for dm-pcache caches",
                    device.display()
                );
                EXIT_USAGE
            } else if dry_run {
                eprintln!(
                    "pcache detach: --dry-run is for dm-pcache caches; `pcache inspect` lists an rfc-v1 cache's dirty data"
                );
                EXIT_USAGE
            } else {
                detach::run(&device, &backing, salvage)
            }
        }
        Command::Attach(args) => attach::run(*args),
        Command::Status { device, control, json, watch } => {
            status::status(device.as_deref(), control.as_deref(), json, watch)
        }
        Command::Set { export, key, value, device, control } => {
            status::set(device.as_deref(), control.as_deref(), &export, &key, &value)
        }
        Command::Repair { device, .. } | Command::Rename { device, .. } if detach::is_dm_pcache(&device, None) => {
            dm_only(
                "repair and rename do not apply",
                &device,
                "they mend an rfc-v1 backing table, which a dm-pcache device has none of",
            )
        }
        Command::Repair { device, backing, cache_segment, yes } => {
            repair::run(&device, backing.as_deref(), cache_segment, yes)
        }
        Command::Rename { device, backing, to } => rename::run(&device, &backing, &to),
        Command::Completions { shell } => manual::completions(Cli::command(), shell),
        Command::Manpage { dir } => manual::manpages(Cli::command(), dir.as_deref()),
    };
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_log_levels_warn_and_fall_back_to_info() {
        for bad in ["verbose", "Verbose", "loud,info", "pcache_pmem=verbose", "info=[", "debug,pcache=noisy"] {
            let LogFilter { filter, warning } = log_filter(Some(bad));
            assert_eq!(filter.to_string(), "info", "{bad}");
            let warning = warning.unwrap_or_else(|| panic!("{bad}: no warning"));
            assert!(warning.starts_with(&format!("pcache: PCACHE_LOG={bad} is not a log level (")), "{warning}");
            assert!(warning.ends_with("; logging at info"), "{warning}");
        }
    }

    #[test]
    fn valid_log_filters_are_kept() {
        for (value, want) in [
            (None, "info"),
            (Some(""), "info"),
            (Some("  "), "info"),
            (Some("warn"), "warn"),
            (Some("DEBUG"), "debug"),
            (Some("off"), "off"),
            (Some("pcache_pmem=debug"), "pcache_pmem=debug"),
            (Some("info,pcache=trace"), "pcache=trace,info"),
            (Some("pcache_pmem"), "pcache_pmem=trace"),
        ] {
            let LogFilter { filter, warning } = log_filter(value);
            assert_eq!(warning, None, "{value:?}");
            assert_eq!(filter.to_string(), want, "{value:?}");
        }
    }
}
