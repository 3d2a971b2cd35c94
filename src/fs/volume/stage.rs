//! Staging state: the per-file staging files that writes land in before
//! ingest, their sidecars (what a crash must replay), spare staging files
//! kept for reuse, and the recovery of staging left by a crash at start.
//!
//! Calls the core, `staging`, `meta`; never ingest's commit.

use super::*;

impl Volume {
    /// Removes a staging file and its sidecar, keeping the file itself
    /// while passthrough handles read it (see `PtFile`).
    pub(super) fn remove_staging(&self, ino: u64, path: &std::path::Path) {
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
    pub(super) fn retire_staging(&self, ino: u64, st: &Arc<Mutex<Staged>>, s: &Staged) {
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
    pub(super) fn take_spare(&self, path: &std::path::Path) -> Option<(Arc<File>, bool)> {
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
    pub(super) fn stage_writer(&self, ino: u64) -> Result<Arc<Mutex<Staged>>> {
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
    pub(super) fn stage_new_file(&self, ino: u64, a: &Attr) -> Result<Arc<Mutex<Staged>>> {
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
    pub(super) fn is_current(&self, ino: u64, st: &Arc<Mutex<Staged>>) -> bool {
        self.staged
            .lock()
            .get(&ino)
            .is_some_and(|c| Arc::ptr_eq(c, st))
    }

    /// Ends a writer registered by `stage_writer`; the last one leaves a
    /// sidecar and queues the file for ingest.
    pub(super) fn drop_writer(&self, ino: u64, st: &Arc<Mutex<Staged>>) {
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
    pub(super) fn new_staged(&self, ino: u64, rec: &InodeRec) -> Result<Staged> {
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

    /// Replays staged writes a crash left: a sidecar says what is valid.
    pub(super) fn recover_staging(&self) -> Result<()> {
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

    /// Empties the spares nobody can read any more, here on an ingest
    /// worker rather than in the create that takes one (where it was a
    /// truncate on every create of an untar).
    pub(super) fn prepare_spares(&self) {
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
}

/// The right to build a file's staging state, released on drop.
pub(super) struct Claim<'a> {
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

/// `read_full_at` that fills the staging file's holes with zeros here
/// rather than reading them, for reads of 1 MiB and more (ingest's). Why:
/// reading a hole makes the kernel zero fresh page-cache pages, and on
/// this VM that ran at about 100 MB/s: a 10 GiB `truncate -s` took 99 s
/// to ingest, 85 % of it in the kernel's memset.
pub(super) fn read_sparse_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
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
pub(super) fn refresh(s: &mut Staged) {
    if let Err(e) = s.refresh() {
        log::warn!("reading the staging state of inode {}: {e}", s.ino);
    }
}

pub(super) fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
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

pub(super) fn sidecar_path(p: &std::path::Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".side");
    PathBuf::from(s)
}

pub(super) fn write_sidecar(s: &Staged, sync: bool) -> io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

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
