//! An NBD server (fixed newstyle, `doc/proto.md` of the NBD project) for
//! anything that implements [`BlockDevice`]. It knows nothing of caching.
//!
//! Handshake: `NBD_OPT_GO`, `INFO`, `LIST`, `EXPORT_NAME`, `ABORT` and
//! `STRUCTURED_REPLY`; block-size information (minimum 1, preferred 4096,
//! maximum 32 MiB) with every export. Transmission: `READ`, `WRITE` (with
//! `FUA`), `FLUSH`, `TRIM`, `WRITE_ZEROES` (with `FUA`) and `DISC`, many
//! requests in flight per connection and replies in any order; flush is
//! global, so `CAN_MULTI_CONN` is advertised. Every request is checked:
//! out of range or over 32 MiB gets `EINVAL` (a write or write-zeroes
//! past the end `ENOSPC`, as the protocol asks); a malformed handshake or
//! option gets an error reply or a disconnect, never a crash.
//!
//! - [`wire`]: the protocol's constants and headers, byte for byte;
//! - [`handshake`]: the option haggling that picks an export;
//! - [`mod@transmit`]: the request loop, its checks and its replies;
//! - [`device`]: what is served.

pub mod client;
pub mod device;
mod error;
pub mod handshake;
pub mod tls;
pub mod transmit;
pub mod wire;

#[cfg(any(test, feature = "testing"))]
pub use device::MemDevice;
pub use device::{BlockDevice, DevError, Export, Extent};
pub use error::{NbdError, Violation};
pub use handshake::{Outcome, Session, TlsState, negotiate, negotiate_with};
pub use transmit::{ConnStats, Framing, Progress, transmit, transmit_with};
pub use wire::*;

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
