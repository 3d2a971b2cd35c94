//! Background upkeep of the live volume: the flusher that makes metadata
//! durable within its bound, the reaper of unlinked-while-open inodes, pack
//! reclaim (gc rounds in the background and on demand), and meta.redb
//! compaction when the filesystem is idle.
//!
//! Calls the core, `repo`, `store::maint`; nothing calls it but the
//! volume's own threads and `gc`.

use super::*;

impl Volume {
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
    pub(super) fn compact_meta_if_idle(&self) -> Result<()> {
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

    pub(super) fn reclaim_round(&self) -> Result<bool> {
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
    pub(super) fn reap_orphans(&self) {
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
    pub(super) fn reapable(&self, clean: impl Fn()) -> Result<(Vec<u64>, u64)> {
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

    pub(super) fn try_reap(&self) -> Result<()> {
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

pub(super) fn flush_loop(vol: std::sync::Weak<Volume>, stop: &(Mutex<bool>, Condvar)) {
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
pub(super) const RECLAIM_THRESHOLD: f64 = 0.2;
/// Under space pressure, any pack with this much dead is worth a round.
pub(super) const RECLAIM_PRESSED_THRESHOLD: f64 = 0.02;
/// Packs compacted per round, so a shutdown never waits long for one.
pub(super) const RECLAIM_PACKS_PER_ROUND: usize = 2;
/// How long the filesystem must have been without requests before
/// meta.redb is compacted, and how often it is looked at.
pub(super) const META_COMPACT_IDLE: Duration = Duration::from_secs(30);
pub(super) const META_COMPACT_EVERY: Duration = Duration::from_secs(60);

/// Gives the space of deleted data back without a command: compacts packs
/// whose dead fraction passes `RECLAIM_THRESHOLD`, and under space
/// pressure (less free than a tenth of the filesystem or four packs) any
/// pack with dead bytes, most dead first. Rounds are bounded and run on
/// this thread alone; they share the index's commit lock with ingest only
/// for their one commit, so requests do not wait on the copying.
pub(super) fn reclaim_loop(vol: std::sync::Weak<Volume>, stop: &(Mutex<bool>, Condvar)) {
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
