//! The NBD server's handshake and request parser fed an arbitrary byte
//! stream from the client: it may refuse, disconnect or reply with errors,
//! never panic, and never touch the device outside its size.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use pcache_cli::nbd::{BlockDevice, Export, MemDevice, negotiate, transmit};

fuzz_target!(|data: &[u8]| {
    let dev = Arc::new(MemDevice::new(1 << 16));
    let exports = vec![
        Export { name: "a".into(), description: "first".into(), device: dev.clone() },
        Export { name: "b".into(), description: String::new(), device: Arc::new(MemDevice::new(512)) },
    ];
    let mut input = data;
    let mut out = Vec::new();
    if let Ok(Some(session)) = negotiate(&mut input, &mut out, &exports) {
        assert!(session.export < exports.len());
        let device: Arc<dyn BlockDevice> = exports[session.export].device.clone();
        let _ = transmit(input, Vec::new(), device, session, 0);
    }
    assert_eq!(dev.size(), 1 << 16);
});
