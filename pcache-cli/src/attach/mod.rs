//! `pcache attach`: run the cache of one or more backing devices and serve
//! each as an NBD export until SIGINT or SIGTERM.
//!
//! - `args`: the command line;
//! - `checks`: refusals before anything is opened for writing;
//! - `export`: a running cache as an NBD device;
//! - `listen`: the listening socket and the life of each connection;
//! - `signals`: SIGINT and SIGTERM stop, SIGUSR1 asks for a status line;
//! - `stop`: the connections served, and how a stop ends them;
//! - `hints`: how to connect, and the status line;
//! - `control`: the control socket behind `pcache status` and `pcache set`;
//! - `metrics`: the same figures for Prometheus (`--metrics`);
//! - `notify`: readiness and stopping told to systemd (`Type=notify`);
//! - `run`: opening, starting, serving and stopping, in that order.

mod args;
mod checks;
pub mod control;
mod export;
mod hints;
mod listen;
mod metrics;
mod notify;
mod run;
mod signals;
mod stop;

pub use args::AttachArgs;
pub use checks::check_backings;
pub use run::run;
