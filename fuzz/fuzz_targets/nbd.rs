//! The NBD server's handshake and request parser fed an arbitrary byte
//! stream from the client: it may refuse, disconnect or reply with errors,
//! never panic, and never touch the device outside its size. An odd first
//! byte runs the handshake as a server that requires TLS (every option but
//! STARTTLS and ABORT refused until then; STARTTLS ends the plain part).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use pcache_cli::nbd::{BlockDevice, Export, MemDevice, Outcome, TlsState, negotiate_with, transmit};

fuzz_target!(|data: &[u8]| {
    let dev = Arc::new(MemDevice::new(1 << 16));
    let exports = vec![
        Export { name: "a".into(), description: "first".into(), device: dev.clone() },
        Export { name: "b".into(), description: String::new(), device: Arc::new(MemDevice::new(512)) },
    ];
    let (tls, mut input) = match data.split_first() {
        Some((b, rest)) if b & 1 == 1 => (TlsState::Required, rest),
        _ => (TlsState::Off, data.get(1..).unwrap_or_default()),
    };
    let mut out = Vec::new();
    match negotiate_with(&mut input, &mut out, &exports, tls, None) {
        Ok(Outcome::Serve(session)) => {
            assert_eq!(tls, TlsState::Off, "no export is served before TLS when TLS is required");
            assert!(session.export < exports.len());
            let device: Arc<dyn BlockDevice> = exports[session.export].device.clone();
            let _ = transmit(input, Vec::new(), device, session, 0);
        }
        Ok(Outcome::StartTls { .. }) => assert_eq!(tls, TlsState::Required),
        Ok(Outcome::Close) | Err(_) => {}
    }
    assert_eq!(dev.size(), 1 << 16);
});
