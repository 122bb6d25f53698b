//! pcache under systemd: `attach` speaking the `Type=notify` protocol end
//! to end, and the unit in contrib/systemd as systemd-analyze sees it.

mod common;

use std::io::{ErrorKind, Read};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// The next datagram on `sock`, waiting at most 60 s.
fn recv(sock: &UnixDatagram) -> String {
    sock.set_nonblocking(false).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification within 60 s");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

/// A datagram waiting on `sock` now, if any.
fn pending(sock: &UnixDatagram) -> Option<String> {
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => panic!("notify socket: {e}"),
    }
}

/// The first 8 bytes a server on the Unix socket `path` sends a new client.
fn greeting(path: &Path) -> Result<[u8; 8], String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 8];
    s.read_exact(&mut b).map_err(|e| format!("read: {e}"))?;
    Ok(b)
}

#[test]
fn ready_comes_once_the_export_serves_and_stopping_with_sigterm() {
    let rig = Rig::new();
    let backing = rig.backing("disk.img", 64 << 20);
    let nbd = rig.socket();
    let notify_path = rig.d.path("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    // The moment READY=1 arrives, a client must already get the NBD greeting.
    let watcher = {
        let (notify, nbd) = (notify.try_clone().unwrap(), nbd.clone());
        std::thread::spawn(move || {
            let msg = recv(&notify);
            (msg, greeting(&nbd))
        })
    };
    let mut cmd = attach_cmd(&rig.dev, &[&backing], &format!("unix:{}", nbd.display()), &[]);
    cmd.env("NOTIFY_SOCKET", &notify_path);
    let a = Attach::spawn(cmd, &nbd);
    let (ready, hello) = watcher.join().unwrap();
    assert_eq!(ready, format!("READY=1\nSTATUS=serving export \"disk.img\" on unix:{}\n", nbd.display()));
    assert_eq!(hello, Ok(*b"NBDMAGIC"), "READY=1 came before the server answered clients");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(pending(&notify), None, "nothing more until a signal");

    let (code, out) = a.stop();
    assert_eq!(code, 0, "{out:?}");
    let stopping = recv(&notify);
    assert!(stopping.starts_with("STOPPING=1\nSTATUS=stopping"), "{stopping:?}");
    assert_eq!(pending(&notify), None, "one STOPPING=1, nothing after it");
}

#[test]
fn a_refused_start_is_never_reported_ready() {
    let rig = Rig::new();
    let notify_path = rig.d.path("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let missing = rig.d.path("no-such-disk.img");
    let mut cmd = attach_cmd(&rig.dev, &[&missing], &format!("unix:{}", rig.socket().display()), &[]);
    cmd.env("NOTIFY_SOCKET", &notify_path);
    let o = run_for(&mut cmd, 60).expect("a refused attach exits");
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert_eq!(pending(&notify), None);
}

#[test]
fn attach_runs_as_before_when_the_notify_socket_is_gone() {
    // systemd gone, or a stale variable: serving matters more than telling.
    let rig = Rig::new();
    let backing = rig.backing("disk.img", 64 << 20);
    let nbd = rig.socket();
    let mut cmd = attach_cmd(&rig.dev, &[&backing], &format!("unix:{}", nbd.display()), &[]);
    cmd.env("NOTIFY_SOCKET", rig.d.path("nobody-listens"));
    let a = Attach::spawn(cmd, &nbd);
    assert_eq!(greeting(&nbd), Ok(*b"NBDMAGIC"));
    assert_eq!(a.stop().0, 0);
}

/// The unit from contrib/systemd written into `dir` under its own name,
/// running the `pcache` this test built (systemd-analyze wants its
/// ExecStart to exist).
fn unit_in(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(contrib("pcache@.service")).unwrap();
    assert!(text.contains("ExecStart=/usr/local/bin/pcache attach "), "the unit's ExecStart moved");
    let unit = dir.join("pcache@.service");
    std::fs::write(&unit, text.replace("/usr/local/bin/pcache", env!("CARGO_BIN_EXE_pcache"))).unwrap();
    unit
}

fn contrib(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd").join(name)
}

fn systemd_analyze(args: &[&str]) -> std::process::Output {
    run(Command::new(tool("systemd-analyze", "systemd")).args(args))
}

#[test]
fn the_unit_passes_systemd_analyze_verify_without_a_warning() {
    let d = Dir::new();
    let unit = unit_in(d.dir.path());
    let o = systemd_analyze(&["verify", "--man=no", s(&unit)]);
    assert!(o.status.success() && o.stderr.is_empty(), "{}{}", stdout(&o), stderr(&o));
    // It would have said so: a misspelt setting is a warning, not a failure.
    std::fs::write(&unit, std::fs::read_to_string(&unit).unwrap().replace("ProtectHome=", "ProtectHom=")).unwrap();
    let o = systemd_analyze(&["verify", "--man=no", s(&unit)]);
    assert!(stderr(&o).contains("Unknown key 'ProtectHom'"), "{}", stderr(&o));
}

#[test]
fn the_units_hardening_keeps_its_exposure_level() {
    // 2.0 ("OK") with systemd 252; what is left is what a network block
    // server needs: the network, its devices, and root's device nodes.
    let d = Dir::new();
    let unit = unit_in(d.dir.path());
    let o = systemd_analyze(&["security", "--offline=true", "--threshold=20", s(&unit)]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    for must in ["Type=notify", "KillSignal=SIGTERM", "Restart=on-abnormal"] {
        assert!(std::fs::read_to_string(&unit).unwrap().contains(must), "{must}");
    }
    assert!(out.contains("✓ CapabilityBoundingSet=~CAP_SYS_ADMIN"), "{out}");
    assert!(out.contains("✓ MemoryDenyWriteExecute="), "{out}");
}

#[test]
fn the_example_environment_file_is_a_command_line_attach_takes() {
    let text = std::fs::read_to_string(contrib("pcache.env.example")).unwrap();
    let value = |key: &str| {
        let line = text.lines().find(|l| l.starts_with(&format!("{key}="))).unwrap_or_else(|| panic!("no {key}"));
        line[key.len() + 1..].trim_matches('"').to_string()
    };
    let unit = std::fs::read_to_string(contrib("pcache@.service")).unwrap();
    for key in ["PCACHE_DEVICE", "PCACHE_ARGS", "PCACHE_LISTEN"] {
        assert!(unit.contains(&format!("{{{key}}}")) || unit.contains(&format!("${key}")), "{key}");
    }
    let device = value("PCACHE_DEVICE");
    let mut args = vec!["attach", &device, "--listen", "unix:/run/pcache/x/nbd.sock"];
    let rest = value("PCACHE_ARGS");
    args.extend(rest.split_whitespace());
    // --help at the end answers only once everything before it parsed.
    args.push("--help");
    let o = pcache(&args);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    args.insert(4, "--no-such-option");
    assert_eq!(code(&pcache(&args)), 64);
}
