//! A remote backing store named by an NBD URI (the NBD project's
//! `doc/uri.md`, the forms libnbd and qemu accept):
//!
//! - `nbd://HOST[:PORT][/EXPORT]`, port 10809 by default;
//! - `nbd+unix:///[EXPORT]?socket=PATH`;
//! - `nbds://…` and `nbds+unix://…`: the same over TLS.
//!
//! The export name is the path without its first `/`, percent-decoded.
//! What a remote backing *is* ([`NbdUri::identity`]) does not depend on how
//! it is spelled: `nbd://localhost/disk` and `nbd://127.0.0.1:10809/disk`
//! are one backing, as are two paths to one Unix socket, and TLS or not.

use std::hash::{Hash, Hasher};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use crate::backing::BackingId;

/// The NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// How to reach the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// TCP to a host name or address and a port.
    Tcp {
        /// The host, as written (an IPv6 address without brackets).
        host: String,
        /// The port.
        port: u16,
    },
    /// A Unix socket.
    Unix {
        /// The socket's path.
        socket: PathBuf,
    },
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Whether the connection must be upgraded to TLS (`nbds`).
    pub tls: bool,
    /// How to reach the server.
    pub transport: Transport,
    /// The export's name ("" for the server's default export).
    pub export: String,
}

/// Whether `s` is meant as an NBD URI rather than a path: it starts with
/// one of the NBD schemes (a file named `nbd:x` in the current directory
/// is `./nbd:x`).
pub fn is_nbd_uri(s: &str) -> bool {
    let lower = s.get(..s.find("://").unwrap_or(0)).unwrap_or("").to_ascii_lowercase();
    matches!(lower.as_str(), "nbd" | "nbds" | "nbd+unix" | "nbds+unix" | "nbd+tcp" | "nbds+tcp")
}

impl NbdUri {
    /// Parses an NBD URI, refusing what this client cannot honour (vsock,
    /// query parameters it does not know, user names) with a reason.
    pub fn parse(s: &str) -> Result<Self, String> {
        let u = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URI: {e}"))?;
        let (tls, unix) = match u.scheme() {
            "nbd" | "nbd+tcp" => (false, false),
            "nbds" | "nbds+tcp" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            "nbd+vsock" | "nbds+vsock" => {
                return Err(format!("{s}: vsock is not supported; use nbd:// or nbd+unix://"));
            }
            other => return Err(format!("{s}: scheme {other:?} is not nbd, nbds, nbd+unix or nbds+unix")),
        };
        if !u.username().is_empty() || u.password().is_some() {
            return Err(format!("{s}: a user name in the URI is not supported (TLS with PSK is not offered)"));
        }
        if u.fragment().is_some() {
            return Err(format!("{s}: a URI fragment (#…) means nothing here"));
        }
        let mut socket = None;
        for (k, v) in u.query_pairs() {
            match k.as_ref() {
                "socket" if unix => socket = Some(PathBuf::from(v.as_ref())),
                _ => return Err(format!("{s}: query parameter {k:?} is not supported (only socket= with nbd+unix)")),
            }
        }
        let path = u.path();
        let raw = path.strip_prefix('/').unwrap_or(path);
        let export = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| format!("{s}: the export name is not UTF-8"))?
            .into_owned();
        if export.len() > 4096 || export.contains('\0') {
            return Err(format!("{s}: the export name is longer than 4096 bytes or holds a NUL"));
        }
        let transport = if unix {
            if u.host_str().is_some_and(|h| !h.is_empty()) || u.port().is_some() {
                return Err(format!("{s}: nbd+unix takes no host: nbd+unix:///EXPORT?socket=PATH"));
            }
            let socket = socket.ok_or_else(|| format!("{s}: nbd+unix needs ?socket=PATH"))?;
            if !socket.is_absolute() {
                return Err(format!("{s}: the socket path must be absolute"));
            }
            Transport::Unix { socket }
        } else {
            let host = match u.host() {
                Some(url::Host::Ipv6(a)) => a.to_string(),
                Some(h) => h.to_string(),
                None => "localhost".to_string(),
            };
            let host = if host.is_empty() { "localhost".to_string() } else { host };
            Transport::Tcp { host, port: u.port().unwrap_or(DEFAULT_PORT) }
        };
        Ok(Self { tls, transport, export })
    }

    /// The URI in its one normal form: lower-case scheme and host, the port
    /// written out, the export percent-encoded only where it must be, the
    /// socket path absolute and with its symlinks resolved where it exists.
    /// This is what a backing entry stores.
    pub fn normal(&self) -> String {
        use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
        const EXPORT: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'#').add(b'%').add(b'<').add(b'>').add(b'?');
        const QUERY: &AsciiSet = &EXPORT.add(b'&').add(b'=').add(b'+');
        let s = if self.tls { "s" } else { "" };
        let export = utf8_percent_encode(&self.export, EXPORT);
        match &self.transport {
            Transport::Tcp { host, port } => {
                let host = if host.contains(':') { format!("[{host}]") } else { host.to_ascii_lowercase() };
                format!("nbd{s}://{host}:{port}/{export}")
            }
            Transport::Unix { socket } => {
                let socket = std::fs::canonicalize(socket).unwrap_or_else(|_| socket.clone());
                let socket = utf8_percent_encode(&socket.to_string_lossy(), QUERY).to_string();
                format!("nbd{s}+unix:///{export}?socket={socket}")
            }
        }
    }

    /// The server's addresses, resolved now.
    pub fn addresses(&self) -> std::io::Result<Vec<SocketAddr>> {
        match &self.transport {
            Transport::Tcp { host, port } => Ok((host.as_str(), *port).to_socket_addrs()?.collect()),
            Transport::Unix { .. } => Ok(Vec::new()),
        }
    }

    /// What the export is, however the URI spells it: the server (its
    /// lowest resolved address and port, or the Unix socket's inode) and
    /// the export name. `None` when the host does not resolve or the socket
    /// does not exist.
    pub fn identity(&self) -> Option<BackingId> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        match &self.transport {
            Transport::Tcp { .. } => {
                let mut addrs = self.addresses().ok()?;
                addrs.sort();
                let first = addrs.first()?;
                ("tcp", normal_ip(first.ip()), first.port()).hash(&mut h);
            }
            Transport::Unix { socket } => {
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::metadata(socket).ok()?;
                ("unix", m.dev(), m.ino()).hash(&mut h);
            }
        }
        self.export.hash(&mut h);
        Some(BackingId::Remote { hash: h.finish() })
    }

    /// A name for messages: the URI as given, normalised.
    pub fn display(&self) -> String {
        self.normal()
    }
}

/// An address with IPv4-mapped IPv6 addresses as IPv4.
fn normal_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    }
}

/// The NBD URI a stored backing path is, if it is one.
pub fn stored_uri(path: &Path) -> Option<NbdUri> {
    let s = path.to_str()?;
    if is_nbd_uri(s) { NbdUri::parse(s).ok() } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Transport {
        Transport::Tcp { host: host.into(), port }
    }

    #[test]
    fn the_uri_forms_parse() {
        let u = NbdUri::parse("nbd://example.com/disk").unwrap();
        assert_eq!(u, NbdUri { tls: false, transport: tcp("example.com", 10809), export: "disk".into() });
        let u = NbdUri::parse("NBDS://[::1]:1234/a%20b/c").unwrap();
        assert_eq!(u, NbdUri { tls: true, transport: tcp("::1", 1234), export: "a b/c".into() });
        assert_eq!(u.normal(), "nbds://[::1]:1234/a%20b/c");
        let u = NbdUri::parse("nbd://localhost").unwrap();
        assert_eq!(u.export, "");
        assert_eq!(u.normal(), "nbd://localhost:10809/");
        let u = NbdUri::parse("nbd+unix:///disk?socket=/run/x%20y.sock").unwrap();
        assert_eq!(u.transport, Transport::Unix { socket: "/run/x y.sock".into() });
        assert_eq!(u.normal(), "nbd+unix:///disk?socket=/run/x%20y.sock");
        assert_eq!(NbdUri::parse(&u.normal()).unwrap(), u, "the normal form reads back");
    }

    #[test]
    fn what_cannot_be_honoured_is_refused() {
        for bad in [
            "nbd+unix:///disk",
            "nbd+unix://host/disk?socket=/s",
            "nbd+unix:///disk?socket=rel",
            "nbd://h/disk?socket=/s",
            "nbd://user@h/disk",
            "nbd://h/disk#x",
            "nbd+vsock://2/disk",
            "http://h/disk",
            "nbd://h:99999/disk",
            "nbd://h/%ff",
        ] {
            assert!(NbdUri::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_are_not_uris() {
        assert!(is_nbd_uri("nbd://h/x") && is_nbd_uri("NBD+UNIX:///x?socket=/s"));
        for p in ["/dev/sdb", "nbd:x", "./nbd://x", "disk.img", "", "http://h/x"] {
            assert!(!is_nbd_uri(p), "{p}");
        }
        assert_eq!(stored_uri(Path::new("/dev/sdb")), None);
        assert!(stored_uri(Path::new("nbd://127.0.0.1/x")).is_some());
    }

    #[test]
    fn one_export_under_two_spellings_is_one_backing() {
        let a = NbdUri::parse("nbd://127.0.0.1/disk").unwrap().identity().unwrap();
        let b = NbdUri::parse("nbds://127.0.0.1:10809/disk").unwrap().identity().unwrap();
        let c = NbdUri::parse("nbd://[::ffff:127.0.0.1]:10809/disk").unwrap().identity().unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_ne!(a, NbdUri::parse("nbd://127.0.0.1/other").unwrap().identity().unwrap());
        assert_ne!(a, NbdUri::parse("nbd://127.0.0.1:10810/disk").unwrap().identity().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::os::unix::fs::symlink(&sock, dir.path().join("link")).unwrap();
        let u1 = NbdUri::parse(&format!("nbd+unix:///d?socket={}", sock.display())).unwrap();
        let u2 = NbdUri::parse(&format!("nbd+unix:///d?socket={}/link", dir.path().display())).unwrap();
        assert_eq!(u1.identity().unwrap(), u2.identity().unwrap());
        assert_eq!(u1.normal(), u2.normal(), "the socket's path is resolved");
        assert_eq!(NbdUri::parse("nbd+unix:///d?socket=/nonexistent/s").unwrap().identity(), None);
    }
}
