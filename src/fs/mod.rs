//! The fuser layer: translates kernel requests into `Volume` calls and
//! results into replies. Errors become errno in exactly one place,
//! [`Error::errno`]. Nothing here may panic: a panic takes the mount down.
//!
//! Calls `fs::volume` (and through it the layers below). Never `mirror`.

pub mod acl;
pub mod readahead;
pub mod staging;
pub mod volume;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};

use crate::format::{Kind, Timespec};
use crate::store;
use parking_lot::Mutex;
use volume::{Attr, Caller, Opened, SetAttr, Volume, is_snap_ino};

/// Errors of the filesystem layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Errno(i32),
    #[error(transparent)]
    Store(#[from] store::Error),
    /// A refused snapshot operation, with the snapshot and the reason.
    #[error("{0}")]
    Snap(String),
}

impl Error {
    /// The one errno mapping of the filesystem. Real OS errors keep their
    /// code (ENOSPC stays ENOSPC); store damage is EIO.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Errno(e) => *e,
            Error::Store(e) => match e {
                store::Error::Io { err, .. } => err.raw_os_error().unwrap_or(libc::EIO),
                store::Error::Invalid(_) => libc::EINVAL,
                store::Error::Locked(_) => libc::EBUSY,
                _ => libc::EIO,
            },
            Error::Snap(_) => libc::EINVAL,
        }
    }
}

impl From<crate::snap::Error> for Error {
    fn from(e: crate::snap::Error) -> Error {
        match e {
            crate::snap::Error::Refused(m) => Error::Snap(m),
            crate::snap::Error::Store(e) => Error::Store(e),
        }
    }
}

macro_rules! from_db {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error { Error::Store(e.into()) }
        }
    )*};
}
from_db!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError
);

/// How long the kernel may trust an entry, attributes or a miss. Only
/// this daemon changes the tree, and every change either passes through the
/// kernel (which updates or drops what it cached) or comes from snapshot
/// restore and rollback, which invalidate what they touch. At 1 s a warm
/// `du` or `git status` over a large tree asked again for every name.
const TTL: Duration = Duration::from_secs(60);

/// Snapshot nodes: `snapctl delete` removes them without telling the
/// kernel, so it must ask again soon.
const SNAP_TTL: Duration = Duration::from_secs(1);

fn ttl(ino: u64) -> &'static Duration {
    if is_snap_ino(ino) { &SNAP_TTL } else { &TTL }
}

fn time(t: Timespec) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            + Duration::from_nanos(t.nanos as u64)
    }
}

fn timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut secs = -(d.as_secs() as i64);
            let mut nanos = d.subsec_nanos();
            if nanos > 0 {
                secs -= 1;
                nanos = 1_000_000_000 - nanos;
            }
            Timespec { secs, nanos }
        }
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
        Kind::Socket => FileType::Socket,
    }
}

fn fattr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.saturating_sub(a.holes).div_ceil(4096) * 8,
        atime: time(a.atime),
        mtime: time(a.mtime),
        ctime: time(a.ctime),
        crtime: time(a.btime),
        kind: file_type(a.kind),
        perm: (a.perm & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// The attributes of a negative entry: node id 0 says "no such name".
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// What the kernel's `in_group_or_capable` looks at besides the caller's
/// gid: its supplementary groups and whether it holds CAP_FSETID. FUSE
/// sends only uid, gid and pid, so these come from /proc
/// (FUSE_SETXATTR_EXT would carry the kernel's own answer, but fuser 0.18
/// cannot parse that request). Read before the volume's transaction, not
/// inside it. A caller whose /proc entry is gone counts as capable only if
/// it is root.
struct Creds {
    gid: u32,
    groups: Vec<u32>,
    cap_fsetid: bool,
}

impl Creds {
    fn of(req: &Request) -> Creds {
        const CAP_FSETID: u32 = 4;
        let mut c = Creds {
            gid: req.gid(),
            groups: Vec::new(),
            cap_fsetid: req.uid() == 0,
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", req.pid())) else {
            return c;
        };
        for line in status.lines() {
            if let Some(groups) = line.strip_prefix("Groups:") {
                c.groups = groups
                    .split_whitespace()
                    .filter_map(|g| g.parse().ok())
                    .collect();
            } else if let Some(caps) = line.strip_prefix("CapEff:") {
                c.cap_fsetid = u64::from_str_radix(caps.trim(), 16)
                    .is_ok_and(|caps| caps & (1 << CAP_FSETID) != 0);
            }
        }
        c
    }

    fn in_group_or_capable(&self, gid: u32) -> bool {
        self.gid == gid || self.cap_fsetid || self.groups.contains(&gid)
    }
}

fn errno(e: &Error) -> Errno {
    FAILED.set(true);
    Errno::from_i32(e.errno())
}

thread_local! {
    /// Set when the request running on this thread answers with an error
    /// (`errno` is the one way errors become replies); `guarded` reads and
    /// clears it to count errors by opcode without touching every reply.
    static FAILED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Looking this name up panics in debug builds (see `lookup`).
#[cfg(debug_assertions)]
pub const TEST_PANIC_NAME: &[u8] = b".dedupfs-test-panic";
// The inode-flag ioctls lsattr, chattr and editors ask for (linux/fs.h).
const FS_IOC_GETFLAGS: u32 = 0x8008_6601;
const FS_IOC_SETFLAGS: u32 = 0x4008_6602;
const FS_IOC_FSGETXATTR: u32 = 0x801c_581f;
const FS_IOC_FSSETXATTR: u32 = 0x401c_5820;
/// struct fsxattr.
const FSXATTR_LEN: usize = 28;

/// The answer to an ioctl: dedupfs keeps no inode flags, so it reports
/// none, accepts setting none, and refuses any other (EOPNOTSUPP, as
/// ext4 refuses a flag it does not support). Every other ioctl gets the
/// ENOTTY ext4 gives for one it does not know (Python and vim ask for
/// TCGETS on every open; fuser's default logged a warning each time).
fn answer_ioctl(cmd: u32, in_data: &[u8], out_size: u32) -> Result<Vec<u8>, i32> {
    let zeros = |n: usize| vec![0u8; n.min(out_size as usize)];
    match cmd {
        FS_IOC_GETFLAGS => Ok(zeros(8)),
        FS_IOC_FSGETXATTR => Ok(zeros(FSXATTR_LEN)),
        FS_IOC_SETFLAGS | FS_IOC_FSSETXATTR => {
            if in_data.iter().all(|b| *b == 0) {
                Ok(Vec::new())
            } else {
                Err(libc::EOPNOTSUPP)
            }
        }
        _ => Err(libc::ENOTTY),
    }
}

/// The filesystem as fuser sees it.
pub struct DedupFs {
    vol: Arc<Volume>,
    /// Ask the kernel for passthrough (the `nopassthrough` mount option
    /// turns it off).
    want_passthrough: bool,
    backing: Mutex<Backings>,
    gate: LinkGate,
    shutdown: Arc<Shutdown>,
    /// Run when the session ends, before the volume shuts down (the
    /// daemon takes fuser's mount handle here; see `main.rs`).
    at_destroy: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

/// The volume's shutdown, run once by whoever gets there first: the end
/// of the session, or a stop that could not end it (files held open with
/// no fusectl to abort the connection). A second caller waits for the
/// first to finish.
pub struct Shutdown {
    vol: Arc<Volume>,
    once: std::sync::Once,
}

impl Shutdown {
    pub fn new(vol: Arc<Volume>) -> Arc<Shutdown> {
        Arc::new(Shutdown {
            vol,
            once: std::sync::Once::new(),
        })
    }

    pub fn run(&self) {
        self.once.call_once(|| self.vol.shutdown());
    }
}

/// Orders replies that carry a link count after the removals that change
/// it.
///
/// Why: the kernel drops its cached link count by one when an UNLINK (or
/// a RENAME over a name, or RMDIR) reply is handled, trusting that what it
/// had did not yet count the removal. An attribute reply that counts the
/// removal but is applied first makes the removal count twice: a file
/// with one name read nlink 0 in the kernel, and link(2) on it failed with
/// ENOENT (a rewrite loop beside two link/unlink loops: 99% of links
/// failed). LINK replies are applied whatever their age, and the
/// removal's reply is applied by the task that asked for it, whenever it
/// next runs, so the daemon cannot order the two exactly. What it does:
/// a removal holds its victim's shard exclusively from before its commit
/// until its reply is written; a reply carrying attributes takes the
/// shard shared once it has read them (so it waits for any removal it may
/// have seen), and if a removal of the shard replied less than `SETTLE`
/// ago, it waits out the rest so the removal's task runs first.
struct LinkGate {
    shards: Vec<Shard>,
    /// Removals begun, for reporters that learn the inode by reading.
    removals: AtomicU64,
    epoch: Instant,
}

#[derive(Default)]
struct Shard {
    lock: parking_lot::RwLock<()>,
    /// When a removal in this shard last replied, in ns since `epoch`
    /// (0: never).
    replied: AtomicU64,
}

/// A removal's hold on its shard; dropped after the reply is written.
struct Removing<'a> {
    gate: &'a LinkGate,
    shard: &'a Shard,
    _w: parking_lot::RwLockWriteGuard<'a, ()>,
}

impl Drop for Removing<'_> {
    fn drop(&mut self) {
        let now = self.gate.epoch.elapsed().as_nanos() as u64;
        self.shard.replied.store(now.max(1), Ordering::SeqCst);
    }
}

impl LinkGate {
    const SHARDS: u64 = 4096;
    /// Long enough for a woken task to run on a busy two-core machine,
    /// short enough that only replies racing a removal of the same shard
    /// ever wait it.
    const SETTLE: Duration = Duration::from_millis(10);

    fn new() -> LinkGate {
        LinkGate {
            shards: (0..Self::SHARDS).map(|_| Shard::default()).collect(),
            removals: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn shard(&self, ino: u64) -> &Shard {
        &self.shards[(ino % Self::SHARDS) as usize]
    }

    /// Held across a removal of a name of `ino` and its reply.
    fn removing(&self, ino: Option<u64>) -> Option<Removing<'_>> {
        let r = ino.map(|i| {
            let shard = self.shard(i);
            Removing {
                gate: self,
                shard,
                _w: shard.lock.write(),
            }
        });
        self.removals.fetch_add(1, Ordering::SeqCst);
        r
    }

    /// Held across the reply of `ino`'s attributes, taken once they are
    /// read.
    fn reporting(&self, ino: u64) -> parking_lot::RwLockReadGuard<'_, ()> {
        let shard = self.shard(ino);
        let g = shard.lock.read();
        let replied = shard.replied.load(Ordering::SeqCst);
        if replied != 0 {
            let since = Duration::from_nanos(
                (self.epoch.elapsed().as_nanos() as u64).saturating_sub(replied),
            );
            if since < Self::SETTLE {
                std::thread::sleep(Self::SETTLE - since);
            }
        }
        g
    }
}

/// The kernel's ids for staging files of passthrough handles. All
/// passthrough opens of one inode must name the same backing, so it is
/// shared by inode while any of its handles is open, and closed (dropped)
/// with the last.
#[derive(Default)]
struct Backings {
    by_fh: HashMap<u64, Arc<BackingId>>,
    /// With the staging file it names: a new staging file of the same
    /// inode needs a new id.
    by_ino: HashMap<u64, (Weak<BackingId>, Arc<std::fs::File>)>,
}

impl DedupFs {
    pub fn new(vol: Arc<Volume>) -> DedupFs {
        DedupFs {
            shutdown: Shutdown::new(vol.clone()),
            vol,
            want_passthrough: true,
            backing: Mutex::new(Backings::default()),
            at_destroy: Mutex::new(None),
            gate: LinkGate::new(),
        }
    }

    /// Runs a request's handler; a panic in it (ours, or redb's on a
    /// damaged page) answers that request with EIO, through the reply the
    /// unwinding drops, and is logged, instead of taking the mount down.
    /// Also where requests are counted and timed by opcode (atomics only:
    /// see `crate::metrics`).
    fn guarded(&self, op: &str, f: impl FnOnce()) {
        let t0 = Instant::now();
        self.vol.note_request();
        FAILED.set(false);
        let panicked = crate::guard::catch(f).map_err(|p| {
            log::error!("{op}: {p}; answered with EIO");
        });
        let failed = FAILED.replace(false) || panicked.is_err();
        self.vol
            .metrics()
            .record_request(crate::metrics::op_index(op), t0.elapsed(), failed);
    }

    /// Shares the volume's shutdown with whoever else may have to run it.
    pub fn with_shutdown(mut self, shutdown: Arc<Shutdown>) -> DedupFs {
        self.shutdown = shutdown;
        self
    }

    /// Something to run when the session ends, before the shutdown.
    pub fn at_destroy(self, f: Box<dyn FnOnce() + Send>) -> DedupFs {
        *self.at_destroy.lock() = Some(f);
        self
    }

    /// Whether to ask the kernel for FUSE passthrough at init.
    pub fn with_passthrough(mut self, on: bool) -> DedupFs {
        self.want_passthrough = on;
        self
    }

    /// The backing id to reply with for a passthrough handle, registering
    /// the staging file with the kernel if the inode has none; None (and
    /// the handle turned into an ordinary one) if the kernel refuses.
    fn backing_for(
        &self,
        ino: u64,
        opened: &Opened,
        open_backing: impl FnOnce(&std::fs::File) -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        let file = opened.backing.as_ref()?;
        let mut b = self.backing.lock();
        let known = b
            .by_ino
            .get(&ino)
            .filter(|(_, f)| Arc::ptr_eq(f, file))
            .and_then(|(w, _)| w.upgrade());
        let id = match known {
            Some(id) => id,
            None if !self.vol.passthrough() => {
                // Turned off since the volume decided: no new backings.
                drop(b);
                self.vol.passthrough_failed(opened.fh);
                return None;
            }
            None => match open_backing(file) {
                Ok(id) => {
                    let id = Arc::new(id);
                    b.by_ino.insert(ino, (Arc::downgrade(&id), file.clone()));
                    id
                }
                Err(e) => {
                    drop(b);
                    log::info!(
                        "passthrough refused by the kernel ({e}); writes go through the daemon"
                    );
                    self.vol.passthrough_failed(opened.fh);
                    return None;
                }
            },
        };
        b.by_fh.insert(opened.fh, id.clone());
        Some(id)
    }

    fn forget_backing(&self, fh: u64) {
        let mut b = self.backing.lock();
        if b.by_fh.remove(&fh).is_some() {
            b.by_ino.retain(|_, (w, _)| w.strong_count() > 0);
        }
    }
}

fn reply_entry(reply: ReplyEntry, r: Result<Attr, Error>) {
    match r {
        Ok(a) => reply.entry(ttl(a.ino), &fattr(&a), Generation(0)),
        Err(e) => reply.error(errno(&e)),
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), Error>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn reply_xattr(reply: ReplyXattr, size: u32, r: Result<Vec<u8>, Error>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(&e)),
    }
}

impl Filesystem for DedupFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        // Refused above the kernel's 128 KiB; `readahead::raise_readahead` sets it.
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_time_granularity(Duration::from_nanos(1));
        // A symlink's target never changes in place (rollback and restore
        // invalidate what they replace), so the kernel may keep it.
        let _ = config.add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS);
        // open(O_TRUNC) truncates in OPEN, not in a SETATTR after it: one
        // round trip fewer, and the file is empty when opened, so its
        // writes can take passthrough (see `Volume::open_file_by`).
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        // POSIX ACLs as ext4 has them (docs/design.md, "POSIX ACLs"): the
        // kernel enforces and caches them and leaves the umask to us
        // (DONT_MASK), and we keep mode and ACL in step and inherit
        // default ACLs (`acl`, `Volume::set_acl`, `Volume::make_node`).
        if config
            .add_capabilities(InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK)
            .is_err()
        {
            log::warn!("the kernel offers no POSIX ACLs; ACL xattrs are stored but not enforced");
            let _ = config.add_capabilities(InitFlags::FUSE_DONT_MASK);
        }
        if !self.want_passthrough {
            log::info!("passthrough off (mount option); writes go through the daemon");
        } else if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() {
            // Depth 1: backing files on a plain filesystem, and this mount
            // may itself sit under overlayfs.
            let _ = config.set_max_stack_depth(1);
            self.vol.set_passthrough(true);
            log::info!("kernel passthrough on for files written whole");
        } else {
            log::info!("the kernel offers no passthrough; writes go through the daemon");
        }
        Ok(())
    }

    fn destroy(&mut self) {
        if let Some(f) = self.at_destroy.lock().take() {
            f();
        }
        self.shutdown.run();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.guarded("lookup", || {
            // Debug builds only: a name that panics, so the mount tests can
            // check that a panic under a request stays in that request.
            #[cfg(debug_assertions)]
            if name.as_bytes() == TEST_PANIC_NAME {
                panic!("test panic under a request");
            }
            let r = self.vol.lookup(parent.0, name.as_bytes());
            let _g = r.as_ref().ok().map(|a| self.gate.reporting(a.ino));
            match r {
                // A miss the kernel may remember for TTL (node id 0): builds,
                // shells and `git status` probe many names that do not exist,
                // and each probe was a round trip. Every change that can add a
                // name reaches the kernel through it (creates) or through an
                // entry invalidation (restore, rollback). Not inside snapshots:
                // `snapctl create` adds names there without either.
                Err(e) if e.errno() == libc::ENOENT && !is_snap_ino(parent.0) => {
                    reply.entry(&TTL, &negative_attr(), Generation(0))
                }
                r => reply_entry(reply, r),
            }
        })
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.guarded("getattr", || match self.vol.getattr(ino.0) {
            Ok(a) => {
                let _g = self.gate.reporting(a.ino);
                reply.attr(ttl(a.ino), &fattr(&a))
            }
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.guarded("setattr", || {
            let t = |x: Option<TimeOrNow>| {
                x.map(|x| match x {
                    TimeOrNow::SpecificTime(t) => timespec(t),
                    TimeOrNow::Now => Timespec::now(),
                })
            };
            let s = SetAttr {
                mode,
                uid,
                gid,
                size,
                atime: t(atime),
                mtime: t(mtime),
                ctime: ctime.map(timespec),
            };
            match self.vol.setattr(caller(req), ino.0, &s) {
                Ok(a) => {
                    let _g = self.gate.reporting(a.ino);
                    reply.attr(ttl(a.ino), &fattr(&a))
                }
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.guarded("readlink", || match self.vol.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.guarded("mknod", || {
            let Some(kind) = Kind::from_mode(mode) else {
                return reply.error(Errno::EINVAL);
            };
            if kind == Kind::Dir || kind == Kind::Symlink {
                return reply.error(Errno::EINVAL);
            }
            let r = self.vol.make_node(
                caller(req),
                parent.0,
                name.as_bytes(),
                kind,
                mode,
                umask,
                rdev,
                None,
            );
            reply_entry(reply, r);
        })
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.guarded("mkdir", || {
            let r = self.vol.make_node(
                caller(req),
                parent.0,
                name.as_bytes(),
                Kind::Dir,
                mode,
                umask,
                0,
                None,
            );
            reply_entry(reply, r);
        })
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.guarded("unlink", || {
            let _g = self
                .gate
                .removing(self.vol.child_ino(parent.0, name.as_bytes()));
            reply_empty(reply, self.vol.unlink(parent.0, name.as_bytes()));
        })
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.guarded("rmdir", || {
            let _g = self
                .gate
                .removing(self.vol.child_ino(parent.0, name.as_bytes()));
            reply_empty(reply, self.vol.rmdir(parent.0, name.as_bytes()));
        })
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.guarded("symlink", || {
            let r = self.vol.make_node(
                caller(req),
                parent.0,
                link_name.as_bytes(),
                Kind::Symlink,
                0o777,
                0,
                0,
                Some(target.as_os_str().as_bytes()),
            );
            reply_entry(reply, r);
        })
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.guarded("rename", || {
            // The name replaced loses a link; an exchange keeps both.
            let replaced = if flags.bits() & libc::RENAME_EXCHANGE == 0 {
                self.vol.child_ino(newparent.0, newname.as_bytes())
            } else {
                None
            };
            let _g = self.gate.removing(replaced);
            reply_empty(
                reply,
                self.vol.rename(
                    caller(req),
                    parent.0,
                    name.as_bytes(),
                    newparent.0,
                    newname.as_bytes(),
                    flags.bits(),
                ),
            );
        })
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.guarded("link", || {
            let r = self.vol.link(ino.0, newparent.0, newname.as_bytes());
            let _g = self.gate.reporting(ino.0);
            reply_entry(reply, r);
        })
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.guarded("open", || {
            match self.vol.open_file_by(caller(req), ino.0, flags.0, true) {
                Ok(o) => match self.backing_for(ino.0, &o, |f| reply.open_backing(f)) {
                    Some(id) => {
                        reply.opened_passthrough(FileHandle(o.fh), FopenFlags::empty(), &id)
                    }
                    None if o.keep_cache => {
                        reply.opened(FileHandle(o.fh), FopenFlags::FOPEN_KEEP_CACHE)
                    }
                    None => reply.opened(FileHandle(o.fh), FopenFlags::empty()),
                },
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.guarded("read", || match self.vol.read(ino.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.guarded("write", || match self.vol.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        })
    }

    /// Nothing is held back for close to report (writes reach the staging
    /// file before they return, and locks are the kernel's), so ENOSYS:
    /// the kernel then stops sending FLUSH, a round trip on every close.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.guarded("flush", || {
            reply.error(Errno::ENOSYS);
        })
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.guarded("release", || {
            let r = self.vol.release(fh.0);
            self.forget_backing(fh.0);
            reply_empty(reply, r);
        })
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.guarded("fsync", || {
            reply_empty(reply, self.vol.fsync(ino.0));
        })
    }

    /// Directories are not opened. ENOSYS here tells the kernel so, once
    /// (FUSE_NO_OPENDIR_SUPPORT): from then on it sends neither OPENDIR nor
    /// RELEASEDIR, two round trips per directory that a walk (find, du, git
    /// status) used to pay, and caches every listing it reads
    /// (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE). It drops a cached listing when
    /// the directory changes through it or its mtime moves; changes it does
    /// not see (`.snapshots`, restore, rollback) invalidate the inode.
    /// Permissions and the directory check stay with the kernel
    /// (default_permissions); a readdir names its listing by offset, see
    /// `volume::Listing`.
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.guarded("opendir", || {
            reply.error(Errno::ENOSYS);
        })
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.guarded("readdir", || {
            let l = match self.vol.listing(ino.0, offset) {
                Ok(l) => l,
                Err(e) => return reply.error(errno(&e)),
            };
            for (i, e) in l.entries.iter().enumerate().skip(l.start) {
                if reply.add(
                    INodeNo(e.ino),
                    l.offset_after(i),
                    file_type(e.kind),
                    OsStr::from_bytes(&e.name),
                ) {
                    break;
                }
            }
            // The kernel reads until a reply comes back empty; only then is
            // the listing no longer needed.
            if l.start >= l.entries.len() {
                self.vol.listing_done(l.id);
            }
            reply.ok();
        })
    }
    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.guarded("fsyncdir", || {
            reply_empty(reply, self.vol.sync_meta());
        })
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.guarded("statfs", || match self.vol.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.guarded("setxattr", || {
            // Only an access ACL needs them (set-group-id clearing).
            let creds = if name.as_bytes() == acl::ACCESS {
                Creds::of(req)
            } else {
                Creds {
                    gid: req.gid(),
                    groups: Vec::new(),
                    cap_fsetid: false,
                }
            };
            reply_empty(
                reply,
                self.vol
                    .setxattr(caller(req), ino.0, name.as_bytes(), value, flags, &|gid| {
                        creds.in_group_or_capable(gid)
                    }),
            );
        })
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.guarded("getxattr", || {
            reply_xattr(reply, size, self.vol.getxattr(ino.0, name.as_bytes()));
        })
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.guarded("listxattr", || {
            reply_xattr(reply, size, self.vol.listxattr(ino.0));
        })
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.guarded("removexattr", || {
            reply_empty(reply, self.vol.removexattr(ino.0, name.as_bytes()));
        })
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        self.guarded("access", || {
            // default_permissions: the kernel checks mode bits itself.
            reply_empty(reply, self.vol.getattr(ino.0).map(|_| ()));
        })
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.guarded("create", || {
            let r = self
                .vol
                .make_node(
                    caller(req),
                    parent.0,
                    name.as_bytes(),
                    Kind::File,
                    mode,
                    umask,
                    0,
                    None,
                )
                .and_then(|a| {
                    // The new file is opened for writing whatever the access mode
                    // says about the caller: it may write to what it just made.
                    // O_EXCL creates (cp, tar) stay off passthrough: a
                    // copy_file_range into a passthrough file has to copy the
                    // bytes into its staging file, where through the daemon it
                    // shares the source's chunks (metadata only). Plain
                    // creates (O_TRUNC: dd, editors, compilers) get the
                    // kernel's write path.
                    let pt = flags & libc::O_EXCL == 0;
                    let o = self.vol.open_created(a.ino, &a, flags, pt)?;
                    Ok((a, o))
                });
            match r {
                Ok((a, o)) => match self.backing_for(a.ino, &o, |f| reply.open_backing(f)) {
                    Some(id) => reply.created_passthrough(
                        &TTL,
                        &fattr(&a),
                        Generation(0),
                        FileHandle(o.fh),
                        FopenFlags::empty(),
                        &id,
                    ),
                    None => reply.created(
                        &TTL,
                        &fattr(&a),
                        Generation(0),
                        FileHandle(o.fh),
                        FopenFlags::empty(),
                    ),
                },
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.guarded("fallocate", || {
            reply_empty(reply, self.vol.fallocate(fh.0, offset, length, mode));
        })
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.guarded("lseek", || match self.vol.lseek(ino.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(&e)),
        })
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        match answer_ioctl(cmd, in_data, out_size) {
            Ok(out) => reply.ioctl(0, &out),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.guarded("copy_file_range", || {
            match self
                .vol
                .copy_range(ino_in.0, offset_in, fh_out.0, offset_out, len)
            {
                Ok(n) => reply.written(n.min(u32::MAX as u64) as u32),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_table_keeps_real_os_codes() {
        let enospc = Error::Store(store::Error::io(
            "x",
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        ));
        assert_eq!(enospc.errno(), libc::ENOSPC);
        assert_eq!(Error::Errno(libc::ENOTEMPTY).errno(), libc::ENOTEMPTY);
        let corrupt = Error::Store(store::Error::Corrupt {
            chunk: crate::format::ChunkId::of(b""),
            pack: crate::format::PackId(1),
            offset: 0,
            why: "x".into(),
        });
        assert_eq!(corrupt.errno(), libc::EIO);
        let not_found = Error::Store(store::Error::NotFound(crate::format::ChunkId::of(b"")));
        assert_eq!(not_found.errno(), libc::EIO);
        assert_eq!(
            Error::Store(store::Error::Invalid("x".into())).errno(),
            libc::EINVAL
        );
        let other_io = Error::Store(store::Error::io("x", std::io::Error::other("no code")));
        assert_eq!(other_io.errno(), libc::EIO);
    }

    #[test]
    fn ioctls_report_no_flags_and_refuse_others() {
        assert_eq!(answer_ioctl(FS_IOC_GETFLAGS, &[], 4), Ok(vec![0; 4]));
        assert_eq!(answer_ioctl(FS_IOC_FSGETXATTR, &[], 28), Ok(vec![0; 28]));
        assert_eq!(answer_ioctl(FS_IOC_SETFLAGS, &[0; 4], 0), Ok(vec![]));
        assert_eq!(
            answer_ioctl(FS_IOC_SETFLAGS, &[0x80, 0, 0, 0], 0),
            Err(libc::EOPNOTSUPP)
        );
        assert_eq!(answer_ioctl(0x5401, &[], 60), Err(libc::ENOTTY));
    }

    #[test]
    fn times_round_trip_including_before_1970() {
        for t in [
            Timespec { secs: 0, nanos: 0 },
            Timespec {
                secs: 1_700_000_000,
                nanos: 123_456_789,
            },
            Timespec {
                secs: -1,
                nanos: 500_000_000,
            },
            Timespec {
                secs: -100,
                nanos: 1,
            },
        ] {
            assert_eq!(timespec(time(t)), t);
        }
    }
}
