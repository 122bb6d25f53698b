//! End-to-end tests of the `pcache` command line: format, inspect, check,
//! run as a user runs them, on ordinary files standing in for pmem.

mod common;

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use common::*;

use pcache_format::SB_OFF;
use pcache_format::sparse::ImageBuilder;
use serde_json::Value;

fn inspect_json(dev: &Path) -> (i32, Value) {
    let o = pcache(&["inspect", "--json", s(dev)]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)));
    (code(&o), v)
}

#[test]
fn format_a_file_then_inspect() {
    let d = Dir::new();
    let dev = d.path("pmem.img");
    let o = pcache(&["format", s(&dev), "--size", "1G"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("63 of 16 MiB"), "{}", stdout(&o));
    assert!(stdout(&o).contains("emulated pmem: msync"), "{}", stdout(&o));
    let meta = std::fs::metadata(&dev).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    {
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 >= 1 << 30, "the file is allocated in full");
    }

    let (rc, v) = inspect_json(&dev);
    assert_eq!(rc, 0);
    assert_eq!(v["superblock"]["magic"], "0x65b05efa96c596ef");
    assert_eq!(v["superblock"]["version"], 1);
    assert_eq!(v["superblock"]["seg_num"], 63);
    assert_eq!(v["superblock"]["crc_ok"], true);
    assert_eq!(v["backings"], serde_json::json!([]));
    // Both copies written: copy 1 (seq 2) is the current one.
    assert_eq!(v["meta"]["current"], 1);
    assert_eq!(v["meta"]["copies"][0]["never_written"], false);

    let text = pcache(&["inspect", s(&dev)]);
    assert_eq!(code(&text), 0);
    assert!(stdout(&text).contains("superblock  ok"), "{}", stdout(&text));
    assert!(stdout(&text).contains("no problems found"));

    let check = pcache(&["check", s(&dev)]);
    assert_eq!(code(&check), 0, "{}", stdout(&check));
}

#[test]
fn flipped_superblock_byte_is_reported() {
    let d = Dir::new();
    let dev = d.path("pmem.img");
    assert_eq!(code(&pcache(&["format", s(&dev), "--size", "1G"])), 0);
    flip_byte(&dev, SB_OFF + 3000);
    let (rc, v) = inspect_json(&dev);
    assert_ne!(rc, 0);
    assert_eq!(v["superblock"]["crc_ok"], false);
    assert!(v["superblock"]["error"].as_str().unwrap().contains("CRC mismatch"));
    // inspect still shows what it can.
    assert_eq!(v["superblock"]["seg_num"], 63);
    assert!(v["meta"].is_object());
    let text = pcache(&["inspect", s(&dev)]);
    assert!(stdout(&text).contains("CRC mismatch"), "{}", stdout(&text));
    let check = pcache(&["check", s(&dev)]);
    assert_eq!(code(&check), 1, "{}", stdout(&check));
    assert!(stdout(&check).contains("problem: superblock: CRC mismatch"), "{}", stdout(&check));
}

#[test]
fn a_device_over_65535_segments_is_capped_and_says_so() {
    let d = Dir::new();
    let dev = d.path("big.img");
    // 2 TiB, sparse (more than this machine's disk holds): room for
    // 131 071 segments, of which the 16-bit seg_num can count 65 535.
    let o = pcache(&["format", s(&dev), "--size", "2T", "--sparse"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("segments  65535 of 16 MiB"), "{out}");
    assert!(out.contains("could hold 131071 segments, but the format counts at most 65535"), "{out}");
    assert!(out.contains("the last 1.00 TiB are left unused"), "{out}");
    let (rc, v) = inspect_json(&dev);
    assert_eq!(rc, 0);
    assert_eq!(v["superblock"]["seg_num"], 65535);
    assert_eq!(v["superblock"]["crc_ok"], true);
    assert_eq!(code(&pcache(&["check", s(&dev)])), 0);
}

#[test]
fn refusals_are_clear_and_touch_nothing() {
    let d = Dir::new();
    // Too small.
    let small = d.path("small.img");
    let o = pcache(&["format", s(&small), "--size", "511M"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("at least 536870912 (512 MiB)"), "{}", stderr(&o));
    assert!(stderr(&o).contains("small.img"), "{}", stderr(&o));
    assert!(!small.exists(), "a refused format creates nothing");
    // An existing file that is too small is refused and left as it was.
    std::fs::write(&small, b"keep me").unwrap();
    std::fs::File::options().write(true).open(&small).unwrap().set_len(511 << 20).unwrap();
    let o = pcache(&["format", s(&small)]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("at least 536870912 (512 MiB)"), "{}", stderr(&o));
    assert_eq!(&std::fs::read(&small).unwrap()[..7], b"keep me");
    let (rc, v) = inspect_json(&small);
    assert_eq!(rc, 1);
    assert_eq!(v["superblock"]["magic"], "0x0000000000000000");

    // Already formatted: refused without --force, done with it.
    let dev = d.path("pmem.img");
    assert_eq!(code(&pcache(&["format", s(&dev), "--size", "1G"])), 0);
    let o = pcache(&["format", s(&dev)]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("already holds a pcache superblock") && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    let o = pcache(&["format", "--force", s(&dev)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("previous pcache format was overwritten"));

    // --size that disagrees with an existing file.
    let o = pcache(&["format", s(&dev), "--size", "2G", "--force"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("exists with 1.00 GiB"), "{}", stderr(&o));
    assert_eq!(std::fs::metadata(&dev).unwrap().len(), 1 << 30);

    // Missing file without --size; a directory; a bad size.
    let o = pcache(&["format", s(&d.path("nope"))]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("does not exist; give --size"), "{}", stderr(&o));
    let o = pcache(&["format", s(d.dir.path())]);
    assert_eq!(code(&o), 1);
    let o = pcache(&["format", s(&d.path("x")), "--size", "12Q"]);
    assert_eq!(code(&o), 64, "a usage error is not an unreadable device");
    assert!(stderr(&o).contains("unknown size unit"), "{}", stderr(&o));
    let o = pcache(&["inspect", s(&d.path("nope"))]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("No such file"), "{}", stderr(&o));
    let o = pcache(&["check", s(&d.path("nope"))]);
    assert_eq!(code(&o), 2, "check: could not read");
    assert!(stderr(&o).contains("No such file") && stderr(&o).contains("nope"), "{}", stderr(&o));
    assert_eq!(code(&pcache(&["check"])), 64);
    assert_eq!(code(&pcache(&["--help"])), 0);
}

#[test]
fn a_device_held_by_another_process_is_refused() {
    let d = Dir::new();
    let dev = d.path("pmem.img");
    assert_eq!(code(&pcache(&["format", s(&dev), "--size", "1G"])), 0);
    let head = |path: &Path| {
        let mut b = vec![0u8; 3 * 4096];
        std::fs::File::open(path).unwrap().read_exact_at(&mut b, 0).unwrap();
        b
    };
    let before = head(&dev);
    // This test process holds the device as `pcache attach` would.
    let holder = std::fs::OpenOptions::new().read(true).write(true).open(&dev).unwrap();
    // SAFETY: flock on a file this test owns.
    assert_eq!(unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    for args in [vec!["format", "--force", s(&dev)], vec!["inspect", s(&dev)], vec!["check", s(&dev)]] {
        let o = pcache(&args);
        assert_ne!(code(&o), 0, "{args:?}");
        let msg = stderr(&o);
        assert!(msg.contains("is in use by another process"), "{args:?}: {msg}");
        assert!(msg.contains(&format!("pid {}", std::process::id())), "{args:?}: {msg}");
    }
    assert_eq!(head(&dev), before);
    drop(holder);
    assert_eq!(code(&pcache(&["check", s(&dev)])), 0);
}

#[test]
fn flush_paths_are_selected_by_environment() {
    let cpu = pcache_pmem::flush::cpu_features();
    if std::env::var("CI").is_ok_and(|v| v == "true") && cfg!(target_arch = "x86_64") {
        assert!(cpu.clflush && cpu.clflushopt && cpu.clwb, "CI machine lacks a flush instruction: {cpu:?}");
    }
    let d = Dir::new();
    let dev = d.path("pmem.img");
    let mut cases = vec![(vec![], "flush: none", "emulated pmem: msync")];
    let forced = ("PCACHE_FORCE_PMEM", "1");
    if cpu.clwb {
        cases.push((vec![forced], "flush: clwb", "forced pmem"));
    }
    if cpu.clflushopt {
        cases.push((vec![forced, ("PCACHE_NO_CLWB", "1")], "flush: clflushopt", "forced pmem"));
    }
    if cpu.clflush {
        cases.push((
            vec![forced, ("PCACHE_NO_CLWB", "1"), ("PCACHE_NO_CLFLUSHOPT", "1"), ("PCACHE_NO_MOVNT", "1")],
            "flush: clflush",
            "forced pmem",
        ));
    }
    cases.push((vec![forced, ("PCACHE_NO_FLUSH", "1")], "flush: none", "forced pmem"));
    for (i, (env, flush, mode)) in cases.into_iter().enumerate() {
        let size = if i == 0 { vec!["--size", "1G"] } else { vec!["--force"] };
        let mut args = vec!["format", s(&dev)];
        args.extend(size);
        let o = pcache_env(&args, &env);
        assert_eq!(code(&o), 0, "{env:?}: {}", stderr(&o));
        assert!(stdout(&o).contains(flush), "{env:?}: {}", stdout(&o));
        assert!(stdout(&o).contains(mode), "{env:?}: {}", stdout(&o));
        let check = pcache(&["check", s(&dev)]);
        assert_eq!(code(&check), 0, "{env:?}: {}", stdout(&check));
    }
}

#[test]
fn caches_are_inspected_and_checked() {
    let d = Dir::new();
    let dev = d.path("pmem.img");
    let mut b = ImageBuilder::format(1 << 30).unwrap();
    let mut c = b.add_cache(0, b"/srv/disk.img", 1 << 30, 6, true).unwrap();
    c.write(&mut b, 0, &[0xaa; 4096], false).unwrap();
    c.write(&mut b, 65536, &[0xbb; 8192], true).unwrap();
    c.close(&mut b).unwrap();
    let data_area = b.layout().data_offset(c.chain()[1]).unwrap();
    write_image(b.image(), &dev);

    let (rc, v) = inspect_json(&dev);
    assert_eq!(rc, 0, "{v}");
    let bk = &v["backings"][0];
    assert_eq!(bk["id"], 0);
    assert_eq!(bk["state"], "in_use");
    assert_eq!(bk["path"], "/srv/disk.img");
    assert_eq!(bk["cache"]["seg_id"], 1);
    assert_eq!(bk["cache"]["n_segs"], 6);
    assert_eq!(bk["cache"]["gc_percent"], 70);
    assert_eq!(bk["cache"]["data_crc"], true);
    assert_eq!(bk["key_tail"], serde_json::json!({"seg": 0, "off": 0}));
    assert_eq!(bk["dirty_tail"], serde_json::json!({"seg": 0, "off": 0}));
    assert_eq!(bk["chain"], serde_json::json!([1, 2, 3, 4, 5, 6]));
    let text = stdout(&pcache(&["inspect", s(&dev)]));
    assert!(text.contains("backing 0  /srv/disk.img  in use"), "{text}");
    assert!(text.contains("chain       1-6"), "{text}");
    assert!(text.contains("2 keys: 1 dirty, 0 written back, 1 clean"), "{text}");

    let o = pcache(&["check", s(&dev)]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    assert!(stdout(&o).contains("2 key(s) checked: 0 problem(s)"), "{}", stdout(&o));

    // Damage cached data: check finds it, inspect (which does not read data) does not fail.
    flip_byte(&dev, data_area + 4096 + 7);
    let o = pcache(&["check", s(&dev)]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(stdout(&o).contains("key 1: data CRC mismatch"), "{}", stdout(&o));
    assert_eq!(code(&pcache(&["check", "--no-data", s(&dev)])), 0);
    assert_eq!(code(&pcache(&["inspect", s(&dev)])), 0);
}

#[test]
fn engine_caches_show_live_keys() {
    use pcache_pmem::{Cache, CacheDev, CacheOptions, DaxMapping, DaxOptions, FileBacking};
    let d = Dir::new();
    let dev = d.path("pmem.img");
    let disk = d.path("disk.img");
    assert_eq!(code(&pcache(&["format", s(&dev), "--size", "1G"])), 0);
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    {
        let map = DaxMapping::open(&dev, &DaxOptions::default()).unwrap();
        let cdev = CacheDev::open(map).unwrap();
        let opts = CacheOptions { cache_size: Some(256 << 20), data_crc: true, ..Default::default() };
        let (cache, _) = Cache::start(cdev, FileBacking::open(&disk).unwrap(), &opts).unwrap();
        cache.write(0, &[1u8; 8192], false).unwrap();
        cache.write(0, &[2u8; 8192], false).unwrap(); // overwrites the first key
        cache.write(1 << 20, &[3u8; 4096], false).unwrap();
        let mut buf = [0u8; 4096];
        cache.read(2 << 20, &mut buf).unwrap(); // a miss, cached clean
        cache.stop().unwrap();
    }
    let (rc, v) = inspect_json(&dev);
    assert_eq!(rc, 0, "{v}");
    let b = &v["backings"][0];
    assert_eq!(b["path"], s(&disk));
    assert_eq!(b["dev_size"], 64 << 20);
    assert_eq!(b["cache"]["n_segs"], 16);
    assert_eq!(b["cache"]["data_crc"], true);
    assert_eq!(b["log"]["keys"], 4, "{b}");
    assert_eq!(b["keys"]["dirty"], 2, "{b}");
    assert_eq!(b["keys"]["clean"], 1, "{b}");
    assert_eq!(b["keys"]["dirty_bytes"], 8192 + 4096);
    let text = stdout(&pcache(&["inspect", s(&dev)]));
    assert!(text.contains("live keys   2 dirty (12.00 KiB), 1 clean (4.00 KiB)"), "{text}");
    let o = pcache(&["check", s(&dev)]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
}

#[test]
fn detach_writes_everything_back_and_frees_the_cache() {
    use pcache_pmem::{Cache, CacheDev, CacheOptions, DaxMapping, DaxOptions, FileBacking};
    let d = Dir::new();
    let dev = d.path("pmem.img");
    let disk = d.path("disk.img");
    assert_eq!(code(&pcache(&["format", s(&dev), "--size", "1G"])), 0);
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    let mut model = vec![0u8; 64 << 20];
    {
        let map = DaxMapping::open(&dev, &DaxOptions::default()).unwrap();
        let opts = CacheOptions { cache_size: Some(256 << 20), background: false, ..Default::default() };
        let (cache, _) = Cache::start(CacheDev::open(map).unwrap(), FileBacking::open(&disk).unwrap(), &opts).unwrap();
        for i in 0..300u64 {
            let off = (i * 7919 % 16000) * 4096;
            let data = vec![(i % 250) as u8 + 1; 4096];
            cache.write(off, &data, false).unwrap();
            model[off as usize..off as usize + 4096].copy_from_slice(&data);
        }
        cache.stop().unwrap(); // graceful: the dirty data stays in the cache
    }
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0), "nothing written back yet");
    let (_, v) = inspect_json(&dev);
    assert_eq!(v["backings"][0]["keys"]["dirty"], 300);

    let o = pcache(&["detach", s(&dev), "--backing", s(&disk)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("1.17 MiB written back"), "{}", stdout(&o));
    assert!(stdout(&o).contains("16 segments (256.00 MiB) released"), "{}", stdout(&o));
    assert!(std::fs::read(&disk).unwrap() == model, "the backing file alone holds every write");
    let (rc, v) = inspect_json(&dev);
    assert_eq!(rc, 0);
    assert_eq!(v["backings"], serde_json::json!([]));
    assert_eq!(code(&pcache(&["check", s(&dev)])), 0);

    let o = pcache(&["detach", s(&dev), "--backing", s(&disk)]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("holds no cache for") && stderr(&o).contains("it caches: none"), "{}", stderr(&o));
    let o = pcache(&["detach", s(&dev), "--backing", s(&d.path("missing.img"))]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("must be there"), "{}", stderr(&o));
}
