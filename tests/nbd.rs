//! `pcache attach` against real NBD clients: qemu-io, qemu-img, nbdinfo,
//! nbdcopy and fio. Each test starts its own server on a Unix socket in a
//! temporary directory and stops it (SIGTERM, or SIGKILL on failure).
//!
//! The clients come from Debian's qemu-utils, libnbd-bin and fio packages;
//! a missing client fails the test with the package to install.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use common::raw_nbd::*;
use common::*;

impl Rig {
    fn random_file(&self, name: &str, size: usize) -> PathBuf {
        let p = self.d.path(name);
        let mut x = 0x9e3779b97f4a7c15u64;
        let data: Vec<u8> = (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(&p, data).unwrap();
        p
    }
}

#[test]
fn qemu_io_writes_and_verifies_patterns() {
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 128 << 20);
    let a = Attach::start(&rig.dev, &[&disk], &rig.socket(), &[]);
    let mode = std::fs::metadata(rig.socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is private");
    let uri = a.uri("disk.img");
    let o = qemu_io(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "write -P 0xcd 1000 3000",
            "write -f -P 0x5a 4m 1m",
            "write -P 0x11 16m 32m",
            "write -z 8m 4k",
            "discard 100m 1m",
            "flush",
            "read -P 0xab 0 1000",
            "read -P 0xcd 1000 3000",
            "read -P 0xab 4000 61536",
            "read -P 0x5a 4m 1m",
            "read -P 0x11 16m 32m",
            "read -P 0 8m 4k",
            "read -P 0 64m 1m",
        ],
    );
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    assert!(!stdout(&o).contains("Pattern verification failed"), "{}", stdout(&o));
    // A wrong pattern is caught: the check can fail.
    let o = qemu_io(&uri, &["read -P 0xee 0 4k"]);
    assert!(stdout(&o).contains("Pattern verification failed"), "{}", stdout(&o));
    // Out of range: an error, and the server carries on.
    let o = qemu_io(&uri, &["read 127m 2m"]);
    assert!(!o.status.success() || stderr(&o).contains("Invalid") || stdout(&o).contains("error"), "{}", stdout(&o));
    let o = qemu_io(&uri, &["read -P 0xab 0 1000"]);
    assert!(o.status.success() && !stdout(&o).contains("failed"), "{}", stdout(&o));
    let (rc, out) = a.stop();
    assert_eq!(rc, 0, "{out:?}");
    assert!(out.iter().any(|l| l.contains("stopped \"disk.img\"")), "{out:?}");
    assert!(!rig.socket().exists(), "the socket is removed at exit");
}

#[test]
fn qemu_img_convert_and_compare() {
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 64 << 20);
    let image = rig.random_file("random.img", 64 << 20);
    let a = Attach::start(&rig.dev, &[&disk], &rig.socket(), &[]);
    let uri = a.uri("disk.img");
    let img = tool("qemu-img", "qemu-utils");
    ok(Command::new(&img).args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&image).arg(&uri));
    ok(Command::new(&img).args(["compare", "-f", "raw", "-F", "raw"]).arg(&image).arg(&uri));
    // compare can fail: one changed byte is found.
    let o = qemu_io(&uri, &["write -P 0 12345 1"]);
    assert!(o.status.success());
    let o = run(Command::new(&img).args(["compare", "-f", "raw", "-F", "raw"]).arg(&image).arg(&uri));
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert_eq!(a.stop().0, 0);
}

#[test]
fn nbdinfo_lists_two_exports() {
    let rig = Rig::new();
    let a_disk = rig.backing("a.img", 64 << 20);
    let b_disk = rig.backing("b.img", 96 << 20);
    let a = Attach::start(&rig.dev, &[&a_disk, &b_disk], &rig.socket(), &["--export", "alpha"]);
    let o = ok(Command::new(tool("nbdinfo", "libnbd-bin"))
        .args(["--json", "--list"])
        .arg(format!("nbd+unix:///?socket={}", rig.socket().display())));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let exports = v["exports"].as_array().unwrap();
    let sizes: Vec<(String, u64)> = exports
        .iter()
        .map(|e| (e["export-name"].as_str().unwrap().to_string(), e["export-size"].as_u64().unwrap()))
        .collect();
    assert_eq!(sizes, vec![("alpha".to_string(), 64 << 20), ("b.img".to_string(), 96 << 20)]);
    assert_eq!(exports[0]["can_multi_conn"], true);
    assert_eq!(exports[0]["block_size_maximum"], 32 << 20);
    // Any client may list the exports: it is told their names, not where
    // the backings live.
    let descriptions: Vec<&str> = exports.iter().map(|e| e["description"].as_str().unwrap()).collect();
    assert_eq!(descriptions, ["pcache export alpha", "pcache export b.img"]);
    // Both exports at once, with their own data.
    assert!(qemu_io(&a.uri("alpha"), &["write -P 1 0 1m"]).status.success());
    assert!(qemu_io(&a.uri("b.img"), &["write -P 2 0 1m"]).status.success());
    let oa = qemu_io(&a.uri("alpha"), &["read -P 1 0 1m"]);
    let ob = qemu_io(&a.uri("b.img"), &["read -P 2 0 1m"]);
    assert!(!stdout(&oa).contains("failed") && !stdout(&ob).contains("failed"));
    // The empty export name means the first backing.
    let o = ok(Command::new("nbdinfo").arg(format!("nbd+unix:///?socket={}", rig.socket().display())));
    assert!(stdout(&o).contains("export-size: 67108864"), "{}", stdout(&o));
    assert!(stdout(&o).contains("description: pcache export alpha"), "{}", stdout(&o));
    assert!(!stdout(&o).contains("a.img"), "the backing's name shows: {}", stdout(&o));
    // An unknown export is refused.
    let o = run(Command::new("nbdinfo").arg(a.uri("nope")));
    assert!(!o.status.success());
    assert_eq!(a.stop().0, 0);
}

#[test]
fn describe_paths_shows_the_backing_paths() {
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 16 << 20);
    let a = Attach::start(&rig.dev, &[&disk], &rig.socket(), &["--export", "data", "--describe-paths"]);
    let path = std::fs::canonicalize(&disk).unwrap();
    let described = format!("pcache of {}", path.display());
    let o = ok(Command::new(tool("nbdinfo", "libnbd-bin"))
        .args(["--json", "--list"])
        .arg(format!("nbd+unix:///?socket={}", rig.socket().display())));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["exports"][0]["description"], described.as_str(), "{}", stdout(&o));
    // NBD_INFO_DESCRIPTION, as NBD_OPT_GO answers it, says the same.
    let o = ok(Command::new("nbdinfo").arg(a.uri("data")));
    assert!(stdout(&o).contains(&format!("description: {described}")), "{}", stdout(&o));
    assert_eq!(a.stop().0, 0);
}

#[test]
fn nbdcopy_both_ways() {
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 48 << 20);
    let image = rig.random_file("random.img", 48 << 20);
    let back = rig.d.path("back.img");
    let a = Attach::start(&rig.dev, &[&disk], &rig.socket(), &[]);
    let copy = tool("nbdcopy", "libnbd-bin");
    ok(Command::new(&copy).arg(&image).arg(a.uri("disk.img")));
    ok(Command::new(&copy).arg(a.uri("disk.img")).arg(&back));
    assert!(std::fs::read(&image).unwrap() == std::fs::read(&back).unwrap());
    assert_eq!(a.stop().0, 0);
}

#[test]
fn fio_random_read_write_with_verify() {
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 64 << 20);
    let a = Attach::start(&rig.dev, &[&disk], &rig.socket(), &[]);
    let o = ok(Command::new(tool("fio", "fio")).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", a.uri("disk.img")),
        "--rw=randrw",
        "--bs=4k",
        "--size=32M",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        // No local-*-verify.state left in the directory the tests run in.
        "--verify_state_save=0",
    ]));
    let out = stdout(&o);
    assert!(out.contains("err= 0"), "{out}");
    assert_eq!(a.stop().0, 0);
}

#[test]
fn flushed_data_survives_kill_9() {
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 64 << 20);
    // Idle ksets would close by themselves after 1 s; make that an hour so
    // that only FLUSH and FUA make keys durable.
    let slow = ["--kset-flush-ms", "3600000"];
    let a = Attach::start(&rig.dev, &[&disk], &rig.socket(), &slow);
    let uri = a.uri("disk.img");
    assert!(qemu_io(&uri, &["write -P 0x77 0 2m", "flush", "write -f -P 0x99 8m 64k"]).status.success());
    a.kill9();
    let a = Attach::start(&rig.dev, &[&disk], &rig.socket(), &slow);
    let o = qemu_io(&a.uri("disk.img"), &["read -P 0x77 0 2m", "read -P 0x99 8m 64k"]);
    assert!(o.status.success() && !stdout(&o).contains("failed"), "{}", stdout(&o));
    assert_eq!(a.stop().0, 0);
    let o = pcache(&["check", s(&rig.dev)]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
}

#[test]
fn a_graceful_restart_keeps_hits() {
    let rig = Rig::new();
    let disk = rig.backing_filled("disk.img", 64 << 20, 0x42);
    let mut a = Attach::start(&rig.dev, &[&disk], &rig.socket(), &[]);
    // Read misses fill the cache.
    assert!(qemu_io(&a.uri("disk.img"), &["read -P 0x42 0 8m"]).status.success());
    a.signal(libc::SIGUSR1);
    let status = a.wait_for("status:");
    assert!(status.contains("misses "), "{status}");
    assert_eq!(a.stop().0, 0);
    let mut a = Attach::start(&rig.dev, &[&disk], &rig.socket(), &[]);
    assert!(a.stdout.iter().any(|l| l.contains("existing cache")), "{:?}", a.stdout);
    assert!(qemu_io(&a.uri("disk.img"), &["read -P 0x42 0 8m"]).status.success());
    a.signal(libc::SIGUSR1);
    let status = a.wait_for("status:");
    assert!(status.contains("misses 0,"), "the restarted cache served the reads: {status}");
    assert!(!status.contains("hits 0 "), "{status}");
    assert_eq!(a.stop().0, 0);
}

#[test]
fn bad_clients_do_not_disturb_good_ones() {
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 64 << 20);
    let a = Attach::start(&rig.dev, &[&disk], &rig.socket(), &[]);
    // A second attach of the same pmem device is refused.
    let o = pcache(&["attach", s(&rig.dev), "--backing", s(&disk), "--listen", "unix:/nonexistent/x"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("in use by another process"), "{}", stderr(&o));
    // Garbage handshakes, truncated options, absurd lengths.
    for garbage in [
        b"hello, world".to_vec(),
        vec![0u8; 4],
        [
            0u32.to_be_bytes().to_vec(),
            0x4948_4156_454f_5054u64.to_be_bytes().to_vec(),
            vec![0, 0, 0, 7, 255, 255, 255, 255],
        ]
        .concat(),
        [0u32.to_be_bytes().to_vec(), vec![0xff; 64]].concat(),
    ] {
        let mut sock = UnixStream::connect(rig.socket()).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = sock.write_all(&garbage);
        let mut sink = Vec::new();
        let _ = sock.read_to_end(&mut sink); // the server hangs up
    }
    // A client that stops mid-request.
    let mut half = UnixStream::connect(rig.socket()).unwrap();
    let _ = half.write_all(&0u32.to_be_bytes());
    let o = qemu_io(&a.uri("disk.img"), &["write -P 3 0 1m", "read -P 3 0 1m"]);
    assert!(o.status.success() && !stdout(&o).contains("failed"), "{}", stdout(&o));
    drop(half);
    assert_eq!(a.stop().0, 0);
}

/// Runs `line`, as printed by attach, through `sh -c`.
fn sh(line: &str) -> Output {
    ok(Command::new("sh").arg("-c").arg(line))
}

/// The connect line attach printed that starts with `tool`.
fn printed(a: &Attach, tool: &str) -> String {
    let prefix = format!("{tool} ");
    let line = a.stdout.iter().map(|l| l.trim()).find(|l| l.starts_with(&prefix));
    line.unwrap_or_else(|| panic!("no {tool} line in:\n{}", a.stdout.join("\n"))).to_string()
}

#[test]
fn printed_connect_lines_work_in_a_shell() {
    tool("nbdinfo", "libnbd-bin");
    tool("qemu-io", "qemu-utils");
    let name = "my disk's";
    // TCP on loopback, on a port that was free a moment ago.
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 40 << 20);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("tcp:127.0.0.1:{port}");
    let a = Attach::spawn(attach_cmd(&rig.dev, &[&disk], &listen, &["--export", name]), &rig.socket());
    let line = printed(&a, "nbdinfo");
    let o = sh(&line);
    assert!(stdout(&o).contains(&format!("export-size: {}", 40 << 20)), "{line}:\n{}", stdout(&o));
    assert!(stdout(&o).contains(name), "{line}:\n{}", stdout(&o));
    let o = sh(&format!("{} -c 'write -P 7 0 4k' -c 'read -P 7 0 4k'", printed(&a, "qemu-io")));
    assert!(!stdout(&o).contains("failed"), "{}", stdout(&o));
    assert_eq!(a.stop().0, 0);
    // A Unix socket whose path needs quoting for the shell and escaping in
    // the URI (a literal "%20" must not turn into a space).
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 24 << 20);
    let dir = rig.d.path("it's a %20 dir");
    std::fs::create_dir(&dir).unwrap();
    let socket = dir.join("s&ck.sock");
    let a = Attach::start(&rig.dev, &[&disk], &socket, &["--export", name]);
    let line = printed(&a, "nbdinfo");
    let o = sh(&line);
    assert!(stdout(&o).contains(&format!("export-size: {}", 24 << 20)), "{line}:\n{}", stdout(&o));
    assert_eq!(a.stop().0, 0);
}

#[test]
fn the_socket_is_born_private() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 16 << 20);
    let socket = rig.socket();
    // A stale socket, as a crashed server leaves it (with a mode of its own,
    // 0640, to tell it apart): replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o640)).unwrap();
    // Every mode a socket is ever seen with at that path.
    let seen = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (seen, done, socket) = (seen.clone(), done.clone(), socket.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if let Ok(m) = std::fs::symlink_metadata(&socket)
                    && m.file_type().is_socket()
                {
                    seen.lock().unwrap().insert(m.mode() & 0o777);
                }
            }
        })
    };
    // Under umask 000 a socket bound in place would be born 0777. The
    // watcher may stop before it sees the new socket at all (it stops once
    // attach answers): the final mode is checked separately below.
    let inner = attach_cmd(&rig.dev, &[&disk], &format!("unix:{}", socket.display()), &[]);
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "umask 000 && exec \"$@\"", "sh"]).arg(inner.get_program()).args(inner.get_args());
    cmd.env("PCACHE_LOG", "warn");
    let a = Attach::spawn(cmd, &socket);
    done.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    let pid = a.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.lines().any(|l| l == "Umask:\t0000"), "attach runs under umask 000:\n{status}");
    let m = std::fs::symlink_metadata(&socket).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.mode() & 0o777, 0o600, "the socket is private");
    let seen = seen.lock().unwrap().clone();
    let shown: Vec<String> = seen.iter().map(|m| format!("{m:o}")).collect();
    assert!(seen.iter().all(|m| [0o600, 0o640].contains(m)), "modes seen at the socket's path: {shown:?}");
    // Nothing is left beside it.
    let mut names: Vec<String> =
        std::fs::read_dir(rig.d.dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    names.sort();
    assert_eq!(names, ["disk.img", "nbd.sock", "pmem.img"]);
    assert!(qemu_io(&a.uri("disk.img"), &["write -P 1 0 4k"]).status.success());
    assert_eq!(a.stop().0, 0);
    assert!(!socket.exists(), "the socket is removed at exit");
}

#[test]
fn a_stalled_handshake_times_out() {
    use std::time::Instant;
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 16 << 20);
    let socket = rig.socket();
    let mut cmd = attach_cmd(&rig.dev, &[&disk], &format!("unix:{}", socket.display()), &[]);
    cmd.env("PCACHE_NBD_HANDSHAKE_TIMEOUT_SECS", "1");
    let a = Attach::spawn(cmd, &socket);
    // Waits, on a thread, for the server to close `s`; gives the time from `t`.
    let closed = |mut s: UnixStream, t: Instant| {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            s.read_to_end(&mut sink).map(|_| t.elapsed())
        })
    };
    // One sends nothing at all.
    let t = Instant::now();
    let silent = closed(UnixStream::connect(&socket).unwrap(), t);
    // One stops halfway through an option.
    let t = Instant::now();
    let mut half = UnixStream::connect(&socket).unwrap();
    let mut hello = [0u8; 18];
    half.read_exact(&mut hello).unwrap();
    half.write_all(&1u32.to_be_bytes()).unwrap();
    half.write_all(&0x4948_4156_454f_5054u64.to_be_bytes()).unwrap();
    let half = closed(half, t);
    // One trickles the option a byte every 300 ms: the deadline covers the
    // whole handshake, not each read.
    let t = Instant::now();
    let mut slow = UnixStream::connect(&socket).unwrap();
    slow.read_exact(&mut hello).unwrap();
    let slow_w = slow.try_clone().unwrap();
    let trickler = std::thread::spawn(move || {
        let mut w = slow_w;
        let mut opt = 1u32.to_be_bytes().to_vec();
        opt.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        for b in opt {
            if w.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let slow = closed(slow, t);
    // Meanwhile a good client works, idle in transmission for longer than
    // the handshake timeout.
    let o = qemu_io(&a.uri("disk.img"), &["write -P 5 0 64k", "sleep 1500", "read -P 5 0 64k"]);
    assert!(o.status.success() && !stdout(&o).contains("failed"), "{}\n{}", stdout(&o), stderr(&o));
    for (what, waiter) in [("silent", silent), ("half", half), ("trickling", slow)] {
        let took = waiter.join().unwrap().unwrap_or_else(|e| panic!("the {what} client was not closed: {e}"));
        assert!(took >= Duration::from_millis(900), "the {what} client was closed after {took:?}, before the timeout");
        assert!(took < Duration::from_secs(10), "the {what} client was closed only after {took:?}");
    }
    trickler.join().unwrap();
    assert_eq!(a.stop().0, 0);
}

#[test]
fn writes_past_the_end_get_enospc() {
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 16 << 20);
    let a = Attach::start(&rig.dev, &[&disk], &rig.socket(), &[]);
    // Real clients refuse such requests themselves: a raw one sends them.
    let mut c = RawClient::connect(&rig.socket(), "disk.img");
    let end = c.size;
    assert_eq!(end, 16 << 20);
    c.send(CMD_WRITE, 1, end - 2, 4, b"wxyz");
    c.send(CMD_WRITE_ZEROES, 2, end, 1, &[]);
    c.send(CMD_WRITE_ZEROES, 3, u64::MAX, 1, &[]);
    c.send(CMD_READ, 4, end - 2, 4, &[]);
    c.send(CMD_TRIM, 5, end, 4096, &[]);
    // The refused write's payload was read: the connection carries on.
    c.send(CMD_WRITE, 6, end - 4, 4, b"abcd");
    c.send(CMD_FLUSH, 7, 0, 0, &[]);
    let replies: Vec<(u32, u64)> = (0..7).map(|_| c.reply()).collect();
    let mut sorted = replies.clone();
    sorted.sort_by_key(|r| r.1);
    assert_eq!(sorted, [(ENOSPC, 1), (ENOSPC, 2), (ENOSPC, 3), (EINVAL, 4), (EINVAL, 5), (0, 6), (0, 7)]);
    c.send(CMD_DISC, 8, 0, 0, &[]);
    let o = qemu_io(&a.uri("disk.img"), &["read -P 0 0 4k", &format!("read -v {} 4", end - 4)]);
    assert!(stdout(&o).contains("61 62 63 64"), "{}", stdout(&o));
    assert_eq!(a.stop().0, 0);
}

#[test]
fn cache_prefetches_and_fast_zero_is_refused_at_once() {
    let rig = Rig::new();
    let disk = rig.backing_filled("disk.img", 16 << 20, 0x5a);
    let ctl = rig.d.path("c.ctl");
    let a = Attach::start(&rig.dev, &[&disk], &rig.socket(), &["--control", s(&ctl)]);
    // A real client sees both advertised.
    let o = ok(Command::new(tool("nbdinfo", "libnbd-bin")).args(["--json", &a.uri("disk.img")]));
    let info: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(info["exports"][0]["can_cache"], true, "{info}");
    assert_eq!(info["exports"][0]["can_fast_zero"], true, "{info}");
    let figures = || -> serde_json::Value {
        let o = pcache(&["status", "--control", s(&ctl), "--json"]);
        serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()["exports"][0].clone()
    };
    // (nbdinfo read the start of the export to say what it holds.)
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap();
    let before = figures();
    let mut c = RawClient::connect(&rig.socket(), "disk.img");
    c.send(CMD_CACHE, 1, 2 << 20, 1 << 20, &[]);
    assert_eq!(c.reply(), (0, 1));
    let after_cache = figures();
    assert_eq!(n(&after_cache, "bytes_from_backing") - n(&before, "bytes_from_backing"), 1 << 20, "{after_cache}");
    // The prefetched range is then read from the cache alone.
    let o = qemu_io(&a.uri("disk.img"), &["read -P 0x5a 2M 1M"]);
    assert!(o.status.success() && !stdout(&o).contains("fail"), "{}", stdout(&o));
    let after_read = figures();
    assert_eq!(n(&after_read, "bytes_from_backing"), n(&after_cache, "bytes_from_backing"), "{after_read}");
    assert_eq!(n(&after_read, "bytes_from_cache") - n(&after_cache, "bytes_from_cache"), 1 << 20, "{after_read}");
    // CACHE past the end: EINVAL. A fast zero: ENOTSUP, nothing zeroed; a
    // plain one zeroes.
    c.send(CMD_CACHE, 2, 16 << 20, 1, &[]);
    assert_eq!(c.reply(), (EINVAL, 2));
    c.sock.write_all(&RawClient::request_with(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 3, 0, 4096, &[])).unwrap();
    assert_eq!(c.reply(), (ENOTSUP, 3));
    let o = qemu_io(&a.uri("disk.img"), &["read -P 0x5a 0 4k"]);
    assert!(o.status.success() && !stdout(&o).contains("fail"), "{}", stdout(&o));
    c.send(CMD_WRITE_ZEROES, 4, 0, 4096, &[]);
    assert_eq!(c.reply(), (0, 4));
    c.send(CMD_DISC, 5, 0, 0, &[]);
    let o = qemu_io(&a.uri("disk.img"), &["read -P 0 0 4k"]);
    assert!(o.status.success() && !stdout(&o).contains("fail"), "{}", stdout(&o));
    assert_eq!(a.stop().0, 0);
}

/// `base:allocation`: nbdinfo --map and qemu-img map see the backing
/// file's holes and the cached data; qemu-io speaks extended headers (the
/// log says so) and its data reads back.
#[test]
fn block_status_and_extended_headers_with_real_clients() {
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 64 << 20);
    // Data in the backing file at 8 MiB (2 MiB of it); the rest is a hole.
    let o = qemu_io(s(&disk), &["write -P 0x42 8m 2m"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = rig.d.path("attach.log");
    let a = Attach::start_logged(&rig.dev, &[&disk], &rig.socket(), &[], &log);
    let uri = a.uri("disk.img");
    let o = qemu_io(&uri, &["write -P 0x17 32m 1m", "write -z 40m 5m", "read -P 0x17 32m 1m", "read -P 0 40m 5m"]);
    assert!(o.status.success() && !stdout(&o).contains("failed"), "{}\n{}", stdout(&o), stderr(&o));
    let map = stdout(&ok(Command::new(tool("nbdinfo", "libnbd-bin")).args(["--map", &uri])));
    let rows: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    const M: u64 = 1 << 20;
    assert_eq!(
        rows,
        vec![
            (0, 8 * M, 3),
            (8 * M, 2 * M, 0),
            (10 * M, 22 * M, 3),
            (32 * M, M, 0),
            (33 * M, 7 * M, 3),
            (40 * M, 5 * M, 0),
            (45 * M, 19 * M, 3)
        ],
        "{map}"
    );
    let qmap = stdout(&ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri])));
    let v: serde_json::Value = serde_json::from_str(&qmap).unwrap();
    let data: Vec<(u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, vec![(8 * M, 2 * M), (32 * M, M), (40 * M, 5 * M)], "{qmap}");
    assert_eq!(a.stop().0, 0);
    let log = std::fs::read_to_string(&log).unwrap();
    let conns: Vec<&str> = log.lines().filter(|l| l.contains("client connected")).collect();
    assert_eq!(conns.len(), 3, "{log}");
    assert!(conns[0].contains("extended_headers=true"), "qemu-io's connection: {log}");
    assert!(conns.iter().all(|c| c.contains("block_status=true")), "every client asked for base:allocation: {log}");
}
