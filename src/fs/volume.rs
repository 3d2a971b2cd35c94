//! The live filesystem over a repo: POSIX semantics on versioned meta
//! records, the staging write path, the ingest pool and the reaper. Knows
//! nothing of fuser; `fs::mod` translates requests.
//!
//! Lock order: `content_lock` -> a `Staged` lock (in ascending ino) -> the
//! small maps (`staged`, `open`, `handles`, caches). No lock is held across
//! chunking; ingest holds `content_lock` and the staged locks only across its
//! commit.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
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
use crate::repo::Repo;
use crate::store::{self, Batch};

mod snap;
pub use crate::snap::{DeleteReport, DiffEntry, SnapInfo, SnapRec, load_snaps, validate_name};
pub use snap::{Invalidate, RestoreReport, RollbackReport, SNAPDIR_INO, SNAPDIR_NAME, is_snap_ino};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Content at most this long lives in the inode record.
pub const INLINE_MAX: u64 = 128;
pub const NAME_MAX: usize = 255;
/// A stretch of a file that reads as zeros without being stored (a hole of
/// its staging file, of its old chunk list, or past what was written) is
/// listed as a hole instead of chunked if it is at least this long. Why:
/// `truncate -s 1T` chunked and hashed a terabyte of zeros at ingest and
/// listed the zero chunk 16 million times. Shorter holes are chunked with
/// the data around them, so an ordinary file chunks the same whether its
/// zeros were written or skipped.
const HOLE_MIN: u64 = 1 << 20;
/// The longest hole entry (a chunk list length is a u32).
const HOLE_ENTRY_MAX: u64 = 1 << 31;
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

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        if is_snap_ino(parent) {
            return self.snap_lookup(parent, name);
        }
        if parent == meta::ROOT_INO && name == SNAPDIR_NAME {
            return self.snapdir_attr();
        }
        check_name(name)?;
        let epoch = self.map_epoch.load(Ordering::SeqCst);
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        let d = rt.open_table(meta::DIRENTS).map_err(store::Error::from)?;
        let (_, ent) = meta::lookup_dirent(&d, parent, name)?.ok_or(Error::Errno(libc::ENOENT))?;
        let t = rt.open_table(meta::INODES).map_err(store::Error::from)?;
        let (_, rec) = meta::live_inode(&t, ent.ino)?.ok_or(Error::Errno(libc::ENOENT))?;
        self.attr_settled(ent.ino, epoch, rec)
    }

    /// The inode a live name points at, if any (no attributes read).
    pub fn child_ino(&self, parent: u64, name: &[u8]) -> Option<u64> {
        if is_snap_ino(parent) || check_name(name).is_err() {
            return None;
        }
        let rt = self.repo.meta().begin_read().ok()?;
        let d = rt.open_table(meta::DIRENTS).ok()?;
        meta::lookup_dirent(&d, parent, name)
            .ok()?
            .map(|(_, e)| e.ino)
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        if is_snap_ino(ino) {
            return self.snap_readlink(ino);
        }
        let rec = self.read_inode(ino)?;
        match (rec.kind, rec.content) {
            (Kind::Symlink, Content::Inline(t)) => Ok(t),
            _ => Err(Error::Errno(libc::EINVAL)),
        }
    }

    // ------------------------------------------------------------ creation

    /// Creates an inode and links it at (parent, name).
    #[allow(clippy::too_many_arguments)]
    pub fn make_node(
        &self,
        who: Caller,
        parent: u64,
        name: &[u8],
        kind: Kind,
        mode: u32,
        umask: u32,
        rdev: u32,
        target: Option<&[u8]>,
    ) -> Result<Attr> {
        check_name(name)?;
        refuse_snap_name(parent, name, libc::EEXIST)?;
        let epoch = self.map_epoch.load(Ordering::SeqCst);
        let (ino, rec) = self.meta_write(Space::Grows, |m| {
            let mut p = m.dir(parent)?;
            if meta::lookup_dirent(&*m.t.dirents.get()?, parent, name)?.is_some() {
                return Err(Error::Errno(libc::EEXIST));
            }
            let ino = meta::alloc_ino(&mut m.state)?;
            let now = Timespec::now();
            // The kernel leaves the umask to us (FUSE_DONT_MASK): a parent's
            // default ACL replaces it (`posix_acl_create`).
            let parent_default = meta::get_xattr(&*m.t.xattrs.get()?, parent, acl::DEFAULT)?;
            let inherited = acl::inherit(
                parent_default.as_deref(),
                mode & 0o7777,
                umask,
                kind == Kind::Dir,
                kind == Kind::Symlink,
            )
            .map_err(|e| stored_acl_error(parent, &e))?;
            let mut perm = inherited.perm;
            let mut gid = who.gid;
            if p.perm & 0o2000 != 0 {
                // BSD group semantics under a set-group-id directory.
                gid = p.gid;
                if kind == Kind::Dir {
                    perm |= 0o2000;
                }
            }
            let (size, content) = match target {
                Some(t) => (t.len() as u64, Content::Inline(t.to_vec())),
                None => (0, Content::Empty),
            };
            let mut rec = InodeRec::new_live(kind, perm, who.uid, gid, now, parent, name);
            rec.rdev = rdev;
            rec.size = size;
            rec.content = content;
            m.t.write_inode(ino, &rec)?;
            if let Some(a) = &inherited.access {
                m.t.set_xattr(ino, acl::ACCESS, a)?;
            }
            if let Some(d) = &inherited.default {
                m.t.set_xattr(ino, acl::DEFAULT, d)?;
            }
            m.t.write_dirent(parent, name, ino, kind)?;
            if kind == Kind::Dir {
                p.nlink += 1;
            }
            p.mtime = now;
            p.ctime = now;
            m.t.write_inode(parent, &p)?;
            Ok((ino, rec))
        })?;
        self.attr_settled(ino, epoch, rec)
    }

    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<Attr> {
        refuse_snap(ino)?;
        refuse_snap_name(parent, name, libc::EEXIST)?;
        check_name(name)?;
        let epoch = self.map_epoch.load(Ordering::SeqCst);
        let rec = self.meta_write(Space::Grows, |m| {
            let mut p = m.dir(parent)?;
            let mut rec = m.inode(ino)?;
            if rec.kind == Kind::Dir {
                return Err(Error::Errno(libc::EPERM));
            }
            if meta::lookup_dirent(&*m.t.dirents.get()?, parent, name)?.is_some() {
                return Err(Error::Errno(libc::EEXIST));
            }
            let now = Timespec::now();
            rec.nlink += 1;
            rec.ctime = now;
            m.t.write_inode(ino, &rec)?;
            m.t.write_dirent(parent, name, ino, rec.kind)?;
            p.mtime = now;
            p.ctime = now;
            m.t.write_inode(parent, &p)?;
            Ok(rec)
        })?;
        self.attr_settled(ino, epoch, rec)
    }

    // ------------------------------------------------------------ removal

    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        refuse_snap_name(parent, name, libc::EROFS)?;
        check_name(name)?;
        self.meta_write(Space::Frees, |m| {
            let mut p = m.dir(parent)?;
            let (_, ent) = meta::lookup_dirent(&*m.t.dirents.get()?, parent, name)?
                .ok_or(Error::Errno(libc::ENOENT))?;
            if ent.kind == Kind::Dir {
                return Err(Error::Errno(libc::EISDIR));
            }
            m.t.remove_dirent(parent, name)?;
            m.drop_link(ent.ino, false)?;
            let now = Timespec::now();
            p.mtime = now;
            p.ctime = now;
            m.t.write_inode(parent, &p)?;
            Ok(())
        })?;
        self.orphans_changed();
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        refuse_snap_name(parent, name, libc::EROFS)?;
        check_name(name)?;
        if name == b"." {
            return Err(Error::Errno(libc::EINVAL));
        }
        if name == b".." {
            return Err(Error::Errno(libc::ENOTEMPTY));
        }
        self.meta_write(Space::Frees, |m| {
            let mut p = m.dir(parent)?;
            let (_, ent) = meta::lookup_dirent(&*m.t.dirents.get()?, parent, name)?
                .ok_or(Error::Errno(libc::ENOENT))?;
            if ent.kind != Kind::Dir {
                return Err(Error::Errno(libc::ENOTDIR));
            }
            if !meta::list_dir(&*m.t.dirents.get()?, ent.ino, Some(1))?.is_empty() {
                return Err(Error::Errno(libc::ENOTEMPTY));
            }
            m.t.remove_dirent(parent, name)?;
            m.drop_link(ent.ino, true)?;
            let now = Timespec::now();
            p.nlink = p.nlink.saturating_sub(1);
            p.mtime = now;
            p.ctime = now;
            m.t.write_inode(parent, &p)?;
            Ok(())
        })?;
        self.orphans_changed();
        Ok(())
    }

    pub fn rename(
        &self,
        who: Caller,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        check_name(name)?;
        check_name(newname)?;
        if is_snap_ino(parent) != is_snap_ino(newparent) {
            return Err(Error::Errno(libc::EXDEV));
        }
        refuse_snap_name(parent, name, libc::EROFS)?;
        refuse_snap_name(newparent, newname, libc::EROFS)?;
        const NOREPLACE: u32 = libc::RENAME_NOREPLACE;
        const EXCHANGE: u32 = libc::RENAME_EXCHANGE;
        // Leaves a whiteout (a 0/0 character device) where the source was,
        // as overlayfs asks of its upper filesystem; ext4 supports it.
        const WHITEOUT: u32 = libc::RENAME_WHITEOUT;
        if flags & !(NOREPLACE | EXCHANGE | WHITEOUT) != 0
            || flags & EXCHANGE != 0 && flags & (NOREPLACE | WHITEOUT) != 0
        {
            return Err(Error::Errno(libc::EINVAL));
        }
        self.meta_write(Space::Frees, |m| {
            let now = Timespec::now();
            let (_, src) = meta::lookup_dirent(&*m.t.dirents.get()?, parent, name)?
                .ok_or(Error::Errno(libc::ENOENT))?;
            let dst =
                meta::lookup_dirent(&*m.t.dirents.get()?, newparent, newname)?.map(|(_, d)| d);
            if parent == newparent && name == newname {
                return Ok(());
            }
            if flags & EXCHANGE != 0 {
                let dst = dst.ok_or(Error::Errno(libc::ENOENT))?;
                m.t.write_dirent(parent, name, dst.ino, dst.kind)?;
                m.t.write_dirent(newparent, newname, src.ino, src.kind)?;
                if parent != newparent && (src.kind == Kind::Dir) != (dst.kind == Kind::Dir) {
                    let (gain, lose) = if src.kind == Kind::Dir {
                        (newparent, parent)
                    } else {
                        (parent, newparent)
                    };
                    m.adjust_nlink(gain, 1)?;
                    m.adjust_nlink(lose, -1)?;
                }
                for (ino, p, n) in [(src.ino, newparent, newname), (dst.ino, parent, name)] {
                    let mut r = m.inode(ino)?;
                    r.ctime = now;
                    r.parent = p;
                    r.name = n.to_vec();
                    m.t.write_inode(ino, &r)?;
                }
            } else {
                if let Some(d) = dst {
                    if flags & NOREPLACE != 0 {
                        return Err(Error::Errno(libc::EEXIST));
                    }
                    if d.ino == src.ino {
                        // Two links to one inode: POSIX says do nothing.
                        return Ok(());
                    }
                    match (src.kind == Kind::Dir, d.kind == Kind::Dir) {
                        (true, false) => return Err(Error::Errno(libc::ENOTDIR)),
                        (false, true) => return Err(Error::Errno(libc::EISDIR)),
                        (true, true) => {
                            if !meta::list_dir(&*m.t.dirents.get()?, d.ino, Some(1))?.is_empty() {
                                return Err(Error::Errno(libc::ENOTEMPTY));
                            }
                            m.adjust_nlink(newparent, -1)?;
                        }
                        (false, false) => {}
                    }
                    m.drop_link(d.ino, d.kind == Kind::Dir)?;
                }
                m.t.remove_dirent(parent, name)?;
                m.t.write_dirent(newparent, newname, src.ino, src.kind)?;
                if src.kind == Kind::Dir && parent != newparent {
                    m.adjust_nlink(parent, -1)?;
                    m.adjust_nlink(newparent, 1)?;
                }
                let mut r = m.inode(src.ino)?;
                r.ctime = now;
                r.parent = newparent;
                r.name = newname.to_vec();
                m.t.write_inode(src.ino, &r)?;
                if flags & WHITEOUT != 0 {
                    let ino = meta::alloc_ino(&mut m.state)?;
                    let w =
                        InodeRec::new_live(Kind::CharDev, 0, who.uid, who.gid, now, parent, name);
                    m.t.write_inode(ino, &w)?;
                    m.t.write_dirent(parent, name, ino, Kind::CharDev)?;
                }
            }
            for p in [parent, newparent] {
                let mut r = m.inode(p)?;
                r.mtime = now;
                r.ctime = now;
                m.t.write_inode(p, &r)?;
            }
            Ok(())
        })?;
        self.orphans_changed();
        Ok(())
    }

    // ------------------------------------------------------------ attributes

    pub fn setattr(&self, who: Caller, ino: u64, s: &SetAttr) -> Result<Attr> {
        refuse_snap(ino)?;
        // Decide on space before touching staging, so a refused truncate
        // changes nothing. Cutting a file frees space; anything else may
        // grow the metadata.
        let cuts = s
            .size
            .is_some_and(|n| self.getattr(ino).is_ok_and(|a| n < a.size));
        let space = if cuts { Space::Frees } else { Space::Grows };
        self.check_space(space)?;
        if let Some(size) = s.size {
            let rec = self.read_inode(ino)?;
            match rec.kind {
                Kind::Dir => return Err(Error::Errno(libc::EISDIR)),
                Kind::File => {}
                _ => return Err(Error::Errno(libc::EINVAL)),
            }
            self.check_writable()?;
            // A truncate is a short-lived writer: registering keeps ingest
            // from committing (and dropping) the staged state between our
            // lookup and the change, which would lose the new size.
            let st = self.stage_writer(ino)?;
            let r = st
                .lock()
                .set_size(size)
                .map_err(|e| io_err("truncating staging", e));
            self.drop_writer(ino, &st);
            r?;
        }
        // Hold the file's staged entry (if any) across the commit. Ingest
        // commits a staged file's mtime from the view it chunked, so an
        // explicit mtime committed between that view and ingest's commit
        // was overwritten (a lost utimensat). With the entry locked,
        // ingest either committed before us or sees the bumped version and
        // goes again. Lock order: Staged lock, then the meta write, as in
        // ingest.
        let staged = self.staged_of(ino);
        let mut guard = staged.as_ref().map(|st| st.lock());
        if let Some(st) = &staged
            && !self.is_current(ino, st)
        {
            guard = None;
        }
        let epoch = self.map_epoch.load(Ordering::SeqCst);
        let rec = self.meta_write(space, |m| {
            let mut rec = m.inode(ino)?;
            let now = Timespec::now();
            if let Some(mode) = s.mode {
                rec.perm = mode & 0o7777;
                // Only a group member (or root) keeps set-group-id.
                if who.uid != 0 && rec.gid != who.gid && rec.kind != Kind::Dir {
                    rec.perm &= !0o2000;
                }
                // `posix_acl_chmod`: the ACL's owner, mask and other
                // entries follow the new mode.
                let stored = meta::get_xattr(&*m.t.xattrs.get()?, ino, acl::ACCESS)?;
                if let Some(old) = stored
                    && let Ok(Some(mut a)) = acl::Acl::parse(&old)
                {
                    a.chmod(rec.perm);
                    let new = a.to_bytes();
                    if new != old {
                        m.t.set_xattr(ino, acl::ACCESS, &new)?;
                    }
                }
            }
            if s.uid.is_some() || s.gid.is_some() {
                let new_uid = s.uid.unwrap_or(rec.uid);
                let new_gid = s.gid.unwrap_or(rec.gid);
                if rec.kind != Kind::Dir
                    && (new_uid != rec.uid || new_gid != rec.gid || who.uid != 0)
                {
                    rec.perm = without_setid(rec.perm);
                }
                rec.uid = new_uid;
                rec.gid = new_gid;
            }
            if let Some(t) = s.atime {
                rec.atime = t;
            }
            if let Some(t) = s.mtime {
                rec.mtime = t;
            }
            if s.size.is_some() && s.mtime.is_none() {
                rec.mtime = now;
            }
            rec.ctime = s.ctime.unwrap_or(now);
            m.t.write_inode(ino, &rec)?;
            Ok(rec)
        })?;
        if let Some(st) = guard.as_mut() {
            // An explicit mtime wins over the one writes left behind.
            if s.mtime.is_some() {
                st.mtime = rec.mtime;
                st.version += 1;
                if st.whole {
                    st.set_file_mtime();
                }
            }
            st.ctime = st.ctime.max(rec.ctime);
        }
        drop(guard);
        self.attr_settled(ino, epoch, rec)
    }

    // ------------------------------------------------------------ xattrs

    /// `in_group_or_capable(gid)` says whether the caller may keep a
    /// file's set-group-id when it sets an access ACL (see `set_acl`).
    pub fn setxattr(
        &self,
        who: Caller,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: i32,
        in_group_or_capable: &dyn Fn(u32) -> bool,
    ) -> Result<()> {
        refuse_snap(ino)?;
        check_xattr_name(name)?;
        if name == acl::ACCESS || name == acl::DEFAULT {
            return self.set_acl(who, ino, name, value, in_group_or_capable);
        }
        self.meta_write(Space::Grows, |m| {
            let mut rec = m.inode(ino)?;
            let exists = meta::get_xattr(&*m.t.xattrs.get()?, ino, name)?.is_some();
            if flags & libc::XATTR_CREATE != 0 && exists {
                return Err(Error::Errno(libc::EEXIST));
            }
            if flags & libc::XATTR_REPLACE != 0 && !exists {
                return Err(Error::Errno(libc::ENODATA));
            }
            m.t.set_xattr(ino, name, value)?;
            rec.ctime = Timespec::now();
            m.t.write_inode(ino, &rec)?;
            Ok(())
        })
    }

    /// setxattr of an ACL, as ext4 does it (`ext4_set_acl`). An access ACL
    /// sets the mode's owner, group (the mask, if any) and other bits; one
    /// the mode says in full is then dropped, any other is kept. The
    /// set-group-id bit goes unless the caller is in the file's group or
    /// holds CAP_FSETID (`posix_acl_update_mode`). The kernel checks the
    /// value, the owner and the file type before it asks; these checks
    /// repeat them with ext4's errnos for any other way in.
    fn set_acl(
        &self,
        who: Caller,
        ino: u64,
        name: &[u8],
        value: &[u8],
        in_group_or_capable: &dyn Fn(u32) -> bool,
    ) -> Result<()> {
        let parsed = acl::Acl::parse(value).map_err(|e| Error::Errno(e.errno()))?;
        self.meta_write(Space::Grows, |m| {
            let mut rec = m.inode(ino)?;
            if who.uid != 0 && who.uid != rec.uid {
                return Err(Error::Errno(libc::EPERM));
            }
            if rec.kind == Kind::Symlink {
                return Err(Error::Errno(libc::EOPNOTSUPP));
            }
            match parsed {
                _ if name == acl::DEFAULT && rec.kind != Kind::Dir => {
                    return match parsed {
                        Some(_) => Err(Error::Errno(libc::EACCES)),
                        None => Ok(()),
                    };
                }
                None => {
                    m.t.remove_xattr(ino, name)?;
                }
                Some(a) if name == acl::DEFAULT => m.t.set_xattr(ino, name, &a.to_bytes())?,
                Some(a) => {
                    let (bits, equiv) = a.mode_bits();
                    rec.perm = (rec.perm & !0o777) | bits;
                    if !in_group_or_capable(rec.gid) {
                        rec.perm &= !0o2000;
                    }
                    if equiv {
                        m.t.remove_xattr(ino, name)?;
                    } else {
                        m.t.set_xattr(ino, name, &a.to_bytes())?;
                    }
                }
            }
            rec.ctime = Timespec::now();
            m.t.write_inode(ino, &rec)?;
            Ok(())
        })
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        if is_snap_ino(ino) {
            check_xattr_name(name)?;
            return self.snap_getxattr(ino, name);
        }
        check_xattr_name(name)?;
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        let t = rt.open_table(meta::XATTRS).map_err(store::Error::from)?;
        let stored = meta::get_xattr(&t, ino, name)?;
        if name == acl::ACCESS && stored.is_some() {
            let inodes = rt.open_table(meta::INODES).map_err(store::Error::from)?;
            let (_, rec) = meta::live_inode(&inodes, ino)?.ok_or(Error::Errno(libc::ENOENT))?;
            return xattr_view(ino, name, stored, rec.perm);
        }
        stored.ok_or(Error::Errno(libc::ENODATA))
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        if is_snap_ino(ino) {
            return self.snap_listxattr(ino);
        }
        let perm = self.read_inode(ino)?.perm;
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        let t = rt.open_table(meta::XATTRS).map_err(store::Error::from)?;
        let names = meta::list_xattrs(&t, ino)?;
        list_view(ino, names, perm, |n| meta::get_xattr(&t, ino, n))
    }

    /// Removing an ACL leaves the mode as it is; removing one there is not
    /// succeeds, as on ext4.
    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        refuse_snap(ino)?;
        check_xattr_name(name)?;
        let is_acl = name == acl::ACCESS || name == acl::DEFAULT;
        self.meta_write(Space::Frees, |m| {
            let mut rec = m.inode(ino)?;
            if !m.t.remove_xattr(ino, name)? {
                return if is_acl {
                    Ok(())
                } else {
                    Err(Error::Errno(libc::ENODATA))
                };
            }
            rec.ctime = Timespec::now();
            m.t.write_inode(ino, &rec)?;
            Ok(())
        })
    }

    // ------------------------------------------------------------ dirs

    /// A live directory's entries, "." and ".." first; none once it has
    /// been removed (as on ext4: an open, removed directory lists empty).
    fn list_dir(&self, ino: u64) -> Result<Vec<DirEntry>> {
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        let t = rt.open_table(meta::INODES).map_err(store::Error::from)?;
        let Some((_, rec)) = meta::live_inode(&t, ino)? else {
            return Ok(Vec::new());
        };
        let d = rt.open_table(meta::DIRENTS).map_err(store::Error::from)?;
        let up = if rec.parent == 0 {
            meta::ROOT_INO
        } else {
            rec.parent
        };
        let mut entries = dot_entries(ino, up);
        if ino == meta::ROOT_INO && self.snaps.visible.load(Ordering::Relaxed) {
            entries.push(DirEntry {
                name: SNAPDIR_NAME.to_vec(),
                ino: SNAPDIR_INO,
                kind: Kind::Dir,
            });
        }
        for (name, v) in meta::list_dir(&d, ino, None)? {
            entries.push(DirEntry {
                name,
                ino: v.ino,
                kind: v.kind,
            });
        }
        Ok(entries)
    }

    /// The listing a readdir at `offset` of directory `ino` reads from:
    /// a fresh one at offset 0, else the one the offset names. If that one
    /// has aged out, a fresh listing is read from the same position.
    pub fn listing(&self, ino: u64, offset: u64) -> Result<Listing> {
        let id = (offset >> 32) as u32;
        let start = (offset & 0xffff_ffff) as usize;
        if offset != 0
            && let Some(entries) = self.listings.lock().get(&id)
        {
            return Ok(Listing {
                id,
                entries: entries.clone(),
                start,
            });
        }
        let entries = Arc::new(if is_snap_ino(ino) {
            self.snap_entries(ino)?
        } else {
            self.list_dir(ino)?
        });
        // Ids stay below 2^31 so offsets stay positive as the kernel's
        // signed loff_t, and skip 0 so no offset but the first is 0.
        let id = self
            .next_listing
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_rem(1 << 31)
            .max(1);
        self.listings.lock().put(id, entries.clone());
        Ok(Listing { id, entries, start })
    }

    /// The listing has been read to its end.
    pub fn listing_done(&self, id: u32) {
        self.listings.lock().pop(&id);
    }

    // ------------------------------------------------------------ files

    /// Opens a file; returns a handle (never a passthrough one).
    pub fn open(&self, ino: u64, flags: i32) -> Result<u64> {
        Ok(self.open_file(ino, flags, false)?.fh)
    }

    /// Opens a file. With `passthrough`, the handle may come back with a
    /// staging file for the kernel to read and write directly: when the
    /// whole file is in staging (new, truncated to zero, or small), it is
    /// opened write-only or read-only, and no other handle is open; and
    /// always while other passthrough handles of the file are open,
    /// because the kernel refuses a mix (EIO).
    ///
    /// Why not read-write: the kernel maps passthrough files onto the
    /// staging file itself, so a shared mapping outlives the handle's
    /// release; ingest would commit the file and drop its staging state
    /// while the mapping can still write. A read-write handle (the only
    /// kind that can map shared and writable) goes through the daemon.
    pub fn open_file(&self, ino: u64, flags: i32, passthrough: bool) -> Result<Opened> {
        self.open_inner(ino, flags, passthrough, None)
    }

    /// `open_file` for the kernel, which leaves the truncate of
    /// `open(O_TRUNC)` to the open itself (FUSE_ATOMIC_O_TRUNC, asked for
    /// at init so such a file is empty, and so eligible for passthrough,
    /// when opened; before, the kernel opened it whole and truncated with
    /// a SETATTR after). What that SETATTR carried is done here too: a
    /// caller without privilege loses set-user-id, and set-group-id on a
    /// group-executable file. Root stands in for CAP_FSETID, as in
    /// `setattr`.
    pub fn open_file_by(
        &self,
        who: Caller,
        ino: u64,
        flags: i32,
        passthrough: bool,
    ) -> Result<Opened> {
        if flags & libc::O_TRUNC == 0 || is_snap_ino(ino) {
            return self.open_file(ino, flags, passthrough);
        }
        let acc = flags & libc::O_ACCMODE;
        let opened = if acc != libc::O_WRONLY && acc != libc::O_RDWR {
            // Linux truncates on O_RDONLY|O_TRUNC too (the kernel checked
            // write permission), and on access mode 3; with no writer to
            // hold, truncate by path.
            if self.read_inode(ino)?.kind == Kind::File {
                self.setattr(
                    who,
                    ino,
                    &SetAttr {
                        size: Some(0),
                        ..SetAttr::default()
                    },
                )?;
            }
            self.open_file(ino, flags & !libc::O_TRUNC, passthrough)?
        } else {
            self.open_file(ino, flags, passthrough)?
        };
        if who.uid != 0 {
            let rec = match self.read_inode(ino) {
                Ok(rec) => rec,
                Err(e) => {
                    let _ = self.release(opened.fh);
                    return Err(e);
                }
            };
            let perm = without_setid(rec.perm);
            if rec.kind == Kind::File && perm != rec.perm {
                let kill = SetAttr {
                    mode: Some(perm),
                    ..SetAttr::default()
                };
                if let Err(e) = self.setattr(who, ino, &kill) {
                    let _ = self.release(opened.fh);
                    return Err(e);
                }
            }
        }
        Ok(opened)
    }

    /// `open_file` of a file `make_node` has just created with `rec`.
    pub fn open_created(
        &self,
        ino: u64,
        rec: &Attr,
        flags: i32,
        passthrough: bool,
    ) -> Result<Opened> {
        if rec.kind != Kind::File || rec.size != 0 {
            return self.open_file(ino, flags, passthrough);
        }
        self.open_inner(ino, flags, passthrough, Some(rec))
    }

    fn open_inner(
        &self,
        ino: u64,
        flags: i32,
        passthrough: bool,
        new_file: Option<&Attr>,
    ) -> Result<Opened> {
        if is_snap_ino(ino) {
            let acc = flags & libc::O_ACCMODE;
            if acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
                return Err(Error::Errno(libc::EROFS));
            }
            self.snap_getattr(ino)?;
            let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
            self.handles.lock().insert(
                fh,
                Handle {
                    ino,
                    write: false,
                    append: false,
                    pt: false,
                },
            );
            return Ok(Opened {
                fh,
                backing: None,
                keep_cache: false,
            });
        }
        let rec = match new_file {
            Some(a) => InodeRec {
                died: LIVE,
                kind: a.kind,
                perm: a.perm,
                uid: a.uid,
                gid: a.gid,
                nlink: a.nlink,
                rdev: a.rdev,
                size: 0,
                atime: a.atime,
                mtime: a.mtime,
                ctime: a.ctime,
                btime: a.btime,
                content: Content::Empty,
                holes: 0,
                parent: 0,
                name: Vec::new(),
            },
            None => self.read_inode(ino)?,
        };
        let acc = flags & libc::O_ACCMODE;
        let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        if rec.kind == Kind::Dir && write {
            return Err(Error::Errno(libc::EISDIR));
        }
        let mut staged = None;
        if write {
            self.check_writable()?;
            let st = match new_file {
                Some(rec) => self.stage_new_file(ino, rec)?,
                None => self.stage_writer(ino)?,
            };
            if flags & libc::O_TRUNC != 0 {
                let mut s = st.lock();
                refresh(&mut s);
                // An existing file's times move even when it was empty
                // already, as a truncate by path moves them.
                if (s.size != 0 || new_file.is_none())
                    && let Err(e) = s.set_size(0)
                {
                    drop(s);
                    self.drop_writer(ino, &st);
                    return Err(io_err("truncating staging", e));
                }
            }
            staged = Some(st);
        } else if rec.kind == Kind::File {
            staged = self.staged_of(ino);
        }
        let want_pt = passthrough
            && rec.kind == Kind::File
            && acc != libc::O_RDWR
            && self.passthrough.load(Ordering::SeqCst);
        let backing = {
            // Lock order: the Staged entry, then the small maps.
            let mut guard = staged.as_ref().map(|st| st.lock());
            if let (Some(st), false) = (&staged, write)
                && !self.is_current(ino, st)
            {
                guard = None;
            }
            let mut pt = self.pt.lock();
            let mut open = self.open.lock();
            let backing = if let Some(p) = pt.get_mut(&ino) {
                // Every open must use the backing the kernel already has.
                if let Some(g) = guard.as_mut()
                    && write
                    && (!Arc::ptr_eq(&g.file, &p.file) || g.make_whole().is_err())
                {
                    log::error!("inode {ino}: staging is not the passthrough file");
                    drop((open, pt, guard));
                    if let Some(st) = &staged {
                        self.drop_writer(ino, st);
                    }
                    return Err(Error::Errno(libc::EBUSY));
                }
                p.handles += 1;
                Some(p.file.clone())
            } else if want_pt
                && !open.contains_key(&ino)
                && let Some(g) = guard.as_mut()
                && g.can_be_whole()
            {
                match g.make_whole() {
                    Ok(()) => {
                        g.exposed = true;
                        // From here on the kernel compares against it.
                        g.sync_file_mtime();
                        pt.insert(
                            ino,
                            PtFile {
                                file: g.file.clone(),
                                handles: 1,
                            },
                        );
                        Some(g.file.clone())
                    }
                    Err(e) => {
                        log::warn!("inode {ino}: no passthrough ({e})");
                        None
                    }
                }
            } else {
                None
            };
            *open.entry(ino).or_default() += 1;
            backing
        };
        if backing.is_some() {
            self.pt_opens.fetch_add(1, Ordering::Relaxed);
        }
        // Without FOPEN_KEEP_CACHE the kernel drops the file's pages at
        // every open, so a build or an editor re-read every file through
        // the daemon. Keep them when the file is committed, opened to
        // read through the daemon, and unchanged since the last such open;
        // any other open forgets the stamp, so the next one starts afresh.
        let keep_cache = {
            let mut cached = self.cached.lock();
            if !write && backing.is_none() && staged.is_none() && rec.kind == Kind::File {
                let stamp = (rec.mtime, rec.ctime, rec.size);
                cached.put(ino, stamp) == Some(stamp)
            } else {
                cached.pop(&ino);
                false
            }
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(
            fh,
            Handle {
                ino,
                write,
                append: flags & libc::O_APPEND != 0,
                pt: backing.is_some(),
            },
        );
        Ok(Opened {
            fh,
            backing,
            keep_cache,
        })
    }

    /// The kernel would not take the backing file of a passthrough handle:
    /// the handle goes through the daemon, and so does every later open.
    pub fn passthrough_failed(&self, fh: u64) {
        self.passthrough.store(false, Ordering::SeqCst);
        let ino = {
            let mut hs = self.handles.lock();
            let Some(h) = hs.get_mut(&fh) else { return };
            if !h.pt {
                return;
            }
            h.pt = false;
            h.ino
        };
        self.pt_opens.fetch_sub(1, Ordering::Relaxed);
        self.drop_pt(ino, false);
    }

    /// One passthrough handle of `ino` is gone (with `close`, the handle
    /// itself too: both counts drop under the `pt` lock, or an open between
    /// them saw a handle but no passthrough and answered without it, which
    /// the kernel refuses). After the last, a staging file no `Staged`
    /// entry owns any more (ingest left it for the kernel) is removed.
    /// Returns whether that was the file's last open handle.
    fn drop_pt(&self, ino: u64, close: bool) -> bool {
        let (last, last_open) = {
            let mut pt = self.pt.lock();
            let last_open = close && count_close(&mut self.open.lock(), ino);
            let last = match pt.get_mut(&ino) {
                Some(p) if p.handles > 1 => {
                    p.handles -= 1;
                    false
                }
                Some(_) => {
                    pt.remove(&ino);
                    true
                }
                None => false,
            };
            (last, last_open)
        };
        if last && !self.staged.lock().contains_key(&ino) {
            // Under content_lock no new Staged entry (which would reuse
            // the path) can appear between the check and the unlink.
            let _c = self.content_lock.lock();
            if !self.staged.lock().contains_key(&ino) && !self.pt.lock().contains_key(&ino) {
                let _ = fs::remove_file(self.staging_dir.join(ino.to_string()));
            }
        }
        last_open
    }

    /// Removes a staging file and its sidecar, keeping the file itself
    /// while passthrough handles read it (see `PtFile`).
    fn remove_staging(&self, ino: u64, path: &std::path::Path) {
        if !self.pt.lock().contains_key(&ino) {
            let _ = fs::remove_file(path);
        }
        let _ = fs::remove_file(sidecar_path(path));
    }

    /// `remove_staging` for the staging file of `st` (locked by the caller
    /// as `s`, and leaving `staged`), keeping a small one as a spare.
    ///
    /// Why: the untar benchmark made a staging file per file and deleted
    /// it after ingest. On an ext4 without a journal (this project's
    /// disks) every inode allocation scans past the inodes deleted in the
    /// last minute, so creates slowed as deletes piled up (half the
    /// daemon's time in `recently_deleted`). A spare is only renamed here;
    /// its bytes stay as they are until `prepare_spares` or `take_spare`
    /// finds nobody can read them any more.
    fn retire_staging(&self, ino: u64, st: &Arc<Mutex<Staged>>, s: &Staged) {
        if s.exposed || self.pt.lock().contains_key(&ino) || s.size > SPARE_MAX_BYTES {
            return self.remove_staging(ino, &s.path);
        }
        if !s.marked {
            // A tagged file has no sidecar (`mark_whole` removed it).
            let _ = fs::remove_file(sidecar_path(&s.path));
        }
        let mut spares = self.spares.lock();
        if spares.len() < SPARES_MAX {
            let n = self.next_spare.fetch_add(1, Ordering::Relaxed);
            let path = self.staging_dir.join(format!("spare.{n}"));
            if fs::rename(&s.path, &path).is_ok() {
                spares.push(Spare {
                    file: s.file.clone(),
                    owner: Arc::downgrade(st),
                    path,
                    empty: false,
                    tagged: s.marked,
                });
                return;
            }
        }
        drop(spares);
        let _ = fs::remove_file(&s.path);
    }

    /// A spare made empty and renamed to `path`, if one is free: its
    /// staging state is gone and nothing else holds the file, so no read
    /// can see it change. Recovery deletes `spare.N` files. Returns the
    /// file and whether it carries the whole-file tag (kept: every file
    /// staged new is made whole).
    fn take_spare(&self, path: &std::path::Path) -> Option<(Arc<File>, bool)> {
        let sp = {
            let mut spares = self.spares.lock();
            let i = spares
                .iter()
                .position(|sp| sp.owner.strong_count() == 0 && Arc::strong_count(&sp.file) == 1)?;
            spares.swap_remove(i)
        };
        let made = (sp.empty || sp.file.set_len(0).is_ok())
            && rustix::fs::renameat_with(
                rustix::fs::CWD,
                &sp.path,
                rustix::fs::CWD,
                path,
                rustix::fs::RenameFlags::NOREPLACE,
            )
            .is_ok();
        if made {
            Some((sp.file, sp.tagged))
        } else {
            let _ = fs::remove_file(&sp.path);
            None
        }
    }

    /// Registers a writer on a file's staging state, creating that state
    /// from the committed content if the file has none. The entry returned
    /// is the one in `staged` and stays there until the writer is dropped.
    ///
    /// Why the care: ingest commits a staged file and removes its entry
    /// under the entry's lock when it has no writers. A caller that looked
    /// the entry up just before that and changed it just after would change
    /// an orphan (writes then failed with EBADF, truncates were lost). So
    /// membership is checked under the entry's lock, and a new entry is
    /// built under `content_lock`, so no ingest or reap commit can land
    /// between reading the committed record and publishing the entry (and
    /// two threads never both create, and truncate, the staging file).
    fn stage_writer(&self, ino: u64) -> Result<Arc<Mutex<Staged>>> {
        loop {
            if let Some(st) = self.staged_of(ino) {
                let mut s = st.lock();
                if self.is_current(ino, &st) {
                    s.writers += 1;
                    drop(s);
                    return Ok(st);
                }
                continue;
            }
            let c = self.content_lock.lock();
            if self.staged.lock().contains_key(&ino) {
                continue;
            }
            let Some(_claim) = Claim::new(&self.building, ino) else {
                // `stage_new_file` is building it (microseconds).
                drop(c);
                std::thread::yield_now();
                continue;
            };
            let rec = self.read_inode(ino)?;
            let mut st = self.new_staged(ino, &rec)?;
            st.writers = 1;
            let st = Arc::new(Mutex::new(st));
            self.staged.lock().insert(ino, st.clone());
            return Ok(st);
        }
    }

    /// `stage_writer` for a file `make_node` has just created: nothing has
    /// been committed for it, so nothing ingest or the reaper does can race
    /// the new entry, and it need not wait on `content_lock` (which ingest
    /// holds across its commit: every create of an untar waited for it).
    /// The staging file is created exclusively; if anything got there
    /// first (a concurrent open of the new name), the ordinary path runs.
    fn stage_new_file(&self, ino: u64, a: &Attr) -> Result<Arc<Mutex<Staged>>> {
        let path = self.staging_dir.join(ino.to_string());
        let Some(_claim) = Claim::new(&self.building, ino) else {
            return self.stage_writer(ino);
        };
        if self.staged.lock().contains_key(&ino) || self.pt.lock().contains_key(&ino) {
            drop(_claim);
            return self.stage_writer(ino);
        }
        let (file, tagged) = match self.take_spare(&path) {
            Some(t) => t,
            None => match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => (Arc::new(f), false),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return self.stage_writer(ino);
                }
                Err(e) => return Err(io_err("creating a staging file", e)),
            },
        };
        let st = Arc::new(Mutex::new(Staged {
            ino,
            share_pin: None,
            file,
            path,
            base: Arc::new(ChunkMap::default()),
            base_limit: 0,
            size: 0,
            dirty: RangeSet::default(),
            writers: 1,
            version: UNTOUCHED,
            mtime: a.mtime,
            ctime: a.ctime,
            queued: false,
            whole: false,
            marked: tagged,
            exposed: false,
            mtime_stale: false,
        }));
        // Whole from the start: the staging file holds every byte, so a
        // tag on it replaces the sidecar each close would write (a file
        // made and later deleted: on an ext4 without a journal, finding a
        // free inode among many recently deleted ones is a scan).
        st.lock().make_new_whole();
        // The claim kept every other builder out; nothing staged it since.
        self.staged.lock().insert(ino, st.clone());
        Ok(st)
    }

    /// Whether `st` is still the file's entry in `staged` (call with the
    /// entry locked: only then can ingest not remove it under us).
    fn is_current(&self, ino: u64, st: &Arc<Mutex<Staged>>) -> bool {
        self.staged
            .lock()
            .get(&ino)
            .is_some_and(|c| Arc::ptr_eq(c, st))
    }

    /// Ends a writer registered by `stage_writer`; the last one leaves a
    /// sidecar and queues the file for ingest.
    fn drop_writer(&self, ino: u64, st: &Arc<Mutex<Staged>>) {
        let idle = {
            let mut s = st.lock();
            s.writers = s.writers.saturating_sub(1);
            refresh(&mut s);
            if s.whole && s.writers == 0 && s.version != UNTOUCHED {
                // The kernel wrote behind our back: make sure an ingest
                // that chunked the file before those writes sees it went
                // stale, even if size and mtime happen to match.
                s.version += 1;
            }
            if s.writers == 0 && s.version == UNTOUCHED && !s.queued && self.is_current(ino, st) {
                // Opened for writing, changed nothing (`touch` or a create
                // without data): the committed record is already right, so
                // skip the sidecar and a durable ingest commit. Creating
                // many empty files cost a commit with fsync each.
                // Unlink before leaving the map: once the entry is gone a
                // new writer may create a staging file at the same path.
                self.retire_staging(ino, st, &s);
                self.staged.lock().remove(&ino);
                return;
            }
            if s.writers == 0 {
                s.sync_file_mtime();
                // Not synced: a crash before ingest may or may not keep it.
                if let Err(e) = write_sidecar(&s, false) {
                    log::warn!("sidecar of {}: {e}", s.ino);
                }
            }
            s.writers == 0
        };
        if idle {
            self.queue_ingest(ino, st);
        }
    }

    /// A staging state built from a file's committed content.
    fn new_staged(&self, ino: u64, rec: &InodeRec) -> Result<Staged> {
        if rec.kind != Kind::File {
            return Err(Error::Errno(libc::EINVAL));
        }
        let path = self.staging_dir.join(ino.to_string());
        let pt_file = self.pt.lock().get(&ino).map(|p| p.file.clone());
        if let Some(file) = pt_file {
            // Passthrough readers still have the staging file ingest left
            // (it holds the committed bytes): stage into it again.
            let size = file
                .metadata()
                .map_err(|e| io_err("reading staging", e))?
                .len();
            let mut dirty = RangeSet::default();
            dirty.insert(0, size);
            let marked = staging::is_marked_whole(&file);
            return Ok(Staged {
                ino,
                share_pin: None,
                file,
                path,
                base: Arc::new(ChunkMap::default()),
                base_limit: 0,
                size,
                dirty,
                writers: 0,
                version: UNTOUCHED,
                mtime: rec.mtime,
                ctime: rec.ctime,
                queued: false,
                whole: true,
                marked,
                exposed: true,
                mtime_stale: false,
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_err("creating a staging file", e))?;
        // A staging file left behind (see `drop_pt`) may carry the tag.
        staging::unmark_whole(&file).map_err(|e| io_err("untagging a staging file", e))?;
        let mut dirty = RangeSet::default();
        let base = match &rec.content {
            Content::Chunked => self.chunk_map(ino)?,
            Content::Inline(b) => {
                staging::stage_inline(&file, b, b.len() as u64, &mut dirty)
                    .map_err(|e| io_err("writing staging", e))?;
                Arc::new(ChunkMap::default())
            }
            Content::Empty => Arc::new(ChunkMap::default()),
        };
        Ok(Staged {
            ino,
            share_pin: None,
            file: Arc::new(file),
            path,
            base_limit: base.len(),
            base,
            size: rec.size,
            dirty,
            writers: 0,
            version: UNTOUCHED,
            mtime: rec.mtime,
            ctime: rec.ctime,
            queued: false,
            whole: false,
            marked: false,
            exposed: false,
            mtime_stale: false,
        })
    }

    fn chunk_map(&self, ino: u64) -> Result<Arc<ChunkMap>> {
        if let Some(m) = self.maps.lock().get(&ino) {
            return Ok(m.clone());
        }
        let epoch = self.map_epoch.load(Ordering::SeqCst);
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        let t = rt.open_table(meta::CONTENTS).map_err(store::Error::from)?;
        let list = meta::live_content(&t, ino)?
            .map(|(_, l)| l)
            .unwrap_or_default();
        let m = Arc::new(ChunkMap::new(list));
        // A commit that changed content since we read must not see its
        // cache pop undone by our (older) map: cache only if none landed.
        let mut maps = self.maps.lock();
        if self.map_epoch.load(Ordering::SeqCst) == epoch {
            maps.put(ino, m.clone());
        }
        Ok(m)
    }

    fn handle(&self, fh: u64) -> Result<(u64, bool, bool)> {
        self.handles
            .lock()
            .get(&fh)
            .map(|h| (h.ino, h.write, h.append))
            .ok_or(Error::Errno(libc::EBADF))
    }

    pub fn read(&self, ino: u64, off: u64, size: u32) -> Result<Vec<u8>> {
        if is_snap_ino(ino) {
            return self.snap_read(ino, off, size);
        }
        if let Some(st) = self.staged_of(ino) {
            let mut st = st.lock();
            refresh(&mut st);
            let end = (off + size as u64).min(st.size);
            if off >= end {
                return Ok(Vec::new());
            }
            let mut out = vec![0u8; (end - off) as usize];
            self.read_staged(&st.view(), off, &mut out)?;
            return Ok(out);
        }
        let rec = self.read_inode(ino)?;
        self.read_record(&rec, off, size, || self.chunk_map(ino))
    }

    /// Reads a committed file (live or in a snapshot) from its record and,
    /// when chunked, the chunk map `map` gives.
    fn read_record(
        &self,
        rec: &InodeRec,
        off: u64,
        size: u32,
        map: impl FnOnce() -> Result<Arc<ChunkMap>>,
    ) -> Result<Vec<u8>> {
        let end = (off + size as u64).min(rec.size);
        if off >= end {
            return Ok(Vec::new());
        }
        match &rec.content {
            Content::Inline(b) => Ok(b[off as usize..(end as usize).min(b.len())].to_vec()),
            Content::Empty => Ok(vec![0u8; (end - off) as usize]),
            Content::Chunked => {
                // Built by appending: zeroing the reply first cost a pass
                // over every byte of a cold read.
                let map = map()?;
                let mut out = Vec::with_capacity((end - off) as usize);
                self.map_pieces(&map, off, end, |p, n| match p {
                    Some(b) => out.extend_from_slice(b),
                    None => out.resize(out.len() + n, 0),
                })?;
                Ok(out)
            }
        }
    }

    fn chunk(&self, id: &ChunkId) -> Result<Arc<Vec<u8>>> {
        if let Some(c) = self.chunks.lock().get(id) {
            return Ok(c.clone());
        }
        let data = Arc::new(
            self.repo
                .store()
                .read_chunk_checked(id, store::Check::Crc)?,
        );
        self.chunks.lock().put(*id, data.clone());
        Ok(data)
    }

    /// Hands `f` the bytes of [off, end) of a chunk map in order, a
    /// chunk's slice at a time; for a hole and past the map's end, `None`
    /// and a length that reads as zeros.
    fn map_pieces(
        &self,
        map: &ChunkMap,
        off: u64,
        end: u64,
        mut f: impl FnMut(Option<&[u8]>, usize),
    ) -> Result<()> {
        let mut pos = off;
        while pos < end {
            let Some(i) = map.find(pos) else {
                f(None, (end - pos) as usize);
                break;
            };
            if map.chunks[i].is_hole() {
                let n = map.starts[i + 1].min(end) - pos;
                f(None, n as usize);
                pos += n;
                continue;
            }
            let data = self.chunk(&map.chunks[i].id)?;
            let from = (pos - map.starts[i]) as usize;
            let n = (data.len() - from).min((end - pos) as usize);
            f(Some(&data[from..from + n]), n);
            pos += n as u64;
        }
        Ok(())
    }

    /// Fills `out` from a chunk map starting at `off`.
    fn read_map(&self, map: &ChunkMap, off: u64, out: &mut [u8]) -> Result<()> {
        let mut at = 0usize;
        self.map_pieces(map, off, off + out.len() as u64, |p, n| {
            match p {
                Some(b) => out[at..at + n].copy_from_slice(b),
                None => out[at..at + n].fill(0),
            }
            at += n;
        })
    }

    fn read_staged(&self, v: &StagedView, off: u64, out: &mut [u8]) -> Result<()> {
        let end = off + out.len() as u64;
        for p in v.pieces(off, end) {
            match p {
                Piece::Staged(a, b) => {
                    let dst = &mut out[(a - off) as usize..(b - off) as usize];
                    read_sparse_at(&v.file, dst, a).map_err(|e| io_err("reading staging", e))?;
                }
                Piece::Base(a, b) => {
                    self.read_map(&v.base, a, &mut out[(a - off) as usize..(b - off) as usize])?;
                }
                Piece::Zero(a, b) => out[(a - off) as usize..(b - off) as usize].fill(0),
            }
        }
        Ok(())
    }

    pub fn write(&self, fh: u64, off: u64, data: &[u8]) -> Result<u32> {
        self.check_writable()?;
        let (ino, write, append) = self.handle(fh)?;
        if !write {
            return Err(Error::Errno(libc::EBADF));
        }
        let st = self
            .staged
            .lock()
            .get(&ino)
            .cloned()
            .ok_or(Error::Errno(libc::EBADF))?;
        self.check_space(Space::Data(data.len() as u64))?;
        self.daemon_writes.fetch_add(1, Ordering::Relaxed);
        log::debug!(
            "write of {} bytes at {off} to inode {ino} through the daemon",
            data.len()
        );
        self.daemon_write_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut st = st.lock();
        refresh(&mut st);
        let off = if append { st.size } else { off };
        st.write(off, data)
            .map_err(|e| io_err("writing staging", e))?;
        Ok(data.len() as u32)
    }

    pub fn release(&self, fh: u64) -> Result<()> {
        let Some(h) = self.handles.lock().remove(&fh) else {
            return Ok(());
        };
        if h.write
            && let Some(st) = self.staged_of(h.ino)
        {
            self.drop_writer(h.ino, &st);
        }
        let last = if h.pt {
            self.drop_pt(h.ino, true)
        } else {
            count_close(&mut self.open.lock(), h.ino)
        };
        if last
            && self.orphan_seq.load(Ordering::SeqCst)
                > self.orphans_clean_upto.load(Ordering::SeqCst)
        {
            self.send(Msg::Reap);
        }
        Ok(())
    }

    /// After a commit that may have left orphans: note it and ask for a
    /// reap (see `orphan_seq`).
    fn orphans_changed(&self) {
        self.orphan_seq.fetch_add(1, Ordering::SeqCst);
        self.send(Msg::Reap);
    }

    fn queue_ingest(&self, ino: u64, st: &Arc<Mutex<Staged>>) {
        {
            let mut s = st.lock();
            if s.queued {
                return;
            }
            s.queued = true;
        }
        // Count only what a worker will answer. Once shutdown has taken the
        // queue nothing will, and counting it anyway left `pending` above
        // zero for good: the second `shutdown` (fuser's destroy, then
        // main's) hung in `wait_ingest_idle` whenever a failed ingest left
        // a file staged.
        let sent = match self.queue.lock().as_ref() {
            Some(q) => {
                *self.pending.lock() += 1;
                let ok = q.send(Msg::Ingest(ino)).is_ok();
                if !ok {
                    log::error!("ingest queue is gone");
                    let mut p = self.pending.lock();
                    *p = p.saturating_sub(1);
                }
                ok
            }
            None => false,
        };
        if !sent {
            st.lock().queued = false;
        }
    }

    /// fsync: the file's staged bytes and its layout reach the disk, and so
    /// does all metadata committed so far.
    pub fn fsync(&self, ino: u64) -> Result<()> {
        if let Some(st) = self.staged_of(ino) {
            self.commit_share(ino, &st)?;
            let mut s = st.lock();
            refresh(&mut s);
            // An entry ingest has just committed is durable already; a
            // sidecar written for it now would outlive its staging file and
            // be replayed against the next one.
            if self.is_current(ino, &st) {
                s.sync_file_mtime();
                s.file
                    .sync_data()
                    .map_err(|e| io_err("syncing staging", e))?;
                write_sidecar(&s, true).map_err(|e| io_err("writing sidecar", e))?;
            }
        }
        self.sync_meta()
    }

    /// fallocate: mode 0 and KEEP_SIZE reserve nothing but set the size;
    /// PUNCH_HOLE (with KEEP_SIZE) and ZERO_RANGE write zeros over the range,
    /// which chunk to one shared zero chunk on ingest.
    pub fn fallocate(&self, fh: u64, off: u64, len: u64, mode: i32) -> Result<()> {
        const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
        const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;
        if mode & !(KEEP_SIZE | PUNCH_HOLE | ZERO_RANGE) != 0
            || (mode & PUNCH_HOLE != 0 && mode & KEEP_SIZE == 0)
        {
            return Err(Error::Errno(libc::EOPNOTSUPP));
        }
        let (ino, write, _) = self.handle(fh)?;
        if !write {
            return Err(Error::Errno(libc::EBADF));
        }
        let st = self
            .staged
            .lock()
            .get(&ino)
            .cloned()
            .ok_or(Error::Errno(libc::EBADF))?;
        let mut st = st.lock();
        refresh(&mut st);
        let end = off.checked_add(len).ok_or(Error::Errno(libc::EFBIG))?;
        if mode & (PUNCH_HOLE | ZERO_RANGE) != 0 {
            // Zero only what exists (and, without KEEP_SIZE, what the range
            // extends the file by, which reads as zero anyway).
            st.punch(off, end)
                .map_err(|e| io_err("punching staging", e))?;
        }
        if mode & KEEP_SIZE == 0 && end > st.size {
            st.set_size(end)
                .map_err(|e| io_err("extending staging", e))?;
        }
        Ok(())
    }

    /// SEEK_DATA / SEEK_HOLE. Holes are what reads as zeros without being
    /// stored: holes of a file's chunk list (live or in a snapshot, and of
    /// its staging file while it is staged), and the implicit hole at its
    /// end.
    pub fn lseek(&self, ino: u64, off: i64, whence: i32) -> Result<i64> {
        match whence {
            libc::SEEK_DATA | libc::SEEK_HOLE => {
                let o = u64::try_from(off).map_err(|_| Error::Errno(libc::ENXIO))?;
                let (size, hole) = self.hole_from(ino, o)?;
                if o >= size {
                    return Err(Error::Errno(libc::ENXIO));
                }
                let (s, e) = hole.unwrap_or((size, size));
                match whence {
                    libc::SEEK_HOLE => Ok(s as i64),
                    _ if s > o => Ok(off),
                    _ if e >= size => Err(Error::Errno(libc::ENXIO)),
                    _ => Ok(e as i64),
                }
            }
            libc::SEEK_SET => Ok(off),
            libc::SEEK_END => Ok(self.getattr(ino)?.size as i64 + off),
            _ => Err(Error::Errno(libc::EINVAL)),
        }
    }

    /// A file's size and its first hole that ends after `off` (starting no
    /// earlier than it, clipped to the size), from one look at the file.
    fn hole_from(&self, ino: u64, off: u64) -> Result<(u64, Option<(u64, u64)>)> {
        let (size, hole) = if let Some(st) = self.staged_of(ino) {
            let v = {
                let mut st = st.lock();
                refresh(&mut st);
                st.view()
            };
            let h = v
                .first_hole(off, v.size, 1)
                .map_err(|e| io_err("seeking staging", e))?;
            (v.size, h)
        } else {
            let snap = is_snap_ino(ino);
            let rec = if snap {
                self.snap_inode(ino)?.3
            } else {
                self.read_inode(ino)?
            };
            let h = match rec.content {
                Content::Chunked if snap => self.snap_chunk_map(ino)?.hole_from(off),
                Content::Chunked => self.chunk_map(ino)?.hole_from(off),
                Content::Empty => Some((off, rec.size)),
                Content::Inline(_) => None,
            };
            (rec.size, h)
        };
        let hole = hole
            .map(|(s, e)| (s.min(size), e.min(size)))
            .filter(|(s, e)| s < e);
        Ok((size, hole))
    }

    /// copy_file_range. A whole-file copy into an empty file shares the
    /// source's chunks (metadata only); anything else copies bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_range(
        &self,
        ino_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> Result<u64> {
        let (ino_out, write, _) = self.handle(fh_out)?;
        if !write {
            return Err(Error::Errno(libc::EBADF));
        }
        let src_content = if is_snap_ino(ino_in) {
            self.snap_inode(ino_in)?.3.content
        } else {
            self.read_inode(ino_in)?.content
        };
        // A file still being written is bigger (or smaller) than its record.
        let src_size = self.getattr(ino_in)?.size;
        let src_staged = self.staged.lock().contains_key(&ino_in);
        if off_in == 0
            && off_out == 0
            && len >= src_size
            && src_content == Content::Chunked
            && !src_staged
            && ino_in != ino_out
            && let Some(st) = self.staged_of(ino_out)
        {
            // Lock order: content_lock, then the staged file. Under
            // content_lock no ingest or reap commit can change the
            // source's list or drop its chunks before we hold them.
            let _c = self.content_lock.lock();
            let mut st = st.lock();
            // A whole staged file is read and written by the kernel in
            // its staging file, which must hold the bytes: copy them. An
            // empty one no passthrough handle holds (a new file made
            // through the daemon, as `cp` makes its copy) can drop the mode.
            if st.size == 0
                && st.whole
                && !self.pt.lock().contains_key(&ino_out)
                && let Err(e) = st.unmake_whole()
            {
                log::debug!("inode {ino_out}: stays whole ({e}); copying bytes");
            }
            if st.size == 0 && !st.whole && !self.staged.lock().contains_key(&ino_in) {
                let base = if is_snap_ino(ino_in) {
                    self.snap_chunk_map(ino_in)?
                } else {
                    self.chunk_map(ino_in)?
                };
                return self.share_chunks(&mut st, base);
            }
        }
        let mut n = len.min(src_size.saturating_sub(off_in)).min(16 << 20);
        if n > 0 {
            // A hole of the source is punched, not copied as zeros; data
            // is copied up to the next hole.
            match self.hole_from(ino_in, off_in)?.1 {
                Some((s, _)) if s > off_in => n = n.min(s - off_in),
                Some((_, e)) if len.min(e - off_in) >= HOLE_MIN => {
                    let m = len.min(e - off_in);
                    self.fallocate(fh_out, off_out, m, libc::FALLOC_FL_ZERO_RANGE)?;
                    return Ok(m);
                }
                _ => {}
            }
        }
        let data = self.read(ino_in, off_in, n as u32)?;
        let mut done = 0u64;
        while (done as usize) < data.len() {
            done += self.write(fh_out, off_out + done, &data[done as usize..])? as u64;
        }
        Ok(done)
    }

    /// Makes an empty staged file a copy of `base` by sharing its chunks
    /// (metadata only), with a pin that keeps gc from dropping them until
    /// the file's record holds them: its ingest, or an fsync first
    /// (`commit_share`).
    fn share_chunks(&self, st: &mut Staged, base: Arc<ChunkMap>) -> Result<u64> {
        self.check_writable()?;
        let pin = self.repo.store().pin()?;
        st.base = base;
        st.base_limit = st.base.len();
        st.size = st.base.len();
        st.dirty = RangeSet::default();
        st.share_pin = Some(pin);
        st.touch();
        Ok(st.size)
    }

    /// Commits the chunk list a copy shared into `ino` (see
    /// `share_chunks`) as the file's record, so its staged layout, built
    /// on that list, can be replayed after a crash. Takes `content_lock`,
    /// then the entry's lock (the lock order); nothing to do without a
    /// pending share.
    ///
    /// Why: a replay takes the base from the committed record. With the
    /// shared list only in memory, `cp` inside the mount, fsync and kill -9
    /// gave a file of zeros (the new file's record was empty).
    fn commit_share(&self, ino: u64, st: &Arc<Mutex<Staged>>) -> Result<()> {
        if st.lock().share_pin.is_none() {
            return Ok(());
        }
        let _c = self.content_lock.lock();
        let mut s = st.lock();
        if s.share_pin.is_none() || !self.is_current(ino, st) {
            return Ok(());
        }
        self.check_space(Space::Grows)?;
        let new = NewContent::Chunked(s.base.chunks.clone());
        // The record gets the shared list as it is; writes and truncates
        // since stay in the layout, on top of it.
        let mut view = s.view();
        view.size = s.base.len();
        let mut batch = self.repo.store().batch()?;
        let live = self.queue_content_refs(&mut batch, &[(ino, &new)])?;
        if !live.first().copied().unwrap_or(false) {
            return Err(Error::Errno(libc::ENOENT));
        }
        self.commit_with_meta(batch, |tx, g| {
            let mut t = meta::Versioned::open(tx, g)?;
            commit_content(&mut t, ino, &view, &new)
        })?;
        s.base_limit = s.base_limit.min(s.base.len());
        s.share_pin = None;
        self.maps.lock().pop(&ino);
        Ok(())
    }

    pub fn statfs(&self) -> Result<rustix::fs::StatVfs> {
        rustix::fs::statvfs(self.repo.dir()).map_err(|e| io_err("statvfs", e.into()))
    }

    // ------------------------------------------------------------ ingest

    /// Replays staged writes a crash left: a sidecar says what is valid.
    fn recover_staging(&self) -> Result<()> {
        let rd = fs::read_dir(&self.staging_dir).map_err(|e| io_err("listing staging/", e))?;
        let mut found = Vec::new();
        let mut whole = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(ino) = name
                .strip_suffix(".side")
                .and_then(|n| n.parse::<u64>().ok())
            {
                found.push(ino);
            } else if !name.ends_with(".side") {
                let ino = name.parse::<u64>().ok();
                let side = self.staging_dir.join(format!("{name}.side"));
                if ino.is_none() || !side.exists() {
                    match (ino, File::open(e.path())) {
                        (Some(ino), Ok(f)) if staging::is_marked_whole(&f) => whole.push(ino),
                        _ => {
                            let _ = fs::remove_file(e.path());
                        }
                    }
                }
            }
        }
        for ino in whole {
            // A whole staged file describes itself (see `mark_whole`).
            let data_path = self.staging_dir.join(ino.to_string());
            let Ok(m) = fs::metadata(&data_path) else {
                continue;
            };
            let side = Sidecar {
                ino,
                size: m.len(),
                base_limit: 0,
                dirty: vec![(0, m.len())],
                mtime: (
                    std::os::unix::fs::MetadataExt::mtime(&m),
                    std::os::unix::fs::MetadataExt::mtime_nsec(&m) as u32,
                ),
                base: None,
            };
            match serde_json::to_vec(&side) {
                Ok(b) => {
                    if let Err(e) = store::write_file_atomic(&sidecar_path(&data_path), &b) {
                        log::error!("recovering staged inode {ino}: {e}");
                        continue;
                    }
                    found.push(ino);
                }
                Err(e) => log::error!("recovering staged inode {ino}: {e}"),
            }
        }
        for ino in found {
            let side_path = self.staging_dir.join(format!("{ino}.side"));
            let data_path = self.staging_dir.join(ino.to_string());
            let side: Option<Sidecar> = fs::read(&side_path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let rec = self.read_inode(ino).ok();
            let (Some(side), Some(rec), Ok(file)) = (
                side,
                rec,
                OpenOptions::new().read(true).write(true).open(&data_path),
            ) else {
                let _ = fs::remove_file(&side_path);
                let _ = fs::remove_file(&data_path);
                continue;
            };
            if let Some(why) = staging::layout_mismatch(&side, &rec, || {
                Ok::<_, Error>(match rec.content {
                    Content::Chunked => self.chunk_map(ino)?.mark(),
                    _ => staging::BaseMark::of(&[]),
                })
            })? {
                // Replayed, its clean ranges would read another list's
                // bytes: keep the committed file, and the staged bytes
                // aside for a person (fsck lists them).
                let aside = self.staging_dir.join(staging::LOST_DIR);
                let stamp = Timespec::now().secs;
                let moved = fs::create_dir_all(&aside)
                    .and_then(|_| fs::rename(&data_path, aside.join(format!("{ino}.{stamp}"))))
                    .and_then(|_| {
                        fs::rename(&side_path, aside.join(format!("{ino}.{stamp}.side")))
                    });
                log::error!(
                    "staged writes of inode {ino} not replayed: {why}; the file keeps its \
                     committed content{}",
                    match moved {
                        Ok(()) => format!(", the staged bytes are in {}", aside.display()),
                        Err(e) => format!(" (setting the staged bytes aside failed: {e})"),
                    }
                );
                continue;
            }
            let mut dirty = RangeSet::default();
            for (a, b) in side.dirty {
                dirty.insert(a, b);
            }
            let mut base_limit = side.base_limit;
            let base = match &rec.content {
                Content::Chunked => self.chunk_map(ino)?,
                Content::Inline(bytes) => {
                    // The layout's clean ranges read from the committed
                    // bytes. Why: a kill between an ingest commit and the
                    // unlink of its staging file leaves a layout made
                    // against the chunks the file had before (a truncate
                    // to a few KiB: size set, nothing dirty) while the
                    // record now holds those bytes inline; read against
                    // no base at all, the file came back as zeros.
                    staging::stage_inline(&file, bytes, base_limit.min(side.size), &mut dirty)
                        .map_err(|e| io_err("replaying staging", e))?;
                    base_limit = 0;
                    Arc::new(ChunkMap::default())
                }
                Content::Empty => Arc::new(ChunkMap::default()),
            };
            log::info!(
                "replaying staged writes of inode {ino} ({} bytes)",
                side.size
            );
            let st = Arc::new(Mutex::new(Staged {
                ino,
                share_pin: None,
                file: Arc::new(file),
                path: data_path,
                base_limit: base_limit.min(base.len()),
                base,
                size: side.size,
                dirty,
                writers: 0,
                // Replayed bytes are a change the committed record lacks.
                version: UNTOUCHED + 1,
                mtime: Timespec {
                    secs: side.mtime.0,
                    nanos: side.mtime.1,
                },
                ctime: Timespec::now(),
                queued: false,
                whole: false,
                marked: false,
                exposed: true,
                mtime_stale: false,
            }));
            self.staged.lock().insert(ino, st.clone());
            self.queue_ingest(ino, &st);
        }
        Ok(())
    }

    /// Chunks a group of staged files and commits them together.
    /// `messages` is how many queue entries this group answers (duplicates
    /// included), which is what `pending` counted.
    fn ingest_group(&self, inos: Vec<u64>, messages: u64) {
        let n = messages;
        let mut todo = inos;
        // Files that changed while being chunked, with nobody left to queue
        // them again (a truncate or utimensat without an open writer), go
        // round again here; before, they stayed staged and unsynced.
        let attempt = |inos: &[u64]| {
            // A panic (redb's, on a damaged page) fails this round like
            // an error would, and `pending` still drops: unmount and sync
            // waited on it forever.
            crate::guard::catch(|| self.try_ingest_group(inos)).unwrap_or_else(|p| {
                log::error!("ingest: {p}");
                Err(Error::Errno(libc::EIO))
            })
        };
        while !todo.is_empty() {
            let (again, failed, first) = match attempt(&todo) {
                Ok(again) => (again, Vec::new(), None),
                Err(e) if e.errno() == libc::ENOSPC && todo.len() > 1 => {
                    // One file at a time, smallest first. Why: a group
                    // needs room for all its files' chunks before any
                    // staging file goes, so a full disk holding many
                    // staged files never drained, though each alone fit.
                    let mut by_size: Vec<(u64, u64)> = todo
                        .iter()
                        .map(|i| (self.staged_of(*i).map_or(0, |s| s.lock().size), *i))
                        .collect();
                    by_size.sort_unstable();
                    let (mut again, mut failed, mut first) = (Vec::new(), Vec::new(), None);
                    for (_, ino) in by_size {
                        match attempt(&[ino]) {
                            Ok(a) => again.extend(a),
                            Err(e) => {
                                failed.push(ino);
                                first.get_or_insert(e);
                            }
                        }
                    }
                    (again, failed, first)
                }
                Err(e) => (Vec::new(), std::mem::take(&mut todo), Some(e)),
            };
            if let Some(e) = first {
                if e.errno() == libc::ENOSPC {
                    // The flusher tries again once there is room; say so
                    // once, not every round while the disk stays full.
                    self.retry_ingest.store(true, Ordering::SeqCst);
                    if !self.ingest_short.swap(true, Ordering::Relaxed) {
                        log::error!(
                            "ingest of {} files waits for space: {e}; they stay staged",
                            failed.len()
                        );
                    }
                } else {
                    log::error!("ingest of {} files failed: {e}", failed.len());
                }
                // Leave them staged; a later close or remount retries.
                for ino in &failed {
                    if let Some(st) = self.staged_of(*ino) {
                        st.lock().queued = false;
                    }
                }
            } else if self.ingest_short.swap(false, Ordering::Relaxed) {
                log::info!("ingest has room again");
            }
            todo = again;
        }
        let mut p = self.pending.lock();
        *p = p.saturating_sub(n);
        self.pending_cv.notify_all();
        drop(p);
        self.prepare_spares();
    }

    /// Empties the spares nobody can read any more, here on an ingest
    /// worker rather than in the create that takes one (where it was a
    /// truncate on every create of an untar).
    fn prepare_spares(&self) {
        let ready: Vec<Spare> = {
            let mut spares = self.spares.lock();
            let (ready, keep) = spares.drain(..).partition(|sp: &Spare| {
                !sp.empty && sp.owner.strong_count() == 0 && Arc::strong_count(&sp.file) == 1
            });
            *spares = keep;
            ready
        };
        for mut sp in ready {
            if sp.file.set_len(0).is_ok() {
                sp.empty = true;
                let mut spares = self.spares.lock();
                // `retire_staging` may have filled the list meanwhile.
                if spares.len() < SPARES_MAX {
                    spares.push(sp);
                    continue;
                }
            }
            let _ = fs::remove_file(&sp.path);
        }
    }

    /// Returns the files to try again: changed while chunked, no writers.
    fn try_ingest_group(&self, inos: &[u64]) -> Result<Vec<u64>> {
        // New chunks take about the changed bytes; refuse up front rather
        // than fill the disk under the index commit (see `check_space`).
        let changed: u64 = inos
            .iter()
            .filter_map(|i| Some((*i, self.staged_of(*i)?)))
            .map(|(ino, st)| {
                let v = st.lock().view();
                v.dirty_to_store(HOLE_MIN).unwrap_or_else(|e| {
                    log::warn!("inode {ino}: finding holes in staging: {e}");
                    v.dirty.total()
                })
            })
            .sum();
        self.check_space(Space::Data(changed))?;
        let store = self.repo.store();
        let mut batch = store.batch()?;
        let mut built: Vec<(u64, Arc<Mutex<Staged>>, StagedView, NewContent)> = Vec::new();
        for &ino in inos {
            let Some(st) = self.staged_of(ino) else {
                continue;
            };
            let view = {
                let mut s = st.lock();
                if s.writers > 0 {
                    s.queued = false;
                    continue;
                }
                refresh(&mut s);
                s.view()
            };
            let content = self.build_content(&view, &mut batch)?;
            built.push((ino, st, view, content));
        }
        if built.is_empty() {
            return Ok(Vec::new());
        }
        // Before content_lock: a batch whose chunks we share may need it to
        // commit them.
        batch.settle()?;
        let _c = self.content_lock.lock();
        built.sort_by_key(|b| b.0);
        let mut guards: Vec<_> = built.iter().map(|b| b.1.lock()).collect();
        // Files changed while we chunked stay staged for the next round.
        let keep: Vec<bool> = built
            .iter()
            .zip(guards.iter())
            .map(|(b, g)| g.version == b.2.version && g.writers == 0)
            .collect();
        let kept: Vec<(u64, &NewContent)> = built
            .iter()
            .zip(&keep)
            .map(|(b, k)| (if *k { b.0 } else { 0 }, &b.3))
            .collect();
        let live = self.queue_content_refs(&mut batch, &kept)?;
        self.check_space(Space::Frees)?;
        self.commit_with_meta(batch, |tx, g| {
            let mut t = meta::Versioned::open(tx, g)?;
            for (i, (ino, _, view, new)) in built.iter().enumerate() {
                if live[i] {
                    commit_content(&mut t, *ino, view, new)?;
                }
            }
            Ok(())
        })?;
        let mut again = Vec::new();
        for (i, (ino, _, _, _)) in built.iter().enumerate() {
            let gd = &mut guards[i];
            if !keep[i] {
                if gd.writers == 0 {
                    again.push(*ino);
                } else {
                    // The last writer's release queues it again.
                    gd.queued = false;
                }
                continue;
            }
            self.maps.lock().pop(ino);
            self.staged.lock().remove(ino);
            self.retire_staging(*ino, &built[i].1, gd);
        }
        Ok(again)
    }

    /// Commits `batch` (blobs, then the index), then in one durable meta
    /// transaction what `f` writes plus the index's ref sequence (design
    /// doc, "Two databases, one commit order"). That meta commit also makes
    /// every lazy commit before it durable; cached chunk maps are dropped.
    fn commit_with_meta(
        &self,
        batch: Batch<'_>,
        f: impl FnOnce(&redb::WriteTransaction, Gens) -> store::Result<()>,
    ) -> Result<()> {
        let lazy_seen = self.lazy_commits.load(Ordering::SeqCst);
        let meta_db = self.repo.meta();
        batch.commit(|ref_seq| {
            let tx = meta_db.begin_write()?;
            let g = Gens::load(&tx.open_table(meta::STATE)?)?;
            f(&tx, g)?;
            if let Some(r) = ref_seq {
                tx.open_table(meta::STATE)?.insert("ref_seq", r)?;
            }
            tx.commit()?;
            Ok(())
        })?;
        self.durable_upto.fetch_max(lazy_seen, Ordering::SeqCst);
        self.map_epoch.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Queues in `batch` the reference changes of giving each file its new
    /// content (ino 0: skip): the new chunks gain a reference, and the old
    /// list loses its references when no snapshot holds it (it changes in
    /// place). Returns which files still have a live inode to commit to.
    fn queue_content_refs(
        &self,
        batch: &mut Batch<'_>,
        items: &[(u64, &NewContent)],
    ) -> Result<Vec<bool>> {
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        let g = Gens::load(&rt.open_table(meta::STATE).map_err(store::Error::from)?)?;
        let contents = rt.open_table(meta::CONTENTS).map_err(store::Error::from)?;
        let inodes = rt.open_table(meta::INODES).map_err(store::Error::from)?;
        let mut live = vec![false; items.len()];
        for (i, (ino, new)) in items.iter().enumerate() {
            if *ino == 0 || meta::live_inode(&inodes, *ino)?.is_none() {
                continue;
            }
            live[i] = true;
            // The live version goes if no snapshot holds it (in place).
            let (skip, old) = match meta::live_content(&contents, *ino)? {
                Some((born, l)) if born > g.last_snap => (vec![born], Some(l)),
                _ => (Vec::new(), None),
            };
            // The common case: the file's only version replaced by a list
            // sharing most of it. Diff the two around their changed middles
            // rather than build sets of every chunk of both (an 8 GiB file
            // has 500,000).
            if let (Some(old), NewContent::Chunked(list)) = (&old, new)
                && meta::content_versions(&contents, *ino)? == 1
                && let Some((add, drop)) = list_ref_change(old, list)
            {
                batch.add_refs(OwnerId::LOCAL, add);
                batch.drop_refs(OwnerId::LOCAL, drop);
                continue;
            }
            let before = meta::chunks_of_ino(&contents, *ino, &[])?;
            let mut after = meta::chunks_of_ino(&contents, *ino, &skip)?;
            if let NewContent::Chunked(list) = new {
                after.extend(format::chunk_ids(list));
            }
            queue_union_change(batch, &before, &after);
        }
        Ok(live)
    }

    /// The new content of a staged file: inline when small; otherwise the
    /// base's chunks up to the first change, new chunks from there until the
    /// cut points meet the base's again, then the base's remaining chunks.
    fn build_content(&self, v: &StagedView, batch: &mut Batch<'_>) -> Result<NewContent> {
        if v.size <= INLINE_MAX {
            let mut out = vec![0u8; v.size as usize];
            self.read_staged(v, 0, &mut out)?;
            return Ok(NewContent::Inline(out));
        }
        let base = &v.base;
        let mut first = v.dirty.first_start().unwrap_or(u64::MAX);
        if v.base_limit < base.len() {
            first = first.min(v.base_limit);
        }
        if v.size != base.len() {
            first = first.min(v.size.min(base.len()));
        }
        if first == u64::MAX {
            return Ok(NewContent::Chunked(base.chunks.clone()));
        }
        // Start at the chunk holding the first change; a change at or past
        // the end re-cuts the last chunk, whose end was only the file's end.
        let i0 = base
            .find(first)
            .unwrap_or(base.chunks.len().saturating_sub(1));
        let start = base.starts.get(i0).copied().unwrap_or(0);
        let mut list: Vec<ChunkRef> = base.chunks[..i0].to_vec();
        let last_dirty = v.dirty.last_end().unwrap_or(first);
        let tail_ok = v.tail_intact();
        // Where the base's own cut points take over again.
        let resynced = |pos: u64| {
            if tail_ok && pos > last_dirty {
                base.is_cut(pos)
            } else {
                None
            }
        };
        let mut pos = start;
        let mut suffix: Option<usize> = None;
        // Data runs are chunked; holes of HOLE_MIN and more are listed as
        // holes, neither read, hashed nor stored.
        while pos < v.size && suffix.is_none() {
            let hole = if v.size - pos >= HOLE_MIN {
                v.first_hole(pos, v.size, HOLE_MIN)
                    .map_err(|e| io_err("finding holes in staging", e))?
            } else {
                None
            };
            let data_end = hole.map_or(v.size, |h| h.0);
            let reader = MergedReader {
                vol: self,
                view: v,
                pos,
                end: data_end,
            };
            let res = crate::chunker::chunk_stream(
                self.repo.store().config().chunker,
                reader,
                |data| -> std::result::Result<(), RechunkStop> {
                    list.push(batch.put_chunk(data).map_err(RechunkStop::Store)?);
                    pos += data.len() as u64;
                    suffix = resynced(pos);
                    match suffix {
                        Some(_) => Err(RechunkStop::Resynced),
                        None => Ok(()),
                    }
                },
            );
            match res {
                Ok(_) | Err(RechunkStop::Resynced) => {}
                Err(RechunkStop::Store(e)) => return Err(e.into()),
                Err(RechunkStop::Io(e)) => return Err(io_err("reading staged data", e)),
            }
            let Some((_, hole_end)) = hole else { break };
            while pos < hole_end && suffix.is_none() {
                // Entries end at multiples of HOLE_ENTRY_MAX, so the same
                // hole lists the same way wherever its re-chunk started.
                let e = ((pos / HOLE_ENTRY_MAX + 1) * HOLE_ENTRY_MAX).min(hole_end);
                list.push(ChunkRef::hole((e - pos) as u32));
                pos = e;
                suffix = resynced(pos);
            }
        }
        if let Some(j) = suffix {
            list.extend_from_slice(&base.chunks[j..]);
        }
        Ok(NewContent::Chunked(list))
    }

    /// One bounded round of background gc (see `reclaim_loop`). Returns
    /// whether it compacted a pack and should go again at once.
    /// Notes that a request came in (the fuser layer calls this for each).
    pub fn note_request(&self) {
        let now = self.started.elapsed().as_secs();
        if self.last_request.load(Ordering::Relaxed) != now {
            self.last_request.store(now, Ordering::Relaxed);
        }
    }

    /// Compacts meta.redb when it holds enough free pages to pay and no
    /// request came for `META_COMPACT_IDLE`: the copy has the database to
    /// itself, so a request that comes during it waits for it.
    fn compact_meta_if_idle(&self) -> Result<()> {
        let quiet = self
            .started
            .elapsed()
            .as_secs()
            .saturating_sub(self.last_request.load(Ordering::Relaxed));
        if self.read_only || quiet < META_COMPACT_IDLE.as_secs() {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        if let Some((before, after)) = self.repo.compact_meta_live(Duration::from_millis(200))? {
            log::info!(
                "gave back {} bytes of meta.redb while mounted ({before} -> {after}) in {:?}",
                before.saturating_sub(after),
                t0.elapsed()
            );
        }
        Ok(())
    }

    /// `dedupfs gc` on a mounted store: every idle pack at or past
    /// `threshold` compacted, then meta.redb if that pays (waiting up to
    /// five seconds for a moment when no transaction is open).
    pub fn gc(&self, threshold: f64) -> Result<store::maint::GcReport> {
        let opts = store::maint::GcOptions {
            threshold,
            free_floor: SPACE_FLOOR,
            max_packs: usize::MAX,
        };
        let mut r = store::maint::gc_with(self.repo.store(), &opts, &crate::NoProgress)?;
        *self.free_space.lock() = None;
        if let Some((before, after)) = self.repo.compact_meta_live(Duration::from_secs(5))? {
            r.db_bytes_freed = before.saturating_sub(after);
        }
        Ok(r)
    }

    fn reclaim_round(&self) -> Result<bool> {
        let dir = self.repo.dir();
        let s = rustix::fs::statvfs(dir).map_err(|e| io_err("statvfs", e.into()))?;
        let total = s.f_blocks.saturating_mul(s.f_frsize);
        let free = s.f_bavail.saturating_mul(s.f_frsize);
        let pack = self.repo.store().config().pack_target_bytes;
        let pressed = free < (total / 10).max(4 * pack);
        let opts = store::maint::GcOptions {
            threshold: if pressed {
                RECLAIM_PRESSED_THRESHOLD
            } else {
                RECLAIM_THRESHOLD
            },
            free_floor: SPACE_FLOOR,
            max_packs: RECLAIM_PACKS_PER_ROUND,
        };
        let r = store::maint::gc_with(self.repo.store(), &opts, &crate::NoProgress)?;
        if r.packs_compacted > 0 || r.bytes_punched > 0 {
            log::info!(
                "reclaimed {} bytes of dead space: {} packs compacted, {} bytes punched{}",
                r.bytes_before.saturating_sub(r.bytes_after) + r.bytes_punched,
                r.packs_compacted,
                r.bytes_punched,
                if pressed { " (space is short)" } else { "" }
            );
            // Free space moved: the next check asks the disk again.
            *self.free_space.lock() = None;
        }
        Ok(r.packs_compacted > 0)
    }

    /// Frees inodes whose last link and last handle are gone.
    fn reap_orphans(&self) {
        if self.read_only {
            return;
        }
        match crate::guard::catch(|| self.try_reap()) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::error!("reaping unlinked files failed: {e}"),
            Err(p) => log::error!("reaping unlinked files: {p}"),
        }
    }

    /// Orphans no handle holds open, and how many orphans there are;
    /// `clean` runs when there are none at all.
    fn reapable(&self, clean: impl Fn()) -> Result<(Vec<u64>, u64)> {
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        let t = rt.open_table(meta::ORPHANS).map_err(store::Error::from)?;
        let open = self.open.lock().clone();
        let mut v = Vec::new();
        let mut all = 0;
        for row in t.iter().map_err(store::Error::from)? {
            let ino = row.map_err(store::Error::from)?.0.value();
            all += 1;
            if !open.contains_key(&ino) {
                v.push(ino);
            }
        }
        if all == 0 {
            clean();
        }
        Ok((v, all))
    }

    fn try_reap(&self) -> Result<()> {
        self.check_space(Space::Frees)?;
        // Every commit that left an orphan before this load is seen by the
        // reads below: with none left, closes need not ask again.
        let seen = self.orphan_seq.load(Ordering::SeqCst);
        let clean = || {
            self.orphans_clean_upto.fetch_max(seen, Ordering::SeqCst);
        };
        // A cheap look first (most calls find nothing), then again under
        // content_lock: a rollback or restore between the two can give an
        // orphan its links back, and reaping it then left a name pointing
        // at a removed inode.
        if self.reapable(clean)?.0.is_empty() {
            return Ok(());
        }
        let _c = self.content_lock.lock();
        let (doomed, all) = self.reapable(clean)?;
        if doomed.is_empty() {
            return Ok(());
        }
        let mut batch = self.repo.store().batch()?;
        {
            let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
            let g = Gens::load(&rt.open_table(meta::STATE).map_err(store::Error::from)?)?;
            let contents = rt.open_table(meta::CONTENTS).map_err(store::Error::from)?;
            for ino in &doomed {
                if let Some((born, _)) = meta::live_content(&contents, *ino)?
                    && born > g.last_snap
                {
                    let before = meta::chunks_of_ino(&contents, *ino, &[])?;
                    let after = meta::chunks_of_ino(&contents, *ino, &[born])?;
                    queue_union_change(&mut batch, &before, &after);
                }
            }
        }
        self.commit_with_meta(batch, |tx, g| {
            let mut t = meta::Versioned::open(tx, g)?;
            let mut orphans = tx.open_table(meta::ORPHANS)?;
            for ino in &doomed {
                t.write_content(*ino, None)?;
                t.remove_inode(*ino)?;
                for name in meta::list_xattrs(&*t.xattrs.get()?, *ino)? {
                    t.remove_xattr(*ino, &name)?;
                }
                orphans.remove(*ino)?;
            }
            Ok(())
        })?;
        if doomed.len() as u64 == all {
            clean();
        }
        for ino in &doomed {
            let removed = self.staged.lock().remove(ino);
            if let Some(st) = removed {
                let s = st.lock();
                let _ = fs::remove_file(&s.path);
                let _ = fs::remove_file(sidecar_path(&s.path));
            }
            self.maps.lock().pop(ino);
        }
        Ok(())
    }
}

/// Queues the reference changes of an inode whose content versions held the
/// chunks `before` and will hold `after` (one reference per chunk per inode,
/// see `meta::chunks_of_ino`).
/// The reference change of replacing `old` by `new` when they are a file's
/// only versions (one reference per distinct chunk): the chunks of `new`
/// that `old` lacks gain one, those of `old` that `new` lacks lose one.
/// Only the middles between their common prefix and suffix can differ;
/// None when those are long (a rewrite: the sets cost the same then).
fn list_ref_change(old: &[ChunkRef], new: &[ChunkRef]) -> Option<(Vec<ChunkId>, Vec<ChunkId>)> {
    const MIDDLE_MAX: usize = 4096;
    let p = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let s = old[p..]
        .iter()
        .rev()
        .zip(new[p..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let (om, nm) = (&old[p..old.len() - s], &new[p..new.len() - s]);
    if om.len() + nm.len() > MIDDLE_MAX {
        return None;
    }
    let om: format::ChunkIdSet = format::chunk_ids(om).collect();
    let nm: format::ChunkIdSet = format::chunk_ids(nm).collect();
    let mut add: format::ChunkIdSet = nm.difference(&om).copied().collect();
    let mut drop: format::ChunkIdSet = om.difference(&nm).copied().collect();
    if !add.is_empty() || !drop.is_empty() {
        // The shared prefix and suffix are in both versions.
        for id in format::chunk_ids(&old[..p]).chain(format::chunk_ids(&old[old.len() - s..])) {
            add.remove(&id);
            drop.remove(&id);
        }
    }
    Some((add.into_iter().collect(), drop.into_iter().collect()))
}

fn queue_union_change(
    batch: &mut Batch<'_>,
    before: &format::ChunkIdSet,
    after: &format::ChunkIdSet,
) {
    batch.add_refs(OwnerId::LOCAL, after.difference(before).copied());
    batch.drop_refs(OwnerId::LOCAL, before.difference(after).copied());
}

/// Gives a file its new content in a meta transaction: the chunk list (or
/// inline bytes) and the size and times of the view it was built from.
fn commit_content(
    t: &mut meta::Versioned<'_>,
    ino: u64,
    view: &StagedView,
    new: &NewContent,
) -> store::Result<()> {
    let Some((_, mut rec)) = meta::live_inode(&*t.inodes.get()?, ino)? else {
        return Ok(());
    };
    match new {
        NewContent::Chunked(list) => {
            t.write_content(ino, Some(list))?;
            rec.content = Content::Chunked;
            rec.holes = list
                .iter()
                .filter(|c| c.is_hole())
                .map(|c| c.len as u64)
                .sum();
        }
        NewContent::Inline(b) => {
            t.write_content(ino, None)?;
            rec.holes = 0;
            rec.content = if b.is_empty() {
                Content::Empty
            } else {
                Content::Inline(b.clone())
            };
        }
    }
    rec.size = view.size;
    rec.mtime = view.mtime;
    rec.ctime = rec.ctime.max(view.ctime);
    t.write_inode(ino, &rec)
}

enum RechunkStop {
    Resynced,
    Store(store::Error),
    Io(io::Error),
}

impl From<io::Error> for RechunkStop {
    fn from(e: io::Error) -> Self {
        RechunkStop::Io(e)
    }
}

/// The right to build a file's staging state, released on drop.
struct Claim<'a> {
    set: &'a Mutex<std::collections::HashSet<u64>>,
    ino: u64,
}

impl<'a> Claim<'a> {
    /// None if someone else is building it.
    fn new(set: &'a Mutex<std::collections::HashSet<u64>>, ino: u64) -> Option<Claim<'a>> {
        set.lock().insert(ino).then_some(Claim { set, ino })
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.ino);
    }
}

/// Reads a staged file's bytes in [pos, end), merging staging and base.
struct MergedReader<'a> {
    vol: &'a Volume,
    view: &'a StagedView,
    pos: u64,
    end: u64,
}

impl Read for MergedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let end = (self.pos + buf.len() as u64).min(self.end);
        if self.pos >= end {
            return Ok(0);
        }
        let n = (end - self.pos) as usize;
        self.vol
            .read_staged(self.view, self.pos, &mut buf[..n])
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.pos = end;
        Ok(n)
    }
}

/// One handle of `ino` is closed; returns whether it was the last.
fn count_close(open: &mut HashMap<u64, u32>, ino: u64) -> bool {
    let n = open.entry(ino).or_default();
    *n = n.saturating_sub(1);
    if *n == 0 {
        open.remove(&ino);
        true
    } else {
        false
    }
}

/// `read_full_at` that fills the staging file's holes with zeros here
/// rather than reading them, for reads of 1 MiB and more (ingest's). Why:
/// reading a hole makes the kernel zero fresh page-cache pages, and on
/// this VM that ran at about 100 MB/s: a 10 GiB `truncate -s` took 99 s
/// to ingest, 85 % of it in the kernel's memset.
fn read_sparse_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    if buf.len() < (1 << 20) {
        return read_full_at(f, buf, off);
    }
    let end = off + buf.len() as u64;
    let mut pos = off;
    while pos < end {
        let (hs, he) = staging::file_hole(f, pos, end)?.unwrap_or((end, end));
        let at = |o: u64| (o - off) as usize;
        read_full_at(f, &mut buf[at(pos)..at(hs)], pos)?;
        buf[at(hs)..at(he)].fill(0);
        pos = he;
    }
    Ok(())
}

/// `Staged::refresh`, logged: a failed fstat leaves the last known size.
fn refresh(s: &mut Staged) {
    if let Err(e) = s.refresh() {
        log::warn!("reading the staging state of inode {}: {e}", s.ino);
    }
}

fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            // Past the staging file's end (a sparse tail): zeros.
            buf[done..].fill(0);
            return Ok(());
        }
        done += n;
    }
    Ok(())
}

/// A file's permission bits after a change that drops its privileges
/// (chown, or a truncate by an unprivileged caller): set-user-id goes, and
/// set-group-id when the group may execute (otherwise it marks mandatory
/// locking, which stays).
fn without_setid(perm: u32) -> u32 {
    let perm = perm & !0o4000;
    if perm & 0o010 != 0 {
        perm & !0o2000
    } else {
        perm
    }
}

fn sidecar_path(p: &std::path::Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".side");
    PathBuf::from(s)
}

fn write_sidecar(s: &Staged, sync: bool) -> io::Result<()> {
    if s.share_pin.is_some() {
        // Built on a list the record does not hold: a replay would read
        // the wrong base. Callers that need it durable commit the share
        // first (`commit_share`); until then a crash keeps the old file.
        return Ok(());
    }
    if s.whole && s.marked {
        // The staging file describes itself; fsync makes its bytes, length
        // and tag durable, and the directory entry naming it.
        if sync {
            s.file.sync_all()?;
            if let Some(dir) = s.path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        return Ok(());
    }
    let bytes = serde_json::to_vec(&s.sidecar()).map_err(io::Error::other)?;
    let path = sidecar_path(&s.path);
    if sync {
        store::write_file_atomic(&path, &bytes)
    } else {
        let tmp = path.with_extension("side.tmp");
        fs::write(&tmp, &bytes)?;
        fs::rename(&tmp, &path)
    }
}

/// A directory listing's "." and "..".
fn dot_entries(ino: u64, up: u64) -> Vec<DirEntry> {
    vec![
        DirEntry {
            name: b".".to_vec(),
            ino,
            kind: Kind::Dir,
        },
        DirEntry {
            name: b"..".to_vec(),
            ino: up,
            kind: Kind::Dir,
        },
    ]
}

/// Snapshots are read-only.
fn refuse_snap(ino: u64) -> Result<()> {
    if is_snap_ino(ino) {
        return Err(Error::Errno(libc::EROFS));
    }
    Ok(())
}

/// Refuses a change inside a snapshot (EROFS) or to `/.snapshots` itself
/// (`errno`).
fn refuse_snap_name(parent: u64, name: &[u8], errno: i32) -> Result<()> {
    refuse_snap(parent)?;
    if parent == meta::ROOT_INO && name == SNAPDIR_NAME {
        return Err(Error::Errno(errno));
    }
    Ok(())
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(Error::Errno(libc::ENAMETOOLONG));
    }
    if name.is_empty() || name.contains(&b'/') {
        return Err(Error::Errno(libc::EINVAL));
    }
    Ok(())
}

fn check_xattr_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > 255 {
        return Err(Error::Errno(libc::ERANGE));
    }
    let ok = [&b"user."[..], b"security.", b"trusted.", b"system."]
        .iter()
        .any(|p| name.starts_with(p));
    if !ok {
        return Err(Error::Errno(libc::EOPNOTSUPP));
    }
    Ok(())
}

/// getxattr's answer for `name` of `ino`, stored as `stored`, the inode's
/// mode being `perm`: an access ACL is shown under the mode (see
/// `acl::access_view`), and one the mode says in full is not there.
pub(crate) fn xattr_view(
    ino: u64,
    name: &[u8],
    stored: Option<Vec<u8>>,
    perm: u32,
) -> Result<Vec<u8>> {
    let v = stored.ok_or(Error::Errno(libc::ENODATA))?;
    if name != acl::ACCESS {
        return Ok(v);
    }
    match acl::access_view(&v, perm) {
        Ok(Some(v)) => Ok(v),
        Ok(None) => Err(Error::Errno(libc::ENODATA)),
        Err(e) => Err(stored_acl_error(ino, &e)),
    }
}

/// listxattr's answer: the names, each NUL-terminated, without an access
/// ACL that getxattr would not show (`xattr_view`).
pub(crate) fn list_view(
    ino: u64,
    names: Vec<Vec<u8>>,
    perm: u32,
    get: impl Fn(&[u8]) -> std::result::Result<Option<Vec<u8>>, store::Error>,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for n in names {
        if n == acl::ACCESS {
            match xattr_view(ino, &n, get(&n)?, perm) {
                Err(e) if e.errno() == libc::ENODATA => continue,
                r => {
                    r?;
                }
            }
        }
        out.extend_from_slice(&n);
        out.push(0);
    }
    Ok(out)
}

/// A stored ACL that does not parse: only a damaged store holds one (every
/// ACL is checked before it is stored), so EIO, and a log line.
fn stored_acl_error(ino: u64, e: &acl::AclError) -> Error {
    log::error!("inode {ino}: stored ACL is unreadable: {e}");
    Error::Errno(libc::EIO)
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

fn ingest_loop(vol: std::sync::Weak<Volume>, rx: Arc<Mutex<Receiver<Msg>>>) {
    loop {
        // The receiver stays locked while this worker gathers its group,
        // so the other workers wait for the lock instead of splitting the
        // stream into groups of one (and the gathering never waits on a
        // worker blocked in recv: that stranded groups at unmount).
        let rxg = rx.lock();
        let first = match rxg.recv() {
            Ok(m) => m,
            Err(_) => return,
        };
        let Some(v) = vol.upgrade() else { return };
        let mut group = Vec::new();
        let mut reap = false;
        let mut stop = false;
        let mut bytes = 0u64;
        let mut next = Some(first);
        let deadline = std::time::Instant::now() + INGEST_GATHER;
        while let Some(m) = next.take() {
            match m {
                Msg::Ingest(i) => {
                    if let Some(st) = v.staged_of(i) {
                        bytes += st.try_lock().map(|s| s.size).unwrap_or(0);
                    }
                    group.push(i);
                }
                Msg::Reap => reap = true,
                Msg::Stop => stop = true,
            }
            if !stop && group.len() < INGEST_GROUP_FILES && bytes < INGEST_GROUP_BYTES {
                next = match rxg.try_recv() {
                    Ok(m) => Some(m),
                    // Wait a little for more files to close: every group
                    // is a durable commit, and redb holds its write lock
                    // across the fsync, so creates and setattrs wait for
                    // each one. An untar committed each file on its own.
                    Err(_) if !group.is_empty() => {
                        let left = deadline.saturating_duration_since(std::time::Instant::now());
                        rxg.recv_timeout(left).ok()
                    }
                    Err(_) => None,
                };
            }
        }
        drop(rxg);
        if !group.is_empty() {
            group.sort_unstable();
            let messages = group.len() as u64;
            group.dedup();
            v.ingest_group(group, messages);
        }
        if reap {
            v.reap_orphans();
        }
        if stop {
            return;
        }
    }
}

fn flush_loop(vol: std::sync::Weak<Volume>, stop: &(Mutex<bool>, Condvar)) {
    loop {
        {
            let mut stopped = stop.0.lock();
            if !*stopped {
                stop.1.wait_for(&mut stopped, Duration::from_secs(2));
            }
            if *stopped {
                return;
            }
        }
        let Some(v) = vol.upgrade() else { return };
        if v.queue.lock().is_none() {
            return;
        }
        match crate::guard::catch(|| v.sync_meta()) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::error!("periodic metadata sync failed: {e}"),
            Err(p) => log::error!("periodic metadata sync: {p}"),
        }
        if v.retry_ingest.swap(false, Ordering::SeqCst) {
            v.queue_idle_staged();
        }
    }
}

/// Dead fraction past which a pack is compacted in the background.
const RECLAIM_THRESHOLD: f64 = 0.2;
/// Under space pressure, any pack with this much dead is worth a round.
const RECLAIM_PRESSED_THRESHOLD: f64 = 0.02;
/// Packs compacted per round, so a shutdown never waits long for one.
const RECLAIM_PACKS_PER_ROUND: usize = 2;
/// How long the filesystem must have been without requests before
/// meta.redb is compacted, and how often it is looked at.
const META_COMPACT_IDLE: Duration = Duration::from_secs(30);
const META_COMPACT_EVERY: Duration = Duration::from_secs(60);

/// Gives the space of deleted data back without a command: compacts packs
/// whose dead fraction passes `RECLAIM_THRESHOLD`, and under space
/// pressure (less free than a tenth of the filesystem or four packs) any
/// pack with dead bytes, most dead first. Rounds are bounded and run on
/// this thread alone; they share the index's commit lock with ingest only
/// for their one commit, so requests do not wait on the copying.
fn reclaim_loop(vol: std::sync::Weak<Volume>, stop: &(Mutex<bool>, Condvar)) {
    let mut busy = false;
    let mut meta_checked = std::time::Instant::now();
    loop {
        {
            let mut stopped = stop.0.lock();
            if !*stopped && !busy {
                stop.1.wait_for(&mut stopped, Duration::from_secs(1));
            }
            if *stopped {
                return;
            }
        }
        let Some(v) = vol.upgrade() else { return };
        if v.failed.load(Ordering::Relaxed) {
            busy = false;
            continue;
        }
        busy = match crate::guard::catch(|| v.reclaim_round()) {
            Ok(Ok(more)) => more,
            Ok(Err(e)) => {
                log::error!("reclaiming space failed: {e}");
                false
            }
            Err(p) => {
                log::error!("reclaiming space: {p}");
                false
            }
        };
        if !busy && meta_checked.elapsed() >= META_COMPACT_EVERY {
            meta_checked = std::time::Instant::now();
            match crate::guard::catch(|| v.compact_meta_if_idle()) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::error!("compacting meta.redb failed: {e}"),
                Err(p) => log::error!("compacting meta.redb: {p}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The middle diff gives what diffing the two lists' sets gives,
        /// for edits anywhere, chunks repeated within a list, and holes.
        #[test]
        fn list_ref_change_matches_set_diff(
            old in proptest::collection::vec(0u8..12, 0..40),
            at in 0usize..40,
            cut in 0usize..8,
            ins in proptest::collection::vec(0u8..12, 0..8),
        ) {
            // Id 0 stands for a hole.
            let r = |b: &u8| if *b == 0 {
                ChunkRef::hole(7)
            } else {
                ChunkRef { id: ChunkId::of(&[*b]), len: 1 }
            };
            let old: Vec<ChunkRef> = old.iter().map(r).collect();
            let at = at.min(old.len());
            let end = (at + cut).min(old.len());
            let mut new = old[..at].to_vec();
            new.extend(ins.iter().map(r));
            new.extend_from_slice(&old[end..]);
            let set = |l: &[ChunkRef]| -> format::ChunkIdSet { format::chunk_ids(l).collect() };
            let (before, after) = (set(&old), set(&new));
            let mut want_add: Vec<ChunkId> = after.difference(&before).copied().collect();
            let mut want_drop: Vec<ChunkId> = before.difference(&after).copied().collect();
            let (mut add, mut drop) = list_ref_change(&old, &new).unwrap();
            for v in [&mut want_add, &mut want_drop, &mut add, &mut drop] {
                v.sort();
            }
            proptest::prop_assert_eq!(add, want_add);
            proptest::prop_assert_eq!(drop, want_drop);
        }
    }

    /// Holes read as zeros and data as written, whatever the read's
    /// alignment against them, the same as a plain read.
    #[test]
    fn sparse_reads_match_plain_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mib = 1u64 << 20;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 + 1).collect();
        for off in [0, 3 * mib + 12_345, 9 * mib - 1000] {
            f.write_all_at(&data, off).unwrap();
        }
        f.set_len(12 * mib).unwrap();
        for (off, len) in [
            (0, 12 * mib),
            (1000, 2 * mib),
            (3 * mib, mib + 5),
            (8 * mib, 4 * mib),
            (10 * mib, 3 * mib), // past the end: zeros
        ] {
            let mut a = vec![0xaau8; len as usize];
            let mut b = vec![0x55u8; len as usize];
            read_sparse_at(&f, &mut a, off).unwrap();
            read_full_at(&f, &mut b, off).unwrap();
            assert!(a == b, "read of {len} at {off}");
        }
    }
}
