//! Remote backing stores: `pcache attach --backing nbd+unix:///…` in front
//! of real NBD servers — `nbdkit memory`, `nbdkit file`, `qemu-nbd` of a
//! qcow2 image, and nbdkit's error and delay filters — with the server
//! killed and restarted under load, `pcache attach` killed with SIGKILL,
//! and every refusal an operator can meet. Data is checked by fio's own
//! verification, qemu-io patterns and `qemu-img compare`.
//!
//! Each test starts its servers on Unix sockets in a temporary directory
//! and stops them (nbdkit and qemu-nbd also exit with the test process).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A running NBD server on a Unix socket.
struct Server {
    child: Option<Child>,
    socket: PathBuf,
    args: Vec<String>,
    program: String,
}

impl Server {
    /// `nbdkit` with `args` (plugin, its parameters, filters).
    fn nbdkit(socket: &Path, args: &[&str]) -> Server {
        let mut s = Server {
            child: None,
            socket: socket.to_path_buf(),
            args: args.iter().map(|a| (*a).to_string()).collect(),
            program: tool("nbdkit", "nbdkit"),
        };
        s.start();
        s
    }

    /// `qemu-nbd` of a qcow2 image, export `disk`, many connections.
    fn qemu_nbd(socket: &Path, image: &Path) -> Server {
        Server::qemu_nbd_with(socket, image, &[])
    }

    /// [`Server::qemu_nbd`] with more options first.
    fn qemu_nbd_with(socket: &Path, image: &Path, extra: &[&str]) -> Server {
        let mut args = extra.to_vec();
        args.extend(["-f", "qcow2", "-x", "disk", "--persistent", "--cache=writeback", s(image)]);
        let mut s = Server {
            child: None,
            socket: socket.to_path_buf(),
            args: args.iter().map(|a| (*a).to_string()).collect(),
            program: tool("qemu-nbd", "qemu-utils"),
        };
        s.start();
        s
    }

    fn start(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = Command::new(&self.program);
        if self.program == "nbdkit" {
            cmd.args(["-f", "--exit-with-parent", "-U", s(&self.socket)]);
        } else {
            cmd.args(["-k", s(&self.socket)]);
        }
        cmd.args(&self.args).stdout(Stdio::null()).stderr(Stdio::null());
        self.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}")));
        let until = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < until, "{} did not start listening", self.program);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL: no goodbye to its clients).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.start();
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn fio(uri: &str, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(tool("fio", "fio"));
    c.args(["--name=remote", "--ioengine=nbd", &format!("--uri={uri}"), "--bs=4k", "--verify_state_save=0"]);
    c.args(args);
    run(&mut c)
}

/// Writes 24 MiB of random 4 KiB blocks through `uri` and verifies them.
fn fio_write_verify(uri: &str, extra: &[&str]) {
    let mut args =
        vec!["--rw=randwrite", "--size=24M", "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1"];
    args.extend_from_slice(extra);
    let o = fio(uri, &args);
    assert!(o.status.success() && stdout(&o).contains("err= 0"), "{}\n{}", stdout(&o), stderr(&o));
}

/// Verifies, reading `uri`, what [`fio_write_verify`] wrote.
fn fio_verify_only(uri: &str) {
    let o = fio(uri, &["--rw=randwrite", "--size=24M", "--verify=crc32c", "--verify_only", "--verify_fatal=1"]);
    assert!(o.status.success() && stdout(&o).contains("err= 0"), "{}\n{}", stdout(&o), stderr(&o));
}

fn detach(rig: &Rig, backing: &str) {
    let o = pcache(&["detach", s(&rig.dev), "--backing", backing]);
    assert_eq!(code(&o), 0, "{}\n{}", stdout(&o), stderr(&o));
}

#[test]
fn nbdkit_memory_behind_the_cache_gets_every_write_back() {
    let rig = Rig::new();
    let remote = Server::nbdkit(&rig.d.path("remote.sock"), &["memory", "64M"]);
    let a = Attach::start(&rig.dev, &[Path::new(&remote.uri(""))], &rig.socket(), &[]);
    assert!(a.stdout.iter().any(|l| l.contains("export \"disk\": nbd+unix:///?socket=")), "{:?}", a.stdout);
    fio_write_verify(&a.uri("disk"), &[]);
    assert_eq!(a.stop().0, 0);
    // The backing table stores the URI: inspect shows it, and the next
    // attach finds the cache (however the URI is spelled).
    let o = pcache(&["inspect", "--json", s(&rig.dev)]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let path = v["backings"][0]["path"].as_str().unwrap().to_string();
    assert_eq!(path, remote.uri(""), "the URI in its normal form");
    let link = rig.d.path("link.sock");
    std::os::unix::fs::symlink(&remote.socket, &link).unwrap();
    let other = format!("NBD+UNIX:///?socket={}", s(&link));
    let a = Attach::start(&rig.dev, &[Path::new(&other)], &rig.socket(), &[]);
    assert!(a.stdout.iter().any(|l| l.contains("existing cache")), "{:?}", a.stdout);
    fio_verify_only(&a.uri("disk"));
    assert_eq!(a.stop().0, 0);
    // Detach writes the dirty data back: the server alone then holds it.
    detach(&rig, &other);
    fio_verify_only(&remote.uri(""));
    let o = pcache(&["check", s(&rig.dev)]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
}

#[test]
fn a_server_killed_and_restarted_under_load_loses_nothing() {
    let rig = Rig::new();
    let back = rig.backing("remote.img", 64 << 20);
    // The server keeps writes in a cache of its own until a flush
    // (nbdkit's cache filter in writeback mode), so a SIGKILL loses every
    // write it acknowledged that no flush covered: the client must write
    // them again. Writes take 1 ms each, so that writeback is always
    // between a write and its flush when the server dies.
    let args = ["--filter=delay", "--filter=cache", "file", s(&back), "cache=writeback", "wdelay=1ms"];
    let mut remote = Server::nbdkit(&rig.d.path("remote.sock"), &args);
    let a = Attach::start(&rig.dev, &[Path::new(&remote.uri(""))], &rig.socket(), &["--backing-timeout", "60"]);
    let uri = a.uri("disk");
    // One fio run (each run writes the same blocks with the same data, so
    // a later run would hide what an earlier one lost); the server dies
    // four times while fio runs and writeback follows it.
    let load = std::thread::spawn(move || fio_write_verify(&uri, &["--iodepth=4"]));
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(800));
        remote.kill();
        std::thread::sleep(Duration::from_millis(300));
        remote.restart();
    }
    load.join().expect("fio through the cache verified while the server came and went");
    assert_eq!(a.stop().0, 0);
    detach(&rig, &remote.uri(""));
    drop(remote);
    // The file the server wrote holds every block, verified by fio itself.
    let remote = Server::nbdkit(&rig.d.path("remote2.sock"), &["file", s(&back)]);
    fio_verify_only(&remote.uri(""));
}

#[test]
fn a_read_miss_fails_with_eio_after_the_timeout_and_writes_go_on() {
    let rig = Rig::new();
    let back = rig.backing("remote.img", 64 << 20);
    let mut remote = Server::nbdkit(&rig.d.path("remote.sock"), &["file", s(&back)]);
    let a = Attach::start(&rig.dev, &[Path::new(&remote.uri(""))], &rig.socket(), &["--backing-timeout", "2"]);
    let uri = a.uri("disk");
    remote.kill();
    let t = Instant::now();
    let o = qemu_io(&uri, &["read -P 0 32m 64k"]);
    let took = t.elapsed();
    let out = format!("{}{}", stdout(&o), stderr(&o));
    assert!(out.contains("Input/output error"), "{out}");
    assert!(took < Duration::from_secs(15), "a miss with the server gone took {took:?}");
    // Writes land in pmem while the server is away, and read back.
    let o = qemu_io(&uri, &["write -P 0x3c 1m 1m", "flush", "read -P 0x3c 1m 1m"]);
    assert!(o.status.success() && !stdout(&o).contains("failed"), "{}", stdout(&o));
    remote.start();
    let o = qemu_io(&uri, &["read -P 0 32m 64k"]);
    assert!(o.status.success() && !stdout(&o).contains("failed"), "{}", stdout(&o));
    assert_eq!(a.stop().0, 0);
    detach(&rig, &remote.uri(""));
    let o = qemu_io(&remote.uri(""), &["read -P 0x3c 1m 1m", "read -P 0 0 1m"]);
    assert!(o.status.success() && !stdout(&o).contains("failed"), "{}", stdout(&o));
}

#[test]
fn a_failing_and_slow_server_loses_nothing() {
    let rig = Rig::new();
    let back = rig.backing("remote.img", 64 << 20);
    // One request in ten fails (reads, writes, flushes alike), and every
    // request waits 2 ms.
    let args = [
        "--filter=error",
        "--filter=delay",
        "file",
        s(&back),
        "error=EIO",
        "error-rate=10%",
        "rdelay=2ms",
        "wdelay=2ms",
    ];
    let remote = Server::nbdkit(&rig.d.path("remote.sock"), &args);
    // Reads that miss go to the server: read-caching off so every pass of
    // fio's verification reads the server again.
    let extra = ["--backing-timeout", "60", "--no-read-cache"];
    let a = Attach::start(&rig.dev, &[Path::new(&remote.uri(""))], &rig.socket(), &extra);
    let o = qemu_io(&a.uri("disk"), &["read -P 0 40m 8m"]);
    assert!(o.status.success() && !stdout(&o).contains("failed"), "{}", stdout(&o));
    fio_write_verify(&a.uri("disk"), &[]);
    assert_eq!(a.stop().0, 0);
    detach(&rig, &remote.uri(""));
    drop(remote);
    let plain = Server::nbdkit(&rig.d.path("plain.sock"), &["file", s(&back)]);
    fio_verify_only(&plain.uri(""));
}

#[test]
fn qemu_nbd_of_a_qcow2_image() {
    let rig = Rig::new();
    let image = rig.d.path("disk.qcow2");
    ok(Command::new(tool("qemu-img", "qemu-utils")).args(["create", "-q", "-f", "qcow2", s(&image), "64M"]));
    let remote = Server::qemu_nbd(&rig.d.path("remote.sock"), &image);
    let a = Attach::start(&rig.dev, &[Path::new(&remote.uri("disk"))], &rig.socket(), &[]);
    let o = qemu_io(&a.uri("disk"), &["write -P 0x5e 0 4m", "write -P 0xe5 10000 5000", "flush"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(a.stop().0, 0);
    detach(&rig, &remote.uri("disk"));
    // The image the server wrote, compared with the same writes made to a
    // plain raw file: identical.
    drop(remote);
    let raw = rig.backing("expected.img", 64 << 20);
    let o = qemu_io(s(&raw), &["write -P 0x5e 0 4m", "write -P 0xe5 10000 5000"]);
    assert!(o.status.success(), "{}", stderr(&o));
    ok(Command::new("qemu-img").args(["compare", "-q", "-f", "qcow2", "-F", "raw", s(&image), s(&raw)]));
}

#[test]
fn kill_9_of_attach_with_a_remote_backing_keeps_what_was_flushed() {
    let rig = Rig::new();
    let remote = Server::nbdkit(&rig.d.path("remote.sock"), &["memory", "64M"]);
    let backing = remote.uri("");
    // Only FLUSH and FUA make keys durable, and the server is slowed so
    // that writeback is still behind when the process dies.
    let slow = ["--kset-flush-ms", "3600000", "--writeback-rate", "1M"];
    let a = Attach::start(&rig.dev, &[Path::new(&backing)], &rig.socket(), &slow);
    let o = qemu_io(&a.uri("disk"), &["write -P 0x77 0 8m", "flush", "write -f -P 0x99 16m 64k"]);
    assert!(o.status.success(), "{}", stderr(&o));
    a.kill9();
    let a = Attach::start(&rig.dev, &[Path::new(&backing)], &rig.socket(), &[]);
    let o = qemu_io(&a.uri("disk"), &["read -P 0x77 0 8m", "read -P 0x99 16m 64k"]);
    assert!(o.status.success() && !stdout(&o).contains("failed"), "{}", stdout(&o));
    assert_eq!(a.stop().0, 0);
    detach(&rig, &backing);
    let o = qemu_io(&backing, &["read -P 0x77 0 8m", "read -P 0x99 16m 64k"]);
    assert!(o.status.success() && !stdout(&o).contains("failed"), "{}", stdout(&o));
}

/// Every mistake with a remote backing gets a refusal that names it, and
/// leaves the cache as it was.
#[test]
fn remote_backings_refuse_what_is_wrong() {
    let rig = Rig::new();
    let sock = rig.d.path("remote.sock");
    let mut remote = Server::nbdkit(&sock, &["memory", "64M"]);
    let refuse = |backings: &[&str], want: &str| {
        let mut cmd = attach_cmd(&rig.dev, &[], &format!("unix:{}", s(&rig.socket())), &[]);
        for b in backings {
            cmd.args(["--backing", b]);
        }
        let o = run_for(&mut cmd, 60).expect("attach refused, not hung");
        let err = stderr(&o);
        assert_eq!(code(&o), 1, "{backings:?}: {err}");
        assert!(err.contains(want), "{backings:?}: {err}");
    };
    let link = rig.d.path("link.sock");
    std::os::unix::fs::symlink(&sock, &link).unwrap();
    let uri = remote.uri("");
    let by_link = format!("nbd+unix:///?socket={}", s(&link));
    refuse(&[&uri, &by_link], "are the same backing device");
    // A second attach (another pmem device) in front of the same export,
    // under another spelling, while the first runs.
    let other_dev = rig.d.path("other.img");
    assert_eq!(code(&pcache(&["format", s(&other_dev), "--size", "1G"])), 0);
    let first = Attach::start(&rig.dev, &[Path::new(&uri)], &rig.socket(), &[]);
    let mut second = attach_cmd(&other_dev, &[Path::new(&by_link)], &format!("unix:{}", s(&rig.d.path("2.sock"))), &[]);
    let o = run_for(&mut second, 60).expect("refused, not hung");
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("in use by another pcache on this host"), "{}", stderr(&o));
    assert_eq!(first.stop().0, 0);
    refuse(&["nbd+unix:///nope?socket=/nonexistent/s"], "is the NBD server running?");
    refuse(&[&format!("nbds+unix:///?socket={}", s(&sock))], "nbds needs ?tls-certificates=DIR");
    refuse(&["nbd+unix:///disk"], "needs ?socket=PATH");
    refuse(&["nbd://127.0.0.1:1/x"], "cannot connect");
    let long = format!("nbd+unix:///{}?socket={}", "x".repeat(250), s(&sock));
    refuse(&[&long], "a backing entry holds at most 255");
    // A cache made for this export, then the export changes size.
    let a = Attach::start(&rig.dev, &[Path::new(&uri)], &rig.socket(), &[]);
    assert!(qemu_io(&a.uri("disk"), &["write -P 1 0 1m", "flush"]).status.success());
    assert_eq!(a.stop().0, 0);
    remote.args = vec!["memory".into(), "128M".into()];
    remote.restart();
    refuse(&[&uri], "but its cache was made for 67108864 bytes");
    remote.args = vec!["-r".into(), "memory".into(), "64M".into()];
    remote.restart();
    refuse(&[&uri], "read-only");
    let o = pcache(&["check", s(&rig.dev)]);
    assert_eq!(code(&o), 0, "the refusals changed nothing: {}", stdout(&o));
}

/// A server that takes only whole 4 KiB blocks and at most 64 KiB a
/// request, refusing anything else: unaligned writes through the cache are
/// read, patched and written whole, large ones split.
#[test]
fn the_servers_block_sizes_are_honoured() {
    let rig = Rig::new();
    let args = [
        "--filter=blocksize-policy",
        "memory",
        "64M",
        "blocksize-minimum=4096",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",
    ];
    let remote = Server::nbdkit(&rig.d.path("remote.sock"), &args);
    let a = Attach::start(&rig.dev, &[Path::new(&remote.uri(""))], &rig.socket(), &[]);
    let writes = ["write -P 0x11 0 1m", "write -P 0xab 1000 3000", "write -P 0xcd 5000 10", "write -P 0x77 2m 3m"];
    let mut cmds: Vec<&str> = writes.to_vec();
    cmds.push("flush");
    let o = qemu_io(&a.uri("disk"), &cmds);
    assert!(o.status.success() && !stdout(&o).contains("failed"), "{}", stdout(&o));
    assert_eq!(a.stop().0, 0);
    detach(&rig, &remote.uri(""));
    let reads = [
        "read -P 0x11 0 1000",
        "read -P 0xab 1000 3000",
        "read -P 0x11 4000 1000",
        "read -P 0xcd 5000 10",
        "read -P 0x11 5010 1043566",
        "read -P 0x77 2m 3m",
        "read -P 0 5m 1m",
    ];
    let o = qemu_io(&remote.uri(""), &reads);
    assert!(o.status.success() && !stdout(&o).contains("failed"), "{}\n{}", stdout(&o), stderr(&o));
}

/// A CA, a server certificate for `localhost` and 127.0.0.1, and a client
/// certificate, in the layout nbdkit, qemu and libnbd read (`ca-cert.pem`,
/// `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
/// `client-key.pem`), made with openssl.
fn pki(dir: &Path) {
    let openssl = tool("openssl", "openssl");
    std::fs::create_dir_all(dir).unwrap();
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = Command::new(&openssl);
    ca.args(["req", "-x509"]).args(ec).args(["-keyout", &p("ca-key.pem"), "-out", &p("ca-cert.pem")]);
    ca.args(["-days", "2", "-subj", "/CN=pcache test CA", "-addext", "basicConstraints=critical,CA:TRUE"]);
    ca.args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    ok(&mut ca);
    for (who, ext) in [
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        let csr = p(&format!("{who}.csr"));
        let mut req = Command::new(&openssl);
        req.arg("req").args(ec).args(["-keyout", &p(&format!("{who}-key.pem")), "-out", &csr]);
        ok(req.args(["-subj", &format!("/CN={who}")]));
        let extfile = p(&format!("{who}.ext"));
        std::fs::write(&extfile, format!("{ext}basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n")).unwrap();
        let mut sign = Command::new(&openssl);
        sign.args(["x509", "-req", "-in", &csr, "-CA", &p("ca-cert.pem"), "-CAkey", &p("ca-key.pem")]);
        sign.args(["-CAcreateserial", "-days", "2", "-extfile", &extfile]);
        ok(sign.args(["-out", &p(&format!("{who}-cert.pem"))]));
    }
}

/// `qemu-io` over TLS with the client certificates in `pki`.
fn qemu_io_tls(pki: &Path, socket: &Path, export: &str, cmds: &[&str]) -> std::process::Output {
    let mut c = Command::new(tool("qemu-io", "qemu-utils"));
    c.args(["--object", &format!("tls-creds-x509,id=tls0,dir={},endpoint=client", s(pki))]);
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export={export},tls-creds=tls0,tls-hostname=localhost",
        s(socket)
    );
    c.args(["--image-opts", &opts]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(&mut c)
}

fn clean(o: &std::process::Output) -> bool {
    o.status.success() && !stdout(o).contains("failed") && !stdout(o).contains("error")
}

/// The server side: attach requires TLS of every client and verifies
/// their certificates; libnbd's and qemu's clients get in, a client without
/// TLS or without a certificate does not.
#[test]
fn attach_serves_tls_only_to_verified_clients() {
    let rig = Rig::new();
    let dir = rig.d.path("pki");
    pki(&dir);
    let disk = rig.backing("disk.img", 64 << 20);
    let tls = [
        "--tls-cert",
        &format!("{}/server-cert.pem", s(&dir)),
        "--tls-key",
        &format!("{}/server-key.pem", s(&dir)),
        "--tls-verify-peer",
        &format!("{}/ca-cert.pem", s(&dir)),
    ];
    let log = rig.d.path("attach.log");
    let a = Attach::start_logged(&rig.dev, &[&disk], &rig.socket(), &tls, &log);
    let o = qemu_io_tls(&dir, &rig.socket(), "disk.img", &["write -P 0x3a 0 4m", "flush", "read -P 0x3a 0 4m"]);
    assert!(clean(&o), "{}\n{}", stdout(&o), stderr(&o));
    let uri = format!("nbds+unix:///disk.img?socket={}&tls-certificates={}", s(&rig.socket()), s(&dir));
    let o = ok(Command::new(tool("nbdinfo", "libnbd-bin")).arg(&uri));
    assert!(stdout(&o).contains("with TLS"), "{}", stdout(&o));
    // Without TLS: refused.
    let o = run(Command::new("nbdinfo").arg(a.uri("disk.img")));
    assert!(!o.status.success(), "a client without TLS got in: {}", stdout(&o));
    // With TLS but no client certificate: refused.
    let bare = rig.d.path("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(dir.join("ca-cert.pem"), bare.join("ca-cert.pem")).unwrap();
    let o = run(Command::new("nbdinfo").arg(uri.replace(s(&dir), s(&bare))));
    assert!(!o.status.success(), "a client without a certificate got in: {}", stdout(&o));
    assert_eq!(a.stop().0, 0);
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(log.matches("tls=true").count(), 2, "{log}");
    assert!(!log.contains("tls=false"), "{log}");
}

/// The client side: a remote backing over TLS — nbdkit and qemu-nbd each
/// requiring TLS and a client certificate — written through the cache and
/// back, then read over TLS from the server alone.
#[test]
fn remote_backings_over_tls() {
    let rig = Rig::new();
    let dir = rig.d.path("pki");
    pki(&dir);
    let certs = format!("--tls-certificates={}", s(&dir));
    let remote =
        Server::nbdkit(&rig.d.path("remote.sock"), &["--tls=require", &certs, "--tls-verify-peer", "memory", "64M"]);
    let nbds = format!("nbds+unix:///?socket={}&tls-certificates={}", s(&remote.socket), s(&dir));
    let a = Attach::start(&rig.dev, &[Path::new(&nbds)], &rig.socket(), &[]);
    let o = qemu_io(&a.uri("disk"), &["write -P 0x4b 0 8m", "write -P 0xb4 20m 100k", "flush"]);
    assert!(clean(&o), "{}", stdout(&o));
    assert_eq!(a.stop().0, 0);
    detach(&rig, &nbds);
    let o = qemu_io_tls(&dir, &remote.socket, "", &["read -P 0x4b 0 8m", "read -P 0xb4 20m 100k", "read -P 0 9m 1m"]);
    assert!(clean(&o), "{}\n{}", stdout(&o), stderr(&o));
    // The same server without TLS in the URI, and TLS asked of a server
    // without it: each refused, with what to do.
    let refused = |backing: &str, want: &str| {
        let mut cmd = attach_cmd(&rig.dev, &[Path::new(backing)], &format!("unix:{}", s(&rig.socket())), &[]);
        let o = run_for(&mut cmd, 60).expect("refused, not hung");
        assert_eq!(code(&o), 1);
        assert!(stderr(&o).contains(want), "{}", stderr(&o));
    };
    refused(&remote.uri(""), "requires TLS: use an nbds:// URI");
    let plain = Server::nbdkit(&rig.d.path("plain.sock"), &["memory", "64M"]);
    refused(&format!("nbds+unix:///?socket={}&tls-certificates={}", s(&plain.socket), s(&dir)), "does not offer TLS");
    // No client certificate for a server that verifies clients; a name the
    // server's certificate does not carry.
    let bare = rig.d.path("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(dir.join("ca-cert.pem"), bare.join("ca-cert.pem")).unwrap();
    refused(&nbds.replace(s(&dir), s(&bare)), "needs client-cert.pem and client-key.pem");
    refused(&format!("{nbds}&tls-hostname=store.example"), "not valid for name \"store.example\"");
    // qemu-nbd of a qcow2 image, with TLS and client certificates.
    let image = rig.d.path("disk.qcow2");
    ok(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", s(&image), "64M"]));
    let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=server", s(&dir));
    let q = Server::qemu_nbd_with(&rig.d.path("q.sock"), &image, &["--object", &creds, "--tls-creds", "tls0"]);
    let qs = format!("nbds+unix:///disk?socket={}&tls-certificates={}", s(&q.socket), s(&dir));
    let a = Attach::start(&rig.dev, &[Path::new(&qs)], &rig.socket(), &[]);
    let o = qemu_io(&a.uri("disk"), &["write -P 0x6c 1m 3m", "flush"]);
    assert!(clean(&o), "{}", stdout(&o));
    assert_eq!(a.stop().0, 0);
    detach(&rig, &qs);
    drop(q);
    let o = qemu_io_qcow2(&image, &["read -P 0x6c 1m 3m", "read -P 0 0 1m"]);
    assert!(clean(&o), "{}", stdout(&o));
}

fn qemu_io_qcow2(image: &Path, cmds: &[&str]) -> std::process::Output {
    let mut c = Command::new(tool("qemu-io", "qemu-utils"));
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(c.arg(image))
}

fn map(uri: &str) -> Vec<(u64, u64, u32)> {
    let o = ok(Command::new(tool("nbdinfo", "libnbd-bin")).args(["--map", uri]));
    stdout(&o)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect()
}

/// Block status through the cache of a remote backing: cached data, and
/// between it the remote server's own allocation; a server without block
/// status makes the rest data.
#[test]
fn block_status_of_a_remote_backing_asks_its_server() {
    const M: u64 = 1 << 20;
    let rig = Rig::new();
    let back = rig.backing("remote.img", 64 * M);
    let o = qemu_io(s(&back), &["write -P 0x42 5m 3m"]);
    assert!(o.status.success());
    let remote = Server::nbdkit(&rig.d.path("remote.sock"), &["file", s(&back)]);
    let a = Attach::start(&rig.dev, &[Path::new(&remote.uri(""))], &rig.socket(), &[]);
    assert!(qemu_io(&a.uri("disk"), &["write -P 1 20m 1m"]).status.success());
    let want = vec![(0, 5 * M, 3), (5 * M, 3 * M, 0), (8 * M, 12 * M, 3), (20 * M, M, 0), (21 * M, 43 * M, 3)];
    assert_eq!(map(&a.uri("disk")), want);
    assert_eq!(a.stop().0, 0);
    drop(remote);
    let blind = Server::nbdkit(&rig.d.path("blind.sock"), &["--filter=noextents", "file", s(&back)]);
    let a = Attach::start(&rig.dev, &[Path::new(&blind.uri(""))], &rig.socket(), &[]);
    assert_eq!(map(&a.uri("disk")), vec![(0, 64 * M, 0)]);
    assert_eq!(a.stop().0, 0);
}

/// A discard through the cache is passed on: a local backing file gets a
/// hole punched, a remote export an NBD TRIM (its block status shows it).
#[test]
fn discards_reach_the_backing() {
    use std::os::unix::fs::MetadataExt;
    const M: u64 = 1 << 20;
    let rig = Rig::new();
    let disk = rig.backing_filled("disk.img", 16 * M, 0x77);
    let blocks = std::fs::metadata(&disk).unwrap().blocks();
    let a = Attach::start(&rig.dev, &[&disk], &rig.socket(), &[]);
    assert!(qemu_io(&a.uri("disk.img"), &["discard 4m 8m"]).status.success());
    let after = std::fs::metadata(&disk).unwrap().blocks();
    assert!(after * 512 <= blocks * 512 - 7 * M, "8 MiB punched out: {blocks} -> {after} blocks");
    assert_eq!(map(&a.uri("disk.img")), vec![(0, 4 * M, 0), (4 * M, 8 * M, 3), (12 * M, 4 * M, 0)]);
    assert_eq!(a.stop().0, 0);
    let remote = Server::nbdkit(&rig.d.path("remote.sock"), &["memory", "32M"]);
    assert!(qemu_io(&remote.uri(""), &["write -P 9 0 32m"]).status.success());
    let a = Attach::start(&rig.dev, &[Path::new(&remote.uri(""))], &rig.socket(), &[]);
    assert!(qemu_io(&a.uri("disk"), &["discard 8m 16m"]).status.success());
    assert_eq!(a.stop().0, 0);
    assert_eq!(map(&remote.uri("")), vec![(0, 8 * M, 0), (8 * M, 16 * M, 3), (24 * M, 8 * M, 0)]);
}
