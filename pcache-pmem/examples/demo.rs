//! Caches a backing file on a formatted pmem device (or an ordinary file
//! standing in for one), writes and reads through the cache, and stops it
//! warm.
//!
//! ```text
//! cargo run --release -p pcache-pmem --example demo -- PMEM BACKING
//! ```

use std::time::Instant;

use pcache_pmem::{Cache, CacheDev, CacheOptions, DaxMapping, DaxOptions, FileBacking};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [pmem, backing] = &args[..] else {
        eprintln!("usage: demo PMEM BACKING  (format PMEM first: pcache format PMEM --size 1G)");
        std::process::exit(2);
    };
    let map = DaxMapping::open(pmem, &DaxOptions::default())?;
    println!("{pmem}: {}", map.mode());
    let dev = CacheDev::open(map)?;
    let opts = CacheOptions { cache_size: Some(256 << 20), data_crc: true, ..Default::default() };
    let (cache, report) = Cache::start(dev, FileBacking::open(backing)?, &opts)?;
    println!(
        "{backing}: {} cache of {} segments in backing entry {}, {} keys replayed",
        if report.new { "new" } else { "existing" },
        report.n_segs,
        report.id,
        report.replay.keys
    );
    let t = Instant::now();
    let block = [0xa5u8; 4096];
    let blocks = cache.size() / 4096;
    for i in 0..2048u64 {
        cache.write((i * 7919 % blocks) * 4096, &block, false)?;
    }
    cache.flush()?;
    let mut buf = [0u8; 4096];
    for i in 0..2048u64 {
        cache.read((i * 7919 % blocks) * 4096, &mut buf)?;
        assert_eq!(buf, block);
    }
    println!("2048 writes and 2048 reads of 4 KiB in {:.2?}", t.elapsed());
    println!("{:#?}", cache.stats());
    cache.stop()?;
    Ok(())
}
