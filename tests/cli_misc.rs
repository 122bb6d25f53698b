//! End-to-end tests of the `pcache` command line: devices that are not
//! devices (FIFOs), the wording of `inspect`, and `PCACHE_LOG`.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

use pcache_format::sparse::ImageBuilder;
use serde_json::Value;

/// Waits at most `limit` for `child` to exit; kills it and fails if it does not.
fn wait_or_kill(mut child: Child, limit: Duration, what: &str) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait for pcache").is_some() {
            return child.wait_with_output().expect("collect pcache's output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still running after {limit:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `pcache` with `args`, failing the test if it runs for more than 10 s.
fn pcache_deadline(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_pcache"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pcache");
    wait_or_kill(child, Duration::from_secs(10), &format!("pcache {}", args.join(" ")))
}

#[test]
fn a_fifo_is_refused_at_once() {
    let d = Dir::new();
    let fifo = d.path("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo");
    assert!(made.success(), "mkfifo failed");
    let disk = d.path("disk.img");
    let why = "a FIFO, not a file, block device or device DAX";
    // (arguments, exit status): inspect and check say the device could not be read.
    let cases: [(&[&str], i32); 5] = [
        (&["inspect", s(&fifo)], 2),
        (&["inspect", "--json", s(&fifo)], 2),
        (&["check", s(&fifo)], 2),
        (&["format", s(&fifo)], 1),
        (&["detach", s(&fifo), "--backing", s(&disk)], 1),
    ];
    for (args, want) in cases {
        let o = pcache_deadline(args);
        assert_eq!(code(&o), want, "{args:?}: {}", stderr(&o));
        let cmd = args[0];
        let line = format!("pcache {cmd}: {}: {why}", fifo.display());
        assert!(stderr(&o).contains(&line), "{args:?}: want {line:?} in {:?}", stderr(&o));
        assert!(stdout(&o).is_empty(), "{args:?}: {}", stdout(&o));
    }
    // The FIFO is left as it was.
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn inspect_says_an_entry_is_in_use_not_running() {
    let d = Dir::new();
    let dev = d.path("pmem.img");
    let mut b = ImageBuilder::format(1 << 30).unwrap();
    let mut c = b.add_cache(0, b"/srv/disk.img", 1 << 30, 4, false).unwrap();
    c.close(&mut b).unwrap();
    write_image(b.image(), &dev);

    // inspect is offline: nothing runs, the entry is merely in use.
    let o = pcache(&["inspect", s(&dev)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("backing 0  /srv/disk.img  in use\n"), "{text}");
    assert!(!text.contains("running"), "{text}");

    let o = pcache(&["inspect", "--json", s(&dev)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)));
    assert_eq!(v["backings"][0]["state"], "in_use", "{v}");
}

/// Runs `pcache attach` of a fresh device with `PCACHE_LOG` set to `log`
/// (unset: `None`) until it serves, stops it with SIGTERM, and returns its
/// exit status and stderr.
fn attach_and_stop(d: &Dir, log: Option<&str>) -> (i32, String) {
    let dev = d.path("pmem.img");
    let disk = d.path("disk.img");
    if !dev.exists() {
        let o = pcache(&["format", s(&dev), "--size", "512M"]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    }
    let sock = d.path("nbd.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pcache"));
    cmd.args(["attach", s(&dev), "--backing", s(&disk), "--listen", &format!("unix:{}", sock.display())]);
    cmd.env_remove("PCACHE_LOG");
    if let Some(log) = log {
        cmd.env("PCACHE_LOG", log);
    }
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn pcache attach");
    let out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains("SIGINT or SIGTERM stops it") => break,
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                let err = errors.join().unwrap();
                panic!(
                    "pcache attach did not start serving ({status:?}); it printed:\n{}\nand on stderr:\n{err}",
                    seen.join("\n")
                );
            }
        }
    }
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("run kill");
    assert!(killed.success(), "kill -TERM failed");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pcache attach did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code().unwrap_or(-1), errors.join().unwrap())
}

#[test]
fn an_unknown_pcache_log_warns_once_and_logs_at_info() {
    let d = Dir::new();
    let warning = "pcache: PCACHE_LOG=verbose is not a log level (error, warn, info, debug, trace, or a tracing \
                   filter such as pcache_pmem=debug); logging at info";

    let (rc, err) = attach_and_stop(&d, Some("verbose"));
    assert_eq!(rc, 0, "{err}");
    assert_eq!(err.matches(warning).count(), 1, "{err}");
    assert!(err.contains("stopping"), "the info line on SIGTERM is missing: {err}");

    // A valid level is obeyed, silently: warn hides the info line.
    let (rc, err) = attach_and_stop(&d, Some("warn"));
    assert_eq!(rc, 0, "{err}");
    assert!(!err.contains("PCACHE_LOG"), "{err}");
    assert!(!err.contains("stopping"), "{err}");

    // So is a filter, and no value at all means info.
    for log in [Some("pcache=info"), None] {
        let (rc, err) = attach_and_stop(&d, log);
        assert_eq!(rc, 0, "{log:?}: {err}");
        assert!(!err.contains("PCACHE_LOG"), "{log:?}: {err}");
        assert!(err.contains("stopping"), "{log:?}: {err}");
    }
}
