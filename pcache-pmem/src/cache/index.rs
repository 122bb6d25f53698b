//! The in-memory index of one 4 MiB slice of a backing device: an ordered
//! map from backing offset to where the data is cached.
//!
//! Keys never overlap. Inserting a key fixes up the keys it overlaps so that
//! the new key wins (spec §2.9.4), in the six cases of the RFC's walk:
//!
//! ```text
//!   existing T = [ts, te), new K = [ks, ke)
//!   te <= ks                    T before K             untouched
//!   ts >= ke                    T after K              untouched
//!   ts >= ks, te <= ke          T inside K             deleted
//!   ts >= ks, te >  ke          T covers K's tail      cut to [ke, te) (placeholder: deleted)
//!   ts <  ks, te >  ke          T contains K           split into [ts, ks) and [ke, te)
//!                                                      (placeholder: cut to [ts, ks))
//!   ts <  ks, te <= ke          T covers K's head      cut to [ts, ks)
//! ```
//!
//! A placeholder ([`KeyState::Filling`]) marks a read miss in flight. One overlapped at
//! its head is deleted rather than cut: its data will arrive for its
//! original offset, and cutting it would cache that data at the wrong place
//! (the RFC's bug, fixed upstream).

mod store;

use std::collections::BTreeMap;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use pcache_format::{CACHE_SUBTREE_SHIFT, CACHE_SUBTREE_SIZE, Key, KeyFlags};

use self::store::{Packed, Store};

/// What an index entry stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Cached data not yet written back.
    Dirty,
    /// Cached data the backing device holds too (filled by a read miss, or
    /// written back): nothing to write back.
    Clean,
    /// A placeholder for a read miss in flight, filled by the fill with
    /// this id (never persisted; it points at no cached data).
    Filling(u32),
}

/// An indexed key: where the data of `[off, off + len)` is cached. The
/// offset is the map key.
///
/// The key's data CRC (when the cache keeps them) covers the data as
/// written, `orig_len` bytes starting `orig_delta` bytes before `seg_off`:
/// cutting a key's front moves `seg_off` but not the CRC's extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IKey {
    /// Generation of the segment when the data was allocated.
    pub seg_gen: u64,
    /// Length in bytes.
    pub len: u32,
    /// Cache segment index.
    pub cache_seg: u32,
    /// Offset of the data in the segment's data area.
    pub seg_off: u32,
    /// CRC of the data as written (0 when the cache keeps no CRCs).
    pub crc: u32,
    /// Bytes cut from the front since the key was written.
    pub orig_delta: u32,
    /// Length as written.
    pub orig_len: u32,
    /// Dirty, clean or a placeholder.
    pub state: KeyState,
}

impl IKey {
    /// A placeholder of `len` bytes for fill `id`.
    pub fn placeholder(len: u32, id: u32) -> Self {
        Self {
            seg_gen: 0,
            len,
            cache_seg: 0,
            seg_off: 0,
            crc: 0,
            orig_delta: 0,
            orig_len: len,
            state: KeyState::Filling(id),
        }
    }

    /// The key of `k` as read from the log; `dirty` false when its data
    /// was written back since (or never needed to be).
    pub fn from_media(k: &Key, dirty: bool) -> Self {
        let len = k.len.get();
        Self {
            seg_gen: k.seg_gen.get(),
            len,
            cache_seg: k.cache_seg_id.get(),
            seg_off: k.cache_seg_off.get(),
            crc: k.data_crc.get(),
            orig_delta: 0,
            orig_len: len,
            state: if dirty { KeyState::Dirty } else { KeyState::Clean },
        }
    }

    /// The key as written to the log, for backing offset `off`.
    pub fn to_media(&self, off: u64) -> Key {
        let flags = if self.state == KeyState::Clean { KeyFlags::CLEAN } else { KeyFlags::empty() };
        let mut key = Key::new(off, self.len, flags, self.cache_seg, self.seg_off, self.seg_gen);
        key.data_crc = self.crc.into();
        key
    }

    /// The fill of a placeholder.
    pub fn fill_id(&self) -> Option<u32> {
        match self.state {
            KeyState::Filling(id) => Some(id),
            _ => None,
        }
    }

    /// Whether this is a placeholder.
    pub fn is_filling(&self) -> bool {
        matches!(self.state, KeyState::Filling(_))
    }

    /// Whether the data must be written back.
    pub fn is_dirty(&self) -> bool {
        self.state == KeyState::Dirty
    }

    fn cut_front(&mut self, n: u32) {
        self.len -= n;
        if !self.is_filling() {
            self.seg_off += n;
            self.orig_delta += n;
        }
    }
}

/// Changes to the counters of an index.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delta {
    /// Keys with data (not placeholders).
    pub keys: i64,
    /// Bytes of dirty keys.
    pub dirty_bytes: i64,
    /// Bytes of clean keys.
    pub clean_bytes: i64,
}

impl Delta {
    fn account(&mut self, k: &IKey, sign: i64) {
        if k.is_filling() {
            return;
        }
        self.keys += sign;
        if k.is_dirty() {
            self.dirty_bytes += sign * i64::from(k.len);
        } else {
            self.clean_bytes += sign * i64::from(k.len);
        }
    }
}

/// What a range of a read maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Cached: `len` bytes at `off` come from `key`, starting `skip` bytes
    /// into it.
    Hit {
        /// Backing offset.
        off: u64,
        /// Length.
        len: u32,
        /// The key.
        key: IKey,
        /// Offset of `off` inside the key.
        skip: u32,
    },
    /// Not cached.
    Miss {
        /// Backing offset.
        off: u64,
        /// Length.
        len: u32,
    },
    /// A read miss of another request is filling this range.
    Pending {
        /// Backing offset.
        off: u64,
        /// Length.
        len: u32,
        /// The fill.
        id: u32,
    },
}

/// The index of one slice: its entries keyed by their offset within the
/// slice, their keys packed ([`store`] says how: 32 bytes an entry, in
/// leaves kept about 80% full or better). The API speaks backing offsets
/// and [`IKey`]s; every entry lies in the slice the first insert names.
#[derive(Default)]
pub struct Slice {
    /// The slice's first backing offset.
    base: u64,
    store: Store,
}

impl std::fmt::Debug for Slice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Slice {
    /// Number of entries (keys and placeholders).
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// Whether the slice holds nothing.
    pub fn is_empty(&self) -> bool {
        self.store.len() == 0
    }

    /// `off` within the slice; offsets outside it map past its ends, where
    /// they compare with its entries as the offsets themselves do.
    fn rel(&self, off: u64) -> u32 {
        off.saturating_sub(self.base).min(u64::from(u32::MAX)) as u32
    }

    /// The backing offset of `o` within the slice.
    fn abs(&self, o: u32) -> u64 {
        self.base + u64::from(o)
    }

    /// `off` within the slice, if the slice holds it.
    fn exact(&self, off: u64) -> Option<u32> {
        off.checked_sub(self.base).filter(|r| *r < CACHE_SUBTREE_SIZE).map(|r| r as u32)
    }

    /// Every entry, in offset order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, IKey)> + '_ {
        self.store.iter().map(|(o, p)| (self.abs(o), p.get()))
    }

    /// The entry at exactly `off`.
    pub fn get(&self, off: u64) -> Option<IKey> {
        self.store.get(self.exact(off)?).map(|p| p.get())
    }

    fn put(&mut self, o: u32, key: IKey, d: &mut Delta) {
        d.account(&key, 1);
        if let Some(old) = self.store.put(o, Packed::new(&key)) {
            d.account(&old.get(), -1);
        }
    }

    fn take(&mut self, o: u32, d: &mut Delta) -> Option<IKey> {
        let k = self.store.take(o)?.get();
        d.account(&k, -1);
        Some(k)
    }

    /// Removes the entry at `off`.
    pub fn remove(&mut self, off: u64, d: &mut Delta) -> Option<IKey> {
        let o = self.exact(off)?;
        self.take(o, d)
    }

    /// Inserts `key` at `ks`; every overlapped part of existing keys is
    /// cut away so the new key wins. `[ks, ks + key.len)` must lie in one
    /// slice, the one of the keys already here: the engine splits requests
    /// at slice ends, and a key read from the log stays in its slice.
    pub fn insert(&mut self, ks: u64, key: IKey, d: &mut Delta) {
        if self.is_empty() {
            self.base = ks & !(CACHE_SUBTREE_SIZE - 1);
        }
        let ke = ks + u64::from(key.len);
        assert!(
            ks >= self.base && ke <= self.base + CACHE_SUBTREE_SIZE,
            "key [{ks}, {ke}) outside the slice at {}",
            self.base
        );
        let (ks, ke) = ((ks - self.base) as u32, (ke - self.base) as u32);
        // Keys are sorted and disjoint: K overlaps something only if the
        // last key starting before K's end ends after K's start. Most
        // inserts overlap nothing.
        if self.store.before(ke).is_some_and(|(ts, t)| ts + t.len() > ks) {
            let overlapping: Vec<(u32, IKey)> = self.local_overlapping(ks, ke).map(|(o, p)| (o, p.get())).collect();
            for (ts, t) in overlapping {
                let te = ts + t.len;
                if ts < ks {
                    let mut head = t;
                    head.len = ks - ts;
                    self.put(ts, head, d);
                } else {
                    self.take(ts, d);
                }
                if te > ke && !t.is_filling() {
                    let mut tail = t;
                    tail.cut_front(ke - ts);
                    self.put(ke, tail, d);
                }
            }
        }
        self.put(ks, key, d);
    }

    /// The key that covers all of `[ks, ke)`, if one does.
    pub fn covering(&self, ks: u64, ke: u64) -> Option<(u64, IKey)> {
        if ks < self.base {
            return None;
        }
        let (ts, t) = self.store.at_or_before(self.rel(ks))?;
        let ts = self.abs(ts);
        (ts + u64::from(t.len()) >= ke).then(|| (ts, t.get()))
    }

    /// Removes the keys `stale` says are stale among those overlapping
    /// `[ks, ke)`; returns how many.
    pub fn drop_stale(&mut self, ks: u64, ke: u64, stale: impl Fn(&IKey) -> bool, d: &mut Delta) -> usize {
        let (ks, ke) = (self.rel(ks), self.rel(ke));
        let found: Vec<u32> = self.local_overlapping(ks, ke).filter(|(_, p)| stale(&p.get())).map(|(o, _)| o).collect();
        for o in &found {
            self.take(*o, d);
        }
        found.len()
    }

    /// Entries overlapping `[ks, ke)` within the slice, in order.
    fn local_overlapping(&self, ks: u32, ke: u32) -> impl Iterator<Item = (u32, Packed)> + '_ {
        let before = self.store.before(ks).filter(|(o, p)| u64::from(*o) + u64::from(p.len()) > u64::from(ks));
        before.into_iter().chain(self.store.from(ks).take_while(move |(o, _)| *o < ke))
    }

    /// Entries overlapping `[ks, ke)`, in order.
    pub fn overlapping(&self, ks: u64, ke: u64) -> impl Iterator<Item = (u64, IKey)> + '_ {
        self.local_overlapping(self.rel(ks), self.rel(ke)).map(|(o, p)| (self.abs(o), p.get()))
    }

    /// How `[ks, ke)` maps onto the index: hits, misses and pending fills,
    /// in order, covering the range exactly.
    pub fn lookup(&self, ks: u64, ke: u64) -> Vec<Piece> {
        let mut pieces = Vec::new();
        let mut at = ks;
        for (ts, t) in self.overlapping(ks, ke) {
            let start = ts.max(ks);
            let end = (ts + u64::from(t.len)).min(ke);
            if start > at {
                pieces.push(Piece::Miss { off: at, len: (start - at) as u32 });
            }
            let len = (end - start) as u32;
            pieces.push(match t.fill_id() {
                Some(id) => Piece::Pending { off: start, len, id },
                None => Piece::Hit { off: start, len, key: t, skip: (start - ts) as u32 },
            });
            at = end;
        }
        if at < ke {
            pieces.push(Piece::Miss { off: at, len: (ke - at) as u32 });
        }
        pieces
    }

    /// Removes clean keys from `[ks, ke)`, cutting those that cross its ends.
    pub fn drop_clean(&mut self, ks: u64, ke: u64, d: &mut Delta) {
        let (ks, ke) = (self.rel(ks), self.rel(ke));
        let clean: Vec<(u32, IKey)> = self
            .local_overlapping(ks, ke)
            .map(|(o, p)| (o, p.get()))
            .filter(|(_, k)| !k.is_filling() && !k.is_dirty())
            .collect();
        for (ts, t) in clean {
            let te = ts + t.len;
            self.take(ts, d);
            if ts < ks {
                let mut head = t;
                head.len = ks - ts;
                self.put(ts, head, d);
            }
            if te > ke {
                let mut tail = t;
                tail.cut_front(ke - ts);
                self.put(ke, tail, d);
            }
        }
    }
}

/// The index of a backing device: one [`Slice`] per 4 MiB, each behind its
/// own lock.
#[derive(Debug)]
pub(super) struct Index {
    slices: Vec<RwLock<Slice>>,
}

impl Index {
    /// The index of a device of `dev_size` bytes, with what replay found.
    pub(super) fn new(dev_size: u64, loaded: BTreeMap<u64, Slice>) -> Self {
        let n = dev_size.div_ceil(CACHE_SUBTREE_SIZE) as usize;
        let mut slices: Vec<RwLock<Slice>> = (0..n).map(|_| RwLock::new(Slice::default())).collect();
        for (idx, slice) in loaded {
            if let Some(s) = slices.get_mut(idx as usize) {
                *s.get_mut().unwrap_or_else(|e| e.into_inner()) = slice;
            }
        }
        Self { slices }
    }

    /// The slice holding backing offset `off`, locked.
    pub(super) fn slice(&self, off: u64) -> RwLockWriteGuard<'_, Slice> {
        self.slices[(off >> CACHE_SUBTREE_SHIFT) as usize].write().unwrap_or_else(|e| e.into_inner())
    }

    /// The slice holding backing offset `off`, shared with other readers:
    /// what a read hit looks up, so that readers of one slice never wait
    /// for each other.
    pub(super) fn slice_shared(&self, off: u64) -> RwLockReadGuard<'_, Slice> {
        self.slices[(off >> CACHE_SUBTREE_SHIFT) as usize].read().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn slices(&self) -> &[RwLock<Slice>] {
        &self.slices
    }
}

/// The end of the slice holding `off`.
pub(super) fn slice_end(off: u64) -> u64 {
    (off | (CACHE_SUBTREE_SIZE - 1)) + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(len: u32, seg: u32, seg_off: u32) -> IKey {
        IKey { seg_gen: 0, len, cache_seg: seg, seg_off, crc: 0, orig_delta: 0, orig_len: len, state: KeyState::Dirty }
    }

    fn entries(s: &Slice) -> Vec<(u64, u32, u32, u32)> {
        s.iter().map(|(o, k)| (o, k.len, k.cache_seg, k.seg_off)).collect()
    }

    fn with(existing: (u64, u32), new: (u64, u32)) -> Slice {
        let mut s = Slice::default();
        let mut d = Delta::default();
        s.insert(existing.0, key(existing.1, 1, 1000), &mut d);
        s.insert(new.0, key(new.1, 2, 0), &mut d);
        s
    }

    #[test]
    fn six_cases() {
        // T before K, and T after K: untouched.
        assert_eq!(entries(&with((0, 100), (100, 50))), vec![(0, 100, 1, 1000), (100, 50, 2, 0)]);
        assert_eq!(entries(&with((200, 100), (100, 100))), vec![(100, 100, 2, 0), (200, 100, 1, 1000)]);
        // T inside K: deleted (also when equal).
        assert_eq!(entries(&with((120, 10), (100, 50))), vec![(100, 50, 2, 0)]);
        assert_eq!(entries(&with((100, 50), (100, 50))), vec![(100, 50, 2, 0)]);
        // T covers K's tail: cut to [ke, te), data location advanced.
        assert_eq!(entries(&with((120, 100), (100, 50))), vec![(100, 50, 2, 0), (150, 70, 1, 1030)]);
        // T contains K: split, the tail's location advanced by ke - ts.
        assert_eq!(entries(&with((0, 300), (100, 50))), vec![(0, 100, 1, 1000), (100, 50, 2, 0), (150, 150, 1, 1150)]);
        // T covers K's head: cut to [ts, ks).
        assert_eq!(entries(&with((0, 120), (100, 50))), vec![(0, 100, 1, 1000), (100, 50, 2, 0)]);
        assert_eq!(entries(&with((0, 150), (100, 50))), vec![(0, 100, 1, 1000), (100, 50, 2, 0)]);
    }

    #[test]
    fn placeholders_are_deleted_or_cut_back_never_moved() {
        let mut s = Slice::default();
        let mut d = Delta::default();
        s.insert(120, IKey::placeholder(100, 7), &mut d);
        s.insert(100, key(50, 2, 0), &mut d);
        assert_eq!(entries(&s), vec![(100, 50, 2, 0)], "overlapped at its head: deleted");
        let mut s = Slice::default();
        s.insert(0, IKey::placeholder(300, 7), &mut d);
        s.insert(100, key(50, 2, 0), &mut d);
        assert_eq!(entries(&s), vec![(0, 100, 0, 0), (100, 50, 2, 0)], "containing: cut back, not split");
        assert_eq!(s.get(0).and_then(|k| k.fill_id()), Some(7), "still the same fill's placeholder");
    }

    #[test]
    fn cut_keys_remember_their_crc_extent() {
        let mut s = Slice::default();
        let mut d = Delta::default();
        s.insert(0, key(300, 1, 1000), &mut d);
        s.insert(0, key(100, 2, 0), &mut d);
        let k = s.get(100).unwrap();
        assert_eq!((k.seg_off, k.orig_delta, k.orig_len), (1100, 100, 300));
    }

    #[test]
    fn lookup_pieces() {
        let mut s = Slice::default();
        let mut d = Delta::default();
        s.insert(100, key(100, 1, 0), &mut d);
        s.insert(300, IKey::placeholder(50, 9), &mut d);
        let p = s.lookup(50, 400);
        assert_eq!(
            p,
            vec![
                Piece::Miss { off: 50, len: 50 },
                Piece::Hit { off: 100, len: 100, key: key(100, 1, 0), skip: 0 },
                Piece::Miss { off: 200, len: 100 },
                Piece::Pending { off: 300, len: 50, id: 9 },
                Piece::Miss { off: 350, len: 50 },
            ]
        );
        assert_eq!(s.lookup(150, 160), vec![Piece::Hit { off: 150, len: 10, key: key(100, 1, 0), skip: 50 }]);
    }

    #[test]
    fn counters_follow_changes() {
        let mut s = Slice::default();
        let mut d = Delta::default();
        s.insert(0, key(300, 1, 0), &mut d);
        let mut clean = key(100, 1, 0);
        clean.state = KeyState::Clean;
        s.insert(1000, clean, &mut d);
        s.insert(100, key(50, 2, 0), &mut d);
        assert_eq!(d, Delta { keys: 4, dirty_bytes: 300, clean_bytes: 100 });
        s.drop_clean(0, 2000, &mut d);
        assert_eq!(d, Delta { keys: 3, dirty_bytes: 300, clean_bytes: 0 });
    }

    /// The index as a `BTreeMap` of whole keys, as it was before keys were
    /// packed: what [`Slice`] must still do.
    #[derive(Default)]
    struct Model(BTreeMap<u64, IKey>);

    impl Model {
        fn overlapping(&self, ks: u64, ke: u64) -> Vec<(u64, IKey)> {
            let before = self.0.range(..ks).next_back().filter(|(o, k)| **o + u64::from(k.len) > ks);
            before.into_iter().chain(self.0.range(ks..ke)).map(|(o, k)| (*o, *k)).collect()
        }

        fn insert(&mut self, ks: u64, key: IKey) {
            let ke = ks + u64::from(key.len);
            for (ts, t) in self.overlapping(ks, ke) {
                self.0.remove(&ts);
                if ts < ks {
                    self.0.insert(ts, IKey { len: (ks - ts) as u32, ..t });
                }
                if ts + u64::from(t.len) > ke && !t.is_filling() {
                    let mut tail = t;
                    tail.cut_front((ke - ts) as u32);
                    self.0.insert(ke, tail);
                }
            }
            self.0.insert(ks, key);
        }

        fn drop_clean(&mut self, ks: u64, ke: u64) {
            for (ts, t) in self.overlapping(ks, ke).into_iter().filter(|(_, k)| k.state == KeyState::Clean) {
                self.0.remove(&ts);
                if ts < ks {
                    self.0.insert(ts, IKey { len: (ks - ts) as u32, ..t });
                }
                if ts + u64::from(t.len) > ke {
                    let mut tail = t;
                    tail.cut_front((ke - ts) as u32);
                    self.0.insert(ke, tail);
                }
            }
        }
    }

    /// An operation on a slice: 0 inserts a dirty key, 1 a clean one, 2 a
    /// placeholder, 3 removes the entry at or before `off`, 4 drops clean
    /// keys, 5 drops keys of odd segments as stale.
    fn apply(s: &mut Slice, m: &mut Model, d: &mut Delta, (op, off, len, seg): (u8, u64, u32, u32)) {
        let mut k = IKey { seg_gen: u64::from(seg) << 33, ..key(len, seg, seg * 64) };
        match op {
            0 | 1 => {
                k.state = if op == 0 { KeyState::Dirty } else { KeyState::Clean };
                s.insert(off, k, d);
                m.insert(off, k);
            }
            2 => {
                s.insert(off, IKey::placeholder(len, seg), d);
                m.insert(off, IKey::placeholder(len, seg));
            }
            3 => {
                let at = m.0.range(..=off).next_back().map(|(o, _)| *o).unwrap_or(off);
                assert_eq!(s.remove(at, d), m.0.remove(&at));
            }
            4 => {
                s.drop_clean(off, off + u64::from(len), d);
                m.drop_clean(off, off + u64::from(len));
            }
            _ => {
                let stale = |k: &IKey| !k.is_filling() && k.cache_seg % 2 == 1;
                s.drop_stale(off, off + u64::from(len), stale, d);
                for (o, _) in m.overlapping(off, off + u64::from(len)).into_iter().filter(|(_, k)| stale(k)) {
                    m.0.remove(&o);
                }
            }
        }
    }

    #[test]
    fn sequential_and_descending_runs_fill_their_leaves() {
        for descending in [false, true] {
            let mut s = Slice::default();
            let mut d = Delta::default();
            for i in 0..1000u64 {
                let i = if descending { 999 - i } else { i };
                s.insert((5 << CACHE_SUBTREE_SHIFT) + i * 8, key(8, 1, 0), &mut d);
            }
            let lens = s.store.leaf_lens();
            assert!(lens.iter().filter(|&&n| n < store::LEAF_CAP).count() <= 1, "{lens:?}");
            assert_eq!(s.len(), 1000);
        }
    }

    #[test]
    fn packed_keys_round_trip_at_their_bounds() {
        let max = IKey {
            seg_gen: u64::MAX,
            len: CACHE_SUBTREE_SIZE as u32,
            cache_seg: u32::MAX,
            seg_off: pcache_format::CACHE_SEG_DATA_SIZE - 1,
            crc: u32::MAX,
            orig_delta: CACHE_SUBTREE_SIZE as u32 - 1,
            orig_len: CACHE_SUBTREE_SIZE as u32,
            state: KeyState::Clean,
        };
        assert_eq!(Packed::new(&max).get(), max);
        assert_eq!(Packed::new(&max).len(), max.len);
        let ph = IKey::placeholder(CACHE_SUBTREE_SIZE as u32, u32::MAX);
        assert_eq!(Packed::new(&ph).get(), ph);
        let dirty = IKey { state: KeyState::Dirty, seg_gen: 0, ..max };
        assert_eq!(Packed::new(&dirty).get(), dirty);
    }

    #[test]
    #[should_panic(expected = "out of its bounds")]
    fn keys_past_the_packed_bounds_are_refused() {
        Packed::new(&key(CACHE_SUBTREE_SIZE as u32 * 2, 1, 0));
    }

    proptest! {
        /// Any sequence of inserts leaves an index that maps every byte to
        /// the newest key covering it, at the right place in its data.
        #[test]
        fn index_matches_byte_model(ops in proptest::collection::vec((0u64..2000, 1u32..400), 1..60)) {
            let mut s = Slice::default();
            let mut d = Delta::default();
            // model[b] = (writer index, offset of b in that writer's data)
            let mut model: Vec<Option<(u32, u32)>> = vec![None; 2400];
            for (i, (off, len)) in ops.iter().enumerate() {
                s.insert(*off, key(*len, i as u32, 0), &mut d);
                for b in 0..*len {
                    model[(*off + u64::from(b)) as usize] = Some((i as u32, b));
                }
            }
            let mut seen: Vec<Option<(u32, u32)>> = vec![None; 2400];
            let mut prev_end = 0;
            let mut keys = 0i64;
            let mut bytes = 0i64;
            for (o, k) in s.iter() {
                prop_assert!(o >= prev_end, "overlap at {}", o);
                prev_end = o + u64::from(k.len);
                keys += 1;
                bytes += i64::from(k.len);
                for b in 0..k.len {
                    seen[(o + u64::from(b)) as usize] = Some((k.cache_seg, k.seg_off + b));
                }
            }
            prop_assert_eq!(seen, model);
            prop_assert_eq!(d, Delta { keys, dirty_bytes: bytes, clean_bytes: 0 });
        }

        /// Any sequence of operations, over enough small keys to fill,
        /// split, rebalance and merge many leaves, leaves the slice as the
        /// `BTreeMap` index left it, and answers every query alike.
        #[test]
        fn slice_matches_btreemap_index(
            ops in proptest::collection::vec((0u8..6, 0u64..6000, 1u32..48, 0u32..8), 1..800),
            queries in proptest::collection::vec((0u64..6100, 1u64..300), 20),
        ) {
            let base = 3 << CACHE_SUBTREE_SHIFT;
            let (mut s, mut m, mut d) = (Slice::default(), Model::default(), Delta::default());
            for (op, off, len, seg) in ops {
                apply(&mut s, &mut m, &mut d, (op, base + off, len, seg));
            }
            prop_assert_eq!(s.iter().collect::<Vec<_>>(), m.0.iter().map(|(o, k)| (*o, *k)).collect::<Vec<_>>());
            prop_assert_eq!(s.len(), m.0.len());
            let mut want = Delta::default();
            for k in m.0.values() {
                want.account(k, 1);
            }
            prop_assert_eq!(d, want);
            for (off, len) in queries {
                let (ks, ke) = (base + off, base + off + len);
                prop_assert_eq!(s.overlapping(ks, ke).collect::<Vec<_>>(), m.overlapping(ks, ke));
                let covering = m.0.range(..=ks).next_back().filter(|(o, k)| **o + u64::from(k.len) >= ke);
                prop_assert_eq!(s.covering(ks, ke), covering.map(|(o, k)| (*o, *k)));
                prop_assert_eq!(s.get(ks), m.0.get(&ks).copied());
            }
        }
    }
}
