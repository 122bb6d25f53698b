//! `attach --metrics tcp:HOST:PORT`: the figures of `pcache status` in the
//! Prometheus (OpenMetrics) text format at `http://HOST:PORT/metrics`, one
//! series per export (label `export`), read from the engine at each scrape.

use std::sync::Arc;
use std::thread::JoinHandle;

use pcache_pmem::Stats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tracing::warn;

use super::control::Caches;
use super::export::PmemCache;

/// One metric: its name (without `pcache_`, and without `_total` for a
/// counter: the encoder adds it), help, kind, and how to read it.
type Read = fn(&Stats, &PmemCache) -> u64;

const METRICS: &[(&str, &str, MetricType, Read)] = &[
    ("read_hits", "Reads served (fully or partly) from the cache", MetricType::Counter, |s, _| {
        s.full_hits + s.partial_hits
    }),
    ("read_misses", "Reads served from the backing device alone", MetricType::Counter, |s, _| s.misses),
    ("read_bytes_from_cache", "Bytes read from the cache", MetricType::Counter, |s, _| s.bytes_from_cache),
    ("read_bytes_from_backing", "Bytes read from the backing device", MetricType::Counter, |s, _| s.bytes_from_backing),
    ("dirty_bytes", "Bytes written to the cache and not yet written back", MetricType::Gauge, |s, _| s.dirty_bytes),
    ("clean_bytes", "Cached bytes that are not dirty", MetricType::Gauge, |s, _| {
        s.cached_bytes.saturating_sub(s.dirty_bytes)
    }),
    ("keys", "Keys in the index", MetricType::Gauge, |s, _| s.keys),
    ("segments_used", "Cache segments in use", MetricType::Gauge, |s, _| u64::from(s.segments_used)),
    ("segments", "Cache segments", MetricType::Gauge, |s, _| u64::from(s.segments)),
    ("ksets_closed", "Ksets written to the key log", MetricType::Counter, |s, _| s.ksets_closed),
    ("writeback_bytes", "Bytes written back to the backing device", MetricType::Counter, |s, _| s.bytes_written_back),
    ("writeback_ksets", "Ksets written back", MetricType::Counter, |s, _| s.ksets_written_back),
    ("writeback_errors", "Failed writeback attempts", MetricType::Counter, |s, _| s.writeback_errors),
    (
        "zeroed_on_backing_bytes",
        "Bytes zeroed on the backing device alone, costing no pmem",
        MetricType::Counter,
        |s, _| s.zeroed_on_backing,
    ),
    ("writeback_rate_limit_bytes", "Writeback rate limit, bytes a second (0: none)", MetricType::Gauge, |_, c| {
        c.writeback_rate().unwrap_or(0)
    }),
    ("gc_ksets_collected", "Ksets GC consumed", MetricType::Counter, |s, _| s.ksets_collected),
    ("gc_segments_freed", "Segments GC freed", MetricType::Counter, |s, _| s.segments_freed),
    ("gc_percent", "GC watermark, percent of segments in use", MetricType::Gauge, |_, c| u64::from(c.gc_percent())),
    ("healthy", "1 when writeback and GC work, 0 when one is failing or stopped", MetricType::Gauge, |_, c| {
        let h = c.health();
        u64::from(h.writeback_failing.is_none() && h.writeback_stopped.is_none() && h.gc_stopped.is_none())
    }),
];

/// Reads every export's figures at each scrape.
#[derive(Debug)]
struct Figures {
    caches: Arc<Caches>,
}

impl Collector for Figures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats: Vec<Stats> = self.caches.iter().map(|(_, c)| c.stats()).collect();
        for (name, help, kind, read) in METRICS {
            let full = format!("pcache_{name}");
            let mut metric = encoder.encode_descriptor(&full, help, None, *kind)?;
            for ((export, cache), s) in self.caches.iter().zip(&stats) {
                let labels = [("export", export.as_str())];
                let family = metric.encode_family(&labels)?;
                let v = read(s, cache);
                match kind {
                    MetricType::Counter => ConstCounter::new(v).encode(family)?,
                    _ => ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(family)?,
                }
            }
        }
        Ok(())
    }
}

/// The metrics server.
pub struct Metrics {
    server: Arc<tiny_http::Server>,
    thread: JoinHandle<()>,
    addr: String,
}

impl Metrics {
    /// Listens on `host:port`; serves once [`Metrics::serve`] is called.
    pub fn bind(host: &str, port: u16) -> Result<tiny_http::Server, String> {
        tiny_http::Server::http((host, port)).map_err(|e| format!("--metrics: cannot listen on {host}:{port}: {e}"))
    }

    /// Answers `GET /metrics` with the figures of `caches`.
    pub fn serve(server: tiny_http::Server, caches: Arc<Caches>) -> Self {
        let server = Arc::new(server);
        let addr = server.server_addr().to_string();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Figures { caches }));
        let thread = {
            let server = server.clone();
            std::thread::spawn(move || {
                for req in server.incoming_requests() {
                    let reply = if req.url() == "/metrics" || req.url().starts_with("/metrics?") {
                        let mut body = String::new();
                        match prometheus_client::encoding::text::encode(&mut body, &registry) {
                            Ok(()) => tiny_http::Response::from_string(body).with_header(content_type()),
                            Err(_) => tiny_http::Response::from_string("encoding failed\n").with_status_code(500),
                        }
                    } else {
                        tiny_http::Response::from_string("pcache serves /metrics only\n").with_status_code(404)
                    };
                    if let Err(e) = req.respond(reply) {
                        warn!(error = %e, "metrics: cannot answer a scrape");
                    }
                }
            })
        };
        Self { server, thread, addr }
    }

    /// Where it listens, as `HOST:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Stops serving.
    pub fn stop(self) {
        self.server.unblock();
        let _ = self.thread.join();
    }
}

fn content_type() -> tiny_http::Header {
    tiny_http::Header::from_bytes(
        &b"Content-Type"[..],
        &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
    )
    .unwrap_or_else(|()| tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"text/plain"[..]).expect("ascii"))
}
