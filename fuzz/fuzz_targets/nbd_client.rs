//! The NBD client (remote backing stores) fed an arbitrary byte stream
//! from the server: the handshake, then replies to requests in flight. It
//! may refuse or disconnect, never panic, and never hand a request more or
//! less data than it asked for.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pcache_cli::nbd::client::replay_server(data);
});
