//! The daemon's counters and latency histograms, and the Prometheus text
//! exposition format (version 0.0.4) they are served in.
//!
//! Invariant: recording costs a few relaxed atomic adds, with no lock and
//! no allocation, because it runs on every FUSE request. Everything that
//! costs (formatting, reading the store) happens at scrape time.
//!
//! Calls nothing but std; `fs` records into it, `status` renders it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

macro_rules! ops {
    ($($name:literal),* $(,)?) => {
        /// The FUSE opcodes `fs` answers, by the names it gives `guarded`.
        pub const OPS: &[&str] = &[$($name),*];

        /// The index of `op` in [`OPS`]; unknown names share the last slot
        /// ("other"). A `match` on short strings: no hashing, no lock.
        pub fn op_index(op: &str) -> usize {
            let mut i = 0;
            $(
                if op == $name {
                    return i;
                }
                i += 1;
            )*
            i - 1
        }
    };
}

ops!(
    "lookup",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "opendir",
    "readdir",
    "readdirplus",
    "releasedir",
    "fsyncdir",
    "statfs",
    "setxattr",
    "getxattr",
    "listxattr",
    "removexattr",
    "access",
    "create",
    "fallocate",
    "lseek",
    "copy_file_range",
    "ioctl",
    "forget",
    "batch_forget",
    "getlk",
    "setlk",
    "bmap",
    "poll",
    "other",
);

/// Upper bounds of the latency buckets, in seconds: 10 us to 10 s, about
/// three per decade. Fixed so that scrapes of different daemons add up.
pub const BUCKETS: [f64; 19] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The same bounds in nanoseconds, for recording without floats.
const BUCKETS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A latency histogram. Buckets are stored per bucket (not cumulative),
/// so a record is one add; `snapshot` sums them up.
#[derive(Default)]
pub struct Histogram {
    /// One per bound, and the last for over 10 s (+Inf only).
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// A histogram as read at one moment: cumulative counts per bound.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// `cumulative[i]`: observations <= `BUCKETS[i]`.
    pub cumulative: [u64; BUCKETS.len()],
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BUCKETS_NS.partition_point(|b| *b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Reads the buckets. Concurrent records may land between the reads;
    /// the count is taken as the sum of the buckets so that the +Inf
    /// bucket and `_count` always agree.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = [0u64; BUCKETS.len()];
        let mut acc = 0u64;
        for (i, c) in cumulative.iter_mut().enumerate() {
            acc += self.buckets[i].load(Ordering::Relaxed);
            *c = acc;
        }
        let count = acc + self.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            cumulative,
            count,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// The caches whose hit rates are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cache {
    /// Decompressed chunks (`Volume::chunk`).
    Chunk,
    /// Chunk maps of committed files, live and in snapshots.
    ChunkMap,
    /// Directory listings being read in pieces (readdir).
    Listing,
    /// Read-only opens of committed files through the daemon: a hit lets
    /// the kernel keep the pages it cached (FOPEN_KEEP_CACHE).
    KernelPages,
}

impl Cache {
    pub const ALL: [Cache; 4] = [
        Cache::Chunk,
        Cache::ChunkMap,
        Cache::Listing,
        Cache::KernelPages,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cache::Chunk => "chunk",
            Cache::ChunkMap => "chunk_map",
            Cache::Listing => "listing",
            Cache::KernelPages => "kernel_pages",
        }
    }
}

#[derive(Default)]
struct CacheCounts {
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Everything the daemon counts as it goes. One per volume.
pub struct Metrics {
    requests: [Histogram; OPS.len()],
    errors: [AtomicU64; OPS.len()],
    caches: [CacheCounts; Cache::ALL.len()],
    ingest_commits: AtomicU64,
    ingest_files: AtomicU64,
    ingest_bytes: AtomicU64,
    /// Unix time (ms) of the last ingest commit; 0: none yet.
    last_commit_ms: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            requests: std::array::from_fn(|_| Histogram::default()),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            caches: std::array::from_fn(|_| CacheCounts::default()),
            ingest_commits: AtomicU64::new(0),
            ingest_files: AtomicU64::new(0),
            ingest_bytes: AtomicU64::new(0),
            last_commit_ms: AtomicU64::new(0),
        }
    }
}

/// Request counts summed over opcodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestTotals {
    pub requests: u64,
    pub errors: u64,
}

/// Ingest commits since the start, and what they committed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngestTotals {
    pub commits: u64,
    pub files: u64,
    pub bytes: u64,
}

impl Metrics {
    /// One answered request of opcode `op` (an index into [`OPS`]).
    pub fn record_request(&self, op: usize, took: Duration, failed: bool) {
        let op = op.min(OPS.len() - 1);
        self.requests[op].record(took);
        if failed {
            self.errors[op].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hits and misses of cache `c` so far.
    pub fn cache_counts(&self, c: Cache) -> (u64, u64) {
        let n = &self.caches[c as usize];
        (
            n.hits.load(Ordering::Relaxed),
            n.misses.load(Ordering::Relaxed),
        )
    }

    pub fn cache(&self, c: Cache, hit: bool) {
        let c = &self.caches[c as usize];
        if hit {
            c.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            c.misses.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One ingest commit of `files` files and `bytes` changed bytes.
    pub fn ingest_committed(&self, files: u64, bytes: u64) {
        self.ingest_commits.fetch_add(1, Ordering::Relaxed);
        self.ingest_files.fetch_add(files, Ordering::Relaxed);
        self.ingest_bytes.fetch_add(bytes, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_commit_ms.store(now, Ordering::Relaxed);
    }

    /// When the last ingest commit landed, if any did.
    pub fn last_commit(&self) -> Option<SystemTime> {
        match self.last_commit_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    pub fn ingest_totals(&self) -> IngestTotals {
        IngestTotals {
            commits: self.ingest_commits.load(Ordering::Relaxed),
            files: self.ingest_files.load(Ordering::Relaxed),
            bytes: self.ingest_bytes.load(Ordering::Relaxed),
        }
    }

    pub fn request_totals(&self) -> RequestTotals {
        RequestTotals {
            requests: self.requests.iter().map(Histogram::count).sum(),
            errors: self.errors.iter().map(|e| e.load(Ordering::Relaxed)).sum(),
        }
    }

    /// Requests and errors per opcode, for opcodes seen at least once.
    pub fn requests_by_op(&self) -> Vec<(&'static str, u64, u64)> {
        OPS.iter()
            .enumerate()
            .map(|(i, op)| {
                (
                    *op,
                    self.requests[i].count(),
                    self.errors[i].load(Ordering::Relaxed),
                )
            })
            .filter(|(_, n, _)| *n > 0)
            .collect()
    }

    /// Writes the counters this struct keeps. Opcodes never seen are left
    /// out, so a scrape is a few dozen lines rather than a thousand.
    pub fn write_to(&self, out: &mut Exposition) {
        let seen: Vec<usize> = (0..OPS.len())
            .filter(|i| self.requests[*i].count() > 0)
            .collect();
        out.family(
            "dedupfs_requests_total",
            Kind::Counter,
            "FUSE requests answered, by opcode.",
        );
        for &i in &seen {
            out.sample(
                "dedupfs_requests_total",
                &[("op", OPS[i])],
                self.requests[i].count() as f64,
            );
        }
        out.family(
            "dedupfs_request_errors_total",
            Kind::Counter,
            "FUSE requests answered with an error (or that panicked), by opcode.",
        );
        for &i in &seen {
            out.sample(
                "dedupfs_request_errors_total",
                &[("op", OPS[i])],
                self.errors[i].load(Ordering::Relaxed) as f64,
            );
        }
        out.family(
            "dedupfs_request_duration_seconds",
            Kind::Histogram,
            "Time from a request's arrival in the daemon to its reply, by opcode.",
        );
        for &i in &seen {
            out.histogram(
                "dedupfs_request_duration_seconds",
                &[("op", OPS[i])],
                &self.requests[i].snapshot(),
            );
        }
        for (name, help, hits) in [
            (
                "dedupfs_cache_hits_total",
                "Lookups answered from an in-memory cache, by cache.",
                true,
            ),
            (
                "dedupfs_cache_misses_total",
                "Lookups an in-memory cache could not answer, by cache.",
                false,
            ),
        ] {
            out.family(name, Kind::Counter, help);
            for c in Cache::ALL {
                let n = &self.caches[c as usize];
                let v = if hits { &n.hits } else { &n.misses };
                out.sample(
                    name,
                    &[("cache", c.name())],
                    v.load(Ordering::Relaxed) as f64,
                );
            }
        }
        for (name, help, v) in [
            (
                "dedupfs_ingest_commits_total",
                "Ingest commits (groups of closed files chunked and committed).",
                &self.ingest_commits,
            ),
            (
                "dedupfs_ingest_files_total",
                "Files committed by ingest.",
                &self.ingest_files,
            ),
            (
                "dedupfs_ingest_bytes_total",
                "Changed bytes of files committed by ingest.",
                &self.ingest_bytes,
            ),
        ] {
            out.family(name, Kind::Counter, help);
            out.sample(name, &[], v.load(Ordering::Relaxed) as f64);
        }
        if let Some(t) = self.last_commit() {
            let name = "dedupfs_last_ingest_commit_timestamp_seconds";
            out.family(name, Kind::Gauge, "Unix time of the last ingest commit.");
            let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            out.sample(name, &[], secs.as_secs_f64());
        }
    }
}

/// A metric family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A page of Prometheus text exposition format, 0.0.4: per family a HELP
/// and a TYPE line, then its samples.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

/// The Content-Type the format is served with.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Exposition {
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
    }

    /// A gauge family with one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, Kind::Gauge, help);
        self.sample(name, &[], value);
    }

    /// The `_bucket` (cumulative, ending in `+Inf`), `_sum` and `_count`
    /// samples of one histogram; the family line comes first, once.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        for (i, le) in BUCKETS.iter().enumerate() {
            let le = number(*le);
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, h.cumulative[i] as f64);
        }
        let mut with_le = labels.to_vec();
        with_le.push(("le", "+Inf"));
        self.sample(&bucket, &with_le, h.count as f64);
        self.sample(&format!("{name}_sum"), labels, h.sum_seconds);
        self.sample(&format!("{name}_count"), labels, h.count as f64);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// A sample value: integers without a fraction, others as Rust prints
/// them (which Prometheus parses), NaN and infinities by their names.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A sample of a parsed page: name, labels, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Parses a page of the text format back into samples, checking that
/// every sample belongs to a family announced by HELP and TYPE before it.
/// For tests and `dedupfs status`-style readers; not a general parser
/// (no timestamps, no escaped quotes in label values).
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut typed: std::collections::HashMap<String, String> = Default::default();
    let mut helped: std::collections::HashSet<String> = Default::default();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().ok_or_else(|| bad("no name"))?;
            helped.insert(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                return Err(bad("TYPE without a type"));
            };
            if !helped.contains(name) {
                return Err(bad("TYPE before HELP"));
            }
            typed.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| bad("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| bad("value is not a number"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .ok_or_else(|| bad("unclosed labels"))?;
                let mut labels = Vec::new();
                for pair in body.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').ok_or_else(|| bad("label without ="))?;
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .ok_or_else(|| bad("unquoted label value"))?;
                    labels.push((k.to_string(), v.to_string()));
                }
                (name, labels)
            }
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|f| typed.get(*f).map(String::as_str) == Some("histogram"))
            .unwrap_or(name);
        if !typed.contains_key(family) {
            return Err(bad("sample of a family with no TYPE"));
        }
        out.push((name.to_string(), labels, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|s| s.2)
    }

    #[test]
    fn op_names_map_to_their_slot() {
        assert_eq!(OPS[op_index("lookup")], "lookup");
        assert_eq!(OPS[op_index("copy_file_range")], "copy_file_range");
        assert_eq!(OPS[op_index("no such op")], "other");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let m = Metrics::default();
        let op = op_index("write");
        for us in [5, 10, 11, 700, 3_000_000] {
            m.record_request(op, Duration::from_micros(us), false);
        }
        m.record_request(op, Duration::from_secs(20), true);
        let mut e = Exposition::default();
        m.write_to(&mut e);
        let text = e.finish();
        let s = parse(&text).unwrap();
        let b = |le: &str| {
            value(
                &s,
                "dedupfs_request_duration_seconds_bucket",
                &[("op", "write"), ("le", le)],
            )
            .unwrap()
        };
        // 5 us and exactly 10 us fall in the first bucket (le is <=).
        assert_eq!(b("0.00001"), 2.0);
        assert_eq!(b("0.000025"), 3.0);
        assert_eq!(b("0.001"), 4.0);
        assert_eq!(b("2.5"), 4.0);
        assert_eq!(b("5"), 5.0);
        assert_eq!(b("10"), 5.0);
        assert_eq!(b("+Inf"), 6.0);
        let mut last = 0.0;
        for le in BUCKETS {
            let v = b(&number(le));
            assert!(v >= last, "bucket le={le} went down");
            last = v;
        }
        let count = value(
            &s,
            "dedupfs_request_duration_seconds_count",
            &[("op", "write")],
        );
        assert_eq!(count, Some(6.0));
        let sum = value(
            &s,
            "dedupfs_request_duration_seconds_sum",
            &[("op", "write")],
        )
        .unwrap();
        assert!((sum - 23.000726).abs() < 1e-6, "sum {sum}");
        assert_eq!(
            value(&s, "dedupfs_requests_total", &[("op", "write")]),
            Some(6.0)
        );
        assert_eq!(
            value(&s, "dedupfs_request_errors_total", &[("op", "write")]),
            Some(1.0)
        );
        // Opcodes never seen are left out.
        assert_eq!(value(&s, "dedupfs_requests_total", &[("op", "read")]), None);
    }

    #[test]
    fn every_family_has_help_and_type_once() {
        let m = Metrics::default();
        m.record_request(op_index("lookup"), Duration::from_micros(50), false);
        m.record_request(op_index("read"), Duration::from_micros(50), false);
        m.cache(Cache::Chunk, true);
        m.ingest_committed(2, 100);
        let mut e = Exposition::default();
        m.write_to(&mut e);
        let text = e.finish();
        parse(&text).unwrap();
        let mut types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        let n = types.len();
        types.sort();
        types.dedup();
        assert_eq!(types.len(), n, "a family announced twice:\n{text}");
        assert!(text.contains("# TYPE dedupfs_request_duration_seconds histogram\n"));
        assert!(text.contains("dedupfs_cache_hits_total{cache=\"chunk\"} 1\n"));
        assert!(text.contains("dedupfs_ingest_bytes_total 100\n"));
        assert!(text.contains("dedupfs_last_ingest_commit_timestamp_seconds "));
        assert!(
            text.lines()
                .all(|l| l.starts_with("# ") || l.starts_with("dedupfs_"))
        );
    }

    #[test]
    fn numbers_and_labels_are_written_as_the_format_wants() {
        assert_eq!(number(3.0), "3");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut e = Exposition::default();
        e.gauge("dedupfs_x", "Line one\nline two.", 1.5);
        assert_eq!(
            e.finish(),
            "# HELP dedupfs_x Line one\\nline two.\n# TYPE dedupfs_x gauge\ndedupfs_x 1.5\n"
        );
    }

    #[test]
    fn parse_refuses_samples_without_a_family() {
        assert!(parse("dedupfs_x 1\n").is_err());
        assert!(parse("# TYPE dedupfs_x gauge\ndedupfs_x 1\n").is_err());
        assert!(parse("# HELP dedupfs_x x\n# TYPE dedupfs_x gauge\ndedupfs_x one\n").is_err());
    }
}
