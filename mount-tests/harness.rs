//! The mount harness: a store and a mountpoint in a temp dir, mounted for
//! real through the `dedupfs` binary, and a guard that always unmounts
//! (lazily) and kills the daemon, even when a test panics.
//!
//! Also the small pieces every test needs: errno-returning wrappers of the
//! syscalls std lacks (the only `unsafe` of the target, in `sys`), a seeded
//! RNG, and a tree snapshot to compare a mount against a reference dir.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_dedupfs");

/// How long an unmount may take to finish pending ingest and exit.
const UMOUNT_LIMIT: Duration = Duration::from_secs(120);

/// Whether FUSE can be used here; prints why not. With
/// DEDUPFS_REQUIRE_FUSE=1 (scripts/test sets it) a missing FUSE fails the
/// test instead: a suite that skips every mount test must not pass.
pub fn fuse_available() -> bool {
    let why = if !Path::new("/dev/fuse").exists() {
        "/dev/fuse is missing"
    } else if find_in_path("fusermount3").is_none() {
        "fusermount3 is not installed"
    } else {
        return true;
    };
    assert!(
        std::env::var_os("DEDUPFS_REQUIRE_FUSE").is_none_or(|v| v != "1"),
        "FUSE is required (DEDUPFS_REQUIRE_FUSE=1) but {why}"
    );
    eprintln!("skipping: {why}");
    false
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// An errno from a std io::Error (EIO if it carries none).
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

pub fn res<T>(r: io::Result<T>) -> Result<T, i32> {
    r.map_err(|e| errno_of(&e))
}

/// A store and a mountpoint; unmounts and kills its daemon on drop.
pub struct TestFs {
    /// Holds the temp dir alive (None when the store lives elsewhere).
    _dir: Option<tempfile::TempDir>,
    pub store: PathBuf,
    pub mnt: PathBuf,
    pub mounted: bool,
    pub options: Vec<String>,
}

impl TestFs {
    /// A fresh temp dir with `store/` (not yet created) and `mnt/`.
    pub fn new() -> TestFs {
        let dir = tempfile::Builder::new()
            .prefix("dedupfs-mt-")
            .tempdir()
            .expect("tempdir");
        let store = dir.path().join("store");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).expect("mkdir mnt");
        TestFs {
            _dir: Some(dir),
            store,
            mnt,
            mounted: false,
            options: Vec::new(),
        }
    }

    /// A store at `store` and a mountpoint at `mnt`, both owned by the
    /// caller's temp dirs.
    pub fn at(store: PathBuf, mnt: PathBuf) -> TestFs {
        fs::create_dir_all(&mnt).expect("mkdir mnt");
        TestFs {
            _dir: None,
            store,
            mnt,
            mounted: false,
            options: Vec::new(),
        }
    }

    pub fn p(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn mount(&mut self) {
        assert!(!self.mounted, "already mounted");
        let mut cmd = Command::new(BIN);
        cmd.arg("mount").arg(&self.store).arg(&self.mnt);
        if !self.options.is_empty() {
            cmd.arg("-o").arg(self.options.join(","));
        }
        let out = cmd.output().expect("running dedupfs mount");
        assert!(
            out.status.success(),
            "mount failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        self.mounted = true;
    }

    /// `dedupfs umount`: returns once the daemon has finished and exited.
    pub fn umount(&mut self) {
        assert!(self.mounted, "not mounted");
        // `dedupfs umount` waits (up to 10 minutes) for the daemon to finish
        // and exit; a daemon hung in shutdown should fail the test sooner.
        let mut child = Command::new(BIN)
            .arg("umount")
            .arg(&self.mnt)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running dedupfs umount");
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().expect("waiting for umount") {
                break st;
            }
            if start.elapsed() > UMOUNT_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the daemon did not exit within {UMOUNT_LIMIT:?} of the unmount \
                     (hung in shutdown?)\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = io::Read::read_to_string(&mut e, &mut err);
        }
        assert!(status.success(), "umount failed: {err}\n{}", self.log());
        self.mounted = false;
        // `dedupfs umount` waits for the store lock; make sure the process
        // is really gone before anyone opens the store.
        if let Some(pid) = self.daemon_pid() {
            wait_gone(pid, Duration::from_secs(120));
        }
    }

    pub fn remount(&mut self) {
        self.umount();
        self.mount();
    }

    /// The daemon serving this store, found by its command line.
    pub fn daemon_pid(&self) -> Option<i32> {
        let want = self.store.as_os_str().as_bytes();
        let me = std::process::id() as i32;
        for e in fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me || is_zombie(pid) {
                continue;
            }
            let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_daemon = args.windows(2).any(|w| w[0] == b"mount" && w[1] == want)
                && args.contains(&&b"-f"[..]);
            if is_daemon {
                return Some(pid);
            }
        }
        None
    }

    /// Sends `sig` to the daemon and leaves the rest to the test (the
    /// mount may stay dead); the guard still cleans up. Returns its pid.
    pub fn signal_daemon(&mut self, sig: i32) -> i32 {
        let pid = self.daemon_pid().expect("no daemon to signal");
        // SAFETY: plain kill(2) on a pid we just found.
        unsafe { libc::kill(pid, sig) };
        self.mounted = false;
        pid
    }

    /// kill -9 the daemon and clear the dead mount.
    pub fn crash(&mut self) {
        let pid = self.daemon_pid().expect("no daemon to kill");
        // SAFETY: plain kill(2) on a pid we just found.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_gone(pid, Duration::from_secs(30));
        self.detach();
        self.wait_store_unlocked(Duration::from_secs(60));
    }

    /// Ends the FUSE connection from the kernel's side (the way an
    /// unmount's DESTROY ends it, or `echo 1 > .../abort`), with whatever
    /// handles are still open, then waits until the daemon has shut down
    /// and released the store.
    pub fn abort_connection(&mut self) {
        let dev = fs::metadata(&self.mnt).expect("stat of the mount").dev();
        let conn = libc::minor(dev);
        let ctl = Path::new("/sys/fs/fuse/connections");
        if !ctl.join(conn.to_string()).exists() {
            // fusectl is not always mounted; it may already be (EBUSY).
            let _ = Command::new("mount")
                .args(["-t", "fusectl", "fusectl"])
                .arg(ctl)
                .status();
        }
        fs::write(format!("/sys/fs/fuse/connections/{conn}/abort"), "1")
            .expect("aborting the FUSE connection");
        self.detach();
        self.wait_store_unlocked(Duration::from_secs(120));
    }

    /// Detaches a mount whose daemon is gone.
    fn detach(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.mnt)
            .status();
        self.mounted = false;
    }

    /// Waits until nobody holds the store's lock. The leader of a killed
    /// daemon reads as a zombie while its other threads are still
    /// finishing a system call, and those keep the lock (and every other
    /// open file) until they are gone; a remount in that window failed
    /// with "store in use".
    pub fn wait_store_unlocked(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            let free = match fs::File::open(self.store.join("lock")) {
                Ok(f) => match f.try_lock() {
                    Ok(()) => {
                        let _ = f.unlock();
                        true
                    }
                    Err(_) => false,
                },
                Err(_) => true,
            };
            if free {
                return;
            }
            if start.elapsed() > limit {
                panic!(
                    "the store stayed locked {limit:?} after the daemon was killed\n/proc/locks:\n{}",
                    fs::read_to_string("/proc/locks").unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `dedupfs fsck --json` on the unmounted store: (clean, report).
    pub fn fsck(&self) -> (bool, String) {
        assert!(!self.mounted, "fsck needs the store unmounted");
        let out = Command::new(BIN)
            .arg("fsck")
            .arg(&self.store)
            .arg("--json")
            .output()
            .expect("running fsck");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        match out.status.code() {
            Some(0) => (true, report),
            Some(1) => (false, report),
            c => panic!("fsck could not run ({c:?}): {report}"),
        }
    }

    pub fn assert_fsck_clean(&self) {
        let (clean, report) = self.fsck();
        assert!(clean, "fsck found problems: {report}\n{}", self.log());
    }

    /// `dedupfs stats --json` on the unmounted store.
    pub fn stats(&self) -> serde_json::Value {
        assert!(!self.mounted, "stats needs the store unmounted");
        self.stats_any()
    }

    /// One figure of `dedupfs stats --json` on the mounted store (asked
    /// through its control socket).
    pub fn live_stat(&self, key: &str) -> u64 {
        assert!(self.mounted, "live_stat needs the store mounted");
        self.stats_any()[key]
            .as_u64()
            .unwrap_or_else(|| panic!("stats has no {key}"))
    }

    fn stats_any(&self) -> serde_json::Value {
        let out = Command::new(BIN)
            .arg("stats")
            .arg(&self.store)
            .arg("--json")
            .output()
            .expect("running stats");
        assert!(
            out.status.success(),
            "stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("stats json")
    }

    pub fn stat_u64(&self, key: &str) -> u64 {
        self.stats()[key]
            .as_u64()
            .unwrap_or_else(|| panic!("stats has no {key}"))
    }

    /// The daemon's log (for failure messages).
    pub fn log(&self) -> String {
        let s = fs::read_to_string(self.store.join("dedupfs.log")).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!("--- dedupfs.log (tail) ---\n{}", lines[from..].join("\n"))
    }
}

impl Drop for TestFs {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("DEDUPFS_KEEP").is_some() {
            // Keep the store for a post-mortem (the mount still goes).
            if let Some(d) = self._dir.take() {
                eprintln!("keeping {}", d.keep().display());
            }
        }
        if let Some(pid) = self.daemon_pid() {
            if self.mounted && !std::thread::panicking() {
                // Normal end of a test that left its mount up: still unmount.
                eprintln!("note: test left {} mounted", self.mnt.display());
            }
            // SAFETY: plain kill(2) on the daemon of our own store.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait_gone(pid, Duration::from_secs(30));
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.mnt)
                .status();
        }
    }
}

fn is_zombie(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

fn wait_gone(pid: i32, limit: Duration) {
    let start = Instant::now();
    while !is_zombie(pid) {
        if start.elapsed() > limit {
            eprintln!("process {pid} did not exit");
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn is_mounted(p: &Path) -> bool {
    let Ok(target) = fs::canonicalize(p) else {
        // A dead FUSE mount fails stat with ENOTCONN: still mounted.
        return true;
    };
    let want = target.to_string_lossy().replace(' ', "\\040");
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
}

// ------------------------------------------------------------------ rng

/// xorshift64*: small, seeded, reproducible.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// A seed from DEDUPFS_SEED, or `default`.
pub fn seed(default: u64) -> u64 {
    std::env::var("DEDUPFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

// ------------------------------------------------------------------ trees

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink(Vec<u8>),
    Fifo,
    Other,
}

/// What a comparison looks at for one name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    pub size: u64,
    pub nlink: u64,
    pub mode: u32,
    pub content: Option<Vec<u8>>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Every name under `root` (relative, as bytes) with what it holds.
pub fn snapshot_tree(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<Vec<u8>, Node>) {
    let mut names: Vec<OsString> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| e.expect("readdir entry").file_name())
        .collect();
    names.sort();
    for name in names {
        let p = dir.join(&name);
        let rel = p
            .strip_prefix(root)
            .expect("under root")
            .as_os_str()
            .as_bytes()
            .to_vec();
        let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        let ft = md.file_type();
        let kind = if ft.is_file() {
            Kind::File
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink(
                fs::read_link(&p)
                    .expect("readlink")
                    .into_os_string()
                    .into_vec(),
            )
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            Kind::Other
        };
        let content = (kind == Kind::File)
            .then(|| fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())));
        let xattrs = if matches!(kind, Kind::File | Kind::Dir) {
            user_xattrs(&p)
        } else {
            BTreeMap::new()
        };
        out.insert(
            rel,
            Node {
                size: if kind == Kind::Dir { 0 } else { md.len() },
                nlink: md.nlink(),
                mode: md.mode() & 0o7777,
                kind: kind.clone(),
                content,
                xattrs,
            },
        );
        if kind == Kind::Dir {
            walk(root, &p, out);
        }
    }
}

pub fn user_xattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let names = sys::listxattr(p).unwrap_or_else(|e| panic!("listxattr {}: {e}", p.display()));
    names
        .into_iter()
        .filter(|n| n.starts_with(b"user."))
        .map(|n| {
            let v = sys::getxattr(p, &n).unwrap_or_else(|e| {
                panic!(
                    "getxattr {} {}: {e}",
                    p.display(),
                    String::from_utf8_lossy(&n)
                )
            });
            (n, v)
        })
        .collect()
}

/// Panics with the first differences between two trees.
pub fn assert_same_tree(
    got: &BTreeMap<Vec<u8>, Node>,
    want: &BTreeMap<Vec<u8>, Node>,
    context: &str,
) {
    let mut diffs = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            None => diffs.push(format!("missing {}", String::from_utf8_lossy(k))),
            Some(g) if g != w => diffs.push(format!(
                "{}: got {} want {}",
                String::from_utf8_lossy(k),
                describe(g),
                describe(w)
            )),
            Some(_) => {}
        }
    }
    for k in got.keys() {
        if !want.contains_key(k) {
            diffs.push(format!("unexpected {}", String::from_utf8_lossy(k)));
        }
    }
    if !diffs.is_empty() {
        diffs.truncate(20);
        panic!("trees differ ({context}):\n  {}", diffs.join("\n  "));
    }
}

fn describe(n: &Node) -> String {
    let content = match &n.content {
        None => String::new(),
        Some(c) => {
            let nz = c.iter().filter(|b| **b != 0).count();
            format!(
                " content[{} bytes, {nz} nonzero, fnv {:016x}]",
                c.len(),
                fnv(c)
            )
        }
    };
    format!(
        "{:?} size {} nlink {} mode {:o}{content} xattrs {:?}",
        match &n.kind {
            Kind::Symlink(t) => format!("Symlink({})", String::from_utf8_lossy(t)),
            k => format!("{k:?}"),
        },
        n.size,
        n.nlink,
        n.mode,
        n.xattrs
            .iter()
            .map(|(k, v)| format!("{}={}B", String::from_utf8_lossy(k), v.len()))
            .collect::<Vec<_>>()
    )
}

pub fn fnv(b: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for x in b {
        h = (h ^ *x as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// The first offset where two byte strings differ, for messages.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then_some(a.len().min(b.len())))
}

#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        panic!(
            "{what}: contents differ: got {} bytes, want {}, first difference at {:?}",
            got.len(),
            want.len(),
            first_diff(got, want)
        );
    }
}

// ------------------------------------------------------------------ sys

/// The syscalls std does not wrap, returning errno on failure.
pub mod sys {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    pub type R<T> = Result<T, i32>;

    fn cpath(p: &Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
    }

    fn last() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    fn check(r: libc::c_int) -> R<()> {
        if r < 0 { Err(last()) } else { Ok(()) }
    }

    pub fn renameat2(from: &Path, to: &Path, flags: u32) -> R<()> {
        let (a, b) = (cpath(from), cpath(to));
        // SAFETY: both are valid NUL-terminated strings for the call.
        check(unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                flags,
            )
        })
    }

    pub fn mknod(p: &Path, mode: u32, dev: u64) -> R<()> {
        let c = cpath(p);
        // SAFETY: valid C string.
        check(unsafe { libc::mknod(c.as_ptr(), mode, dev) })
    }

    /// truncate(2) by path: a SETATTR with no open handle.
    pub fn truncate(p: &Path, len: i64) -> R<()> {
        let c = cpath(p);
        // SAFETY: valid C string.
        check(unsafe { libc::truncate(c.as_ptr(), len) })
    }

    pub fn mkfifo(p: &Path, mode: u32) -> R<()> {
        let c = cpath(p);
        // SAFETY: valid C string.
        check(unsafe { libc::mkfifo(c.as_ptr(), mode) })
    }

    pub fn setxattr(p: &Path, name: &[u8], value: &[u8], flags: i32) -> R<()> {
        let (c, n) = (cpath(p), CString::new(name).expect("name"));
        // SAFETY: valid C strings; value pointer and length describe a slice.
        check(unsafe {
            libc::setxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        })
    }

    pub fn removexattr(p: &Path, name: &[u8]) -> R<()> {
        let (c, n) = (cpath(p), CString::new(name).expect("name"));
        // SAFETY: valid C strings.
        check(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) })
    }

    pub fn getxattr(p: &Path, name: &[u8]) -> R<Vec<u8>> {
        let (c, n) = (cpath(p), CString::new(name).expect("name"));
        loop {
            // SAFETY: a size query with a null buffer.
            let len = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
            if len < 0 {
                return Err(last());
            }
            let mut buf = vec![0u8; len as usize];
            // SAFETY: buf is writable for its length.
            let got = unsafe {
                libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            };
            if got < 0 {
                if last() == libc::ERANGE {
                    continue;
                }
                return Err(last());
            }
            buf.truncate(got as usize);
            return Ok(buf);
        }
    }

    /// getxattr into a buffer of exactly `size` bytes (for ERANGE checks).
    pub fn getxattr_sized(p: &Path, name: &[u8], size: usize) -> R<usize> {
        let (c, n) = (cpath(p), CString::new(name).expect("name"));
        let mut buf = vec![0u8; size.max(1)];
        // SAFETY: buf is writable for `size` bytes.
        let got = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), size) };
        if got < 0 {
            Err(last())
        } else {
            Ok(got as usize)
        }
    }

    pub fn listxattr(p: &Path) -> R<Vec<Vec<u8>>> {
        let c = cpath(p);
        loop {
            // SAFETY: a size query with a null buffer.
            let len = unsafe { libc::listxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
            if len < 0 {
                return Err(last());
            }
            let mut buf = vec![0u8; len as usize];
            // SAFETY: buf is writable for its length.
            let got = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            if got < 0 {
                if last() == libc::ERANGE {
                    continue;
                }
                return Err(last());
            }
            buf.truncate(got as usize);
            let mut names: Vec<Vec<u8>> = buf
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| s.to_vec())
                .collect();
            names.sort();
            return Ok(names);
        }
    }

    /// utimensat on a path (no symlink following) with explicit times.
    pub fn utimens(p: &Path, atime: (i64, i64), mtime: (i64, i64)) -> R<()> {
        let c = cpath(p);
        let ts = [
            libc::timespec {
                tv_sec: atime.0,
                tv_nsec: atime.1,
            },
            libc::timespec {
                tv_sec: mtime.0,
                tv_nsec: mtime.1,
            },
        ];
        // SAFETY: valid C string and a two-element timespec array.
        check(unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                ts.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
    }

    pub fn statvfs(p: &Path) -> R<libc::statvfs> {
        let c = cpath(p);
        // SAFETY: zeroed statvfs is a valid out-parameter.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string and out pointer.
        check(unsafe { libc::statvfs(c.as_ptr(), &mut s) })?;
        Ok(s)
    }

    pub fn fsync_dir(p: &Path) -> R<()> {
        let f = std::fs::File::open(p).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        f.sync_all()
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
    }

    pub fn mount_tmpfs(at: &Path, size: &str) -> R<()> {
        let (src, dst) = (CString::new("tmpfs").unwrap(), cpath(at));
        let data = CString::new(format!("size={size}")).unwrap();
        // SAFETY: valid C strings for mount(2).
        check(unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                src.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        })
    }

    pub fn is_root() -> bool {
        // SAFETY: geteuid cannot fail and touches no memory of ours.
        unsafe { libc::geteuid() == 0 }
    }

    pub fn umount_lazy(at: &Path) -> R<()> {
        let c = cpath(at);
        // SAFETY: valid C string.
        check(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) })
    }
}

/// Runs `f` with a fresh `TestFs` when FUSE is available.
pub fn with_fs(f: impl FnOnce(&mut TestFs)) {
    if !fuse_available() {
        return;
    }
    let mut t = TestFs::new();
    f(&mut t);
}

/// A temp dir for a reference tree, beside (not inside) the mount.
pub fn reference_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dedupfs-ref-")
        .tempdir()
        .expect("tempdir")
}

/// A tmpfs mounted on a temp dir (`sys::mount_tmpfs`), unmounted (lazily)
/// on drop.
pub struct Tmpfs(pub PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = sys::umount_lazy(&self.0);
    }
}

/// Writes `data` as a new file in 1 MiB writes and fsyncs it: the first
/// errno on the way (close(2) reports errors too; std ignores them, so
/// the sync stands in for it).
pub fn write_new(p: &Path, data: &[u8]) -> Result<(), i32> {
    use std::io::Write;
    let mut f = res(fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(p))?;
    for piece in data.chunks(1 << 20) {
        res(f.write_all(piece))?;
    }
    res(f.sync_all())?;
    drop(f);
    Ok(())
}

pub fn write_file(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

pub fn read_file(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// The live chunk list of inode `ino`, read from the unmounted store.
pub fn chunks_of(store: &Path, ino: u64) -> Vec<dedupfs::format::ChunkRef> {
    use redb::ReadableDatabase;
    let db = redb::Database::open(store.join(dedupfs::meta::META_FILE)).expect("open meta.redb");
    let rt = db.begin_read().unwrap();
    let t = rt.open_table(dedupfs::meta::CONTENTS).unwrap();
    dedupfs::meta::live_content(&t, ino)
        .unwrap()
        .expect("file has a chunk list")
        .1
}
