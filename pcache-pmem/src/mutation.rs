//! Test-only switches that re-introduce known persistence bugs, so that the
//! crash campaign can show it catches each of them. Without the `mutations`
//! feature they do not exist: [`active`] is a constant `false`.
//!
//! The first three are the double-copy bugs dm-pcache shipped; the fourth
//! is the RFC's missing fence between a kset's terminator and the kset; the
//! fifth is a group commit that forgets the data it commits.

/// A bug to re-introduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Mutation {
    /// No bug.
    None = 0,
    /// The address of a metadata copy is computed with the wrong stride
    /// (twice the copy size), so copy 1 lands on the next record.
    WrongStride = 1,
    /// A metadata update overwrites the current copy instead of the other.
    OverwriteLiveCopy = 2,
    /// A metadata copy is flushed but not fenced.
    NoFenceAfterMetaCopy = 3,
    /// A kset's terminator is not fenced before the kset is written (with
    /// bulk sync: it is stored after the close's sync instead of before).
    NoFenceTerminator = 4,
    /// On a device with bulk sync (group commit), a kset is written
    /// without first making its keys' data durable.
    NoGroupCommitSync = 5,
}

impl Mutation {
    /// Every mutation.
    pub const ALL: [Mutation; 5] = [
        Mutation::WrongStride,
        Mutation::OverwriteLiveCopy,
        Mutation::NoFenceAfterMetaCopy,
        Mutation::NoFenceTerminator,
        Mutation::NoGroupCommitSync,
    ];
}

#[cfg(feature = "mutations")]
static CURRENT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Turns `m` on (and any other off), process-wide.
#[cfg(feature = "mutations")]
pub fn set(m: Mutation) {
    CURRENT.store(m as u8, std::sync::atomic::Ordering::SeqCst);
}

/// Whether mutation `m` is on.
#[inline]
pub fn active(m: Mutation) -> bool {
    #[cfg(feature = "mutations")]
    {
        CURRENT.load(std::sync::atomic::Ordering::Relaxed) == m as u8
    }
    #[cfg(not(feature = "mutations"))]
    {
        let _ = m;
        false
    }
}
