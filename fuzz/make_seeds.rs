//! Writes the seed corpora: `corpus/<target>/seed-*` under the fuzz crate
//! (or under the directory given as the only argument).
//!
//! Run: `cargo run --release --features make-seeds --bin make-seeds` in
//! fuzz/. `fuzz/corpus/` is git-ignored; `run.sh` runs this before
//! fuzzing. Seeds are deterministic: rerunning rewrites the same files.

use std::fs;
use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};
use pcache_format::consts::{CACHE_SEG_DATA_SIZE, KSET_KEYS_MAX, META_SEG_DATA_OFF, SEG_SIZE};
use pcache_format::sparse::ImageBuilder;
use pcache_format::{
    BackingDevInfo, CacheFlags, CacheInfo, CachePos, CacheSegGen, Dialect, Key, KeyFlags, MetaRecord, MetaSegmentInfo,
    ReadMedia, SegmentInfo, Superblock, TERMINATOR, encode_copy, encode_kset, encode_last, kset_size,
};
use pcache_fuzz::{Recipe, build};

struct Out {
    root: PathBuf,
    count: usize,
}

impl Out {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let path = dir.join(format!("seed-{name}"));
        fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        self.count += 1;
    }
}

/// A fixed-seed xorshift generator: seeds must not change between runs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn main() {
    let root = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"),
    };
    let mut out = Out { root, count: 0 };
    superblock(&mut out);
    copy_selection(&mut out);
    kset(&mut out);
    backing_table(&mut out);
    image(&mut out);
    nbd(&mut out);
    engine(&mut out);
    println!("make-seeds: wrote {} seeds under {}", out.count, out.root.display());
}

fn superblock(out: &mut Out) {
    for seg_num in [1u16, 31, 63, 100, 65_535] {
        let area = Superblock::encode_area(seg_num);
        out.put("superblock", &format!("area-{seg_num}"), &area);
        // With a layout: the same seg_num (selector bit 0 clear) and a device
        // just large enough.
        let size = 0x4000 + u64::from(seg_num) * SEG_SIZE;
        let mut with = area.to_vec();
        with.extend_from_slice(&[0, 0]);
        with.extend_from_slice(&size.to_le_bytes());
        out.put("superblock", &format!("area-{seg_num}-fits"), &with);
        with.truncate(4096 + 2);
        with.extend_from_slice(&(size - 1).to_le_bytes());
        out.put("superblock", &format!("area-{seg_num}-short"), &with);
    }
    // A big-endian flag, and a version 2, both with valid CRCs.
    let mut be = Superblock::encode_area(63);
    be[6] = 1;
    pcache_format::crc::seal(&mut be);
    out.put("superblock", "bigendian", &be);
    let mut v2 = Superblock::encode_area(63);
    v2[4] = 2;
    pcache_format::crc::seal(&mut v2);
    out.put("superblock", "version-2", &v2);
    out.put("superblock", "zeros", &[0u8; 4096]);
}

/// Two copies of `record` with sequence numbers `seqs` (None: a bad CRC).
fn pair<R: MetaRecord>(record: &R, seqs: [Option<u8>; 2]) -> Vec<u8> {
    let n = R::COPY_SIZE;
    let mut buf = vec![0u8; 2 * n];
    for (i, seq) in seqs.iter().enumerate() {
        let copy = &mut buf[i * n..(i + 1) * n];
        encode_copy(Dialect::RfcV1, record, seq.unwrap_or(0x5a), copy).expect("a whole copy");
        if seq.is_none() {
            copy[0] ^= 0xff;
        }
    }
    buf
}

fn copy_selection(out: &mut Out) {
    const SEQS: [[Option<u8>; 2]; 7] = [
        [Some(1), Some(0)],
        [Some(1), Some(2)],
        [Some(255), Some(0)],
        [Some(5), Some(133)],
        [Some(7), Some(7)],
        [None, Some(3)],
        [None, None],
    ];
    let backing =
        BackingDevInfo::running(3, b"/dev/sdb", 1 << 21, CacheInfo::new(1, 8, 70, CacheFlags::DATA_CRC)).unwrap();
    for (i, seqs) in SEQS.iter().enumerate() {
        // Selector 0: stride 16.
        let mut small = |name: &str, bytes: Vec<u8>| {
            let mut seed = vec![0u8, 0, 0];
            seed.extend_from_slice(&bytes);
            out.put("copy_selection", &format!("{name}-{i}"), &seed);
        };
        small("gen", pair(&CacheSegGen::new(42), *seqs));
        small("pos", pair(&CachePos::new(1, 4096), *seqs));
        // Selector 1: stride 4096; byte 1 picks the record type.
        let mut big = |name: &str, kind: u8, bytes: Vec<u8>| {
            let mut seed = vec![1u8, kind, 0];
            seed.extend_from_slice(&bytes);
            out.put("copy_selection", &format!("{name}-{i}"), &seed);
        };
        big("seginfo", 0, pair(&SegmentInfo::data(3, Some(4)), *seqs));
        big("meta", 1, pair(&MetaSegmentInfo::default(), *seqs));
        big("backing", 2, pair(&backing, *seqs));
    }
    // Selector 2 and 3: odd strides over sealed copies.
    for stride in [8usize, 24, 100, 255] {
        let mut seed = vec![2u8, stride as u8, 0];
        for seq in [9u8, 10] {
            let mut copy = vec![0u8; stride];
            copy[4] = seq;
            copy[8..].iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
            pcache_format::crc::seal(&mut copy);
            seed.extend_from_slice(&copy);
        }
        out.put("copy_selection", &format!("stride-{stride}"), &seed);
    }
    let mut seed = vec![3u8];
    seed.extend_from_slice(&8192u16.to_le_bytes());
    seed.extend_from_slice(&vec![0u8; 2 * 8192]);
    out.put("copy_selection", "stride-8192", &seed);
}

fn kset(out: &mut Out) {
    const D: Dialect = Dialect::RfcV1;
    let key = Key::new(4096, 4096, KeyFlags::empty(), 1, 0, 0);
    let mut buf = vec![0u8; kset_size(KSET_KEYS_MAX) + 24];
    let size = encode_kset(D, &[key], &mut buf).unwrap();
    out.put("kset", "one-key", &buf[..size]);
    // Followed by a terminator, as in a log.
    buf[size..size + 24].copy_from_slice(&TERMINATOR);
    out.put("kset", "one-key-terminated", &buf[..size + 24]);
    out.put("kset", "last-5", &encode_last(D, 5));
    out.put("kset", "terminator", &TERMINATOR);
    let mixed = [
        Key::new(0, 512, KeyFlags::CLEAN, 0, 0, 3),
        Key::new(4 * 1024 * 1024 - 4096, 4096, KeyFlags::empty(), 7, CACHE_SEG_DATA_SIZE - 4096, 1),
        Key::new(1 << 40, 65536, KeyFlags::empty(), 2, 12288, 9),
    ];
    let size = encode_kset(D, &mixed, &mut buf).unwrap();
    out.put("kset", "mixed", &buf[..size]);
    let full: Vec<Key> = (0..KSET_KEYS_MAX as u64)
        .map(|i| {
            let flags = if i % 3 == 0 { KeyFlags::CLEAN } else { KeyFlags::empty() };
            Key::new(i * 8192, 512 * (1 + i as u32 % 16), flags, (i % 8) as u32, (i * 8192) as u32, i / 64)
        })
        .collect();
    let size = encode_kset(D, &full, &mut buf).unwrap();
    out.put("kset", "full-128", &buf[..size]);
    // A kset with a bad key (length 0) and a valid CRC.
    let bad = [key, Key::new(0, 0, KeyFlags::empty(), 0, 0, 0)];
    let size = encode_kset(D, &bad, &mut buf).unwrap();
    out.put("kset", "bad-key", &buf[..size]);
}

fn backing_table(out: &mut Out) {
    // Segment 0 of a formatted device with caches in entries 0, 1 and 5.
    let mut b = ImageBuilder::format(1 << 30).unwrap();
    for (id, path) in [(0u32, &b"/dev/sda"[..]), (1, b"/dev/sdb"), (5, b"/dev/nvme0n1")] {
        b.add_cache(id, path, 1 << 30, 4, id % 2 == 0).unwrap();
    }
    let seg0 = b.layout().segment_offset(0).unwrap();
    let entry_end = |id: u64| (META_SEG_DATA_OFF + (id + 1) * 8192) as usize;
    let mut seg = vec![0u8; entry_end(5)];
    b.image().read_at(seg0, &mut seg).unwrap();
    out.put("backing_table", "meta-info", &seg[..8192]);
    out.put("backing_table", "entries-0-1", &seg[..entry_end(1)]);
    out.put("backing_table", "entries-0-5", &seg);
    // Entry 1 updated once: copy 1 with seq 2 and another path.
    let mut info =
        BackingDevInfo::running(1, b"/dev/sdc", 1 << 21, CacheInfo::new(5, 4, 70, CacheFlags::empty())).unwrap();
    info.cache_info.seg_id = 5.into();
    let at = entry_end(0) + 4096;
    encode_copy(Dialect::RfcV1, &info, 2, &mut seg[at..at + 4096]).unwrap();
    out.put("backing_table", "entries-0-5-updated", &seg);
}

fn image(out: &mut Out) {
    // Random byte strings, kept when they decode to a recipe that builds
    // caches with writes; a few with patches, most without.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut clean, mut patched, mut tries) = (0, 0, 0);
    while (clean < 6 || patched < 6) && tries < 100_000 {
        tries += 1;
        let len = [512usize, 1024, 2048, 4096][tries % 4];
        let bytes = rng.bytes(len);
        let Ok(recipe) = Recipe::arbitrary_take_rest(Unstructured::new(&bytes)) else { continue };
        let built = build(&recipe);
        let logged: u64 = built.caches.iter().map(|c| c.logged).sum();
        if built.caches.is_empty() || logged < 3 {
            continue;
        }
        if recipe.patches.is_empty() && clean < 6 {
            out.put("image", &format!("clean-{clean}"), &bytes);
            clean += 1;
        } else if !recipe.patches.is_empty() && patched < 6 {
            out.put("image", &format!("patched-{patched}"), &bytes);
            patched += 1;
        }
    }
    out.put("image", "empty", &[]);
}

/// Client byte streams for the `nbd` target: handshakes that reach
/// transmission, then requests of every kind.
fn nbd(out: &mut Out) {
    use pcache_cli::nbd::*;
    let (opt, req) = (encode_option, encode_request);
    let mut go = 1u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"a");
    go.extend_from_slice(&2u16.to_be_bytes());
    go.extend_from_slice(&INFO_NAME.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    let mut requests = req(CMD_WRITE, CMD_FLAG_FUA, 1, 512, 8);
    requests.extend_from_slice(b"pcache!!");
    requests.extend(req(CMD_READ, 0, 2, 0, 4096));
    requests.extend(req(CMD_FLUSH, 0, 3, 0, 0));
    requests.extend(req(CMD_TRIM, 0, 4, 0, 1024));
    requests.extend(req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 5, 100, 100));
    requests.extend(req(CMD_READ, 0, 6, 65_000, 1000));
    requests.extend(req(CMD_DISC, 0, 7, 0, 0));
    for (name, structured, flags) in [("go", false, FLAG_C_FIXED_NEWSTYLE), ("go-structured", true, 3)] {
        let mut v = flags.to_be_bytes().to_vec();
        v.extend(opt(OPT_LIST, &[]));
        if structured {
            v.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        }
        v.extend(opt(OPT_INFO, &go));
        v.extend(opt(OPT_GO, &go));
        v.extend(requests.iter());
        out.put("nbd", name, &v);
    }
    let mut v = 0u32.to_be_bytes().to_vec();
    v.extend(opt(OPT_EXPORT_NAME, b"b"));
    v.extend(req(CMD_READ, 0, 1, 0, 512));
    v.extend(req(CMD_WRITE, 0, 2, 0, 4));
    v.extend_from_slice(b"abcd");
    out.put("nbd", "export-name", &v);
}

/// Byte strings for the `engine` target: `arbitrary` turns them into op
/// sequences (the first byte of each op picks its kind).
fn engine(out: &mut Out) {
    let mut r = Rng(0x00e1_191e);
    for i in 0..8 {
        out.put("engine", &format!("random-{i}"), &r.bytes(64 + 48 * i));
    }
}
