//! How a slice's entries sit in DRAM: 32 bytes each, in sorted leaves of
//! up to [`LEAF_CAP`] entries.
//!
//! An entry is its offset within the slice (a `u32`: a slice is 4 MiB) and
//! a [`Packed`] key of 28 bytes. A `BTreeMap<u64, IKey>` spent 48 bytes on
//! each entry and filled its 11-entry nodes to about 55% under sequential
//! inserts (it splits a full node in the middle): 93 bytes a key. Here a
//! full leaf first lends entries to a neighbour with room, an append to a
//! full leaf opens a new one rather than halving it, and a leaf that empties
//! below half merges with a neighbour when both fit in three quarters of
//! one: the leaves stay about 80% full under random inserts and full under
//! sequential ones. The leaves hang off one sorted vector, each with its
//! first offset at hand, so a lookup is a binary search over the leaves,
//! then one inside a leaf.

use pcache_format::{CACHE_SEG_DATA_SIZE, CACHE_SUBTREE_SIZE};

use super::{IKey, KeyState};

/// Entries a leaf holds.
pub(super) const LEAF_CAP: usize = 64;

/// Bits of a length, an `orig_len` and an `orig_delta`: a key stays inside
/// its 4 MiB slice, so each is at most 2^22.
const LEN_BITS: u32 = 23;
/// Bits of an offset in a segment's data area.
const SEG_OFF_BITS: u32 = 24;
const _: () = assert!(CACHE_SUBTREE_SIZE < 1 << LEN_BITS);
const _: () = assert!((CACHE_SEG_DATA_SIZE as u64) <= 1 << SEG_OFF_BITS);

const SEG_OFF_SHIFT: u32 = LEN_BITS;
const DELTA_SHIFT: u32 = SEG_OFF_SHIFT + SEG_OFF_BITS;
const ORIG_LEN_SHIFT: u32 = DELTA_SHIFT + LEN_BITS;
const STATE_SHIFT: u32 = ORIG_LEN_SHIFT + LEN_BITS;
const _: () = assert!(STATE_SHIFT + 2 <= 96);

const DIRTY: u32 = 0;
const CLEAN: u32 = 1;
const FILLING: u32 = 2;

/// An [`IKey`] in 28 bytes, all `u32`s so that nothing pads it: the 64-bit
/// generation and the CRC whole, the segment index whole (a key read from
/// the log is indexed before its segment is checked against the cache),
/// and the lengths and offsets, which the slice and the segment bound, in
/// 96 bits: `len` (23) | `seg_off` (24) | `orig_delta` (23) | `orig_len`
/// (23) | state (2). A placeholder keeps its fill id in the generation's
/// low half: it points at no data, so it has no generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Packed {
    gen_: [u32; 2],
    seg: u32,
    crc: u32,
    bits: [u32; 3],
}

const _: () = assert!(std::mem::size_of::<Packed>() == 28);

impl Packed {
    /// `k` packed. Every key the index holds fits: one read from the log
    /// passed `Key::check` (a length of at most a slice, the data inside
    /// the data area) and the engine makes no other, and cutting a key only
    /// shrinks `len` and moves `seg_off` and `orig_delta` within the
    /// original extent. A key that does not fit is a bug: it panics rather
    /// than being stored wrong.
    pub(super) fn new(k: &IKey) -> Self {
        let fits = |v: u32, bits: u32| v >> bits == 0;
        assert!(
            fits(k.len, LEN_BITS)
                && fits(k.orig_len, LEN_BITS)
                && fits(k.orig_delta, LEN_BITS)
                && fits(k.seg_off, SEG_OFF_BITS),
            "index key out of its bounds: {k:?}"
        );
        let (state, gen_) = match k.state {
            KeyState::Dirty => (DIRTY, k.seg_gen),
            KeyState::Clean => (CLEAN, k.seg_gen),
            KeyState::Filling(id) => {
                assert_eq!(k.seg_gen, 0, "a placeholder has no generation: {k:?}");
                (FILLING, u64::from(id))
            }
        };
        let bits = u128::from(k.len)
            | u128::from(k.seg_off) << SEG_OFF_SHIFT
            | u128::from(k.orig_delta) << DELTA_SHIFT
            | u128::from(k.orig_len) << ORIG_LEN_SHIFT
            | u128::from(state) << STATE_SHIFT;
        Self {
            gen_: [gen_ as u32, (gen_ >> 32) as u32],
            seg: k.cache_seg,
            crc: k.crc,
            bits: [bits as u32, (bits >> 32) as u32, (bits >> 64) as u32],
        }
    }

    /// The key's length, without unpacking the rest.
    pub(super) fn len(&self) -> u32 {
        self.bits[0] & ((1 << LEN_BITS) - 1)
    }

    /// The key.
    pub(super) fn get(&self) -> IKey {
        let bits = u128::from(self.bits[0]) | u128::from(self.bits[1]) << 32 | u128::from(self.bits[2]) << 64;
        let field = |shift: u32, width: u32| (bits >> shift) as u32 & ((1 << width) - 1);
        let gen_ = u64::from(self.gen_[0]) | u64::from(self.gen_[1]) << 32;
        let (state, seg_gen) = match field(STATE_SHIFT, 2) {
            DIRTY => (KeyState::Dirty, gen_),
            CLEAN => (KeyState::Clean, gen_),
            _ => (KeyState::Filling(self.gen_[0]), 0),
        };
        IKey {
            seg_gen,
            len: field(0, LEN_BITS),
            cache_seg: self.seg,
            seg_off: field(SEG_OFF_SHIFT, SEG_OFF_BITS),
            crc: self.crc,
            orig_delta: field(DELTA_SHIFT, LEN_BITS),
            orig_len: field(ORIG_LEN_SHIFT, LEN_BITS),
            state,
        }
    }
}

/// Up to [`LEAF_CAP`] entries, sorted by offset.
struct Node {
    offs: [u32; LEAF_CAP],
    keys: [Packed; LEAF_CAP],
}

/// A leaf: its node, its length and its first offset (so that finding a
/// leaf touches no node).
struct Leaf {
    first: u32,
    len: u32,
    node: Box<Node>,
}

impl Leaf {
    fn new() -> Self {
        Self { first: 0, len: 0, node: Box::new(Node { offs: [0; LEAF_CAP], keys: [Packed::default(); LEAF_CAP] }) }
    }

    fn n(&self) -> usize {
        self.len as usize
    }

    fn room(&self) -> usize {
        LEAF_CAP - self.n()
    }

    fn offs(&self) -> &[u32] {
        &self.node.offs[..self.n()]
    }

    fn entry(&self, s: usize) -> (u32, Packed) {
        (self.node.offs[s], self.node.keys[s])
    }

    /// Where `x` is or would go.
    fn slot(&self, x: u32) -> usize {
        self.offs().partition_point(|&o| o < x)
    }

    fn set_len(&mut self, n: usize) {
        self.len = n as u32;
        self.first = self.node.offs[0];
    }

    fn insert(&mut self, s: usize, x: u32, p: Packed) {
        let n = self.n();
        debug_assert!(n < LEAF_CAP && s <= n);
        self.node.offs.copy_within(s..n, s + 1);
        self.node.keys.copy_within(s..n, s + 1);
        self.node.offs[s] = x;
        self.node.keys[s] = p;
        self.set_len(n + 1);
    }

    fn remove(&mut self, s: usize) -> Packed {
        let n = self.n();
        let p = self.node.keys[s];
        self.node.offs.copy_within(s + 1..n, s);
        self.node.keys.copy_within(s + 1..n, s);
        self.set_len(n - 1);
        p
    }

    /// Moves the last `k` entries of `self` to the front of `right`.
    fn lend_right(&mut self, right: &mut Leaf, k: usize) {
        let (n, m) = (self.n(), right.n());
        right.node.offs.copy_within(..m, k);
        right.node.keys.copy_within(..m, k);
        right.node.offs[..k].copy_from_slice(&self.node.offs[n - k..n]);
        right.node.keys[..k].copy_from_slice(&self.node.keys[n - k..n]);
        right.set_len(m + k);
        self.set_len(n - k);
    }

    /// Moves the first `k` entries of `right` to the end of `self`.
    fn borrow_right(&mut self, right: &mut Leaf, k: usize) {
        let (n, m) = (self.n(), right.n());
        self.node.offs[n..n + k].copy_from_slice(&right.node.offs[..k]);
        self.node.keys[n..n + k].copy_from_slice(&right.node.keys[..k]);
        right.node.offs.copy_within(k..m, 0);
        right.node.keys.copy_within(k..m, 0);
        self.set_len(n + k);
        if k < m {
            right.set_len(m - k);
        } else {
            right.len = 0;
        }
    }
}

/// A slice's entries: offsets within the slice, and their keys.
#[derive(Default)]
pub(super) struct Store {
    leaves: Vec<Leaf>,
    len: usize,
}

impl Store {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The leaf that holds `x` or would: the last one starting at or before
    /// it, or the first.
    fn leaf(&self, x: u32) -> usize {
        self.leaves.partition_point(|l| l.first <= x).saturating_sub(1)
    }

    /// The position of the first entry at or after `x`: a leaf and a slot
    /// in it, which may be one past its last entry.
    fn seek(&self, x: u32) -> (usize, usize) {
        let li = self.leaf(x);
        match self.leaves.get(li) {
            None => (0, 0),
            Some(l) => (li, l.slot(x)),
        }
    }

    /// The entry before position `(li, s)`.
    fn before_pos(&self, (li, s): (usize, usize)) -> Option<(u32, Packed)> {
        if s > 0 {
            return Some(self.leaves[li].entry(s - 1));
        }
        let l = self.leaves.get(li.checked_sub(1)?)?;
        Some(l.entry(l.n() - 1))
    }

    /// The entry at `x`.
    pub(super) fn get(&self, x: u32) -> Option<Packed> {
        let (li, s) = self.seek(x);
        let l = self.leaves.get(li)?;
        (s < l.n() && l.node.offs[s] == x).then(|| l.node.keys[s])
    }

    /// The last entry before `x`.
    pub(super) fn before(&self, x: u32) -> Option<(u32, Packed)> {
        self.before_pos(self.seek(x))
    }

    /// The last entry at or before `x`.
    pub(super) fn at_or_before(&self, x: u32) -> Option<(u32, Packed)> {
        match x.checked_add(1) {
            Some(y) => self.before(y),
            None => self.get(x).map(|p| (x, p)).or_else(|| self.before(x)),
        }
    }

    /// Entries at or after `x`, in order.
    pub(super) fn from(&self, x: u32) -> impl Iterator<Item = (u32, Packed)> + '_ {
        let (li, s) = self.seek(x);
        let tail = self.leaves.get(li..).unwrap_or_default();
        tail.iter().enumerate().flat_map(move |(i, l)| (if i == 0 { s } else { 0 }..l.n()).map(|j| l.entry(j)))
    }

    /// Sets the entry at `x`; returns the one it replaces.
    pub(super) fn put(&mut self, x: u32, p: Packed) -> Option<Packed> {
        if self.leaves.is_empty() {
            self.leaves.push(Leaf::new());
        }
        let li = self.leaf(x);
        let leaf = &mut self.leaves[li];
        let s = leaf.slot(x);
        if s < leaf.n() && leaf.node.offs[s] == x {
            return Some(std::mem::replace(&mut leaf.node.keys[s], p));
        }
        let (li, s) = if leaf.room() > 0 { (li, s) } else { self.make_room(li, s) };
        self.leaves[li].insert(s, x, p);
        self.len += 1;
        None
    }

    /// Makes room in full leaf `li` for an entry at slot `s`: lends
    /// entries to a neighbour with room, else splits the leaf (an entry
    /// past either end gets a leaf of its own, so ascending or descending
    /// runs fill their leaves). Returns where the entry goes.
    fn make_room(&mut self, li: usize, s: usize) -> (usize, usize) {
        let right = self.leaves.get(li + 1).map_or(0, Leaf::room);
        let left = li.checked_sub(1).map_or(0, |l| self.leaves[l].room());
        if s == LEAF_CAP && right > 0 {
            return (li + 1, 0);
        }
        if s == 0 && left > 0 {
            return (li - 1, self.leaves[li - 1].n());
        }
        if right > 0 && right >= left {
            // s < LEAF_CAP: with k < right, or k = 1 and s kept here, the
            // entry's leaf has room.
            let k = (right / 2).max(1);
            let (a, b) = self.leaves.split_at_mut(li + 1);
            a[li].lend_right(&mut b[0], k);
            let kept = LEAF_CAP - k;
            return if s <= kept { (li, s) } else { (li + 1, s - kept) };
        }
        if left > 0 {
            // s > 0: with k < left, or k = 1 and s >= 1, likewise.
            let k = (left / 2).max(1);
            let (a, b) = self.leaves.split_at_mut(li);
            a[li - 1].borrow_right(&mut b[0], k);
            let n = a[li - 1].n();
            return if s >= k { (li, s - k) } else { (li - 1, n - k + s) };
        }
        let mut new = Leaf::new();
        match s {
            0 => {
                self.leaves.insert(li, new);
                (li, 0)
            }
            LEAF_CAP => {
                self.leaves.insert(li + 1, new);
                (li + 1, 0)
            }
            _ => {
                let half = LEAF_CAP / 2;
                new.borrow_right(&mut self.leaves[li], half);
                self.leaves.insert(li, new);
                if s < half { (li, s) } else { (li + 1, s - half) }
            }
        }
    }

    /// Removes the entry at `x`.
    pub(super) fn take(&mut self, x: u32) -> Option<Packed> {
        let (li, s) = self.seek(x);
        let leaf = self.leaves.get_mut(li)?;
        if s >= leaf.n() || leaf.node.offs[s] != x {
            return None;
        }
        let p = leaf.remove(s);
        self.len -= 1;
        if leaf.len == 0 {
            self.leaves.remove(li);
        } else if leaf.n() < LEAF_CAP / 2 {
            self.merge(li);
        }
        Some(p)
    }

    /// Merges leaf `li` with a neighbour when both fit in three quarters of
    /// a leaf, so that leaves emptied by removals do not linger.
    fn merge(&mut self, li: usize) {
        let fits = |a: &Leaf, b: &Leaf| a.n() + b.n() <= LEAF_CAP * 3 / 4;
        let at = if self.leaves.get(li + 1).is_some_and(|r| fits(&self.leaves[li], r)) {
            li
        } else if li > 0 && fits(&self.leaves[li - 1], &self.leaves[li]) {
            li - 1
        } else {
            return;
        };
        let (a, b) = self.leaves.split_at_mut(at + 1);
        let n = b[0].n();
        a[at].borrow_right(&mut b[0], n);
        self.leaves.remove(at + 1);
    }

    /// Every entry, in order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, Packed)> + '_ {
        self.leaves.iter().flat_map(|l| (0..l.n()).map(|j| l.entry(j)))
    }

    /// The leaves' fill, for tests: how many, and how many entries each.
    #[cfg(test)]
    pub(super) fn leaf_lens(&self) -> Vec<usize> {
        self.leaves.iter().map(Leaf::n).collect()
    }
}
