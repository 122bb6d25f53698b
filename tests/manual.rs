//! What scripts and packagers get from the `pcache` binary: `--help` with
//! each command's exit statuses and environment, shell completions
//! (`pcache completions`) and man pages (`pcache manpage`).

mod common;

use std::process::Command;

use common::*;

/// The commands `pcache --help` lists (without `help`).
fn commands() -> Vec<String> {
    let o = pcache(&["--help"]);
    assert_eq!(code(&o), 0);
    let out = stdout(&o);
    let list = &out[out.find("Commands:\n").expect("a command list")..];
    let names: Vec<String> = list
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_string)
        .collect();
    for must in ["format", "inspect", "check", "attach", "detach", "repair", "rename", "completions", "manpage"] {
        assert!(names.iter().any(|n| n == must), "{must} not in {names:?}");
    }
    names
}

#[test]
fn every_commands_help_lists_its_exit_statuses_and_environment() {
    let top = stdout(&pcache(&["--help"]));
    for must in ["Exit status:\n  0    success\n", "\n  64   ", "\n  141  ", "\n  NOTIFY_SOCKET=", "\n  PCACHE_LOG="] {
        assert!(top.contains(must), "{must:?} not in:\n{top}");
    }
    for name in commands() {
        let o = pcache(&[&name, "--help"]);
        assert_eq!(code(&o), 0, "{name}");
        let help = stdout(&o);
        assert!(help.contains("Exit status:\n  0    "), "{name}:\n{help}");
        assert!(help.contains("\n  64   "), "{name}:\n{help}");
        // -h stays short, and says where the rest is.
        let short = stdout(&pcache(&[&name, "-h"]));
        assert!(!short.contains("Exit status:\n") && short.contains("--help also lists"), "{name}:\n{short}");
    }
    assert!(stdout(&pcache(&["detach", "--help"])).contains("\n  3    --salvage: detached"));
    assert!(stdout(&pcache(&["attach", "--help"])).contains("\n  NOTIFY_SOCKET=PATH|@NAME\n"));
    assert!(!stdout(&pcache(&["check", "--help"])).contains("NOTIFY_SOCKET"), "check does not read it");
}

#[test]
fn completion_scripts_name_every_command() {
    let names = commands();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let o = pcache(&["completions", shell]);
        assert_eq!(code(&o), 0, "{shell}: {}", stderr(&o));
        let script = stdout(&o);
        for name in &names {
            assert!(script.contains(name.as_str()), "{shell}: {name} missing");
        }
    }
    let o = pcache(&["completions", "tcsh"]);
    assert_eq!(code(&o), 64, "an unknown shell is a usage error");
}

#[test]
fn bash_completes_commands_and_their_options() {
    let d = Dir::new();
    let script = d.path("pcache.bash");
    std::fs::write(&script, stdout(&pcache(&["completions", "bash"]))).unwrap();
    let complete = |words: &str| {
        let line = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             _pcache pcache \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            s(&script)
        );
        let o = run(Command::new("bash").args(["--norc", "-c", &line]));
        assert!(o.status.success(), "{words}: {}", stderr(&o));
        stdout(&o)
    };
    let first = complete("pcache ''");
    for name in commands() {
        assert!(first.lines().any(|l| l == name), "{name} not offered:\n{first}");
    }
    assert_eq!(complete("pcache at").trim(), "attach");
    let options = complete("pcache attach --back");
    assert_eq!(options.trim(), "--backing\n--backing-timeout");
    assert_eq!(complete("pcache attach --tls-c").trim(), "--tls-cert");
}

#[test]
fn man_pages_are_written_for_every_command_and_parse() {
    let d = Dir::new();
    let dir = d.path("man1");
    let o = pcache(&["manpage", s(&dir)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let mut want: Vec<String> = commands().iter().map(|n| format!("pcache-{n}.1")).collect();
    want.push("pcache.1".into());
    want.sort();
    let mut got: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    got.sort();
    assert_eq!(got, want);
    assert_eq!(stdout(&o).lines().count(), want.len(), "each page written is named");
    let groff = tool("groff", "groff-base");
    for page in &got {
        let path = dir.join(page);
        // -k: the pages are UTF-8 (man runs the same preprocessor); -ww:
        // every warning.
        let o = run(Command::new(&groff).args(["-k", "-man", "-Tutf8", "-ww", "-P-cbou"]).arg(&path));
        assert!(o.status.success() && o.stderr.is_empty(), "{page}: {}", stderr(&o));
        let text = stdout(&o);
        for section in ["NAME", "SYNOPSIS", "EXIT STATUS", "SEE ALSO"] {
            assert!(text.contains(&format!("\n{section}\n")), "{page}: no {section}:\n{text}");
        }
        assert!(text.contains("pcache(1)") || page == "pcache.1", "{page}");
    }
    let attach =
        stdout(&run(Command::new(&groff).args(["-k", "-man", "-Tutf8", "-P-cbou"]).arg(dir.join("pcache-attach.1"))));
    assert!(attach.contains("\nENVIRONMENT\n") && attach.contains("NOTIFY_SOCKET"), "{attach}");
    assert!(attach.contains("--backing"), "{attach}");
}

#[test]
fn manpage_prints_pcache_1_or_says_why_it_cannot_write() {
    let o = pcache(&["manpage"]);
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains(".TH pcache 1 "), "{}", stdout(&o));
    let d = Dir::new();
    let file = d.path("a-file");
    std::fs::write(&file, "").unwrap();
    let o = pcache(&["manpage", s(&file.join("man1"))]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).starts_with("pcache manpage: "), "{}", stderr(&o));
}
