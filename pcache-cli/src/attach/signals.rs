//! The signals `attach` answers: SIGINT and SIGTERM stop it, SIGUSR1 asks
//! for a status line. They are caught from the very start (a signal that
//! comes while the caches start waits until the server runs) and handled on
//! a thread of their own, never in a signal handler.

use std::thread::JoinHandle;

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

/// The signals, caught and waiting to be handled.
pub struct Caught(Signals);

impl std::fmt::Debug for Caught {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Caught(SIGINT, SIGTERM, SIGUSR1)")
    }
}

impl Caught {
    /// Catches SIGINT, SIGTERM and SIGUSR1 from now on.
    pub fn catch() -> Result<Self, String> {
        Signals::new([SIGINT, SIGTERM, SIGUSR1])
            .map(Caught)
            .map_err(|e| format!("cannot catch SIGINT, SIGTERM and SIGUSR1: {e}"))
    }

    /// Handles the signals on a thread of its own: `status` for each
    /// SIGUSR1, then `stop` with the first SIGINT or SIGTERM, and the
    /// thread ends. Later ones are ignored: the server is stopping.
    pub fn handle(
        mut self,
        status: impl Fn() + Send + 'static,
        stop: impl FnOnce(i32) + Send + 'static,
    ) -> JoinHandle<()> {
        std::thread::spawn(move || {
            for signal in self.0.forever() {
                if signal == SIGUSR1 {
                    status();
                } else {
                    stop(signal);
                    return;
                }
            }
        })
    }
}
