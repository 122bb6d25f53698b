//! Code shared by the fuzz targets and `make-seeds`: the `image` target's
//! recipe, how it becomes a valid image, and how patches damage it.
//!
//! A recipe is turned into an image with the reference writer
//! ([`ImageBuilder`] / [`CacheWriter`]); steps the writer refuses are
//! skipped. Patches then overwrite bytes of chosen regions, optionally
//! recomputing the CRC of the record they land in (with the image's
//! dialect's CRC) so that damage gets past the CRC checks and reaches the
//! semantic ones.
//!
//! A recipe makes an RFC v1 image (a formatted device, then up to three
//! caches in its backing table) or a dm-pcache one (what the kernel leaves
//! at first use: one cache of every segment, [`ImageBuilder::format_dm`]).

use arbitrary::Arbitrary;
use pcache_format::consts::{
    CACHE_SEG_DATA_SIZE, KSET_HEADER_SIZE, KSET_KEYS_MAX, KSET_MAGIC, META_ENTRIES, SB_OFF, SB_SIZE, SMALL_RECORD_SIZE,
};
use pcache_format::dm::{DM_CTRL_OFF, DmCacheInfo, DmSegmentInfo, DmSuperblock};
use pcache_format::image::DM_CACHE_ID;
use pcache_format::sparse::{CacheWriter, ImageBuilder, SparseImage};
use pcache_format::{Dialect, KsetFlags, ReadMedia, kset_size};

/// Size of every image the recipe builds: 63 segments.
pub const IMAGE_SIZE: u64 = 1 << 30;
/// Size of each cache's backing device; writes land in it.
pub const BACKING_SIZE: u64 = 64 << 20;
/// Most caches a recipe makes.
pub const MAX_CACHES: usize = 3;
/// Most write steps a recipe runs (all caches together).
pub const MAX_WRITES: usize = 300;
/// Most patches applied.
pub const MAX_PATCHES: usize = 16;
/// Most bytes one patch writes.
pub const MAX_PATCH_LEN: usize = 64;
/// `Anywhere` patches land in the first this many bytes of the image.
pub const ANYWHERE_SIZE: u64 = 200 << 20;
/// Span of a cache's key log (from its start) that `KeyLog` patches hit.
pub const KEY_LOG_SPAN: u64 = 32 << 10;

/// One cache to create.
#[derive(Arbitrary, Debug, Clone)]
pub struct CacheRecipe {
    /// Backing-table entry id: small values are used as is, the rest are
    /// spread over the table (`% META_ENTRIES`).
    pub id: u16,
    /// Segments: `2 + n_segs % 7` (2..=8).
    pub n_segs: u8,
    /// Whether the cache keeps data CRCs.
    pub data_crc: bool,
}

impl CacheRecipe {
    /// The entry id.
    pub fn entry_id(&self) -> u32 {
        u32::from(self.id) % META_ENTRIES
    }

    /// Segments in the chain.
    pub fn segments(&self) -> u32 {
        2 + u32::from(self.n_segs) % 7
    }
}

/// One step of the writers.
#[derive(Arbitrary, Debug, Clone)]
pub enum Step {
    /// Cache `[sector * 512, +(1 + sectors % 16) * 512)` of the backing
    /// device (sector taken modulo the first 64 MiB) in cache `cache`.
    Write {
        /// Which cache (modulo the caches made).
        cache: u8,
        /// First sector.
        sector: u32,
        /// Length - 1, in sectors (modulo 16).
        sectors: u8,
        /// CLEAN key (read-miss fill) instead of dirty.
        clean: bool,
        /// Seed of the data bytes.
        fill: u8,
    },
    /// Close the open kset of cache `cache`.
    Close {
        /// Which cache (modulo the caches made).
        cache: u8,
    },
}

/// Which part of the image a patch hits. Where a dm-pcache image has no
/// such part, the nearest one it has.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Region {
    /// The 4 KiB superblock area.
    Superblock,
    /// Segment 0's two info copies (8 KiB); in dm-pcache, the two
    /// cache-info copies at 0x2000.
    MetaSegment,
    /// A backing-table entry (both copies, 8 KiB): one of the caches' when
    /// `sel % 4` names one, else entry `sel * 8 % META_ENTRIES`. In
    /// dm-pcache, the four tail copies at 0x4000.
    Backing(u8),
    /// A segment's two info copies (8 KiB): a segment in use, or for
    /// `sel >= 200` any segment (in dm-pcache, segment `sel % seg_num`).
    SegmentInfo(u8),
    /// A cache segment's control page (4 KiB; tails in a cache's first).
    /// In dm-pcache an even `sel` picks the tails' page at 0x4000.
    ControlPage(u8),
    /// The first 32 KiB of a cache's key log.
    KeyLog(u8),
    /// Where a cache's next kset goes (its terminator).
    LogEnd(u8),
    /// Anywhere in the first 200 MiB.
    Anywhere,
}

/// Bytes written over a region.
#[derive(Arbitrary, Debug, Clone)]
pub struct Patch {
    /// Where.
    pub region: Region,
    /// Offset in the region (modulo its size).
    pub offset: u32,
    /// The bytes (at most 64 are used).
    pub bytes: Vec<u8>,
    /// Recompute the CRC of the record the patch starts in: the 4 KiB copy
    /// (superblock, segment infos, backing entries), the 16-byte record
    /// (control page), or the kset that starts at the patch (key log).
    pub reseal: bool,
}

/// What the `image` target builds and damages.
#[derive(Arbitrary, Debug, Clone)]
pub struct Recipe {
    /// `None`: an RFC v1 image with the caches below. `Some(data_crc)`: a
    /// dm-pcache image, its one cache keeping data CRCs if `data_crc`
    /// (`caches` is not used).
    pub dm_pcache: Option<bool>,
    /// Caches to create (at most 3 are used).
    pub caches: Vec<CacheRecipe>,
    /// Close every cache's open kset at the end.
    pub final_close: bool,
    /// Also read the image through a `media::Window` starting at this
    /// offset of a larger device (a namespace image holding the cache
    /// device from there on), and the image's own bytes from this offset on
    /// as a device.
    pub window: Option<u64>,
    /// Damage done after the image is built (at most 16 are used).
    pub patches: Vec<Patch>,
    /// The writes and closes, in order (at most 300 writes are run). Last,
    /// so that it takes the rest of the input.
    pub steps: Vec<Step>,
}

/// A cache the recipe made, and what the writer did with it.
#[derive(Debug, Clone)]
pub struct BuiltCache {
    /// Backing-table entry id (`DM_CACHE_ID` for a dm-pcache image's cache).
    pub id: u32,
    /// Segments.
    pub n_segs: u32,
    /// The writer (chain, key head).
    pub writer: CacheWriter,
    /// Keys written and not yet in a closed kset.
    pub pending: u64,
    /// Keys in closed ksets, i.e. on the log.
    pub logged: u64,
    /// Of those, dirty ones.
    pub logged_dirty: u64,
    /// Dirty keys not yet in a closed kset.
    pending_dirty: u64,
}

/// The image a recipe built, before any patch.
#[derive(Debug, Clone)]
pub struct Built {
    /// The writer, which owns the image.
    pub builder: ImageBuilder,
    /// The caches made, in creation order.
    pub caches: Vec<BuiltCache>,
    /// Write steps the writer refused.
    pub refused_writes: u64,
    /// Caches the writer refused (or that reused an id).
    pub refused_caches: u64,
}

impl BuiltCache {
    fn closed(&mut self) {
        self.logged += self.pending;
        self.logged_dirty += self.pending_dirty;
        self.pending = 0;
        self.pending_dirty = 0;
    }
}

/// Data of a write: not constant, so that a data CRC catches any change.
fn data(len: usize, fill: u8) -> Vec<u8> {
    (0..len).map(|i| fill ^ (i as u8) ^ ((i >> 8) as u8).wrapping_mul(31)).collect()
}

/// A new cache's record, before any write.
fn new_cache(id: u32, n_segs: u32, writer: CacheWriter) -> BuiltCache {
    BuiltCache { id, n_segs, writer, pending: 0, logged: 0, logged_dirty: 0, pending_dirty: 0 }
}

/// The dm-pcache image every dm-pcache recipe starts from, made once per
/// process (sealing 63 segments' records is most of a small recipe's cost).
fn dm_formatted(data_crc: bool) -> (ImageBuilder, CacheWriter) {
    static FORMATTED: std::sync::OnceLock<[(ImageBuilder, CacheWriter); 2]> = std::sync::OnceLock::new();
    let made = FORMATTED.get_or_init(|| {
        [false, true].map(|data_crc| ImageBuilder::format_dm(IMAGE_SIZE, data_crc).expect("a 1 GiB dm-pcache format"))
    });
    made[usize::from(data_crc)].clone()
}

/// Builds the image of a recipe with the reference writer. Never fails:
/// whatever the writer refuses is skipped and counted.
pub fn build(recipe: &Recipe) -> Built {
    let (mut builder, mut caches) = match recipe.dm_pcache {
        None => (ImageBuilder::format(IMAGE_SIZE).expect("a 1 GiB format"), Vec::new()),
        Some(data_crc) => {
            let (builder, writer) = dm_formatted(data_crc);
            let n_segs = builder.layout().seg_num();
            (builder, vec![new_cache(DM_CACHE_ID, n_segs, writer)])
        }
    };
    let mut refused_caches = 0;
    let rfc_caches = if recipe.dm_pcache.is_none() { MAX_CACHES } else { 0 };
    for c in recipe.caches.iter().take(rfc_caches) {
        let id = c.entry_id();
        if caches.iter().any(|b| b.id == id) {
            refused_caches += 1;
            continue;
        }
        let path = format!("/dev/backing{id}");
        match builder.add_cache(id, path.as_bytes(), BACKING_SIZE, c.segments(), c.data_crc) {
            Ok(writer) => caches.push(new_cache(id, c.segments(), writer)),
            Err(_) => refused_caches += 1,
        }
    }
    let mut refused_writes = 0;
    let mut writes = 0;
    if !caches.is_empty() {
        let n = caches.len();
        for step in &recipe.steps {
            match *step {
                Step::Write { cache, sector, sectors, clean, fill } => {
                    if writes == MAX_WRITES {
                        break;
                    }
                    writes += 1;
                    let c = &mut caches[usize::from(cache) % n];
                    let off = u64::from(sector) % (BACKING_SIZE / 512) * 512;
                    let len = (1 + usize::from(sectors) % 16) * 512;
                    match c.writer.write(&mut builder, off, &data(len, fill), clean) {
                        Ok(()) => {
                            c.pending += 1;
                            c.pending_dirty += u64::from(!clean);
                            // The writer closes a full kset by itself.
                            if c.pending == KSET_KEYS_MAX as u64 {
                                c.closed();
                            }
                        }
                        Err(_) => refused_writes += 1,
                    }
                }
                Step::Close { cache } => {
                    let c = &mut caches[usize::from(cache) % n];
                    if c.writer.close(&mut builder).is_ok() {
                        c.closed();
                    }
                }
            }
        }
    }
    if recipe.final_close {
        for c in &mut caches {
            if c.writer.close(&mut builder).is_ok() {
                c.closed();
            }
        }
    }
    Built { builder, caches, refused_writes, refused_caches }
}

/// How a patch's record is resealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seal {
    /// A record copy of `size` bytes, aligned to it inside the region, whose
    /// CRC covers its first `covered` bytes.
    Copy { size: u64, covered: usize },
    /// The kset that starts where the patch starts.
    Kset,
    /// Nothing.
    None,
}

/// A whole-slot copy, as RFC v1 seals every record.
const fn slot(size: u64) -> Seal {
    Seal::Copy { size, covered: size as usize }
}

impl Built {
    /// Start, size and sealing rule of a patch's region.
    fn region(&self, region: Region) -> (u64, u64, Seal) {
        match self.builder.layout().dialect() {
            Dialect::RfcV1 => self.rfc_region(region),
            Dialect::DmPcache => self.dm_region(region),
        }
    }

    /// A region of a dm-pcache image: its records cover only themselves.
    fn dm_region(&self, region: Region) -> (u64, u64, Seal) {
        let layout = self.builder.layout();
        let seg_num = layout.seg_num();
        let ok = |r: Result<u64, pcache_format::Error>| r.expect("offset inside the layout");
        let record = |size: u64, covered: usize| Seal::Copy { size, covered };
        let small = record(SMALL_RECORD_SIZE as u64, SMALL_RECORD_SIZE);
        match region {
            Region::Superblock => (SB_OFF, SB_SIZE as u64, record(SB_SIZE as u64, DmSuperblock::SIZE)),
            Region::MetaSegment => (ok(layout.cache_info_offset()), 8192, record(4096, size_of::<DmCacheInfo>())),
            Region::Backing(_) => (DM_CTRL_OFF, 4 * SMALL_RECORD_SIZE as u64, small),
            Region::SegmentInfo(sel) => {
                let seg = u32::from(sel) % seg_num;
                (ok(layout.seg_info_offset(seg)), 8192, record(4096, size_of::<DmSegmentInfo>()))
            }
            Region::ControlPage(sel) if sel % 2 == 0 => (DM_CTRL_OFF, 4096, small),
            Region::ControlPage(sel) => (ok(layout.ctrl_offset(u32::from(sel / 2) % seg_num)), 4096, small),
            Region::KeyLog(_) | Region::LogEnd(_) | Region::Anywhere => self.rfc_region(region),
        }
    }

    /// A region of an RFC v1 image (or one the dialects share).
    fn rfc_region(&self, region: Region) -> (u64, u64, Seal) {
        let layout = self.builder.layout();
        let seg_num = layout.seg_num();
        let chains: Vec<&[u32]> = self.caches.iter().map(|c| c.writer.chain()).collect();
        let cache_segs: Vec<u32> = chains.iter().flat_map(|c| c.iter().copied()).collect();
        let ok = |r: Result<u64, pcache_format::Error>| r.expect("offset inside the layout");
        match region {
            Region::Superblock => (SB_OFF, SB_SIZE as u64, slot(SB_SIZE as u64)),
            Region::MetaSegment => (ok(layout.seg_info_offset(0)), 8192, slot(4096)),
            Region::Backing(sel) => {
                let id = match self.caches.get(usize::from(sel) % 4) {
                    Some(c) => c.id,
                    None => u32::from(sel) * 8 % META_ENTRIES,
                };
                (ok(layout.meta_entry_offset(id)), 8192, slot(4096))
            }
            Region::SegmentInfo(sel) => {
                let seg = if sel >= 200 || cache_segs.is_empty() {
                    u32::from(sel) % seg_num
                } else {
                    // Segment 0 or a cache segment.
                    let i = usize::from(sel) % (cache_segs.len() + 1);
                    if i == 0 { 0 } else { cache_segs[i - 1] }
                };
                (ok(layout.seg_info_offset(seg)), 8192, slot(4096))
            }
            Region::ControlPage(sel) => {
                let seg = if cache_segs.is_empty() {
                    1 + u32::from(sel) % (seg_num - 1)
                } else if sel % 2 == 0 {
                    // A cache's first segment: the one with the tails.
                    chains[usize::from(sel / 2) % chains.len()][0]
                } else {
                    cache_segs[usize::from(sel / 2) % cache_segs.len()]
                };
                (ok(layout.ctrl_offset(seg)), 4096, slot(SMALL_RECORD_SIZE as u64))
            }
            Region::KeyLog(sel) => {
                let seg = match chains.get(usize::from(sel) % chains.len().max(1)) {
                    Some(chain) => chain[0],
                    None => 1,
                };
                (ok(layout.data_offset(seg)), KEY_LOG_SPAN, Seal::Kset)
            }
            Region::LogEnd(sel) => {
                let (seg, off) = match self.caches.get(usize::from(sel) % self.caches.len().max(1)) {
                    Some(c) => {
                        let (i, off) = c.writer.key_head();
                        (c.writer.chain()[i as usize], off)
                    }
                    None => (1, 0),
                };
                let room = u64::from(CACHE_SEG_DATA_SIZE - off);
                (ok(layout.data_offset(seg)) + u64::from(off), room.min(8192), Seal::Kset)
            }
            Region::Anywhere => (0, ANYWHERE_SIZE, Seal::None),
        }
    }

    /// Applies the patches (at most 16), ignoring writes the image refuses.
    /// Returns how many were applied.
    pub fn apply(&mut self, patches: &[Patch]) -> usize {
        let mut applied = 0;
        for p in patches.iter().take(MAX_PATCHES) {
            let (start, size, seal_rule) = self.region(p.region);
            let dialect = self.builder.layout().dialect();
            let at = start + u64::from(p.offset) % size;
            let bytes = &p.bytes[..p.bytes.len().min(MAX_PATCH_LEN)];
            let img = self.builder.image_mut();
            if img.write_at(at, bytes).is_ok() {
                applied += 1;
            }
            if p.reseal {
                reseal(img, dialect, start, at, seal_rule);
            }
        }
        applied
    }

    /// The image.
    pub fn image(&self) -> &SparseImage {
        self.builder.image()
    }
}

/// Recomputes the CRC of the record that the byte at `at` belongs to, as
/// `dialect` computes it.
fn reseal(img: &mut SparseImage, dialect: Dialect, region_start: u64, at: u64, rule: Seal) {
    let (start, len, covered) = match rule {
        Seal::Copy { size, covered } => (region_start + (at - region_start) / size * size, size as usize, covered),
        Seal::Kset => {
            let mut header = [0u8; KSET_HEADER_SIZE];
            if img.read_at(at, &mut header).is_err() {
                return;
            }
            let word = |r: core::ops::Range<usize>| header[r].iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b));
            if word(8..16) != KSET_MAGIC {
                return;
            }
            let len = if word(16..24) & KsetFlags::LAST.bits() != 0 {
                KSET_HEADER_SIZE
            } else {
                let n = word(4..8) as usize;
                if n == 0 || n > KSET_KEYS_MAX {
                    return;
                }
                kset_size(n)
            };
            (at, len, len)
        }
        Seal::None => return,
    };
    let mut buf = vec![0u8; len];
    if img.read_at(start, &mut buf).is_ok() {
        dialect.seal(&mut buf, covered);
        let _ = img.write_at(start, &buf);
    }
}
