//! Decoding errors: which record, which copy, and what was expected and found.

use core::fmt;

/// The kind of on-media record an [`Error`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Record {
    /// The device as a whole (its size, its layout).
    Device,
    /// The superblock at 4 KiB.
    Superblock,
    /// The segment info of segment 0.
    MetaSegmentInfo,
    /// The segment info of a cache segment.
    SegmentInfo,
    /// A backing-table entry.
    BackingDevInfo,
    /// dm-pcache's cache info (at 0x2000 and 0x3000).
    CacheInfo,
    /// A cache segment's generation record.
    SegmentGen,
    /// A log position (key tail or dirty tail).
    CachePos,
    /// The kset header and its key array.
    Kset,
    /// One key of a kset.
    Key,
}

impl Record {
    /// Human name of the record.
    pub const fn name(self) -> &'static str {
        match self {
            Record::Device => "device",
            Record::Superblock => "superblock",
            Record::MetaSegmentInfo => "meta segment info",
            Record::SegmentInfo => "segment info",
            Record::BackingDevInfo => "backing device info",
            Record::CacheInfo => "cache info",
            Record::SegmentGen => "segment generation",
            Record::CachePos => "cache position",
            Record::Kset => "kset",
            Record::Key => "key",
        }
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What is wrong with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The input ends before the record does.
    Truncated {
        /// Bytes the record needs.
        needed: usize,
        /// Bytes available.
        found: usize,
    },
    /// The magic number is not the record's.
    BadMagic {
        /// The magic the record must have.
        expected: u64,
        /// The magic found.
        found: u64,
    },
    /// The stored CRC does not match the bytes.
    BadCrc {
        /// CRC stored in the record.
        stored: u32,
        /// CRC computed over the record's bytes.
        computed: u32,
    },
    /// Neither copy of a double-buffered record is valid, and at least one
    /// was written: damage.
    NoValidCopy {
        /// `(stored, computed)` CRC of copy 0 and copy 1.
        crcs: [(u32, u32); 2],
        /// Which copies are all zeros (never written).
        never_written: [bool; 2],
    },
    /// Both copies of a double-buffered record are all zeros: it was never
    /// written.
    NeverWritten,
    /// The image was formatted on a big-endian host.
    BigEndian,
    /// Flag bits this implementation does not know.
    UnknownFlags {
        /// Name of the flags field.
        field: &'static str,
        /// The unknown bits.
        bits: u64,
    },
    /// A field holds a value outside its range.
    OutOfRange {
        /// Name of the field.
        field: &'static str,
        /// The value found.
        found: u64,
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
    },
    /// A field does not hold the one value it must hold.
    Mismatch {
        /// Name of the field.
        field: &'static str,
        /// The value found.
        found: u64,
        /// The value it must hold.
        expected: u64,
    },
    /// A field holds a value that means nothing here.
    Invalid {
        /// Name of the field.
        field: &'static str,
        /// The value found.
        found: u64,
    },
}

/// A decoding or validation error, with the facts a user needs: which
/// record, which copy of it, which item inside it, and what is wrong.
///
/// ```
/// use pcache_format::{Error, ErrorKind, Record};
/// let e = Error::new(Record::SegmentInfo, ErrorKind::BadCrc { stored: 1, computed: 2 }).in_copy(1);
/// assert_eq!(e.to_string(), "segment info copy 1: CRC mismatch (stored 0x00000001, computed 0x00000002)");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Error {
    /// The record.
    pub record: Record,
    /// Which copy of a double-buffered record (0 or 1), if it is one.
    pub copy: Option<u8>,
    /// Which item inside the record (the key index inside a kset).
    pub index: Option<u32>,
    /// What is wrong.
    pub kind: ErrorKind,
}

impl Error {
    /// An error about `record`.
    pub const fn new(record: Record, kind: ErrorKind) -> Self {
        Self { record, copy: None, index: None, kind }
    }

    /// The same error, about copy `copy` of the record.
    pub const fn in_copy(mut self, copy: u8) -> Self {
        self.copy = Some(copy);
        self
    }

    /// The same error, about item `index` inside the record.
    pub const fn at_index(mut self, index: u32) -> Self {
        self.index = Some(index);
        self
    }

    pub(crate) const fn truncated(record: Record, needed: usize, found: usize) -> Self {
        Self::new(record, ErrorKind::Truncated { needed, found })
    }

    pub(crate) const fn out_of_range(record: Record, field: &'static str, found: u64, min: u64, max: u64) -> Self {
        Self::new(record, ErrorKind::OutOfRange { field, found, min, max })
    }

    pub(crate) const fn mismatch(record: Record, field: &'static str, found: u64, expected: u64) -> Self {
        Self::new(record, ErrorKind::Mismatch { field, found, expected })
    }

    pub(crate) const fn invalid(record: Record, field: &'static str, found: u64) -> Self {
        Self::new(record, ErrorKind::Invalid { field, found })
    }

    pub(crate) const fn unknown_flags(record: Record, field: &'static str, bits: u64) -> Self {
        Self::new(record, ErrorKind::UnknownFlags { field, bits })
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ErrorKind::Truncated { needed, found } => {
                write!(f, "truncated: needs {needed} bytes, only {found} available")
            }
            ErrorKind::BadMagic { expected, found } => {
                write!(f, "bad magic (expected {expected:#018x}, found {found:#018x})")
            }
            ErrorKind::BadCrc { stored, computed } => {
                write!(f, "CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")
            }
            ErrorKind::NoValidCopy { crcs, never_written } => {
                f.write_str("no valid copy (")?;
                for (i, ((s, c), blank)) in crcs.iter().zip(never_written).enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    if blank {
                        write!(f, "copy {i}: never written")?;
                    } else {
                        write!(f, "copy {i}: stored CRC {s:#010x}, computed {c:#010x}")?;
                    }
                }
                f.write_str(")")
            }
            ErrorKind::NeverWritten => f.write_str("never written (both copies are all zeros)"),
            ErrorKind::BigEndian => {
                f.write_str("formatted on a big-endian host (BIGENDIAN flag set); this host cannot use it")
            }
            ErrorKind::UnknownFlags { field, bits } => write!(f, "unknown {field} bits {bits:#x}"),
            ErrorKind::OutOfRange { field, found, min, max } => {
                write!(f, "{field} {found} out of range ({min}..={max})")
            }
            ErrorKind::Mismatch { field, found, expected } => {
                write!(f, "{field} is {found}, expected {expected}")
            }
            ErrorKind::Invalid { field, found } => write!(f, "invalid {field} {found}"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.record, self.index) {
            (Record::Key, Some(index)) => write!(f, "key {index}")?,
            (record, Some(index)) => write!(f, "{record} item {index}")?,
            (record, None) => write!(f, "{record}")?,
        }
        if let Some(copy) = self.copy {
            write!(f, " copy {copy}")?;
        }
        write!(f, ": {}", self.kind)
    }
}

impl core::error::Error for Error {}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::string::ToString;

    #[test]
    fn display_names_record_copy_and_facts() {
        let e = Error::new(
            Record::BackingDevInfo,
            ErrorKind::NoValidCopy { crcs: [(1, 2), (3, 4)], never_written: [false, false] },
        );
        assert_eq!(
            e.to_string(),
            "backing device info: no valid copy (copy 0: stored CRC 0x00000001, computed 0x00000002; \
             copy 1: stored CRC 0x00000003, computed 0x00000004)"
        );
        let e = Error::out_of_range(Record::Kset, "key_num", 300, 1, 128);
        assert_eq!(e.to_string(), "kset: key_num 300 out of range (1..=128)");
        let e = Error::invalid(Record::Key, "len", 0).at_index(5);
        assert_eq!(e.to_string(), "key 5: invalid len 0");
        let e = Error::new(Record::Superblock, ErrorKind::BadMagic { expected: 1, found: 0 });
        assert_eq!(e.to_string(), "superblock: bad magic (expected 0x0000000000000001, found 0x0000000000000000)");
    }
}
