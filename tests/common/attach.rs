//! Running `pcache attach` and the NBD clients in end-to-end tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{stderr, stdout};

pub fn tool(name: &str, package: &str) -> String {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file())).unwrap_or(false);
    assert!(found, "{name} is not installed: apt-get install {package} (tests/run-all.sh says what CI installs)");
    name.to_string()
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

pub fn ok(cmd: &mut Command) -> Output {
    let o = run(cmd);
    assert!(o.status.success(), "{cmd:?} failed: {}\n{}", stdout(&o), stderr(&o));
    o
}

/// A running `pcache attach`.
pub struct Attach {
    pub child: Option<Child>,
    pub lines: mpsc::Receiver<String>,
    pub socket: PathBuf,
    pub stdout: Vec<String>,
}

/// The command line of `pcache attach` of `dev` serving `backings` on `listen`.
pub fn attach_cmd(dev: &Path, backings: &[&Path], listen: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pcache"));
    cmd.arg("attach").arg(dev);
    for b in backings {
        cmd.arg("--backing").arg(b);
    }
    cmd.arg("--listen").arg(listen);
    cmd.args(extra);
    cmd.env("PCACHE_LOG", "warn");
    cmd
}

impl Attach {
    pub fn start(dev: &Path, backings: &[&Path], socket: &Path, extra: &[&str]) -> Attach {
        Attach::spawn(attach_cmd(dev, backings, &format!("unix:{}", socket.display()), extra), socket)
    }

    /// Starts `cmd` (from `attach_cmd`) and waits until it serves.
    pub fn spawn(cmd: Command, socket: &Path) -> Attach {
        Attach::spawn_to(cmd, socket, Stdio::inherit())
    }

    /// [`Attach::start`] logging at info level into the file `log`.
    pub fn start_logged(dev: &Path, backings: &[&Path], socket: &Path, extra: &[&str], log: &Path) -> Attach {
        let mut cmd = attach_cmd(dev, backings, &format!("unix:{}", socket.display()), extra);
        cmd.env("PCACHE_LOG", "info");
        Attach::spawn_to(cmd, socket, std::fs::File::create(log).expect("create the log").into())
    }

    /// [`Attach::spawn`] with its stderr going to `stderr`.
    pub fn spawn_to(mut cmd: Command, socket: &Path, stderr: Stdio) -> Attach {
        let mut child = cmd.stdout(Stdio::piped()).stderr(stderr).spawn().expect("spawn pcache attach");
        let out: ChildStdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut a = Attach { child: Some(child), lines, socket: socket.to_path_buf(), stdout: Vec::new() };
        a.wait_for("SIGINT or SIGTERM stops it");
        a
    }

    /// Waits for a stdout line containing `what`.
    pub fn wait_for(&mut self, what: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    self.stdout.push(line.clone());
                    if line.contains(what) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {what:?} from pcache attach; it printed:\n{}", self.stdout.join("\n")),
            }
        }
    }

    /// Asks for a status line (SIGUSR1) every 0.1 s until one reports an
    /// error, for up to 30 s; returns the last line seen.
    pub fn wait_for_error(&mut self) -> String {
        let mut seen = String::new();
        for _ in 0..300 {
            self.signal(libc::SIGUSR1);
            seen = self.wait_for("status:");
            if seen.contains("ERROR") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        seen
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        // SAFETY: kill(2) on a child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Stops the server with SIGTERM and returns its exit code.
    pub fn stop(mut self) -> (i32, Vec<String>) {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().unwrap();
        let status = child.wait().unwrap();
        let mut rest: Vec<String> = self.lines.try_iter().collect();
        let mut all = std::mem::take(&mut self.stdout);
        all.append(&mut rest);
        (status.code().unwrap_or(-1), all)
    }

    /// Waits for the server to exit, for up to `limit` after `since`;
    /// returns its exit code, how long after `since` it exited, and its
    /// stdout. One still running then is killed, and the test fails.
    pub fn exit_within(mut self, since: Instant, limit: Duration) -> (i32, Duration, Vec<String>) {
        let mut child = self.child.take().unwrap();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if since.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                let seen: Vec<String> = self.stdout.drain(..).chain(self.lines.try_iter()).collect();
                panic!("pcache attach still ran {limit:?} later; it printed:\n{}", seen.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = since.elapsed();
        // The reader thread sees the end of stdout once the server is gone.
        let mut all = std::mem::take(&mut self.stdout);
        all.extend(self.lines.iter());
        (status.code().unwrap_or(-1), took, all)
    }

    /// Kills the server with SIGKILL: a crash.
    pub fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.take().unwrap().wait();
    }
}

impl Drop for Attach {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `qemu-io -f raw` with each of `cmds` on `uri`.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new(tool("qemu-io", "qemu-utils"));
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    run(&mut c)
}

/// Runs `cmd` to its end, or kills it after `secs` seconds and returns
/// `None`: for commands that must be refused, not hang.
pub fn run_for(cmd: &mut Command, secs: u64) -> Option<Output> {
    let mut child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if child.try_wait().ok().flatten().is_some() {
            return child.wait_with_output().ok();
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
