//! Telling a service manager how `attach` is doing: systemd's `Type=notify`
//! protocol (sd_notify(3)). Where `NOTIFY_SOCKET` is set (systemd sets it
//! for a `Type=notify` service), `READY=1` is sent once every export is
//! served — the socket listens and every cache has started — and
//! `STOPPING=1` as soon as SIGINT or SIGTERM asks the server to stop, each
//! with a `STATUS=` line that `systemctl status` shows. Without the variable
//! nothing is sent.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the Unix socket the
//! variable names: a path, or an abstract socket when it starts with `@`.
//! It is spoken here rather than through the `sd-notify` crate, which
//! connects to the value as a path and so cannot reach an abstract socket.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use tracing::warn;

use super::args::Listen;

/// The variable naming the socket to notify.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Says that every export is served: `READY=1`, and what is served where.
pub fn ready<'a>(listen: &Listen, exports: impl IntoIterator<Item = &'a str>) {
    notify(&ready_message(listen, exports));
}

/// Says that the server is stopping: `STOPPING=1`.
pub fn stopping() {
    notify(STOPPING);
}

/// What [`stopping`] sends.
const STOPPING: &str = "STOPPING=1\nSTATUS=stopping: finishing the requests in flight, then closing every kset\n";

/// What [`ready`] sends.
fn ready_message<'a>(listen: &Listen, exports: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<&str> = exports.into_iter().collect();
    let status = match names.as_slice() {
        [one] => format!("serving export {one:?} on {listen}"),
        many => format!("serving {} exports ({}) on {listen}", many.len(), many.join(", ")),
    };
    // A status is one line.
    format!("READY=1\nSTATUS={}\n", status.replace('\n', " "))
}

/// Sends `msg` where `NOTIFY_SOCKET` says, if it says; a failure is only
/// warned about: serving matters more than being seen to serve.
fn notify(msg: &str) {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET).filter(|t| !t.is_empty()) else {
        return;
    };
    if let Err(e) = send(&target, msg) {
        warn!(socket = %target.to_string_lossy(), error = %e, "cannot notify the service manager");
    }
}

/// Sends `msg` as one datagram to the socket `target` names.
fn send(target: &OsStr, msg: &str) -> io::Result<()> {
    let addr = address(target)?;
    let sent = UnixDatagram::unbound()?.send_to_addr(msg.as_bytes(), &addr)?;
    if sent != msg.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, format!("sent {sent} of {} bytes", msg.len())));
    }
    Ok(())
}

/// The socket address `NOTIFY_SOCKET` names: an absolute path, or `@NAME`
/// for the abstract socket NAME.
fn address(target: &OsStr) -> io::Result<SocketAddr> {
    match target.as_bytes() {
        [b'/', ..] => SocketAddr::from_pathname(target),
        [b'@', name @ ..] => SocketAddr::from_abstract_name(name),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither an absolute path nor @NAME (an abstract socket); this is all pcache speaks",
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn receiver(addr: &SocketAddr) -> UnixDatagram {
        let sock = UnixDatagram::bind_addr(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sock
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn a_path_socket_gets_the_message_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = receiver(&SocketAddr::from_pathname(&path).unwrap());
        send(path.as_os_str(), STOPPING).unwrap();
        assert_eq!(recv(&sock), STOPPING);
    }

    #[test]
    fn an_at_sign_names_an_abstract_socket() {
        let name = format!("pcache-notify-test-{}", std::process::id());
        let sock = receiver(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap());
        send(OsStr::new(&format!("@{name}")), "READY=1\n").unwrap();
        assert_eq!(recv(&sock), "READY=1\n");
        // Not a path of that name.
        assert!(!std::path::Path::new(&format!("@{name}")).exists());
    }

    #[test]
    fn other_addresses_are_refused_not_guessed() {
        for bad in ["notify.sock", "vsock:2:1234", "./notify.sock"] {
            let e = send(OsStr::new(bad), "READY=1\n").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad}: {e}");
        }
        // A socket nobody listens on: an error to warn about, not a panic.
        let dir = tempfile::tempdir().unwrap();
        assert!(send(dir.path().join("nobody").as_os_str(), "READY=1\n").is_err());
    }

    #[test]
    fn ready_says_what_is_served_where() {
        let unix = Listen::Unix("/run/pcache/a/nbd.sock".into());
        assert_eq!(
            ready_message(&unix, ["disk"]),
            "READY=1\nSTATUS=serving export \"disk\" on unix:/run/pcache/a/nbd.sock\n"
        );
        let tcp = Listen::Tcp("127.0.0.1".into(), 10809);
        assert_eq!(
            ready_message(&tcp, ["a", "b\nc"]),
            "READY=1\nSTATUS=serving 2 exports (a, b c) on tcp:127.0.0.1:10809\n"
        );
        assert!(STOPPING.starts_with("STOPPING=1\nSTATUS=") && STOPPING.ends_with('\n'));
        assert_eq!(STOPPING.lines().count(), 2);
    }
}
