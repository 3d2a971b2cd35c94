//! Test 8: 100,000 empty files in one directory. readdir lists every one
//! exactly once, a random sample stats, and the same holds after a
//! remount. Prints how long each phase took (a report, not an assertion).

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::time::Instant;

use crate::harness::*;

const FILES: usize = 100_000;

fn listing(dir: &std::path::Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn check_listing(names: Vec<String>, when: &str) {
    assert_eq!(names.len(), FILES, "{when}: readdir count");
    let set: HashSet<&String> = names.iter().collect();
    assert_eq!(set.len(), FILES, "{when}: readdir listed a name twice");
    for i in (0..FILES).step_by(997) {
        assert!(set.contains(&name(i)), "{when}: {} missing", name(i));
    }
}

fn name(i: usize) -> String {
    format!("file-{i:06}")
}

#[test]
fn hundred_thousand_files_in_one_dir() {
    with_fs(|t| {
        t.mount();
        let dir = t.p("many");
        fs::create_dir(&dir).unwrap();
        let start = Instant::now();
        for i in 0..FILES {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dir.join(name(i)))
                .unwrap_or_else(|e| panic!("creating {}: {e}", name(i)));
        }
        let created = start.elapsed();

        let start = Instant::now();
        check_listing(listing(&dir), "mounted");
        let listed = start.elapsed();

        let mut rng = Rng::new(seed(8));
        let mut inos = Vec::new();
        for _ in 0..500 {
            let i = rng.below(FILES as u64) as usize;
            let m = fs::metadata(dir.join(name(i))).unwrap();
            assert!(m.is_file() && m.len() == 0 && m.nlink() == 1);
            inos.push((i, m.ino()));
        }
        assert_eq!(fs::metadata(&dir).unwrap().nlink(), 2);

        let start = Instant::now();
        t.remount();
        let remounted = start.elapsed();
        let start = Instant::now();
        check_listing(listing(&dir), "after remount");
        let relisted = start.elapsed();
        for (i, ino) in inos {
            assert_eq!(fs::metadata(dir.join(name(i))).unwrap().ino(), ino);
        }
        eprintln!(
            "{FILES} files: create {created:.1?}, readdir {listed:.1?}, \
             umount+mount {remounted:.1?}, readdir after remount {relisted:.1?}"
        );
        t.umount();
        t.assert_fsck_clean();
    });
}

/// A listing read in many pieces while other names come and go: each name
/// that exists throughout is listed exactly once. The churned names sort
/// before the stable ones, so a listing whose offsets were plain positions
/// in a fresh listing each time would repeat or skip stable names.
#[test]
fn listing_read_while_the_directory_changes() {
    with_fs(|t| {
        t.mount();
        let dir = t.p("churn");
        fs::create_dir(&dir).unwrap();
        const STABLE: usize = 3000;
        for i in 0..STABLE {
            fs::write(dir.join(format!("s-{i:05}")), b"").unwrap();
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let (dir, stop) = (dir.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let p = dir.join(format!("a-{:05}", n % 500));
                    if n % 1000 < 500 {
                        fs::write(&p, b"").unwrap();
                    } else {
                        fs::remove_file(&p).unwrap();
                    }
                    n += 1;
                }
                n
            })
        };
        for round in 0..30 {
            let mut seen = HashSet::new();
            for name in read_dir_slowly(&dir) {
                assert!(
                    seen.insert(name.clone()),
                    "round {round}: {name} listed twice"
                );
            }
            let stable = seen.iter().filter(|n| n.starts_with("s-")).count();
            assert_eq!(stable, STABLE, "round {round}: stable names listed");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let churned = churn.join().unwrap();
        eprintln!("{churned} creates and unlinks during 30 listings");
        assert!(
            churned > 300,
            "the directory hardly changed ({churned} changes)"
        );
        t.umount();
        t.assert_fsck_clean();
    });
}

/// The names in `dir`, read with getdents64 a few entries at a time with a
/// pause between reads, so the directory changes while it is being read.
fn read_dir_slowly(dir: &std::path::Path) -> Vec<String> {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(dir).unwrap();
    let mut buf = vec![0u8; 1024];
    let mut names = Vec::new();
    loop {
        // SAFETY: buf is valid for buf.len() bytes and outlives the call.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                f.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        assert!(n >= 0, "getdents64: {}", std::io::Error::last_os_error());
        if n == 0 {
            return names;
        }
        let mut at = 0usize;
        while at < n as usize {
            // struct linux_dirent64: ino u64, off i64, reclen u16, type u8, name
            let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
            let name = &buf[at + 19..at + reclen];
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            let name = String::from_utf8(name[..end].to_vec()).unwrap();
            if name != "." && name != ".." {
                names.push(name);
            }
            at += reclen;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}
