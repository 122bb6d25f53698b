//! What `attach` tells its user: how to connect to an export, and the
//! status line.

use std::sync::Arc;

use super::args::Listen;
use super::export::PmemCache;
use crate::units::human;

/// Percent-encodes an export name for an NBD URI; `keep` are further bytes
/// left as they are.
fn uri_escape(s: &[u8], keep: &[u8]) -> String {
    s.iter()
        .map(|&b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b if keep.contains(&b) => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Quotes `s` for a POSIX shell, only when it needs it: single quotes,
/// with each `'` written as `'\''`.
pub fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Command lines, ready to paste into a shell, that connect to export `name`.
pub fn how_to_connect(l: &Listen, name: &str) -> Vec<String> {
    let n = uri_escape(name.as_bytes(), &[]);
    let q = shell_quote(name);
    match l {
        Listen::Unix(path) => {
            let p = path.as_os_str().as_encoded_bytes();
            let uri = shell_quote(&format!("nbd+unix:///{n}?socket={}", uri_escape(p, b"/")));
            vec![
                format!("nbdinfo {uri}"),
                format!("qemu-io -f raw {uri}"),
                format!("nbd-client -unix {} /dev/nbd0 -N {q}", shell_quote(&path.to_string_lossy())),
            ]
        }
        Listen::Tcp(host, port) => {
            let h = if host.contains(':') { format!("[{host}]") } else { host.clone() };
            let uri = shell_quote(&format!("nbd://{h}:{port}/{n}"));
            vec![
                format!("nbdinfo {uri}"),
                format!("qemu-io -f raw {uri}"),
                format!("nbd-client {} {port} /dev/nbd0 -N {q}", shell_quote(host)),
            ]
        }
    }
}

/// One line about every export: hits, dirty data, segments in use, what
/// was written back, and any trouble.
pub fn status_line(exports: &[(String, Arc<PmemCache>)]) -> String {
    exports
        .iter()
        .map(|(name, c)| {
            let s = c.stats();
            let h = c.health();
            // A full cache that frees nothing (writeback held back or
            // failing): the reason a client hangs.
            let waiting = match s.space_waiters {
                0 => String::new(),
                n => format!(", {n} request(s) waiting for space"),
            };
            let trouble = h
                .writeback_stopped
                .or(h.gc_stopped)
                .or(h.writeback_failing)
                .map(|e| format!(", ERROR: {e}"))
                .unwrap_or_default();
            format!(
                "{name}: hits {} partial {} misses {}, dirty {}, segments {}/{}{waiting}, written back {}{trouble}",
                s.full_hits,
                s.partial_hits,
                s.misses,
                human(s.dirty_bytes),
                s.segments_used,
                s.segments,
                human(s.bytes_written_back)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        let l = how_to_connect(&Listen::Tcp("127.0.0.1".into(), 10809), "disk.img");
        assert_eq!(l[0], "nbdinfo nbd://127.0.0.1:10809/disk.img");
        assert_eq!(l[1], "qemu-io -f raw nbd://127.0.0.1:10809/disk.img");
        assert_eq!(l[2], "nbd-client 127.0.0.1 10809 /dev/nbd0 -N disk.img");
        let l = how_to_connect(&Listen::Tcp("::1".into(), 10809), "my disk");
        assert_eq!(l[0], "nbdinfo 'nbd://[::1]:10809/my%20disk'");
        assert_eq!(l[2], "nbd-client ::1 10809 /dev/nbd0 -N 'my disk'");
        let l = how_to_connect(&Listen::Unix("/run/p.sock".into()), "a b");
        assert_eq!(l[0], "nbdinfo 'nbd+unix:///a%20b?socket=/run/p.sock'");
        assert_eq!(l[2], "nbd-client -unix /run/p.sock /dev/nbd0 -N 'a b'");
        let l = how_to_connect(&Listen::Unix("/tmp/it's here/p&q%.sock".into()), "x'y");
        assert_eq!(l[0], "nbdinfo 'nbd+unix:///x%27y?socket=/tmp/it%27s%20here/p%26q%25.sock'");
        assert_eq!(l[2], r"nbd-client -unix '/tmp/it'\''s here/p&q%.sock' /dev/nbd0 -N 'x'\''y'");
        let l = how_to_connect(&Listen::Tcp("localhost".into(), 1), "");
        assert_eq!(l[0], "nbdinfo nbd://localhost:1/");
        assert_eq!(l[2], "nbd-client localhost 1 /dev/nbd0 -N ''");
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("plain/path-1.img"), "plain/path-1.img");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$HOME*?;`x`"), "'$HOME*?;`x`'");
    }
}
