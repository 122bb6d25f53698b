//! A remote backing store named by an NBD URI (the NBD project's
//! `doc/uri.md`, the forms libnbd and qemu accept):
//!
//! - `nbd://HOST[:PORT][/EXPORT]`, port 10809 by default;
//! - `nbd+unix:///[EXPORT]?socket=PATH`;
//! - `nbds://…` and `nbds+unix://…`: the same over TLS.
//!
//! The export name is the path without its first `/`, percent-decoded. With
//! TLS, `tls-certificates=DIR` names the directory of `ca-cert.pem` (and
//! `client-cert.pem`, `client-key.pem` for servers that verify clients),
//! as libnbd, nbdkit and qemu lay it out, and `tls-hostname=NAME` the name
//! the server's certificate must carry (default: the host, or `localhost`
//! over a Unix socket).
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
    /// `tls-certificates`: the directory of the TLS certificates.
    pub tls_certificates: Option<PathBuf>,
    /// `tls-hostname`: the name to verify the server's certificate against.
    pub tls_hostname: Option<String>,
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
        let (mut socket, mut tls_certificates, mut tls_hostname) = (None, None, None);
        for (k, v) in u.query_pairs() {
            match k.as_ref() {
                "socket" if unix => socket = Some(PathBuf::from(v.as_ref())),
                "tls-certificates" if tls => tls_certificates = Some(PathBuf::from(v.as_ref())),
                "tls-hostname" if tls => tls_hostname = Some(v.into_owned()),
                _ => {
                    return Err(format!(
                        "{s}: query parameter {k:?} is not supported here (socket= with nbd+unix; \
                         tls-certificates= and tls-hostname= with nbds)"
                    ));
                }
            }
        }
        if tls && tls_certificates.is_none() {
            return Err(format!(
                "{s}: nbds needs ?tls-certificates=DIR, the directory of ca-cert.pem (and client-cert.pem and \
                 client-key.pem if the server verifies clients)"
            ));
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
        Ok(Self { tls, transport, export, tls_certificates, tls_hostname })
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
        let path = |p: &Path| {
            let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            utf8_percent_encode(&p.to_string_lossy(), QUERY).to_string()
        };
        let mut query = Vec::new();
        let uri = match &self.transport {
            Transport::Tcp { host, port } => {
                let host = if host.contains(':') { format!("[{host}]") } else { host.to_ascii_lowercase() };
                format!("nbd{s}://{host}:{port}/{export}")
            }
            Transport::Unix { socket } => {
                query.push(format!("socket={}", path(socket)));
                format!("nbd{s}+unix:///{export}")
            }
        };
        if let Some(dir) = &self.tls_certificates {
            query.push(format!("tls-certificates={}", path(dir)));
        }
        if let Some(h) = &self.tls_hostname {
            query.push(format!("tls-hostname={}", utf8_percent_encode(h, QUERY)));
        }
        if query.is_empty() { uri } else { format!("{uri}?{}", query.join("&")) }
    }

    /// The name the server's certificate must carry.
    pub fn tls_name(&self) -> String {
        match (&self.tls_hostname, &self.transport) {
            (Some(h), _) => h.clone(),
            (None, Transport::Tcp { host, .. }) => host.clone(),
            (None, Transport::Unix { .. }) => "localhost".into(),
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
        let plain = |transport, export: &str| NbdUri {
            tls: false,
            transport,
            export: export.into(),
            tls_certificates: None,
            tls_hostname: None,
        };
        assert_eq!(u, plain(tcp("example.com", 10809), "disk"));
        let u = NbdUri::parse("NBDS://[::1]:1234/a%20b/c?tls-certificates=/nonexistent/pki").unwrap();
        let want =
            NbdUri { tls: true, tls_certificates: Some("/nonexistent/pki".into()), ..plain(tcp("::1", 1234), "a b/c") };
        assert_eq!(u, want);
        assert_eq!(u.normal(), "nbds://[::1]:1234/a%20b/c?tls-certificates=/nonexistent/pki");
        assert_eq!(u.tls_name(), "::1");
        let u = NbdUri::parse("nbds+unix:///d?socket=/s&tls-certificates=/p&tls-hostname=store.example").unwrap();
        assert_eq!(u.tls_name(), "store.example");
        assert_eq!(NbdUri::parse(&u.normal()).unwrap(), u);
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
            "nbds://h/disk",
            "nbd://h/disk?tls-certificates=/p",
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
        let b = NbdUri::parse("nbds://127.0.0.1:10809/disk?tls-certificates=/p").unwrap().identity().unwrap();
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
