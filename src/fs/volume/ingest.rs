//! The ingest stage: closed staged files, gathered in groups, are read,
//! chunked (FastCDC), hashed and written to packs, and their new chunk
//! lists committed to meta and the index together with the reference
//! changes (`commit_content`). Runs on the ingest pool's threads
//! (`ingest_loop`), never under a request.
//!
//! Calls `stage` (what is staged), `store` (packs, index), `meta`.

use super::*;

impl Volume {
    /// Chunks a group of staged files and commits them together.
    /// `messages` is how many queue entries this group answers (duplicates
    /// included), which is what `pending` counted.
    pub(super) fn ingest_group(&self, inos: Vec<u64>, messages: u64) {
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

    /// Returns the files to try again: changed while chunked, no writers.
    pub(super) fn try_ingest_group(&self, inos: &[u64]) -> Result<Vec<u64>> {
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
        let (files, bytes) = built
            .iter()
            .zip(&keep)
            .zip(&live)
            .filter(|((_, k), l)| **k && **l)
            .fold((0, 0), |(n, b), ((x, _), _)| (n + 1, b + x.2.dirty.total()));
        self.metrics.ingest_committed(files, bytes);
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
    pub(super) fn commit_with_meta(
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
    pub(super) fn queue_content_refs(
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
    pub(super) fn build_content(
        &self,
        v: &StagedView,
        batch: &mut Batch<'_>,
    ) -> Result<NewContent> {
        if v.size <= INLINE_MAX {
            let mut out = vec![0u8; v.size as usize];
            self.read_staged(v, 0, &mut out)?;
            return Ok(NewContent::Inline(out));
        }
        let src = Staging { vol: self, view: v };
        let list = crate::ingest::rechunk(&src, self.repo.store().config().chunker, batch)
            .map_err(|e| match e {
                crate::ingest::Error::Store(e) => e.into(),
                crate::ingest::Error::Io(e) => io_err("reading staged data", e),
            })?;
        Ok(NewContent::Chunked(list))
    }
}

pub(super) fn queue_union_change(
    batch: &mut Batch<'_>,
    before: &format::ChunkIdSet,
    after: &format::ChunkIdSet,
) {
    batch.add_refs(OwnerId::LOCAL, after.difference(before).copied());
    batch.drop_refs(OwnerId::LOCAL, before.difference(after).copied());
}

/// Gives a file its new content in a meta transaction: the chunk list (or
/// inline bytes) and the size and times of the view it was built from.
pub(super) fn commit_content(
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

pub(super) fn ingest_loop(vol: std::sync::Weak<Volume>, rx: Arc<Mutex<Receiver<Msg>>>) {
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

/// A staged file as ingest's re-chunking sees it: its base, what changed,
/// and its bytes merged from the staging file and the base.
struct Staging<'a> {
    vol: &'a Volume,
    view: &'a StagedView,
}

impl crate::ingest::Changed for Staging<'_> {
    fn size(&self) -> u64 {
        self.view.size
    }

    fn base(&self) -> &ChunkMap {
        &self.view.base
    }

    fn first_change(&self) -> Option<u64> {
        let v = self.view;
        let mut first = v.dirty.first_start().unwrap_or(u64::MAX);
        if v.base_limit < v.base.len() {
            first = first.min(v.base_limit);
        }
        if v.size != v.base.len() {
            first = first.min(v.size.min(v.base.len()));
        }
        (first != u64::MAX).then_some(first)
    }

    fn last_change_end(&self) -> Option<u64> {
        self.view.dirty.last_end()
    }

    fn tail_intact(&self) -> bool {
        self.view.tail_intact()
    }

    fn first_hole(&self, from: u64, end: u64, min: u64) -> io::Result<Option<(u64, u64)>> {
        self.view.first_hole(from, end, min)
    }

    fn read_at(&self, off: u64, out: &mut [u8]) -> io::Result<()> {
        self.vol
            .read_staged(self.view, off, out)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}
