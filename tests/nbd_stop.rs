//! How `pcache attach` stops when clients or requests will not finish: a
//! client that never reads its replies, a write that waits for cache space
//! that never comes. The stop lets connections finish for `--stop-timeout`
//! (or until a second signal), then cuts them off, stops every cache
//! cleanly and exits 3; everything acknowledged before is there at the
//! next start. Each test starts its own server on a Unix socket in a
//! temporary directory and stops it.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::raw_nbd::*;
use common::*;

/// Exit status of a stop that had to cut connections off.
const EXIT_CUT_SHORT: i32 = 3;
/// Ksets close only at a flush, a FUA write or the stop.
const NO_IDLE_CLOSE: [&str; 2] = ["--kset-flush-ms", "3600000"];

/// Writes two patterns through qemu-io: one flushed, one only acknowledged
/// (its kset is closed by nothing but the stop).
fn write_acknowledged(a: &Attach) {
    let o = qemu_io(&a.uri("disk.img"), &["write -P 0x61 0 4m", "flush", "write -P 0x62 8m 1m"]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
}

/// Starts attach again on the same devices and checks that both patterns
/// of [`write_acknowledged`] are there, and what the qemu-io commands
/// `more` read, and that the device checks clean.
fn verify_after_restart(rig: &Rig, disk: &Path, more: &[String]) {
    let a = Attach::start(&rig.dev, &[disk], &rig.socket(), &NO_IDLE_CLOSE);
    let mut reads = vec!["read -P 0x61 0 4m", "read -P 0x62 8m 1m"];
    reads.extend(more.iter().map(String::as_str));
    let o = qemu_io(&a.uri("disk.img"), &reads);
    assert!(o.status.success() && !stdout(&o).contains("failed"), "{}\n{}", stdout(&o), stderr(&o));
    assert_eq!(a.stop().0, 0);
    let o = pcache(&["check", s(&rig.dev)]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
}

/// A client that sends `n` reads of 32 MiB and never reads the replies:
/// returned once the server is writing the first reply, which cannot fit
/// the socket's buffer, so that the server is stuck in that write.
fn stuck_reader(socket: &Path, n: u64) -> RawClient {
    let mut c = RawClient::connect(socket, "disk.img");
    let requests: Vec<u8> = (0..n).flat_map(|h| RawClient::request(CMD_READ, h, 0, 32 << 20, &[])).collect();
    c.sock.write_all(&requests).unwrap();
    let (errno, _) = c.reply();
    assert_eq!(errno, 0);
    c
}

/// The line of `out` that contains `what`.
fn line<'a>(out: &'a [String], what: &str) -> &'a str {
    out.iter().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no line with {what:?} in:\n{}", out.join("\n")))
}

/// The number just before `what` in `line`.
fn count_before(line: &str, what: &str) -> u64 {
    let head = &line[..line.find(what).unwrap_or_else(|| panic!("no {what:?} in {line:?}"))];
    head.split_whitespace().last().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no count in {line:?}"))
}

#[test]
fn a_client_that_never_reads_its_replies_cannot_hold_a_stop() {
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 64 << 20);
    let args = [&["--stop-timeout", "2"][..], &NO_IDLE_CLOSE].concat();
    let mut a = Attach::start(&rig.dev, &[&disk], &rig.socket(), &args);
    write_acknowledged(&a);
    // An idle client ends at the stop as it always did: it is not cut.
    let idle = RawClient::connect(&rig.socket(), "disk.img");
    let stuck = stuck_reader(&rig.socket(), 64);
    let t = Instant::now();
    a.signal(libc::SIGTERM);
    a.wait_for("stopping (SIGTERM)");
    let (rc, took, out) = a.exit_within(t, Duration::from_secs(60));
    assert_eq!(rc, EXIT_CUT_SHORT, "{}", out.join("\n"));
    // The connections had their 2 s, and no more than that took long.
    assert!(took >= Duration::from_secs(2), "cut after {took:?}, before --stop-timeout");
    assert!(took < Duration::from_secs(15), "the stop took {took:?}");
    line(&out, "stopping now (--stop-timeout of 2 s passed): shutting down 1 connection(s) still open");
    let cut = line(&out, "stop cut short");
    assert_eq!(count_before(cut, "connection(s) shut down"), 1, "{cut}");
    let unanswered = count_before(cut, "request(s) left unanswered");
    assert!((1..=64).contains(&unanswered), "{cut}");
    line(&out, "stopped \"disk.img\": every kset closed");
    drop((idle, stuck));
    verify_after_restart(&rig, &disk, &[]);
}

#[test]
fn a_second_signal_stops_at_once() {
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 64 << 20);
    // A timeout the test would never see the end of.
    let args = [&["--stop-timeout", "3600"][..], &NO_IDLE_CLOSE].concat();
    let mut a = Attach::start(&rig.dev, &[&disk], &rig.socket(), &args);
    write_acknowledged(&a);
    let stuck = stuck_reader(&rig.socket(), 8);
    a.signal(libc::SIGTERM);
    // Once the first is handled, the second is a second one.
    a.wait_for("stopping (SIGTERM): finishing the requests in flight, for up to 3600 s");
    let t = Instant::now();
    a.signal(libc::SIGINT);
    let (rc, took, out) = a.exit_within(t, Duration::from_secs(60));
    assert_eq!(rc, EXIT_CUT_SHORT, "{}", out.join("\n"));
    assert!(took < Duration::from_secs(15), "the stop took {took:?} after the second signal");
    line(&out, "stopping now (a second signal, SIGINT): shutting down 1 connection(s) still open");
    line(&out, "stopped \"disk.img\": every kset closed");
    drop(stuck);
    verify_after_restart(&rig, &disk, &[]);
}

#[test]
fn a_write_waiting_for_space_cannot_hold_a_stop() {
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 256 << 20);
    // 10 segments, and writeback held back: a full cache stays full.
    let held = ["--cache-size", "160M", "--writeback-rate", "1", "--stop-timeout", "1"];
    let mut a = Attach::start(&rig.dev, &[&disk], &rig.socket(), &[&held[..], &NO_IDLE_CLOSE].concat());
    write_acknowledged(&a);
    // A client writes 200 MiB more, 1 MiB at a time, reading no replies.
    let mut c = RawClient::connect(&rig.socket(), "disk.img");
    let mut sock = c.sock.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let payload = vec![0x77u8; 1 << 20];
        for i in 0..200u64 {
            let r = RawClient::request(CMD_WRITE, i, (16 << 20) + (i << 20), 1 << 20, &payload);
            if sock.write_all(&r).is_err() {
                return;
            }
        }
    });
    // The status line says when a write waits for a segment.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        a.signal(libc::SIGUSR1);
        let status = a.wait_for("status:");
        if status.contains("waiting for space") {
            break;
        }
        assert!(Instant::now() < until, "no write waited for space: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    a.signal(libc::SIGTERM);
    let (rc, took, out) = a.exit_within(t, Duration::from_secs(60));
    assert_eq!(rc, EXIT_CUT_SHORT, "{}", out.join("\n"));
    assert!(took < Duration::from_secs(15), "the stop took {took:?}");
    line(&out, "stopping now (--stop-timeout of 1 s passed): shutting down 1 connection(s) still open");
    line(&out, "stopped \"disk.img\": every kset closed");
    writer.join().unwrap();
    // Every write acknowledged before the cut is a write the cache holds.
    let mut acked = Vec::new();
    while let Some((errno, handle)) = c.try_reply() {
        if errno == 0 {
            acked.push(format!("read -P 0x77 {} 1m", (16 << 20) + (handle << 20)));
        }
    }
    verify_after_restart(&rig, &disk, &acked);
}
