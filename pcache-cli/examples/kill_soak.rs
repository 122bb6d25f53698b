//! Kill soak: `pcache attach` under load is killed with SIGKILL at random
//! moments, restarted, and every write that was flushed before the kill is
//! read back. Run it through `scripts/kill-soak.sh`.
//!
//! A writer tags each 4 KiB block with a sequence number and flushes every
//! 16 writes; at a random moment the server is killed. After the restart,
//! every block must hold the write it had at the last completed flush or a
//! later one — a block holding anything older, or garbage, is a lost write.
//! Meanwhile `fio --ioengine=nbd` (if given) hammers the other half of the
//! export with random reads, writes and flushes, reading back and checking
//! every 16 blocks it writes as it goes (`verify_backlog`: it is killed long
//! before a verify phase at the end would start). A verify failure in its
//! log, or fio ending while the server runs (a failed request), fails the
//! soak.

#![deny(unsafe_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pcache_cli::nbd::*;
use rustix::process::{Pid, Signal, kill_process};
use zerocopy::IntoBytes;
use zerocopy::network_endian::U16;

const BLOCK: usize = 4096;
/// The writer's blocks: the first 128 MiB of the export.
const BLOCKS: u64 = 32 * 1024;
const MAGIC: u64 = 0x736f_616b_7465_7374;
/// Writes between two flushes.
const FLUSH_EVERY: usize = 16;

struct Client {
    s: UnixStream,
    handle: u64,
}

impl Client {
    fn connect(socket: &Path, export: &str) -> std::io::Result<Client> {
        let mut s = UnixStream::connect(socket)?;
        read_header::<ServerHello, _>(&mut s)?;
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
        // NBD_OPT_GO: the name, and no info types asked for.
        let go = [&(export.len() as u32).to_be_bytes()[..], export.as_bytes(), U16::new(0).as_bytes()].concat();
        s.write_all(&encode_option(OPT_GO, &go))?;
        loop {
            let reply: OptionReplyHeader = read_header(&mut s)?;
            let mut payload = vec![0u8; reply.length.get() as usize];
            s.read_exact(&mut payload)?;
            match reply.kind.get() {
                REP_ACK => return Ok(Client { s, handle: 0 }),
                REP_INFO => {}
                other => return Err(std::io::Error::other(format!("option reply {other:#x}"))),
            }
        }
    }

    fn request(&mut self, kind: u16, off: u64, len: u32, payload: &[u8], reply: &mut [u8]) -> std::io::Result<()> {
        self.handle += 1;
        self.s.write_all(&[&encode_request(kind, 0, self.handle, off, len)[..], payload].concat())?;
        let simple: SimpleReply = read_header(&mut self.s)?;
        match simple.error.get() {
            0 => self.s.read_exact(reply),
            err => Err(std::io::Error::other(format!("NBD error {err}"))),
        }
    }

    fn read_block(&mut self, block: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.request(CMD_READ, block * BLOCK as u64, BLOCK as u32, &[], buf)
    }
}

fn block_data(block: u64, seq: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    v[..8].copy_from_slice(&MAGIC.to_le_bytes());
    v[8..16].copy_from_slice(&seq.to_le_bytes());
    v[16..24].copy_from_slice(&block.to_le_bytes());
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ block;
    for b in &mut v[24..] {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *b = (x >> 56) as u8;
    }
    v
}

/// The sequence number a block holds (0: never written), or `None` for garbage.
fn block_seq(block: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let seq = u64::from_le_bytes(data[8..16].try_into().ok()?);
    (block_data(block, seq) == data).then_some(seq)
}

struct Server {
    child: Child,
}

impl Server {
    fn start(pcache: &Path, dir: &Path) -> Server {
        let socket = dir.join("soak.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(pcache)
            .arg("attach")
            .arg(dir.join("pmem.img"))
            .arg("--backing")
            .arg(dir.join("disk.img"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .env("PCACHE_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .expect("start pcache attach");
        let t = Instant::now();
        while UnixStream::connect(&socket).is_err() {
            assert!(t.elapsed() < Duration::from_secs(30), "pcache attach did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `signal` to process `pid`, one this program started.
fn send_signal(pid: u32, signal: Signal) {
    let pid = i32::try_from(pid).ok().and_then(Pid::from_raw).expect("a child's pid");
    if let Err(e) = kill_process(pid, signal) {
        eprintln!("cannot signal pcache attach ({pid:?}): {e}");
    }
}

/// Whether fio's log reports a verify failure (`bad magic header`, a CRC
/// mismatch, ...; fio's errno for them is EILSEQ, 84).
fn fio_verify_failed(log: &str) -> bool {
    ["verify: bad", "verify failed", "verify type mismatch", "err=84"].iter().any(|m| log.contains(m))
}

/// fio hammering the second half of the export, reading back as it goes.
fn start_fio(socket: &Path, dir: &Path) -> Child {
    Command::new("fio")
        .args(["--name=load", "--ioengine=nbd", "--rw=randrw", "--bs=4k", "--iodepth=8"])
        .arg(format!("--uri=nbd+unix:///disk.img?socket={}", socket.display()))
        .args(["--offset=128M", "--size=128M", "--fsync=32", "--verify=crc32c", "--verify_state_save=0"])
        .args(["--do_verify=1", "--verify_backlog=16", "--verify_fatal=1"])
        .args(["--time_based", "--runtime=60"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("fio.log")).expect("fio.log"))
        .spawn()
        .expect("start fio")
}

/// What the soak knows and has counted across rounds.
#[derive(Default)]
struct Soak {
    /// Per block: the write it holds at the last flush.
    flushed: HashMap<u64, u64>,
    /// Per block: the last write acknowledged.
    acked: HashMap<u64, u64>,
    verified: u64,
    lost: u64,
    unflushed_lost: u64,
    writes: u64,
    seq: u64,
    /// Writes up to this sequence number were verified in an earlier round.
    checked_up_to: u64,
    rng: u64,
    fio_failures: u64,
}

impl Soak {
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.rng
    }

    /// After a restart: every block written must hold its last flushed
    /// write or a later acknowledged one.
    fn verify_after_kill(&mut self, c: &mut Client, round: u64) {
        let mut buf = vec![0u8; BLOCK];
        let mut now = Vec::with_capacity(self.acked.len());
        for (&block, &last) in &self.acked {
            c.read_block(block, &mut buf).expect("verify read");
            let got = block_seq(block, &buf);
            let want = self.flushed.get(&block).copied().unwrap_or(0);
            match got {
                Some(g) if g >= want && g <= last => {
                    self.verified += u64::from(want > self.checked_up_to);
                    self.unflushed_lost += u64::from(g < last);
                }
                other => {
                    self.lost += 1;
                    eprintln!("round {round}: block {block} holds {other:?}, flushed {want}, acknowledged {last}");
                }
            }
            now.push((block, got.unwrap_or(0)));
        }
        self.checked_up_to = self.seq;
        // What survived is now both flushed and acknowledged.
        for (block, got) in now {
            self.flushed.insert(block, got);
            self.acked.insert(block, got);
        }
    }

    /// Writes and flushes until the server dies (`killed` is set just
    /// before); the status of fio if it ended while the server still ran.
    fn write_until_killed(
        &mut self,
        c: &mut Client,
        fio: &mut Option<Child>,
        killed: &AtomicBool,
    ) -> Option<ExitStatus> {
        let mut pending: Vec<(u64, u64)> = Vec::new();
        let mut fio_ended = None;
        loop {
            let block = (self.next_random() >> 20) % BLOCKS;
            self.seq += 1;
            let data = block_data(block, self.seq);
            if c.request(CMD_WRITE, block * BLOCK as u64, BLOCK as u32, &data, &mut []).is_err() {
                return fio_ended;
            }
            self.writes += 1;
            self.acked.insert(block, self.seq);
            pending.push((block, self.seq));
            if pending.len() < FLUSH_EVERY {
                continue;
            }
            if c.request(CMD_FLUSH, 0, 0, &[], &mut []).is_err() {
                return fio_ended;
            }
            self.flushed.extend(pending.drain(..));
            // fio ending while the server still runs is a failure of its
            // own (it runs for 60 s; the kill comes within 2 s). Its
            // status is read before the flag, so a kill cannot be blamed.
            let ended = fio.as_mut().and_then(|f| f.try_wait().ok().flatten());
            if let Some(status) = ended.filter(|_| !killed.load(Ordering::SeqCst)) {
                fio_ended = Some(status);
                *fio = None;
            }
        }
    }

    /// One round: restart, verify, then write under fio's load until a
    /// kill at a random moment.
    fn round(&mut self, round: u64, pcache: &Path, dir: &Path, with_fio: bool) {
        let socket = dir.join("soak.sock");
        let mut server = Server::start(pcache, dir);
        let mut c = Client::connect(&socket, "disk.img").expect("connect");
        self.verify_after_kill(&mut c, round);
        let mut fio = with_fio.then(|| start_fio(&socket, dir));
        let kill_after = Duration::from_millis(300 + (self.next_random() >> 33) % 1700);
        let pid = server.child.id();
        let killed = Arc::new(AtomicBool::new(false));
        let killing = killed.clone();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(kill_after);
            killing.store(true, Ordering::SeqCst);
            send_signal(pid, Signal::KILL);
        });
        let fio_ended = self.write_until_killed(&mut c, &mut fio, &killed);
        let mut fio_ok = true;
        if let Some(status) = fio_ended {
            fio_ok = false;
            let log = std::fs::read_to_string(dir.join("fio.log")).unwrap_or_default();
            eprintln!("round {round}: fio ended early ({status}) while the server ran:\n{log}");
        }
        let _ = killer.join();
        server.kill9();
        if let Some(mut f) = fio {
            let _ = f.kill();
            let _ = f.wait();
            // A read that fails because the server died is an I/O error, not
            // a verify failure: any verify failure is data the server
            // returned wrong while it ran, even one fio logged just before
            // the kill.
            let log = std::fs::read_to_string(dir.join("fio.log")).unwrap_or_default();
            if fio_ok && fio_verify_failed(&log) {
                fio_ok = false;
                eprintln!("round {round}: fio verify failed:\n{log}");
            }
        }
        self.fio_failures += u64::from(!fio_ok);
    }

    /// A last restart: verify, then stop gracefully and check the device.
    fn finish(&mut self, pcache: &Path, dir: &Path) -> FinalStop {
        let mut server = Server::start(pcache, dir);
        let mut c = Client::connect(&dir.join("soak.sock"), "disk.img").expect("connect");
        let mut buf = vec![0u8; BLOCK];
        for (&block, &want) in &self.flushed {
            c.read_block(block, &mut buf).expect("verify read");
            match block_seq(block, &buf) {
                Some(got) if got >= want && got <= self.acked[&block] => {
                    self.verified += u64::from(want > self.checked_up_to);
                }
                _ => self.lost += 1,
            }
        }
        drop(c);
        send_signal(server.child.id(), Signal::TERM);
        let status = server.child.wait().expect("wait");
        let check = Command::new(pcache).arg("check").arg(dir.join("pmem.img")).output().expect("pcache check");
        FinalStop { status, check }
    }
}

/// How the last run of the server ended.
struct FinalStop {
    /// Its exit status after SIGTERM.
    status: ExitStatus,
    /// What `pcache check` said of the device then.
    check: Output,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, pcache, dir, rounds, ..] = &args[..] else {
        eprintln!("usage: kill_soak PCACHE DIR ROUNDS [fio]");
        std::process::exit(2);
    };
    let with_fio = args.get(4).is_some_and(|a| a == "fio");
    let (pcache, dir) = (PathBuf::from(pcache), PathBuf::from(dir));
    let rounds: u64 = rounds.parse().expect("ROUNDS");
    let mut soak = Soak { rng: 0x5eed, ..Soak::default() };
    for round in 0..rounds {
        soak.round(round, &pcache, &dir, with_fio);
    }
    let last = soak.finish(&pcache, &dir);
    // Counted per block and round: a block is checked after each kill
    // against the last write it had at a flush.
    println!(
        "kills: {rounds}, writes: {}, flushed blocks verified after a kill: {}, \
         flushed blocks lost: {} (blocks that lost acknowledged but unflushed writes, as allowed: \
         {}); fio: {}",
        soak.writes,
        soak.verified,
        soak.lost,
        soak.unflushed_lost,
        if with_fio { format!("{} failure(s)", soak.fio_failures) } else { "not run".into() }
    );
    println!("final stop: {}; pcache check: {}", last.status, String::from_utf8_lossy(&last.check.stdout).trim());
    if soak.lost > 0 || soak.fio_failures > 0 || !last.status.success() || !last.check.status.success() {
        std::process::exit(1);
    }
}
