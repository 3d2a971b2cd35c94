//! A repo is a store plus the metadata that holds references into it. It
//! orders every commit the same way (blobs, then the index with its reference
//! changes, then the meta records that hold those references) and undoes,
//! at open, an index commit whose meta commit never landed.
//!
//! Calls `store`, `meta`, `chunker`, `format`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use redb::Database;

use crate::Progress;
use crate::format::{ChunkId, ChunkRef, OwnerId};
use crate::meta;
use crate::store::maint::{self, GcReport, RebuildReport, RefMap, VerifyReport};
use crate::store::{Error, InitOptions, Result, Store, StoreStats};

pub struct Repo {
    store: Store,
    meta: Database,
    /// Held from reading an object's old chunk list until its replacement
    /// commits, so two writers of one name cannot both drop the old refs.
    names: Mutex<()>,
}

/// Group-commit limits for many small objects: whichever comes first.
const GROUP_COMMIT_BYTES: u64 = 64 << 20;
const GROUP_COMMIT_OBJECTS: usize = 4096;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ObjectInfo {
    pub name: String,
    pub size: u64,
    pub chunks: usize,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub logical_bytes: u64,
    pub unique_bytes: u64,
    pub stored_bytes: u64,
    pub pack_bytes: u64,
    pub chunks: u64,
    pub live_chunks: u64,
    pub dedup_ratio: f64,
    pub compression_ratio: f64,
    pub pack_count: u64,
    pub dead_fraction: f64,
    pub commits: u64,
    pub objects: u64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct FsckReport {
    #[serde(flatten)]
    pub store: VerifyReport,
    pub objects_checked: u64,
    /// Objects that refer to a chunk the store lacks or cannot read.
    pub damaged_objects: Vec<String>,
    pub clean: bool,
}

impl Repo {
    pub fn init(dir: &Path, opts: &InitOptions) -> Result<()> {
        Store::init(dir, opts)?;
        meta::create(dir)?;
        Ok(())
    }

    pub fn open(dir: &Path) -> Result<Repo> {
        let store = Store::open(dir)?;
        let meta = meta::open(dir)?;
        let repo = Repo {
            store,
            meta,
            names: Mutex::new(()),
        };
        repo.reconcile()?;
        Ok(repo)
    }

    /// Opens the store, creating it with default settings if `dir` is
    /// missing or empty.
    pub fn open_or_init(dir: &Path) -> Result<Repo> {
        let empty = !dir.exists()
            || std::fs::read_dir(dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
        if empty {
            Self::init(dir, &InitOptions::default())?;
        }
        Self::open(dir)
    }

    /// Index and meta must agree on the last reference-carrying commit; an
    /// index one step ahead lost its meta commit to a crash and is undone.
    fn reconcile(&self) -> Result<()> {
        let idx = self.store.ref_seq()?;
        let m = meta::ref_seq(&self.meta)?;
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

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn dir(&self) -> &Path {
        self.store.dir()
    }

    pub fn meta(&self) -> &Database {
        &self.meta
    }

    /// Ingests one stream as object `name` and commits it.
    pub fn put_object(&self, owner: OwnerId, name: &str, reader: impl Read) -> Result<ObjectInfo> {
        let mut batch = self.store.batch()?;
        let chunks = batch.ingest(reader)?;
        let info = object_info(name, &chunks);
        self.commit_objects(batch, owner, vec![(name.to_string(), Some(chunks))])?;
        Ok(info)
    }

    fn commit_objects(
        &self,
        mut batch: crate::store::Batch<'_>,
        owner: OwnerId,
        changes: Vec<(String, Option<Vec<ChunkRef>>)>,
    ) -> Result<()> {
        let _names = self.names.lock();
        for (name, new) in &changes {
            if let Some(old) = meta::get_object(&self.meta, owner, name)? {
                batch.drop_refs(owner, old.iter().map(|c| c.id));
            }
            if let Some(new) = new {
                batch.add_refs(owner, new.iter().map(|c| c.id));
            }
        }
        batch.commit(|ref_seq| meta::commit_objects(&self.meta, owner, &changes, ref_seq))?;
        Ok(())
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
        loop {
            let mut batch = self.store.batch()?;
            let mut changes = Vec::new();
            let mut bytes = 0u64;
            while bytes < GROUP_COMMIT_BYTES && changes.len() < GROUP_COMMIT_OBJECTS {
                let Some((name, path)) = queue.lock().next() else {
                    break;
                };
                let f = File::open(&path)
                    .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
                let chunks = batch.ingest(f)?;
                let info = object_info(&name, &chunks);
                bytes += info.size;
                progress.inc(info.size);
                results.lock().push(info);
                changes.push((name, Some(chunks)));
            }
            if changes.is_empty() {
                return Ok(());
            }
            self.commit_objects(batch, owner, changes)?;
        }
    }

    /// Writes object `name` to `out`, verifying every chunk.
    pub fn get_object(&self, owner: OwnerId, name: &str, out: &mut dyn Write) -> Result<u64> {
        let list = meta::get_object(&self.meta, owner, name)?
            .ok_or_else(|| Error::Invalid(format!("no object named '{name}'")))?;
        let mut n = 0u64;
        for c in list {
            let data = self.store.read_chunk(&c.id)?;
            out.write_all(&data)
                .map_err(|e| Error::io("writing output", e))?;
            n += data.len() as u64;
        }
        Ok(n)
    }

    /// Removes objects; their chunks lose these references.
    pub fn remove_objects(&self, owner: OwnerId, names: &[String]) -> Result<usize> {
        let mut missing = Vec::new();
        for n in names {
            if meta::get_object(&self.meta, owner, n)?.is_none() {
                missing.push(n.clone());
            }
        }
        if !missing.is_empty() {
            return Err(Error::Invalid(format!(
                "no object named {}",
                missing.join(", ")
            )));
        }
        let batch = self.store.batch()?;
        let changes: Vec<_> = names.iter().map(|n| (n.clone(), None)).collect();
        self.commit_objects(batch, owner, changes)?;
        Ok(names.len())
    }

    pub fn list_objects(&self) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        meta::for_each_object(&self.meta, |_, name, list| {
            out.push(object_info(name, &list));
            Ok(())
        })?;
        Ok(out)
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
        let mut objects = 0u64;
        meta::for_each_object(&self.meta, |_, _, _| {
            objects += 1;
            Ok(())
        })?;
        let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        Ok(Stats {
            logical_bytes: c.logical_bytes,
            unique_bytes: c.live_raw_bytes,
            stored_bytes: c.live_stored_bytes,
            pack_bytes,
            chunks: c.total_chunks,
            live_chunks: c.live_chunks,
            dedup_ratio: ratio(c.logical_bytes, c.live_raw_bytes),
            compression_ratio: ratio(c.live_raw_bytes, c.live_stored_bytes),
            pack_count,
            dead_fraction: if pack_bytes == 0 {
                0.0
            } else {
                dead_bytes as f64 / pack_bytes as f64
            },
            commits: c.commits,
            objects,
        })
    }

    /// The references the metadata holds, per chunk and owner.
    fn expected_refs(meta_db: &Database) -> Result<(RefMap, u64)> {
        let mut counts: HashMap<(ChunkId, OwnerId), u64> = HashMap::new();
        let mut objects = 0u64;
        meta::for_each_object(meta_db, |owner, _, list| {
            objects += 1;
            for c in list {
                *counts.entry((c.id, owner)).or_default() += 1;
            }
            Ok(())
        })?;
        // The filesystem holds one reference per chunk per inode that any of
        // the inode's content versions contains (rows come in ino order).
        let mut cur: Option<u64> = None;
        let mut seen: std::collections::HashSet<ChunkId> = std::collections::HashSet::new();
        meta::for_each_content(meta_db, |ino, list| {
            if cur != Some(ino) {
                cur = Some(ino);
                seen.clear();
            }
            for c in list {
                if seen.insert(c.id) {
                    *counts.entry((c.id, OwnerId::LOCAL)).or_default() += 1;
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
        let (refs, objects) = Self::expected_refs(&self.meta)?;
        let report = maint::verify(&self.store, &refs, progress)?;
        let bad: std::collections::HashSet<String> = report
            .corrupt
            .iter()
            .map(|b| b.chunk.clone())
            .chain(report.missing.iter().cloned())
            .collect();
        let mut damaged_objects = Vec::new();
        if !bad.is_empty() {
            meta::for_each_object(&self.meta, |_, name, list| {
                if list.iter().any(|c| bad.contains(&c.id.to_hex())) {
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
            clean,
        })
    }

    /// Rebuilds the chunk index of the store at `dir` from its packs and the
    /// references meta.redb holds. Needs the store unused.
    pub fn repair(dir: &Path, progress: &dyn Progress) -> Result<RebuildReport> {
        Store::read_config(dir)?;
        let _lock = Store::lock(dir)?;
        let meta_db = meta::open(dir)?;
        let (refs, _) = Self::expected_refs(&meta_db)?;
        let seq = meta::ref_seq(&meta_db)?;
        drop(meta_db);
        maint::rebuild_index(dir, &refs, seq, progress)
    }
}

fn object_info(name: &str, chunks: &[ChunkRef]) -> ObjectInfo {
    ObjectInfo {
        name: name.to_string(),
        size: chunks.iter().map(|c| c.len as u64).sum(),
        chunks: chunks.len(),
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
