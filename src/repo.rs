//! A repo is a store plus the metadata that holds references into it. It
//! orders every commit the same way (blobs, then the index with its reference
//! changes, then the meta records that hold those references) and undoes,
//! at open, an index commit whose meta commit never landed.
//!
//! Calls `store`, `meta`, `chunker`, `format`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::Progress;
use crate::chunker;
use crate::format::{self, ChunkId, ChunkRef, ObjectId, OwnerId};
use crate::meta;
use crate::store::maint::{self, GcReport, RebuildReport, RefMap, VerifyReport};
use crate::store::{Batch, Error, InitOptions, Result, Store, StoreStats};

mod metadb;
pub use metadb::{Held, MetaDb, MetaRef};

pub struct Repo {
    // Dropped in this order: meta.redb is closed before the store gives up
    // its lock, so whoever takes the lock next can open it.
    meta: MetaDb,
    store: Store,
    /// meta.redb's page cache, kept for a compaction's fresh copy.
    meta_cache: usize,
    /// The next object id to hand out. Each meta commit records its
    /// high-water mark, so ids stay unique across opens.
    next_object: AtomicU64,
}

/// Copies every table of meta.redb for a compaction.
fn copy_meta(c: &mut crate::store::TableCopier) -> Result<()> {
    c.copy(meta::STATE)?;
    c.copy(meta::OBJECTS)?;
    c.copy(meta::OBJECT_SEGMENTS)?;
    c.copy(meta::PENDING_OBJECTS)?;
    c.copy(meta::INODES)?;
    c.copy(meta::DIRENTS)?;
    c.copy(meta::XATTRS)?;
    c.copy(meta::CONTENTS)?;
    c.copy(meta::ORPHANS)?;
    c.copy(meta::CHANGES)?;
    c.copy(meta::SNAPS)?;
    c.copy(meta::SETTINGS)
}

/// Group-commit limits for many small objects: whichever comes first.
const GROUP_COMMIT_BYTES: u64 = 64 << 20;
const GROUP_COMMIT_OBJECTS: usize = 4096;
/// An ingest commits once it holds this many chunk references, in the middle
/// of an object if need be, and a release drops about this many per commit.
/// Each costs about 56 bytes until its commit (24 in the chunk list, 32 in
/// the reference deltas), so this bounds what an ingest holds at about 1 MB
/// whatever the object's size (256 MiB of input at the default average chunk
/// size); committing that often costs nothing measurable.
const COMMIT_EVERY_CHUNKS: usize = 16384;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ObjectInfo {
    pub name: String,
    pub size: u64,
    pub chunks: usize,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// The apparent size of what the store holds live: the regular files
    /// of the live tree (each inode once, holes and inline files included)
    /// plus the named objects.
    pub logical_bytes: u64,
    /// The bytes the chunk references hold, each reference counted: a
    /// chunk held by two inodes, or by a snapshot's old version, twice;
    /// inline files not at all.
    #[serde(default)]
    pub referenced_bytes: u64,
    #[serde(default)]
    pub files: u64,
    pub unique_bytes: u64,
    pub stored_bytes: u64,
    pub pack_bytes: u64,
    pub chunks: u64,
    pub live_chunks: u64,
    pub dedup_ratio: f64,
    pub compression_ratio: f64,
    pub pack_count: u64,
    pub dead_fraction: f64,
    /// Pack bytes no chunk uses: what gc (run by the daemon in the
    /// background, or `dedupfs gc`) gives back.
    #[serde(default)]
    pub dead_bytes: u64,
    pub commits: u64,
    pub objects: u64,
    /// The chunk index's file: what it holds and what is free.
    #[serde(default)]
    pub index: crate::store::DbSpace,
    /// The metadata database's file (inodes, names, chunk lists, objects).
    #[serde(default)]
    pub meta: crate::store::DbSpace,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct FsckReport {
    #[serde(flatten)]
    pub store: VerifyReport,
    pub objects_checked: u64,
    /// Objects that refer to a chunk the store lacks or cannot read.
    pub damaged_objects: Vec<String>,
    /// Staged writes a crash left that a mount could not replay as
    /// recorded (filled in by the CLI from `fs::staging::check_layouts`).
    #[serde(default)]
    pub staging: Vec<String>,
    pub clean: bool,
}

impl Repo {
    pub fn init(dir: &Path, opts: &InitOptions) -> Result<()> {
        Store::init(dir, opts)?;
        meta::create(dir)?;
        Ok(())
    }

    /// Opens the store for a command: meta.redb gets the small page cache.
    pub fn open(dir: &Path) -> Result<Repo> {
        Self::open_with_meta_cache(dir, meta::CACHE_BYTES)
    }

    /// Opens the store with `meta_cache_bytes` of page cache for meta.redb
    /// (the filesystem daemon wants more than a one-shot command), recovers
    /// from a crash, and releases the objects it left pending.
    pub fn open_with_meta_cache(dir: &Path, meta_cache_bytes: usize) -> Result<Repo> {
        let store = Store::open(dir)?;
        let meta = meta::open(dir, meta_cache_bytes)?;
        let next_object = AtomicU64::new(meta::next_object_id(&meta)?);
        let repo = Repo {
            store,
            meta: MetaDb::new(meta),
            meta_cache: meta_cache_bytes,
            next_object,
        };
        repo.reconcile()?;
        repo.release_pending()?;
        Ok(repo)
    }

    /// Opens the store, creating it with default settings if `dir` is
    /// missing or empty.
    pub fn open_or_init(dir: &Path, meta_cache_bytes: usize) -> Result<Repo> {
        let empty = !dir.exists()
            || std::fs::read_dir(dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
        if empty {
            Self::init(dir, &InitOptions::default())?;
        }
        Self::open_with_meta_cache(dir, meta_cache_bytes)
    }

    /// Index and meta must agree on the last reference-carrying commit; an
    /// index one step ahead lost its meta commit to a crash and is undone.
    fn reconcile(&self) -> Result<()> {
        let idx = self.store.ref_seq()?;
        let m = meta::ref_seq(&self.meta())?;
        if idx == m {
            return Ok(());
        }
        if idx == m + 1
            && let Some(deltas) = self.store.last_ref_deltas()?
        {
            log::warn!(
                "undoing {} reference changes whose metadata never committed",
                deltas.len()
            );
            return self.store.undo_ref_deltas(&deltas);
        }
        Err(Error::IndexDamaged {
            path: self.store.dir().join(crate::store::INDEX_FILE),
            why: format!("it is out of step with meta.redb (ref_seq {idx} vs {m})"),
        })
    }

    /// Releases what a crash left pending: the committed parts of objects
    /// whose ingest never finished, and removed or replaced objects whose
    /// references were not all dropped yet. Nobody else can be using them:
    /// the store is locked to this process and it has only just opened.
    fn release_pending(&self) -> Result<()> {
        for (id, p) in meta::pending_objects(&self.meta())? {
            log::warn!(
                "releasing {id} ('{}', {}): an unfinished write or removal",
                p.name,
                p.owner
            );
            self.release_object(id)?;
        }
        Ok(())
    }

    /// Drops the references of pending object `id` and deletes its segments,
    /// a bounded number per commit, then its pending record.
    fn release_object(&self, id: ObjectId) -> Result<()> {
        while let Some(r) = meta::next_release(&self.meta(), id, COMMIT_EVERY_CHUNKS)? {
            let mut batch = self.store.batch()?;
            batch.drop_refs(r.owner, r.chunks);
            let done = !r.more;
            batch.commit(|ref_seq| {
                meta::release_segments(&self.meta(), id, r.last_segment, done, ref_seq)
            })?;
            if done {
                break;
            }
        }
        Ok(())
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn dir(&self) -> &Path {
        self.store.dir()
    }

    /// meta.redb, held so that a compaction waits for what is begun with
    /// it (see [`MetaDb`]).
    pub fn meta(&self) -> MetaRef<'_> {
        self.meta.hold()
    }

    /// Ingests one stream as object `name` and commits it.
    pub fn put_object(&self, owner: OwnerId, name: &str, reader: impl Read) -> Result<ObjectInfo> {
        let mut ingest = Ingest::new(self, owner)?;
        let res = ingest.put(name.to_string(), reader).and_then(|info| {
            ingest.commit()?;
            Ok(info)
        });
        if res.is_err() {
            ingest.abort();
        }
        res
    }

    /// Ingests many files as objects (named by `name_of`), `threads` at a
    /// time, committing in groups so many small files share one sync.
    pub fn put_files(
        &self,
        owner: OwnerId,
        files: Vec<(String, PathBuf)>,
        threads: usize,
        progress: &dyn Progress,
    ) -> Result<Vec<ObjectInfo>> {
        progress.set_len(
            files
                .iter()
                .filter_map(|(_, p)| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum(),
        );
        let queue = Mutex::new(files.into_iter());
        let results = Mutex::new(Vec::new());
        let first_err: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| {
                    if let Err(e) = self.put_worker(owner, &queue, &results, progress) {
                        first_err.lock().get_or_insert(e);
                    }
                });
            }
        });
        if let Some(e) = first_err.into_inner() {
            return Err(e);
        }
        Ok(results.into_inner())
    }

    fn put_worker(
        &self,
        owner: OwnerId,
        queue: &Mutex<std::vec::IntoIter<(String, PathBuf)>>,
        results: &Mutex<Vec<ObjectInfo>>,
        progress: &dyn Progress,
    ) -> Result<()> {
        let mut ingest = Ingest::new(self, owner)?;
        let res = (|| {
            loop {
                let Some((name, path)) = queue.lock().next() else {
                    break;
                };
                let f = File::open(&path)
                    .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
                let info = ingest.put(name, f)?;
                progress.inc(info.size);
                results.lock().push(info);
                if ingest.group_due() {
                    ingest.commit()?;
                }
            }
            ingest.commit()
        })();
        if res.is_err() {
            ingest.abort();
        }
        res
    }

    /// Writes object `name` to `out`, verifying every chunk.
    pub fn get_object(&self, owner: OwnerId, name: &str, out: &mut dyn Write) -> Result<u64> {
        let mut n = 0u64;
        let found = meta::read_object(&self.meta(), owner, name, |list| {
            for c in list {
                let data = self.store.read_chunk(&c.id)?;
                out.write_all(&data)
                    .map_err(|e| Error::io("writing output", e))?;
                n += data.len() as u64;
            }
            Ok(())
        })?;
        if found.is_none() {
            return Err(Error::Invalid(format!("no object named '{name}'")));
        }
        Ok(n)
    }

    /// Removes objects; their chunks lose these references. Removes none if
    /// any name is missing.
    pub fn remove_objects(&self, owner: OwnerId, names: &[String]) -> Result<usize> {
        let mut seen = HashSet::new();
        let distinct: Vec<String> = names
            .iter()
            .filter(|n| seen.insert(n.as_str()))
            .cloned()
            .collect();
        // The names go first, in one commit; then each object's references
        // are released in bounded commits under its pending record.
        let ids = meta::unname_objects(&self.meta(), owner, &distinct)?;
        for id in &ids {
            self.release_object(*id)?;
        }
        Ok(ids.len())
    }

    pub fn list_objects(&self) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        meta::for_each_object(&self.meta(), |_, name, rec| {
            out.push(ObjectInfo {
                name: name.to_string(),
                size: rec.size,
                chunks: rec.chunks as usize,
            });
            Ok(())
        })?;
        Ok(out)
    }

    /// Gives the free pages of index.redb and meta.redb back to the disk
    /// where that pays (`store::compact_db`); needs the repo to itself.
    /// Returns the bytes both files shrank by.
    pub fn compact_dbs(&mut self) -> Result<u64> {
        let mut saved = 0;
        if let Some((a, b)) = self.store.compact_index()? {
            saved += a.saturating_sub(b);
        }
        let path = self.dir().join(meta::META_FILE);
        let copied =
            crate::store::rewrite_db(self.meta.get_mut(), &path, self.meta_cache, copy_meta)?;
        if let Some((a, b)) = copied {
            saved += a.saturating_sub(b);
        }
        Ok(saved)
    }

    /// Gives meta.redb's free pages back while the filesystem is mounted,
    /// when that pays: the copy is written with the database to itself, so
    /// it waits up to `wait` for every transaction to end and makes the
    /// requests that come meanwhile wait for the copy (the caller picks an
    /// idle moment). Returns the file's length before and after.
    pub fn compact_meta_live(&self, wait: std::time::Duration) -> Result<Option<(u64, u64)>> {
        let path = self.dir().join(meta::META_FILE);
        if !crate::store::rewrite_pays(&self.meta(), &path)? {
            return Ok(None);
        }
        let Some(mut db) = self.meta.exclusive(wait) else {
            return Ok(None);
        };
        crate::store::rewrite_db(&mut db, &path, self.meta_cache, copy_meta)
    }

    pub fn gc(&self, threshold: f64, progress: &dyn Progress) -> Result<GcReport> {
        maint::gc(&self.store, threshold, progress)
    }

    pub fn stats(&self) -> Result<Stats> {
        let StoreStats {
            counters: c,
            pack_count,
            pack_bytes,
            dead_bytes,
        } = self.store.stats()?;
        let objects = meta::object_count(&self.meta())?;
        let (file_bytes, files) = meta::live_file_bytes(&self.meta())?;
        let mut object_bytes = 0;
        meta::for_each_object(&self.meta(), |_, _, rec| {
            object_bytes += rec.size;
            Ok(())
        })?;
        let logical_bytes = file_bytes + object_bytes;
        let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        Ok(Stats {
            logical_bytes,
            referenced_bytes: c.logical_bytes,
            files,
            unique_bytes: c.live_raw_bytes,
            stored_bytes: c.live_stored_bytes,
            pack_bytes,
            chunks: c.total_chunks,
            live_chunks: c.live_chunks,
            dedup_ratio: ratio(logical_bytes, c.live_raw_bytes),
            compression_ratio: ratio(c.live_raw_bytes, c.live_stored_bytes),
            pack_count,
            dead_bytes,
            dead_fraction: if pack_bytes == 0 {
                0.0
            } else {
                dead_bytes as f64 / pack_bytes as f64
            },
            commits: c.commits,
            objects,
            index: crate::store::db_space(
                self.store.db(),
                &self.dir().join(crate::store::INDEX_FILE),
            )?,
            meta: crate::store::db_space(&self.meta(), &self.dir().join(meta::META_FILE))?,
        })
    }

    /// The references the metadata holds, per chunk and owner.
    fn expected_refs(meta_db: &redb::Database) -> Result<(RefMap, u64)> {
        let mut counts: HashMap<(ChunkId, OwnerId), u64> = HashMap::new();
        let objects = meta::object_count(meta_db)?;
        // An object, named or pending, holds one reference per chunk of its
        // list (a chunk listed twice is held twice).
        meta::for_each_object_segment(meta_db, |owner, _, _, list| {
            for id in format::chunk_ids(list) {
                *counts.entry((id, owner)).or_default() += 1;
            }
            Ok(())
        })?;
        // The filesystem holds one reference per chunk per inode that any of
        // the inode's content versions contains (rows come in ino order).
        let mut cur: Option<u64> = None;
        let mut seen = format::ChunkIdSet::default();
        meta::for_each_content(meta_db, |ino, list| {
            if cur != Some(ino) {
                cur = Some(ino);
                seen.clear();
            }
            for id in format::chunk_ids(list) {
                if seen.insert(id) {
                    *counts.entry((id, OwnerId::LOCAL)).or_default() += 1;
                }
            }
            Ok(())
        })?;
        let mut refs: RefMap = HashMap::new();
        for ((id, o), n) in counts {
            refs.entry(id).or_default().push((o, n));
        }
        for v in refs.values_mut() {
            v.sort();
        }
        Ok((refs, objects))
    }

    /// Verifies every blob, every reference count, and the accounting.
    pub fn fsck(&self, progress: &dyn Progress) -> Result<FsckReport> {
        // Every table first: damage would otherwise surface as a panic in
        // whatever read it, or not at all (a clean report on a store whose
        // lookups fail).
        meta::check_tables(&self.meta(), self.store.dir())?;
        self.store.check_index()?;
        // redb checks its page checksums only when asked: a damaged page
        // that still parses reads as whatever it now holds (a small file's
        // inline bytes came back wrong). Ask, on copies, so fsck changes
        // nothing.
        check_integrity(self.store.dir(), meta::META_FILE, |why| {
            Error::MetaDamaged {
                path: self.store.dir().join(meta::META_FILE),
                why,
            }
        })?;
        check_integrity(self.store.dir(), crate::store::INDEX_FILE, |why| {
            Error::IndexDamaged {
                path: self.store.dir().join(crate::store::INDEX_FILE),
                why,
            }
        })?;
        let (refs, objects) = Self::expected_refs(&self.meta())?;
        let report = maint::verify(&self.store, &refs, progress)?;
        let bad: HashSet<String> = report
            .corrupt
            .iter()
            .map(|b| b.chunk.clone())
            .chain(report.missing.iter().cloned())
            .collect();
        let mut damaged_objects = Vec::new();
        if !bad.is_empty() {
            meta::for_each_object_segment(&self.meta(), |_, name, named, list| {
                // An object's segments come one after another.
                if named
                    && damaged_objects.last().is_none_or(|n: &String| n != name)
                    && list.iter().any(|c| bad.contains(&c.id.to_hex()))
                {
                    damaged_objects.push(name.to_string());
                }
                Ok(())
            })?;
        }
        let clean = report.is_clean();
        Ok(FsckReport {
            store: report,
            objects_checked: objects,
            damaged_objects,
            staging: Vec::new(),
            clean,
        })
    }

    /// After a command failed in a way it did not expect (a panic): which
    /// database of the store at `dir`, if any, is damaged. Opens and reads
    /// both whole, so it costs a pass over each.
    pub fn diagnose(dir: &Path) -> Option<Error> {
        let meta_db = match meta::open(dir, meta::CACHE_BYTES) {
            Ok(db) => db,
            Err(e) => return Some(e),
        };
        if let Err(e) = meta::check_tables(&meta_db, dir) {
            return Some(e);
        }
        drop(meta_db);
        match Store::open(dir) {
            Ok(store) => store.check_index().err(),
            Err(Error::Locked(_)) => None,
            Err(e) => Some(e),
        }
    }

    /// Rebuilds the chunk index of the store at `dir` from its packs and the
    /// references meta.redb holds. Needs the store unused.
    pub fn repair(dir: &Path, progress: &dyn Progress) -> Result<RebuildReport> {
        Store::read_config(dir)?;
        let _lock = Store::lock(dir)?;
        let meta_db = meta::open(dir, meta::CACHE_BYTES)?;
        let (refs, _) = Self::expected_refs(&meta_db)?;
        let seq = meta::ref_seq(&meta_db)?;
        drop(meta_db);
        maint::rebuild_index(dir, &refs, seq, progress)
    }
}

/// redb's integrity check (every page's checksum) of `dir/file`, run on a
/// copy beside it because the check repairs what it can in place. Without
/// room for the copy the check is skipped with a warning.
fn check_integrity(dir: &Path, file: &str, damaged: impl Fn(String) -> Error) -> Result<()> {
    let path = dir.join(file);
    let copy = dir.join(format!(".fsck-{file}"));
    if let Err(e) = std::fs::copy(&path, &copy) {
        let _ = std::fs::remove_file(&copy);
        log::warn!("{file}: no copy for redb's integrity check ({e}); skipped");
        return Ok(());
    }
    let r = crate::guard::catch(|| -> std::result::Result<bool, redb::DatabaseError> {
        let mut db = redb::Database::builder().open(&copy)?;
        db.check_integrity()
    });
    let _ = std::fs::remove_file(&copy);
    match r {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(damaged(
            "redb's integrity check found damaged pages (it could repair a copy)".into(),
        )),
        Ok(Err(e)) => Err(damaged(e.to_string())),
        Err(p) => Err(damaged(p.0)),
    }
}

/// An object being ingested, and what of it is not yet committed.
struct ObjectWrite {
    id: ObjectId,
    name: String,
    /// Segments committed by earlier parts.
    segments: u32,
    /// Whether a pending record holds those parts (none is needed for an
    /// object that commits in one part).
    pending: bool,
    /// Chunks since the last commit.
    tail: Vec<ChunkRef>,
    size: u64,
    chunks: u64,
    finished: bool,
}

/// One thread's ingest: a batch, and the objects whose chunks it holds
/// uncommitted. It commits when a group of small objects is due, and in
/// the middle of an object once it holds `COMMIT_EVERY_CHUNKS` references:
/// the parts of an unfinished object commit under a pending record, which
/// the object's last part replaces with its name.
struct Ingest<'r> {
    repo: &'r Repo,
    owner: OwnerId,
    batch: Batch<'r>,
    /// Finished objects not yet committed, then the one being read.
    objects: Vec<ObjectWrite>,
    /// Chunk references taken since the last commit.
    refs: usize,
    /// Bytes of the objects finished since the last commit.
    bytes: u64,
}

impl<'r> Ingest<'r> {
    fn new(repo: &'r Repo, owner: OwnerId) -> Result<Ingest<'r>> {
        Ok(Ingest {
            repo,
            owner,
            batch: repo.store.batch()?,
            objects: Vec::new(),
            refs: 0,
            bytes: 0,
        })
    }

    /// Reads `reader` to its end as object `name`; the object commits with
    /// the next `commit`.
    fn put(&mut self, name: String, reader: impl Read) -> Result<ObjectInfo> {
        let id = ObjectId(self.repo.next_object.fetch_add(1, Ordering::Relaxed));
        self.objects.push(ObjectWrite {
            id,
            name,
            segments: 0,
            pending: false,
            tail: Vec::new(),
            size: 0,
            chunks: 0,
            finished: false,
        });
        let params = self.repo.store.config().chunker;
        chunker::chunk_stream(params, reader, |data| -> Result<()> {
            let r = self.batch.put_chunk(data)?;
            self.batch.add_refs(self.owner, [r.id]);
            if let Some(o) = self.objects.last_mut() {
                o.tail.push(r);
                o.size += r.len as u64;
                o.chunks += 1;
            }
            self.refs += 1;
            if self.refs >= COMMIT_EVERY_CHUNKS {
                self.commit()?;
            }
            Ok(())
        })?;
        let Some(o) = self.objects.last_mut() else {
            return Err(Error::Invalid("ingest lost its object".into()));
        };
        o.finished = true;
        self.bytes += o.size;
        Ok(ObjectInfo {
            name: o.name.clone(),
            size: o.size,
            chunks: o.chunks as usize,
        })
    }

    /// Whether the finished objects make a group worth committing.
    fn group_due(&self) -> bool {
        self.bytes >= GROUP_COMMIT_BYTES || self.objects.len() >= GROUP_COMMIT_OBJECTS
    }

    /// Commits every chunk and reference taken so far with the parts of the
    /// chunk lists that hold them, then releases the objects that finished
    /// objects replaced.
    fn commit(&mut self) -> Result<()> {
        if self.objects.is_empty() && self.batch.is_empty() {
            return Ok(());
        }
        let owner = self.owner;
        let meta_db = self.repo.meta();
        let parts: Vec<meta::ObjectPart<'_>> = self
            .objects
            .iter()
            .map(|o| meta::ObjectPart {
                id: o.id,
                name: &o.name,
                first_segment: o.segments,
                chunks: &o.tail,
                finished: o.finished.then_some((o.size, o.chunks)),
            })
            .collect();
        let mut displaced = Vec::new();
        self.batch.commit_part(|ref_seq| {
            displaced = meta::commit_object_parts(&meta_db, owner, &parts, ref_seq)?;
            Ok(())
        })?;
        drop(parts);
        self.objects.retain(|o| !o.finished);
        for o in &mut self.objects {
            o.segments += meta::segments_for(o.tail.len());
            o.pending = true;
            o.tail.clear();
            log::debug!(
                "'{}' ({}): {} chunks in {} segments committed, pending",
                o.name,
                o.id,
                o.chunks,
                o.segments
            );
        }
        self.refs = 0;
        self.bytes = 0;
        for id in displaced {
            self.repo.release_object(id)?;
        }
        Ok(())
    }

    /// After a failure: drops what is uncommitted and releases the parts
    /// of unfinished objects that did commit. What cannot be released now
    /// stays pending and is released at the next open.
    fn abort(self) {
        let Ingest {
            repo,
            batch,
            objects,
            ..
        } = self;
        drop(batch);
        for o in objects.iter().filter(|o| o.pending) {
            if let Err(e) = repo.release_object(o.id) {
                log::error!(
                    "cannot release the committed part of '{}' ({}): {e}; the next open will",
                    o.name,
                    o.id
                );
            }
        }
    }
}

/// The ingest pipeline's CPU work with nothing stored: chunking, SHA-1, and
/// the store's compression. The baseline `scripts/bench` compares ingest to.
pub fn raw_pipeline(
    params: crate::format::ChunkerParams,
    compression: crate::format::Compression,
    zstd_level: i32,
    reader: impl Read,
) -> io::Result<(u64, u64)> {
    let mut encoder = crate::store::pack::BlobEncoder::new(compression, zstd_level);
    let mut chunks = 0u64;
    let mut sink = 0u8;
    let total = crate::chunker::chunk_stream::<_, io::Error>(params, reader, |data| {
        let id = ChunkId::of(data);
        let (h, payload) = encoder.encode(data);
        sink ^= id.0[0] ^ h[1] ^ payload.len() as u8;
        chunks += 1;
        Ok(())
    })?;
    std::hint::black_box(sink);
    Ok((total, chunks))
}
