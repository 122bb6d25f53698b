//! A cache must never serve or write back the wrong data, whatever name,
//! mistake or damaged page reaches it: one backing device under any name is
//! one cache; the pmem device is never a backing; a backing in use is
//! locked; one damaged page of the backing table loses nothing; a failed
//! listen creates nothing; a sparse pmem file is refused. Each test drives
//! the `pcache` binary and real NBD clients, as a user would.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use pcache_format::SEGMENTS_OFF;

impl Rig {
    /// `pcache attach` of `backings` with writeback held back, so that what
    /// the tests write stays dirty in pmem.
    fn attach(&self, backings: &[&Path], extra: &[&str]) -> Attach {
        let mut args = vec!["--writeback-rate", "4096"];
        args.extend_from_slice(extra);
        Attach::start(&self.dev, backings, &self.socket(), &args)
    }

    fn inspect(&self) -> serde_json::Value {
        let o = pcache(&["inspect", "--json", s(&self.dev)]);
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&o), stderr(&o)))
    }

    fn check(&self) -> (i32, String) {
        let o = pcache(&["check", s(&self.dev)]);
        (code(&o), stdout(&o) + &stderr(&o))
    }

    /// The device offset of backing entry `id`'s copy 0 (copy 1 follows at +4 KiB).
    fn entry(id: u64) -> u64 {
        SEGMENTS_OFF + 8192 + id * 8192
    }

    fn patch(&self, off: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&self.dev).unwrap();
        f.write_all_at(bytes, off).unwrap();
        f.sync_all().unwrap();
    }
}

fn reads_ok(o: &std::process::Output) -> bool {
    o.status.success() && !stdout(o).contains("failed") && !stdout(o).contains("Pattern verification")
}

#[test]
fn one_backing_under_any_name_is_one_cache() {
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 64 << 20);
    std::fs::create_dir(rig.d.path("sub")).unwrap();
    std::os::unix::fs::symlink(&disk, rig.d.path("link.img")).unwrap();
    std::fs::hard_link(&disk, rig.d.path("hard.img")).unwrap();
    let a = rig.attach(&[&disk], &[]);
    assert!(a.stdout.iter().any(|l| l.contains("new cache")), "{:?}", a.stdout);
    assert!(qemu_io(&a.uri("disk.img"), &["write -P 0xa1 0 64k", "flush"]).status.success());
    assert_eq!(a.stop().0, 0);
    // Every other spelling finds the same cache and its dirty data; a write
    // through one name is what the next name reads.
    let spellings = [
        (rig.d.path("sub/../disk.img"), "disk.img"),
        (rig.d.path("link.img"), "disk.img"),
        (rig.d.path("hard.img"), "hard.img"),
    ];
    for (i, (name, export)) in spellings.iter().enumerate() {
        let a = rig.attach(&[name], &[]);
        assert!(a.stdout.iter().any(|l| l.contains("existing cache")), "{}: {:?}", name.display(), a.stdout);
        let want = format!("read -P 0x{:x} 0 64k", 0xa1 + i);
        let o = qemu_io(&a.uri(export), &[&want]);
        assert!(reads_ok(&o), "{}: {}", name.display(), stdout(&o));
        let next = format!("write -P 0x{:x} 0 64k", 0xa2 + i);
        assert!(qemu_io(&a.uri(export), &[&next, "flush"]).status.success());
        assert_eq!(a.stop().0, 0);
    }
    let v = rig.inspect();
    assert_eq!(v["backings"].as_array().unwrap().len(), 1, "{v}");
    // The stored name is canonical.
    assert_eq!(v["backings"][0]["path"], std::fs::canonicalize(&disk).unwrap().to_str().unwrap());
    // Detach by another name writes the newest data back.
    let o = pcache(&["detach", s(&rig.dev), "--backing", s(&rig.d.path("link.img"))]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let data = std::fs::read(&disk).unwrap();
    assert!(data[..65536].iter().all(|&b| b == 0xa4), "{:x}", data[0]);
    // Giving one backing twice in one attach is refused.
    let o = pcache(&["attach", s(&rig.dev), "--backing", s(&disk), "--backing", s(&rig.d.path("link.img"))]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("are the same backing device"), "{}", stderr(&o));
}

#[test]
fn the_pmem_device_is_never_its_own_backing() {
    let rig = Rig::new();
    std::os::unix::fs::symlink(&rig.dev, rig.d.path("alias.img")).unwrap();
    for b in [rig.dev.clone(), rig.d.path("alias.img")] {
        let o = run_for(
            Command::new(env!("CARGO_BIN_EXE_pcache"))
                .args(["attach", s(&rig.dev), "--backing", s(&b), "--listen"])
                .arg(format!("unix:{}", rig.socket().display())),
            20,
        )
        .expect("attach of the pmem device as its own backing must be refused, not served");
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("is the pmem device"), "{}", stderr(&o));
    }
    assert_eq!(rig.check().0, 0);
    assert!(rig.inspect()["backings"].as_array().unwrap().is_empty());
}

#[test]
fn a_backing_in_use_is_locked() {
    let rig = Rig::new();
    let other = rig.d.path("other.img");
    assert_eq!(code(&pcache(&["format", s(&other), "--size", "1G"])), 0);
    let disk = rig.backing("disk.img", 64 << 20);
    let a = rig.attach(&[&disk], &[]);
    assert!(qemu_io(&a.uri("disk.img"), &["write -P 0x33 0 1m", "flush"]).status.success());
    // A second cache of the same backing, from another pmem device.
    let o = run_for(
        Command::new(env!("CARGO_BIN_EXE_pcache"))
            .args(["attach", s(&other), "--backing", s(&disk), "--listen"])
            .arg(format!("unix:{}", rig.d.path("other.sock").display())),
        20,
    )
    .expect("a second attach of a backing in use must be refused");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("in use by another process"), "{}", stderr(&o));
    // Formatting it, detaching it, renaming onto it: refused too.
    let o = pcache(&["format", "--force", s(&disk)]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("in use"), "{}", stderr(&o));
    let o = pcache(&["detach", s(&other), "--backing", s(&disk)]);
    assert_ne!(code(&o), 0);
    // Nothing was touched: the data is still served.
    let o = qemu_io(&a.uri("disk.img"), &["read -P 0x33 0 1m"]);
    assert!(reads_ok(&o), "{}", stdout(&o));
    assert_eq!(a.stop().0, 0);
    assert!(rig.check().0 == 0);
    let v: serde_json::Value = serde_json::from_slice(&pcache(&["inspect", "--json", s(&other)]).stdout).unwrap();
    assert!(v["backings"].as_array().unwrap().is_empty());
}

#[test]
fn a_failed_listen_creates_no_cache_and_caches_are_sized_for_their_backing() {
    let rig = Rig::new();
    let tiny = rig.backing("tiny.img", 1000);
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let o = pcache(&["attach", s(&rig.dev), "--backing", s(&tiny), "--listen", &format!("tcp:127.0.0.1:{port}")]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("cannot listen"), "{}", stderr(&o));
    assert!(rig.inspect()["backings"].as_array().unwrap().is_empty());
    drop(held);
    // A 1000-byte backing gets a small cache, not the whole device, and the
    // next backing still finds room.
    let a = rig.attach(&[&tiny], &[]);
    assert_eq!(a.stop().0, 0);
    let v = rig.inspect();
    let n = v["backings"][0]["cache"]["n_segs"].as_u64().unwrap();
    assert!(n <= 20, "a 1000-byte backing got {n} segments");
    let big = rig.backing("big.img", 256 << 20);
    let a = rig.attach(&[&big], &[]);
    assert_eq!(a.stop().0, 0);
    let v = rig.inspect();
    let big_segs = v["backings"][1]["cache"]["n_segs"].as_u64().unwrap();
    assert!((16..=40).contains(&big_segs), "a 256 MiB backing got {big_segs} segments");
    // An empty backing is refused, and so is a writeback rate of 0.
    let empty = rig.backing("empty.img", 0);
    let listen = format!("unix:{}", rig.socket().display());
    let o = pcache(&["attach", s(&rig.dev), "--backing", s(&empty), "--listen", &listen]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("nothing to cache"), "{}", stderr(&o));
    assert!(!rig.socket().exists(), "a failed attach leaves its socket behind");
    let o = pcache(&["attach", s(&rig.dev), "--backing", s(&tiny), "--writeback-rate", "0"]);
    assert_eq!(code(&o), 64);
    assert!(stderr(&o).contains("never write anything back"), "{}", stderr(&o));
    assert_eq!(rig.inspect()["backings"].as_array().unwrap().len(), 2);
}

/// The exact loss the RFC's rules allowed: an entry written once (copy 1
/// never written), then one page of garbage or zeros over copy 0. The
/// entry read as free, and the next attach built a new cache over the old
/// segments: every dirty block read back as zeros.
#[test]
fn one_damaged_page_of_the_backing_table_loses_nothing() {
    for damage in ["garbage", "zeros"] {
        let rig = Rig::new();
        let disk = rig.backing("disk.img", 64 << 20);
        let a = rig.attach(&[&disk], &["--data-crc"]);
        let mut cmds: Vec<String> = (0..40).map(|i| format!("write -P {} {} 4k", i + 1, i * 65536)).collect();
        cmds.push("flush".into());
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        assert!(qemu_io(&a.uri("disk.img"), &cmds).status.success());
        assert_eq!(a.stop().0, 0);
        // New entries have both copies: damage to one is survived as it is.
        rig.patch(Rig::entry(0) + 4096, &[0x5a; 4096]);
        assert_eq!(rig.check().0, 0, "{}", rig.check().1);
        // Now as an RFC writer leaves it: copy 1 never written; then damage copy 0.
        rig.patch(Rig::entry(0) + 4096, &[0; 4096]);
        rig.patch(Rig::entry(0), if damage == "zeros" { &[0; 4096] } else { &[0xc3; 4096] });
        let (c, out) = rig.check();
        assert_eq!(c, 1, "{damage}: {out}");
        assert!(out.contains("owned by no backing entry") && out.contains("pcache repair"), "{damage}: {out}");
        let v = rig.inspect();
        assert!(v["backings"].as_array().unwrap().is_empty(), "{v}");
        assert_eq!(v["orphans"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(v["orphans"][0]["data_crc"], true);
        assert!(v["orphans"][0]["dirty_keys"].as_u64().unwrap() > 0, "{v}");
        // Attach refuses to build a new cache over it.
        let o = run_for(
            Command::new(env!("CARGO_BIN_EXE_pcache"))
                .args(["attach", s(&rig.dev), "--backing", s(&disk), "--listen"])
                .arg(format!("unix:{}", rig.socket().display())),
            20,
        )
        .expect("attach must refuse, not serve");
        assert_eq!(o.status.code(), Some(1), "{damage}: {}", stdout(&o));
        assert!(stderr(&o).contains("pcache repair"), "{}", stderr(&o));
        // Repair: shown first, done on request, with the backing named.
        let o = pcache(&["repair", s(&rig.dev)]);
        assert_eq!(code(&o), 1, "{}", stdout(&o));
        assert!(stdout(&o).contains("--backing"), "{}", stdout(&o));
        let o = pcache(&["repair", s(&rig.dev), "--backing", s(&disk)]);
        assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
        assert!(stdout(&o).contains("would rebuild backing entry"), "{}", stdout(&o));
        assert_eq!(rig.check().0, 1, "a repair shown is not done");
        let small = rig.backing("small.img", 1 << 20);
        let o = pcache(&["repair", s(&rig.dev), "--backing", s(&small), "--yes"]);
        assert_eq!(code(&o), 1, "a backing too small for the lost keys is refused: {}", stdout(&o));
        let o = pcache(&["repair", s(&rig.dev), "--backing", s(&disk), "--yes"]);
        assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
        let (c, out) = rig.check();
        assert_eq!(c, 0, "{damage}: {out}");
        assert!(rig.inspect()["orphans"].as_array().unwrap().is_empty());
        // Every dirty block is there, verified by its data CRC on the way.
        let a = rig.attach(&[&disk], &[]);
        assert!(a.stdout.iter().any(|l| l.contains("existing cache") && l.contains("data crc on")), "{:?}", a.stdout);
        // Nothing was asked about data CRCs, so there is nothing to note.
        assert!(!a.stdout.iter().any(|l| l.contains("note:")), "{:?}", a.stdout);
        let reads: Vec<String> = (0..40).map(|i| format!("read -P {} {} 4k", i + 1, i * 65536)).collect();
        let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
        let o = qemu_io(&a.uri("disk.img"), &reads);
        assert!(reads_ok(&o), "{damage}: {}", stdout(&o));
        assert_eq!(a.stop().0, 0);
    }
}

#[test]
fn a_sparse_pmem_file_is_refused() {
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 64 << 20);
    let sparse = rig.d.path("sparse.img");
    ok(Command::new("cp").arg("--sparse=always").arg(&rig.dev).arg(&sparse));
    let o = pcache(&["attach", s(&sparse), "--backing", s(&disk), "--listen", "unix:/nonexistent/x"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("is sparse") && stderr(&o).contains("fallocate -l"), "{}", stderr(&o));
    // The fix it names works.
    ok(Command::new("fallocate").arg("-l").arg("1073741824").arg(&sparse));
    let a = Attach::start(&sparse, &[&disk], &rig.socket(), &[]);
    assert_eq!(a.stop().0, 0);
}

#[test]
fn a_moved_backing_is_renamed_explicitly_never_silently() {
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 64 << 20);
    let a = rig.attach(&[&disk], &[]);
    assert!(qemu_io(&a.uri("disk.img"), &["write -P 0x77 0 1m", "flush"]).status.success());
    assert_eq!(a.stop().0, 0);
    let moved = rig.d.path("moved.img");
    std::fs::rename(&disk, &moved).unwrap();
    // Attach by the new name does not quietly start a second, empty cache.
    let listen = format!("unix:{}", rig.socket().display());
    let o = pcache(&["attach", s(&rig.dev), "--backing", s(&moved), "--listen", &listen]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("pcache rename"), "{}", stderr(&o));
    // A device of another size is not taken for it.
    let wrong = rig.backing("wrong.img", 32 << 20);
    let o = pcache(&["rename", s(&rig.dev), "--backing", s(&disk), "--to", s(&wrong)]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("was made for"), "{}", stderr(&o));
    let o = pcache(&["rename", s(&rig.dev), "--backing", s(&disk), "--to", s(&moved)]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let a = rig.attach(&[&moved], &[]);
    assert!(a.stdout.iter().any(|l| l.contains("existing cache")), "{:?}", a.stdout);
    let o = qemu_io(&a.uri("moved.img"), &["read -P 0x77 0 1m"]);
    assert!(reads_ok(&o), "{}", stdout(&o));
    assert_eq!(a.stop().0, 0);
    // The device gone for good: its cache can be given up, explicitly,
    // without a device to write back to; the refusal named this command.
    std::fs::remove_file(&moved).unwrap();
    let o = pcache(&["detach", s(&rig.dev), "--backing", s(&moved), "--discard"]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("1.00 MiB dirty data not written back is gone"), "{}", stdout(&o));
    assert!(rig.inspect()["backings"].as_array().unwrap().is_empty());
    assert_eq!(rig.check().0, 0, "{}", rig.check().1);
    let o = pcache(&["detach", s(&rig.dev), "--backing", s(&moved), "--discard", "--salvage"]);
    assert_eq!(code(&o), 64);
}

/// Two entries for one backing device (as an earlier pcache could leave
/// them: one per spelling) are a problem `check` names, and attach refuses
/// to pick either.
#[test]
fn two_entries_for_one_backing_are_found_and_refused() {
    use pcache_format::sparse::ImageBuilder;
    let d = Dir::new();
    let disk = d.path("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    std::fs::create_dir(d.path("sub")).unwrap();
    let other = format!("{}/sub/../disk.img", d.dir.path().display());
    let mut b = ImageBuilder::format(1 << 30).unwrap();
    let mut c0 = b.add_cache(0, s(&disk).as_bytes(), 64 << 20, 10, false).unwrap();
    c0.write(&mut b, 0, &[1u8; 4096], false).unwrap();
    c0.close(&mut b).unwrap();
    let mut c1 = b.add_cache(1, other.as_bytes(), 64 << 20, 10, false).unwrap();
    c1.write(&mut b, 0, &[2u8; 4096], false).unwrap();
    c1.close(&mut b).unwrap();
    let dev = d.path("pmem.img");
    write_image(&b.finish(), &dev);
    ok(Command::new("fallocate").arg("-l").arg("1073741824").arg(&dev));
    let o = pcache(&["check", s(&dev)]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(stdout(&o).contains("is the same backing device as backing 0"), "{}", stdout(&o));
    let o = pcache(&["attach", s(&dev), "--backing", s(&disk), "--listen", &format!("unix:{}", d.path("s").display())]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("both name"), "{}", stderr(&o));
}

/// A loop device over a file, detached when dropped.
struct Loop(PathBuf);

impl Loop {
    fn over(file: &Path) -> Loop {
        let o = Command::new("losetup").args(["-f", "--show"]).arg(file).output();
        let o = o.unwrap_or_else(|e| panic!("losetup (util-linux) is needed for the block device tests: {e}"));
        assert!(o.status.success(), "losetup -f --show {}: {}", file.display(), stderr(&o));
        Loop(PathBuf::from(stdout(&o).trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Block devices: one disk under another node name (as `/dev/disk/by-id/…`
/// is) is one backing, held exclusively while its cache runs; a loop device
/// over the pmem file is the pmem device.
#[test]
fn a_block_device_under_any_name_is_one_backing_held_exclusively() {
    let rig = Rig::new();
    let file = rig.backing("disk.img", 64 << 20);
    let disk = Loop::over(&file);
    // Another name for the same disk, as udev's by-id links are, and
    // another device node of it (another inode: only the device number and
    // the kernel's exclusive open tell them apart).
    let alias = rig.d.path("by-id-disk");
    std::os::unix::fs::symlink(&disk.0, &alias).unwrap();
    let node = rig.d.path("node");
    let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(&disk.0).unwrap());
    let (major, minor) = (libc::major(rdev).to_string(), libc::minor(rdev).to_string());
    ok(Command::new("mknod").arg(&node).args(["b", &major, &minor]));
    let a = rig.attach(&[&disk.0], &["--export", "disk"]);
    assert!(a.stdout.iter().any(|l| l.contains("new cache")), "{:?}", a.stdout);
    assert!(qemu_io(&a.uri("disk"), &["write -P 0x5c 0 1m", "flush"]).status.success());
    // Held: another pmem device cannot take it, under either name.
    let other = rig.d.path("other.img");
    assert_eq!(code(&pcache(&["format", s(&other), "--size", "1G"])), 0);
    for name in [&disk.0, &alias, &node] {
        let o = run_for(
            Command::new(env!("CARGO_BIN_EXE_pcache"))
                .args(["attach", s(&other), "--backing", s(name), "--listen"])
                .arg(format!("unix:{}", rig.d.path("o.sock").display())),
            20,
        )
        .expect("a second cache of a block device in use must be refused");
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert!(stderr(&o).contains("in use"), "{}", stderr(&o));
        // Nor can it be formatted as pmem, whatever node it is reached by.
        let o = pcache(&["format", "--force", s(name)]);
        assert_ne!(code(&o), 0, "{}", stdout(&o));
        assert!(stderr(&o).contains("in use"), "{}", stderr(&o));
    }
    assert_eq!(a.stop().0, 0);
    for name in [&alias, &node] {
        let a = rig.attach(&[name], &["--export", "disk"]);
        assert!(a.stdout.iter().any(|l| l.contains("existing cache")), "{}: {:?}", name.display(), a.stdout);
        let o = qemu_io(&a.uri("disk"), &["read -P 0x5c 0 1m"]);
        assert!(reads_ok(&o), "{}", stdout(&o));
        assert_eq!(a.stop().0, 0);
    }
    // A loop device over the pmem file is the pmem device.
    let over_pmem = Loop::over(&rig.dev);
    let o = pcache(&["attach", s(&rig.dev), "--backing", s(&over_pmem.0), "--listen", "unix:/nonexistent/x"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("loop device over the pmem file"), "{}", stderr(&o));
    assert_eq!(rig.inspect()["backings"].as_array().unwrap().len(), 1);
}

/// A tmpfs of `mib` MiB mounted at `dir`, unmounted when dropped.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: PathBuf, mib: u64) -> SmallFs {
        std::fs::create_dir_all(&dir).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .output()
            .unwrap_or_else(|e| panic!("mount: {e}"));
        assert!(o.status.success(), "mounting a small tmpfs needs root: {}", stderr(&o));
        SmallFs(dir)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A backing file on a filesystem that fills: writes land in pmem and are
/// served, writeback fails and says so, attach exits 1 at stop, and once
/// the file is moved to a filesystem with room (and the cache pointed at
/// it), every byte goes back.
#[test]
fn a_backing_on_a_full_filesystem_loses_nothing() {
    let rig = Rig::new();
    let small = SmallFs::mount(rig.d.path("small"), 8);
    let disk = small.0.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    let mut a = Attach::start(&rig.dev, &[&disk], &rig.socket(), &[]);
    assert!(qemu_io(&a.uri("disk.img"), &["write -P 0x42 0 16m", "flush"]).status.success());
    let seen = a.wait_for_error();
    assert!(seen.contains("No space left"), "{seen}");
    let o = qemu_io(&a.uri("disk.img"), &["read -P 0x42 0 16m"]);
    assert!(reads_ok(&o), "{}", stdout(&o));
    let (rc, out) = a.stop();
    assert_eq!(rc, 1, "attach exits 0 with writeback failing: {out:?}");
    // Moved to where there is room, pointed at, written back.
    let big = rig.d.path("disk.img");
    ok(Command::new("cp").arg("--sparse=always").arg(&disk).arg(&big));
    drop(small);
    let o = pcache(&["rename", s(&rig.dev), "--backing", s(&disk), "--to", s(&big)]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let o = pcache(&["detach", s(&rig.dev), "--backing", s(&big)]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let data = std::fs::read(&big).unwrap();
    assert!(data[..16 << 20].iter().all(|&b| b == 0x42));
    assert!(data[16 << 20..].iter().all(|&b| b == 0));
}
