//! The engine on the crash simulator, driven by a workload and checked
//! against the model disk: the loop the `engine` fuzz target and the model
//! test share.

use std::sync::Arc;

use pcache_format::image::{ScanOptions, Severity, scan};

use crate::backing::BackingDev;
use crate::cache::{Cache, CacheDev, CacheOptions, EngineError};
use crate::pmem::{AsMedia, Pmem};
use crate::testing::backing::MemBacking;
use crate::testing::model::{ModelDisk, WriteId, fill};
use crate::testing::sim::{CrashState, SimPmem};
use crate::testing::workload::{Op, SECTOR};

/// Runs a request op (not [`Op::Restart`] or [`Op::Crash`], which act on
/// the cache's life, and do nothing here) as op `id` of a workload. A read
/// leaves what it read in `buf`.
pub fn run_op<P: Pmem, B: BackingDev>(
    cache: &Cache<P, B>,
    op: &Op,
    id: WriteId,
    buf: &mut Vec<u8>,
) -> Result<(), EngineError> {
    let bytes = |sector: u64, sectors: u64| (sector * SECTOR, sectors * SECTOR);
    match *op {
        Op::Write { sector, sectors, fua } => {
            buf.resize((sectors * SECTOR) as usize, 0);
            fill(id, sector, buf);
            cache.write(sector * SECTOR, buf, fua)
        }
        Op::Zero { sector, sectors } => {
            let (off, len) = bytes(sector, sectors);
            cache.write_zeroes(off, len, false)
        }
        Op::Read { sector, sectors } => {
            buf.resize((sectors * SECTOR) as usize, 0);
            cache.read(sector * SECTOR, buf)
        }
        Op::Discard { sector, sectors } => {
            let (off, len) = bytes(sector, sectors);
            cache.discard(off, len)
        }
        Op::Flush => cache.flush(),
        Op::WriteBack { ksets } => cache.write_back_ksets(ksets).map(drop),
        Op::Gc => cache.gc().map(drop),
        Op::Restart | Op::Crash(_) => Ok(()),
    }
}

/// `pcache check` of a pmem image: its problems, if any (notes, such as a
/// kset torn at the end of the log, are what recovery handles).
pub fn check_image<P: Pmem>(pmem: &P) -> Result<(), String> {
    let report = scan(&AsMedia(pmem), ScanOptions::default());
    if report.problems() == 0 {
        return Ok(());
    }
    let found: Vec<String> =
        report.findings.iter().filter(|f| f.severity == Severity::Problem).map(|f| f.to_string()).collect();
    Err(found.join("; "))
}

type RigCache = Arc<Cache<SimPmem, Arc<MemBacking>>>;

/// A cache on a [`SimPmem`] in front of a [`MemBacking`] holding its
/// original content, and the model of what it must read back.
#[derive(Debug)]
pub struct Rig {
    dev: Arc<CacheDev<SimPmem>>,
    backing: Arc<MemBacking>,
    cache: Option<RigCache>,
    opts: CacheOptions,
    model: ModelDisk,
    /// Ops run so far: op `n` is write `n` (ids start at 1; 0 is the original).
    ops: WriteId,
    buf: Vec<u8>,
}

impl Rig {
    /// Starts the cache of `backing` (a device of `sectors` sectors, named
    /// `path`, filled here with its original content) on `pmem`, formatted.
    pub fn new(pmem: SimPmem, path: &str, sectors: u64, opts: CacheOptions) -> Result<Self, String> {
        let mut content = vec![0; (sectors * SECTOR) as usize];
        fill(0, 0, &mut content);
        let backing = Arc::new(MemBacking::from_vec(path, content));
        let dev = CacheDev::open(pmem).map_err(|e| format!("open: {e}"))?;
        let mut rig = Self { dev, backing, cache: None, opts, model: ModelDisk::new(sectors), ops: 0, buf: Vec::new() };
        rig.start()?;
        Ok(rig)
    }

    fn start(&mut self) -> Result<(), String> {
        let (cache, _) =
            Cache::start(self.dev.clone(), self.backing.clone(), &self.opts).map_err(|e| format!("start: {e}"))?;
        self.cache = Some(cache);
        Ok(())
    }

    fn cache(&self) -> &RigCache {
        self.cache.as_ref().expect("the rig's cache runs between steps")
    }

    /// The model.
    pub fn model(&self) -> &ModelDisk {
        &self.model
    }

    /// Runs `op` (placed inside the device with [`Op::fit`]) and checks
    /// what it read; after a crash, reads the whole device back and checks
    /// every sector against what it may hold.
    pub fn step(&mut self, op: Op) -> Result<(), String> {
        let op = op.fit(self.model.sectors());
        self.ops += 1;
        let id = self.ops;
        match op {
            Op::Restart => {
                self.cache().stop().map_err(|e| format!("stop: {e}"))?;
                self.cache = None;
                self.start()?;
            }
            Op::Crash(strategy) => {
                let image = self.dev.pmem().crash_image(strategy);
                // The old cache goes before the new one starts: dropping it
                // stops it, on the old image, which the new start never sees.
                self.cache = None;
                self.dev = CacheDev::open(image).map_err(|e| format!("open after the crash: {e}"))?;
                self.start()?;
                let mut all = std::mem::take(&mut self.buf);
                all.resize((self.model.sectors() * SECTOR) as usize, 0);
                let read = self.cache().read(0, &mut all).map_err(|e| format!("read after the crash: {e}"));
                let checked = read.and_then(|()| self.model.check_crashed(0, &all));
                self.buf = all;
                checked?;
            }
            _ => {
                let mut buf = std::mem::take(&mut self.buf);
                let mut ran = run_op(self.cache(), &op, id, &mut buf);
                if matches!(ran, Err(EngineError::CacheFull)) && !self.opts.background {
                    // Without writeback and GC threads, a full cache is the
                    // caller's to clear: write everything back, reclaim, and
                    // run the op again (it writes the same data).
                    let cache = self.cache();
                    cache
                        .write_back(|_, _| {})
                        .and_then(|_| cache.gc())
                        .map_err(|e| format!("clearing a full cache: {e}"))?;
                    ran = run_op(self.cache(), &op, id, &mut buf);
                }
                let checked = match (ran, op) {
                    (Err(e), _) => Err(e.to_string()),
                    (Ok(()), Op::Read { sector, .. }) => self.model.check_read(sector, &buf),
                    (Ok(()), _) => Ok(()),
                };
                self.buf = buf;
                checked?;
            }
        }
        self.model.apply(&op, id);
        Ok(())
    }

    /// Stops the cache, checks the image it leaves, and returns that image.
    pub fn finish(mut self) -> Result<CrashState, String> {
        self.cache().stop().map_err(|e| format!("stop: {e}"))?;
        self.cache = None;
        check_image(self.dev.pmem()).map_err(|e| format!("check after the last op: {e}"))?;
        Ok(self.dev.pmem().snapshot())
    }
}
