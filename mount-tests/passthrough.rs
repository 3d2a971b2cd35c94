//! Test 3's write path: files written whole go through kernel FUSE
//! passthrough (the kernel writes the staging file; the daemon never sees
//! the bytes), and the `nopassthrough` mount option falls back to writes
//! through the daemon with the same results. The daemon logs how many
//! handles used passthrough and how many write requests it served itself
//! at unmount; that is what tells the two paths apart here.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};

use crate::harness::*;

/// (passthrough opens, daemon write requests) from the last unmount's log
/// line, or None when the kernel offered no passthrough.
fn counters(t: &TestFs) -> (bool, u64, u64) {
    let log = fs::read_to_string(t.store.join("dedupfs.log")).unwrap_or_default();
    let offered = !log.contains("offers no passthrough");
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("passthrough opens"))
        .unwrap_or_else(|| panic!("no counters in the log\n{}", t.log()));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    // "... passthrough opens N, write requests served by the daemon M (B bytes)"
    let n = nums.len();
    assert!(n >= 3, "unexpected counter line: {line}");
    (offered, nums[n - 3], nums[n - 2])
}

/// Writes, appends, truncates, reads through a second handle and stats
/// files while they are open; returns what each file must hold.
fn workload(t: &TestFs, rng: &mut Rng) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();

    // A big sequential file in 1 MiB writes, then fsync.
    let big = rng.bytes(24 << 20);
    {
        let mut f = File::create(t.p("seq")).unwrap();
        for c in big.chunks(1 << 20) {
            f.write_all(c).unwrap();
        }
        f.sync_all().unwrap();
        assert_eq!(f.metadata().unwrap().len(), big.len() as u64);
    }
    out.push(("seq".to_string(), big));

    // Written while a reader and a second (read-write) handle are open:
    // both see the bytes, stat sees the size, a truncate through setattr
    // and an append land where they should.
    let mut want = rng.bytes(300_000);
    {
        let mut w = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(t.p("open"))
            .unwrap();
        w.write_all(&want).unwrap();
        let r = File::open(t.p("open")).unwrap();
        let mut buf = vec![0u8; want.len()];
        r.read_exact_at(&mut buf, 0).unwrap();
        assert_bytes_eq(&buf, &want, "read through a second handle while written");
        assert_eq!(fs::metadata(t.p("open")).unwrap().len(), want.len() as u64);

        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .open(t.p("open"))
            .unwrap();
        rw.write_all_at(b"through the read-write handle", 1000)
            .unwrap();
        want[1000..1029].copy_from_slice(b"through the read-write handle");
        let mut got = vec![0u8; 29];
        r.read_exact_at(&mut got, 1000).unwrap();
        assert_eq!(&got, b"through the read-write handle");

        w.set_len(200_000).unwrap();
        want.truncate(200_000);
        assert_eq!(fs::metadata(t.p("open")).unwrap().len(), 200_000);
        let mut a = OpenOptions::new().append(true).open(t.p("open")).unwrap();
        a.write_all(b"appended").unwrap();
        want.extend_from_slice(b"appended");
        assert_eq!(fs::metadata(t.p("open")).unwrap().len(), want.len() as u64);
        // A write at the old position of `w` (past the truncation) leaves
        // a hole that reads as zeros.
        w.seek(SeekFrom::Start(250_000)).unwrap();
        w.write_all(b"tail").unwrap();
        want.resize(250_000, 0);
        want.extend_from_slice(b"tail");
        let mut all = Vec::new();
        let mut r2 = File::open(t.p("open")).unwrap();
        std::io::Read::read_to_end(&mut r2, &mut all).unwrap();
        assert_bytes_eq(
            &all,
            &want,
            "after truncate, append and a write past the end",
        );
    }
    out.push(("open".to_string(), want));

    // Small files (inline once committed), rewritten with O_TRUNC.
    for i in 0..20 {
        let name = format!("small{i}");
        let first = rng.bytes(100 + i * 50);
        write_file(&t.p(&name), &first);
        let second = rng.bytes(3000 + i);
        write_file(&t.p(&name), &second);
        out.push((name, second));
    }

    // An mtime set while the file is open for writing sticks.
    {
        let f = File::create(t.p("timed")).unwrap();
        f.write_all_at(b"some bytes", 0).unwrap();
        sys::utimens(&t.p("timed"), (1_000_000, 0), (1_234_567_890, 5)).unwrap();
        let m = fs::metadata(t.p("timed")).unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_234_567_890, 5));
    }
    let m = fs::metadata(t.p("timed")).unwrap();
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_234_567_890, 5));
    out.push(("timed".to_string(), b"some bytes".to_vec()));
    out
}

fn check(t: &TestFs, files: &[(String, Vec<u8>)], what: &str) {
    for (name, want) in files {
        assert_bytes_eq(&read_file(&t.p(name)), want, &format!("{name} {what}"));
    }
}

fn run(options: &[&str]) -> (bool, u64, u64) {
    let mut res = (false, 0, 0);
    with_fs(|t| {
        t.options = options.iter().map(|s| s.to_string()).collect();
        let mut rng = Rng::new(seed(31));
        t.mount();
        let files = workload(t, &mut rng);
        check(t, &files, "while staged");
        t.umount();
        res = counters(t);
        if res.2 > 0 && options.is_empty() {
            eprintln!("{}", t.log());
        }
        t.mount();
        check(t, &files, "after remount (chunked)");
        let m = fs::metadata(t.p("timed")).unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_234_567_890, 5));
        t.umount();
        t.assert_fsck_clean();
    });
    res
}

#[test]
fn passthrough_writes_bypass_the_daemon() {
    if !fuse_available() {
        return;
    }
    let (offered, pt_opens, daemon_writes) = run(&[]);
    if !offered {
        eprintln!("the kernel offers no passthrough: only the fallback ran");
        return;
    }
    assert!(pt_opens > 20, "only {pt_opens} passthrough opens");
    // Only the write through the read-write handle reaches the daemon...
    // which, with a passthrough writer open, must be passthrough too.
    assert_eq!(
        daemon_writes, 0,
        "the daemon served {daemon_writes} write requests"
    );
}

#[test]
fn nopassthrough_option_writes_through_the_daemon() {
    if !fuse_available() {
        return;
    }
    let (_, pt_opens, daemon_writes) = run(&["nopassthrough"]);
    assert_eq!(pt_opens, 0, "passthrough used although turned off");
    assert!(daemon_writes > 24, "only {daemon_writes} daemon writes");
}

/// A passthrough reader keeps the staging file the kernel reads; the file
/// is committed under it and then written again: the reader sees the new
/// bytes, and everything survives a remount.
#[test]
fn reader_open_across_ingest_sees_a_new_writer() {
    with_fs(|t| {
        t.mount();
        let mut rng = Rng::new(seed(32));
        let a = rng.bytes(100_000);
        let w = File::create(t.p("f")).unwrap();
        w.write_all_at(&a, 0).unwrap();
        let r = File::open(t.p("f")).unwrap();
        drop(w);
        // Give ingest time to commit the file under the open reader.
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let mut buf = vec![0u8; a.len()];
        r.read_exact_at(&mut buf, 0).unwrap();
        assert_bytes_eq(&buf, &a, "reader after ingest");
        let b = rng.bytes(120_000);
        {
            let mut w = OpenOptions::new().write(true).open(t.p("f")).unwrap();
            w.write_all(&b).unwrap();
        }
        let mut buf = vec![0u8; b.len()];
        r.read_exact_at(&mut buf, 0).unwrap();
        assert_bytes_eq(&buf, &b, "reader after the second writer");
        drop(r);
        assert_bytes_eq(&read_file(&t.p("f")), &b, "after close");
        t.remount();
        assert_bytes_eq(&read_file(&t.p("f")), &b, "after remount");
        t.umount();
        t.assert_fsck_clean();
    });
}

/// fsync of a passthrough-written file makes its bytes and layout
/// durable: after kill -9 the remounted file holds what was fsynced.
#[test]
fn passthrough_fsync_survives_kill_9() {
    with_fs(|t| {
        t.mount();
        let mut rng = Rng::new(seed(33));
        let a = rng.bytes(5 << 20);
        let small = rng.bytes(2000);
        {
            let mut f = File::create(t.p("big")).unwrap();
            f.write_all(&a).unwrap();
            f.sync_all().unwrap();
            let mut s = File::create(t.p("small")).unwrap();
            s.write_all(&small).unwrap();
            s.sync_all().unwrap();
            sys::fsync_dir(&t.mnt).unwrap();
            // Kill with the writers still open: nothing but fsync (no
            // close, no ingest) made these durable.
            t.crash();
        }
        t.mount();
        assert_bytes_eq(&read_file(&t.p("big")), &a, "big after kill -9");
        assert_bytes_eq(&read_file(&t.p("small")), &small, "small after kill -9");
        t.umount();
        t.assert_fsck_clean();
    });
}

/// The session can end with files still open for writing (a RELEASE the
/// kernel drops with the connection, or an aborted connection): shutdown
/// closes them, so their data is ingested before the daemon exits instead
/// of waiting in staging for the next mount.
#[test]
fn handles_open_when_the_session_ends_are_ingested() {
    with_fs(|t| {
        t.mount();
        let data = Rng::new(seed(21)).bytes(3 << 20);
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(t.p("held"))
            .unwrap();
        f.write_all_at(&data, 0).unwrap();
        f.sync_all().unwrap();
        t.abort_connection();
        drop(f);
        let packed = t.stat_u64("pack_bytes");
        assert!(
            packed >= data.len() as u64,
            "the held file was not ingested at shutdown: {packed} pack bytes\n{}",
            t.log()
        );
        t.mount();
        assert_bytes_eq(&read_file(&t.p("held")), &data, "held file after remount");
        t.umount();
        t.assert_fsck_clean();
    });
}

/// A read-only shared mapping of a file, unmapped on drop.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(f: &File, len: usize) -> Mapping {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh read-only mapping of an open file; nothing else
        // aliases it, and Drop unmaps it once.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Mapping { ptr, len }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes until Drop.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// A process may keep a mapping of a passthrough file after closing it;
/// the mapping is of the staging file itself. Once the file is committed,
/// that staging file must not be emptied and reused for a new file (spare
/// staging files): rust-lld read zeros from objects mapped that way.
#[test]
fn mapped_passthrough_file_keeps_its_bytes_after_ingest() {
    with_fs(|t| {
        t.mount();
        let mut rng = Rng::new(seed(33));
        let a = rng.bytes(50_000);
        let mut w = File::create(t.p("mapped")).unwrap();
        w.write_all(&a).unwrap();
        // Opened while the writer's passthrough handle is open, the
        // reader gets passthrough too.
        let r = File::open(t.p("mapped")).unwrap();
        let map = Mapping::new(&r, a.len());
        drop(r);
        drop(w);
        // Ingest commits the file; then new files made through the daemon
        // (O_EXCL, as tar makes them) would take a spare.
        std::thread::sleep(std::time::Duration::from_millis(1500));
        for i in 0..20 {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(t.p(format!("new{i}")))
                .unwrap();
            f.write_all(&vec![0x5a; a.len()]).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(1500));
        assert_bytes_eq(map.bytes(), &a, "mapping after ingest and new files");
        drop(map);
        assert_bytes_eq(&read_file(&t.p("mapped")), &a, "file after ingest");
        t.umount();
        let (offered, pt_opens, _) = counters(t);
        assert!(
            !offered || pt_opens >= 2,
            "the reader did not use passthrough: {pt_opens} opens"
        );
        t.assert_fsck_clean();
    });
}

/// A rollback under an open passthrough reader: the reader, a new open and
/// a new writer all see the snapshot's bytes, and so does the next mount.
/// Why: every open of a file that passthrough readers hold reads their
/// staging file, which kept the bytes from before the rollback.
#[test]
fn rollback_under_a_passthrough_reader() {
    use crate::snapfault::snapctl_ok;
    with_fs(|t| {
        t.mount();
        let mut rng = Rng::new(seed(34));
        let a = rng.bytes(70_000);
        let b = rng.bytes(90_000);
        fs::write(t.p("f"), &a).unwrap();
        snapctl_ok(t, &["create", "s"]);
        // Empty when opened, so the writer and the reader get passthrough
        // (an O_TRUNC open reaches the daemon as an open and a truncate;
        // a handle's release may come after the next open).
        sys::truncate(&t.p("f"), 0).unwrap();
        let w = OpenOptions::new().write(true).open(t.p("f")).unwrap();
        w.write_all_at(&b, 0).unwrap();
        let r = File::open(t.p("f")).unwrap();
        drop(w);
        snapctl_ok(t, &["rollback", "s"]);
        let mut buf = vec![0u8; a.len()];
        r.read_exact_at(&mut buf, 0).unwrap();
        assert_bytes_eq(&buf, &a, "the open reader after rollback");
        assert_eq!(r.metadata().unwrap().len(), a.len() as u64);
        assert_bytes_eq(&read_file(&t.p("f")), &a, "a new open after rollback");
        {
            // A writer stages into the reader's file again.
            let w = OpenOptions::new().write(true).open(t.p("f")).unwrap();
            w.write_all_at(b"patched", 10).unwrap();
        }
        let mut want = a.clone();
        want[10..17].copy_from_slice(b"patched");
        assert_bytes_eq(&read_file(&t.p("f")), &want, "after a writer");
        drop(r);
        t.remount();
        let (offered, pt_opens, _) = counters(t);
        assert!(
            !offered || pt_opens >= 4,
            "the writer and reader did not use passthrough: {pt_opens} opens"
        );
        assert_bytes_eq(&read_file(&t.p("f")), &want, "after remount");
        t.umount();
        t.assert_fsck_clean();
    });
}

/// open(O_TRUNC) of an existing file empties it in the open itself
/// (FUSE_ATOMIC_O_TRUNC), so the writes that follow take passthrough.
/// What the truncate used to bring stays: the times move (also for a file
/// empty already), O_RDONLY|O_TRUNC truncates too, and a caller without
/// privilege loses set-user-id and set-group-id.
#[test]
fn open_with_o_trunc_truncates_in_the_open() {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    use std::time::Duration;
    with_fs(|t| {
        // The unprivileged caller below must reach the mount.
        t.options.push("allow_other".into());
        let top = t.mnt.parent().unwrap().to_path_buf();
        fs::set_permissions(&top, fs::Permissions::from_mode(0o755)).unwrap();
        t.mount();
        fs::set_permissions(&t.mnt, fs::Permissions::from_mode(0o755)).unwrap();
        let mut rng = Rng::new(seed(35));
        let a = rng.bytes(300_000);
        let b = rng.bytes(50_000);
        for n in ["f", "g", "e", "s", "r", "m"] {
            fs::write(t.p(n), if n == "e" { &[][..] } else { &a[..] }).unwrap();
        }
        for n in ["s", "r"] {
            fs::set_permissions(t.p(n), fs::Permissions::from_mode(0o6777)).unwrap();
        }
        // Committed and chunked: only a truncate makes them empty.
        t.remount();
        let mnt = t.mnt.clone();
        let mtime = |n: &str| fs::metadata(mnt.join(n)).unwrap().modified().unwrap();
        let before: Vec<_> = ["f", "g", "e"].iter().map(|n| mtime(n)).collect();
        std::thread::sleep(Duration::from_millis(20));
        {
            let mut w = OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(t.p("f"))
                .unwrap();
            assert_eq!(w.metadata().unwrap().len(), 0, "f right after open");
            w.write_all(&b).unwrap();
        }
        assert_bytes_eq(&read_file(&t.p("f")), &b, "f rewritten");
        let r = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_TRUNC)
            .open(t.p("g"))
            .unwrap();
        assert_eq!(r.metadata().unwrap().len(), 0, "O_RDONLY|O_TRUNC");
        drop(r);
        // Access mode 3 (read and write checked, neither allowed) too.
        {
            use std::os::unix::ffi::OsStrExt;
            let c = std::ffi::CString::new(t.p("m").as_os_str().as_bytes()).unwrap();
            // SAFETY: a valid C string; the descriptor is closed at once.
            let fd = unsafe { libc::open(c.as_ptr(), 3 | libc::O_TRUNC) };
            assert!(fd >= 0, "open mode 3: {}", std::io::Error::last_os_error());
            // SAFETY: fd is ours.
            unsafe { libc::close(fd) };
        }
        assert_eq!(
            fs::metadata(t.p("m")).unwrap().len(),
            0,
            "mode 3 with O_TRUNC"
        );
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(t.p("e"))
            .unwrap();
        for (n, was) in ["f", "g", "e"].iter().zip(&before) {
            assert!(mtime(n) > *was, "{n}: mtime did not move");
        }
        // Without privilege (as nobody; mode 6777 lets it write).
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(": > \"$0\"")
            .arg(t.p("s"))
            .uid(65534)
            .gid(65534)
            .status()
            .unwrap();
        assert!(st.success(), "sh as nobody: {st}");
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(t.p("r"))
            .unwrap();
        let mode = |n: &str| fs::metadata(mnt.join(n)).unwrap().mode() & 0o7777;
        assert_eq!(
            mode("s"),
            0o777,
            "set-id bits after an unprivileged O_TRUNC"
        );
        assert_eq!(mode("r"), 0o6777, "root keeps the set-id bits");
        t.remount();
        let (offered, _, daemon_writes) = counters(t);
        assert!(
            !offered || daemon_writes == 0,
            "{daemon_writes} writes went through the daemon, not passthrough"
        );
        assert_bytes_eq(&read_file(&t.p("f")), &b, "f after remount");
        for n in ["g", "e", "s", "r", "m"] {
            assert_eq!(fs::metadata(t.p(n)).unwrap().len(), 0, "{n} after remount");
        }
        assert_eq!(
            (mode("s"), mode("r")),
            (0o777, 0o6777),
            "modes after remount"
        );
        t.umount();
        t.assert_fsck_clean();
    });
}
