//! Running a cache for months: `pcache status` and `pcache set` over the
//! control socket while fio writes, and `--metrics` scraped and parsed.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn json(o: &std::process::Output) -> Value {
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| panic!("{e}: {}{}", stdout(o), stderr(o)))
}

/// An HTTP GET of `path` from `addr`: the status code and the body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let code = reply.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// The samples of an OpenMetrics text: `name{labels}` to value. Every line
/// is a comment or a well-formed sample, and the text ends with `# EOF`.
fn samples(text: &str) -> Vec<(String, f64)> {
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l:?}"));
            assert!(k.starts_with("pcache_") && k.contains("{export=\""), "{l:?}");
            (k.to_string(), v.parse::<f64>().unwrap_or_else(|_| panic!("not a value: {l:?}")))
        })
        .collect()
}

fn value(samples: &[(String, f64)], key: &str) -> f64 {
    samples.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no {key} in {samples:?}")).1
}

#[test]
fn status_set_and_metrics_while_fio_writes() {
    let r = Rig::new();
    let disk = r.backing("disk.img", 256 * MIB);
    let ctl = r.d.path("c.ctl");
    let mut a = Attach::start(&r.dev, &[&disk], &r.socket(), &["--control", s(&ctl), "--metrics", "tcp:127.0.0.1:0"]);
    let line = a.wait_for("metrics at http://");
    let addr = line.trim_start_matches("metrics at http://").trim_end_matches("/metrics").to_string();
    assert_eq!(std::fs::metadata(&ctl).unwrap().permissions().mode() & 0o777, 0o600);
    let fio = Command::new(tool("fio", "fio"))
        .args(["--name=w", "--ioengine=nbd", &format!("--uri={}", a.uri("disk.img"))])
        .args(["--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=64M", "--time_based", "--runtime=4"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(800));
    // While it writes: status, and two settings.
    let v = json(&pcache(&["status", "--control", s(&ctl), "--json"]));
    let e = &v["exports"][0];
    assert_eq!(e["name"], "disk.img");
    assert!(e["ksets_closed"].as_u64().unwrap() > 0 || e["dirty_bytes"].as_u64().unwrap() > 0, "{e}");
    let o = pcache(&["set", "--control", s(&ctl), "disk.img", "gc-percent", "40"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = pcache(&["set", "--control", s(&ctl), "disk.img", "writeback-rate", "50M"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    for (args, want) in [
        (vec!["nope", "gc-percent", "40"], "no export named"),
        (vec!["disk.img", "gc-percent", "95"], "out of range"),
        (vec!["disk.img", "writeback-rate", "0"], "stop writeback for good"),
        (vec!["disk.img", "writeback-rate", "fast"], "writeback-rate"),
    ] {
        let o = pcache(&[&["set", "--control", s(&ctl)][..], &args].concat());
        assert_eq!(code(&o), 1, "{args:?}");
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
    let v = json(&pcache(&["status", "--control", s(&ctl), "--json"]));
    assert_eq!(v["exports"][0]["gc"]["percent"], 40);
    assert_eq!(v["exports"][0]["writeback"]["rate_limit"], 50 * MIB);
    // The text form, found from the device by another spelling of it.
    let link = r.d.path("pmem-link");
    std::os::unix::fs::symlink(&r.dev, &link).unwrap();
    let o = pcache(&["status", s(&ctl)]);
    assert_ne!(code(&o), 0, "a socket is not a device name");
    let o = pcache(&["status", "--control", s(&ctl)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("export disk.img") && stdout(&o).contains("writeback"), "{}", stdout(&o));
    // Metrics, scraped and parsed.
    let (status, body) = http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    let m = samples(&body);
    assert_eq!(value(&m, "pcache_gc_percent{export=\"disk.img\"}"), 40.0);
    assert_eq!(value(&m, "pcache_writeback_rate_limit_bytes{export=\"disk.img\"}"), (50 * MIB) as f64);
    assert_eq!(value(&m, "pcache_healthy{export=\"disk.img\"}"), 1.0);
    assert!(value(&m, "pcache_ksets_closed_total{export=\"disk.img\"}") > 0.0);
    assert_eq!(http_get(&addr, "/").0, 404);
    let out = fio.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Counters only grow.
    let later = samples(&http_get(&addr, "/metrics").1);
    for (k, v) in m.iter().filter(|(k, _)| k.contains("_total{")) {
        assert!(value(&later, k) >= *v, "{k} went back");
    }
    let (rc, _) = a.stop();
    assert_eq!(rc, 0);
    assert!(!ctl.exists(), "the control socket is removed at the stop");
    let o = pcache(&["status", "--control", s(&ctl)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    // The gc percent was persisted in the cache's record.
    let v = json(&pcache(&["inspect", "--json", s(&r.dev)]));
    assert_eq!(v["backings"][0]["cache"]["gc_percent"], 40);
}

#[test]
fn one_control_socket_per_attach() {
    let r = Rig::new();
    let disk = r.backing("disk.img", 64 * MIB);
    let ctl = r.d.path("c.ctl");
    let a = Attach::start(&r.dev, &[&disk], &r.socket(), &["--control", s(&ctl)]);
    // Another attach (of another device) asking for the same socket is
    // refused before it creates anything.
    let r2 = Rig::new();
    let disk2 = r2.backing("disk2.img", 64 * MIB);
    let o = run(&mut attach_cmd(&r2.dev, &[&disk2], &format!("unix:{}", s(&r2.socket())), &["--control", s(&ctl)]));
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("in use"), "{}", stderr(&o));
    assert!(!r2.socket().exists(), "no NBD socket left behind");
    let v = json(&pcache(&["inspect", "--json", s(&r2.dev)]));
    assert_eq!(v["backings"].as_array().unwrap().len(), 0, "no cache created");
    // The default socket is found from the device, whatever its spelling.
    let b = Attach::start(&r2.dev, &[&disk2], &r2.socket(), &[]);
    let link = r2.d.path("pmem-link");
    std::os::unix::fs::symlink(&r2.dev, &link).unwrap();
    let o = pcache(&["status", s(&link)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("export disk2.img"), "{}", stdout(&o));
    assert_eq!(b.stop().0, 0);
    assert_eq!(a.stop().0, 0);
}

/// NBD without TLS on an address other hosts can reach is refused unless
/// the operator says --insecure; loopback and Unix sockets need nothing.
#[test]
fn listening_beyond_loopback_needs_insecure() {
    let rig = Rig::new();
    let disk = rig.backing("disk.img", 16 << 20);
    let free = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let listen = format!("tcp:0.0.0.0:{port}");
    let o = run_for(&mut attach_cmd(&rig.dev, &[&disk], &listen, &[]), 30).expect("refused at once");
    assert_eq!(code(&o), 1);
    let err = stderr(&o);
    assert!(err.contains("without TLS") && err.contains("--insecure") && err.contains("tcp:127.0.0.1:"), "{err}");
    let o = pcache(&["inspect", "--json", s(&rig.dev)]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["backings"].as_array().map(Vec::len), Some(0), "the refusal created no cache");
    let a = Attach::spawn(attach_cmd(&rig.dev, &[&disk], &listen, &["--insecure"]), &rig.socket());
    let uri = format!("nbd://127.0.0.1:{port}/disk.img");
    let o = qemu_io(&uri, &["write -P 9 0 4k", "read -P 9 0 4k"]);
    assert!(o.status.success() && !stdout(&o).contains("failed"), "{}", stdout(&o));
    assert_eq!(a.stop().0, 0);
}

/// WRITE_ZEROES over NBD where the cache holds nothing costs no pmem: the
/// backing file is zeroed in place (status and metrics count it), and where
/// the cache holds data the zeroes go through the cache; both read back as
/// zeroes, before and after a restart.
#[test]
fn zeroes_over_nbd_cost_no_pmem_where_nothing_is_cached() {
    let r = Rig::new();
    let disk = r.backing_filled("disk.img", 64 << 20, 0x55);
    let ctl = r.d.path("ctl");
    let a = Attach::start(&r.dev, &[&disk], &r.socket(), &["--control", s(&ctl)]);
    let uri = a.uri("disk.img");
    let o = qemu_io(&uri, &["write -P 0x66 40m 1m", "write -z 0 32m", "write -z 40m 1m", "flush"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v = json(&pcache(&["status", "--control", s(&ctl), "--json"]));
    let e = &v["exports"][0];
    assert_eq!(e["zeroed_on_backing_bytes"], 32 << 20, "{e}");
    assert!(e["cached_bytes"].as_u64().unwrap() <= 2 << 20, "only the 1 MiB write and its zeroes: {e}");
    let o = qemu_io(&uri, &["read -P 0 0 32m", "read -P 0 40m 1m", "read -P 0x55 32m 8m"]);
    assert!(o.status.success() && !stdout(&o).contains("failed"), "{}", stdout(&o));
    let back = std::fs::read(&disk).unwrap();
    assert!(back[..32 << 20].iter().all(|&b| b == 0), "the backing file holds the zeroes");
    assert_eq!(a.stop().0, 0);
    let a = Attach::start(&r.dev, &[&disk], &r.socket(), &[]);
    let o = qemu_io(&a.uri("disk.img"), &["read -P 0 0 32m", "read -P 0 40m 1m", "read -P 0x55 41m 1m"]);
    assert!(o.status.success() && !stdout(&o).contains("failed"), "{}", stdout(&o));
    assert_eq!(a.stop().0, 0);
}
