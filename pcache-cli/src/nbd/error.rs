//! Why a connection ends, and what a client can do wrong.

use std::io;

/// Why a connection ended other than by `NBD_CMD_DISC`.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed or closed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol; the server disconnected.
    #[error("protocol violation: {0}")]
    Protocol(#[from] Violation),
}

/// What a client did wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// Client flags this server does not know.
    #[error("unknown client flags {flags:#x}")]
    ClientFlags {
        /// The flags sent.
        flags: u32,
    },
    /// An option that does not start with `IHAVEOPT`.
    #[error("bad option magic {found:#x}")]
    OptionMagic {
        /// The magic sent.
        found: u64,
    },
    /// An option too large to read, or to skip sensibly.
    #[error("option {option} of {length} bytes")]
    OptionTooLarge {
        /// The option.
        option: u32,
        /// Its length.
        length: u32,
    },
    /// The data of `NBD_OPT_INFO` or `NBD_OPT_GO` does not parse (the
    /// option gets an error reply; the connection goes on).
    #[error("malformed NBD_OPT_INFO/GO: {why}")]
    InfoRequest {
        /// What is wrong with it.
        why: &'static str,
    },
    /// A request that does not start with the request magic.
    #[error("bad request magic {found:#x}")]
    RequestMagic {
        /// The magic sent.
        found: u32,
    },
    /// A write whose payload is too large to read, or to skip sensibly.
    #[error("write of {length} bytes")]
    WriteTooLarge {
        /// Its length.
        length: u64,
    },
    /// A worker could not send a reply: the connection is broken.
    #[error("a reply could not be sent")]
    ReplyFailed,
    /// The workers of the connection stopped.
    #[error("workers stopped")]
    WorkersStopped,
}
