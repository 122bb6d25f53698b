//! What can go wrong in the engine, and the one place where the format
//! crate's errors become engine errors.

use std::path::PathBuf;

use pcache_format::ReadError;

use super::load::LogPos;
use crate::backing::BackingError;
use crate::pmem::PmemError;

/// What can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The pmem device failed.
    #[error(transparent)]
    Pmem(#[from] PmemError),
    /// The backing device failed.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// On-media metadata is damaged; nothing was changed.
    #[error("damaged cache metadata: {0}")]
    Corrupt(String),
    /// A record on the media fails to decode or validate; nothing was
    /// changed.
    #[error("damaged cache metadata: {0} (run `pcache check`)")]
    Format(#[from] pcache_format::Error),
    /// A request outside the backing device.
    #[error("request of {len} bytes at offset {off} is outside the {size}-byte device")]
    OutOfRange {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// The device speaks a dialect this operation does not run.
    #[error(
        "{0} holds a Linux dm-pcache cache, which `pcache attach` does not run yet; `pcache inspect`, \
         `pcache check` and `pcache detach --backing` read and rescue it, and the kernel's dm-pcache target runs it"
    )]
    Dialect(String),
    /// No free cache segment.
    #[error("the cache is full: no free segment")]
    CacheFull,
    /// Cached data does not match its CRC; the read fails rather than
    /// return corrupt data.
    #[error(
        "cached data for backing offset {off} ({len} bytes) fails its CRC (stored {stored:#010x}, computed {computed:#010x})"
    )]
    DataCrc {
        /// Backing offset of the key.
        off: u64,
        /// Its length.
        len: u32,
        /// CRC stored in the key.
        stored: u32,
        /// CRC of the data read.
        computed: u32,
    },
    /// All 2047 backing entries are in use.
    #[error("the backing table is full (2047 entries in use)")]
    TableFull,
    /// Not enough free segments for a new cache.
    #[error("a cache of {need} segments does not fit: {free} segments are free")]
    NoSpace {
        /// Segments asked for.
        need: u32,
        /// Segments free.
        free: u32,
    },
    /// This process already runs a cache for the backing device.
    #[error("a cache for {} is already started", path.display())]
    AlreadyStarted {
        /// The backing path.
        path: PathBuf,
    },
    /// The backing device is smaller than when its cache was created.
    #[error("{} holds {found} bytes, less than the {expected} bytes its cache was created for", path.display())]
    BackingShrunk {
        /// The backing path.
        path: PathBuf,
        /// Its size now.
        found: u64,
        /// Its size at creation.
        expected: u64,
    },
    /// An option out of range.
    #[error("{0}")]
    InvalidOption(String),
    /// The cache is full and cannot free space: writeback or GC cannot
    /// make progress.
    #[error("the cache is full and cannot free space: {0}")]
    Stalled(String),
    /// The cache was stopped.
    #[error("the cache is stopped")]
    Stopped,
    /// A new cache was asked for while the device holds a cache whose
    /// entry was lost (or a damaged entry): that cache may be this backing
    /// device's, with data not yet written back, so none is created over it.
    #[error("{0}")]
    LostCache(String),
    /// The device holds no cache for this backing device.
    #[error("no cache for {} on this device", path.display())]
    NoCache {
        /// The backing path.
        path: PathBuf,
    },
}

impl From<ReadError<PmemError>> for EngineError {
    /// A media error stays a pmem error; a record that fails to decode is
    /// damaged metadata.
    fn from(e: ReadError<PmemError>) -> Self {
        match e {
            ReadError::Media { source, .. } => EngineError::Pmem(source),
            ReadError::Format(e) => EngineError::Format(e),
        }
    }
}

impl EngineError {
    /// Damage in the key log at `at`, in words.
    pub(crate) fn log(at: LogPos, what: impl std::fmt::Display) -> Self {
        EngineError::Corrupt(format!("key log at {at}: {what} (run `pcache check`)"))
    }

    /// Whether the error means that something on the media is damaged
    /// (metadata or cached data), as opposed to a device failing, a bad
    /// request or a full cache.
    pub fn is_damage(&self) -> bool {
        matches!(self, EngineError::Corrupt(_) | EngineError::Format(_) | EngineError::DataCrc { .. })
    }
}
