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

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pcache_cli::nbd::*;

const BLOCK: usize = 4096;
/// The writer's blocks: the first 128 MiB of the export.
const BLOCKS: u64 = 32 * 1024;
const MAGIC: u64 = 0x736f_616b_7465_7374;

struct Client {
    s: UnixStream,
    handle: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

impl Client {
    fn connect(socket: &Path, export: &str) -> std::io::Result<Client> {
        let mut s = UnixStream::connect(socket)?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt)?;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            let mut payload = vec![0u8; u32_at(&h, 16) as usize];
            s.read_exact(&mut payload)?;
            match u32_at(&h, 12) {
                REP_ACK => return Ok(Client { s, handle: 0 }),
                REP_INFO => {}
                other => return Err(std::io::Error::other(format!("option reply {other:#x}"))),
            }
        }
    }

    fn request(&mut self, kind: u16, off: u64, len: u32, payload: &[u8], reply: &mut [u8]) -> std::io::Result<()> {
        self.handle += 1;
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&self.handle.to_be_bytes());
        m.extend_from_slice(&off.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.s.write_all(&m)?;
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        let err = u32_at(&r, 4);
        if err != 0 {
            return Err(std::io::Error::other(format!("NBD error {err}")));
        }
        self.s.read_exact(reply)
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

/// Whether fio's log reports a verify failure (`bad magic header`, a CRC
/// mismatch, ...; fio's errno for them is EILSEQ, 84).
fn fio_verify_failed(log: &str) -> bool {
    ["verify: bad", "verify failed", "verify type mismatch", "err=84"].iter().any(|m| log.contains(m))
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
    let socket = dir.join("soak.sock");
    // Per block: the write it holds at the last flush, and the last write acknowledged.
    let mut flushed: HashMap<u64, u64> = HashMap::new();
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let (mut verified, mut lost, mut unflushed_lost, mut writes) = (0u64, 0u64, 0u64, 0u64);
    let mut seq = 0u64;
    // Writes up to this sequence number were verified in an earlier round.
    let mut checked_up_to = 0u64;
    let mut x = 0x5eed_u64;
    let mut fio_failures = 0u64;
    for round in 0..rounds {
        let mut server = Server::start(&pcache, &dir);
        let mut c = Client::connect(&socket, "disk.img").expect("connect");
        // Verify what the last round wrote: flushed writes must be there.
        let mut buf = vec![0u8; BLOCK];
        let mut now = Vec::with_capacity(acked.len());
        for (&block, &last) in &acked {
            c.request(CMD_READ, block * BLOCK as u64, BLOCK as u32, &[], &mut buf).expect("verify read");
            let got = block_seq(block, &buf);
            let want = flushed.get(&block).copied().unwrap_or(0);
            match got {
                Some(g) if g >= want && g <= last => {
                    if want > checked_up_to {
                        verified += 1;
                    }
                    if g < last {
                        unflushed_lost += 1;
                    }
                }
                other => {
                    lost += 1;
                    eprintln!("round {round}: block {block} holds {other:?}, flushed {want}, acknowledged {last}");
                }
            }
            now.push((block, got.unwrap_or(0)));
        }
        checked_up_to = seq;
        // What survived is now both flushed and acknowledged.
        for (block, got) in now {
            flushed.insert(block, got);
            acked.insert(block, got);
        }
        let fio = with_fio.then(|| {
            Command::new("fio")
                .args(["--name=load", "--ioengine=nbd", "--rw=randrw", "--bs=4k", "--iodepth=8"])
                .arg(format!("--uri=nbd+unix:///disk.img?socket={}", socket.display()))
                .args(["--offset=128M", "--size=128M", "--fsync=32", "--verify=crc32c", "--verify_state_save=0"])
                .args(["--do_verify=1", "--verify_backlog=16", "--verify_fatal=1"])
                .args(["--time_based", "--runtime=60"])
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("fio.log")).expect("fio.log"))
                .spawn()
                .expect("start fio")
        });
        let mut fio = fio;
        let mut fio_failed = false;
        // Write and flush until the kill.
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let kill_after = Duration::from_millis(300 + (x >> 33) % 1700);
        let pid = server.child.id();
        let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let killing = killed.clone();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(kill_after);
            killing.store(true, std::sync::atomic::Ordering::SeqCst);
            // SAFETY: kill(2) on the attach process this program started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        });
        let mut pending: Vec<(u64, u64)> = Vec::new();
        loop {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let block = (x >> 20) % BLOCKS;
            seq += 1;
            if c.request(CMD_WRITE, block * BLOCK as u64, BLOCK as u32, &block_data(block, seq), &mut []).is_err() {
                break;
            }
            writes += 1;
            acked.insert(block, seq);
            pending.push((block, seq));
            if pending.len() == 16 {
                if c.request(CMD_FLUSH, 0, 0, &[], &mut []).is_err() {
                    break;
                }
                for (b, s) in pending.drain(..) {
                    flushed.insert(b, s);
                }
                // fio ending while the server still runs is a failure of its
                // own (it runs for 60 s; the kill comes within 2 s). Its
                // status is read before the flag, so a kill cannot be blamed.
                let ended = fio.as_mut().and_then(|f| f.try_wait().ok().flatten());
                if let Some(status) = ended.filter(|_| !killed.load(std::sync::atomic::Ordering::SeqCst)) {
                    fio_failed = true;
                    let log = std::fs::read_to_string(dir.join("fio.log")).unwrap_or_default();
                    eprintln!("round {round}: fio ended early ({status}) while the server ran:\n{log}");
                    fio = None;
                }
            }
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
            if !fio_failed && fio_verify_failed(&log) {
                fio_failed = true;
                eprintln!("round {round}: fio verify failed:\n{log}");
            }
        }
        fio_failures += u64::from(fio_failed);
    }
    // A last restart: verify, then stop gracefully and check the device.
    let mut server = Server::start(&pcache, &dir);
    let mut c = Client::connect(&socket, "disk.img").expect("connect");
    let mut buf = vec![0u8; BLOCK];
    for (&block, &want) in &flushed {
        c.request(CMD_READ, block * BLOCK as u64, BLOCK as u32, &[], &mut buf).expect("verify read");
        match block_seq(block, &buf) {
            Some(got) if got >= want && got <= acked[&block] => verified += u64::from(want > checked_up_to),
            _ => lost += 1,
        }
    }
    drop(c);
    // SAFETY: kill(2) on the attach process this program started.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let status = server.child.wait().expect("wait");
    let check = Command::new(&pcache).arg("check").arg(dir.join("pmem.img")).output().expect("pcache check");
    // Counted per block and round: a block is checked after each kill
    // against the last write it had at a flush.
    println!(
        "kills: {rounds}, writes: {writes}, flushed blocks verified after a kill: {verified}, \
         flushed blocks lost: {lost} (blocks that lost acknowledged but unflushed writes, as allowed: \
         {unflushed_lost}); fio: {}",
        if with_fio { format!("{fio_failures} failure(s)") } else { "not run".into() }
    );
    println!("final stop: {status}; pcache check: {}", String::from_utf8_lossy(&check.stdout).trim());
    if lost > 0 || fio_failures > 0 || !status.success() || !check.status.success() {
        std::process::exit(1);
    }
}
