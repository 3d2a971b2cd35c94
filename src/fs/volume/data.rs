//! File contents on the live volume: open and release, reads (from the
//! staging file, the chunk map, or an inline record), writes into the
//! staging file, fsync, fallocate, lseek over holes, and copy_file_range,
//! which shares chunks instead of copying bytes. A closed writer is queued
//! for ingest (`ingest`).
//!
//! Calls `stage` for staging state, the core, `store` for chunk bytes.

use super::*;

impl Volume {
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

    pub(super) fn open_inner(
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
                let keep = cached.put(ino, stamp) == Some(stamp);
                self.metrics.cache(Cache::KernelPages, keep);
                keep
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
    pub(super) fn drop_pt(&self, ino: u64, close: bool) -> bool {
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

    pub(super) fn chunk_map(&self, ino: u64) -> Result<Arc<ChunkMap>> {
        let hit = self.maps.lock().get(&ino).cloned();
        self.metrics.cache(Cache::ChunkMap, hit.is_some());
        if let Some(m) = hit {
            return Ok(m);
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

    pub(super) fn handle(&self, fh: u64) -> Result<(u64, bool, bool)> {
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
    pub(super) fn read_record(
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

    pub(super) fn chunk(&self, id: &ChunkId) -> Result<Arc<Vec<u8>>> {
        let hit = self.chunks.lock().get(id).cloned();
        self.metrics.cache(Cache::Chunk, hit.is_some());
        if let Some(c) = hit {
            return Ok(c);
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
    pub(super) fn map_pieces(
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
    pub(super) fn read_map(&self, map: &ChunkMap, off: u64, out: &mut [u8]) -> Result<()> {
        let mut at = 0usize;
        self.map_pieces(map, off, off + out.len() as u64, |p, n| {
            match p {
                Some(b) => out[at..at + n].copy_from_slice(b),
                None => out[at..at + n].fill(0),
            }
            at += n;
        })
    }

    pub(super) fn read_staged(&self, v: &StagedView, off: u64, out: &mut [u8]) -> Result<()> {
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
    pub(super) fn orphans_changed(&self) {
        self.orphan_seq.fetch_add(1, Ordering::SeqCst);
        self.send(Msg::Reap);
    }

    pub(super) fn queue_ingest(&self, ino: u64, st: &Arc<Mutex<Staged>>) {
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
    pub(super) fn hole_from(&self, ino: u64, off: u64) -> Result<(u64, Option<(u64, u64)>)> {
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
                self.snap_inode(ino)?.2
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
            self.snap_inode(ino_in)?.2.content
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
    pub(super) fn share_chunks(&self, st: &mut Staged, base: Arc<ChunkMap>) -> Result<u64> {
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
    pub(super) fn commit_share(&self, ino: u64, st: &Arc<Mutex<Staged>>) -> Result<()> {
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
}

/// One handle of `ino` is closed; returns whether it was the last.
pub(super) fn count_close(open: &mut HashMap<u64, u32>, ino: u64) -> bool {
    let n = open.entry(ino).or_default();
    *n = n.saturating_sub(1);
    if *n == 0 {
        open.remove(&ino);
        true
    } else {
        false
    }
}
