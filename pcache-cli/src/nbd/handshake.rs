//! The fixed newstyle handshake: the server's greeting, then options until
//! one picks an export (`GO` or `EXPORT_NAME`) or the client gives up.

use std::io::{self, Read, Write};

use zerocopy::IntoBytes;
use zerocopy::network_endian::{U16, U32};

use super::device::Export;
use super::error::{NbdError, Violation};
use super::wire::*;

/// Largest option payload the server reads.
const MAX_OPTION: u32 = 64 << 10;
/// Largest option payload the server skips (with `REP_ERR_TOO_BIG`) rather
/// than disconnect.
const MAX_OPTION_SKIPPED: u32 = 16 << 20;

/// What the handshake agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Index of the export in the list served.
    pub export: usize,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Extended headers negotiated (structured replies with them).
    pub extended: bool,
    /// `base:allocation` selected for this export.
    pub block_status: bool,
}

impl From<Session> for super::Framing {
    fn from(s: Session) -> Self {
        Self { structured: s.structured || s.extended, extended: s.extended, block_status: s.block_status }
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`:
/// the export's name and the queries, every byte accounted for.
fn meta_request(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    fn take(d: &[u8]) -> Option<(u32, &[u8])> {
        let (n, rest) = d.split_at_checked(4)?;
        Some((u32::from_be_bytes(n.try_into().ok()?), rest))
    }
    let (name_len, rest) = take(data)?;
    let (name, rest) = rest.split_at_checked(name_len as usize)?;
    let (count, mut rest) = take(rest)?;
    let mut queries = Vec::new();
    for _ in 0..count {
        let (len, tail) = take(rest)?;
        let (q, tail) = tail.split_at_checked(len as usize)?;
        queries.push(q);
        rest = tail;
    }
    rest.is_empty().then_some((name, queries))
}

/// Where the handshake goes after an option.
enum Step {
    /// Another option.
    More,
    /// Transmission, with this session.
    Serve(Session),
    /// The end of the connection, without transmission.
    Close,
    /// `NBD_OPT_STARTTLS` acknowledged: TLS starts now.
    StartTls,
}

/// TLS on this connection, as far as the handshake is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsState {
    /// Not offered: `STARTTLS` is refused by policy.
    Off,
    /// Required and not started yet: every option but `STARTTLS` and
    /// `ABORT` is refused with `REP_ERR_TLS_REQD` (FORCEDTLS).
    Required,
    /// Running.
    Active,
}

/// How a handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Transmission, with this session.
    Serve(Session),
    /// The client left, or asked for what cannot be answered.
    Close,
    /// The client asked for TLS and it was acknowledged: run the TLS
    /// handshake on the socket, then [`negotiate_with`] again over it
    /// with [`TlsState::Active`] and `resume` set to `no_zeroes`.
    StartTls {
        /// The client flag, kept for after TLS.
        no_zeroes: bool,
    },
}

/// Runs the handshake: returns the session to serve, or `None` when the
/// client aborted or asked for an export that does not exist with
/// `NBD_OPT_EXPORT_NAME` (which cannot be answered with an error).
pub fn negotiate<R: Read, W: Write>(r: &mut R, w: &mut W, exports: &[Export]) -> Result<Option<Session>, NbdError> {
    match negotiate_with(r, w, exports, TlsState::Off, None)? {
        Outcome::Serve(s) => Ok(Some(s)),
        Outcome::Close | Outcome::StartTls { .. } => Ok(None),
    }
}

/// The handshake with TLS in `tls` state. `resume` is `None` on a new
/// connection (the greeting is sent and the client's flags read), or the
/// client's no-zeroes flag when it goes on over TLS just started.
pub fn negotiate_with<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    exports: &[Export],
    tls: TlsState,
    resume: Option<bool>,
) -> Result<Outcome, NbdError> {
    let no_zeroes = match resume {
        Some(no_zeroes) => no_zeroes,
        None => {
            w.write_all(&encode_hello())?;
            w.flush()?;
            let client = read_header::<U32, _>(r)?.get();
            if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                return Err(Violation::ClientFlags { flags: client }.into());
            }
            client & FLAG_C_NO_ZEROES != 0
        }
    };
    let mut haggle = Haggle { w, exports, no_zeroes, structured: false, extended: false, meta: None, tls };
    loop {
        haggle.w.flush()?;
        let header: OptionHeader = read_header(r)?;
        let magic = header.magic.get();
        if magic != IHAVEOPT {
            return Err(Violation::OptionMagic { found: magic }.into());
        }
        let (option, length) = (header.option.get(), header.length.get());
        if length > MAX_OPTION {
            // Too large to take; skip it only if it is sane to read.
            if option == OPT_EXPORT_NAME || length > MAX_OPTION_SKIPPED {
                return Err(Violation::OptionTooLarge { option, length }.into());
            }
            io::copy(&mut r.by_ref().take(u64::from(length)), &mut io::sink())?;
            option_reply(haggle.w, option, REP_ERR_TOO_BIG, b"option too large")?;
            continue;
        }
        let mut data = vec![0u8; length as usize];
        r.read_exact(&mut data)?;
        match haggle.option(option, &data)? {
            Step::More => {}
            Step::Serve(session) => return Ok(Outcome::Serve(session)),
            Step::Close => return Ok(Outcome::Close),
            Step::StartTls => return Ok(Outcome::StartTls { no_zeroes }),
        }
    }
}

/// Sends a reply to option `opt`, in one write.
fn option_reply<W: Write>(w: &mut W, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&encode_option_reply(opt, kind, data))
}

/// The length of option data, which the server keeps far below 4 GiB.
fn len32(data: &[u8]) -> u32 {
    u32::try_from(data.len()).unwrap_or(u32::MAX)
}

/// The export a client names (empty: the first).
fn find_export(exports: &[Export], name: &[u8]) -> Option<usize> {
    if name.is_empty() {
        return (!exports.is_empty()).then_some(0);
    }
    exports.iter().position(|e| e.name.as_bytes() == name)
}

/// The handshake's state between options.
struct Haggle<'a, W> {
    w: &'a mut W,
    exports: &'a [Export],
    /// The client asked for no zeroes after `EXPORT_NAME`'s reply.
    no_zeroes: bool,
    /// Structured replies were acknowledged.
    structured: bool,
    /// Extended headers were acknowledged.
    extended: bool,
    /// The export `base:allocation` was selected for, if it was.
    meta: Option<usize>,
    /// TLS.
    tls: TlsState,
}

impl<W: Write> Haggle<'_, W> {
    /// Answers option `opt` with `data`.
    fn option(&mut self, opt: u32, data: &[u8]) -> Result<Step, NbdError> {
        if self.tls == TlsState::Required && !matches!(opt, OPT_STARTTLS | OPT_ABORT) {
            // EXPORT_NAME cannot be answered with an error.
            if opt == OPT_EXPORT_NAME {
                return Ok(Step::Close);
            }
            option_reply(self.w, opt, REP_ERR_TLS_REQD, b"TLS is required: send NBD_OPT_STARTTLS first")?;
            return Ok(Step::More);
        }
        match opt {
            OPT_EXPORT_NAME => return self.export_name(data),
            OPT_ABORT => {
                // The client is leaving: it may not wait for the ack.
                let _ = option_reply(self.w, opt, REP_ACK, &[]);
                let _ = self.w.flush();
                return Ok(Step::Close);
            }
            OPT_LIST => self.list(data)?,
            OPT_INFO | OPT_GO => return self.info(opt, data),
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                option_reply(self.w, opt, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?;
            }
            OPT_STRUCTURED_REPLY if self.extended => {
                option_reply(self.w, opt, REP_ERR_EXT_HEADER_REQD, b"extended headers are already in use")?;
            }
            OPT_STRUCTURED_REPLY => {
                self.structured = true;
                option_reply(self.w, opt, REP_ACK, &[])?;
            }
            OPT_EXTENDED_HEADERS if !data.is_empty() => {
                option_reply(self.w, opt, REP_ERR_INVALID, b"NBD_OPT_EXTENDED_HEADERS takes no data")?;
            }
            OPT_EXTENDED_HEADERS => {
                self.extended = true;
                self.structured = true;
                option_reply(self.w, opt, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(opt, data)?,
            OPT_STARTTLS => match self.tls {
                TlsState::Off => option_reply(self.w, opt, REP_ERR_POLICY, b"TLS is not offered")?,
                TlsState::Active => option_reply(self.w, opt, REP_ERR_INVALID, b"TLS is already running")?,
                TlsState::Required if !data.is_empty() => {
                    option_reply(self.w, opt, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")?;
                }
                TlsState::Required => {
                    option_reply(self.w, opt, REP_ACK, &[])?;
                    self.w.flush()?;
                    return Ok(Step::StartTls);
                }
            },
            _ => option_reply(self.w, opt, REP_ERR_UNSUP, b"option not supported")?,
        }
        Ok(Step::More)
    }

    /// `NBD_OPT_EXPORT_NAME`: the export's size and flags, then
    /// transmission; an unknown name can only be answered by closing.
    fn export_name(&mut self, name: &[u8]) -> Result<Step, NbdError> {
        // Not allowed with extended headers: it cannot say an error.
        if self.extended {
            return Ok(Step::Close);
        }
        let Some(export) = find_export(self.exports, name) else { return Ok(Step::Close) };
        let reply =
            ExportNameReply { size: self.exports[export].device.size().into(), flags: TRANSMISSION_FLAGS.into() };
        let padding = if self.no_zeroes { 0 } else { EXPORT_NAME_PADDING };
        self.w.write_all(&[reply.as_bytes(), &[0u8; EXPORT_NAME_PADDING][..padding]].concat())?;
        self.w.flush()?;
        Ok(Step::Serve(self.session(export)))
    }

    /// The session for `export`: block status only if it was selected for
    /// this export.
    fn session(&self, export: usize) -> Session {
        Session {
            export,
            structured: self.structured,
            extended: self.extended,
            block_status: self.meta == Some(export),
        }
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: the one
    /// context is `base:allocation`; listing with no query, or `base:`,
    /// names it; setting it selects it for the named export.
    fn meta_context(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        if !self.structured {
            return option_reply(self.w, opt, REP_ERR_INVALID, b"negotiate structured replies first");
        }
        let Some((name, queries)) = meta_request(data) else {
            return option_reply(self.w, opt, REP_ERR_INVALID, b"malformed metadata context request");
        };
        let Some(export) = find_export(self.exports, name) else {
            let msg = format!("no export named {:?}", String::from_utf8_lossy(name));
            return option_reply(self.w, opt, REP_ERR_UNKNOWN, msg.as_bytes());
        };
        let matches = |q: &[u8]| q == BASE_ALLOCATION.as_bytes() || (opt == OPT_LIST_META_CONTEXT && q == b"base:");
        let found =
            if opt == OPT_LIST_META_CONTEXT && queries.is_empty() { true } else { queries.iter().any(|q| matches(q)) };
        if opt == OPT_SET_META_CONTEXT {
            self.meta = found.then_some(export);
        }
        if found {
            let id = if opt == OPT_SET_META_CONTEXT { BASE_ALLOCATION_ID } else { 0 };
            let reply = [U32::new(id).as_bytes(), BASE_ALLOCATION.as_bytes()].concat();
            option_reply(self.w, opt, REP_META_CONTEXT, &reply)?;
        }
        option_reply(self.w, opt, REP_ACK, &[])
    }

    /// `NBD_OPT_LIST`: one reply per export.
    fn list(&mut self, data: &[u8]) -> io::Result<()> {
        if !data.is_empty() {
            return option_reply(self.w, OPT_LIST, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
        }
        for e in self.exports {
            let name = e.name.as_bytes();
            let server = [U32::new(len32(name)).as_bytes(), name, e.description.as_bytes()].concat();
            option_reply(self.w, OPT_LIST, REP_SERVER, &server)?;
        }
        option_reply(self.w, OPT_LIST, REP_ACK, &[])
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`: the export's size, flags and block
    /// sizes, its name and description if asked for; `GO` then starts
    /// transmission.
    fn info(&mut self, opt: u32, data: &[u8]) -> Result<Step, NbdError> {
        let asked = match InfoRequest::parse(data) {
            Ok(asked) => asked,
            Err(e) => {
                option_reply(self.w, opt, REP_ERR_INVALID, e.to_string().as_bytes())?;
                return Ok(Step::More);
            }
        };
        let Some(export) = find_export(self.exports, asked.name) else {
            let msg = format!("no export named {:?}", String::from_utf8_lossy(asked.name));
            option_reply(self.w, opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
            return Ok(Step::More);
        };
        let e = &self.exports[export];
        let size =
            InfoExport { info: INFO_EXPORT.into(), size: e.device.size().into(), flags: TRANSMISSION_FLAGS.into() };
        option_reply(self.w, opt, REP_INFO, size.as_bytes())?;
        let block = InfoBlockSize {
            info: INFO_BLOCK_SIZE.into(),
            minimum: MIN_BLOCK.into(),
            preferred: PREFERRED_BLOCK.into(),
            maximum: MAX_REQUEST.into(),
        };
        option_reply(self.w, opt, REP_INFO, block.as_bytes())?;
        for (info, text) in [(INFO_NAME, &e.name), (INFO_DESCRIPTION, &e.description)] {
            if asked.wants(info) {
                option_reply(self.w, opt, REP_INFO, &[U16::new(info).as_bytes(), text.as_bytes()].concat())?;
            }
        }
        option_reply(self.w, opt, REP_ACK, &[])?;
        if opt != OPT_GO {
            return Ok(Step::More);
        }
        self.w.flush()?;
        Ok(Step::Serve(self.session(export)))
    }
}

#[cfg(test)]
mod tests {
    use zerocopy::FromBytes;

    use super::*;
    use crate::nbd::test_util::exports;

    fn go(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        encode_option(OPT_GO, &d)
    }

    /// The option replies after the greeting: option, kind, data.
    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        let mut rest = &out[size_of::<ServerHello>()..];
        while let Ok((h, tail)) = OptionReplyHeader::read_from_prefix(rest) {
            assert_eq!(h.magic.get(), REP_MAGIC);
            let (data, tail) = tail.split_at(h.length.get() as usize);
            v.push((h.option.get(), h.kind.get(), data.to_vec()));
            rest = tail;
        }
        v
    }

    #[test]
    fn handshake_go_list_info_and_errors() {
        let (ex, _) = exports(1 << 20);
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        input.extend(encode_option(OPT_LIST, &[]));
        input.extend(encode_option(OPT_LIST, b"x"));
        input.extend(encode_option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(encode_option(99, b"whatever"));
        input.extend(encode_option(OPT_STARTTLS, &[]));
        input.extend(encode_option(OPT_INFO, &[0, 0, 0, 9, 1]));
        input.extend(go("nope"));
        input.extend(go("disk"));
        let mut out = Vec::new();
        let s = negotiate(&mut &input[..], &mut out, &ex).unwrap().unwrap();
        assert_eq!(s, Session { export: 0, structured: true, extended: false, block_status: false });
        assert_eq!(&out[..8], &NBDMAGIC.to_be_bytes());
        let r = replies(&out);
        let kinds: Vec<(u32, u32)> = r.iter().map(|(o, k, _)| (*o, *k)).collect();
        assert_eq!(
            kinds,
            vec![
                (OPT_LIST, REP_SERVER),
                (OPT_LIST, REP_ACK),
                (OPT_LIST, REP_ERR_INVALID),
                (OPT_STRUCTURED_REPLY, REP_ACK),
                (99, REP_ERR_UNSUP),
                (OPT_STARTTLS, REP_ERR_POLICY),
                (OPT_INFO, REP_ERR_INVALID),
                (OPT_GO, REP_ERR_UNKNOWN),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_ACK),
            ]
        );
        assert_eq!(&r[0].2[4..8], b"disk");
        // INFO_EXPORT: size and flags.
        assert_eq!(&r[8].2[2..10], &(1u64 << 20).to_be_bytes());
        assert_eq!(&r[8].2[10..12], &TRANSMISSION_FLAGS.to_be_bytes());
        // Block sizes 1 / 4096 / 32 MiB.
        assert_eq!(&r[9].2[2..], &[0, 0, 0, 1, 0, 0, 16, 0, 2, 0, 0, 0]);
        assert_eq!(&r[10].2[2..], b"disk");
    }

    #[test]
    fn export_name_and_abort_and_bad_magic() {
        let (ex, _) = exports(4096);
        let mut input = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
        input.extend(encode_option(OPT_EXPORT_NAME, b""));
        let mut out = Vec::new();
        assert_eq!(
            negotiate(&mut &input[..], &mut out, &ex).unwrap().unwrap(),
            Session { export: 0, structured: false, extended: false, block_status: false }
        );
        assert_eq!(out.len(), 18 + 10, "no zeroes");
        // Without NO_ZEROES, 124 zero bytes follow the size and flags.
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        input.extend(encode_option(OPT_EXPORT_NAME, b"disk"));
        let mut out = Vec::new();
        negotiate(&mut &input[..], &mut out, &ex).unwrap().unwrap();
        assert_eq!(out.len(), 18 + 10 + 124);
        assert!(out[28..].iter().all(|&b| b == 0));
        // Structured replies, once acknowledged, hold after EXPORT_NAME too.
        let mut input = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
        input.extend(encode_option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(encode_option(OPT_EXPORT_NAME, b"disk"));
        let s = negotiate(&mut &input[..], &mut Vec::new(), &ex).unwrap().unwrap();
        assert_eq!(s, Session { export: 0, structured: true, extended: false, block_status: false });
        let mut input = 0u32.to_be_bytes().to_vec();
        input.extend(encode_option(OPT_EXPORT_NAME, b"missing"));
        assert!(negotiate(&mut &input[..], &mut Vec::new(), &ex).unwrap().is_none());
        let mut input = 0u32.to_be_bytes().to_vec();
        input.extend(encode_option(OPT_ABORT, &[]));
        assert!(negotiate(&mut &input[..], &mut Vec::new(), &ex).unwrap().is_none());
        let mut input = 0u32.to_be_bytes().to_vec();
        input.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 1, 0, 0, 0, 0]);
        let bad_magic = negotiate(&mut &input[..], &mut Vec::new(), &ex);
        assert!(matches!(bad_magic, Err(NbdError::Protocol(Violation::OptionMagic { found: 0x0102_0304_0506_0708 }))));
        let input = 0x80u32.to_be_bytes().to_vec();
        let bad_flags = negotiate(&mut &input[..], &mut Vec::new(), &ex);
        assert!(matches!(bad_flags, Err(NbdError::Protocol(Violation::ClientFlags { flags: 0x80 }))));
        // A truncated stream is an I/O error, not a panic.
        let mut input = 0u32.to_be_bytes().to_vec();
        input.extend(&encode_option(OPT_GO, &[0, 0, 0, 4])[..20]);
        assert!(matches!(negotiate(&mut &input[..], &mut Vec::new(), &ex), Err(NbdError::Io(_))));
    }

    #[test]
    fn large_options_are_skipped_or_refused() {
        let (ex, _) = exports(4096);
        let mut input = 0u32.to_be_bytes().to_vec();
        input.extend(encode_option(OPT_LIST, &vec![0; MAX_OPTION as usize + 1]));
        input.extend(encode_option(OPT_ABORT, &[]));
        let mut out = Vec::new();
        assert!(negotiate(&mut &input[..], &mut out, &ex).unwrap().is_none());
        let kinds: Vec<_> = replies(&out).iter().map(|(o, k, _)| (*o, *k)).collect();
        assert_eq!(kinds, vec![(OPT_LIST, REP_ERR_TOO_BIG), (OPT_ABORT, REP_ACK)]);
        let mut input = 0u32.to_be_bytes().to_vec();
        input.extend(&encode_option(OPT_EXPORT_NAME, &[])[..12]);
        input.extend((MAX_OPTION + 1).to_be_bytes());
        let r = negotiate(&mut &input[..], &mut Vec::new(), &ex);
        assert!(matches!(r, Err(NbdError::Protocol(Violation::OptionTooLarge { option: OPT_EXPORT_NAME, .. }))));
    }

    fn meta(opt: u32, name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        encode_option(opt, &d)
    }

    /// Metadata contexts need structured replies first, name a real export,
    /// and select `base:allocation` for that export only; extended headers
    /// are acknowledged and rule out a later `STRUCTURED_REPLY`.
    #[test]
    fn meta_contexts_and_extended_headers() {
        let (ex, _) = exports(1 << 20);
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(meta(OPT_SET_META_CONTEXT, "disk", &[BASE_ALLOCATION]));
        input.extend(encode_option(OPT_EXTENDED_HEADERS, b"x"));
        input.extend(encode_option(OPT_EXTENDED_HEADERS, &[]));
        input.extend(encode_option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(meta(OPT_LIST_META_CONTEXT, "disk", &[]));
        input.extend(meta(OPT_LIST_META_CONTEXT, "disk", &["qemu:dirty-bitmap:x"]));
        input.extend(meta(OPT_SET_META_CONTEXT, "nope", &[BASE_ALLOCATION]));
        input.extend(encode_option(OPT_SET_META_CONTEXT, &[0, 0, 0, 9]));
        input.extend(meta(OPT_SET_META_CONTEXT, "disk", &["x-foo:bar", BASE_ALLOCATION]));
        input.extend(go("disk"));
        let mut out = Vec::new();
        let s = negotiate(&mut &input[..], &mut out, &ex).unwrap().unwrap();
        assert_eq!(s, Session { export: 0, structured: true, extended: true, block_status: true });
        let kinds: Vec<(u32, u32)> = replies(&out).iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(
            &kinds[..11],
            &[
                (OPT_SET_META_CONTEXT, REP_ERR_INVALID),
                (OPT_EXTENDED_HEADERS, REP_ERR_INVALID),
                (OPT_EXTENDED_HEADERS, REP_ACK),
                (OPT_STRUCTURED_REPLY, REP_ERR_EXT_HEADER_REQD),
                (OPT_LIST_META_CONTEXT, REP_META_CONTEXT),
                (OPT_LIST_META_CONTEXT, REP_ACK),
                (OPT_LIST_META_CONTEXT, REP_ACK),
                (OPT_SET_META_CONTEXT, REP_ERR_UNKNOWN),
                (OPT_SET_META_CONTEXT, REP_ERR_INVALID),
                (OPT_SET_META_CONTEXT, REP_META_CONTEXT),
                (OPT_SET_META_CONTEXT, REP_ACK),
            ]
        );
        let r = replies(&out);
        assert_eq!(&r[9].2[..4], &BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(&r[9].2[4..], BASE_ALLOCATION.as_bytes());
        // Selected for another export than the one chosen: no block status.
        let (mut ex2, _) = exports(1 << 20);
        ex2.push(Export { name: "other".into(), description: String::new(), device: ex2[0].device.clone() });
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(encode_option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(meta(OPT_SET_META_CONTEXT, "other", &[BASE_ALLOCATION]));
        input.extend(go("disk"));
        let s = negotiate(&mut &input[..], &mut Vec::new(), &ex2).unwrap().unwrap();
        assert!(s.structured && !s.block_status && !s.extended);
    }
}
