//! The live filesystem over a repo: POSIX semantics on versioned meta
//! records, the staging write path, the ingest pool and the reaper. Knows
//! nothing of fuser; `fs::mod` translates requests.
//!
//! This file holds the core every part shares: the `Volume` state, start
//! and shutdown, the meta write transaction (`meta_write`), space checks
//! and attributes. The rest is split by what it holds, each an `impl
//! Volume` block: `ns` (the namespace and xattrs), `data` (open, read,
//! write, fsync, copy_file_range), `stage` (staging files and their crash
//! recovery), `ingest` (staging to chunks, and the commit), `upkeep` (the
//! flusher, reaper, reclaim and meta compaction) and `snap` (snapshots as
//! the live volume serves them, over `crate::snap`).
//!
//! Lock order: `content_lock` -> a `Staged` lock (in ascending ino) -> the
//! small maps (`staged`, `open`, `handles`, caches). No lock is held across
//! chunking; ingest holds `content_lock` and the staged locks only across its
//! commit.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

use lru::LruCache;
use parking_lot::{Condvar, Mutex};
use redb::{Durability, ReadableTable};

use super::Error;
use super::acl;
use super::staging::{self, ChunkMap, Piece, RangeSet, Sidecar, Staged, StagedView};
use crate::format::{self, ChunkId, ChunkRef, Content, InodeRec, Kind, LIVE, OwnerId, Timespec};
use crate::meta::{self, Gens};
use crate::metrics::Cache;
use crate::repo::Repo;
use crate::store::{self, Batch};

mod data;
mod ingest;
mod ns;
mod report;
mod snap;
mod stage;
mod upkeep;
use self::{ingest::*, ns::*, stage::*, upkeep::*};
pub use crate::snap::{DeleteReport, DiffEntry, SnapInfo, SnapRec, load_snaps, validate_name};
pub use report::Backlog;
pub use snap::{Invalidate, RestoreReport, RollbackReport, SNAPDIR_INO, SNAPDIR_NAME, is_snap_ino};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Content at most this long lives in the inode record.
pub const INLINE_MAX: u64 = 128;
pub const NAME_MAX: usize = 255;
use crate::ingest::{HOLE_MIN, list_ref_change};
/// `Staged::version` of a staging state that still equals the committed
/// file (nothing written, truncated or re-timed since it was staged).
const UNTOUCHED: u64 = 1;
/// Free space kept back for database commits (see `check_space`).
const SPACE_RESERVE: u64 = 8 << 20;
/// Free space below which not even removals and syncs are tried.
const SPACE_FLOOR: u64 = 1 << 20;
/// Group commit bounds for ingest.
const INGEST_GROUP_FILES: usize = 512;
const INGEST_GROUP_BYTES: u64 = 128 << 20;
/// How long ingest waits for more closed files before committing a group.
const INGEST_GATHER: Duration = Duration::from_millis(250);

/// Attributes as the kernel sees them.
#[derive(Clone, Debug)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub perm: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub btime: Timespec,
    /// Bytes of `size` that take no space (holes): st_blocks leaves them
    /// out.
    pub holes: u64,
}

/// What to change in `setattr`; `None` leaves a field alone.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Timespec>,
    pub mtime: Option<Timespec>,
    pub ctime: Option<Timespec>,
}

/// What a change does to the store's free space (see `check_space`).
#[derive(Clone, Copy, Debug)]
enum Space {
    /// Adds metadata.
    Grows,
    /// Adds about this many bytes of data, and metadata.
    Data(u64),
    /// Frees space (or only makes earlier changes durable).
    Frees,
}

/// Who is asking.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

struct Handle {
    ino: u64,
    write: bool,
    append: bool,
    /// Opened through kernel passthrough: reads and writes go to the
    /// staging file without us.
    pt: bool,
}

/// The staging file the kernel reads and writes for a file's passthrough
/// handles. The kernel wants every open of an inode that has one to use
/// the same backing file, so this outlives the `Staged` entry: a file
/// committed while a passthrough reader is open keeps its staging file,
/// and a new writer stages into it again.
struct PtFile {
    file: Arc<File>,
    handles: u32,
}

/// A new handle, and the file to hand the kernel for passthrough if the
/// handle should use it.
pub struct Opened {
    pub fh: u64,
    pub backing: Option<Arc<File>>,
    /// The kernel may keep the file's cached pages: nothing changed it
    /// since the last open that read it through the daemon.
    pub keep_cache: bool,
}

/// What a file looked like when an open last let the kernel cache it:
/// (mtime, ctime, size). Every change of content moves ctime.
type CacheStamp = (Timespec, Timespec, u64);

/// A staging file whose file is committed, renamed `spare.N` and waiting
/// to stage a new file (`retire_staging`, `take_spare`).
struct Spare {
    file: Arc<File>,
    /// The state that staged it: the bytes may change only once that is
    /// gone and no view of the file is left.
    owner: std::sync::Weak<Mutex<Staged>>,
    path: PathBuf,
    /// Made empty by `prepare_spares` (never assumed from the retired
    /// state: a failed write can leave bytes past its size).
    empty: bool,
    /// Carries the whole-file tag, which a new file wants anyway.
    tagged: bool,
}

/// Spares kept at most, and the largest file kept (their bytes stay on
/// disk until `prepare_spares` empties them: at most 64 MiB).
const SPARES_MAX: usize = 256;
const SPARE_MAX_BYTES: u64 = 256 << 10;

/// Listings being read, at most this many at once (a listing is dropped
/// when its end has been read; abandoned ones age out).
const LISTINGS_MAX: usize = 64;

/// A directory listing handed out in pieces. Directories are not opened
/// (the kernel sends no OPENDIR or RELEASEDIR, see `fs::DedupFs::opendir`),
/// so a readdir offset names its listing: the high 32 bits are the
/// listing's id, the low 32 the position after the entry. Entries added or
/// removed while a listing is read neither shift nor repeat the others.
pub struct Listing {
    pub id: u32,
    pub entries: Arc<Vec<DirEntry>>,
    /// Index of the first entry to return.
    pub start: usize,
}

impl Listing {
    /// The readdir offset that resumes after entry `i`.
    pub fn offset_after(&self, i: usize) -> u64 {
        (u64::from(self.id) << 32) | (i as u64 + 1)
    }
}

pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: Kind,
}

enum Msg {
    Ingest(u64),
    Reap,
    Stop,
}

/// Where a new version of a file's bytes ends up.
enum NewContent {
    Inline(Vec<u8>),
    Chunked(Vec<ChunkRef>),
}

pub struct Volume {
    repo: Repo,
    staging_dir: PathBuf,
    pub read_only: bool,
    staged: Mutex<HashMap<u64, Arc<Mutex<Staged>>>>,
    open: Mutex<HashMap<u64, u32>>,
    handles: Mutex<HashMap<u64, Handle>>,
    /// Files with passthrough handles open (see `PtFile`).
    pt: Mutex<HashMap<u64, PtFile>>,
    /// Set by the fuser layer once the kernel has agreed to passthrough;
    /// cleared when registering a backing file fails.
    passthrough: AtomicBool,
    /// Handles opened with passthrough, and write requests (and bytes)
    /// the daemon served itself; logged at unmount (the mount tests read
    /// them to tell the two paths apart).
    pt_opens: AtomicU64,
    daemon_writes: AtomicU64,
    daemon_write_bytes: AtomicU64,
    listings: Mutex<LruCache<u32, Arc<Vec<DirEntry>>>>,
    next_listing: AtomicU32,
    next_fh: AtomicU64,
    /// Staging files of committed files, kept to be reused (`take_spare`).
    spares: Mutex<Vec<Spare>>,
    next_spare: AtomicU64,
    maps: Mutex<LruCache<u64, Arc<ChunkMap>>>,
    /// Per inode, the stamp of the last read-only open through the daemon.
    cached: Mutex<LruCache<u64, CacheStamp>>,
    /// Bumped after every commit that changes chunk lists, before the
    /// changed maps are popped from `maps`.
    map_epoch: AtomicU64,
    chunks: Mutex<LruCache<ChunkId, Arc<Vec<u8>>>>,
    content_lock: Mutex<()>,
    /// Files whose staging state is being built (`Claim`). `stage_new_file`
    /// does not take `content_lock`, so without this an open of a name
    /// between its CREATE's commit and reply could build a second state
    /// on the same staging file, and the map kept whichever came last:
    /// the creator's writes then went to an entry ingest never saw.
    building: Mutex<std::collections::HashSet<u64>>,
    queue: Mutex<Option<SyncSender<Msg>>>,
    /// Files queued for ingest and not yet committed, with a condvar that
    /// fires when the count drops.
    pending: Mutex<u64>,
    pending_cv: Condvar,
    /// Meta commits made without fsync so far (counted once committed),
    /// and how many of them a durable commit is known to cover. Counters,
    /// not a flag: ingest used to clear a "dirty" flag after its durable
    /// commit, wiping the mark of a lazy commit made just after it, so the
    /// next fsync skipped its durable commit and a crash lost a file that
    /// fsync had reported safe.
    lazy_commits: AtomicU64,
    durable_upto: AtomicU64,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Set at shutdown, waking the flusher out of its wait. Why: it slept
    /// two seconds between syncs and shutdown joins it, so every unmount
    /// took a second more on average. Shared, so the flusher holds no
    /// strong reference while it waits (the volume drops, and its store
    /// unlocks, when its owner lets go).
    flush_stop: Arc<(Mutex<bool>, Condvar)>,
    /// Ingest is waiting for space (logged once until it has room again).
    ingest_short: AtomicBool,
    /// An ingest failed for want of space; the flusher queues idle staged
    /// files again (nothing else would before the next close or mount).
    retry_ingest: AtomicBool,
    /// Bumped after every commit that may leave an orphan (an inode with
    /// no name left), and how far a reap found none left at all: a close
    /// asks for a reap only while these differ. Why: every last close
    /// woke an ingest worker to scan the orphan table, an untar's worth
    /// of wake-ups and read transactions for nothing.
    orphan_seq: AtomicU64,
    orphans_clean_upto: AtomicU64,
    /// Set when a commit failed in a way that leaves memory and disk apart.
    failed: AtomicBool,
    /// Last free-space reading of the store's disk and when it was taken.
    free_space: Mutex<Option<(std::time::Instant, u64)>>,
    /// When the volume started, and the last request since then (whole
    /// seconds): meta.redb is compacted only after a quiet spell.
    started: std::time::Instant,
    last_request: AtomicU64,
    snaps: snap::SnapState,
    /// Tells the kernel to forget cached entries and pages (set by the
    /// fuser layer once a session exists).
    invalidator: Mutex<Option<Invalidator>>,
    /// Request, cache and ingest counters (see `crate::metrics`).
    metrics: crate::metrics::Metrics,
}

pub type Invalidator = Box<dyn Fn(Invalidate) + Send + Sync>;

fn io_err(context: &str, e: io::Error) -> Error {
    Error::Store(store::Error::io(context, e))
}

impl Volume {
    /// Opens the filesystem on a repo, replays staged writes a crash left,
    /// and starts the ingest pool.
    pub fn start(repo: Repo, read_only: bool, threads: usize) -> Result<Arc<Volume>> {
        let uid = std::env::var("SUDO_UID")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        meta::ensure_fs(&repo.meta(), uid, uid)?;
        let staging_dir = repo.dir().join("staging");
        fs::create_dir_all(&staging_dir).map_err(|e| io_err("creating staging/", e))?;
        let (tx, rx) = sync_channel::<Msg>(4096);
        let cap = |n| NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN);
        let vol = Arc::new(Volume {
            repo,
            staging_dir,
            read_only,
            staged: Mutex::new(HashMap::new()),
            open: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            pt: Mutex::new(HashMap::new()),
            passthrough: AtomicBool::new(false),
            pt_opens: AtomicU64::new(0),
            daemon_writes: AtomicU64::new(0),
            daemon_write_bytes: AtomicU64::new(0),
            listings: Mutex::new(LruCache::new(
                NonZeroUsize::new(LISTINGS_MAX).unwrap_or(NonZeroUsize::MIN),
            )),
            next_listing: AtomicU32::new(1),
            next_fh: AtomicU64::new(1),
            spares: Mutex::new(Vec::new()),
            next_spare: AtomicU64::new(0),
            maps: Mutex::new(LruCache::new(cap(1024))),
            cached: Mutex::new(LruCache::new(cap(16384))),
            map_epoch: AtomicU64::new(0),
            chunks: Mutex::new(LruCache::new(cap(512))),
            content_lock: Mutex::new(()),
            building: Mutex::new(std::collections::HashSet::new()),
            queue: Mutex::new(Some(tx)),
            pending: Mutex::new(0),
            pending_cv: Condvar::new(),
            lazy_commits: AtomicU64::new(0),
            durable_upto: AtomicU64::new(0),
            workers: Mutex::new(Vec::new()),
            flush_stop: Arc::new((Mutex::new(false), Condvar::new())),
            ingest_short: AtomicBool::new(false),
            retry_ingest: AtomicBool::new(false),
            // Orphans a crash left are reaped at start.
            orphan_seq: AtomicU64::new(1),
            orphans_clean_upto: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            free_space: Mutex::new(None),
            started: std::time::Instant::now(),
            last_request: AtomicU64::new(0),
            snaps: snap::SnapState::default(),
            invalidator: Mutex::new(None),
            metrics: crate::metrics::Metrics::default(),
        });
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let v = Arc::downgrade(&vol);
            let rx = rx.clone();
            let h = std::thread::Builder::new()
                .name(format!("ingest-{i}"))
                .spawn(move || ingest_loop(v, rx))
                .map_err(|e| io_err("starting ingest", e))?;
            vol.workers.lock().push(h);
        }
        {
            let v = Arc::downgrade(&vol);
            let stop = vol.flush_stop.clone();
            let h = std::thread::Builder::new()
                .name("meta-flush".into())
                .spawn(move || flush_loop(v, &stop))
                .map_err(|e| io_err("starting flusher", e))?;
            vol.workers.lock().push(h);
        }
        if !read_only {
            let v = Arc::downgrade(&vol);
            let stop = vol.flush_stop.clone();
            let h = std::thread::Builder::new()
                .name("reclaim".into())
                .spawn(move || reclaim_loop(v, &stop))
                .map_err(|e| io_err("starting reclaimer", e))?;
            vol.workers.lock().push(h);
        }
        if !read_only {
            vol.recover_staging()?;
            vol.orphans_changed();
        }
        Ok(vol)
    }

    pub fn set_invalidator(&self, f: Invalidator) {
        *self.invalidator.lock() = Some(f);
    }

    /// Whether readdir of the root lists `.snapshots`.
    pub fn show_snapdir(&self, yes: bool) {
        self.snaps.visible.store(yes, Ordering::Relaxed);
    }

    pub fn repo(&self) -> &Repo {
        &self.repo
    }

    /// Runs `f` with no ingest or reaper commit in flight, so references in
    /// meta and counts in the index agree while it looks (fsck).
    pub fn quiesced<T>(&self, f: impl FnOnce(&Repo) -> T) -> T {
        self.wait_ingest_idle();
        let _c = self.content_lock.lock();
        f(&self.repo)
    }

    fn send(&self, m: Msg) {
        if let Some(q) = self.queue.lock().as_ref()
            && q.send(m).is_err()
        {
            log::error!("ingest queue is gone");
        }
    }

    /// Finishes pending ingest, stops the workers, makes metadata durable.
    /// Call it once the kernel can send no more requests (the session has
    /// ended): handles still open then are closed here.
    pub fn shutdown(&self) {
        // A RELEASE the kernel had queued when the unmount's DESTROY
        // overtook it is dropped with the connection: the file it closed
        // kept a writer and stayed staged, so a clean unmount left it for
        // the next mount to replay (and `stats` after the unmount did not
        // count it). The kernel is gone; close what it never closed.
        let open: Vec<u64> = self.handles.lock().keys().copied().collect();
        if !open.is_empty() {
            log::info!("closing {} handles the kernel never released", open.len());
        }
        for fh in open {
            if let Err(e) = self.release(fh) {
                log::warn!("closing handle {fh} at shutdown: {e}");
            }
        }
        self.wait_ingest_idle();
        // Files whose ingest failed (a full disk) are still only staged:
        // one more try, and whatever is left gets a synced sidecar so the
        // next mount replays it. Before, a closed file whose sidecar write
        // had failed was dropped at the next mount.
        self.queue_idle_staged();
        self.wait_ingest_idle();
        let left: Vec<_> = self
            .staged
            .lock()
            .iter()
            .map(|(i, st)| (*i, st.clone()))
            .collect();
        for (ino, st) in left {
            if let Err(e) = self.commit_share(ino, &st) {
                log::error!("inode {ino}: committing a shared copy at shutdown: {e}");
            }
            let mut s = st.lock();
            s.sync_file_mtime();
            if let Err(e) = s
                .refresh()
                .and_then(|_| s.file.sync_data())
                .and_then(|_| write_sidecar(&s, true))
            {
                log::error!("inode {} stays staged and could not be synced: {e}", s.ino);
            }
        }
        self.reap_orphans();
        let q = self.queue.lock().take();
        if let Some(q) = q {
            let n = self.workers.lock().len();
            for _ in 0..n {
                let _ = q.send(Msg::Stop);
            }
        }
        *self.flush_stop.0.lock() = true;
        self.flush_stop.1.notify_all();
        let hs: Vec<_> = self.workers.lock().drain(..).collect();
        for h in hs {
            let _ = h.join();
        }
        if let Err(e) = self.sync_meta() {
            log::error!("final metadata sync failed: {e}");
        }
        for sp in self.spares.lock().drain(..) {
            let _ = fs::remove_file(&sp.path);
        }
        log::info!(
            "passthrough opens {}, write requests served by the daemon {} ({} bytes)",
            self.pt_opens.load(Ordering::Relaxed),
            self.daemon_writes.load(Ordering::Relaxed),
            self.daemon_write_bytes.load(Ordering::Relaxed)
        );
    }

    /// The kernel agreed to passthrough (or, with false, it failed).
    pub fn set_passthrough(&self, on: bool) {
        self.passthrough.store(on, Ordering::SeqCst);
    }

    pub fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::SeqCst)
    }

    /// Queues every staged file with no writer that is not queued already.
    fn queue_idle_staged(&self) {
        let all: Vec<(u64, Arc<Mutex<Staged>>)> = self
            .staged
            .lock()
            .iter()
            .map(|(i, s)| (*i, s.clone()))
            .collect();
        for (ino, st) in all {
            let idle = st.lock().writers == 0;
            if idle {
                self.queue_ingest(ino, &st);
            }
        }
    }

    /// Blocks until nothing is queued for ingest.
    pub fn wait_ingest_idle(&self) {
        let mut p = self.pending.lock();
        while *p > 0 {
            self.pending_cv.wait_for(&mut p, Duration::from_millis(200));
        }
    }

    /// Blocks until no file is staged at all (every writer closed and its
    /// data committed), or `limit` passes; returns whether it got there.
    /// FUSE sends a release after close(2) has returned, so waiting for the
    /// ingest queue alone can miss a file just closed.
    pub fn wait_all_committed(&self, limit: Duration) -> bool {
        let start = std::time::Instant::now();
        loop {
            self.wait_ingest_idle();
            if self.staged.lock().is_empty() {
                return true;
            }
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The staged state of a file. The map's lock is released before the
    /// caller locks the entry (lock order: entry, then map).
    fn staged_of(&self, ino: u64) -> Option<Arc<Mutex<Staged>>> {
        self.staged.lock().get(&ino).cloned()
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::Errno(libc::EROFS));
        }
        if self.failed.load(Ordering::Relaxed) {
            return Err(Error::Errno(libc::EIO));
        }
        Ok(())
    }

    // ------------------------------------------------------------ meta txns

    /// Runs `f` in one meta write transaction. The commit skips fsync;
    /// the flusher (or the next durable commit) persists it.
    fn meta_write<T>(
        &self,
        space: Space,
        f: impl FnOnce(&mut MetaTx<'_>) -> Result<T>,
    ) -> Result<T> {
        self.check_writable()?;
        self.check_space(space)?;
        let mut tx = self.repo.meta().begin_write().map_err(store::Error::from)?;
        tx.set_durability(Durability::None)
            .map_err(|e| Error::Store(store::Error::Db(e.to_string())))?;
        let out = {
            let st = tx.open_table(meta::STATE).map_err(store::Error::from)?;
            let g = Gens::load(&st)?;
            let mut m = MetaTx {
                t: meta::Versioned::open(&tx, g)?,
                orphans: meta::Lazy::new(&tx, meta::ORPHANS),
                state: st,
            };
            f(&mut m)?
        };
        tx.commit().map_err(store::Error::from)?;
        self.lazy_commits.fetch_add(1, Ordering::SeqCst);
        Ok(out)
    }

    /// Makes every metadata commit so far durable.
    pub fn sync_meta(&self) -> Result<()> {
        // Every lazy commit counted here has completed; redb serialises
        // writers, so a durable commit begun after this load covers them.
        let seen = self.lazy_commits.load(Ordering::SeqCst);
        if self.durable_upto.load(Ordering::SeqCst) >= seen || self.read_only {
            return Ok(());
        }
        self.check_space(Space::Frees)?;
        let tx = self.repo.meta().begin_write().map_err(store::Error::from)?;
        tx.commit().map_err(store::Error::from)?;
        self.durable_upto.fetch_max(seen, Ordering::SeqCst);
        Ok(())
    }

    /// Refuses with ENOSPC, before any database sees it, a change the
    /// store's filesystem may not have room for.
    ///
    /// Why: redb treats an I/O error inside a commit (ENOSPC included) as
    /// fatal for the open database; every later write transaction fails
    /// with PreviousIo until it is reopened. A full disk therefore turned
    /// into EIO on every write for the rest of the mount, even after space
    /// came back. Our own data (staging, packs) stops `SPACE_RESERVE` short
    /// of full, so the commits that follow always have room; removals may
    /// dip into the reserve (so space can be freed from inside), down to
    /// `SPACE_FLOOR`, which only someone else's writes can break through.
    fn check_space(&self, space: Space) -> Result<()> {
        // Room for gc to compact a whole pack too: deleting files frees
        // their space only once the packs holding them are rewritten (or
        // punched), and with the disk full to the old 8 MiB reserve no
        // pack could be, so deleting freed nothing (as ext4 keeps blocks
        // back for root, this keeps a pack's worth back for gc).
        let reserve = SPACE_RESERVE.max(
            self.repo
                .store()
                .config()
                .pack_target_bytes
                .saturating_add(SPACE_FLOOR),
        );
        let want = match space {
            Space::Grows => reserve,
            Space::Data(n) => reserve.saturating_add(n),
            Space::Frees => SPACE_FLOOR,
        };
        // statvfs on every write and create showed in profiles; a reading
        // under 100 ms old will do while the disk is far from the limit.
        // Near it, ask every time so ENOSPC comes exactly when it should.
        const FRESH: Duration = Duration::from_millis(100);
        const SLACK: u64 = 256 << 20;
        let cached = *self.free_space.lock();
        let avail = match cached {
            Some((at, avail)) if at.elapsed() < FRESH && avail > want.saturating_add(SLACK) => {
                avail
            }
            _ => {
                let s = rustix::fs::statvfs(self.repo.dir())
                    .map_err(|e| io_err("statvfs", e.into()))?;
                let avail = s.f_bavail.saturating_mul(s.f_frsize);
                *self.free_space.lock() = Some((std::time::Instant::now(), avail));
                avail
            }
        };
        if avail < want {
            return Err(Error::Errno(libc::ENOSPC));
        }
        Ok(())
    }

    fn read_inode(&self, ino: u64) -> Result<InodeRec> {
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        let t = rt.open_table(meta::INODES).map_err(store::Error::from)?;
        meta::live_inode(&t, ino)?
            .map(|(_, r)| r)
            .ok_or(Error::Errno(libc::ENOENT))
    }

    /// The attributes of a live inode whose record `rec` was read (or
    /// written) after `epoch` was loaded from `map_epoch`.
    ///
    /// Why the epoch: a staged file's size and times are the staged
    /// state's until ingest commits them and drops the entry. A record read
    /// before that commit, with the entry gone by the time we looked for
    /// it, gave a size from many writes ago; the kernel kept it for the
    /// attribute TTL (fsx with close/reopen saw "Size error"). Every such
    /// commit bumps `map_epoch` before the entry goes, so a record read
    /// under an unchanged epoch is at least as new as any commit whose
    /// entry we missed; otherwise read it again.
    fn attr_settled(&self, ino: u64, epoch: u64, rec: InodeRec) -> Result<Attr> {
        let st = self.staged_of(ino);
        if st.is_none() && self.map_epoch.load(Ordering::SeqCst) != epoch {
            let epoch = self.map_epoch.load(Ordering::SeqCst);
            let rec = self.read_inode(ino)?;
            return self.attr_settled(ino, epoch, rec);
        }
        Ok(self.attr_with(ino, &rec, st))
    }

    /// The attributes of a record no staged state can change (inside a
    /// snapshot).
    fn attr_of(&self, ino: u64, rec: &InodeRec) -> Attr {
        self.attr_with(ino, rec, None)
    }

    fn attr_with(&self, ino: u64, rec: &InodeRec, st: Option<Arc<Mutex<Staged>>>) -> Attr {
        let mut a = Attr {
            ino,
            kind: rec.kind,
            perm: rec.perm,
            nlink: rec.nlink,
            uid: rec.uid,
            gid: rec.gid,
            rdev: rec.rdev,
            size: rec.size,
            atime: rec.atime,
            mtime: rec.mtime,
            ctime: rec.ctime,
            btime: rec.btime,
            holes: match rec.content {
                Content::Chunked => rec.holes.min(rec.size),
                _ => 0,
            },
        };
        if let Some(st) = st {
            let mut st = st.lock();
            refresh(&mut st);
            a.size = st.size;
            a.mtime = st.mtime;
            a.ctime = a.ctime.max(st.ctime);
            a.holes = st.holes_bound(HOLE_MIN);
        }
        a
    }

    // ------------------------------------------------------------ lookups

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        if is_snap_ino(ino) {
            return self.snap_getattr(ino);
        }
        let epoch = self.map_epoch.load(Ordering::SeqCst);
        let rec = self.read_inode(ino)?;
        self.attr_settled(ino, epoch, rec)
    }
}

/// The tables of one meta write transaction.
struct MetaTx<'t> {
    t: meta::Versioned<'t>,
    orphans: meta::Lazy<'t, u64, u64>,
    state: redb::Table<'t, &'static str, u64>,
}

impl MetaTx<'_> {
    fn inode(&mut self, ino: u64) -> Result<InodeRec> {
        meta::live_inode(&*self.t.inodes.get()?, ino)?
            .map(|(_, r)| r)
            .ok_or(Error::Errno(libc::ENOENT))
    }

    fn dir(&mut self, ino: u64) -> Result<InodeRec> {
        let r = self.inode(ino)?;
        if r.kind != Kind::Dir {
            return Err(Error::Errno(libc::ENOTDIR));
        }
        Ok(r)
    }

    fn adjust_nlink(&mut self, ino: u64, by: i32) -> Result<()> {
        let mut r = self.inode(ino)?;
        r.nlink = (r.nlink as i64 + by as i64).max(0) as u32;
        Ok(self.t.write_inode(ino, &r)?)
    }

    /// One name of `ino` is gone; at zero links it becomes an orphan.
    fn drop_link(&mut self, ino: u64, is_dir: bool) -> Result<()> {
        let mut r = self.inode(ino)?;
        r.nlink = if is_dir { 0 } else { r.nlink.saturating_sub(1) };
        r.ctime = Timespec::now();
        self.t.write_inode(ino, &r)?;
        if r.nlink == 0 {
            self.orphans
                .get()?
                .insert(ino, self.t.g.current)
                .map_err(store::Error::from)?;
        }
        Ok(())
    }
}
