//! A sparse in-memory device image, and a reference writer that lays out
//! a formatted device with caches and ksets.
//!
//! Neither is how the cache engine writes (the engine orders and persists
//! every store); they are for tests, fuzzing and tools that want a small,
//! valid image to start from.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::backing::{BackingDevInfo, CacheFlags, CacheInfo};
use crate::consts::{CACHE_GC_PERCENT_DEFAULT, CACHE_SEG_DATA_SIZE, KSET_HEADER_SIZE, KSET_KEYS_MAX, SB_OFF};
use crate::ctrl::{CachePos, CacheSegGen};
use crate::dialect::Dialect;
use crate::dm::{DM_GC_PERCENT_DEFAULT, DmCacheInfo, DmSegmentInfo, DmSuperblock};
use crate::error::{Error, Record};
use crate::kset::{Key, KeyFlags, TERMINATOR, encode_kset, encode_last, kset_size};
use crate::layout::Layout;
use crate::media::{OutOfBounds, ReadMedia};
use crate::meta::{MetaRecord, encode_copy};
use crate::segment::{MetaSegmentInfo, SegmentInfo};
use crate::superblock::Superblock;

const PAGE: u64 = 4096;

/// A device image of any size that stores only the 4 KiB pages written to;
/// the rest reads as zeros.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SparseImage {
    size: u64,
    pages: BTreeMap<u64, Box<[u8; PAGE as usize]>>,
}

impl SparseImage {
    /// An all-zero image of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self { size, pages: BTreeMap::new() }
    }

    /// Writes `data` at `off`.
    pub fn write_at(&mut self, off: u64, data: &[u8]) -> Result<(), OutOfBounds> {
        let err = OutOfBounds { off, len: data.len(), size: self.size };
        let end = off.checked_add(data.len() as u64).ok_or(err)?;
        if end > self.size {
            return Err(err);
        }
        let mut done = 0usize;
        while done < data.len() {
            let at = off + done as u64;
            let (page, in_page) = (at / PAGE, (at % PAGE) as usize);
            let n = (PAGE as usize - in_page).min(data.len() - done);
            let p = self.pages.entry(page).or_insert_with(|| Box::new([0; PAGE as usize]));
            p[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// Offsets of the pages that hold written data, in order.
    pub fn written_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.pages.keys().map(|p| p * PAGE)
    }
}

impl ReadMedia for SparseImage {
    type Error = OutOfBounds;

    fn size(&self) -> u64 {
        self.size
    }

    fn unwritten(&self, off: u64, len: u64) -> bool {
        len != 0
            && off.checked_add(len).is_some_and(|end| end <= self.size)
            && self.pages.range(off / PAGE..=(off + len - 1) / PAGE).next().is_none()
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        let err = OutOfBounds { off, len: buf.len(), size: self.size };
        let end = off.checked_add(buf.len() as u64).ok_or(err)?;
        if end > self.size {
            return Err(err);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = off + done as u64;
            let (page, in_page) = (at / PAGE, (at % PAGE) as usize);
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match self.pages.get(&page) {
                Some(p) => dst.copy_from_slice(&p[in_page..in_page + n]),
                None => dst.fill(0),
            }
            done += n;
        }
        Ok(())
    }
}

fn oob(e: OutOfBounds) -> Error {
    Error::out_of_range(Record::Device, "offset", e.off, 0, e.size.saturating_sub(e.len as u64))
}

/// Writes a formatted device into a [`SparseImage`], then caches into it.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    img: SparseImage,
    layout: Layout,
    used: Vec<bool>,
}

impl ImageBuilder {
    /// A freshly formatted RFC v1 device of `size` bytes: the superblock,
    /// and segment 0 holding its info (seq 1 in copy 0) and an empty table.
    pub fn format(size: u64) -> Result<Self, Error> {
        let layout = Layout::plan(Dialect::RfcV1, size)?.layout;
        let mut b = Self { img: SparseImage::new(size), layout, used: alloc::vec![false; layout.seg_num() as usize] };
        b.used[0] = true;
        b.put_copy(layout.seg_info_offset(0)?, &MetaSegmentInfo::default(), 1)?;
        b.img.write_at(SB_OFF, &Superblock::encode_area(layout.seg_num() as u16)).map_err(oob)?;
        Ok(b)
    }

    /// A dm-pcache device of `size` bytes as the kernel leaves it when it
    /// first loads it: its superblock and a cache of every segment (the
    /// chain 0, 1, 2, ..., generations 0, both tails at the log's start,
    /// cache info with INIT_DONE and the default gc percent). The returned
    /// writer appends to that cache.
    pub fn format_dm(size: u64, data_crc: bool) -> Result<(Self, CacheWriter), Error> {
        let layout = Layout::plan(Dialect::DmPcache, size)?.layout;
        let n_segs = layout.seg_num();
        let mut b = Self { img: SparseImage::new(size), layout, used: alloc::vec![true; n_segs as usize] };
        b.img.write_at(SB_OFF, &DmSuperblock::encode_area(n_segs)).map_err(oob)?;
        let chain: Vec<u32> = (0..n_segs).collect();
        for (i, &seg) in chain.iter().enumerate() {
            let next = chain.get(i + 1).copied();
            b.put_both(layout.seg_info_offset(seg)?, &DmSegmentInfo::data(next))?;
            b.put_both(layout.ctrl_offset(seg)?, &CacheSegGen::new(0))?;
        }
        let (key_tail, dirty_tail) = layout.tail_offsets(0)?;
        b.put_both(key_tail, &CachePos::new(0, 0))?;
        b.put_both(dirty_tail, &CachePos::new(0, 0))?;
        b.put_both(layout.cache_info_offset()?, &DmCacheInfo::new(n_segs, DM_GC_PERCENT_DEFAULT, data_crc))?;
        let w = CacheWriter { chain, data_crc, key_head: (0, 0), log_segs: 1, data_head: (1, 0), pending: Vec::new() };
        Ok((b, w))
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The image so far.
    pub fn image(&self) -> &SparseImage {
        &self.img
    }

    /// The image, to patch it.
    pub fn image_mut(&mut self) -> &mut SparseImage {
        &mut self.img
    }

    /// The finished image.
    pub fn finish(self) -> SparseImage {
        self.img
    }

    fn put_copy<R: MetaRecord>(&mut self, off: u64, record: &R, seq: u8) -> Result<(), Error> {
        let mut buf = alloc::vec![0u8; R::COPY_SIZE];
        encode_copy(self.layout.dialect(), record, seq, &mut buf)?;
        self.img.write_at(off, &buf).map_err(oob)
    }

    /// Writes both copies, as a writer creating a record does: copy 0 with
    /// seq 1, then copy 1 with seq 2 (the current one).
    fn put_both<R: MetaRecord>(&mut self, off: u64, record: &R) -> Result<(), Error> {
        self.put_copy(off, record, 1)?;
        self.put_copy(off + R::COPY_SIZE as u64, record, 2)
    }

    /// Creates a new cache of `n_segs` segments in backing-table entry `id`
    /// for the backing device `path` of `dev_size` bytes: its chain (the
    /// lowest free segments), segment infos, generations 0, both tails at
    /// the log's start and a terminator there. Cache segment 0 holds the key
    /// log; data goes to the segments after it.
    pub fn add_cache(
        &mut self,
        id: u32,
        path: &[u8],
        dev_size: u64,
        n_segs: u32,
        data_crc: bool,
    ) -> Result<CacheWriter, Error> {
        let mut chain = Vec::new();
        for (seg, used) in self.used.iter_mut().enumerate() {
            if chain.len() as u32 == n_segs {
                break;
            }
            if !*used {
                *used = true;
                chain.push(seg as u32);
            }
        }
        if chain.len() as u32 != n_segs || n_segs < 2 {
            let free = chain.len() as u64;
            return Err(Error::out_of_range(Record::BackingDevInfo, "n_segs", n_segs.into(), 2, free));
        }
        for (i, &seg) in chain.iter().enumerate() {
            let info = SegmentInfo::data(seg, chain.get(i + 1).copied());
            self.put_both(self.layout.seg_info_offset(seg)?, &info)?;
            self.put_both(self.layout.ctrl_offset(seg)?, &CacheSegGen::new(0))?;
        }
        let (key_tail, dirty_tail) = self.layout.tail_offsets(chain[0])?;
        self.put_both(key_tail, &CachePos::new(0, 0))?;
        self.put_both(dirty_tail, &CachePos::new(0, 0))?;
        self.img.write_at(self.layout.data_offset(chain[0])?, &TERMINATOR).map_err(oob)?;
        let flags = if data_crc { CacheFlags::DATA_CRC } else { CacheFlags::empty() };
        let ci = CacheInfo::new(chain[0], n_segs, CACHE_GC_PERCENT_DEFAULT, flags);
        let info = BackingDevInfo::running(id, path, dev_size / 512, ci)?;
        self.put_both(self.layout.meta_entry_offset(id)?, &info)?;
        Ok(CacheWriter { chain, data_crc, key_head: (0, 0), log_segs: 1, data_head: (1, 0), pending: Vec::new() })
    }
}

/// Appends cached data and ksets to a cache made by [`ImageBuilder::add_cache`].
#[derive(Debug, Clone)]
pub struct CacheWriter {
    chain: Vec<u32>,
    data_crc: bool,
    key_head: (u32, u32),
    log_segs: u32,
    data_head: (u32, u32),
    pending: Vec<Key>,
}

impl CacheWriter {
    /// The chain, device segment numbers in cache order.
    pub fn chain(&self) -> &[u32] {
        &self.chain
    }

    /// Where the next kset goes.
    pub fn key_head(&self) -> (u32, u32) {
        self.key_head
    }

    /// Caches `data` for `[off, off + data.len())` of the backing device as
    /// one key (dirty, or CLEAN) in the open kset. The range must stay inside
    /// one 4 MiB slice.
    pub fn write(&mut self, b: &mut ImageBuilder, off: u64, data: &[u8], clean: bool) -> Result<(), Error> {
        let len = data.len() as u32;
        if self.data_head.1 + len > CACHE_SEG_DATA_SIZE {
            self.data_head = (self.data_head.0 + 1, 0);
        }
        let (seg, seg_off) = self.data_head;
        if seg + self.log_segs > self.chain.len() as u32 {
            return Err(Error::invalid(Record::Key, "cache full at segment", seg.into()));
        }
        let dev_seg =
            *self.chain.get(seg as usize).ok_or(Error::invalid(Record::Key, "cache full at segment", seg.into()))?;
        b.img.write_at(b.layout.data_range(dev_seg, seg_off, len)?, data).map_err(oob)?;
        self.data_head.1 += len;
        let flags = if clean { KeyFlags::CLEAN } else { KeyFlags::empty() };
        let mut key = Key::new(off, len, flags, seg, seg_off, 0);
        if self.data_crc {
            key.data_crc = b.layout.dialect().crc(data).into();
        }
        key.check()?;
        self.pending.push(key);
        if self.pending.len() == KSET_KEYS_MAX {
            self.close(b)?;
        }
        Ok(())
    }

    /// Writes the open kset (if it has keys) at the key head, followed by a
    /// terminator; moves to a new key segment with a LAST kset when the
    /// current one has no room.
    pub fn close(&mut self, b: &mut ImageBuilder) -> Result<(), Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let size = kset_size(self.pending.len()) as u32;
        if self.key_head.1 + size + KSET_HEADER_SIZE as u32 > CACHE_SEG_DATA_SIZE {
            // Key segments are taken from the end of the chain, away from data.
            self.log_segs += 1;
            let next = (self.chain.len() as u32 + 1).saturating_sub(self.log_segs);
            if next <= self.data_head.0 {
                return Err(Error::invalid(Record::Kset, "key log full at segment", next.into()));
            }
            let (seg, off) = self.key_head;
            let dev = self.chain[next as usize];
            b.img.write_at(b.layout.data_offset(dev)?, &TERMINATOR).map_err(oob)?;
            b.img
                .write_at(
                    b.layout.data_range(self.chain[seg as usize], off, 24)?,
                    &encode_last(b.layout.dialect(), next),
                )
                .map_err(oob)?;
            self.key_head = (next, 0);
        }
        let mut buf = alloc::vec![0u8; size as usize];
        encode_kset(b.layout.dialect(), &self.pending, &mut buf)?;
        let (seg, off) = self.key_head;
        let dev = self.chain[seg as usize];
        b.img.write_at(b.layout.data_range(dev, off, size)?, &buf).map_err(oob)?;
        b.img.write_at(b.layout.data_range(dev, off + size, 24)?, &TERMINATOR).map_err(oob)?;
        self.key_head.1 += size;
        self.pending.clear();
        Ok(())
    }
}
