//! The chunkstore: chunk blobs in append-only packs, and `index.redb`, which
//! maps each chunk to its place, size, and owners with a reference count each.
//!
//! Invariants this module keeps:
//! - A chunk's index entry points at a record that was synced before the
//!   commit that wrote the entry (blobs first, then the index).
//! - A pack is never written below its committed length.
//! - A dead chunk (no owners) is removed only by gc, and only when no batch
//!   that could still reference it is running (see `Batch::start_seq`).
//! - The index is derived state: `maint::rebuild_index` recreates it from the
//!   packs plus the references the layer above reports.
//!
//! Calls `format`, `chunker`; knows nothing of the layers above it.

pub mod maint;
pub mod negcache;
pub mod pack;
pub mod window;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::num::NonZeroUsize;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use lru::LruCache;
use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use thiserror::Error;

use crate::chunker;
use crate::format::{
    self, CONFIG_FILE, ChunkEntry, ChunkId, ChunkRef, ChunkerParams, Compression, FormatError,
    OwnerId, PACK_HEADER_LEN, PackEntry, PackId, StoreConfig,
};
use negcache::NegCache;
use pack::PackWriter;

pub const CHUNKS: TableDefinition<&[u8; 20], &[u8]> = TableDefinition::new("chunks");
pub const PACKS: TableDefinition<u64, &[u8]> = TableDefinition::new("packs");
pub const STATE: TableDefinition<&str, u64> = TableDefinition::new("state");
pub const UNDO: TableDefinition<&str, &[u8]> = TableDefinition::new("undo");

pub const INDEX_FILE: &str = "index.redb";
pub const INDEX_FORMAT_VERSION: u64 = 1;

/// Chunks a batch may hold uncommitted before it commits them on its own
/// (their places, not yet their references), bounding a batch's memory.
const FLUSH_EVERY_CHUNKS: usize = 32768;
/// The undo record of a commit is stored in values of at most this many
/// deltas (64 KB each), so neither a value nor the redb page holding it
/// grows with the size of a commit.
const UNDO_SEGMENT_DELTAS: usize = 2000;
/// How long a batch waits for the batches whose chunks it shares to commit
/// them before it gives up with [`Error::Contended`]. Far longer than any
/// commit; reached only if the batch it waits for is stuck.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);
/// redb's page cache for index.redb. Small on purpose: lookups of new chunks
/// are answered by the negative cache, so a bigger cache only grows memory
/// with the store (4 GiB of unique data filled 16 MiB and cost 1.6x the
/// peak of 1 GiB).
const INDEX_CACHE_BYTES: usize = 4 << 20;

#[derive(Debug, Error)]
pub enum Error {
    #[error("{path}: not a dedupfs store ({why})")]
    NotAStore { path: PathBuf, why: String },
    #[error("{path}: {err}")]
    Format { path: PathBuf, err: FormatError },
    #[error("the store at {0} is in use by another process (is it mounted?)")]
    Locked(PathBuf),
    #[error("index {path} is unusable: {why}; `dedupfs fsck --repair` rebuilds it from the packs")]
    IndexDamaged { path: PathBuf, why: String },
    #[error(
        "metadata {path} is damaged: {why}; the packs are intact, but the files it lists \
         cannot all be read: restore meta.redb from a copy, then run `dedupfs fsck`"
    )]
    MetaDamaged { path: PathBuf, why: String },
    #[error("chunk {chunk} in {pack} at offset {offset} is corrupt: {why}")]
    Corrupt {
        chunk: ChunkId,
        pack: PackId,
        offset: u64,
        why: String,
    },
    #[error("chunk {0} is not in the store")]
    NotFound(ChunkId),
    #[error("{owner} holds no reference to chunk {chunk} to drop")]
    RefUnderflow { chunk: ChunkId, owner: OwnerId },
    #[error("{context}: {err}")]
    Io { context: String, err: io::Error },
    #[error("database: {0}")]
    Db(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{0}; try again")]
    Contended(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            err: source,
        }
    }

    /// The OS error this maps to, for the filesystem layer.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { err, .. } => err.raw_os_error().unwrap_or(libc::EIO),
            Error::NotFound(_) | Error::Corrupt { .. } => libc::EIO,
            Error::Locked(_) => libc::EBUSY,
            Error::Invalid(_) => libc::EINVAL,
            _ => libc::EIO,
        }
    }

    pub fn is_no_space(&self) -> bool {
        self.errno() == libc::ENOSPC
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::io("store I/O", e)
    }
}

/// redb reports I/O failures (ENOSPC among them) wrapped in its own types;
/// keep the OS error so callers see the real cause.
fn db_err(e: impl Into<redb::Error>) -> Error {
    match e.into() {
        redb::Error::Io(io) => Error::io("index database", io),
        other => Error::Db(other.to_string()),
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error { db_err(e) }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Running totals kept in the `state` table, updated in every commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Sum over live chunks of plaintext length times total references.
    pub logical_bytes: u64,
    pub live_chunks: u64,
    pub live_raw_bytes: u64,
    pub live_stored_bytes: u64,
    pub total_chunks: u64,
    pub commits: u64,
}

impl Counters {
    const KEYS: [&'static str; 6] = [
        "logical_bytes",
        "live_chunks",
        "live_raw_bytes",
        "live_stored_bytes",
        "total_chunks",
        "commits",
    ];

    fn fields_mut(&mut self) -> [&mut u64; 6] {
        [
            &mut self.logical_bytes,
            &mut self.live_chunks,
            &mut self.live_raw_bytes,
            &mut self.live_stored_bytes,
            &mut self.total_chunks,
            &mut self.commits,
        ]
    }

    pub fn load(t: &impl ReadableTable<&'static str, u64>) -> Result<Counters> {
        let mut c = Counters::default();
        for (k, f) in Self::KEYS.iter().zip(c.fields_mut()) {
            *f = t.get(*k)?.map(|v| v.value()).unwrap_or(0);
        }
        Ok(c)
    }

    pub fn save(mut self, t: &mut redb::Table<&'static str, u64>) -> Result<()> {
        for (k, f) in Self::KEYS.iter().zip(self.fields_mut()) {
            t.insert(*k, *f)?;
        }
        Ok(())
    }
}

/// How a chunk read back is checked before its bytes are used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// The plaintext's SHA-1 must be the chunk's name: what fsck, scrub,
    /// transfers and object reads use.
    Name,
    /// The record's CRC-32 (over its header, which names the chunk, and
    /// the stored blob) must match: damage on disk is caught as surely
    /// (to 1 in 2^32), at a small part of the CPU. The mounted filesystem's
    /// reads use it; SHA-1 was a quarter to a third of the daemon's CPU on
    /// a cold sequential read. docs/design.md, "Checking chunks on read".
    Crc,
}

/// Checks a record read back for chunk `id` and decodes its blob.
fn decode(id: &ChunkId, check: Check, rec: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let crc = check == Check::Crc;
    let blob = pack::check_record_as(rec, id, crc)?;
    pack::decode_blob_as(blob, id, !crc)
}

/// Shared state of an open store.
pub struct Store {
    dir: PathBuf,
    config: StoreConfig,
    db: Database,
    _lock: File,
    negcache: RwLock<NegCache>,
    /// Idle pack writers with room left.
    writers: Mutex<Vec<PackWriter>>,
    /// Packs in `writers` or checked out by a batch: gc leaves them alone.
    active_packs: Mutex<HashSet<PackId>>,
    next_pack: AtomicU64,
    files: Mutex<LruCache<PackId, Arc<File>>>,
    /// The same packs opened with O_DIRECT, read through `windows`.
    direct_files: Mutex<LruCache<PackId, Arc<File>>>,
    windows: window::Windows,
    /// Cleared when the filesystem refuses O_DIRECT reads.
    direct_ok: AtomicBool,
    /// Serialises index commits (and, above us, the meta commit that follows
    /// each). Lock order: commit_lock before any other lock here.
    commit_lock: Mutex<()>,
    /// Running batches by id, with the commit sequence each started at.
    batches: Arc<Mutex<BTreeMap<u64, u64>>>,
    next_batch: AtomicU64,
    gc_lock: Mutex<()>,
    /// Dead bytes each pack had when gc last punched it (a cache: a pack
    /// is punched again only once more of it has died).
    punched_at: Mutex<HashMap<PackId, u64>>,
    /// Chunks written by a running batch and not yet in the index, each
    /// with the batch storing it: another batch meeting the same chunk
    /// shares that copy instead of writing its own (see [`Claim`]).
    claims: Mutex<HashMap<ChunkId, Claim>>,
    /// Counts index commits that may have added chunks, bumped after each
    /// lands: a batch whose read snapshot is older looks again.
    index_epoch: AtomicU64,
    /// Signalled when a batch that lent chunks commits or gives them up.
    settled: (Mutex<()>, Condvar),
}

/// A chunk a running batch has written and not yet committed. Claims are
/// exclusive: while one stands, every other batch that meets the chunk
/// borrows it (takes its reference to that copy), and before its own commit
/// waits until the claiming batch has committed it ([`Batch::settle`]).
///
/// Why: two batches ingesting the same bytes at once (two files copied
/// together, `object put --threads 2`) each wrote their own copy, and the
/// second commit found the first's: 30-34% of a fresh store was dead.
struct Claim {
    owner: Arc<Lender>,
    /// The owner's commit count when it claimed: the claim is settled once
    /// the owner has committed more often than that.
    round: u64,
}

/// What other batches may learn of a batch whose chunks they borrow.
struct Lender {
    commits: AtomicU64,
    /// Set by a borrower that waits: commit your chunks soon.
    wanted: AtomicBool,
    /// The batch was dropped with chunks uncommitted: borrowers fail.
    abandoned: AtomicBool,
    /// Some other batch borrowed from this one (wake waiters on commit).
    lent: AtomicBool,
    /// A batch never borrows from one made on its own thread: it would wait
    /// for itself.
    thread: ThreadId,
}

impl Lender {
    fn settled(&self, round: u64) -> Result<bool> {
        if self.commits.load(Ordering::SeqCst) > round {
            Ok(true)
        } else if self.abandoned.load(Ordering::SeqCst) {
            Err(Error::Contended(
                "another ingest holding a chunk this one shares failed before committing it".into(),
            ))
        } else {
            Ok(false)
        }
    }
}

/// Options for `init`.
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub chunker: ChunkerParams,
    pub compression: Compression,
    /// 1..=22, used when `compression` is zstd.
    pub zstd_level: i32,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunker: ChunkerParams::default(),
            compression: Compression::Zstd,
            zstd_level: crate::format::DEFAULT_ZSTD_LEVEL,
        }
    }
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes `bytes` to `path` durably: new file, fsync, rename, fsync dir.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Whether `dir` looks like a store (has a config file).
pub fn is_store(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
}

impl Store {
    /// Creates a new store in `dir`, which must be absent or empty.
    pub fn init(dir: &Path, opts: &InitOptions) -> Result<()> {
        opts.chunker.validate().map_err(Error::Invalid)?;
        if dir.exists() {
            let mut entries =
                fs::read_dir(dir).map_err(|e| Error::io(format!("{}", dir.display()), e))?;
            if entries.next().is_some() {
                return Err(Error::Invalid(format!(
                    "{} exists and is not empty",
                    dir.display()
                )));
            }
        }
        fs::create_dir_all(dir.join("packs"))
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let db = Database::create(dir.join(INDEX_FILE))?;
        let tx = db.begin_write()?;
        {
            tx.open_table(CHUNKS)?;
            tx.open_table(PACKS)?;
            tx.open_table(UNDO)?;
            let mut st = tx.open_table(STATE)?;
            st.insert("index_format", INDEX_FORMAT_VERSION)?;
            st.insert("commit_seq", 1)?;
            st.insert("ref_seq", 0)?;
        }
        tx.commit()?;
        drop(db);
        let mut cfg = StoreConfig::new(opts.chunker, opts.compression, random_id());
        cfg.zstd_level = opts.zstd_level;
        // The config goes last: a directory without it is not a store yet.
        write_file_atomic(&dir.join(CONFIG_FILE), &cfg.encode())
            .map_err(|e| Error::io("writing config.json", e))?;
        Ok(())
    }

    /// Reads and checks a store's config without opening anything else.
    pub fn read_config(dir: &Path) -> Result<StoreConfig> {
        let path = dir.join(CONFIG_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotAStore {
                    path: dir.to_path_buf(),
                    why: "no config.json".into(),
                });
            }
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        StoreConfig::decode(&bytes).map_err(|source| match source {
            FormatError::BadMagic { .. } | FormatError::Malformed { .. } => Error::NotAStore {
                path: dir.to_path_buf(),
                why: source.to_string(),
            },
            err => Error::Format { path, err },
        })
    }

    /// Takes the store's lock file; fails if another process holds it.
    pub fn lock(dir: &Path) -> Result<File> {
        let path = dir.join("lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        match f.try_lock() {
            Ok(()) => Ok(f),
            // In full: a relative path read "store store is in use".
            Err(fs::TryLockError::WouldBlock) => Err(Error::Locked(
                fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()),
            )),
            Err(fs::TryLockError::Error(e)) => Err(Error::io("locking the store", e)),
        }
    }

    /// Opens the index database, turning every way it can be unusable into
    /// one clear error.
    fn open_index(dir: &Path) -> Result<Database> {
        let path = dir.join(INDEX_FILE);
        crate::guard::catch(|| Self::open_index_unguarded(&path)).unwrap_or_else(|p| {
            Err(Error::IndexDamaged {
                path: path.clone(),
                why: p.0,
            })
        })
    }

    /// Reads every row of every table of the index, so damage anywhere in
    /// its live pages is an [`Error::IndexDamaged`] now rather than a panic
    /// later. Costs a pass over the index; fsck and diagnosis use it.
    pub fn check_index(&self) -> Result<u64> {
        let path = self.dir.join(INDEX_FILE);
        let damaged = |why: String| Error::IndexDamaged {
            path: path.clone(),
            why,
        };
        let table = std::cell::Cell::new("");
        let walk = || -> std::result::Result<u64, redb::Error> {
            let rt = self.db.begin_read()?;
            let mut rows = 0;
            table.set("chunks");
            rows += walk_table(&rt, CHUNKS)?;
            table.set("packs");
            rows += walk_table(&rt, PACKS)?;
            table.set("state");
            rows += walk_table(&rt, STATE)?;
            table.set("undo");
            rows += walk_table(&rt, UNDO)?;
            Ok(rows)
        };
        match crate::guard::catch(walk) {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(damaged(format!("{e} (table {})", table.get()))),
            Err(p) => Err(damaged(format!("{} (table {})", p.0, table.get()))),
        }
    }

    fn open_index_unguarded(path: &Path) -> Result<Database> {
        let path = path.to_path_buf();
        let damaged = |why: String| Error::IndexDamaged {
            path: path.clone(),
            why,
        };
        if !path.is_file() {
            return Err(damaged("the file is missing".into()));
        }
        let db = Database::builder()
            .set_cache_size(INDEX_CACHE_BYTES)
            .set_repair_callback(|_| {})
            .open(&path)
            .map_err(|e| damaged(e.to_string()))?;
        let rt = db.begin_read().map_err(|e| damaged(e.to_string()))?;
        let st = rt.open_table(STATE).map_err(|e| damaged(e.to_string()))?;
        let v = st
            .get("index_format")
            .map_err(|e| damaged(e.to_string()))?
            .map(|v| v.value());
        match v {
            Some(INDEX_FORMAT_VERSION) => {}
            Some(other) => {
                return Err(Error::Format {
                    path,
                    err: FormatError::UnknownVersion {
                        what: "index",
                        found: other as u32,
                        supported: INDEX_FORMAT_VERSION as u32,
                    },
                });
            }
            None => return Err(damaged("no format version recorded".into())),
        }
        rt.open_table(CHUNKS).map_err(|e| damaged(e.to_string()))?;
        rt.open_table(UNDO).map_err(|e| damaged(e.to_string()))?;
        rt.open_table(PACKS).map_err(|e| damaged(e.to_string()))?;
        Ok(db)
    }

    /// Opens an existing store for exclusive use, recovering from a crash
    /// (torn pack tails, packs never committed) on the way.
    pub fn open(dir: &Path) -> Result<Store> {
        let config = Self::read_config(dir)?;
        let lock = Self::lock(dir)?;
        let db = Self::open_index(dir)?;
        Self::from_parts(dir, config, lock, db, true)
    }

    fn from_parts(
        dir: &Path,
        config: StoreConfig,
        lock: File,
        db: Database,
        recover: bool,
    ) -> Result<Store> {
        let store = Store {
            dir: dir.to_path_buf(),
            config,
            db,
            _lock: lock,
            negcache: RwLock::new(NegCache::with_capacity(0)),
            writers: Mutex::new(Vec::new()),
            active_packs: Mutex::new(HashSet::new()),
            next_pack: AtomicU64::new(1),
            files: Mutex::new(LruCache::new(
                NonZeroUsize::new(128).unwrap_or(NonZeroUsize::MIN),
            )),
            direct_files: Mutex::new(LruCache::new(
                NonZeroUsize::new(128).unwrap_or(NonZeroUsize::MIN),
            )),
            windows: window::Windows::default(),
            direct_ok: AtomicBool::new(true),
            commit_lock: Mutex::new(()),
            batches: Arc::new(Mutex::new(BTreeMap::new())),
            next_batch: AtomicU64::new(1),
            gc_lock: Mutex::new(()),
            punched_at: Mutex::new(HashMap::new()),
            claims: Mutex::new(HashMap::new()),
            index_epoch: AtomicU64::new(0),
            settled: (Mutex::new(()), Condvar::new()),
        };
        // Both read the whole index: a damaged page panics inside redb.
        let path = dir.join(INDEX_FILE);
        crate::guard::catch(|| -> Result<()> {
            if recover {
                store.recover_packs()?;
            }
            store.rebuild_negcache()
        })
        .unwrap_or_else(|p| Err(Error::IndexDamaged { path, why: p.0 }))?;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Gives index.redb's free and slack pages back (see [`rewrite_db`]).
    pub fn compact_index(&mut self) -> Result<Option<(u64, u64)>> {
        let path = self.dir.join(INDEX_FILE);
        rewrite_db(&mut self.db, &path, INDEX_CACHE_BYTES, |c| {
            c.copy(CHUNKS)?;
            c.copy(PACKS)?;
            c.copy(STATE)?;
            c.copy(UNDO)
        })
    }

    pub fn db(&self) -> &Database {
        &self.db
    }

    /// Brings pack files in line with the index after a crash: cuts
    /// uncommitted tails, removes packs no commit ever named, and drops
    /// index entries that a shortened pack no longer holds.
    fn recover_packs(&self) -> Result<()> {
        let files = pack::list_pack_files(&self.dir).map_err(|e| Error::io("listing packs", e))?;
        let rt = self.db.begin_read()?;
        let packs = rt.open_table(PACKS)?;
        let mut known: HashMap<PackId, PackEntry> = HashMap::new();
        for row in packs.iter()? {
            let (k, v) = row?;
            let e = PackEntry::decode(v.value()).map_err(|e| Error::IndexDamaged {
                path: self.dir.join(INDEX_FILE),
                why: e.to_string(),
            })?;
            known.insert(PackId(k.value()), e);
        }
        drop(packs);
        drop(rt);
        let mut max_id = known.keys().map(|p| p.0).max().unwrap_or(0);
        let mut shortened = Vec::new();
        for (id, path) in &files {
            max_id = max_id.max(id.0);
            let Some(entry) = known.get(id) else {
                log::warn!("removing {id}: no commit ever named it (crash before commit)");
                fs::remove_file(path).map_err(|e| Error::io(format!("removing {id}"), e))?;
                continue;
            };
            let len = fs::metadata(path)
                .map_err(|e| Error::io(format!("stat {id}"), e))?
                .len();
            if len > entry.committed_len {
                log::warn!(
                    "{id}: cutting {} uncommitted bytes past offset {}",
                    len - entry.committed_len,
                    entry.committed_len
                );
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| Error::io(format!("opening {id}"), e))?;
                f.set_len(entry.committed_len)
                    .and_then(|_| f.sync_all())
                    .map_err(|e| Error::io(format!("truncating {id}"), e))?;
            } else if len < entry.committed_len {
                log::error!(
                    "{id} is {len} bytes but the index vouches for {}: records past the end are lost",
                    entry.committed_len
                );
                shortened.push((*id, len));
            }
        }
        let on_disk: HashSet<PackId> = files.iter().map(|(id, _)| *id).collect();
        for id in known.keys() {
            if !on_disk.contains(id) {
                log::error!("{id} is missing from disk: its chunks are lost");
                shortened.push((*id, 0));
            }
        }
        if !shortened.is_empty() {
            maint::forget_lost_records(self, &shortened)?;
        }
        self.next_pack.store(max_id + 1, Ordering::SeqCst);
        Ok(())
    }

    /// Sizes the negative cache for the index and fills it.
    fn rebuild_negcache(&self) -> Result<()> {
        let rt = self.db.begin_read()?;
        let chunks = rt.open_table(CHUNKS)?;
        let n = chunks.len()?;
        let cache = NegCache::with_capacity(n.max(1) * 2);
        for row in chunks.iter()? {
            let (k, _) = row?;
            cache.insert(&ChunkId(*k.value()));
        }
        *self.negcache.write() = cache;
        Ok(())
    }

    pub fn negcache_bytes(&self) -> usize {
        self.negcache.read().size_bytes()
    }

    /// Looks a chunk up in the index.
    pub fn lookup(&self, id: &ChunkId) -> Result<Option<ChunkEntry>> {
        let rt = self.db.begin_read()?;
        lookup_in(&rt, id)
    }

    fn pack_file(&self, id: PackId) -> io::Result<Arc<File>> {
        self.open_pack(&self.files, id, 0)
    }

    fn pack_file_direct(&self, id: PackId) -> io::Result<Arc<File>> {
        self.open_pack(&self.direct_files, id, libc::O_DIRECT)
    }

    /// Pack `id` opened to read with `flags`, kept in `cache`.
    fn open_pack(
        &self,
        cache: &Mutex<LruCache<PackId, Arc<File>>>,
        id: PackId,
        flags: i32,
    ) -> io::Result<Arc<File>> {
        if let Some(f) = cache.lock().get(&id) {
            return Ok(f.clone());
        }
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .custom_flags(flags)
                .open(pack::pack_path(&self.dir, id))?,
        );
        cache.lock().put(id, f.clone());
        Ok(f)
    }

    fn forget_pack_file(&self, id: PackId) {
        self.files.lock().pop(&id);
        self.direct_files.lock().pop(&id);
        self.windows.forget_pack(id);
    }

    /// Reads a chunk and checks it against its name. A mismatch is an error
    /// naming the chunk and the pack, never wrong bytes.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.read_chunk_checked(id, Check::Name)
    }

    /// Reads a chunk, checked as `check` says; any mismatch is an error
    /// naming the chunk and the pack, never wrong bytes.
    ///
    /// Packs are read with O_DIRECT through `window::Windows` where the
    /// filesystem allows it (see there for why), else through the page
    /// cache.
    pub fn read_chunk_checked(&self, id: &ChunkId, check: Check) -> Result<Vec<u8>> {
        // gc may move a chunk between our lookup and our read; one retry
        // after the pack vanished sees the new place.
        for attempt in 0..2 {
            let entry = self.lookup(id)?.ok_or(Error::NotFound(*id))?;
            let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound && attempt == 0;
            let corrupt = |why: String| self.corrupt(id, &entry, why);
            if self.direct_ok.load(Ordering::Relaxed) {
                let read = || {
                    self.pack_file_direct(entry.pack).and_then(|f| {
                        self.windows.record(
                            entry.pack,
                            &f,
                            entry.offset,
                            u64::from(entry.record_len),
                        )
                    })
                };
                match read() {
                    Ok(rec) => match decode(id, check, rec.bytes()) {
                        Ok(data) => return Ok(data),
                        Err(_) => {
                            // A window may hold what a rolled-back batch
                            // once wrote at these offsets: read the record
                            // afresh before calling it corrupt.
                            drop(rec);
                            self.windows.forget_pack(entry.pack);
                            return read()
                                .map_err(|e| e.to_string())
                                .and_then(|rec| decode(id, check, rec.bytes()))
                                .map_err(corrupt);
                        }
                    },
                    Err(e) if gone(&e) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        log::info!("packs: no O_DIRECT reads here ({e}); using the page cache");
                        self.direct_ok.store(false, Ordering::Relaxed);
                    }
                    Err(e) => return Err(corrupt(e.to_string())),
                }
            }
            let file = match self.pack_file(entry.pack) {
                Ok(f) => f,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(Error::io(format!("opening {}", entry.pack), e)),
            };
            return pack::read_record(&file, entry.offset, entry.record_len)
                .and_then(|rec| decode(id, check, &rec))
                .map_err(corrupt);
        }
        Err(Error::NotFound(*id))
    }

    /// A chunk's stored blob (header and payload, compressed as stored),
    /// its record's CRC checked: what the mirror seals and ships, without
    /// decompressing it. Read through the page cache.
    pub fn read_blob(&self, id: &ChunkId) -> Result<Vec<u8>> {
        for attempt in 0..2 {
            let entry = self.lookup(id)?.ok_or(Error::NotFound(*id))?;
            let file = match self.pack_file(entry.pack) {
                Ok(f) => f,
                // gc moved it between the lookup and the open: look again.
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempt == 0 => continue,
                Err(e) => return Err(Error::io(format!("opening {}", entry.pack), e)),
            };
            return pack::read_record(&file, entry.offset, entry.record_len)
                .and_then(|rec| pack::check_record_as(&rec, id, true).map(<[u8]>::to_vec))
                .map_err(|why| self.corrupt(id, &entry, why));
        }
        Err(Error::NotFound(*id))
    }

    /// Logs a chunk that failed its check (or could not be read) and makes
    /// the error that names it.
    fn corrupt(&self, id: &ChunkId, entry: &ChunkEntry, why: String) -> Error {
        log::error!(
            "chunk {id} in {} at offset {} is corrupt: {why}",
            entry.pack,
            entry.offset
        );
        Error::Corrupt {
            chunk: *id,
            pack: entry.pack,
            offset: entry.offset,
            why,
        }
    }

    /// Starts a batch: the unit of group commit.
    pub fn batch(&self) -> Result<Batch<'_>> {
        let start_seq = self.commit_seq()?;
        let id = self.next_batch.fetch_add(1, Ordering::SeqCst);
        self.batches.lock().insert(id, start_seq);
        Ok(Batch {
            store: self,
            id,
            start_seq,
            writer: None,
            full: Vec::new(),
            new: HashMap::new(),
            deltas: Vec::new(),
            encoder: pack::BlobEncoder::new(self.config.compression, self.config.zstd_level),
            read: None,
            read_epoch: 0,
            lookups: 0,
            lender: Arc::new(Lender {
                commits: AtomicU64::new(0),
                wanted: AtomicBool::new(false),
                abandoned: AtomicBool::new(false),
                lent: AtomicBool::new(false),
                thread: std::thread::current().id(),
            }),
            borrowed: Vec::new(),
            may_wait: true,
        })
    }

    /// Keeps gc from dropping any chunk that dies from now on, as a
    /// running batch does, until the pin is dropped. Whoever holds chunks
    /// it has not yet taken references to (a copy sharing another file's
    /// list until it commits) holds one.
    pub fn pin(&self) -> Result<Pin> {
        let start_seq = self.commit_seq()?;
        let id = self.next_batch.fetch_add(1, Ordering::SeqCst);
        self.batches.lock().insert(id, start_seq);
        Ok(Pin {
            batches: self.batches.clone(),
            id,
        })
    }

    pub fn commit_seq(&self) -> Result<u64> {
        let rt = self.db.begin_read()?;
        let st = rt.open_table(STATE)?;
        Ok(st.get("commit_seq")?.map(|v| v.value()).unwrap_or(0))
    }

    pub fn ref_seq(&self) -> Result<u64> {
        let rt = self.db.begin_read()?;
        let st = rt.open_table(STATE)?;
        Ok(st.get("ref_seq")?.map(|v| v.value()).unwrap_or(0))
    }

    /// Commit sequence of the oldest running batch: dead chunks that died at
    /// or after it may still be referenced by that batch.
    fn oldest_batch_seq(&self) -> u64 {
        self.batches
            .lock()
            .values()
            .copied()
            .min()
            .unwrap_or(u64::MAX)
    }

    pub fn lock_commits(&self) -> MutexGuard<'_, ()> {
        self.commit_lock.lock()
    }

    /// A writer with room: an idle one, or a new pack written through
    /// `lane` (the lane of the caller's previous, now full, pack).
    fn take_writer(&self, lane: Option<Arc<pack::IoLane>>) -> Result<PackWriter> {
        if let Some(w) = self.writers.lock().pop() {
            return Ok(w);
        }
        let id = PackId(self.next_pack.fetch_add(1, Ordering::SeqCst));
        let w = PackWriter::create(&self.dir, id, lane)
            .map_err(|e| Error::io(format!("creating {id}"), e))?;
        self.active_packs.lock().insert(id);
        Ok(w)
    }

    /// Gives a writer back after a batch: to the pool if it has room and no
    /// uncommitted bytes, otherwise it is retired.
    fn return_writer(&self, mut w: PackWriter, keep: bool) {
        if w.has_uncommitted()
            && let Err(e) = w.rollback()
        {
            log::error!("{}: cannot cut uncommitted tail: {e}", w.id);
        }
        if w.committed_len == 0 {
            // Never named by a commit: nothing can refer to it.
            let _ = fs::remove_file(pack::pack_path(&self.dir, w.id));
        }
        if keep && !w.is_failed() && w.committed_len != 0 && w.len < self.config.pack_target_bytes {
            w.free_buffers();
            self.writers.lock().push(w);
        } else {
            self.active_packs.lock().remove(&w.id);
        }
    }

    /// Undoes ref deltas whose meta commit failed (the index went first).
    pub fn undo_ref_deltas(&self, deltas: &[(ChunkId, OwnerId, i64)]) -> Result<()> {
        let reversed: Vec<_> = deltas.iter().map(|(c, o, d)| (*c, *o, -*d)).collect();
        let tx = self.db.begin_write()?;
        {
            let mut st = tx.open_table(STATE)?;
            let seq = st.get("commit_seq")?.map(|v| v.value()).unwrap_or(0) + 1;
            let ref_seq = st.get("ref_seq")?.map(|v| v.value()).unwrap_or(0);
            let mut counters = Counters::load(&st)?;
            let mut chunks = tx.open_table(CHUNKS)?;
            let mut packs = tx.open_table(PACKS)?;
            apply_deltas(&mut chunks, &mut packs, &mut counters, &reversed, seq)?;
            counters.save(&mut st)?;
            st.insert("commit_seq", seq)?;
            st.insert("ref_seq", ref_seq.saturating_sub(1))?;
            let mut undo = tx.open_table(UNDO)?;
            undo.retain(|_, _| false)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The ref deltas of the newest ref-carrying commit, if still recorded.
    pub fn last_ref_deltas(&self) -> Result<Option<Vec<(ChunkId, OwnerId, i64)>>> {
        let rt = self.db.begin_read()?;
        let undo = rt.open_table(UNDO)?;
        let mut out: Option<Vec<_>> = None;
        // "last" (one value, as written before undo records were split) or
        // "last/NNNNNNNN" segments; a table holds one or the other.
        for row in undo.iter()? {
            let (_, v) = row?;
            let seg = format::decode_ref_deltas(v.value()).map_err(|e| Error::IndexDamaged {
                path: self.dir.join(INDEX_FILE),
                why: e.to_string(),
            })?;
            out.get_or_insert_with(Vec::new).extend(seg);
        }
        Ok(out)
    }

    /// Counters, pack totals, and the negative cache size.
    pub fn stats(&self) -> Result<StoreStats> {
        let rt = self.db.begin_read()?;
        let st = rt.open_table(STATE)?;
        let counters = Counters::load(&st)?;
        let packs = rt.open_table(PACKS)?;
        let mut pack_count = 0;
        let mut pack_bytes = 0;
        let mut dead_bytes = 0;
        for row in packs.iter()? {
            let (_, v) = row?;
            let e = PackEntry::decode(v.value()).map_err(|e| Error::Db(e.to_string()))?;
            pack_count += 1;
            pack_bytes += e.committed_len;
            dead_bytes += e.dead_bytes;
        }
        Ok(StoreStats {
            counters,
            pack_count,
            pack_bytes,
            dead_bytes,
        })
    }
}

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct StoreStats {
    pub counters: Counters,
    pub pack_count: u64,
    pub pack_bytes: u64,
    pub dead_bytes: u64,
}

pub fn lookup_in(rt: &ReadTransaction, id: &ChunkId) -> Result<Option<ChunkEntry>> {
    let t = rt.open_table(CHUNKS)?;
    match t.get(&id.0)? {
        None => Ok(None),
        Some(v) => ChunkEntry::decode(v.value())
            .map(Some)
            .map_err(|e| Error::Db(format!("entry of chunk {id}: {e}"))),
    }
}

/// Applies reference deltas inside a write transaction, keeping pack dead
/// bytes and counters in step with each chunk's live/dead transitions.
pub fn apply_deltas(
    chunks: &mut redb::Table<&'static [u8; 20], &'static [u8]>,
    packs: &mut redb::Table<u64, &'static [u8]>,
    counters: &mut Counters,
    deltas: &[(ChunkId, OwnerId, i64)],
    seq: u64,
) -> Result<()> {
    let mut dead_change: HashMap<PackId, i64> = HashMap::new();
    for (id, owner, delta) in deltas {
        if *delta == 0 {
            continue;
        }
        let mut e = match chunks.get(&id.0)? {
            Some(v) => ChunkEntry::decode(v.value()).map_err(|e| Error::Db(e.to_string()))?,
            None => return Err(Error::NotFound(*id)),
        };
        let was_live = e.is_live();
        let slot = e.owners.iter().position(|(o, _)| o == owner);
        let old = slot.map(|i| e.owners[i].1).unwrap_or(0) as i64;
        let new = old + delta;
        if new < 0 {
            return Err(Error::RefUnderflow {
                chunk: *id,
                owner: *owner,
            });
        }
        match (slot, new) {
            (Some(i), 0) => {
                e.owners.remove(i);
            }
            (Some(i), n) => e.owners[i].1 = n as u64,
            (None, n) => e.owners.push((*owner, n as u64)),
        }
        e.owners.sort();
        let raw = e.raw_len as u64;
        if *delta > 0 {
            counters.logical_bytes += raw * (*delta as u64);
        } else {
            counters.logical_bytes = counters
                .logical_bytes
                .saturating_sub(raw * (-*delta) as u64);
        }
        match (was_live, e.is_live()) {
            (true, false) => {
                e.dead_since = seq;
                *dead_change.entry(e.pack).or_default() += e.record_len as i64;
                counters.live_chunks -= 1;
                counters.live_raw_bytes -= raw;
                counters.live_stored_bytes -= e.record_len as u64;
            }
            (false, true) => {
                e.dead_since = 0;
                *dead_change.entry(e.pack).or_default() -= e.record_len as i64;
                counters.live_chunks += 1;
                counters.live_raw_bytes += raw;
                counters.live_stored_bytes += e.record_len as u64;
            }
            _ => {}
        }
        chunks.insert(&id.0, e.encode().as_slice())?;
    }
    for (pack, change) in dead_change {
        adjust_pack(packs, pack, |p| {
            p.dead_bytes = (p.dead_bytes as i64 + change).max(0) as u64;
        })?;
    }
    Ok(())
}

pub fn adjust_pack(
    packs: &mut redb::Table<u64, &'static [u8]>,
    pack: PackId,
    f: impl FnOnce(&mut PackEntry),
) -> Result<()> {
    let mut e = match packs.get(pack.0)? {
        Some(v) => PackEntry::decode(v.value()).map_err(|e| Error::Db(e.to_string()))?,
        None => PackEntry {
            committed_len: PACK_HEADER_LEN as u64,
            ..Default::default()
        },
    };
    f(&mut e);
    packs.insert(pack.0, e.encode().as_slice())?;
    Ok(())
}

/// Replaces the undo record with `deltas`, split into segments.
fn write_undo(
    undo: &mut redb::Table<&'static str, &'static [u8]>,
    deltas: &[(ChunkId, OwnerId, i64)],
) -> Result<()> {
    undo.retain(|_, _| false)?;
    for (n, seg) in deltas.chunks(UNDO_SEGMENT_DELTAS).enumerate() {
        let key = format!("last/{n:08}");
        undo.insert(key.as_str(), format::encode_ref_deltas(seg).as_slice())?;
    }
    Ok(())
}

/// Syncs `packs/` and its fan-out directories, so that new pack files are
/// durable before a commit names them.
fn sync_pack_dirs(dir: &Path) -> Result<()> {
    let packs = dir.join("packs");
    let sync = |p: &Path| File::open(p).and_then(|d| d.sync_all());
    for e in fs::read_dir(&packs).map_err(|e| Error::io("listing packs", e))? {
        let e = e.map_err(|e| Error::io("listing packs", e))?;
        sync(&e.path()).map_err(|e| Error::io("syncing a pack directory", e))?;
    }
    sync(&packs).map_err(|e| Error::io("syncing packs/", e))
}

/// A chunk written by a batch and not yet committed.
#[derive(Clone, Copy)]
struct NewChunk {
    pack: PackId,
    offset: u64,
    record_len: u32,
    raw_len: u32,
}

/// What a commit did.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommitInfo {
    /// The index's ref sequence after this commit, if it carried references.
    pub ref_seq: Option<u64>,
    pub new_chunks: usize,
}

/// A unit of ingest and reference changes that commits at once: all the
/// chunks it wrote are synced, then one index transaction names them and
/// applies its reference deltas. Dropping a batch without committing throws
/// its writes away.
pub struct Batch<'s> {
    store: &'s Store,
    id: u64,
    start_seq: u64,
    writer: Option<PackWriter>,
    /// Writers that filled up during this batch, committed with it.
    full: Vec<PackWriter>,
    new: HashMap<ChunkId, NewChunk>,
    /// Reference changes in the order given; summed per (chunk, owner) at
    /// commit. A list, not a map: it costs 32 bytes a reference.
    deltas: Vec<(ChunkId, OwnerId, i64)>,
    encoder: pack::BlobEncoder,
    read: Option<ReadTransaction>,
    /// `Store::index_epoch` when `read` began.
    read_epoch: u64,
    lookups: u32,
    lender: Arc<Lender>,
    /// Batches whose uncommitted chunks this one references, with the
    /// claim generation to wait past (one entry per lender and generation).
    borrowed: Vec<(Arc<Lender>, u64)>,
    /// Cleared for a batch used under locks another ingest may wait for:
    /// it stores its own copies rather than wait (see `never_wait`).
    may_wait: bool,
}

impl<'s> Batch<'s> {
    pub fn store(&self) -> &'s Store {
        self.store
    }

    /// Splits `reader` into chunks and stores each one the store lacks.
    pub fn ingest(&mut self, reader: impl Read) -> Result<Vec<ChunkRef>> {
        let mut out = Vec::new();
        let params = self.store.config.chunker;
        chunker::chunk_stream(params, reader, |data| -> Result<()> {
            out.push(self.put_chunk(data)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Looks `id` up in a snapshot of the index that holds every commit
    /// counted by `epoch`.
    fn lookup(&mut self, id: &ChunkId, epoch: u64) -> Result<Option<ChunkEntry>> {
        // A snapshot is refreshed only when a commit may have added chunks:
        // one that shows a chunk live is safe however old, since that chunk
        // can only die after this batch started, and gc keeps such chunks.
        if self.read.is_none() || self.lookups >= 4096 || self.read_epoch != epoch {
            self.read = Some(self.store.db.begin_read()?);
            self.read_epoch = epoch;
            self.lookups = 0;
        }
        self.lookups += 1;
        match &self.read {
            Some(rt) => lookup_in(rt, id),
            None => Ok(None),
        }
    }

    /// Stores one chunk unless the store already holds it in a form this
    /// batch can rely on. Returns its reference.
    pub fn put_chunk(&mut self, data: &[u8]) -> Result<ChunkRef> {
        let id = ChunkId::of(data);
        let r = ChunkRef {
            id,
            len: data.len() as u32,
        };
        if self.new.contains_key(&id) {
            return Ok(r);
        }
        if self.lender.wanted.swap(false, Ordering::SeqCst) && !self.new.is_empty() {
            // A batch that shares our chunks waits for them.
            self.commit_inner(false, |_| Ok(()))?;
        }
        if !self.claim(&id)? {
            return Ok(r);
        }
        self.store.negcache.read().insert(&id);
        let cfg = &self.store.config;
        let (bh, payload) = self.encoder.encode(data);
        if self.writer.is_none() {
            let lane = self.full.last().map(|w| w.lane());
            self.writer = Some(self.store.take_writer(lane)?);
        }
        let Some(w) = self.writer.as_mut() else {
            return Err(Error::Invalid("no pack writer".into()));
        };
        let (offset, record_len) = w
            .append(id, &bh, payload)
            .map_err(|e| Error::io(format!("appending to {}", w.id), e))?;
        self.new.insert(
            id,
            NewChunk {
                pack: w.id,
                offset,
                record_len,
                raw_len: r.len,
            },
        );
        if w.len >= cfg.pack_target_bytes
            && let Some(mut w) = self.writer.take()
        {
            // Start its sync now, while we go on chunking into the next one.
            let sealed = w.seal();
            let id = w.id;
            self.full.push(w);
            sealed.map_err(|e| Error::io(format!("sealing {id}"), e))?;
        }
        if self.new.len() >= FLUSH_EVERY_CHUNKS {
            self.commit_inner(false, |_| Ok(()))?;
        }
        Ok(r)
    }

    /// Decides whether this batch writes chunk `id`: false when the index
    /// holds a copy we may use, or another batch is writing one we borrow.
    /// True once this batch holds the claim (or, for a batch that may not
    /// wait, when it must write its own copy).
    fn claim(&mut self, id: &ChunkId) -> Result<bool> {
        let store = self.store;
        loop {
            let epoch = store.index_epoch.load(Ordering::SeqCst);
            let maybe = store.negcache.read().may_contain(id);
            if maybe && let Some(e) = self.lookup(id, epoch)? {
                // A dead chunk that died before we started may be collected
                // before we commit; store our own copy instead.
                if e.is_live() || e.dead_since >= self.start_seq {
                    return Ok(false);
                }
            }
            let mut claims = store.claims.lock();
            if let Some(c) = claims.get(id) {
                let own_thread = c.owner.thread == self.lender.thread;
                if !self.may_wait || own_thread {
                    // Leave the claim to its batch; our copy is written and
                    // whichever commits second finds it dead weight.
                    return Ok(true);
                }
                c.owner.lent.store(true, Ordering::SeqCst);
                let round = c.round;
                let owner = c.owner.clone();
                drop(claims);
                if !self
                    .borrowed
                    .iter()
                    .any(|(o, g)| Arc::ptr_eq(o, &owner) && *g == round)
                {
                    self.borrowed.push((owner, round));
                }
                return Ok(false);
            }
            if store.index_epoch.load(Ordering::SeqCst) != epoch {
                // A commit landed since we looked (perhaps of this very
                // chunk, its claim gone): look again.
                continue;
            }
            claims.insert(
                *id,
                Claim {
                    owner: self.lender.clone(),
                    round: self.lender.commits.load(Ordering::SeqCst),
                },
            );
            return Ok(true);
        }
    }

    /// Marks a batch used under a lock that other ingest may wait for (the
    /// filesystem's content lock): it never waits for another batch's
    /// chunks, storing its own copy instead, so it cannot deadlock with a
    /// batch that waits for the lock.
    pub fn never_wait(&mut self) {
        self.may_wait = false;
    }

    /// Waits until every chunk this batch borrowed from another running
    /// batch is committed, so that its references can be. First commits
    /// its own new chunks, so that no batch waits for one that waits.
    /// Call it before taking locks that other ingest may need; `commit`
    /// calls it too.
    pub fn settle(&mut self) -> Result<()> {
        let mut open = Vec::new();
        for (o, g) in self.borrowed.drain(..) {
            if !o.settled(g)? {
                open.push((o, g));
            }
        }
        if open.is_empty() {
            return Ok(());
        }
        if !self.new.is_empty() {
            self.commit_inner(false, |_| Ok(()))?;
        }
        for (o, _) in &open {
            o.wanted.store(true, Ordering::SeqCst);
        }
        let t0 = Instant::now();
        let deadline = t0 + SETTLE_TIMEOUT;
        let (m, cv) = &self.store.settled;
        let mut g = m.lock();
        loop {
            let mut all = true;
            for (o, round) in &open {
                all &= o.settled(*round)?;
            }
            if all {
                break;
            }
            if cv.wait_until(&mut g, deadline).timed_out() {
                return Err(Error::Contended(format!(
                    "chunks shared with another ingest were not committed within {}s",
                    SETTLE_TIMEOUT.as_secs()
                )));
            }
        }
        log::debug!(
            "waited {:?} for chunks shared with other batches",
            t0.elapsed()
        );
        Ok(())
    }

    /// Wakes batches waiting for ours after it committed or gave up.
    fn wake_borrowers(&self) {
        if self.lender.lent.load(Ordering::SeqCst) {
            let (m, cv) = &self.store.settled;
            drop(m.lock());
            cv.notify_all();
        }
    }

    /// Forgets the claims of this batch's uncommitted chunks.
    fn release_claims(&self) {
        if self.new.is_empty() {
            return;
        }
        let mut claims = self.store.claims.lock();
        for id in self.new.keys() {
            if claims
                .get(id)
                .is_some_and(|c| Arc::ptr_eq(&c.owner, &self.lender))
            {
                claims.remove(id);
            }
        }
    }

    pub fn add_refs(&mut self, owner: OwnerId, chunks: impl IntoIterator<Item = ChunkId>) {
        self.deltas
            .extend(chunks.into_iter().map(|c| (c, owner, 1)));
    }

    pub fn drop_refs(&mut self, owner: OwnerId, chunks: impl IntoIterator<Item = ChunkId>) {
        self.deltas
            .extend(chunks.into_iter().map(|c| (c, owner, -1)));
    }

    /// Sums the deltas per (chunk, owner) in place, dropping zeros. In
    /// place because a big object's deltas are the biggest thing a commit
    /// holds; sorted, so the index is updated leaf by leaf.
    fn merged_deltas(&mut self) -> Vec<(ChunkId, OwnerId, i64)> {
        let mut d = std::mem::take(&mut self.deltas);
        d.sort_unstable_by_key(|(c, o, _)| (*c, *o));
        d.dedup_by(|next, kept| {
            let same = next.0 == kept.0 && next.1 == kept.1;
            if same {
                kept.2 += next.2;
            }
            same
        });
        d.retain(|x| x.2 != 0);
        d
    }

    pub fn is_empty(&self) -> bool {
        self.new.is_empty()
            && self.deltas.is_empty()
            && self.full.is_empty()
            && !self.writer.as_ref().is_some_and(|w| w.has_uncommitted())
    }

    /// Commits the batch. `then` runs while the commit lock is still held,
    /// after the index commit, with the new ref sequence when references
    /// changed: the layer above commits the records that hold those
    /// references there. If `then` fails, the reference changes are undone.
    pub fn commit(mut self, then: impl FnOnce(Option<u64>) -> Result<()>) -> Result<CommitInfo> {
        let info = self.commit_inner(true, then)?;
        Ok(info)
    }

    /// Commits what the batch holds so far, as `commit` does, and keeps it
    /// open for more: a long ingest commits in parts, so that what it holds
    /// (chunk places and reference deltas here, the chunk list above us)
    /// stays bounded however long the stream. The batch keeps its start
    /// sequence, so gc stays as careful as for one long batch.
    pub fn commit_part(
        &mut self,
        then: impl FnOnce(Option<u64>) -> Result<()>,
    ) -> Result<CommitInfo> {
        self.commit_inner(true, then)
    }

    fn commit_inner(
        &mut self,
        final_commit: bool,
        then: impl FnOnce(Option<u64>) -> Result<()>,
    ) -> Result<CommitInfo> {
        if final_commit && self.is_empty() {
            then(None)?;
            return Ok(CommitInfo::default());
        }
        if final_commit {
            self.settle()?;
        }
        let t0 = std::time::Instant::now();
        // Blobs first: everything the index will name must be on disk,
        // including the directory entries of packs no commit named before.
        let mut new_pack = false;
        for w in self.full.iter_mut().chain(self.writer.as_mut()) {
            w.sync()
                .map_err(|e| Error::io(format!("syncing {}", w.id), e))?;
            new_pack |= w.is_new();
        }
        if new_pack {
            sync_pack_dirs(&self.store.dir)?;
        }
        let t_sync = t0.elapsed();
        let deltas = if final_commit {
            self.merged_deltas()
        } else {
            Vec::new()
        };
        let store = self.store;
        let _guard = store.commit_lock.lock();
        let tx = store.db.begin_write()?;
        let ref_seq;
        {
            let mut st = tx.open_table(STATE)?;
            let seq = st.get("commit_seq")?.map(|v| v.value()).unwrap_or(0) + 1;
            let mut counters = Counters::load(&st)?;
            let mut chunks = tx.open_table(CHUNKS)?;
            let mut packs = tx.open_table(PACKS)?;
            // Pack lengths first, so dead-byte adjustments find the entries.
            for w in self.full.iter().chain(self.writer.as_ref()) {
                let len = w.len;
                let sealed = len >= store.config.pack_target_bytes;
                adjust_pack(&mut packs, w.id, |p| {
                    p.committed_len = len;
                    p.sealed = sealed;
                })?;
            }
            let mut dead_change: HashMap<PackId, i64> = HashMap::new();
            // In key order: each leaf of the chunk table is dirtied once, and
            // redb's small page cache is not thrashed by random keys.
            let mut new: Vec<(&ChunkId, &NewChunk)> = self.new.iter().collect();
            new.sort_unstable_by_key(|(id, _)| **id);
            for (id, n) in new {
                let existing = match chunks.get(&id.0)? {
                    Some(v) => {
                        Some(ChunkEntry::decode(v.value()).map_err(|e| Error::Db(e.to_string()))?)
                    }
                    None => None,
                };
                match existing {
                    Some(e) if e.is_live() => {
                        // Another batch stored it first: our copy is dead weight.
                        *dead_change.entry(n.pack).or_default() += n.record_len as i64;
                        continue;
                    }
                    Some(_) => {
                        // Replacing a dead entry: its old record was already
                        // counted dead when it died.
                    }
                    None => counters.total_chunks += 1,
                }
                // Born unreferenced; the deltas below bring it to life.
                *dead_change.entry(n.pack).or_default() += n.record_len as i64;
                let e = ChunkEntry {
                    pack: n.pack,
                    offset: n.offset,
                    record_len: n.record_len,
                    raw_len: n.raw_len,
                    dead_since: seq,
                    owners: Vec::new(),
                };
                chunks.insert(&id.0, e.encode().as_slice())?;
            }
            for (pack, change) in dead_change {
                adjust_pack(&mut packs, pack, |p| {
                    p.dead_bytes = (p.dead_bytes as i64 + change).max(0) as u64;
                })?;
            }
            apply_deltas(&mut chunks, &mut packs, &mut counters, &deltas, seq)?;
            let mut undo = tx.open_table(UNDO)?;
            if deltas.is_empty() {
                ref_seq = None;
            } else {
                let r = st.get("ref_seq")?.map(|v| v.value()).unwrap_or(0) + 1;
                st.insert("ref_seq", r)?;
                write_undo(&mut undo, &deltas)?;
                ref_seq = Some(r);
            }
            counters.commits += 1;
            counters.save(&mut st)?;
            st.insert("commit_seq", seq)?;
        }
        let t_tx = t0.elapsed();
        tx.commit()?;
        if !self.new.is_empty() {
            // In this order: a batch that finds the claim gone sees the
            // epoch moved and looks in the index again.
            store.index_epoch.fetch_add(1, Ordering::SeqCst);
            self.release_claims();
            self.lender.commits.fetch_add(1, Ordering::SeqCst);
            self.wake_borrowers();
        }
        let n_deltas = deltas.len();
        // The meta commit below holds the chunk lists it writes and their
        // encoding; the deltas need not be held with them (the undo record
        // has them).
        drop(deltas);
        log::debug!(
            "commit: {} new chunks, {} ref deltas: sync {t_sync:?}, index writes {:?}, index commit {:?}",
            self.new.len(),
            n_deltas,
            t_tx - t_sync,
            t0.elapsed() - t_tx
        );
        let new_chunks = self.new.len();
        self.new.clear();
        self.read = None;
        for w in self.full.iter_mut().chain(self.writer.as_mut()) {
            w.committed_len = w.len;
        }
        for w in self.full.drain(..) {
            store.return_writer(w, false);
        }
        if store.negcache.read().wants_growth() {
            store.rebuild_negcache()?;
        }
        if final_commit && let Err(e) = then(ref_seq) {
            if ref_seq.is_some()
                && let Err(undo_err) = store
                    .last_ref_deltas()
                    .and_then(|d| store.undo_ref_deltas(&d.unwrap_or_default()))
            {
                // The index now counts references nobody holds; the next
                // open sees ref_seq ahead of meta and undoes them.
                log::error!("cannot undo reference changes after a failed commit: {undo_err}");
            }
            return Err(e);
        }
        Ok(CommitInfo {
            ref_seq,
            new_chunks,
        })
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.store.batches.lock().remove(&self.id);
        let clean = self.new.is_empty();
        if !clean {
            self.release_claims();
            self.lender.abandoned.store(true, Ordering::SeqCst);
            self.wake_borrowers();
        }
        for w in self.full.drain(..) {
            self.store.return_writer(w, false);
        }
        if let Some(w) = self.writer.take() {
            self.store.return_writer(w, clean);
        }
    }
}

/// See [`Store::pin`].
pub struct Pin {
    batches: Arc<Mutex<BTreeMap<u64, u64>>>,
    id: u64,
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.batches.lock().remove(&self.id);
    }
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pin({})", self.id)
    }
}

/// Reads every row of `def` (keys and values), returning how many; a
/// damaged page fails here (or panics inside redb, for callers to catch).
pub fn walk_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    rt: &redb::ReadTransaction,
    def: TableDefinition<K, V>,
) -> std::result::Result<u64, redb::Error> {
    let t = match rt.open_table(def) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut n = 0;
    for row in t.iter()? {
        let (k, v) = row?;
        std::hint::black_box((k.value(), v.value()));
        n += 1;
    }
    Ok(n)
}

/// Where a redb file's bytes go: what `dedupfs stats` reports for
/// `index.redb` and `meta.redb`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DbSpace {
    /// The file's length.
    pub file_bytes: u64,
    /// Pages in use (by tables, redb's own tables and pending frees).
    pub allocated_bytes: u64,
    /// Bytes of the file no page uses: what a compaction gives back.
    pub free_bytes: u64,
    /// Key and value bytes stored, all tables together.
    pub stored_bytes: u64,
    /// Per table: its pages and what they hold.
    pub tables: BTreeMap<String, TableSpace>,
}

/// One table's pages: `page_bytes` allocated, `stored_bytes` of keys and
/// values in them; the rest is redb's per-entry bookkeeping and slack.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TableSpace {
    pub page_bytes: u64,
    pub stored_bytes: u64,
    pub entries: u64,
}

/// Measures `db`, kept in `path`. Takes a write transaction for a moment
/// (redb reports allocated pages only there) and aborts it.
pub fn db_space(db: &Database, path: &Path) -> Result<DbSpace> {
    let file_bytes = fs::metadata(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        .len();
    let tx = db.begin_write()?;
    let st = tx.stats()?;
    let page = st.page_size() as u64;
    let allocated_bytes = st.allocated_pages() * page;
    tx.abort()?;
    let rt = db.begin_read()?;
    let mut tables = BTreeMap::new();
    let mut stored_bytes = 0;
    for h in rt.list_tables()? {
        let name = redb::TableHandle::name(&h).to_string();
        let t = rt.open_untyped_table(h)?;
        let s = t.stats()?;
        stored_bytes += s.stored_bytes();
        tables.insert(
            name,
            TableSpace {
                page_bytes: (s.leaf_pages() + s.branch_pages()) * page,
                stored_bytes: s.stored_bytes(),
                entries: t.len()?,
            },
        );
    }
    Ok(DbSpace {
        file_bytes,
        allocated_bytes,
        free_bytes: file_bytes.saturating_sub(allocated_bytes),
        stored_bytes,
        tables,
    })
}

/// A rewrite runs when it would give back at least this fraction of the
/// file, and at least `COMPACT_MIN_FREE` bytes.
pub const COMPACT_MIN_FRACTION: f64 = 0.2;
pub const COMPACT_MIN_FREE: u64 = 1 << 20;

/// What a freshly written copy of a database would take: its keys and
/// values, redb's per-entry offsets, pages packed about 93% full.
fn rewritten_estimate(space: &DbSpace) -> u64 {
    let entries: u64 = space.tables.values().map(|t| t.entries).sum();
    ((space.stored_bytes + 8 * entries) as f64 / 0.93) as u64 + (64 << 10)
}

fn pays(space: &DbSpace, estimate: u64) -> bool {
    let saving = space.file_bytes.saturating_sub(estimate);
    saving >= COMPACT_MIN_FREE && saving as f64 >= COMPACT_MIN_FRACTION * space.file_bytes as f64
}

/// Whether [`rewrite_db`] would rewrite `db` now (it checks again itself):
/// a cheap look before taking the database to oneself.
pub fn rewrite_pays(db: &Database, path: &Path) -> Result<bool> {
    let space = db_space(db, path)?;
    Ok(pays(&space, rewritten_estimate(&space)))
}

/// Copies whole tables from a read snapshot into a new database, noting
/// each one, so that [`rewrite_db`] can refuse a copy that left one out.
pub struct TableCopier<'a> {
    rt: &'a ReadTransaction,
    wt: &'a redb::WriteTransaction,
    copied: std::collections::BTreeSet<String>,
}

impl TableCopier<'_> {
    /// Copies `def` in key order through a cursor's insert run, which packs
    /// leaves full (ordinary inserts split a full leaf in half, so a table
    /// filled in key order settles near half full). A table the source
    /// lacks is left out of the copy too.
    pub fn copy<K: redb::Key + 'static, V: redb::Value + 'static>(
        &mut self,
        def: TableDefinition<K, V>,
    ) -> Result<()> {
        let name = redb::TableHandle::name(&def).to_string();
        let src = match self.rt.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut dst = self.wt.open_table(def)?;
        let mut cur = dst.lower_bound_mut(std::ops::Bound::<K::SelfType<'_>>::Unbounded)?;
        for row in src.iter()? {
            let (k, v) = row?;
            cur.insert_before(k.value(), v.value())
                .map_err(|e| Error::Db(format!("copying table {name}: {e}")))?;
        }
        self.copied.insert(name);
        Ok(())
    }
}

/// Free space a compaction leaves on the disk beyond its copy.
pub const COMPACT_SPARE_BYTES: u64 = 64 << 20;

/// Writes a compacted copy of `db` at `tmp` (see [`rewrite_db`]): every
/// table through `copy_all`, one commit, then the copy's own free pages
/// moved out.
fn write_copy(
    db: &Database,
    tmp: &Path,
    cache_bytes: usize,
    copy_all: impl FnOnce(&mut TableCopier) -> Result<()>,
) -> Result<Database> {
    let mut new = Database::builder()
        .set_cache_size(cache_bytes)
        .create(tmp)?;
    {
        let rt = db.begin_read()?;
        let wt = new.begin_write()?;
        let mut copier = TableCopier {
            rt: &rt,
            wt: &wt,
            copied: Default::default(),
        };
        copy_all(&mut copier)?;
        let mut missed: Vec<String> = rt
            .list_tables()?
            .map(|h| redb::TableHandle::name(&h).to_string())
            .filter(|n| !copier.copied.contains(n))
            .collect();
        missed.extend(
            rt.list_multimap_tables()?
                .map(|h| redb::MultimapTableHandle::name(&h).to_string()),
        );
        if !missed.is_empty() {
            return Err(Error::Db(format!(
                "not compacting: tables {missed:?} have no copier"
            )));
        }
        wt.commit()?;
    }
    // The copy's own transaction left pages free (buffers of the insert
    // runs); on a fresh file nothing is in the way of moving them.
    while new
        .compact()
        .map_err(|e| Error::Db(format!("compacting {}: {e}", tmp.display())))?
    {}
    Ok(new)
}

/// Gives a database's space back by writing a fresh copy of it and
/// renaming the copy over the file, when that pays (see
/// [`COMPACT_MIN_FRACTION`]). `Database::compact` alone is not enough:
/// it only moves pages, stops at the first page it cannot move lower, and
/// never refills the half-empty leaves that key-order inserts leave (on a
/// real tree: inode table 54% full, a fifth of the file free after it ran).
///
/// `copy_all` copies every table through the [`TableCopier`]; a table the
/// file holds that it did not copy aborts the rewrite with the old file
/// untouched. Needs the database to itself (`&mut`, no transaction open).
/// Crash-safe: the copy is committed (fsynced) under another name before
/// the rename, and a leftover copy is removed by the next rewrite. Returns
/// the file's length before and after, or None when it did not pay.
pub fn rewrite_db(
    db: &mut Database,
    path: &Path,
    cache_bytes: usize,
    copy_all: impl FnOnce(&mut TableCopier) -> Result<()>,
) -> Result<Option<(u64, u64)>> {
    let tmp = path.with_extension("redb.rewrite");
    match fs::remove_file(&tmp) {
        Ok(()) => log::info!(
            "removed {}, left by an interrupted compaction",
            tmp.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("removing {}", tmp.display()), e)),
    }
    let space = db_space(db, path)?;
    let estimate = rewritten_estimate(&space);
    if !pays(&space, estimate) {
        return Ok(None);
    }
    // The copy needs room for what the database holds; on a nearly full
    // disk it waits for a better time rather than take the last of it.
    if let Some(dir) = path.parent()
        && maint::free_bytes(dir)? < estimate + COMPACT_SPARE_BYTES
    {
        log::info!(
            "not compacting {}: the copy needs about {estimate} bytes and the disk is nearly full",
            path.display()
        );
        return Ok(None);
    }
    let t0 = Instant::now();
    // A damaged page can make redb panic mid-copy: that is an error of
    // this compaction (the database stays as it was), not of the mount.
    let copied = crate::guard::catch(|| write_copy(db, &tmp, cache_bytes, copy_all))
        .unwrap_or_else(|p| Err(Error::Db(format!("copying {}: {}", path.display(), p.0))));
    let new = match copied {
        Ok(new) => new,
        Err(e) => {
            // A half-written copy only takes space (ENOSPC is the likely
            // cause): remove it now, not at the next compaction.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    fs::rename(&tmp, path).map_err(|e| Error::io(format!("renaming {}", tmp.display()), e))?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))?;
    }
    drop(std::mem::replace(db, new));
    let after = fs::metadata(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        .len();
    log::info!(
        "compacted {}: {} -> {} bytes in {:?}",
        path.display(),
        space.file_bytes,
        after,
        t0.elapsed()
    );
    Ok(Some((space.file_bytes, after)))
}
