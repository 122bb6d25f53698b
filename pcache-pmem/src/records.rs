//! Reading and writing double-buffered records on pmem.

use pcache_format::{MetaRecord, encode_copy, find_latest, find_oldest, next_seq};

use crate::mutation::{Mutation, active};
use crate::pmem::{Pmem, PmemError};

/// Writes `record` by the double-copy protocol: the sequence number
/// continues from what is on the media (never restarting at 0), the oldest
/// copy (or a copy with a bad CRC) is overwritten, and the copy is durable
/// on return. A crash during the write can only tear the copy that was not
/// current.
pub fn write_record<P: Pmem + ?Sized, R: MetaRecord>(pmem: &P, off: u64, record: &R) -> Result<(), PmemError> {
    let size = R::COPY_SIZE;
    let mut pair = vec![0u8; 2 * size];
    pmem.read(off, &mut pair)?;
    let seq = next_seq(&pair, size);
    let target = if active(Mutation::OverwriteLiveCopy) {
        find_latest(&pair, size).unwrap_or(0)
    } else {
        find_oldest(&pair, size)
    };
    let copy = &mut pair[target * size..(target + 1) * size];
    // The copy is exactly COPY_SIZE bytes, the one length encode_copy accepts.
    if encode_copy(record, seq, copy).is_err() {
        return Err(PmemError::OutOfBounds { off, len: size as u64, size: pmem.size() });
    }
    let stride = if active(Mutation::WrongStride) { 2 * size } else { size };
    let at = off + (target * stride) as u64;
    if active(Mutation::NoFenceAfterMetaCopy) {
        return pmem.copy_nodrain(at, copy);
    }
    pmem.copy_persist(at, copy)
}

/// Writes `record` into both copies, one after the other, each durable
/// before the next: how a record is created (or an entry freed), so that
/// whatever the slots held before leaves no stale copy behind and one
/// damaged page cannot make the record read as something else.
pub fn write_record_both<P: Pmem + ?Sized, R: MetaRecord>(pmem: &P, off: u64, record: &R) -> Result<(), PmemError> {
    write_record(pmem, off, record)?;
    write_record(pmem, off, record)
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
            write_record(&pmem, 64, &CachePos::new(0, i * 8)).unwrap();
            let mut pair = [0u8; 32];
            pmem.read(64, &mut pair).unwrap();
            assert_eq!(read_latest::<CachePos>(&pair).unwrap().record.seg_off.get(), i * 8);
        }
        // A crash during an update leaves the old or the new value, never nothing.
        let pmem = SimPmem::new(4096);
        write_record(&pmem, 0, &CachePos::new(0, 8)).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        let snap = {
            // Stage the update's store without its fence: write the record by hand.
            let mut pair = [0u8; 32];
            pmem.read(0, &mut pair).unwrap();
            let (seq, t) = (next_seq(&pair, 16), find_oldest(&pair, 16));
            encode_copy(&CachePos::new(0, 16), seq, &mut pair[t * 16..t * 16 + 16]).unwrap();
            pmem.write((t * 16) as u64, &pair[t * 16..t * 16 + 16]).unwrap();
            pmem.snapshot()
        };
        for img in snap.exhaustive(1000).unwrap() {
            let mut pair = [0u8; 32];
            img.read(0, &mut pair).unwrap();
            seen.insert(read_latest::<CachePos>(&pair).unwrap().record.seg_off.get());
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![8, 16]);
    }
}
