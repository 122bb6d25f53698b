//! `pcache detach` of a cache whose dirty data is partly damaged: it
//! refuses, naming the bad extent; `--salvage` writes back everything else
//! and lists what it could not (exit status 3).

mod common;

use std::path::Path;

use common::*;

use pcache_format::Key;
use pcache_format::media::{LogPos, LogStep, LogWalk};
use pcache_pmem::{AsMedia, DaxMapping, DaxOptions};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 40;
const BAD: u64 = 17;

fn pattern(i: u64) -> u8 {
    0x10 + i as u8
}

/// Device offset of the cached data of the key for backing offset `off`,
/// found by walking the key log of the only cache on `dev`.
fn data_of(dev: &Path, off: u64) -> u64 {
    let map = DaxMapping::open(dev, &DaxOptions::default()).unwrap();
    let media = AsMedia(&map);
    let r = pcache_format::image::scan(&media, Default::default());
    let layout = r.layout.expect("a layout");
    let chain: Vec<u32> = r.backings[0].chain.iter().map(|s| s.dev_seg).collect();
    let mut visited = vec![false; chain.len()];
    let mut walk = LogWalk::new(&media, &layout, &chain, &mut visited, LogPos::default());
    let mut found: Option<Key> = None;
    while let Some(step) = walk.step() {
        if let LogStep::Keys { keys, .. } = step
            && let Some(k) = keys.iter().rev().find(|k| k.off.get() == off)
        {
            found = Some(*k);
        }
    }
    let k = found.expect("the block is in the log");
    layout.data_range(chain[k.cache_seg_id.get() as usize], k.cache_seg_off.get(), BLOCK as u32).unwrap()
}

#[test]
fn detach_refuses_a_bad_extent_and_salvage_writes_back_the_rest() {
    let d = Dir::new();
    let dev = d.path("pmem.img");
    let disk = d.path("disk.img");
    let socket = d.path("nbd.sock");
    assert_eq!(code(&pcache(&["format", s(&dev), "--size", "1G"])), 0);
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();

    // 40 blocks written and flushed through attach, kept dirty by a
    // writeback rate of 1 byte a second.
    let a = Attach::start(&dev, &[&disk], &socket, &["--data-crc", "--writeback-rate", "1"]);
    let mut qemu = std::process::Command::new(tool("qemu-io", "qemu-utils"));
    qemu.args(["-f", "raw"]);
    for i in 0..BLOCKS {
        qemu.args(["-c", &format!("write -P {:#x} {} 4k", pattern(i), i * BLOCK)]);
    }
    qemu.args(["-c", "flush"]).arg(a.uri("disk.img"));
    ok(&mut qemu);
    let (rc, out) = a.stop();
    assert_eq!(rc, 0, "{out:?}");

    flip_byte(&dev, data_of(&dev, BAD * BLOCK) + 1000);

    // Attached again without a rate limit, writeback writes back what lies
    // before the bad block and stops there; attach says so at exit, with a
    // status that is not 0.
    let mut a = Attach::start(&dev, &[&disk], &socket, &[]);
    let seen = a.wait_for_error();
    assert!(seen.contains("data CRC mismatch"), "{seen}");
    let (rc, out) = a.stop();
    assert_eq!(rc, 1, "attach exits 0 with dirty data stuck: {out:?}");

    let o = pcache(&["detach", s(&dev), "--backing", s(&disk)]);
    let err = stderr(&o);
    assert_eq!(code(&o), 1, "{err}");
    for part in [
        &format!("backing offset {} length 4096", BAD * BLOCK),
        "data CRC mismatch",
        "the cache is intact",
        "--salvage",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    let o = pcache(&["inspect", "--json", s(&dev)]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["backings"].as_array().map(Vec::len), Some(1), "the cache is still there");

    let o = pcache(&["detach", s(&dev), "--backing", s(&disk), "--salvage"]);
    let out = stdout(&o);
    assert_eq!(code(&o), 3, "{out}\n{}", stderr(&o));
    let lost: Vec<&str> = out.lines().filter(|l| l.starts_with("lost: ")).collect();
    assert_eq!(lost.len(), 1, "{out}");
    assert!(lost[0].starts_with(&format!("lost: offset {} length 4096 (data CRC mismatch", BAD * BLOCK)), "{out}");
    assert!(out.contains("with data lost") && out.contains("1 extent(s) (4.00 KiB) lost"), "{out}");
    assert!(!out.contains("damaged: "), "{out}");

    let contents = std::fs::read(&disk).unwrap();
    for i in 0..BLOCKS {
        let want = if i == BAD { 0 } else { pattern(i) };
        let block = &contents[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize];
        assert!(block.iter().all(|&b| b == want), "block {i}: want {want:#x}, found {:#x}", block[0]);
    }
    let o = pcache(&["inspect", "--json", s(&dev)]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["backings"], serde_json::json!([]), "the entry is free");
    assert_eq!(code(&pcache(&["check", s(&dev)])), 0);
}
