//! Races between an application and the daemon's own background work
//! (ingest committing a file that was just closed): what the application
//! sees must never go back in time.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::harness::*;

fn drop_caches() {
    // Only root may; the kernel's attribute and page caches go, so the
    // next stat and read ask the daemon.
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

/// fsx with close/reopen (`-c`): after a close and a reopen the size the
/// kernel reports (and reads) must be the file's, while ingest commits the
/// closed file in the background. Two files are kept busy at once so the
/// daemon commits one while the other is being stat'ed.
#[test]
fn size_after_close_and_reopen_is_current() {
    with_fs(|t| {
        t.mount();
        let mut rng = Rng::new(seed(31));
        let names = ["a", "b"];
        let mut models: Vec<Vec<u8>> = vec![Vec::new(); names.len()];
        for n in names {
            write_file(&t.p(n), b"");
        }
        let start = Instant::now();
        let mut i = 0u64;
        while i < 4000 && start.elapsed() < Duration::from_secs(60) {
            let k = rng.below(names.len() as u64) as usize;
            let p = t.p(names[k]);
            let m = &mut models[k];
            {
                let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
                for _ in 0..1 + rng.below(3) {
                    if rng.chance(20) {
                        let n = rng.below(300_000);
                        f.set_len(n).unwrap();
                        m.resize(n as usize, 0);
                    } else {
                        let off = rng.below(m.len() as u64 + 20_000) as usize;
                        let data = {
                            let n = 1 + rng.below(40_000) as usize;
                            rng.bytes(n)
                        };
                        f.write_all_at(&data, off as u64).unwrap();
                        if m.len() < off + data.len() {
                            m.resize(off + data.len(), 0);
                        }
                        m[off..off + data.len()].copy_from_slice(&data);
                    }
                }
                let got = f.metadata().unwrap().len();
                assert_eq!(
                    got,
                    m.len() as u64,
                    "op {i}: fstat before close\n{}",
                    t.log()
                );
            }
            // Give ingest a moment, sometimes, to land inside our stats.
            if rng.chance(30) {
                std::thread::sleep(Duration::from_micros(rng.below(3000)));
            }
            if i.is_multiple_of(50) {
                drop_caches();
            }
            let got = fs::metadata(&p).unwrap().len();
            assert_eq!(got, m.len() as u64, "op {i}: size after close\n{}", t.log());
            let f = OpenOptions::new().read(true).open(&p).unwrap();
            let got = f.metadata().unwrap().len();
            assert_eq!(
                got,
                m.len() as u64,
                "op {i}: size after reopen\n{}",
                t.log()
            );
            if i.is_multiple_of(25) {
                let mut buf = vec![0u8; m.len() + 10];
                let mut n = 0;
                while n < buf.len() {
                    let r = f.read_at(&mut buf[n..], n as u64).unwrap();
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                assert_bytes_eq(&buf[..n], m, &format!("op {i}: content after reopen"));
            }
            i += 1;
        }
        eprintln!("{i} close/reopen cycles");
        t.umount();
        t.assert_fsck_clean();
    });
}

/// One process rewrites a file in a loop (open write-only, write at the
/// end, close) while two others link it to a fresh name, stat and unlink
/// that name: link must never fail with ENOENT (ext4 and bindfs: never).
fn link_while_rewritten(options: &[&str]) {
    with_fs(|t| {
        t.options = options.iter().map(|s| s.to_string()).collect();
        t.mount();
        let f = t.p("f");
        write_file(&f, b"start\n");
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (f, stop) = (f.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let h = OpenOptions::new().write(true).open(&f).unwrap();
                    let end = h.metadata().unwrap().len();
                    h.write_all_at(b"more bytes\n", end).unwrap();
                    drop(h);
                    n += 1;
                }
                n
            })
        };
        let fails = Arc::new(AtomicU64::new(0));
        let linkers: Vec<_> = (0..2)
            .map(|k| {
                let (dir, f, fails) = (t.mnt.clone(), f.clone(), fails.clone());
                std::thread::spawn(move || {
                    let mut calls = 0u64;
                    let mut first = None;
                    for j in 0..3000 {
                        let name = dir.join(format!("l{k}_{j}"));
                        calls += 1;
                        match fs::hard_link(&f, &name) {
                            Ok(()) => {
                                let m = fs::metadata(&name).unwrap();
                                assert!(m.nlink() >= 2, "nlink {} after link", m.nlink());
                                fs::remove_file(&name).unwrap();
                            }
                            Err(e) => {
                                fails.fetch_add(1, Ordering::Relaxed);
                                first.get_or_insert(format!("link {j}: {e}"));
                            }
                        }
                    }
                    (calls, first)
                })
            })
            .collect();
        let mut calls = 0;
        let mut first = Vec::new();
        for l in linkers {
            let (c, f) = l.join().unwrap();
            calls += c;
            first.extend(f);
        }
        stop.store(true, Ordering::Relaxed);
        let rewrites = writer.join().unwrap();
        let fails = fails.load(Ordering::Relaxed);
        eprintln!("{calls} links, {rewrites} rewrites, {fails} failed");
        assert_eq!(fails, 0, "links failed: {first:?}\n{}", t.log());
        t.umount();
        t.assert_fsck_clean();
    });
}

#[test]
fn link_while_rewritten_through_passthrough() {
    link_while_rewritten(&[]);
}

#[test]
fn link_while_rewritten_through_the_daemon() {
    link_while_rewritten(&["nopassthrough"]);
}

/// renameat2(RENAME_WHITEOUT), as overlayfs asks of its upper directory:
/// the source name becomes a 0/0 character device, as on ext4.
#[test]
fn rename_whiteout_leaves_a_whiteout() {
    use std::os::unix::fs::FileTypeExt;
    with_fs(|t| {
        t.mount();
        write_file(&t.p("a"), b"moved");
        sys::renameat2(&t.p("a"), &t.p("b"), libc::RENAME_WHITEOUT)
            .unwrap_or_else(|e| panic!("RENAME_WHITEOUT: errno {e}"));
        let check = |t: &TestFs, when: &str| {
            assert_eq!(read_file(&t.p("b")), b"moved", "{when}");
            let m = fs::symlink_metadata(t.p("a")).unwrap();
            assert!(m.file_type().is_char_device(), "{when}: {m:?}");
            assert_eq!(m.rdev(), 0, "{when}");
        };
        check(t, "live");
        assert_eq!(
            sys::renameat2(
                &t.p("b"),
                &t.p("c"),
                libc::RENAME_WHITEOUT | libc::RENAME_EXCHANGE
            ),
            Err(libc::EINVAL)
        );
        t.remount();
        check(t, "after a remount");
        t.umount();
        t.assert_fsck_clean();
    });
}

/// A copy shares its source's chunks before its record holds them; the
/// source deleted meanwhile must not let background gc drop them (the
/// copy holds a pin until its ingest or fsync commits the list).
#[test]
fn a_copy_keeps_its_chunks_when_the_source_goes_first() {
    use std::os::unix::io::AsRawFd;
    with_fs(|t| {
        let mut rng = Rng::new(seed(33));
        let data = rng.bytes(3 << 20);
        t.mount();
        write_file(&t.p("a"), &data);
        t.remount();
        let src = fs::File::open(t.p("a")).unwrap();
        let dst = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(t.p("b"))
            .unwrap();
        let (mut i, mut o) = (0i64, 0i64);
        while (i as usize) < data.len() {
            // SAFETY: copy_file_range between descriptors we own.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut i,
                    dst.as_raw_fd(),
                    &mut o,
                    data.len() - i as usize,
                    0,
                )
            };
            assert!(
                n > 0,
                "copy_file_range: {}",
                std::io::Error::last_os_error()
            );
        }
        drop(src);
        fs::remove_file(t.p("a")).unwrap();
        // The source's pack is now all dead: the reclaimer (every second)
        // would compact or punch it.
        std::thread::sleep(Duration::from_secs(4));
        let mut got = vec![0u8; data.len()];
        dst.read_exact_at(&mut got, 0)
            .unwrap_or_else(|e| panic!("reading the copy: {e}\n{}", t.log()));
        assert_bytes_eq(&got, &data, "the copy, source gone, still open");
        drop(dst);
        t.remount();
        assert_bytes_eq(&read_file(&t.p("b")), &data, "the copy after a remount");
        t.umount();
        t.assert_fsck_clean();
    });
}
