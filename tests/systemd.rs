//! pcache under systemd: `attach` speaking the `Type=notify` protocol end
//! to end.

mod common;

use std::io::{ErrorKind, Read};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
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
