//! The signals `attach` answers: SIGINT and SIGTERM stop it (a second one
//! stops it at once), SIGUSR1 asks for a status line. They are caught from
//! the very start (a signal that comes while the caches start waits until
//! the server runs) and handled on a thread of their own, never in a signal
//! handler.

use std::thread::JoinHandle;

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::{Handle, Signals};

/// The signals, caught and waiting to be handled.
pub struct Caught(Signals);

impl std::fmt::Debug for Caught {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Caught(SIGINT, SIGTERM, SIGUSR1)")
    }
}

/// The thread that handles the signals, until [`Handling::close`].
pub struct Handling {
    handle: Handle,
    thread: JoinHandle<()>,
}

impl Caught {
    /// Catches SIGINT, SIGTERM and SIGUSR1 from now on.
    pub fn catch() -> Result<Self, String> {
        Signals::new([SIGINT, SIGTERM, SIGUSR1])
            .map(Caught)
            .map_err(|e| format!("cannot catch SIGINT, SIGTERM and SIGUSR1: {e}"))
    }

    /// Handles the signals on a thread of its own: `status` for each
    /// SIGUSR1, `stop` for each SIGINT or SIGTERM — every one of them, so
    /// that a second can cut short a stop that the first began. (The
    /// same signal sent twice before the thread sees the first counts once.)
    pub fn handle(self, status: impl Fn() + Send + 'static, stop: impl Fn(i32) + Send + 'static) -> Handling {
        let handle = self.0.handle();
        let mut signals = self.0;
        let thread = std::thread::spawn(move || {
            for signal in signals.forever() {
                if signal == SIGUSR1 {
                    status();
                } else {
                    stop(signal);
                }
            }
        });
        Handling { handle, thread }
    }
}

impl Handling {
    /// Stops handling signals and waits for the thread to end.
    pub fn close(self) {
        self.handle.close();
        let _ = self.thread.join();
    }
}

/// A stop signal's name.
pub fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}
