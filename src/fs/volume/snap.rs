//! Snapshots on the live volume (design decision 5): a snapshot is a name
//! for a generation. Taking one commits what is staged and bumps the
//! generation; nothing is copied. Reading one sees the versions with
//! born <= S < died. Deleting, diffing and rolling back read the change log
//! for the span of generations they need, so they cost what changed.
//!
//! Snapshot inodes: bit 63 set, the snapshot's id in bits 40..63, the inode
//! number inside the snapshot in bits 0..40, so they never collide with the
//! live tree's. `.snapshots` itself is bit 63 alone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicBool;

use serde::Serialize;

use super::*;
use crate::format::{self, DirentVal};
use crate::meta::{NOW, Rec, Versioned};
use crate::snap::{changed_keys, decode_rec, info_of, show_path};
use crate::tree::{View, components};

pub const SNAP_BIT: u64 = 1 << 63;
const SID_SHIFT: u32 = 40;
const INNER_MASK: u64 = (1 << SID_SHIFT) - 1;
pub const SNAPDIR_INO: u64 = SNAP_BIT;
pub const SNAPDIR_NAME: &[u8] = b".snapshots";

pub fn is_snap_ino(ino: u64) -> bool {
    ino & SNAP_BIT != 0
}

fn split(ino: u64) -> (u64, u64) {
    ((ino & !SNAP_BIT) >> SID_SHIFT, ino & INNER_MASK)
}

fn join(sid: u64, inner: u64) -> u64 {
    SNAP_BIT | (sid << SID_SHIFT) | (inner & INNER_MASK)
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreReport {
    pub path: String,
    pub to: String,
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub replaced: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RollbackReport {
    pub snapshot: String,
    pub records_reverted: u64,
    pub open_writers_reset: u64,
}

/// Snapshot state the volume keeps in memory.
#[derive(Default)]
pub struct SnapState {
    /// id -> generation of every snapshot (None: reload).
    ids: Mutex<Option<HashMap<u64, u64>>>,
    /// Whether readdir of the root lists `.snapshots`.
    pub visible: AtomicBool,
}

fn refused(msg: String) -> Error {
    Error::Snap(msg)
}

/// What a restore copies: one snapshot record in walk order.
struct CopyItem {
    src: u64,
    /// Index into the plan of the new parent (usize::MAX: the destination's
    /// parent directory in the live tree).
    parent: usize,
    name: Vec<u8>,
    rec: InodeRec,
    chunks: Option<Vec<ChunkRef>>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Volume {
    // ------------------------------------------------------------ lookups

    /// Generation of snapshot `sid`.
    fn snap_gen(&self, sid: u64) -> Result<u64> {
        let mut ids = self.snaps.ids.lock();
        if ids.is_none() {
            let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
            let all = load_snaps(&rt)?;
            *ids = Some(all.iter().map(|(_, r)| (r.id, r.generation)).collect());
        }
        ids.as_ref()
            .and_then(|m| m.get(&sid).copied())
            .ok_or(Error::Errno(libc::ENOENT))
    }

    /// The set of snapshots changed: drop the id map, and the kernel's
    /// cached listing of `.snapshots` (it caches every listing, and this
    /// change does not pass through it).
    fn forget_snap_ids(&self) {
        *self.snaps.ids.lock() = None;
        self.invalidate_inode(SNAPDIR_INO);
    }

    pub(super) fn snapdir_attr(&self) -> Result<Attr> {
        let root = self.read_inode(meta::ROOT_INO)?;
        let mut a = self.attr_of(SNAPDIR_INO, &root);
        a.perm = 0o555;
        a.nlink = 2;
        a.size = 0;
        Ok(a)
    }

    /// The view a snapshot inode belongs to.
    fn snap_view(&self, sid: u64) -> Result<View> {
        let sgen = self.snap_gen(sid)?;
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        Ok(View::at(&rt, sgen)?)
    }

    pub(super) fn snap_inode(&self, ino: u64) -> Result<(View, u64, InodeRec)> {
        let (sid, inner) = split(ino);
        let view = self.snap_view(sid)?;
        let rec = view.inode(inner)?.ok_or(Error::Errno(libc::ENOENT))?;
        Ok((view, inner, rec))
    }

    pub(super) fn snap_getattr(&self, ino: u64) -> Result<Attr> {
        if ino == SNAPDIR_INO {
            return self.snapdir_attr();
        }
        let (_, _, rec) = self.snap_inode(ino)?;
        Ok(self.attr_of(ino, &rec))
    }

    pub(super) fn snap_lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        if parent == SNAPDIR_INO {
            let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
            let snaps = rt.open_table(meta::SNAPS).map_err(store::Error::from)?;
            let name = std::str::from_utf8(name).map_err(|_| Error::Errno(libc::ENOENT))?;
            let v = snaps
                .get(name)
                .map_err(store::Error::from)?
                .ok_or(Error::Errno(libc::ENOENT))?;
            let r = decode_rec(name, v.value())?;
            let rec = View::at(&rt, r.generation)?
                .inode(meta::ROOT_INO)?
                .ok_or(Error::Errno(libc::ENOENT))?;
            return Ok(self.attr_of(join(r.id, meta::ROOT_INO), &rec));
        }
        let (sid, inner) = split(parent);
        let view = self.snap_view(sid)?;
        let ent = view
            .lookup(inner, name)?
            .ok_or(Error::Errno(libc::ENOENT))?;
        let rec = view.inode(ent.ino)?.ok_or(Error::Errno(libc::ENOENT))?;
        Ok(self.attr_of(join(sid, ent.ino), &rec))
    }

    pub(super) fn snap_entries(&self, ino: u64) -> Result<Vec<DirEntry>> {
        if ino == SNAPDIR_INO {
            let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
            let mut out = dot_entries(ino, meta::ROOT_INO);
            let mut snaps = load_snaps(&rt)?;
            snaps.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, r) in snaps {
                out.push(DirEntry {
                    name: name.into_bytes(),
                    ino: join(r.id, meta::ROOT_INO),
                    kind: Kind::Dir,
                });
            }
            return Ok(out);
        }
        let sid = split(ino).0;
        let (view, inner, rec) = self.snap_inode(ino)?;
        if rec.kind != Kind::Dir {
            return Err(Error::Errno(libc::ENOTDIR));
        }
        let up = if inner == meta::ROOT_INO || rec.parent == 0 {
            SNAPDIR_INO
        } else {
            join(sid, rec.parent)
        };
        let mut out = dot_entries(ino, up);
        for (name, v) in view.list(inner)? {
            out.push(DirEntry {
                name,
                ino: join(sid, v.ino),
                kind: v.kind,
            });
        }
        Ok(out)
    }

    pub(super) fn snap_readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let (_, _, rec) = self.snap_inode(ino)?;
        match (rec.kind, rec.content) {
            (Kind::Symlink, Content::Inline(t)) => Ok(t),
            _ => Err(Error::Errno(libc::EINVAL)),
        }
    }

    pub(super) fn snap_read(&self, ino: u64, off: u64, size: u32) -> Result<Vec<u8>> {
        let (_, _, rec) = self.snap_inode(ino)?;
        self.read_record(&rec, off, size, || self.snap_chunk_map(ino))
    }

    /// The chunk map of a snapshot file. Snapshot inode numbers are never
    /// reused and their content never changes, so the live map cache can
    /// hold them too.
    pub(super) fn snap_chunk_map(&self, ino: u64) -> Result<Arc<ChunkMap>> {
        let hit = self.maps.lock().get(&ino).cloned();
        self.metrics.cache(Cache::ChunkMap, hit.is_some());
        if let Some(m) = hit {
            return Ok(m);
        }
        let (sid, inner) = split(ino);
        let list = self.snap_view(sid)?.chunks(inner)?.unwrap_or_default();
        let m = Arc::new(ChunkMap::new(list));
        self.maps.lock().put(ino, m.clone());
        Ok(m)
    }

    pub(super) fn snap_getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        if ino == SNAPDIR_INO {
            return Err(Error::Errno(libc::ENODATA));
        }
        let (sid, inner) = split(ino);
        let view = self.snap_view(sid)?;
        let stored = view.xattr(inner, name)?;
        if name == acl::ACCESS && stored.is_some() {
            // Shown under the snapshot's own mode, as the live tree's are.
            let rec = view.inode(inner)?.ok_or(Error::Errno(libc::ENOENT))?;
            return xattr_view(ino, name, stored, rec.perm);
        }
        stored.ok_or(Error::Errno(libc::ENODATA))
    }

    pub(super) fn snap_listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        if ino == SNAPDIR_INO {
            return Ok(Vec::new());
        }
        let (sid, inner) = split(ino);
        let view = self.snap_view(sid)?;
        let names = view.xattr_names(inner)?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let rec = view.inode(inner)?.ok_or(Error::Errno(libc::ENOENT))?;
        list_view(ino, names, rec.perm, |n| view.xattr(inner, n))
    }

    // ------------------------------------------------------------ create

    /// Takes a snapshot of the whole tree. Staged data (files still open
    /// for writing included) is committed in the same commit as the
    /// snapshot record, with every staged file locked, so the snapshot is
    /// one point in time: writes that returned before are in it, writes
    /// that come after wait and are not.
    pub fn snap_create(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        auto: bool,
    ) -> Result<SnapInfo> {
        validate_name(name)?;
        self.check_writable()?;
        self.check_space(Space::Grows)?;
        self.wait_ingest_idle();
        let _c = self.content_lock.lock();
        if self.snap_exists(name)? {
            return Err(refused(format!("snapshot {name} already exists")));
        }
        let now = Timespec::now();
        let mut made: Option<SnapRec> = None;
        self.commit_staged_locked(|tx| {
            made = Some(crate::snap::create(tx, name, labels.clone(), auto, now)?);
            Ok(())
        })?;
        // Kernel notifications go out with no lock of ours held.
        drop(_c);
        self.forget_snap_ids();
        let rec = made.ok_or_else(|| refused(format!("snapshot {name}: commit did not run")))?;
        log::info!("snapshot {name} taken at generation {}", rec.generation);
        Ok(info_of(name, &rec, None))
    }

    fn snap_exists(&self, name: &str) -> Result<bool> {
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        Ok(crate::snap::exists(&rt, name)?)
    }

    // ------------------------------------------------------------ list

    /// Every snapshot, oldest first; with `space`, what each alone keeps
    /// alive and what it refers to (computed once per snapshot, then kept).
    pub fn snap_list(&self, space: bool) -> Result<Vec<SnapInfo>> {
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        let (out, computed) = crate::snap::list(&rt, self.repo.store(), space)?;
        drop(rt);
        if !computed.is_empty() && !self.read_only && self.check_space(Space::Grows).is_ok() {
            // A cache of values that never change: losing it costs a rescan.
            if let Err(e) = self.store_refer(&computed) {
                log::warn!("keeping snapshot sizes: {e}");
            }
        }
        Ok(out)
    }

    fn store_refer(&self, computed: &[(String, SnapRec)]) -> Result<()> {
        let mut tx = self.repo.meta().begin_write().map_err(store::Error::from)?;
        tx.set_durability(Durability::None)
            .map_err(|e| Error::Store(store::Error::Db(e.to_string())))?;
        crate::snap::keep_refer(&tx, computed)?;
        tx.commit().map_err(store::Error::from)?;
        self.lazy_commits.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    pub fn snap_show(&self, name: &str) -> Result<SnapInfo> {
        self.snap_list(true)?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| refused(format!("snapshot {name} does not exist")))
    }

    // ------------------------------------------------------------ delete

    /// Deletes a snapshot and frees the versions only it could see.
    pub fn snap_delete(&self, name: &str) -> Result<DeleteReport> {
        self.check_writable()?;
        self.check_space(Space::Frees)?;
        let _c = self.content_lock.lock();
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        let plan = crate::snap::plan_delete(&rt, name)?;
        drop(rt);
        let mut batch = self.repo.store().batch()?;
        let report = plan.report();
        batch.drop_refs(OwnerId::LOCAL, plan.drops.clone());
        self.commit_with_meta(batch, |tx, _| crate::snap::apply_delete(tx, &plan))?;
        drop(_c);
        self.forget_snap_ids();
        // The kernel may hold `.snapshots/NAME` for SNAP_TTL; it is gone now.
        self.invalidate_entry(SNAPDIR_INO, name.as_bytes());
        log::info!(
            "snapshot {name} deleted: {} versions freed",
            report.versions_freed
        );
        Ok(report)
    }

    // ------------------------------------------------------------ diff

    /// What changed from snapshot `a` to snapshot `b` (or the live tree).
    pub fn snap_diff(&self, a: &str, b: Option<&str>) -> Result<Vec<DiffEntry>> {
        // Data still staged belongs to the live tree.
        if b.is_none() && !self.read_only {
            self.flush_staged()?;
        }
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        Ok(crate::snap::diff(&rt, a, b)?)
    }

    /// Commits every staged file now (open ones included), so reads of the
    /// records see the live tree's bytes.
    fn flush_staged(&self) -> Result<()> {
        self.wait_ingest_idle();
        let _c = self.content_lock.lock();
        self.commit_staged_locked(|_| Ok(()))?;
        Ok(())
    }

    /// With `content_lock` held: commits every staged file's current bytes,
    /// plus whatever `then` adds to the same meta transaction.
    fn commit_staged_locked(
        &self,
        then: impl FnOnce(&redb::WriteTransaction) -> store::Result<()>,
    ) -> Result<()> {
        let mut entries: Vec<(u64, Arc<Mutex<Staged>>)> = self
            .staged
            .lock()
            .iter()
            .map(|(i, s)| (*i, s.clone()))
            .collect();
        entries.sort_by_key(|e| e.0);
        let mut guards: Vec<_> = entries.iter().map(|e| e.1.lock()).collect();
        let mut batch = self.repo.store().batch()?;
        // We hold content_lock and the staged files' locks, which an ingest
        // whose chunks we might share needs before it can commit them.
        batch.never_wait();
        let mut built: Vec<(usize, StagedView, NewContent)> = Vec::new();
        for (i, g) in guards.iter_mut().enumerate() {
            // A passthrough writer's bytes reached the staging file
            // without us: take its size and mtime first.
            refresh(g);
            if g.version == UNTOUCHED {
                continue;
            }
            let view = g.view();
            let content = self.build_content(&view, &mut batch)?;
            built.push((i, view, content));
        }
        let items: Vec<(u64, &NewContent)> = built.iter().map(|b| (entries[b.0].0, &b.2)).collect();
        let live = self.queue_content_refs(&mut batch, &items)?;
        // With nothing staged the batch is empty and this is one durable
        // meta commit.
        self.commit_with_meta(batch, |tx, g| {
            {
                let mut t = Versioned::open(tx, g)?;
                for (k, (i, view, new)) in built.iter().enumerate() {
                    if live[k] {
                        commit_content(&mut t, entries[*i].0, view, new)?;
                    }
                }
            }
            then(tx)
        })?;
        for (i, _, new) in &built {
            let ino = entries[*i].0;
            let g = &mut guards[*i];
            g.version += 1;
            self.maps.lock().pop(&ino);
            if g.writers == 0 {
                self.staged.lock().remove(&ino);
                // Not unlinked under a passthrough reader: a writer that
                // comes next stages into that file again (`new_staged`).
                self.remove_staging(ino, &g.path);
            } else if let Err(e) = rebase_staged(g, new) {
                log::warn!("inode {ino}: keeping staged overlay: {e}");
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ restore

    /// Copies `path` as snapshot `snap` saw it to `to` (default: `path`) in
    /// the live tree, replacing what is there. Files share the snapshot's
    /// chunks: a restore writes metadata only.
    pub fn snap_restore(
        &self,
        snap: &str,
        path: &[u8],
        to: Option<&[u8]>,
    ) -> Result<RestoreReport> {
        self.check_writable()?;
        self.check_space(Space::Grows)?;
        let src_parts = components(path);
        let dst_parts = components(to.unwrap_or(path));
        let Some((dst_name, dst_dir)) = dst_parts.split_last() else {
            return Err(refused(format!(
                "restore from {snap}: the destination cannot be the root; use `snapctl rollback {snap}` to restore the whole tree"
            )));
        };
        let _c = self.content_lock.lock();
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        let snaps = load_snaps(&rt)?;
        let sgen = snaps
            .iter()
            .find(|(n, _)| n == snap)
            .map(|(_, r)| r.generation)
            .ok_or_else(|| refused(format!("snapshot {snap} does not exist")))?;
        let view = View::at(&rt, sgen)?;
        let shown = show_path(path);
        // Resolve the source in the snapshot.
        let mut src = meta::ROOT_INO;
        for c in &src_parts {
            let d = view
                .lookup(src, c)?
                .ok_or_else(|| refused(format!("snapshot {snap} has no {shown}")))?;
            src = d.ino;
        }
        // Walk the snapshot's subtree.
        let mut plan: Vec<CopyItem> = Vec::new();
        let mut report = RestoreReport {
            path: shown.clone(),
            to: show_path(to.unwrap_or(path)),
            ..Default::default()
        };
        view.walk(
            src,
            dst_name.to_vec(),
            |ino| refused(format!("snapshot {snap}: inode {ino} is missing")),
            |v| {
                if v.rec.kind == Kind::Dir {
                    report.dirs += 1;
                } else {
                    report.files += 1;
                    report.bytes += v.rec.size;
                }
                plan.push(CopyItem {
                    src: v.ino,
                    parent: v.parent.unwrap_or(usize::MAX),
                    name: v.name.clone(),
                    rec: v.rec.clone(),
                    chunks: view.chunks_of(v.ino, &v.rec)?,
                    xattrs: view.xattrs(v.ino)?,
                });
                Ok(())
            },
        )?;
        drop((view, rt));
        let mut batch = self.repo.store().batch()?;
        // One reference per chunk per new inode (hard links share one).
        let mut counted: BTreeSet<u64> = BTreeSet::new();
        for it in &plan {
            if let Some(l) = &it.chunks
                && counted.insert(it.src)
            {
                let distinct: format::ChunkIdSet = format::chunk_ids(l).collect();
                batch.add_refs(OwnerId::LOCAL, distinct);
            }
        }
        let mut replaced = false;
        let mut dest_dir: Option<u64> = None;
        let mut failure: Option<Error> = None;
        let res = self.commit_with_meta(batch, |tx, g| {
            let r = (|| -> Result<()> {
                let mut m = MetaTx {
                    t: Versioned::open(tx, g)?,
                    orphans: meta::Lazy::new(tx, meta::ORPHANS),
                    state: tx.open_table(meta::STATE).map_err(store::Error::from)?,
                };
                // The destination's directory must exist in the live tree.
                let mut dir = meta::ROOT_INO;
                for c in dst_dir {
                    let (_, d) =
                        meta::lookup_dirent(&*m.t.dirents.get()?, dir, c)?.ok_or_else(|| {
                            refused(format!(
                                "restore from {snap}: {} does not exist in the live tree \
                                 (a --to outside the mount copies out; that needs the store mounted)",
                                show_path(c)
                            ))
                        })?;
                    dir = d.ino;
                }
                let mut parent_rec = m.dir(dir)?;
                dest_dir = Some(dir);
                if let Some((_, old)) = meta::lookup_dirent(&*m.t.dirents.get()?, dir, dst_name)? {
                    remove_tree(&mut m, dir, dst_name, old)?;
                    replaced = true;
                    if old.kind == Kind::Dir {
                        parent_rec.nlink = parent_rec.nlink.saturating_sub(1);
                    }
                }
                let mut new_ino: HashMap<u64, u64> = HashMap::new();
                let mut links: HashMap<u64, u32> = HashMap::new();
                let mut subdirs: HashMap<u64, u32> = HashMap::new();
                let mut placed: Vec<(u64, u64)> = Vec::new(); // (new ino, new parent)
                for it in &plan {
                    let np = if it.parent == usize::MAX {
                        dir
                    } else {
                        placed[it.parent].0
                    };
                    let hard = it.rec.kind != Kind::Dir && new_ino.contains_key(&it.src);
                    let ino = match new_ino.get(&it.src) {
                        Some(i) if hard => *i,
                        _ => {
                            let i = meta::alloc_ino(&mut m.state)?;
                            new_ino.insert(it.src, i);
                            i
                        }
                    };
                    placed.push((ino, np));
                    m.t.write_dirent(np, &it.name, ino, it.rec.kind)?;
                    *links.entry(ino).or_default() += 1;
                    if it.rec.kind == Kind::Dir {
                        *subdirs.entry(np).or_default() += 1;
                    }
                    if hard {
                        continue;
                    }
                    let mut rec = it.rec.clone();
                    rec.parent = np;
                    rec.name = it.name.clone();
                    m.t.write_inode(ino, &rec)?;
                    if let Some(l) = &it.chunks {
                        m.t.write_content(ino, Some(l))?;
                    }
                    for (n, v) in &it.xattrs {
                        m.t.set_xattr(ino, n, v)?;
                    }
                }
                // Link counts of what was restored: names made here only.
                for (ino, n) in &links {
                    let mut r = m.inode(*ino)?;
                    r.nlink = if r.kind == Kind::Dir {
                        2 + subdirs.get(ino).copied().unwrap_or(0)
                    } else {
                        *n
                    };
                    m.t.write_inode(*ino, &r)?;
                }
                let now = Timespec::now();
                if plan.first().is_some_and(|p| p.rec.kind == Kind::Dir) {
                    parent_rec.nlink += 1;
                }
                parent_rec.mtime = now;
                parent_rec.ctime = now;
                m.t.write_inode(dir, &parent_rec)?;
                Ok(())
            })();
            match r {
                Ok(()) => Ok(()),
                Err(e) => {
                    let msg = e.to_string();
                    failure = Some(e);
                    Err(store::Error::Invalid(msg))
                }
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        res?;
        report.replaced = replaced;
        drop(_c);
        self.orphans_changed();
        if let Some(dir) = dest_dir {
            // Outside content_lock (see `snap_rollback`). The directory
            // too: the kernel may hold its listing (FOPEN_CACHE_DIR).
            self.invalidate_entry(dir, dst_name);
            self.invalidate_inode(dir);
        }
        Ok(report)
    }

    // ------------------------------------------------------------ rollback

    /// Puts the whole live tree back to snapshot `snap`, keeping inode
    /// numbers. Costs what changed since the snapshot. Refuses while files
    /// are open for writing unless `force`; forced, their handles continue
    /// on the rolled-back content.
    pub fn snap_rollback(&self, snap: &str, force: bool) -> Result<RollbackReport> {
        self.check_writable()?;
        self.check_space(Space::Grows)?;
        // Lock order: an entry, then the map; so copy the map out first.
        let staged: Vec<(u64, Arc<Mutex<Staged>>)> = self
            .staged
            .lock()
            .iter()
            .map(|(i, s)| (*i, s.clone()))
            .collect();
        let open_writers: Vec<u64> = staged
            .iter()
            .filter(|(_, s)| s.lock().writers > 0)
            .map(|(i, _)| *i)
            .collect();
        if !open_writers.is_empty() && !force {
            return Err(refused(format!(
                "rollback to {snap} refused: {} file(s) are open for writing (inodes {:?}); close them or use --force",
                open_writers.len(),
                &open_writers[..open_writers.len().min(10)]
            )));
        }
        // Closed files still staged are part of the tree being replaced:
        // commit them first so the log covers them.
        self.flush_staged()?;
        let _c = self.content_lock.lock();
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        let snaps = load_snaps(&rt)?;
        let s = snaps
            .iter()
            .find(|(n, _)| n == snap)
            .map(|(_, r)| r.generation)
            .ok_or_else(|| refused(format!("snapshot {snap} does not exist")))?;
        let g = Gens::load(&rt.open_table(meta::STATE).map_err(store::Error::from)?)?;
        let keys = changed_keys(&rt, s, g.current)?;
        // Contents: plan the reference changes (only content writes hold
        // references, and only content_lock holders change them).
        let contents = rt.open_table(meta::CONTENTS).map_err(store::Error::from)?;
        let mut batch = self.repo.store().batch()?;
        let mut content_plan: Vec<(u64, Option<Vec<ChunkRef>>)> = Vec::new();
        for (rec, id, _) in &keys {
            if *rec != Rec::Content {
                continue;
            }
            let want = meta::content_at(&contents, *id, s)?;
            let have = meta::live_content(&contents, *id)?;
            if want.as_ref().map(|x| x.0) == have.as_ref().map(|x| x.0) {
                continue;
            }
            let skip: Vec<u64> = match &have {
                Some((born, _)) if *born > g.last_snap => vec![*born],
                _ => Vec::new(),
            };
            let before = meta::chunks_of_ino(&contents, *id, &[])?;
            let mut after = meta::chunks_of_ino(&contents, *id, &skip)?;
            if let Some((_, l)) = &want {
                after.extend(format::chunk_ids(l));
            }
            queue_union_change(&mut batch, &before, &after);
            content_plan.push((*id, want.map(|x| x.1)));
        }
        drop((contents, rt));
        let mut report = RollbackReport {
            snapshot: snap.to_string(),
            ..Default::default()
        };
        let mut changed_inodes: BTreeSet<u64> = BTreeSet::new();
        // Inodes whose bytes changed (chunk list, inline bytes or size).
        let mut changed_bytes: BTreeSet<u64> = content_plan.iter().map(|c| c.0).collect();
        let mut changed_names: Vec<(u64, Vec<u8>)> = Vec::new();
        self.commit_with_meta(batch, |tx, g| {
            {
                let mut t = Versioned::open(tx, g)?;
                let mut orphans = tx.open_table(meta::ORPHANS)?;
                for (ino, want) in &content_plan {
                    t.write_content(*ino, want.as_deref())?;
                    changed_inodes.insert(*ino);
                    report.records_reverted += 1;
                }
                for (rec, id, name) in &keys {
                    match rec {
                        Rec::Content => {}
                        Rec::Inode => {
                            let want = meta::inode_at(&*t.inodes.get()?, *id, s)?;
                            let have = meta::live_inode(&*t.inodes.get()?, *id)?;
                            if want.as_ref().map(|x| x.0) == have.as_ref().map(|x| x.0) {
                                continue;
                            }
                            let same_bytes = match (&want, &have) {
                                (Some((_, a)), Some((_, b))) => {
                                    a.size == b.size && a.content == b.content
                                }
                                (None, None) => true,
                                _ => false,
                            };
                            if !same_bytes {
                                changed_bytes.insert(*id);
                            }
                            match want {
                                Some((_, r)) => {
                                    // An inode the snapshot saw unlinked
                                    // but open is the reaper's again.
                                    if r.nlink > 0 {
                                        orphans.remove(*id)?;
                                    } else {
                                        orphans.insert(*id, g.current)?;
                                    }
                                    t.write_inode(*id, &r)?;
                                }
                                None => {
                                    orphans.remove(*id)?;
                                    t.remove_inode(*id)?;
                                }
                            }
                            changed_inodes.insert(*id);
                            report.records_reverted += 1;
                        }
                        Rec::Dirent => {
                            let want = meta::dirent_at(&*t.dirents.get()?, *id, name, s)?;
                            let have = meta::lookup_dirent(&*t.dirents.get()?, *id, name)?;
                            if want.as_ref().map(|x| x.0) == have.as_ref().map(|x| x.0) {
                                continue;
                            }
                            match want {
                                Some((_, d)) => t.write_dirent(*id, name, d.ino, d.kind)?,
                                None => t.remove_dirent(*id, name)?,
                            }
                            changed_names.push((*id, name.clone()));
                            report.records_reverted += 1;
                        }
                        Rec::Xattr => {
                            let want = meta::xattr_at(&*t.xattrs.get()?, *id, name, s)?;
                            let have = meta::xattr_at(&*t.xattrs.get()?, *id, name, NOW)?;
                            if want.as_ref().map(|x| x.0) == have.as_ref().map(|x| x.0) {
                                continue;
                            }
                            match want {
                                Some((_, v)) => t.set_xattr(*id, name, &v)?,
                                None => {
                                    t.remove_xattr(*id, name)?;
                                }
                            }
                            report.records_reverted += 1;
                        }
                    }
                }
            }
            Ok(())
        })?;
        // Open writers continue on the rolled-back content.
        for ino in &changed_inodes {
            self.maps.lock().pop(ino);
            self.reset_staged_after_rollback(*ino, &mut report);
            if changed_bytes.contains(ino) {
                self.refill_passthrough(*ino);
            }
        }
        // Not under content_lock: the kernel takes a directory's lock to
        // drop an entry, and a create in that directory may be waiting
        // for content_lock while holding it.
        drop(_c);
        for ino in &changed_inodes {
            self.invalidate_inode(*ino);
        }
        for (p, n) in &changed_names {
            self.invalidate_entry(*p, n);
        }
        self.orphans_changed();
        log::info!(
            "rolled back to snapshot {snap}: {} records",
            report.records_reverted
        );
        Ok(report)
    }

    /// After a rollback changed `ino` (with `content_lock` held): open
    /// writers continue on the rolled-back content, and closed files leave
    /// staging.
    fn reset_staged_after_rollback(&self, ino: u64, report: &mut RollbackReport) {
        let Some(st) = self.staged_of(ino) else {
            return;
        };
        let mut s = st.lock();
        let rec = self.read_inode(ino).ok();
        match rec {
            Some(rec) if rec.kind == Kind::File && s.writers > 0 && s.whole => {
                // The kernel writes this staging file directly: put
                // the rolled-back bytes in it.
                match self.fill_whole(&mut s, ino, &rec) {
                    Ok(()) => report.open_writers_reset += 1,
                    Err(e) => log::error!("inode {ino}: resetting staging after rollback: {e}"),
                }
            }
            Some(rec) if rec.kind == Kind::File && s.writers > 0 => {
                match self.new_staged(ino, &rec) {
                    Ok(mut fresh) => {
                        fresh.writers = s.writers;
                        fresh.queued = s.queued;
                        fresh.version = s.version + 2;
                        *s = fresh;
                        report.open_writers_reset += 1;
                    }
                    Err(e) => log::error!("inode {ino}: resetting staging after rollback: {e}"),
                }
            }
            _ if s.writers == 0 => {
                s.version += 1;
                self.staged.lock().remove(&ino);
                self.remove_staging(ino, &s.path);
            }
            _ => {}
        }
    }

    /// After a rollback changed `ino` (with `content_lock` held, so no
    /// writer can stage it meanwhile): a staging file that passthrough
    /// readers still hold, and no staging state owns, gets the rolled-back
    /// bytes. Why: every open of the file reads that file while any such
    /// reader lives, and a writer would stage into it again (`new_staged`);
    /// left alone, both saw the bytes from before the rollback.
    fn refill_passthrough(&self, ino: u64) {
        if self.staged.lock().contains_key(&ino) {
            return;
        }
        let Some(file) = self.pt.lock().get(&ino).map(|p| p.file.clone()) else {
            return;
        };
        let rec = match self.read_inode(ino) {
            Ok(rec) if rec.kind == Kind::File => rec,
            // Gone with the rollback: its readers keep what they opened,
            // as with any unlinked file.
            _ => return,
        };
        let filled = self.fill_file(&file, ino, &rec).and_then(|()| {
            file.set_times(std::fs::FileTimes::new().set_modified(staging::system_time(rec.mtime)))
                .map_err(|e| io_err("setting staging mtime", e))
        });
        if let Err(e) = filled {
            log::error!("inode {ino}: refilling a passthrough file after rollback: {e}");
        }
    }

    /// Rewrites a whole staged file's staging file with a committed record's
    /// bytes.
    fn fill_whole(&self, s: &mut Staged, ino: u64, rec: &InodeRec) -> Result<()> {
        self.fill_file(&s.file, ino, rec)?;
        s.set_size(rec.size)
            .map_err(|e| io_err("sizing staging", e))?;
        s.version += 2;
        Ok(())
    }

    /// Makes `file` hold exactly the bytes of `ino`'s committed record.
    /// Written over in place and cut to length at the end, not emptied
    /// first: passthrough readers (and mappings) of the file never see it
    /// shorter than either length.
    fn fill_file(&self, file: &File, ino: u64, rec: &InodeRec) -> Result<()> {
        const STEP: u64 = 16 << 20;
        let mut off = 0;
        while off < rec.size {
            let n = (rec.size - off).min(STEP) as u32;
            let data = self.read_record(rec, off, n, || self.chunk_map(ino))?;
            file.write_all_at(&data, off)
                .map_err(|e| io_err("writing staging", e))?;
            off += n as u64;
        }
        file.set_len(rec.size)
            .map_err(|e| io_err("sizing staging", e))?;
        Ok(())
    }

    // ------------------------------------------------------------ settings

    /// A stored setting (the retention policy).
    pub fn setting(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        let t = match rt.open_table(meta::SETTINGS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(store::Error::from(e).into()),
        };
        Ok(t.get(key)
            .map_err(store::Error::from)?
            .map(|v| v.value().to_vec()))
    }

    /// Stores a setting durably.
    pub fn set_setting(&self, key: &str, value: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.check_space(Space::Grows)?;
        let tx = self.repo.meta().begin_write().map_err(store::Error::from)?;
        tx.open_table(meta::SETTINGS)
            .map_err(store::Error::from)?
            .insert(key, value)
            .map_err(store::Error::from)?;
        tx.commit().map_err(store::Error::from)?;
        Ok(())
    }

    /// Whether the volume still serves (shutdown has not begun).
    pub fn is_running(&self) -> bool {
        self.queue.lock().is_some()
    }

    fn invalidate_inode(&self, ino: u64) {
        if let Some(f) = self.invalidator.lock().as_ref() {
            f(Invalidate::Inode(ino));
        }
    }

    fn invalidate_entry(&self, parent: u64, name: &[u8]) {
        if name.is_empty() {
            return;
        }
        if let Some(f) = self.invalidator.lock().as_ref() {
            f(Invalidate::Entry(parent, name.to_vec()));
        }
    }
}

/// After its bytes were committed, an open file's overlay starts over on
/// top of the new content.
fn rebase_staged(s: &mut Staged, new: &NewContent) -> std::io::Result<()> {
    if s.whole {
        // The kernel writes its staging file directly: that file stays
        // the truth, and the next ingest takes it whole.
        return Ok(());
    }
    match new {
        NewContent::Chunked(list) => {
            s.base = Arc::new(ChunkMap::new(list.clone()));
            s.base_limit = s.base.len();
            s.dirty = RangeSet::default();
        }
        NewContent::Inline(b) => {
            // Written before the layout changes: a failed write leaves
            // the overlay as it was.
            let mut dirty = RangeSet::default();
            staging::stage_inline(&s.file, b, b.len() as u64, &mut dirty)?;
            s.base = Arc::new(ChunkMap::default());
            s.base_limit = 0;
            s.dirty = dirty;
        }
    }
    write_sidecar(s, false)
}

/// Unlinks (parent, name) and, for a directory, everything under it; the
/// inodes become orphans for the reaper.
fn remove_tree(m: &mut MetaTx<'_>, parent: u64, name: &[u8], ent: DirentVal) -> Result<()> {
    if ent.kind == Kind::Dir {
        for (n, d) in meta::list_dir(&*m.t.dirents.get()?, ent.ino, None)? {
            remove_tree(m, ent.ino, &n, d)?;
        }
    }
    m.t.remove_dirent(parent, name)?;
    m.drop_link(ent.ino, ent.kind == Kind::Dir)
}

/// What the kernel must forget after a change made behind its back.
pub enum Invalidate {
    Inode(u64),
    Entry(u64, Vec<u8>),
}
