//! The test kit (feature `testing`): what the engine's tests, benches and
//! fuzz targets share, kept out of the API a user of the cache sees.
//!
//! * [`sim`]: [`SimPmem`], a simulated persistence domain that produces the
//!   images a power failure could leave;
//! * [`backing`]: backing devices in memory ([`MemBacking`]), failing on
//!   request ([`FaultyBacking`]), losing unsynced writes ([`SimBacking`]);
//! * [`workload`]: the alphabet of every engine workload, [`Op`];
//! * [`model`]: [`ModelDisk`], what each sector must read back and may hold
//!   after a crash (the durability contract), and the content of writes;
//! * [`rig`]: [`Rig`], the engine on the simulator driven by ops and checked
//!   against the model, as the `engine` fuzz target and the model test run it.
//!
//! A test of this crate gets the kit through its dev-dependency on itself
//! with the feature; another crate names the feature in its dependency.

pub mod backing;
pub mod model;
pub mod rig;
pub mod sim;
pub mod workload;

pub use backing::{BackingCrash, FaultyBacking, MemBacking, SimBacking};
pub use model::{ModelDisk, WriteId};
pub use rig::{Rig, check_image, run_op};
pub use sim::{CrashState, CrashStrategy, SimEvent, SimEventKind, SimHook, SimPmem};
pub use workload::{Op, SECTOR};
