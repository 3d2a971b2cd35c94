//! One mirror run (docs/protocol.md, "A mirror run, in requests"): every
//! snapshot the remote lacks, oldest first, each as the delta from the
//! last one the remote committed.
//!
//! For a snapshot: the directories that changed since the base snapshot
//! (from the change log: cost proportional to the change; a directory
//! not changed keeps the tree name cached for it) are built again, bottom
//! up, into sealed tree blobs; the chunks of their files are sealed
//! convergently unless their sealed name is already known; the target is
//! asked which blobs it lacks, in batches, and only those are sent,
//! several at once; then the references, in commits written down first
//! (`state::Intent`), the root in the last. Interrupted anywhere, the
//! next run settles the commit in flight and resends only what the target
//! lacks.
//!
//! Reads the snapshot through short read transactions (never holding
//! meta.redb for the whole run: compaction and requests go on).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Instant;

use base64::Engine;
use serde::Serialize;

use super::client::{Client, CommitBody, RootPut};
use super::state::{Intent, State};
use super::wire::{self, Body, ChunkEnt, Entry, Name, Root, SegRef, Segment, Tree};
use super::{Keys, Remote};
use crate::format::{ChunkId, ChunkRef, Content, InodeRec, Kind};
use crate::meta::ROOT_INO;
use crate::repo::Repo;
use crate::snap::SnapRec;
use crate::tree::View;

/// What a run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub remote: String,
    pub snapshots: Vec<String>,
    /// Chunks read and sealed (their names were not known yet).
    pub chunks_sealed: u64,
    /// Blobs the target lacked, and their bytes.
    pub blobs_sent: u64,
    pub blob_bytes_sent: u64,
    /// Every request body sent, JSON included.
    pub bytes_sent: u64,
    pub trees_built: u64,
    pub commits: u64,
    pub seconds: f64,
    pub referenced_bytes: u64,
}

/// Blobs per `have` and upload round, and their bytes.
const BATCH: usize = 1024;
const BATCH_BYTES: usize = 64 << 20;
/// References per commit (well under the 8 MiB JSON limit).
const ADDS_PER_COMMIT: usize = 40_000;
/// Uploads at once.
const UPLOADS: usize = 4;

type R<T> = Result<T, String>;

fn s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Runs the mirror of `remote` now: every snapshot it lacks, or only
/// `only`.
pub fn push(repo: &Repo, remote: &Remote, only: Option<&str>) -> R<Report> {
    let t0 = Instant::now();
    let _lock = remote.lock()?;
    let st = State::open(&remote.file("redb"))?;
    let client = remote.client()?;
    client.info().map_err(s)?;
    settle(&st, &client)?;
    let snaps = {
        let rt = repo.meta().begin_read().map_err(s)?;
        let mut all = crate::snap::load_snaps(&rt).map_err(s)?;
        all.sort_by_key(|(_, r)| r.generation);
        all
    };
    let todo: Vec<(String, SnapRec)> = match only {
        Some(n) => {
            let one: Vec<_> = snaps.into_iter().filter(|(m, _)| m == n).collect();
            if one.is_empty() {
                return Err(format!("snapshot {n} does not exist"));
            }
            one
        }
        None => {
            let mut v = Vec::new();
            for (n, r) in snaps {
                if !st.is_done(&n)? {
                    v.push((n, r));
                }
            }
            v
        }
    };
    let mut rep = Report {
        remote: remote.name.clone(),
        ..Report::default()
    };
    for (name, rec) in &todo {
        let mut full = false;
        loop {
            match push_one(repo, remote, &st, &client, name, rec, full, &mut rep) {
                Ok(()) => break,
                Err(Retry::Full(why)) if !full => {
                    log::info!("remote {}: {why}; building {name} in full", remote.name);
                    full = true;
                }
                Err(Retry::Full(why)) | Err(Retry::Fail(why)) => {
                    rep.bytes_sent = client.sent.load(Ordering::Relaxed);
                    return Err(why);
                }
            }
        }
        rep.snapshots.push(name.clone());
        log::info!("remote {}: snapshot {name} mirrored", remote.name);
    }
    rep.bytes_sent = client.sent.load(Ordering::Relaxed);
    rep.seconds = t0.elapsed().as_secs_f64();
    Ok(rep)
}

/// Settles the commit a previous run left in flight, and the sequence.
fn settle(st: &State, client: &Client) -> R<()> {
    let acct = client.account().map_err(s)?;
    if let Some(i) = st.intent()? {
        if acct.seq >= i.body.seq {
            st.apply(&i)?;
        } else {
            st.drop_intent()?;
        }
    }
    let local = st.seq()?;
    if acct.seq != local {
        log::warn!(
            "the target's sequence for this host is {} where this host recorded {local}: \
             adopting the target's (state lost, or the keys used elsewhere)",
            acct.seq
        );
        st.adopt_seq(acct.seq)?;
    }
    Ok(())
}

enum Retry {
    /// Build the snapshot again without the cached trees.
    Full(String),
    Fail(String),
}

impl From<String> for Retry {
    fn from(e: String) -> Retry {
        Retry::Fail(e)
    }
}

/// A blob waiting for the `have` round: its sealed bytes, or the chunk
/// to seal again if the target lacks it.
struct Up {
    name: Name,
    bytes: Option<Vec<u8>>,
    id: Option<ChunkId>,
}

struct Run<'a> {
    repo: &'a Repo,
    client: &'a Client,
    st: &'a State,
    keys: &'a Keys,
    generation: u64,
    dirty: Option<HashSet<u64>>,
    queue: Vec<Up>,
    queued_bytes: usize,
    /// Blobs queued or known held in this run.
    handled: HashSet<Name>,
    seen: HashMap<[u8; 20], Name>,
    new_names: Vec<([u8; 20], Name)>,
    /// Metadata blobs first referenced in this run.
    born: HashSet<Name>,
    adds: HashMap<Name, u64>,
    trees: Vec<(u64, Name)>,
    rep: &'a mut Report,
}

/// A directory's entry as read in one short transaction.
struct Item {
    name: Vec<u8>,
    ino: u64,
    rec: InodeRec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    chunks: Option<Vec<ChunkRef>>,
}

#[allow(clippy::too_many_arguments)]
fn push_one(
    repo: &Repo,
    remote: &Remote,
    st: &State,
    client: &Client,
    name: &str,
    rec: &SnapRec,
    full: bool,
    rep: &mut Report,
) -> Result<(), Retry> {
    let dirty = if full {
        None
    } else {
        dirty_since(repo, st, rec.generation)?
    };
    let mut run = Run {
        repo,
        client,
        st,
        keys: &remote.keys,
        generation: rec.generation,
        dirty,
        queue: Vec::new(),
        queued_bytes: 0,
        handled: HashSet::new(),
        seen: HashMap::new(),
        new_names: Vec::new(),
        born: HashSet::new(),
        adds: HashMap::new(),
        trees: Vec::new(),
        rep,
    };
    let top = {
        let item = run.read_top()?;
        run.entry(item)?
    };
    run.flush()?;
    let Body::Tree(top_tree) = top.body else {
        return Err(Retry::Fail("the snapshot's top is not a directory".into()));
    };
    *run.adds.entry(top_tree).or_default() += 1;
    let mut adds: Vec<(String, u64)> = run.adds.iter().map(|(n, c)| (wire::hex(n), *c)).collect();
    adds.sort();
    let batches: Vec<&[(String, u64)]> = adds.chunks(ADDS_PER_COMMIT).collect();
    let seq0 = st.seq()?;
    let last_seq = seq0 + batches.len() as u64;
    let created = (rec.created, rec.created_nanos);
    let root = Root {
        v: wire::ROOT_VERSION,
        host: remote.cfg.host.clone(),
        seq: last_seq,
        snapshot: name.to_string(),
        labels: rec.labels.clone(),
        generation: rec.generation,
        created,
        top,
    };
    let root_id = wire::root_id(&remote.keys.meta, name, created);
    let sealed_root = wire::seal_root(&remote.keys.meta, &root).map_err(s)?;
    let trees = std::mem::take(&mut run.trees);
    for (i, batch) in batches.iter().enumerate() {
        let last = i + 1 == batches.len();
        let body = CommitBody {
            seq: seq0 + i as u64 + 1,
            add: batch.to_vec(),
            drop: Vec::new(),
            roots_put: if last {
                vec![RootPut {
                    id: wire::hex(&root_id),
                    sealed: base64::engine::general_purpose::STANDARD.encode(&sealed_root),
                }]
            } else {
                Vec::new()
            },
            roots_drop: Vec::new(),
        };
        let intent = Intent {
            body,
            done: last.then(|| (name.to_string(), rec.generation, root_id)),
            trees: if last { trees.clone() } else { Vec::new() },
        };
        st.write_intent(&intent)?;
        match client.commit(&intent.body) {
            Ok(referenced) => {
                st.apply(&intent)?;
                run.rep.referenced_bytes = referenced;
            }
            Err(e) if e.code() == Some("seq_conflict") => {
                // A reply lost on the way: did it land?
                let acct = client.account().map_err(s)?;
                if acct.seq >= intent.body.seq {
                    st.apply(&intent)?;
                } else {
                    return Err(Retry::Fail(e.to_string()));
                }
            }
            Err(e) if e.code() == Some("missing_blobs") => {
                let gone: Vec<Name> = match &e {
                    super::client::Error::Refused { extra, .. } => extra["missing"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_str().and_then(wire::parse_hex))
                                .collect()
                        })
                        .unwrap_or_default(),
                    _ => Vec::new(),
                };
                st.drop_intent()?;
                st.forget(&gone)?;
                return Err(Retry::Full(format!(
                    "the target lacks {} blob(s) this host counted on",
                    gone.len()
                )));
            }
            Err(e) => return Err(Retry::Fail(e.to_string())),
        }
        run.rep.commits += 1;
    }
    Ok(())
}

/// The inodes whose tree entry or tree may differ between the base
/// snapshot and `generation`, with every directory above them; None when
/// everything must be built (no usable base, or hard links changed).
fn dirty_since(repo: &Repo, st: &State, generation: u64) -> R<Option<HashSet<u64>>> {
    let Some((base, base_gen)) = st.base()? else {
        return Ok(None);
    };
    let rt = repo.meta().begin_read().map_err(s)?;
    let snaps = crate::snap::load_snaps(&rt).map_err(s)?;
    let usable = snaps
        .iter()
        .any(|(n, r)| *n == base && r.generation == base_gen && base_gen <= generation);
    if !usable {
        return Ok(None);
    }
    let keys = crate::snap::changed_keys(&rt, base_gen, generation).map_err(s)?;
    let view = View::at(&rt, generation).map_err(s)?;
    let mut dirty = HashSet::new();
    // Inodes whose ancestors are all marked already.
    let mut walked = HashSet::new();
    for (_, id, _) in keys {
        dirty.insert(id);
        let mut p = id;
        while p != 0 && walked.insert(p) {
            dirty.insert(p);
            if p == ROOT_INO {
                break;
            }
            match view.inode(p).map_err(s)? {
                Some(r) => {
                    if r.kind == Kind::File && r.nlink > 1 {
                        return Ok(None);
                    }
                    p = r.parent;
                }
                None => break,
            }
        }
    }
    Ok(Some(dirty))
}

impl Run<'_> {
    fn read_top(&self) -> R<Item> {
        let rt = self.repo.meta().begin_read().map_err(s)?;
        let view = View::at(&rt, self.generation).map_err(s)?;
        let rec = view
            .inode(ROOT_INO)
            .map_err(s)?
            .ok_or("the snapshot has no top directory")?;
        Ok(Item {
            name: Vec::new(),
            ino: ROOT_INO,
            xattrs: view.xattrs(ROOT_INO).map_err(s)?,
            chunks: None,
            rec,
        })
    }

    /// A directory's entries, read in one short transaction.
    fn read_dir(&self, ino: u64) -> R<Vec<Item>> {
        let rt = self.repo.meta().begin_read().map_err(s)?;
        let view = View::at(&rt, self.generation).map_err(s)?;
        let mut out = Vec::new();
        for (name, d) in view.list(ino).map_err(s)? {
            let rec = view
                .inode(d.ino)
                .map_err(s)?
                .ok_or_else(|| format!("inode {} is named but missing", d.ino))?;
            out.push(Item {
                name,
                ino: d.ino,
                xattrs: view.xattrs(d.ino).map_err(s)?,
                chunks: view.chunks_of(d.ino, &rec).map_err(s)?,
                rec,
            });
        }
        Ok(out)
    }

    fn entry(&mut self, it: Item) -> R<Entry> {
        let r = &it.rec;
        let body = match (r.kind, &r.content) {
            (Kind::Dir, _) => Body::Tree(self.tree(it.ino)?),
            (_, Content::Inline(b)) => Body::Inline(b.clone()),
            (Kind::File, Content::Chunked) => match &it.chunks {
                Some(list) => self.file_body(list)?,
                None => Body::Empty,
            },
            _ => Body::Empty,
        };
        Ok(Entry {
            name: it.name,
            kind: r.kind as u8,
            perm: r.perm,
            uid: r.uid,
            gid: r.gid,
            rdev: r.rdev,
            size: r.size,
            atime: (r.atime.secs, r.atime.nanos),
            mtime: (r.mtime.secs, r.mtime.nanos),
            xattrs: it.xattrs,
            link: if r.kind == Kind::File && r.nlink > 1 {
                it.ino
            } else {
                0
            },
            body,
        })
    }

    /// A directory's tree blob: cached when it did not change, else built.
    fn tree(&mut self, ino: u64) -> R<Name> {
        if let Some(d) = &self.dirty
            && !d.contains(&ino)
            && let Some(n) = self.st.tree(ino)?
        {
            return Ok(n);
        }
        let items = self.read_dir(ino)?;
        let mut entries = Vec::with_capacity(items.len());
        for it in items {
            entries.push(self.entry(it)?);
        }
        let children: Vec<Name> = entries.iter().flat_map(Entry::children).collect();
        let tree = Tree {
            v: wire::TREE_VERSION,
            entries,
        };
        let sealed = wire::seal_blob(&self.keys.meta, &tree).map_err(s)?;
        let n = self.emit(sealed, children)?;
        self.trees.push((ino, n));
        self.rep.trees_built += 1;
        Ok(n)
    }

    fn file_body(&mut self, list: &[ChunkRef]) -> R<Body> {
        let mut ents = Vec::with_capacity(list.len());
        for c in list {
            ents.push(if c.is_hole() {
                ChunkEnt {
                    id: ChunkId::HOLE.0,
                    name: [0; 32],
                    len: c.len,
                }
            } else {
                ChunkEnt {
                    id: c.id.0,
                    name: self.chunk_name(&c.id)?,
                    len: c.len,
                }
            });
        }
        if ents.len() <= wire::INLINE_CHUNKS {
            return Ok(Body::Chunks(ents));
        }
        let mut segs = Vec::new();
        for part in wire::split_segments(&ents) {
            let seg = Segment {
                v: wire::TREE_VERSION,
                chunks: part.to_vec(),
            };
            let sealed = wire::seal_blob(&self.keys.meta, &seg).map_err(s)?;
            let children = part.iter().filter(|c| !c.is_hole()).map(|c| c.name);
            let name = self.emit(sealed, children.collect())?;
            segs.push(SegRef {
                name,
                chunks: part.len() as u32,
                bytes: part.iter().map(|c| u64::from(c.len)).sum(),
            });
        }
        Ok(Body::Segments(segs))
    }

    /// A chunk's sealed name: known from an earlier run, or sealed now.
    fn chunk_name(&mut self, id: &ChunkId) -> R<Name> {
        if let Some(n) = self.seen.get(&id.0) {
            return Ok(*n);
        }
        let n = match self.st.name_of(&id.0)? {
            Some(n) => {
                if !self.handled.contains(&n) && self.st.refs(&n)? == 0 {
                    self.enqueue(Up {
                        name: n,
                        bytes: None,
                        id: Some(*id),
                    })?;
                }
                n
            }
            None => {
                let sealed = self.seal(id)?;
                let n = crate::seal::blob_name(&sealed);
                self.new_names.push((id.0, n));
                if !self.handled.contains(&n) {
                    self.enqueue(Up {
                        name: n,
                        bytes: Some(sealed),
                        id: Some(*id),
                    })?;
                }
                n
            }
        };
        self.seen.insert(id.0, n);
        Ok(n)
    }

    fn seal(&mut self, id: &ChunkId) -> R<Vec<u8>> {
        let blob = self.repo.store().read_blob(id).map_err(s)?;
        self.rep.chunks_sealed += 1;
        crate::seal::seal_chunk(&blob, id, &self.keys.secret).map_err(s)
    }

    /// A metadata blob: the first time this host references it, it holds
    /// one reference on each blob it names.
    fn emit(&mut self, sealed: Vec<u8>, children: Vec<Name>) -> R<Name> {
        let n = crate::seal::blob_name(&sealed);
        if !self.born.contains(&n) && self.st.refs(&n)? == 0 {
            self.born.insert(n);
            let distinct: HashSet<Name> = children.into_iter().collect();
            for c in distinct {
                *self.adds.entry(c).or_default() += 1;
            }
            if !self.handled.contains(&n) {
                self.enqueue(Up {
                    name: n,
                    bytes: Some(sealed),
                    id: None,
                })?;
            }
        }
        Ok(n)
    }

    fn enqueue(&mut self, up: Up) -> R<()> {
        self.handled.insert(up.name);
        self.queued_bytes += up.bytes.as_ref().map_or(0, Vec::len);
        self.queue.push(up);
        if self.queue.len() >= BATCH || self.queued_bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Asks the target which queued blobs it lacks and sends those.
    fn flush(&mut self) -> R<()> {
        let ups = std::mem::take(&mut self.queue);
        self.queued_bytes = 0;
        if !ups.is_empty() {
            let names: Vec<Name> = ups.iter().map(|u| u.name).collect();
            let mut missing = HashSet::new();
            for part in names.chunks(crate::serve::target::HAVE_MAX) {
                missing.extend(self.client.have(part).map_err(s)?);
            }
            let mut send: Vec<(Name, Vec<u8>)> = Vec::new();
            for u in ups {
                if !missing.contains(&u.name) {
                    continue;
                }
                let bytes = match (u.bytes, u.id) {
                    (Some(b), _) => b,
                    (None, Some(id)) => {
                        let b = self.seal(&id)?;
                        if crate::seal::blob_name(&b) != u.name {
                            return Err(format!(
                                "chunk {id} no longer seals to the name recorded for it"
                            ));
                        }
                        b
                    }
                    (None, None) => continue,
                };
                send.push((u.name, bytes));
            }
            self.rep.blobs_sent += send.len() as u64;
            self.rep.blob_bytes_sent += send.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
            upload(self.client, send)?;
        }
        let names = std::mem::take(&mut self.new_names);
        self.st.put_names(&names)
    }
}

/// Sends blobs, `UPLOADS` at once; the first failure ends the round.
fn upload(client: &Client, blobs: Vec<(Name, Vec<u8>)>) -> R<()> {
    if blobs.is_empty() {
        return Ok(());
    }
    let work = parking_lot::Mutex::new(blobs.into_iter());
    let failed: parking_lot::Mutex<Option<String>> = parking_lot::Mutex::new(None);
    std::thread::scope(|sc| {
        for _ in 0..UPLOADS {
            sc.spawn(|| {
                loop {
                    if failed.lock().is_some() {
                        return;
                    }
                    let Some((n, b)) = work.lock().next() else {
                        return;
                    };
                    if let Err(e) = client.put(&n, &b) {
                        *failed.lock() = Some(e.to_string());
                        return;
                    }
                }
            });
        }
    });
    match failed.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
