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
}

/// Queues the reference changes of an inode whose content versions held the
/// chunks `before` and will hold `after` (one reference per chunk per inode,
/// see `meta::chunks_of_ino`).
/// The reference change of replacing `old` by `new` when they are a file's
/// only versions (one reference per distinct chunk): the chunks of `new`
/// that `old` lacks gain one, those of `old` that `new` lacks lose one.
/// Only the middles between their common prefix and suffix can differ;
/// None when those are long (a rewrite: the sets cost the same then).
pub(super) fn list_ref_change(
    old: &[ChunkRef],
    new: &[ChunkRef],
) -> Option<(Vec<ChunkId>, Vec<ChunkId>)> {
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

pub(super) enum RechunkStop {
    Resynced,
    Store(store::Error),
    Io(io::Error),
}

impl From<io::Error> for RechunkStop {
    fn from(e: io::Error) -> Self {
        RechunkStop::Io(e)
    }
}

/// Reads a staged file's bytes in [pos, end), merging staging and base.
pub(super) struct MergedReader<'a> {
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
}
