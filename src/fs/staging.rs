//! Staging: the write path of decision 6. A file open for writing keeps its
//! new bytes in a sparse staging file and a set of dirty ranges; everything
//! else still reads from its committed chunks (the base). Closing does not
//! copy the file: ingest re-chunks only from the first changed chunk until
//! the cut points line up with the base again.
//!
//! Invariant: the bytes of a staged file at offset o are the staging file's
//! if o is in a dirty range, else the base's if o < base_limit, else zero;
//! and nothing past `size` exists.
//!
//! A *whole* staged file (a new one, or one open through kernel FUSE
//! passthrough) holds every byte in its staging file. While passthrough
//! handles are open the kernel writes there without telling us: the
//! staging file's length and mtime are then the file's size and mtime, and
//! [`Staged::refresh`] folds them in (the whole file dirty, no base) before
//! anything reads the layout. Otherwise every change goes through
//! `Staged`, and the staging file's mtime may lag (`mtime_stale`) until
//! the last close, an fsync or the file is handed to the kernel.

use std::collections::BTreeMap;
use std::fs::{File, FileTimes};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::format::{Content, InodeRec, Timespec};

pub use crate::ingest::{BaseMark, ChunkMap};

/// Non-overlapping, non-adjacent half-open ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    r: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // Merge with a range starting before us that reaches us.
        if let Some((&s, &e)) = self.r.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
            self.r.remove(&s);
        }
        // Swallow ranges starting inside [start, end].
        let inside: Vec<(u64, u64)> = self.r.range(start..=end).map(|(s, e)| (*s, *e)).collect();
        for (s, e) in inside {
            end = end.max(e);
            self.r.remove(&s);
        }
        self.r.insert(start, end);
    }

    /// Forgets everything at or past `at`.
    pub fn truncate(&mut self, at: u64) {
        let tail: Vec<u64> = self.r.range(at..).map(|(s, _)| *s).collect();
        for s in tail {
            self.r.remove(&s);
        }
        if let Some((&s, e)) = self.r.range_mut(..at).next_back()
            && *e > at
        {
            *e = at;
            let _ = s;
        }
    }

    pub fn first_start(&self) -> Option<u64> {
        self.r.keys().next().copied()
    }

    pub fn last_end(&self) -> Option<u64> {
        self.r.values().next_back().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.r.is_empty()
    }

    /// The dirty parts of [start, end), in order.
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.overlapping_iter(start, end).collect()
    }

    /// `overlapping`, lazily (an lseek stops at the first hole); empty
    /// when start >= end.
    pub fn overlapping_iter(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let end = end.max(start);
        let first = self
            .r
            .range(..start)
            .next_back()
            .map(|(_, &e)| (start, e.min(end)));
        first
            .into_iter()
            .chain(
                self.r
                    .range(start..end)
                    .map(move |(&s, &e)| (s, e.min(end))),
            )
            .filter(|(a, b)| a < b)
    }

    /// How many bytes the ranges cover.
    pub fn total(&self) -> u64 {
        self.ranges().map(|(a, b)| b - a).sum()
    }

    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.r.iter().map(|(s, e)| (*s, *e))
    }

    /// The parts of [start, end) no range covers, in order.
    pub fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = start;
        for (a, b) in self.overlapping(start, end) {
            if pos < a {
                out.push((pos, a));
            }
            pos = b;
        }
        if pos < end {
            out.push((pos, end));
        }
        out
    }
}

/// Inline content has no chunk map to serve as a base, so its bytes below
/// `limit` that `dirty` does not cover go into the staging file and become
/// dirty: a staged file built on inline content reads only from staging.
pub fn stage_inline(file: &File, bytes: &[u8], limit: u64, dirty: &mut RangeSet) -> io::Result<()> {
    let limit = limit.min(bytes.len() as u64);
    for (a, b) in dirty.gaps(0, limit) {
        file.write_all_at(&bytes[a as usize..b as usize], a)?;
        dirty.insert(a, b);
    }
    Ok(())
}

/// What is known of a staged file, persisted beside the staging file on
/// fsync and close so a crash can replay it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Sidecar {
    pub ino: u64,
    pub size: u64,
    pub base_limit: u64,
    pub dirty: Vec<(u64, u64)>,
    pub mtime: (i64, u32),
    /// The chunk list the layout's clean ranges read from (absent in
    /// layouts written before 2026-12-04).
    #[serde(default)]
    pub base: Option<BaseMark>,
}

/// A file with uncommitted writes.
pub struct Staged {
    pub ino: u64,
    /// Set while `base` is another file's chunk list that this file's
    /// record does not hold yet (a whole-file copy_file_range): keeps gc
    /// from dropping those chunks, and says a layout written now could
    /// not be replayed (the record's list is not `base`). fsync commits
    /// the shared list first; ingest commits it with the file.
    pub share_pin: Option<crate::store::Pin>,
    pub file: Arc<File>,
    pub path: PathBuf,
    /// Where clean ranges read from.
    pub base: Arc<ChunkMap>,
    /// Base bytes at or past this offset read as zero (after a truncate).
    pub base_limit: u64,
    pub size: u64,
    pub dirty: RangeSet,
    /// Open handles that may write.
    pub writers: u32,
    /// Bumped on every change, so ingest can tell its copy went stale.
    pub version: u64,
    pub mtime: Timespec,
    pub ctime: Timespec,
    /// Queued for ingest and not yet committed.
    pub queued: bool,
    /// The staging file holds the whole file and may be written by the
    /// kernel (passthrough); see the module doc.
    pub whole: bool,
    /// A whole staged file whose staging file carries [`WHOLE_XATTR`]: it
    /// describes itself, so it needs no sidecar (see `mark_whole`).
    pub marked: bool,
    /// The kernel may hold the staging file itself: it was a passthrough
    /// backing (a process can keep a mapping of it past every close), or
    /// it comes from before this session. Such a file is never reused as
    /// a spare, only unlinked.
    pub exposed: bool,
    /// A whole staging file's own mtime is behind `mtime` (see `touch`).
    pub mtime_stale: bool,
}

/// Marks a staging file that holds its whole file: after a crash it is
/// replayed as it stands (its length the size, its mtime the mtime).
pub const WHOLE_XATTR: &str = "user.dedupfs.whole";

/// Where recovery sets aside staged bytes it cannot replay (under
/// `STORE/staging`).
pub const LOST_DIR: &str = "lost+found";

/// Why a layout cannot be replayed against the committed record `rec`
/// (whose list's mark `mark` gives), or None when it can.
///
/// A layout made against another list than the committed one reads its
/// clean ranges from the wrong chunks. One case is harmless: a kill
/// between an ingest commit and the removal of its staging file leaves
/// the layout of the very state that commit holds (same size and mtime),
/// and replaying it gives those bytes again.
pub fn layout_mismatch<E>(
    side: &Sidecar,
    rec: &InodeRec,
    mark: impl FnOnce() -> Result<BaseMark, E>,
) -> Result<Option<String>, E> {
    let Some(want) = side.base else {
        return Ok(None);
    };
    if rec.size == side.size && (rec.mtime.secs, rec.mtime.nanos) == side.mtime {
        return Ok(None);
    }
    let have = mark()?;
    if have == want {
        return Ok(None);
    }
    Ok(Some(format!(
        "its layout was made against a list of {} chunks ({} bytes), the committed \
         one has {} chunks ({} bytes)",
        want.chunks, want.len, have.chunks, have.len
    )))
}

/// fsck's look at `STORE/staging` of an unmounted store: each layout a
/// mount would replay must fit the committed record it replays against,
/// and its dirty ranges must lie in its staging file. Returns one line
/// per problem; staged bytes set aside by an earlier recovery count too.
pub fn check_layouts(
    dir: &std::path::Path,
    db: &redb::Database,
) -> crate::store::Result<Vec<String>> {
    use redb::ReadableDatabase;
    let staging = dir.join("staging");
    let mut problems = Vec::new();
    let Ok(rd) = std::fs::read_dir(&staging) else {
        return Ok(problems);
    };
    let rt = db.begin_read()?;
    let inodes = rt.open_table(crate::meta::INODES)?;
    let contents = rt.open_table(crate::meta::CONTENTS)?;
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let Some(ino) = name
            .strip_suffix(".side")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let Some(side) = std::fs::read(staging.join(&name))
            .ok()
            .and_then(|b| serde_json::from_slice::<Sidecar>(&b).ok())
        else {
            problems.push(format!("staging/{name}: unreadable layout"));
            continue;
        };
        // No live inode: recovery discards it, as the file is gone.
        let Some((_, rec)) = crate::meta::live_inode(&inodes, ino)? else {
            continue;
        };
        let why = layout_mismatch(&side, &rec, || {
            Ok::<_, crate::store::Error>(match rec.content {
                Content::Chunked => BaseMark::of(
                    &crate::meta::live_content(&contents, ino)?
                        .map(|(_, l)| l)
                        .unwrap_or_default(),
                ),
                _ => BaseMark::of(&[]),
            })
        })?;
        if let Some(why) = why {
            problems.push(format!(
                "staged inode {ino}: {why}; a mount will set it aside rather than replay it"
            ));
        }
        let len = std::fs::metadata(staging.join(ino.to_string()))
            .map(|m| m.len())
            .unwrap_or(0);
        if let Some(&(_, end)) = side.dirty.iter().max_by_key(|r| r.1)
            && end > len
        {
            problems.push(format!(
                "staged inode {ino}: its layout has written bytes up to {end}, its staging \
                 file holds {len}"
            ));
        }
    }
    if let Ok(rd) = std::fs::read_dir(staging.join(LOST_DIR)) {
        for e in rd.flatten() {
            problems.push(format!(
                "staging/{LOST_DIR}/{}: staged bytes a recovery could not replay",
                e.file_name().to_string_lossy()
            ));
        }
    }
    Ok(problems)
}

/// Whether a staging file carries [`WHOLE_XATTR`].
pub fn is_marked_whole(f: &File) -> bool {
    let mut buf = [0u8; 8];
    rustix::fs::fgetxattr(f, WHOLE_XATTR, &mut buf).is_ok()
}

/// Removes [`WHOLE_XATTR`] from a staging file reused for partial
/// staging (spares keep it: every new file is whole). A tag left behind
/// would make recovery replay the file as whole, so failing to remove it
/// is an error.
pub fn unmark_whole(f: &File) -> io::Result<()> {
    match rustix::fs::fremovexattr(f, WHOLE_XATTR) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::NODATA || e == rustix::io::Errno::NOTSUP => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl Staged {
    pub fn write(&mut self, off: u64, data: &[u8]) -> io::Result<()> {
        if let Err(e) = self.file.write_all_at(data, off) {
            // A write that failed partway (EFBIG, ENOSPC, EIO) may have
            // grown a whole staging file past `size`, and nothing fstats
            // it while the kernel cannot write it: a crash would replay
            // those bytes, and a spare would carry them.
            if self.whole && !self.exposed {
                let _ = self.file.set_len(self.size);
            }
            return Err(e);
        }
        let end = off + data.len() as u64;
        self.dirty.insert(off, end);
        self.size = self.size.max(end);
        self.touch();
        Ok(())
    }

    pub fn touch(&mut self) {
        self.version += 1;
        let now = Timespec::now();
        self.mtime = now;
        self.ctime = now;
        if self.whole {
            // The staging file's mtime is the file's. Where the kernel may
            // write it (`exposed`), keep it ours now, or the next refresh
            // would take the kernel's older one back. Elsewhere only a
            // crash reads it: the last close, fsync and unmount put it
            // there (`sync_file_mtime`), not every write and truncate (a
            // syscall each, four per file of an untar).
            if self.exposed {
                self.set_file_mtime();
            } else {
                self.mtime_stale = true;
            }
        }
    }

    /// Puts `mtime` on the staging file of a whole staged file.
    pub fn set_file_mtime(&mut self) {
        let t = system_time(self.mtime);
        match self.file.set_times(FileTimes::new().set_modified(t)) {
            Ok(()) => self.mtime_stale = false,
            Err(e) => log::warn!("setting the mtime of staged inode {}: {e}", self.ino),
        }
    }

    /// `set_file_mtime` if the staging file's mtime is behind.
    pub fn sync_file_mtime(&mut self) {
        if self.whole && self.mtime_stale {
            self.set_file_mtime();
        }
    }

    /// Whether every byte lives in the staging file already (a new file,
    /// one truncated to zero, one staged from inline content), so the
    /// kernel may read and write it there directly.
    pub fn can_be_whole(&self) -> bool {
        self.whole || self.base_limit.min(self.base.len()) == 0
    }

    /// Switches to whole mode: the staging file gets the file's length and
    /// mtime, and the layout says so. The bytes do not change.
    pub fn make_whole(&mut self) -> io::Result<()> {
        if self.whole {
            return Ok(());
        }
        if !self.can_be_whole() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if self.file.metadata()?.len() != self.size {
            self.file.set_len(self.size)?;
        }
        self.whole = true;
        self.mark_whole();
        self.set_file_mtime();
        self.base = Arc::new(ChunkMap::default());
        self.base_limit = 0;
        self.dirty = RangeSet::default();
        self.dirty.insert(0, self.size);
        Ok(())
    }

    /// `make_whole` for the empty staging file of an inode just created:
    /// there is no length to set and no sidecar to remove (inode numbers
    /// are never reused, and recovery removes the sidecars of inodes it
    /// does not find), and a spare may carry the tag already (`marked`).
    /// Why: each of those was a syscall on every create.
    pub fn make_new_whole(&mut self) {
        self.whole = true;
        if !self.marked {
            self.marked = self.tag_whole();
        }
        self.mtime_stale = true;
        self.base = Arc::new(ChunkMap::default());
        self.base_limit = 0;
        self.dirty = RangeSet::default();
    }

    /// Leaves whole mode for an empty file no kernel passthrough holds, so
    /// a copy_file_range can give it the source's chunks as its base.
    pub fn unmake_whole(&mut self) -> io::Result<()> {
        if !self.whole {
            return Ok(());
        }
        if self.size != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if self.marked {
            unmark_whole(&self.file)?;
        }
        self.whole = false;
        self.marked = false;
        self.dirty = RangeSet::default();
        Ok(())
    }

    /// Tags the staging file with [`WHOLE_XATTR`]. Why: a sidecar is a new
    /// file (temp + rename) on every close, and on the untar benchmark the
    /// store's disk spent most of the daemon's time finding free inodes
    /// among the recently deleted ones (ext4 without a journal scans them).
    /// A whole file needs no layout beyond its own length, so a tag set
    /// once replaces the sidecar; fsync of the staging file makes it
    /// durable with the bytes. Where the staging disk has no user xattrs,
    /// sidecars are written as before.
    fn mark_whole(&mut self) {
        if self.marked || !self.tag_whole() {
            return;
        }
        self.marked = true;
        // A sidecar from before (a partial layout) would win at recovery
        // over the tag, and no longer follows the bytes.
        let mut side = self.path.clone().into_os_string();
        side.push(".side");
        match std::fs::remove_file(&side) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                log::warn!("staged inode {}: stale sidecar stays ({e})", self.ino);
                self.marked = false;
            }
        }
    }

    /// Sets [`WHOLE_XATTR`] on the staging file; false where it cannot.
    fn tag_whole(&self) -> bool {
        match rustix::fs::fsetxattr(
            &*self.file,
            WHOLE_XATTR,
            b"1",
            rustix::fs::XattrFlags::empty(),
        ) {
            Ok(()) => true,
            Err(e) => {
                log::debug!(
                    "staged inode {}: no whole-file tag ({e}); sidecars instead",
                    self.ino
                );
                false
            }
        }
    }

    /// Takes the size and mtime of a whole staged file from its staging
    /// file, where the kernel's writes left them; a change bumps `version`.
    /// Only an `exposed` file can have been written behind our back (a
    /// write that fails partway cuts the file back to `size`), so for any
    /// other the fstat is skipped: it ran on every getattr, setattr and
    /// close of a staged file, about five per file of an untar.
    pub fn refresh(&mut self) -> io::Result<()> {
        if !self.whole || !self.exposed {
            return Ok(());
        }
        let m = self.file.metadata()?;
        let mtime = Timespec {
            secs: m.mtime(),
            nanos: m.mtime_nsec() as u32,
        };
        if m.len() != self.size || mtime != self.mtime {
            self.size = m.len();
            self.mtime = mtime;
            self.ctime = self.ctime.max(Timespec {
                secs: m.ctime(),
                nanos: m.ctime_nsec() as u32,
            });
            self.dirty = RangeSet::default();
            self.dirty.insert(0, self.size);
            self.version += 1;
        }
        Ok(())
    }

    /// Makes [off, end) (clipped to the size) read as zeros by punching the
    /// staging file, so nothing is written and ingest sees a hole. Where
    /// the staging filesystem cannot punch (EOPNOTSUPP, ENOSYS, EINVAL),
    /// zeros are written instead.
    pub fn punch(&mut self, off: u64, end: u64) -> io::Result<()> {
        use rustix::fs::{FallocateFlags, fallocate};
        let end = end.min(self.size);
        if off >= end {
            return Ok(());
        }
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match fallocate(&*self.file, flags, off, end - off) {
            Ok(()) => {
                self.dirty.insert(off, end);
                self.touch();
                Ok(())
            }
            Err(
                rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS | rustix::io::Errno::INVAL,
            ) => {
                let zeros = vec![0u8; 1 << 20];
                let mut pos = off;
                while pos < end {
                    let n = (end - pos).min(zeros.len() as u64) as usize;
                    self.write(pos, &zeros[..n])?;
                    pos += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn set_size(&mut self, size: u64) -> io::Result<()> {
        if self.whole {
            self.file.set_len(size)?;
            self.size = size;
            self.dirty = RangeSet::default();
            self.dirty.insert(0, size);
            self.touch();
            return Ok(());
        }
        if size < self.size {
            self.dirty.truncate(size);
            self.base_limit = self.base_limit.min(size);
            self.file.set_len(size)?;
        }
        self.size = size;
        self.touch();
        Ok(())
    }

    /// At most the bytes of the file that are holes, for st_blocks: it may
    /// count too few (more blocks), never too many, or `tar --sparse`
    /// would skip data as a hole. A whole staging file of HOLE_MIN or more:
    /// what it does not hold (the holes ingest lists are at least that
    /// long). On a base: the base's holes below `base_limit`, less every
    /// dirty byte (a write may have filled them).
    pub fn holes_bound(&self, hole_min: u64) -> u64 {
        if self.whole {
            if self.size < hole_min {
                return 0;
            }
            return match self.file.metadata() {
                Ok(m) => self.size.saturating_sub(m.blocks().saturating_mul(512)),
                Err(_) => 0,
            };
        }
        let clean = self
            .base
            .hole_bytes_below(self.base_limit.min(self.base.len()));
        clean.saturating_sub(self.dirty.total()).min(self.size)
    }

    pub fn sidecar(&self) -> Sidecar {
        Sidecar {
            ino: self.ino,
            size: self.size,
            base_limit: self.base_limit,
            dirty: self.dirty.ranges().collect(),
            mtime: (self.mtime.secs, self.mtime.nanos),
            base: Some(self.base.mark()),
        }
    }

    /// A frozen view for ingest to read without holding the lock.
    pub fn view(&self) -> StagedView {
        StagedView {
            file: self.file.clone(),
            base: self.base.clone(),
            base_limit: self.base_limit,
            size: self.size,
            dirty: self.dirty.clone(),
            version: self.version,
            mtime: self.mtime,
            ctime: self.ctime,
        }
    }
}

/// The first hole of a staging file in [pos, end), clipped to it; past the
/// file's end counts as a hole (it reads as zeros). A filesystem without
/// SEEK_HOLE shows none.
pub fn file_hole(f: &File, pos: u64, end: u64) -> io::Result<Option<(u64, u64)>> {
    use rustix::fs::{SeekFrom, seek};
    use rustix::io::Errno;
    let start = match seek(f, SeekFrom::Hole(pos)) {
        Ok(h) => h,
        Err(Errno::NXIO) => pos,
        Err(Errno::INVAL | Errno::OPNOTSUPP) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if start >= end {
        return Ok(None);
    }
    let stop = match seek(f, SeekFrom::Data(start)) {
        Ok(d) => d.min(end),
        Err(Errno::NXIO) => end,
        Err(e) => return Err(e.into()),
    };
    Ok(Some((start, stop.max(start + 1))))
}

pub fn system_time(t: Timespec) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            + Duration::from_nanos(t.nanos as u64)
    }
}

/// An immutable copy of a staged file's layout.
#[derive(Clone)]
pub struct StagedView {
    pub file: Arc<File>,
    pub base: Arc<ChunkMap>,
    pub base_limit: u64,
    pub size: u64,
    pub dirty: RangeSet,
    pub version: u64,
    pub mtime: Timespec,
    pub ctime: Timespec,
}

/// One piece of a read of a staged file.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    Staged(u64, u64),
    Base(u64, u64),
    Zero(u64, u64),
}

impl StagedView {
    /// Splits [start, end) (already clipped to size) by where bytes live.
    pub fn pieces(&self, start: u64, end: u64) -> Vec<Piece> {
        self.pieces_iter(start, end).collect()
    }

    /// `pieces`, lazily.
    pub fn pieces_iter(&self, start: u64, end: u64) -> impl Iterator<Item = Piece> + '_ {
        let clean_end = self.base_limit.min(self.base.len());
        // Pushed in reverse: the stack pops them in order.
        let clean = move |a: u64, b: u64, out: &mut Vec<Piece>| {
            if a >= b {
                return;
            }
            let mid = clean_end.clamp(a, b);
            if mid < b {
                out.push(Piece::Zero(mid, b));
            }
            if a < mid {
                out.push(Piece::Base(a, mid));
            }
        };
        let mut dirty = self.dirty.overlapping_iter(start, end);
        let mut pos = start;
        let mut stack: Vec<Piece> = Vec::new();
        let mut done = false;
        std::iter::from_fn(move || {
            loop {
                if let Some(p) = stack.pop() {
                    return Some(p);
                }
                if done {
                    return None;
                }
                match dirty.next() {
                    Some((s, e)) => {
                        stack.push(Piece::Staged(s, e));
                        clean(pos, s, &mut stack);
                        pos = e;
                    }
                    None => {
                        clean(pos, end, &mut stack);
                        done = true;
                    }
                }
            }
        })
    }

    /// The first hole of at least `min` bytes in [from, end) (clipped to
    /// it): bytes that read as zeros without being stored anywhere, a
    /// stretch past `base_limit`, a hole of the base's list or of the
    /// staging file, merged where they meet.
    pub fn first_hole(&self, from: u64, end: u64, min: u64) -> io::Result<Option<(u64, u64)>> {
        let end = end.min(self.size);
        if from >= end {
            return Ok(None);
        }
        let mut cur: Option<(u64, u64)> = None;
        for p in self.pieces_iter(from, end) {
            let (a, b) = match p {
                Piece::Staged(a, b) | Piece::Base(a, b) | Piece::Zero(a, b) => (a, b),
            };
            let mut pos = a;
            while pos < b {
                let hole = match p {
                    Piece::Zero(..) => Some((pos, b)),
                    Piece::Base(..) => self
                        .base
                        .hole_from(pos)
                        .filter(|h| h.0 < b)
                        .map(|(s, e)| (s, e.min(b))),
                    Piece::Staged(..) => file_hole(&self.file, pos, b)?,
                };
                let (s, e) = hole.unwrap_or((b, b));
                if s > pos {
                    // Data in [pos, s) ends the hole before it.
                    if let Some(c) = cur.take()
                        && c.1 - c.0 >= min
                    {
                        return Ok(Some(c));
                    }
                }
                if s < e {
                    cur = Some(match cur {
                        Some((cs, ce)) if ce == s => (cs, e),
                        _ => (s, e),
                    });
                }
                pos = e;
            }
        }
        Ok(cur.filter(|c| c.1 - c.0 >= min))
    }

    /// The changed bytes ingest may have to store: every dirty byte but
    /// those of the holes it will list (at least `hole_min` long), so a
    /// `truncate -s 1T` stores nothing. Not the staging file's st_blocks:
    /// a compressing filesystem under the store would make that too few.
    pub fn dirty_to_store(&self, hole_min: u64) -> io::Result<u64> {
        let dirty = self.dirty.total();
        if dirty < hole_min {
            return Ok(dirty);
        }
        let mut listed = 0u64;
        let mut pos = 0;
        while let Some((s, e)) = self.first_hole(pos, self.size, hole_min)? {
            listed += self
                .dirty
                .overlapping_iter(s, e)
                .map(|(a, b)| b - a)
                .sum::<u64>();
            pos = e;
        }
        Ok(dirty.saturating_sub(listed))
    }

    /// Whether the base's tail from `off` on is still the file's tail, so
    /// re-chunking may stop at a base cut point past the last dirty byte.
    pub fn tail_intact(&self) -> bool {
        self.base_limit >= self.base.len() && self.size == self.base.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ChunkRef;

    #[test]
    fn range_set_merges_and_truncates() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(20, 25);
        assert_eq!(r.ranges().collect::<Vec<_>>(), vec![(10, 25), (30, 40)]);
        r.insert(5, 35);
        assert_eq!(r.ranges().collect::<Vec<_>>(), vec![(5, 40)]);
        r.insert(50, 60);
        assert_eq!(r.overlapping(0, 55), vec![(5, 40), (50, 55)]);
        assert_eq!(r.overlapping(10, 12), vec![(10, 12)]);
        assert_eq!(r.gaps(0, 70), vec![(0, 5), (40, 50), (60, 70)]);
        assert_eq!(r.gaps(10, 55), vec![(40, 50)]);
        assert_eq!(r.gaps(20, 30), vec![]);
        r.truncate(52);
        assert_eq!(r.ranges().collect::<Vec<_>>(), vec![(5, 40), (50, 52)]);
        r.truncate(5);
        assert!(r.is_empty());
    }

    #[test]
    fn chunk_map_finds_chunks() {
        let id = crate::format::ChunkId::of(b"");
        let m = ChunkMap::new(vec![ChunkRef { id, len: 10 }, ChunkRef { id, len: 5 }]);
        assert_eq!(m.len(), 15);
        assert_eq!(m.find(0), Some(0));
        assert_eq!(m.find(9), Some(0));
        assert_eq!(m.find(10), Some(1));
        assert_eq!(m.find(15), None);
        assert_eq!(m.is_cut(10), Some(1));
        assert_eq!(m.is_cut(11), None);
    }

    /// Holes of the base list, of the staging file and past `base_limit`
    /// merge where they meet; data between them ends a hole; `min` skips
    /// short ones.
    #[test]
    fn first_hole_merges_across_pieces() {
        let k = 1u64 << 10;
        let id = crate::format::ChunkId::of(b"x");
        let data = |len: u64| ChunkRef {
            id,
            len: len as u32,
        };
        let hole = |len: u64| ChunkRef::hole(len as u32);
        // Base: data [0,64K), hole [64K,192K), data [192K,256K),
        // hole [256K,512K) (two entries), data [512K,576K).
        let base = ChunkMap::new(vec![
            data(64 * k),
            hole(128 * k),
            data(64 * k),
            hole(128 * k),
            hole(128 * k),
            data(64 * k),
        ]);
        assert_eq!(base.hole_from(0), Some((64 * k, 192 * k)));
        assert_eq!(base.hole_from(100 * k), Some((100 * k, 192 * k)));
        assert_eq!(base.hole_from(192 * k), Some((256 * k, 512 * k)));
        assert_eq!(base.hole_from(512 * k), None);
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("s"))
            .unwrap();
        // Staged [160K,224K): a hole up to 192K, then data. Staged
        // [480K,544K): all hole (past the staging file's end).
        f.write_all_at(&[7u8; 32 << 10], 192 * k).unwrap();
        let mut dirty = RangeSet::default();
        dirty.insert(160 * k, 224 * k);
        dirty.insert(480 * k, 544 * k);
        let v = StagedView {
            file: Arc::new(f),
            base: Arc::new(base),
            // Past 544K: a Zero piece up to the size.
            base_limit: 544 * k,
            size: 1024 * k,
            dirty,
            version: 0,
            mtime: Timespec::default(),
            ctime: Timespec::default(),
        };
        let h = |from, min| v.first_hole(from, v.size, min).unwrap();
        assert_eq!(h(0, 1), Some((64 * k, 192 * k)));
        // The staging data at [192K,224K) ends it; the base's data after.
        assert_eq!(h(192 * k, 1), Some((256 * k, 1024 * k)));
        assert_eq!(h(0, 200 * k), Some((256 * k, 1024 * k)));
        assert_eq!(h(0, 2048 * k), None);
        assert_eq!(
            v.first_hole(300 * k, 400 * k, 1).unwrap(),
            Some((300 * k, 400 * k))
        );
    }
}
