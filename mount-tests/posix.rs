//! Test 1: the POSIX surface, one behaviour at a time, each checked again
//! after a remount (so it holds for the committed state, not only the
//! daemon's memory).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::harness::*;

const ATIME: (i64, i64) = (1_234_567_890, 123_456_789);
const MTIME: (i64, i64) = (1_600_000_000, 987_654_321);

#[test]
fn posix_basics() {
    if !sys::is_root() {
        eprintln!("skipping: needs root (device nodes, chown to other users)");
        return;
    }
    with_fs(|t| {
        t.mount();
        let mut rng = Rng::new(seed(1));

        // ---- files and dirs
        fs::create_dir(t.p("d")).unwrap();
        fs::create_dir(t.p("d/sub")).unwrap();
        let small = b"hello, dedupfs\n".to_vec();
        let big = rng.bytes(300_000);
        write_file(&t.p("d/small"), &small);
        write_file(&t.p("d/big"), &big);
        assert_eq!(read_file(&t.p("d/small")), small);
        assert_bytes_eq(&read_file(&t.p("d/big")), &big, "d/big before close+ingest");
        assert_eq!(
            res(fs::create_dir(t.p("d"))).unwrap_err(),
            libc::EEXIST,
            "mkdir over a dir"
        );
        assert_eq!(res(fs::remove_dir(t.p("d"))).unwrap_err(), libc::ENOTEMPTY);
        assert_eq!(
            res(fs::remove_dir(t.p("d/small"))).unwrap_err(),
            libc::ENOTDIR
        );
        assert_eq!(
            res(fs::remove_file(t.p("d/sub"))).unwrap_err(),
            libc::EISDIR
        );
        assert_eq!(res(fs::read(t.p("nope"))).unwrap_err(), libc::ENOENT);
        assert_eq!(
            fs::metadata(t.p("d")).unwrap().nlink(),
            3,
            "d has one subdir"
        );

        // ---- symlinks
        std::os::unix::fs::symlink("d/small", t.p("sl")).unwrap();
        std::os::unix::fs::symlink("/nowhere/at/all", t.p("dangling")).unwrap();
        assert_eq!(
            fs::read_link(t.p("sl")).unwrap().as_os_str().as_bytes(),
            b"d/small"
        );
        assert!(
            fs::symlink_metadata(t.p("sl"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(read_file(&t.p("sl")), small, "read through a symlink");
        assert_eq!(res(fs::read(t.p("dangling"))).unwrap_err(), libc::ENOENT);

        // ---- hard links share content
        fs::hard_link(t.p("d/small"), t.p("hl")).unwrap();
        assert_eq!(fs::metadata(t.p("hl")).unwrap().nlink(), 2);
        assert_eq!(
            fs::metadata(t.p("hl")).unwrap().ino(),
            fs::metadata(t.p("d/small")).unwrap().ino()
        );
        {
            let f = OpenOptions::new().write(true).open(t.p("hl")).unwrap();
            f.write_all_at(b"HELLO", 0).unwrap();
        }
        let shared = b"HELLO, dedupfs\n".to_vec();
        assert_eq!(
            read_file(&t.p("d/small")),
            shared,
            "write through a hard link"
        );
        // A hard link to a chunked file, written in the middle.
        fs::hard_link(t.p("d/big"), t.p("d/big2")).unwrap();
        let mut big = big;
        {
            let f = OpenOptions::new().write(true).open(t.p("d/big2")).unwrap();
            f.write_all_at(b"through big2", 150_000).unwrap();
        }
        big[150_000..150_012].copy_from_slice(b"through big2");
        assert_bytes_eq(
            &read_file(&t.p("d/big")),
            &big,
            "d/big after write via big2",
        );
        assert_eq!(
            res(fs::hard_link(t.p("d"), t.p("dlink"))).unwrap_err(),
            libc::EPERM
        );

        // ---- fifo and device nodes
        sys::mkfifo(&t.p("fifo"), 0o640).unwrap();
        sys::mknod(&t.p("fifo2"), libc::S_IFIFO | 0o600, 0).unwrap();
        let dev = libc::makedev(4, 64);
        sys::mknod(&t.p("chr"), libc::S_IFCHR | 0o600, dev).unwrap();
        assert!(fs::metadata(t.p("fifo")).unwrap().file_type().is_fifo());
        assert!(fs::metadata(t.p("fifo2")).unwrap().file_type().is_fifo());
        assert_eq!(fs::metadata(t.p("fifo")).unwrap().mode() & 0o7777, 0o640);
        let chr = fs::metadata(t.p("chr")).unwrap();
        assert!(chr.file_type().is_char_device());
        assert_eq!(chr.rdev(), dev);
        // A fifo works as a fifo (the kernel serves it; we only store it).
        {
            let p = t.p("fifo");
            let w = std::thread::spawn(move || {
                let mut f = OpenOptions::new().write(true).open(p).unwrap();
                f.write_all(b"through the pipe").unwrap();
            });
            let mut got = String::new();
            fs::File::open(t.p("fifo"))
                .unwrap()
                .read_to_string(&mut got)
                .unwrap();
            w.join().unwrap();
            assert_eq!(got, "through the pipe");
        }

        // ---- rename
        write_file(&t.p("r1"), b"one");
        write_file(&t.p("r2"), b"two");
        fs::rename(t.p("r1"), t.p("r1b")).unwrap();
        assert_eq!(res(fs::read(t.p("r1"))).unwrap_err(), libc::ENOENT);
        assert_eq!(
            sys::renameat2(&t.p("r1b"), &t.p("r2"), libc::RENAME_NOREPLACE),
            Err(libc::EEXIST)
        );
        assert_eq!(read_file(&t.p("r2")), b"two");
        sys::renameat2(&t.p("r1b"), &t.p("r3"), libc::RENAME_NOREPLACE).unwrap();
        sys::renameat2(&t.p("r3"), &t.p("r2"), libc::RENAME_EXCHANGE).unwrap();
        assert_eq!(read_file(&t.p("r2")), b"one");
        assert_eq!(read_file(&t.p("r3")), b"two");
        assert_eq!(
            sys::renameat2(&t.p("r3"), &t.p("nothere"), libc::RENAME_EXCHANGE),
            Err(libc::ENOENT)
        );
        // Exchange a dir and a file across parents: link counts follow.
        fs::create_dir(t.p("xa")).unwrap();
        fs::create_dir(t.p("xa/inner")).unwrap();
        fs::create_dir(t.p("xb")).unwrap();
        write_file(&t.p("xb/file"), b"file");
        sys::renameat2(&t.p("xa/inner"), &t.p("xb/file"), libc::RENAME_EXCHANGE).unwrap();
        assert!(fs::metadata(t.p("xb/file")).unwrap().is_dir());
        assert_eq!(read_file(&t.p("xa/inner")), b"file");
        assert_eq!(fs::metadata(t.p("xa")).unwrap().nlink(), 2);
        assert_eq!(fs::metadata(t.p("xb")).unwrap().nlink(), 3);
        // Replace an existing file; move a dir into another.
        fs::rename(t.p("r3"), t.p("r2")).unwrap();
        assert_eq!(read_file(&t.p("r2")), b"two");
        fs::rename(t.p("xb/file"), t.p("d/moved")).unwrap();
        assert_eq!(fs::metadata(t.p("xb")).unwrap().nlink(), 2);
        assert_eq!(fs::metadata(t.p("d")).unwrap().nlink(), 4);
        assert_eq!(
            res(fs::rename(t.p("d"), t.p("d/sub/inside"))).unwrap_err(),
            libc::EINVAL
        );
        assert_eq!(
            res(fs::rename(t.p("xa"), t.p("d"))).unwrap_err(),
            libc::ENOTEMPTY
        );

        // ---- chmod / chown / utimensat
        write_file(&t.p("attrs"), b"attrs");
        fs::set_permissions(t.p("attrs"), fs::Permissions::from_mode(0o4751)).unwrap();
        std::os::unix::fs::chown(t.p("attrs"), Some(1234), Some(5678)).unwrap();
        sys::utimens(&t.p("attrs"), ATIME, MTIME).unwrap();
        // Times set while the file is open for writing, after the last
        // write, must survive the close and ingest.
        let open_w = OpenOptions::new().write(true).open(t.p("d/big")).unwrap();
        open_w.write_all_at(b"late", 10).unwrap();
        big[10..14].copy_from_slice(b"late");
        sys::utimens(&t.p("d/big"), ATIME, MTIME).unwrap();
        drop(open_w);
        std::os::unix::fs::symlink("x", t.p("timed_link")).unwrap();
        sys::utimens(&t.p("timed_link"), ATIME, MTIME).unwrap();
        fs::create_dir(t.p("timed_dir")).unwrap();
        sys::utimens(&t.p("timed_dir"), ATIME, MTIME).unwrap();
        let mnt = t.mnt.clone();
        let check_attrs = |when: &str| {
            let m = fs::metadata(mnt.join("attrs")).unwrap();
            // chown by root clears set-user-id on a file.
            assert_eq!(m.mode() & 0o7777, 0o751, "{when}: mode after chown");
            assert_eq!((m.uid(), m.gid()), (1234, 5678), "{when}: owner");
            for p in ["attrs", "d/big", "timed_link", "timed_dir"] {
                let m = fs::symlink_metadata(mnt.join(p)).unwrap();
                assert_eq!(
                    (m.atime(), m.atime_nsec()),
                    ATIME,
                    "{when}: atime of {p} (ns)"
                );
                assert_eq!(
                    (m.mtime(), m.mtime_nsec()),
                    MTIME,
                    "{when}: mtime of {p} (ns)"
                );
            }
        };
        check_attrs("mounted");
        fs::set_permissions(t.p("d/small"), fs::Permissions::from_mode(0o600)).unwrap();

        // ---- truncate up and down, small and chunked
        let mut tr = rng.bytes(10_000);
        write_file(&t.p("tr"), &tr);
        truncate(&t.p("tr"), 3000);
        tr.truncate(3000);
        assert_bytes_eq(&read_file(&t.p("tr")), &tr, "tr down");
        truncate(&t.p("tr"), 20_000);
        tr.resize(20_000, 0);
        assert_bytes_eq(&read_file(&t.p("tr")), &tr, "tr up");

        // ---- O_APPEND and O_EXCL
        write_file(&t.p("app"), b"start:");
        for piece in [&b"abc"[..], b"def"] {
            let mut f = OpenOptions::new().append(true).open(t.p("app")).unwrap();
            f.write_all(piece).unwrap();
        }
        {
            // Appending ignores the file position.
            let mut f = OpenOptions::new()
                .read(true)
                .append(true)
                .open(t.p("app"))
                .unwrap();
            f.seek(SeekFrom::Start(0)).unwrap();
            f.write_all(b"!").unwrap();
        }
        assert_eq!(read_file(&t.p("app")), b"start:abcdef!");
        assert_eq!(
            res(OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(t.p("app")))
            .unwrap_err(),
            libc::EEXIST
        );
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(t.p("excl"))
            .unwrap();

        // ---- xattrs
        let x = t.p("d/small");
        sys::setxattr(&x, b"user.one", b"1", 0).unwrap();
        sys::setxattr(&x, b"user.two", &[0u8, 1, 2, 255], 0).unwrap();
        sys::setxattr(&x, b"user.empty", b"", 0).unwrap();
        assert_eq!(
            sys::setxattr(&x, b"user.one", b"x", libc::XATTR_CREATE),
            Err(libc::EEXIST)
        );
        assert_eq!(
            sys::setxattr(&x, b"user.none", b"x", libc::XATTR_REPLACE),
            Err(libc::ENODATA)
        );
        sys::setxattr(&x, b"user.one", b"uno", libc::XATTR_REPLACE).unwrap();
        sys::setxattr(&x, b"user.three", b"3", libc::XATTR_CREATE).unwrap();
        sys::removexattr(&x, b"user.three").unwrap();
        assert_eq!(sys::removexattr(&x, b"user.three"), Err(libc::ENODATA));
        assert_eq!(sys::getxattr(&x, b"user.three"), Err(libc::ENODATA));
        assert_eq!(sys::getxattr_sized(&x, b"user.one", 1), Err(libc::ERANGE));
        sys::setxattr(&t.p("d"), b"user.dir", b"on a dir", 0).unwrap();
        let want_x: BTreeMap<Vec<u8>, Vec<u8>> = [
            (b"user.empty".to_vec(), b"".to_vec()),
            (b"user.one".to_vec(), b"uno".to_vec()),
            (b"user.two".to_vec(), vec![0, 1, 2, 255]),
        ]
        .into_iter()
        .collect();
        assert_eq!(user_xattrs(&x), want_x);
        assert_eq!(user_xattrs(&t.p("hl")), want_x, "xattrs are per inode");

        // ---- statfs
        let s = sys::statvfs(&t.mnt).unwrap();
        assert!(s.f_bsize > 0 && s.f_blocks > 0, "statfs: {}", s.f_blocks);
        assert_eq!(s.f_namemax, 255);

        // ---- names
        let n255 = "n".repeat(255);
        let n256 = "n".repeat(256);
        write_file(&t.p(&n255), b"long");
        assert_eq!(
            res(fs::write(t.p(&n256), b"x")).unwrap_err(),
            libc::ENAMETOOLONG
        );
        assert_eq!(
            res(fs::create_dir(t.p(&n256))).unwrap_err(),
            libc::ENAMETOOLONG
        );
        assert_eq!(
            res(fs::metadata(t.p(&n256))).unwrap_err(),
            libc::ENAMETOOLONG
        );
        let odd: Vec<&[u8]> = vec![b"bad\xff\xfeutf8", b"new\nline", b"\n", b"tab\tand space "];
        for (i, n) in odd.iter().enumerate() {
            write_file(&t.p(OsStr::from_bytes(n)), format!("odd {i}").as_bytes());
        }

        // ---- everything again after a remount
        let inos: Vec<(String, u64)> = [
            "d",
            "d/sub",
            "d/small",
            "d/big",
            "hl",
            "sl",
            "fifo",
            "chr",
            "r2",
            "xa/inner",
            "tr",
            n255.as_str(),
        ]
        .iter()
        .map(|p| (p.to_string(), fs::symlink_metadata(t.p(p)).unwrap().ino()))
        .collect();
        let before = snapshot_tree(&t.mnt);
        t.remount();
        let after = snapshot_tree(&t.mnt);
        assert_same_tree(&after, &before, "after remount");
        for (p, ino) in &inos {
            assert_eq!(
                fs::symlink_metadata(t.p(p)).unwrap().ino(),
                *ino,
                "inode of {p} after remount"
            );
        }
        check_attrs("after remount");
        assert_bytes_eq(&read_file(&t.p("d/big")), &big, "d/big after remount");
        assert_bytes_eq(&read_file(&t.p("tr")), &tr, "tr after remount");
        assert_eq!(read_file(&t.p("hl")), shared);
        assert_eq!(user_xattrs(&x), want_x, "xattrs after remount");
        assert_eq!(fs::metadata(t.p("d/small")).unwrap().mode() & 0o7777, 0o600);
        for (i, n) in odd.iter().enumerate() {
            assert_eq!(
                read_file(&t.p(OsStr::from_bytes(n))),
                format!("odd {i}").as_bytes()
            );
        }
        let names: Vec<Vec<u8>> = fs::read_dir(&t.mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name().as_bytes().to_vec())
            .collect();
        for n in &odd {
            assert!(names.contains(&n.to_vec()), "readdir lists {n:?}");
        }

        // ---- changes to committed (chunked / inline) content
        truncate(&t.p("d/big"), 100_000);
        big.truncate(100_000);
        truncate(&t.p("d/big"), 180_000);
        big.resize(180_000, 0);
        assert_bytes_eq(
            &read_file(&t.p("d/big")),
            &big,
            "chunked file cut and grown",
        );
        {
            let mut f = OpenOptions::new().append(true).open(t.p("d/big")).unwrap();
            f.write_all(b"appended").unwrap();
        }
        big.extend_from_slice(b"appended");
        {
            let mut f = OpenOptions::new().append(true).open(t.p("app")).unwrap();
            f.write_all(b"+more").unwrap();
        }
        // Unlink a file while it is open: it lives on until closed.
        let held = OpenOptions::new()
            .read(true)
            .write(true)
            .open(t.p("tr"))
            .unwrap();
        fs::remove_file(t.p("tr")).unwrap();
        held.write_all_at(b"after unlink", 0).unwrap();
        let mut buf = vec![0u8; 12];
        held.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"after unlink");
        drop(held);
        assert_eq!(res(fs::metadata(t.p("tr"))).unwrap_err(), libc::ENOENT);
        // Replace a file by rename over it, then remove the rest.
        fs::rename(t.p("r2"), t.p("d/small")).unwrap();
        assert_eq!(fs::metadata(t.p("hl")).unwrap().nlink(), 1);

        let before = snapshot_tree(&t.mnt);
        t.remount();
        assert_same_tree(&snapshot_tree(&t.mnt), &before, "after second remount");
        assert_bytes_eq(
            &read_file(&t.p("d/big")),
            &big,
            "d/big after second remount",
        );
        assert_eq!(read_file(&t.p("app")), b"start:abcdef!+more");
        assert_eq!(read_file(&t.p("d/small")), b"two");
        assert_eq!(read_file(&t.p("hl")), shared);
        t.umount();
        t.assert_fsck_clean();
    });
}

/// A file past 4 GiB written sparsely: 1 MiB at 5 GiB, zeros before it.
/// Reads only samples of the hole, so the cost is the ingest of 5 GiB of
/// zeros (one chunk, deduplicated) at the remount.
#[test]
fn sparse_file_past_4_gib() {
    with_fs(|t| {
        t.mount();
        let mut rng = Rng::new(seed(2));
        let mnt = t.mnt.clone();
        // ---- a sparse file past 4 GiB
        let far = 5u64 << 30;
        let tail = rng.bytes(1 << 20);
        {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(t.p("sparse"))
                .unwrap();
            f.write_all_at(&tail, far).unwrap();
        }
        let check_sparse = |when: &str| {
            let f = fs::File::open(mnt.join("sparse")).unwrap();
            assert_eq!(f.metadata().unwrap().len(), far + tail.len() as u64);
            let mut buf = vec![0u8; 1 << 20];
            f.read_exact_at(&mut buf, far).unwrap();
            assert_bytes_eq(&buf, &tail, &format!("{when}: sparse tail"));
            for off in [0, 4 << 30, far - 4096] {
                let mut z = vec![1u8; 4096];
                f.read_exact_at(&mut z, off).unwrap();
                assert!(
                    z.iter().all(|b| *b == 0),
                    "{when}: hole at {off} is not zeros"
                );
            }
            // The 4096 bytes straddling the start of the data.
            let mut edge = vec![1u8; 4096];
            f.read_exact_at(&mut edge, far - 2048).unwrap();
            assert!(edge[..2048].iter().all(|b| *b == 0));
            assert_eq!(&edge[2048..], &tail[..2048]);
        };
        check_sparse("staged");

        t.remount();
        check_sparse("after remount");
        t.umount();
        t.assert_fsck_clean();
    });
}

fn truncate(p: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
        .set_len(len)
        .unwrap_or_else(|e| panic!("truncate {}: {e}", p.display()));
}

/// Permission bits survive a create with an explicit mode and umask 0.
#[test]
fn create_mode_and_read_only_mount() {
    with_fs(|t| {
        t.mount();
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o640)
            .open(t.p("m"))
            .unwrap()
            .write_all(b"mode")
            .unwrap();
        assert_eq!(fs::metadata(t.p("m")).unwrap().mode() & 0o777, 0o640);
        t.umount();
        t.options = vec!["ro".into()];
        t.mount();
        assert_eq!(read_file(&t.p("m")), b"mode");
        assert_eq!(res(fs::write(t.p("n"), b"x")).unwrap_err(), libc::EROFS);
        assert_eq!(
            res(OpenOptions::new().write(true).open(t.p("m"))).unwrap_err(),
            libc::EROFS
        );
        t.umount();
        t.assert_fsck_clean();
    });
}

/// Changes right after a close race the ingest of that close. Each must
/// land: a write through a new handle (it used to fail with EBADF when
/// ingest dropped the staged state between open and write), a truncate
/// by path, and an explicit mtime (both used to be lost the same way).
/// Four threads, so some change lands inside an ingest commit.
#[test]
fn changes_racing_ingest_all_land() {
    with_fs(|t| {
        t.mount();
        let base = seed(9);
        let want: Vec<(PathBuf, Vec<u8>, u64)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4u64)
                .map(|k| {
                    let mnt = t.mnt.clone();
                    s.spawn(move || {
                        let mut rng = Rng::new(base + k);
                        let mut want = Vec::new();
                        for i in 0..150u64 {
                            let p = mnt.join(format!("race{k}_{i}"));
                            let len = 5_000 + rng.below(45_000) as usize;
                            let mut data = rng.bytes(len);
                            write_file(&p, &data);
                            // Land somewhere inside the ingest of that close.
                            let pause = rng.below(4000);
                            std::thread::sleep(std::time::Duration::from_micros(pause));
                            match i % 3 {
                                0 => {
                                    let f = OpenOptions::new().write(true).open(&p).unwrap();
                                    f.write_all_at(b"second", 100).unwrap_or_else(|e| {
                                        panic!("write after reopen of {}: {e}", p.display())
                                    });
                                    data[100..106].copy_from_slice(b"second");
                                }
                                1 => {
                                    let n = rng.below(data.len() as u64 + 5000);
                                    fs::OpenOptions::new()
                                        .write(true)
                                        .open(&p)
                                        .unwrap()
                                        .set_len(n)
                                        .unwrap();
                                    data.resize(n as usize, 0);
                                }
                                _ => {
                                    sys::utimens(&p, ATIME, (MTIME.0 + i as i64, MTIME.1)).unwrap()
                                }
                            }
                            want.push((p, data, i));
                        }
                        want
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let check = |when: &str| {
            for (p, data, i) in &want {
                let what = format!("{when}: {}", p.display());
                assert_bytes_eq(&read_file(p), data, &what);
                if i % 3 == 2 {
                    let m = fs::metadata(p).unwrap();
                    assert_eq!(
                        (m.mtime(), m.mtime_nsec()),
                        (MTIME.0 + *i as i64, MTIME.1),
                        "{what}: mtime"
                    );
                }
            }
        };
        check("mounted");
        t.remount();
        check("after remount");
        t.umount();
        t.assert_fsck_clean();
    });
}

/// Polls `live_stat` until it equals `want` (reaping is asynchronous).
fn wait_live_stat(t: &TestFs, key: &str, want: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let v = t.live_stat(key);
        if v == want || std::time::Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A file unlinked while open keeps its bytes for its open handles, and its
/// chunks go at the last close while the store stays mounted. Closes ask
/// for a reap only while an orphan may be left (`orphan_seq` in the
/// volume); this checks that an orphan made after a reap found none is
/// still reaped at its close, and again after a second such round.
#[test]
fn unlinked_open_file_is_reaped_at_last_close() {
    with_fs(|t| {
        t.mount();
        let mut rng = Rng::new(seed(7));
        // A plain file made and closed first: the reaps so far found no
        // orphan, so closes have stopped asking for one.
        fs::write(t.p("keep"), rng.bytes(100_000)).unwrap();
        assert_eq!(wait_live_stat(t, "referenced_bytes", 100_000), 100_000);
        for round in 0..2 {
            let data = rng.bytes(300_000);
            fs::write(t.p("doomed"), &data).unwrap();
            assert_eq!(
                wait_live_stat(t, "referenced_bytes", 400_000),
                400_000,
                "round {round}"
            );
            let mut f = fs::File::open(t.p("doomed")).unwrap();
            fs::remove_file(t.p("doomed")).unwrap();
            // Held while open: the unlink's reap found it open.
            std::thread::sleep(std::time::Duration::from_millis(300));
            assert_eq!(t.live_stat("referenced_bytes"), 400_000, "round {round}");
            let mut got = Vec::new();
            f.read_to_end(&mut got).unwrap();
            assert_bytes_eq(&got, &data, "unlinked file through its handle");
            drop(f);
            assert_eq!(
                wait_live_stat(t, "referenced_bytes", 100_000),
                100_000,
                "round {round}: the orphan was not reaped at its close\n{}",
                t.log()
            );
        }
        t.umount();
        t.assert_fsck_clean();
    });
}
