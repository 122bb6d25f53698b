//! What `--help` says after the options — each command's exit status and the
//! environment it reads — and the shell completions and man pages made from
//! the same command line definitions (`pcache completions`, `pcache
//! manpage`), so that what packagers install always matches the binary.

use std::io::{self, Write};
use std::path::Path;

use clap_complete::Shell;
use clap_mangen::Man;
use roff::{Roff, bold, roman};

use crate::EXIT_USAGE;
use crate::detach::EXIT_DATA_LOST;

/// Exit status of a command whose reader went away (`pcache inspect |
/// head`): 128 + SIGPIPE, what a shell reports for a command killed by it.
pub const EXIT_BROKEN_PIPE: u8 = 141;

/// An exit status and what it means.
type Exit = (u8, &'static str);
/// An environment variable, as it is set, and what it does.
type Var = (&'static str, &'static str);

/// What one command's page says beyond its options.
struct Page {
    /// The subcommand's name; `pcache` for the command itself.
    name: &'static str,
    /// Its own exit statuses; those of every command follow.
    exits: &'static [Exit],
    /// The variables it reads, in groups.
    env: &'static [&'static [Var]],
}

/// The statuses every command may exit with, unless its page says otherwise.
const EVERY_EXIT: &[Exit] = &[
    (EXIT_USAGE, "the command line could not be understood (a typo is never mistaken for a damaged device)"),
    (EXIT_BROKEN_PIPE, "the reader of its output went away (pcache inspect | head)"),
];

const LOG_ENV: &[Var] = &[(
    "PCACHE_LOG=FILTER",
    "what is logged to stderr: error, warn, info (the default), debug, trace, or a tracing filter such as \
     pcache_pmem=debug; a value it cannot use is warned about, and info used",
)];

/// How a pmem device opened for writing is made durable (read by every
/// command that maps one).
const MAPPING_ENV: &[Var] = &[
    (
        "PCACHE_FORCE_PMEM=1",
        "treat an ordinary file or block device as pmem: cache-line flushes instead of msync; for benchmarks and \
         tests, NOT power-safe",
    ),
    ("PCACHE_NO_CLWB=1", "do not use clwb (clflushopt, else clflush, instead)"),
    ("PCACHE_NO_CLFLUSHOPT=1", "do not use clflushopt"),
    ("PCACHE_NO_MOVNT=1", "no non-temporal stores: copy, then flush"),
    (
        "PCACHE_NO_FLUSH=1|0",
        "1: skip cache-line write-back, as on eADR platforms (where it is skipped anyway); 0: write back even there",
    ),
];

const ATTACH_ENV: &[Var] = &[
    (
        "PCACHE_NBD_WORKERS=N",
        "attach: worker threads per connection for reads that may block (default: twice the CPUs, within 2 to 16)",
    ),
    (
        "PCACHE_NBD_HANDSHAKE_TIMEOUT_SECS=N",
        "attach: how long a client may take over the NBD handshake (default 30; 0: no limit)",
    ),
    (
        "NOTIFY_SOCKET=PATH|@NAME",
        "attach: set by systemd for a Type=notify service: READY=1 is sent there once every export is served, STOPPING=1 \
         when SIGINT or SIGTERM stops the server; nothing is sent without it",
    ),
];

/// Where `pcache status` and `pcache set` (and attach) find the control
/// socket by default.
const CONTROL_ENV: &[Var] = &[(
    "XDG_RUNTIME_DIR=DIR",
    "attach, status, set (not as root): the control socket's default directory is DIR/pcache (as root: \
     /run/pcache; without it: the temporary directory's pcache-UID)",
)];

const PAGES: &[Page] = &[
    Page {
        name: "pcache",
        exits: &[
            (0, "success"),
            (1, "the command refused or failed; the message says why"),
            (2, "inspect, check: the device could not be read; status, set: no attach answers"),
            (EXIT_DATA_LOST, "detach --salvage: detached, with data lost"),
        ],
        env: &[LOG_ENV, MAPPING_ENV, ATTACH_ENV, CONTROL_ENV],
    },
    Page {
        name: "format",
        exits: &[
            (0, "formatted"),
            (
                1,
                "refused (too small, in use, holding something without --force, no room for the file...), or \
                 failed",
            ),
        ],
        env: &[LOG_ENV, MAPPING_ENV],
    },
    Page {
        name: "inspect",
        exits: &[
            (0, "shown; the superblock is usable"),
            (1, "shown, but the superblock is unusable (bad magic, CRC, version or flags)"),
            (2, "the device could not be opened or read, or holds no pcache device where it was looked for"),
        ],
        env: &[LOG_ENV],
    },
    Page {
        name: "check",
        exits: &[
            (0, "no problems (notes, on what recovery handles, may be printed)"),
            (1, "problems found"),
            (2, "the device could not be read"),
        ],
        env: &[LOG_ENV],
    },
    Page {
        name: "attach",
        exits: &[
            (0, "stopped by SIGINT or SIGTERM: every kset closed, the caches stay warm"),
            (
                3,
                "stopped, but connections still open at the stop deadline (--stop-timeout) or a second signal were \
                 cut; every kset closed, nothing acknowledged lost",
            ),
            (
                1,
                "refused or failed before serving; or stopped with a cache that failed to stop, or that holds \
                 dirty data writeback cannot write (the message says what to run)",
            ),
        ],
        env: &[LOG_ENV, MAPPING_ENV, ATTACH_ENV, CONTROL_ENV],
    },
    Page {
        name: "status",
        exits: &[
            (0, "shown; every export is healthy"),
            (1, "shown; an export is not (writeback failing or stopped, GC stopped: the reason is printed)"),
            (2, "no attach answers on the control socket"),
        ],
        env: &[CONTROL_ENV],
    },
    Page {
        name: "set",
        exits: &[
            (0, "done"),
            (1, "refused: an unknown export, a value out of range (each named)"),
            (2, "no attach answers on the control socket"),
        ],
        env: &[CONTROL_ENV],
    },
    Page {
        name: "detach",
        exits: &[
            (
                0,
                "written back and given up (a dm-pcache cache: written back and kept, clean); with --discard, \
                 given up; with --dry-run, listed",
            ),
            (1, "refused or failed: nothing was released"),
            (EXIT_DATA_LOST, "--salvage: detached, but the extents listed as lost: could not be written back"),
            (
                EXIT_USAGE,
                "the command line could not be understood, or gives --offset or --dry-run for an rfc-v1 device",
            ),
        ],
        env: &[LOG_ENV, MAPPING_ENV],
    },
    Page {
        name: "repair",
        exits: &[
            (0, "nothing to repair, or every repair shown (without --yes) or done"),
            (1, "failed, a repair cannot be done yet (cannot repair yet: lines), or a dm-pcache device"),
        ],
        env: &[LOG_ENV, MAPPING_ENV],
    },
    Page { name: "rename", exits: &[(0, "renamed"), (1, "refused or failed")], env: &[LOG_ENV, MAPPING_ENV] },
    Page { name: "completions", exits: &[(0, "printed"), (1, "could not be printed")], env: &[] },
    Page { name: "manpage", exits: &[(0, "written"), (1, "could not be written")], env: &[] },
];

/// The page of `name`.
fn page(name: &str) -> &'static Page {
    PAGES.iter().find(|p| p.name == name).unwrap_or(&PAGES[0])
}

/// Every exit status of a page: its own, then those of every command it
/// does not describe itself.
fn exits(p: &Page) -> impl Iterator<Item = &'static Exit> {
    let own = p.exits;
    own.iter().chain(EVERY_EXIT.iter().filter(move |(c, _)| !own.iter().any(|(o, _)| o == c)))
}

/// The text after the options in `--help` of `name` (`pcache` or a
/// subcommand): its exit statuses and its environment.
pub fn long_help(name: &str) -> String {
    let p = page(name);
    let mut out = String::from("Exit status:\n");
    for (code, what) in exits(p) {
        out.push_str(&wrap(&format!("  {code:<5}"), what, 7));
    }
    if !p.env.is_empty() {
        out.push_str("\nEnvironment:\n");
        for (var, what) in p.env.iter().flat_map(|g| g.iter()) {
            out.push_str(&format!("  {var}\n"));
            out.push_str(&wrap("      ", what, 6));
        }
    }
    out
}

/// What `-h` says after the options.
pub const SHORT_HELP: &str = "--help also lists the exit statuses and the environment variables.";

/// `lead` then `text`, wrapped at 100 columns, each line after the first
/// indented by `indent` spaces; ends with a newline.
fn wrap(lead: &str, text: &str, indent: usize) -> String {
    let mut out = String::new();
    let mut line = lead.to_string();
    let mut empty = true;
    for word in text.split_whitespace() {
        if !empty && line.len() + 1 + word.len() > 100 {
            out.push_str(&line);
            out.push('\n');
            line = " ".repeat(indent);
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// Writes `bytes` to stdout: 0, [`EXIT_BROKEN_PIPE`] when the reader went
/// away, else 1.
fn print(bytes: &[u8], what: &str) -> u8 {
    let mut out = io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => 0,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => EXIT_BROKEN_PIPE,
        Err(e) => {
            eprintln!("pcache {what}: {e}");
            1
        }
    }
}

/// `pcache completions SHELL`: the completion script for SHELL, on stdout.
pub fn completions(mut cmd: clap::Command, shell: Shell) -> u8 {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "pcache", &mut script);
    print(&script, "completions")
}

/// `pcache manpage [DIR]`: pcache.1 on stdout, or every page (pcache.1 and
/// pcache-COMMAND.1 for each command) written into DIR.
pub fn manpages(cmd: clap::Command, dir: Option<&Path>) -> u8 {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let Some(dir) = dir else {
        let mut page = Vec::new();
        return match render(&cmd, &mut page) {
            Ok(()) => print(&page, "manpage"),
            Err(e) => {
                eprintln!("pcache manpage: {e}");
                1
            }
        };
    };
    let pages = std::iter::once(&cmd).chain(cmd.get_subcommands().filter(|c| !c.is_hide_set()));
    let written = std::fs::create_dir_all(dir).and_then(|()| {
        pages
            .map(|c| {
                let path = dir.join(format!("{}.1", man_name(c)));
                let mut file = io::BufWriter::new(std::fs::File::create(&path)?);
                render(c, &mut file)?;
                file.flush()?;
                Ok(path)
            })
            .collect::<io::Result<Vec<_>>>()
    });
    match written {
        Ok(paths) => {
            let list: String = paths.iter().map(|p| format!("{}\n", p.display())).collect();
            print(list.as_bytes(), "manpage")
        }
        Err(e) => {
            eprintln!("pcache manpage: {}: {e}", dir.display());
            1
        }
    }
}

/// A page's name: `pcache`, or `pcache-COMMAND`.
fn man_name(cmd: &clap::Command) -> String {
    cmd.get_display_name().unwrap_or_else(|| cmd.get_name()).to_string()
}

/// The man page of `cmd` (built): clap_mangen's sections, then EXIT STATUS,
/// ENVIRONMENT and SEE ALSO from this module.
fn render(cmd: &clap::Command, out: &mut dyn Write) -> io::Result<()> {
    let man = Man::new(cmd.clone()).source(format!("pcache {}", env!("CARGO_PKG_VERSION")));
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(out)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(out)?;
    }
    let p = page(cmd.get_name());
    let mut roff = Roff::new();
    roff.control("SH", ["EXIT STATUS"]);
    for (code, what) in exits(p) {
        roff.control("TP", []).text([bold(code.to_string())]).text([roman(*what)]);
    }
    if !p.env.is_empty() {
        roff.control("SH", ["ENVIRONMENT"]);
        for (var, what) in p.env.iter().flat_map(|g| g.iter()) {
            roff.control("TP", []).text([bold(*var)]).text([roman(*what)]);
        }
    }
    roff.control("SH", ["SEE ALSO"]);
    let others: Vec<String> = PAGES
        .iter()
        .filter(|o| o.name != p.name)
        .map(|o| if o.name == "pcache" { "pcache(1)".into() } else { format!("pcache-{}(1)", o.name) })
        .collect();
    roff.text([roman(others.join(", "))]);
    roff.to_writer(out)?;
    if cmd.get_version().is_some() {
        man.render_version_section(out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn commands() -> Vec<String> {
        crate::Cli::command().get_subcommands().map(|c| c.get_name().to_string()).collect()
    }

    #[test]
    fn every_command_has_a_page_and_every_page_a_command() {
        let mut names = commands();
        names.push("pcache".into());
        names.sort();
        let mut pages: Vec<String> = PAGES.iter().map(|p| p.name.to_string()).collect();
        pages.sort();
        assert_eq!(names, pages);
    }

    #[test]
    fn every_long_help_lists_its_exit_statuses_and_environment() {
        let mut cmd = crate::Cli::command();
        cmd.build();
        for c in std::iter::once(&cmd).chain(cmd.get_subcommands().filter(|c| c.get_name() != "help")) {
            let help = c.clone().render_long_help().to_string();
            let p = page(if c.get_name() == "pcache" { "pcache" } else { c.get_name() });
            assert!(help.contains("Exit status:\n  0    "), "{}: {help}", c.get_name());
            assert!(help.contains(&format!("\n  {EXIT_USAGE}   ")), "{}", c.get_name());
            for (var, _) in p.env.iter().flat_map(|g| g.iter()) {
                assert!(help.contains(&format!("\n  {var}\n")), "{}: {var}", c.get_name());
            }
            let ours = &help[help.rfind("Exit status:\n").unwrap()..];
            assert!(ours.lines().all(|l| l.chars().count() <= 100), "{}: {ours}", c.get_name());
            let short = c.clone().render_help().to_string();
            assert!(short.contains(SHORT_HELP) && !short.contains("Exit status:\n"), "{}: {short}", c.get_name());
        }
    }

    #[test]
    fn statuses_the_code_names_are_described() {
        let top = long_help("pcache");
        for code in [0, 1, 2, EXIT_DATA_LOST, EXIT_USAGE, EXIT_BROKEN_PIPE] {
            assert!(top.contains(&format!("\n  {code:<5}")), "{code}: {top}");
        }
        assert!(long_help("detach").contains(&format!("\n  {EXIT_DATA_LOST}    --salvage")));
        // detach describes 64 itself: once.
        assert_eq!(long_help("detach").matches(&format!("\n  {EXIT_USAGE}   ")).count(), 1);
        assert!(long_help("check").contains("\n  2    the device could not be read\n"));
    }

    /// Every `env::var("...")`, `var_os("...")` and `env_flag("...")` in
    /// the workspace's sources, and NOTIFY_SOCKET.
    fn variables_read() -> Vec<String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut found = vec!["NOTIFY_SOCKET".to_string()];
        let mut dirs: Vec<_> =
            ["pcache-cli/src", "pcache-pmem/src", "pcache-format/src"].iter().map(|d| root.join(d)).collect();
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                for call in ["var(\"", "var_os(\"", "env_flag(\""] {
                    for (at, _) in text.match_indices(call) {
                        let rest = &text[at + call.len()..];
                        let name = &rest[..rest.find('"').unwrap_or(0)];
                        if !name.is_empty() && name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
                            found.push(name.to_string());
                        }
                    }
                }
            }
        }
        found.sort();
        found.dedup();
        found
    }

    #[test]
    fn every_variable_the_code_reads_is_described() {
        let vars = variables_read();
        assert!(vars.len() >= 9 && vars.contains(&"PCACHE_NO_FLUSH".to_string()), "{vars:?}");
        let top = long_help("pcache");
        for v in &vars {
            assert!(top.contains(&format!("\n  {v}=")), "{v} is read but not described in `pcache --help`");
        }
    }

    #[test]
    fn wrapping_keeps_words_and_indents() {
        let wrapped = wrap("  1    ", &"word ".repeat(40), 7);
        assert!(wrapped.starts_with("  1    word word "), "{wrapped}");
        assert!(wrapped.lines().count() > 1);
        assert!(wrapped.lines().all(|l| l.len() <= 100));
        assert!(wrapped.lines().skip(1).all(|l| l.starts_with("       word")));
        assert_eq!(wrapped.split_whitespace().filter(|w| *w == "word").count(), 40);
        assert_eq!(wrap("  0    ", "formatted", 7), "  0    formatted\n");
    }

    #[test]
    fn completions_name_every_command() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut crate::Cli::command(), "pcache", &mut script);
            let script = String::from_utf8(script).unwrap();
            for name in commands().iter().filter(|n| *n != "help") {
                assert!(script.contains(name.as_str()), "{shell}: no {name}");
            }
        }
    }

    #[test]
    fn man_pages_carry_exit_status_environment_and_see_also() {
        let mut cmd = crate::Cli::command().disable_help_subcommand(true);
        cmd.build();
        let mut top = Vec::new();
        render(&cmd, &mut top).unwrap();
        let top = String::from_utf8(top).unwrap();
        for name in commands().iter().filter(|n| *n != "help") {
            assert!(top.contains(&format!("pcache\\-{name}(1)")), "{name}: {top}");
        }
        assert!(top.contains(".SH \"EXIT STATUS\"") && top.contains(".SH ENVIRONMENT"), "{top}");
        let attach = cmd.find_subcommand("attach").unwrap();
        let mut page = Vec::new();
        render(attach, &mut page).unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(page.contains(&format!(".TH pcache-attach 1  \"pcache {}\"", env!("CARGO_PKG_VERSION"))), "{page}");
        assert!(page.contains("NOTIFY_SOCKET") && page.contains("\\-\\-backing"), "{page}");
        assert!(page.contains("pcache(1)") && !page.contains("pcache\\-attach(1)"), "{page}");
    }
}
