//! Writes the seed corpora: `corpus/<target>/seed-*` under the fuzz crate
//! (or under the directory given as the only argument).
//!
//! Run: `cargo run --release --features make-seeds --bin make-seeds` in
//! fuzz/. `fuzz/corpus/` is git-ignored; `run.sh` runs this before
//! fuzzing. Seeds are deterministic: rerunning rewrites the same files.

use std::fs;
use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};
use pcache_format::consts::{CACHE_DEV_SIZE_MIN, CACHE_SEG_DATA_SIZE, KSET_KEYS_MAX, META_SEG_DATA_OFF, SEG_SIZE};
use pcache_format::dm::{DM_GC_PERCENT_DEFAULT, DM_SEG_NUM_MAX, DmCacheInfo, DmSegmentInfo, DmSuperblock};
use pcache_format::pfn;
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
    nbd_client(&mut out);
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

    // dm-pcache: its superblock areas with a device that fits (byte 10 of
    // the parameters says dm-pcache; the kernel wants 512 MiB at least).
    let params = |seg_num: u32, size: u64, explicit: bool| {
        let mut p = vec![explicit as u8 | (seg_num as u8 & !1), (seg_num >> 8) as u8];
        p.extend_from_slice(&size.to_le_bytes());
        p.push(1);
        p.extend_from_slice(&((seg_num >> 16) as u16).to_le_bytes());
        p
    };
    for seg_num in [1u32, 31, 62, 63, 65_536, DM_SEG_NUM_MAX] {
        let area = DmSuperblock::encode_area(seg_num);
        out.put("superblock", &format!("dm-area-{seg_num}"), &area);
        let size = (0x5000 + u64::from(seg_num) * SEG_SIZE).max(CACHE_DEV_SIZE_MIN);
        let mut with = area.to_vec();
        with.extend(params(seg_num, size, false));
        out.put("superblock", &format!("dm-area-{seg_num}-fits"), &with);
        with.truncate(4096);
        with.extend(params(seg_num, size - 1, false));
        out.put("superblock", &format!("dm-area-{seg_num}-short"), &with);
    }
    // Explicit layouts past each dialect's bound, on zeros.
    let mut rfc_over = vec![0u8; 4096];
    rfc_over.extend(params(65_536, u64::MAX, true));
    rfc_over[4096 + 10] = 0;
    out.put("superblock", "rfc-65536", &rfc_over);
    let mut dm_over = vec![0u8; 4096];
    dm_over.extend(params(DM_SEG_NUM_MAX + 1, u64::MAX, true));
    out.put("superblock", "dm-over-max", &dm_over);
    // A damaged dm-pcache superblock (guessed, not detected), a big-endian
    // one and one with its padding set, the last two with valid CRCs.
    let mut damaged = DmSuperblock::encode_area(62);
    damaged[16] ^= 1;
    out.put("superblock", "dm-damaged", &damaged);
    let mut be = DmSuperblock::encode_area(62);
    be[4] = 1;
    Dialect::DmPcache.seal(&mut be, DmSuperblock::SIZE);
    out.put("superblock", "dm-bigendian", &be);
    let mut padded = DmSuperblock::encode_area(62);
    padded[21] = 0xaa;
    Dialect::DmPcache.seal(&mut padded, DmSuperblock::SIZE);
    out.put("superblock", "dm-padding", &padded);
    // NVDIMM info blocks (fsdax, devdax, a dataoff not 4 KiB aligned) in a
    // 1 GiB namespace.
    for (name, devdax, dataoff) in [("pfn", false, 18u64 << 20), ("dax", true, 2 << 20), ("pfn-odd", false, 8193)] {
        let mut block = pfn::encode(devdax, dataoff).to_vec();
        block.extend(params(62, 1 << 30, true));
        out.put("superblock", name, &block);
    }
}

/// Two copies of `record` sealed in dialect `d`, with sequence numbers
/// `seqs` (None: a bad CRC).
fn pair<R: MetaRecord>(d: Dialect, record: &R, seqs: [Option<u8>; 2]) -> Vec<u8> {
    let n = R::COPY_SIZE;
    let mut buf = vec![0u8; 2 * n];
    for (i, seq) in seqs.iter().enumerate() {
        let copy = &mut buf[i * n..(i + 1) * n];
        encode_copy(d, record, seq.unwrap_or(0x5a), copy).expect("a whole copy");
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
        small("gen", pair(Dialect::RfcV1, &CacheSegGen::new(42), *seqs));
        small("pos", pair(Dialect::RfcV1, &CachePos::new(1, 4096), *seqs));
        // Selector 1: stride 4096; byte 1 picks the record type.
        let mut big = |name: &str, kind: u8, bytes: Vec<u8>| {
            let mut seed = vec![1u8, kind, 0];
            seed.extend_from_slice(&bytes);
            out.put("copy_selection", &format!("{name}-{i}"), &seed);
        };
        big("seginfo", 0, pair(Dialect::RfcV1, &SegmentInfo::data(3, Some(4)), *seqs));
        big("meta", 1, pair(Dialect::RfcV1, &MetaSegmentInfo::default(), *seqs));
        big("backing", 2, pair(Dialect::RfcV1, &backing, *seqs));
        // The same in dm-pcache (selector bit 2): tails and generations at
        // stride 16; segment info (byte 1 even) and cache info (odd) at 4096.
        let mut dm = |name: &str, sel: u8, kind: u8, bytes: Vec<u8>| {
            let mut seed = vec![sel, kind, 0];
            seed.extend_from_slice(&bytes);
            out.put("copy_selection", &format!("dm-{name}-{i}"), &seed);
        };
        let d = Dialect::DmPcache;
        dm("gen", 4, 0, pair(d, &CacheSegGen::new(42), *seqs));
        dm("pos", 4, 0, pair(d, &CachePos::new(1, 4096), *seqs));
        dm("seginfo", 5, 0, pair(d, &DmSegmentInfo::data(Some(4)), *seqs));
        dm("cacheinfo", 5, 1, pair(d, &DmCacheInfo::new(62, DM_GC_PERCENT_DEFAULT, i % 2 == 0), *seqs));
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
    // dm-pcache at odd strides, each CRC covering the first 24 bytes
    // (selector bits 3.. = 3).
    for stride in [24usize, 100, 255] {
        let mut seed = vec![2 | 4 | 3 << 3, stride as u8, 0];
        for seq in [9u8, 10] {
            let mut copy = vec![0u8; stride];
            copy[4] = seq;
            copy[8..].iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
            Dialect::DmPcache.seal(&mut copy, 24);
            seed.extend_from_slice(&copy);
        }
        out.put("copy_selection", &format!("dm-stride-{stride}"), &seed);
    }
}

fn kset(out: &mut Out) {
    for d in Dialect::ALL {
        kset_in(out, d);
    }
    out.put("kset", "terminator", &TERMINATOR);
}

/// Ksets sealed in dialect `d`. The first byte, the CRC's low byte, also
/// picks the dialect of the round trips.
fn kset_in(out: &mut Out, d: Dialect) {
    let kset = |name: &str| match d {
        Dialect::RfcV1 => name.to_string(),
        Dialect::DmPcache => format!("dm-{name}"),
    };
    let mut put = |name: &str, bytes: &[u8]| out.put("kset", &kset(name), bytes);
    let key = Key::new(4096, 4096, KeyFlags::empty(), 1, 0, 0);
    let mut buf = vec![0u8; kset_size(KSET_KEYS_MAX) + 24];
    let size = encode_kset(d, &[key], &mut buf).unwrap();
    put("one-key", &buf[..size]);
    // Followed by a terminator, as in a log.
    buf[size..size + 24].copy_from_slice(&TERMINATOR);
    put("one-key-terminated", &buf[..size + 24]);
    put("last-5", &encode_last(d, 5));
    let mixed = [
        Key::new(0, 512, KeyFlags::CLEAN, 0, 0, 3),
        Key::new(4 * 1024 * 1024 - 4096, 4096, KeyFlags::empty(), 7, CACHE_SEG_DATA_SIZE - 4096, 1),
        Key::new(1 << 40, 65536, KeyFlags::empty(), 2, 12288, 9),
    ];
    let size = encode_kset(d, &mixed, &mut buf).unwrap();
    put("mixed", &buf[..size]);
    let full: Vec<Key> = (0..KSET_KEYS_MAX as u64)
        .map(|i| {
            let flags = if i % 3 == 0 { KeyFlags::CLEAN } else { KeyFlags::empty() };
            Key::new(i * 8192, 512 * (1 + i as u32 % 16), flags, (i % 8) as u32, (i * 8192) as u32, i / 64)
        })
        .collect();
    let size = encode_kset(d, &full, &mut buf).unwrap();
    put("full-128", &buf[..size]);
    // A kset with a bad key (length 0) and a valid CRC.
    let bad = [key, Key::new(0, 0, KeyFlags::empty(), 0, 0, 0)];
    let size = encode_kset(d, &bad, &mut buf).unwrap();
    put("bad-key", &buf[..size]);
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
    // caches with writes: for each dialect, six without patches and six
    // with (about half of each read through a window too).
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut kept = [[0usize; 2]; 2];
    let mut tries = 0;
    while kept.iter().flatten().any(|&n| n < 6) && tries < 200_000 {
        tries += 1;
        let len = [512usize, 1024, 2048, 4096][tries % 4];
        let bytes = rng.bytes(len);
        let Ok(recipe) = Recipe::arbitrary_take_rest(Unstructured::new(&bytes)) else { continue };
        let built = build(&recipe);
        let logged: u64 = built.caches.iter().map(|c| c.logged).sum();
        if built.caches.is_empty() || logged < 3 {
            continue;
        }
        let (dm, patched) = (recipe.dm_pcache.is_some(), !recipe.patches.is_empty());
        let n = &mut kept[usize::from(dm)][usize::from(patched)];
        if *n < 6 {
            let name = format!("{}{}-{n}", if dm { "dm-" } else { "" }, if patched { "patched" } else { "clean" });
            out.put("image", &name, &bytes);
            *n += 1;
        }
    }
    out.put("image", "empty", &[]);
}

/// Client byte streams for the `nbd` target (after its first byte, which
/// says whether the server requires TLS): handshakes that reach
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
        out.put("nbd", name, &[&[0u8][..], &v].concat());
    }
    // Extended headers and base:allocation: 64-bit requests, block status.
    let mut meta = 1u32.to_be_bytes().to_vec();
    meta.extend_from_slice(b"a");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
    meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
    for extended in [false, true] {
        let mut v = 3u32.to_be_bytes().to_vec();
        v.extend(opt(if extended { OPT_EXTENDED_HEADERS } else { OPT_STRUCTURED_REPLY }, &[]));
        v.extend(opt(OPT_LIST_META_CONTEXT, &meta));
        v.extend(opt(OPT_SET_META_CONTEXT, &meta));
        v.extend(opt(OPT_GO, &go));
        if extended {
            let ext = encode_extended_request;
            v.extend(ext(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 1, 512, 8));
            v.extend_from_slice(b"pcache!!");
            v.extend(ext(CMD_BLOCK_STATUS, 0, 2, 0, 1 << 16));
            v.extend(ext(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 3, 4096, 4096));
            v.extend(ext(CMD_TRIM, 0, 4, 0, 1 << 33));
            v.extend(ext(CMD_READ, 0, 5, 0, 4096));
        } else {
            v.extend(req(CMD_BLOCK_STATUS, 0, 2, 0, 1 << 16));
            v.extend(req(CMD_READ, 0, 5, 0, 4096));
        }
        out.put("nbd", if extended { "extended-block-status" } else { "block-status" }, &[&[0u8][..], &v].concat());
    }
    let mut v = 0u32.to_be_bytes().to_vec();
    v.extend(opt(OPT_EXPORT_NAME, b"b"));
    v.extend(req(CMD_READ, 0, 1, 0, 512));
    v.extend(req(CMD_WRITE, 0, 2, 0, 4));
    v.extend_from_slice(b"abcd");
    out.put("nbd", "export-name", &[&[0u8][..], &v].concat());
    // A server that requires TLS: refusals, then STARTTLS.
    let mut v = vec![1u8];
    v.extend(3u32.to_be_bytes());
    v.extend(opt(OPT_LIST, &[]));
    v.extend(opt(OPT_GO, &go));
    v.extend(opt(OPT_STARTTLS, b"x"));
    v.extend(opt(OPT_STARTTLS, &[]));
    out.put("nbd", "tls-required", &v);
}

/// Server byte streams for the `nbd_client` target: a handshake (with and
/// without structured replies, and the old `EXPORT_NAME` way), then replies
/// to the four requests `replay_server` has in flight.
fn nbd_client(out: &mut Out) {
    use pcache_cli::nbd::*;
    use zerocopy::IntoBytes;
    let hello = encode_hello();
    let rep = encode_option_reply;
    let export = InfoExport { info: INFO_EXPORT.into(), size: (1u64 << 20).into(), flags: TRANSMISSION_FLAGS.into() };
    let blocks = InfoBlockSize {
        info: INFO_BLOCK_SIZE.into(),
        minimum: 512.into(),
        preferred: 4096.into(),
        maximum: (1u32 << 20).into(),
    };
    let (chunk, simple) = (encode_chunk, encode_simple_reply);
    for structured in [true, false] {
        let mut v = hello.clone();
        v.extend(rep(OPT_STRUCTURED_REPLY, if structured { REP_ACK } else { REP_ERR_UNSUP }, &[]));
        v.extend(rep(OPT_GO, REP_INFO, export.as_bytes()));
        v.extend(rep(OPT_GO, REP_INFO, blocks.as_bytes()));
        v.extend(rep(OPT_GO, REP_ACK, &[]));
        if structured {
            v.extend(chunk(0, REPLY_TYPE_OFFSET_DATA, 1, &[&0u64.to_be_bytes()[..], &[7; 256]].concat()));
            v.extend(chunk(REPLY_FLAG_DONE, 2, 1, &[&256u64.to_be_bytes()[..], &256u32.to_be_bytes()].concat()));
            let mut err = 5u32.to_be_bytes().to_vec();
            err.extend_from_slice(&4u16.to_be_bytes());
            err.extend_from_slice(b"oops");
            v.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 2, &err));
            v.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 3, &[]));
        } else {
            v.extend(simple(0, 1));
            v.extend([9u8; 512]);
            v.extend(simple(5, 2));
            v.extend(simple(0, 3));
        }
        v.extend(simple(0, 4));
        if structured {
            let mut bs = 1u32.to_be_bytes().to_vec();
            for (len, flags) in [(4096u32, 3u32), (4096, 0)] {
                bs.extend_from_slice(&len.to_be_bytes());
                bs.extend_from_slice(&flags.to_be_bytes());
            }
            v.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 5, &bs));
        }
        out.put("nbd_client", if structured { "structured" } else { "simple" }, &v);
    }
    let mut v = hello;
    v.extend(rep(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]));
    v.extend(rep(OPT_GO, REP_ERR_UNSUP, &[]));
    v.extend(ExportNameReply { size: 4096.into(), flags: 1.into() }.as_bytes());
    v.extend(simple(0, 3));
    out.put("nbd_client", "export-name", &v);
}

/// Byte strings for the `engine` target: `arbitrary` turns them into op
/// sequences (the first byte of each op picks its kind).
fn engine(out: &mut Out) {
    let mut r = Rng(0x00e1_191e);
    for i in 0..8 {
        out.put("engine", &format!("random-{i}"), &r.bytes(64 + 48 * i));
    }
}
