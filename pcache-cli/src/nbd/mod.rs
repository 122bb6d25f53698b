//! An NBD server (fixed newstyle, `doc/proto.md` of the NBD project) for
//! anything that implements [`BlockDevice`]. It knows nothing of caching.
//!
//! Handshake: `NBD_OPT_GO`, `INFO`, `LIST`, `EXPORT_NAME`, `ABORT` and
//! `STRUCTURED_REPLY`; block-size information (minimum 1, preferred 4096,
//! maximum 32 MiB) with every export. Transmission: `READ`, `WRITE` (with
//! `FUA`), `FLUSH`, `TRIM`, `WRITE_ZEROES` (with `FUA`) and `DISC`, many
//! requests in flight per connection and replies in any order; flush is
//! global, so `CAN_MULTI_CONN` is advertised. Every request is checked:
//! out of range or over 32 MiB gets `EINVAL`; a malformed handshake or
//! option gets an error reply or a disconnect, never a crash.
//!
//! - [`wire`]: the protocol's constants and headers, byte for byte;
//! - [`handshake`]: the option haggling that picks an export;
//! - [`mod@transmit`]: the request loop, its checks and its replies;
//! - [`device`]: what is served.

pub mod device;
pub mod handshake;
pub mod transmit;
pub mod wire;

use std::io;

#[cfg(any(test, feature = "testing"))]
pub use device::MemDevice;
pub use device::{BlockDevice, DevError, Export};
pub use handshake::{Session, negotiate};
pub use transmit::{ConnStats, transmit};
pub use wire::*;

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
        length: u32,
    },
    /// A worker could not send a reply: the connection is broken.
    #[error("a reply could not be sent")]
    ReplyFailed,
    /// The workers of the connection stopped.
    #[error("workers stopped")]
    WorkersStopped,
}

#[cfg(test)]
mod test_util {
    use std::io::{self, Write};
    use std::sync::{Arc, Mutex};

    use super::{Export, MemDevice};

    /// One export, "disk", of `size` bytes in memory.
    pub fn exports(size: usize) -> (Vec<Export>, Arc<MemDevice>) {
        let dev = Arc::new(MemDevice::new(size));
        (vec![Export { name: "disk".into(), description: "a test disk".into(), device: dev.clone() }], dev)
    }

    /// A writer whose contents the test can read after the connection ends.
    #[derive(Clone, Default)]
    pub struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Shared {
        /// What was written.
        pub fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
