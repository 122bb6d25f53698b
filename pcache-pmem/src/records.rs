//! Reading and writing double-buffered records on pmem.

use pcache_format::{Dialect, MetaRecord, Slots, encode_copy, find_latest, find_oldest, next_seq};

use crate::mutation::{Mutation, active};
use crate::pmem::{Pmem, PmemError};

/// Writes `record` by the double-copy protocol: the sequence number
/// continues from what is on the media (never restarting at 0), the oldest
/// copy (or a copy with a bad CRC) is overwritten, and the copy is durable
/// on return. A crash during the write can only tear the copy that was not
/// current. The copy is sealed with `dialect`'s CRC.
pub fn write_record<P: Pmem + ?Sized, R: MetaRecord>(
    pmem: &P,
    dialect: Dialect,
    off: u64,
    record: &R,
) -> Result<(), PmemError> {
    let size = R::COPY_SIZE;
    let slots = Slots::of::<R>(dialect);
    // What each copy's CRC covers is all that is read and written: the
    // whole slot in the RFC, the record alone in dm-pcache (whose 4 KiB
    // slots hold 16 or 24 bytes that count).
    let len = slots.covered.min(size);
    let mut pair = vec![0u8; 2 * size];
    for i in 0..2 {
        pmem.read(off + (i * size) as u64, &mut pair[i * size..i * size + len])?;
    }
    let seq = next_seq(slots, &pair);
    let target = if active(Mutation::OverwriteLiveCopy) {
        find_latest(slots, &pair).unwrap_or(0)
    } else {
        find_oldest(slots, &pair)
    };
    let copy = &mut pair[target * size..(target + 1) * size];
    // The copy is exactly COPY_SIZE bytes, the one length encode_copy accepts.
    if encode_copy(dialect, record, seq, copy).is_err() {
        return Err(PmemError::OutOfBounds { off, len: size as u64, size: pmem.size() });
    }
    let stride = if active(Mutation::WrongStride) { 2 * size } else { size };
    let at = off + (target * stride) as u64;
    if active(Mutation::NoFenceAfterMetaCopy) {
        return pmem.copy_nodrain(at, &copy[..len]);
    }
    pmem.copy_persist(at, &copy[..len])
}

/// Writes `record` into both copies, one after the other, each durable
/// before the next: how a record is created (or an entry freed), so that
/// whatever the slots held before leaves no stale copy behind and one
/// damaged page cannot make the record read as something else.
pub fn write_record_both<P: Pmem + ?Sized, R: MetaRecord>(
    pmem: &P,
    dialect: Dialect,
    off: u64,
    record: &R,
) -> Result<(), PmemError> {
    write_record(pmem, dialect, off, record)?;
    write_record(pmem, dialect, off, record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::SimPmem;
    use pcache_format::{CachePos, read_latest};

    #[test]
    fn updates_alternate_and_survive_crashes() {
        let pmem = SimPmem::new(4096);
        for i in 0..10u32 {
            write_record(&pmem, Dialect::RfcV1, 64, &CachePos::new(0, i * 8)).unwrap();
            let mut pair = [0u8; 32];
            pmem.read(64, &mut pair).unwrap();
            assert_eq!(read_latest::<CachePos>(Dialect::RfcV1, &pair).unwrap().record.seg_off.get(), i * 8);
        }
        // A crash during an update leaves the old or the new value, never nothing.
        let pmem = SimPmem::new(4096);
        write_record(&pmem, Dialect::RfcV1, 0, &CachePos::new(0, 8)).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        let snap = {
            // Stage the update's store without its fence: write the record by hand.
            let mut pair = [0u8; 32];
            pmem.read(0, &mut pair).unwrap();
            let (seq, t) = (
                next_seq(Slots::new(Dialect::RfcV1, 16, 16), &pair),
                find_oldest(Slots::new(Dialect::RfcV1, 16, 16), &pair),
            );
            encode_copy(Dialect::RfcV1, &CachePos::new(0, 16), seq, &mut pair[t * 16..t * 16 + 16]).unwrap();
            pmem.write((t * 16) as u64, &pair[t * 16..t * 16 + 16]).unwrap();
            pmem.snapshot()
        };
        for img in snap.exhaustive(1000).unwrap() {
            let mut pair = [0u8; 32];
            img.read(0, &mut pair).unwrap();
            seen.insert(read_latest::<CachePos>(Dialect::RfcV1, &pair).unwrap().record.seg_off.get());
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![8, 16]);
    }
}
