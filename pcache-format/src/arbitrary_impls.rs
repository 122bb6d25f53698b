//! `Arbitrary` for every record: any bytes make a record, so fuzzers reach
//! every decoder path, valid or not.

use arbitrary::{Arbitrary, Result, Unstructured};
use zerocopy::FromBytes;

use crate::backing::{BackingDevInfo, CacheInfo};
use crate::ctrl::{CacheCtrl, CachePos, CacheSegCtrl, CacheSegGen};
use crate::kset::{Key, KsetHeader};
use crate::meta::MetaHeader;
use crate::segment::{MetaSegmentInfo, SegmentInfo};
use crate::superblock::Superblock;

macro_rules! arbitrary_from_bytes {
    ($($t:ty),* $(,)?) => {$(
        impl<'a> Arbitrary<'a> for $t {
            fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
                let bytes = u.bytes(core::mem::size_of::<Self>())?;
                Self::read_from_bytes(bytes).map_err(|_| arbitrary::Error::NotEnoughData)
            }

            fn size_hint(_depth: usize) -> (usize, Option<usize>) {
                (core::mem::size_of::<Self>(), Some(core::mem::size_of::<Self>()))
            }
        }
    )*};
}

arbitrary_from_bytes!(
    MetaHeader,
    Superblock,
    SegmentInfo,
    MetaSegmentInfo,
    CacheInfo,
    BackingDevInfo,
    CacheSegGen,
    CachePos,
    CacheSegCtrl,
    CacheCtrl,
    KsetHeader,
    Key,
);
