//! What a store reports about itself at a glance: `dedupfs status` (the
//! [`Status`] record, from the daemon over the control socket or from a
//! store opened directly) and the daemon's metrics page (Prometheus text,
//! over the control socket's "metrics" command and `-o metrics=ADDR`).
//!
//! Everything here runs at scrape or status time, never under a request;
//! the request path only bumps the counters of `crate::metrics`. The
//! store's space figures take a pass over the live files, so the daemon
//! keeps them for `SPACE_TTL` between scrapes.
//!
//! Calls `fs::volume`, `repo`, `snap`, `metrics`; the daemon and the
//! `dedupfs` binary call this.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fs::volume::{Backlog, SnapInfo, Volume};
use crate::metrics::{Exposition, Kind};
use crate::repo::{Repo, Stats};

/// Control socket commands.
pub const CTL_STATUS: &str = "status";
pub const CTL_METRICS: &str = "metrics";
/// Version of the [`Status`] JSON. Readers ignore fields they do not know;
/// adding one (the coming `mirror`) keeps the version, changing or
/// removing one bumps it.
pub const STATUS_VERSION: u32 = 1;
/// How long the daemon reuses the store's space figures.
const SPACE_TTL: Duration = Duration::from_secs(5);

/// `dedupfs status --json`. Fields that only a running daemon knows are
/// absent (null) for a store that is not mounted.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: u32,
    pub store: String,
    pub mounted: bool,
    pub mountpoint: Option<String>,
    pub transport: Option<Transport>,
    pub uptime_secs: Option<u64>,
    pub ingest: Option<Ingest>,
    pub space: Space,
    pub snapshots: Snapshots,
    pub requests: Option<Requests>,
    // The mirror's state goes here as `mirror: Option<Mirror>`, absent
    // while no mirror is configured.
}

/// How the kernel reaches the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Transport {
    /// The device the session runs over.
    pub device: String,
    /// "classic": one request per read of /dev/fuse (no io_uring).
    pub mode: String,
    /// Whether the kernel agreed to passthrough for files written whole.
    pub passthrough: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ingest {
    #[serde(flatten)]
    pub backlog: Backlog,
    /// Ingest commits since the mount.
    pub commits: u64,
    pub files_committed: u64,
    pub bytes_committed: u64,
    /// The last ingest commit since the mount (RFC 3339, local time).
    pub last_commit: Option<String>,
    pub last_commit_unix: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Space {
    /// Apparent size of the live files and named objects.
    pub logical_bytes: u64,
    /// Their unique chunks, compressed.
    pub stored_bytes: u64,
    /// Pack files on disk.
    pub pack_bytes: u64,
    /// Pack bytes no chunk uses (gc gives them back).
    pub dead_bytes: u64,
    /// meta.redb and index.redb on disk.
    pub metadata_bytes: u64,
}

impl Space {
    fn of(s: &Stats) -> Space {
        Space {
            logical_bytes: s.logical_bytes,
            stored_bytes: s.stored_bytes,
            pack_bytes: s.pack_bytes,
            dead_bytes: s.dead_bytes,
            metadata_bytes: s.meta.file_bytes + s.index.file_bytes,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshots {
    pub count: u64,
    pub newest: Option<Newest>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Newest {
    pub name: String,
    pub created: String,
    pub created_unix: i64,
}

impl Snapshots {
    fn of(list: &[SnapInfo]) -> Snapshots {
        Snapshots {
            count: list.len() as u64,
            newest: list
                .iter()
                .max_by_key(|s| (s.created_unix, s.id))
                .map(|s| Newest {
                    name: s.name.clone(),
                    created: s.created.clone(),
                    created_unix: s.created_unix,
                }),
        }
    }
}

/// Requests answered since the mount.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Requests {
    pub total: u64,
    pub errors: u64,
    pub by_op: BTreeMap<String, OpCount>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpCount {
    pub requests: u64,
    pub errors: u64,
}

/// The status of a store no daemon holds, read from the store itself.
pub fn offline(store: &Path, repo: &Repo) -> Result<Status, crate::snap::Error> {
    let stats = repo.stats()?;
    let rt = repo
        .meta()
        .begin_read()
        .map_err(crate::store::Error::from)?;
    let (snaps, _) = crate::snap::list(&rt, repo.store(), false)?;
    Ok(Status {
        version: STATUS_VERSION,
        // Canonical, as the daemon reports it.
        store: std::fs::canonicalize(store)
            .unwrap_or_else(|_| store.to_path_buf())
            .display()
            .to_string(),
        mounted: false,
        mountpoint: None,
        transport: None,
        uptime_secs: None,
        ingest: None,
        space: Space::of(&stats),
        snapshots: Snapshots::of(&snaps),
        requests: None,
    })
}

/// Where to serve metrics over HTTP, if anywhere, and whether beyond
/// loopback.
pub type MetricsAt = Option<(SocketAddr, bool)>;

/// Takes the metrics mount options out of a `-o` list: `metrics=ADDR:PORT`
/// and `metrics_remote`. Returns them and the other options.
pub fn metrics_options(options: &[String]) -> io::Result<(MetricsAt, Vec<String>)> {
    let mut addr = None;
    let mut remote = false;
    let mut rest = Vec::new();
    for o in options {
        if let Some(a) = o.strip_prefix("metrics=") {
            let a: SocketAddr = a.parse().map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("mount option metrics={a}: {e} (want ADDR:PORT, e.g. 127.0.0.1:9477)"),
                )
            })?;
            addr = Some(a);
        } else if o == "metrics_remote" {
            remote = true;
        } else {
            rest.push(o.clone());
        }
    }
    Ok((addr.map(|a| (a, remote)), rest))
}

/// The running daemon's side: answers "status" and "metrics".
pub struct Daemon {
    vol: Arc<Volume>,
    store: PathBuf,
    mountpoint: PathBuf,
    /// The last space figures and when they were taken.
    space: Mutex<Option<(Instant, Arc<Stats>)>>,
}

impl Daemon {
    pub fn new(vol: Arc<Volume>, store: &Path, mountpoint: &Path) -> Arc<Daemon> {
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        Arc::new(Daemon {
            vol,
            store: canon(store),
            mountpoint: canon(mountpoint),
            space: Mutex::new(None),
        })
    }

    /// The control socket's "status" and "metrics" commands.
    pub fn handle(&self, cmd: &str) -> Result<Value, String> {
        match cmd {
            CTL_STATUS => serde_json::to_value(self.status()?).map_err(|e| e.to_string()),
            CTL_METRICS => Ok(Value::String(self.metrics_text())),
            other => Err(format!("unknown command '{other}'")),
        }
    }

    /// The store's space figures, at most `SPACE_TTL` old. The lock is
    /// held while they are computed, so scrapes that come together pay
    /// for one pass.
    fn stats(&self) -> Result<(Arc<Stats>, Duration), String> {
        let mut cached = self.space.lock();
        if let Some((at, s)) = cached.as_ref()
            && at.elapsed() < SPACE_TTL
        {
            return Ok((s.clone(), at.elapsed()));
        }
        let s = Arc::new(self.vol.repo().stats().map_err(|e| e.to_string())?);
        *cached = Some((Instant::now(), s.clone()));
        Ok((s, Duration::ZERO))
    }

    pub fn status(&self) -> Result<Status, String> {
        let (stats, _) = self.stats()?;
        let snaps = self.vol.snap_list(false).map_err(|e| e.to_string())?;
        let m = self.vol.metrics();
        let totals = m.request_totals();
        let ingest = m.ingest_totals();
        let last = m.last_commit().map(|t| {
            let local: chrono::DateTime<chrono::Local> = t.into();
            (local.to_rfc3339(), local.timestamp())
        });
        Ok(Status {
            version: STATUS_VERSION,
            store: self.store.display().to_string(),
            mounted: true,
            mountpoint: Some(self.mountpoint.display().to_string()),
            transport: Some(Transport {
                device: "/dev/fuse".into(),
                mode: "classic".into(),
                passthrough: self.vol.passthrough(),
            }),
            uptime_secs: Some(self.vol.uptime().as_secs()),
            ingest: Some(Ingest {
                backlog: self.vol.backlog(),
                commits: ingest.commits,
                files_committed: ingest.files,
                bytes_committed: ingest.bytes,
                last_commit: last.as_ref().map(|l| l.0.clone()),
                last_commit_unix: last.map(|l| l.1),
            }),
            space: Space::of(&stats),
            snapshots: Snapshots::of(&snaps),
            requests: Some(Requests {
                total: totals.requests,
                errors: totals.errors,
                by_op: m
                    .requests_by_op()
                    .into_iter()
                    .map(|(op, requests, errors)| (op.to_string(), OpCount { requests, errors }))
                    .collect(),
            }),
        })
    }

    /// The metrics page. Never fails: a figure that cannot be read now is
    /// left out (and logged), the rest is served.
    pub fn metrics_text(&self) -> String {
        let mut e = Exposition::default();
        self.vol.metrics().write_to(&mut e);
        let b = self.vol.backlog();
        e.gauge(
            "dedupfs_ingest_queue_files",
            "Files closed and queued for ingest, not yet committed.",
            b.queued_files as f64,
        );
        e.gauge(
            "dedupfs_staged_files",
            "Files with staged writes (open for writing or waiting for ingest).",
            b.staged_files as f64,
        );
        e.gauge(
            "dedupfs_staged_bytes",
            "Sizes of the staged files, summed.",
            b.staged_bytes as f64,
        );
        e.gauge(
            "dedupfs_ingest_pending_bytes",
            "Bytes written to staged files since their last commit.",
            b.pending_bytes as f64,
        );
        match self.stats() {
            Ok((s, age)) => {
                for (name, help, v) in [
                    (
                        "dedupfs_logical_bytes",
                        "Apparent size of the live files and named objects.",
                        s.logical_bytes,
                    ),
                    (
                        "dedupfs_stored_bytes",
                        "Unique chunks of the store, compressed.",
                        s.stored_bytes,
                    ),
                    ("dedupfs_pack_bytes", "Pack files on disk.", s.pack_bytes),
                    (
                        "dedupfs_dead_bytes",
                        "Pack bytes no chunk uses, for gc to give back.",
                        s.dead_bytes,
                    ),
                ] {
                    e.gauge(name, help, v as f64);
                }
                let name = "dedupfs_metadata_bytes";
                e.family(name, Kind::Gauge, "Database files on disk, by database.");
                e.sample(name, &[("db", "meta")], s.meta.file_bytes as f64);
                e.sample(name, &[("db", "index")], s.index.file_bytes as f64);
                e.gauge(
                    "dedupfs_space_age_seconds",
                    "Age of the space figures above (kept a few seconds between scrapes).",
                    age.as_secs_f64(),
                );
            }
            Err(err) => log::warn!("metrics: reading the store's space: {err}"),
        }
        match self.vol.snap_list(false) {
            Ok(list) => {
                let s = Snapshots::of(&list);
                e.gauge("dedupfs_snapshots", "Snapshots kept.", s.count as f64);
                if let Some(n) = s.newest {
                    e.gauge(
                        "dedupfs_newest_snapshot_timestamp_seconds",
                        "Unix time the newest snapshot was taken.",
                        n.created_unix as f64,
                    );
                }
            }
            Err(err) => log::warn!("metrics: listing snapshots: {err}"),
        }
        e.gauge(
            "dedupfs_passthrough",
            "1 when the kernel agreed to FUSE passthrough.",
            if self.vol.passthrough() { 1.0 } else { 0.0 },
        );
        e.gauge(
            "dedupfs_uptime_seconds",
            "Seconds since the volume started.",
            self.vol.uptime().as_secs_f64(),
        );
        e.finish()
    }
}

/// `dedupfs status` as text.
pub fn render_text(s: &Status) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{:<15} {v}\n", format!("{k}:")));
    line("store", s.store.clone());
    match &s.mountpoint {
        Some(m) => line("mounted on", m.clone()),
        None => line("mounted on", "(not mounted)".into()),
    }
    if let Some(t) = &s.transport {
        let pt = if t.passthrough { "on" } else { "off" };
        line(
            "transport",
            format!("{} {}, passthrough {pt}", t.device, t.mode),
        );
    }
    if let Some(u) = s.uptime_secs {
        line("up", format!("{u} s"));
    }
    if let Some(i) = &s.ingest {
        let b = &i.backlog;
        line(
            "pending ingest",
            format!(
                "{} files queued, {} staged ({}), {} to chunk",
                b.queued_files,
                b.staged_files,
                human(b.staged_bytes),
                human(b.pending_bytes)
            ),
        );
        line(
            "last commit",
            match &i.last_commit {
                Some(t) => format!("{t} ({} since mount)", count(i.commits, "commit")),
                None => "none since mount".into(),
            },
        );
    }
    let sp = &s.space;
    line(
        "space",
        format!(
            "{} logical, {} stored, {} dead, {} metadata",
            human(sp.logical_bytes),
            human(sp.stored_bytes),
            human(sp.dead_bytes),
            human(sp.metadata_bytes)
        ),
    );
    line(
        "snapshots",
        match &s.snapshots.newest {
            Some(n) => format!("{}, newest {} ({})", s.snapshots.count, n.name, n.created),
            None => "none".into(),
        },
    );
    if let Some(r) = &s.requests {
        // Errors include the expected ones (ENOENT, ENODATA of xattr probes).
        line(
            "requests",
            format!(
                "{} since mount, {}",
                r.total,
                count(r.errors, "error reply")
            ),
        );
    }
    out
}

fn count(n: u64, what: &str) -> String {
    crate::cli::count(n, what)
}

fn human(n: u64) -> String {
    crate::cli::human(n, 1)
}

/// The metrics page over HTTP (`-o metrics=ADDR`): answers `GET /metrics`
/// on its own thread until dropped.
///
/// Hand-written rather than a crate: one route, one response per
/// connection (`Connection: close`), scrapes seconds apart, so a loop
/// over `accept` on one thread is all it takes, and the daemon gains no
/// dependencies. Requests are read with a time limit and a size cap, so a
/// client that stalls delays the next scrape, not the filesystem.
pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What the HTTP server serves: called once per scrape.
pub type Page = dyn Fn() -> String + Send + Sync;

const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
const HTTP_REQUEST_MAX: usize = 8192;

impl HttpServer {
    /// Listens on `addr`. A non-loopback address is refused unless
    /// `remote` (the `metrics_remote` mount option): the page says what
    /// the store holds and how busy it is.
    pub fn start(addr: SocketAddr, remote: bool, page: Arc<Page>) -> io::Result<HttpServer> {
        if !addr.ip().is_loopback() && !remote {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "metrics address {addr} is not loopback; add the mount option \
                     metrics_remote to serve it beyond this machine"
                ),
            ));
        }
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        log::info!("serving metrics on http://{addr}/metrics");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn(move || {
                // Blocking accept, woken at drop by a connection of our own
                // (as in `ctl::Server`).
                loop {
                    let accepted = listener.accept();
                    if stop2.load(Ordering::Relaxed) {
                        return;
                    }
                    match accepted {
                        Ok((conn, _)) => {
                            if let Err(e) = answer(conn, &*page) {
                                log::debug!("metrics http: {e}");
                            }
                        }
                        Err(e) => {
                            log::warn!("metrics http: {e}");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            })?;
        Ok(HttpServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on (with the port the system chose for 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // A wildcard address is reached through loopback.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        log::info!("stopped serving metrics on {}", self.addr);
    }
}

/// Reads one request head and answers it. The head must arrive within
/// `HTTP_TIMEOUT` in all: a per-read limit alone let a client trickling a
/// byte at a time hold the thread, and so the unmount that joins it.
fn answer(mut conn: TcpStream, page: &Page) -> io::Result<()> {
    conn.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let deadline = Instant::now() + HTTP_TIMEOUT;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > HTTP_REQUEST_MAX {
            return respond(&mut conn, "431 Request Header Fields Too Large", "", false);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head too slow",
            ));
        }
        conn.set_read_timeout(Some(left))?;
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut first = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => respond(&mut conn, "200 OK", &page(), method == "HEAD"),
        ("GET" | "HEAD", _) => respond(&mut conn, "404 Not Found", "try /metrics\n", false),
        _ => respond(&mut conn, "405 Method Not Allowed", "", false),
    }
}

fn respond(conn: &mut TcpStream, status: &str, body: &str, head_only: bool) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        crate::metrics::CONTENT_TYPE,
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    conn.write_all(out.as_bytes())?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, req: &str) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn http_serves_the_page_and_stops_at_drop() {
        let page: Arc<Page> =
            Arc::new(|| "# HELP dedupfs_x x\n# TYPE dedupfs_x gauge\ndedupfs_x 1\n".into());
        let s = HttpServer::start("127.0.0.1:0".parse().unwrap(), false, page).unwrap();
        let addr = s.addr();
        let r = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("version=0.0.4"), "{r}");
        let body = r.split("\r\n\r\n").nth(1).unwrap();
        assert_eq!(crate::metrics::parse(body).unwrap().len(), 1);
        assert!(get(addr, "GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        drop(s);
        assert!(
            TcpStream::connect(addr).is_err(),
            "still listening after drop"
        );
    }

    #[test]
    fn metrics_options_come_out_of_the_list() {
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (at, rest) = metrics_options(&o(&["ro", "metrics=127.0.0.1:9477", "noatime"])).unwrap();
        assert_eq!(at, Some(("127.0.0.1:9477".parse().unwrap(), false)));
        assert_eq!(rest, o(&["ro", "noatime"]));
        let (at, rest) = metrics_options(&o(&["metrics_remote", "metrics=[::]:1"])).unwrap();
        assert_eq!(at, Some(("[::]:1".parse().unwrap(), true)));
        assert!(rest.is_empty());
        assert_eq!(metrics_options(&o(&["x"])).unwrap().0, None);
        assert!(metrics_options(&o(&["metrics=localhost"])).is_err());
    }

    #[test]
    fn http_refuses_remote_addresses_unless_allowed() {
        let page: Arc<Page> = Arc::new(String::new);
        let e = HttpServer::start("0.0.0.0:0".parse().unwrap(), false, page.clone())
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        let s = HttpServer::start("0.0.0.0:0".parse().unwrap(), true, page).unwrap();
        drop(s);
    }
}
