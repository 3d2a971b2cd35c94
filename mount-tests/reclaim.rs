//! Space comes back without the user doing anything: on a store filled to
//! ENOSPC, deleting files makes room for as much new data within a bounded
//! time, with no command run; removals work on the full disk; a snapshot
//! holding the deleted files keeps their space until it is deleted.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

const SNAPCTL: &str = env!("CARGO_BIN_EXE_snapctl");
const FILE: usize = 2 << 20;

/// Writes 2 MiB files of fresh random bytes until the store is full;
/// returns their names and contents.
fn fill_store(t: &TestFs, rng: &mut Rng, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for i in 0.. {
        let name = format!("{prefix}{i:04}");
        let data = rng.bytes(FILE);
        match write_new(&t.p(&name), &data) {
            Ok(()) => files.push((name, data)),
            Err(e) => {
                assert_eq!(e, libc::ENOSPC, "filling: errno {e}\n{}", t.log());
                let _ = fs::remove_file(t.p(&name));
                break;
            }
        }
    }
    // Wait until ingest has taken every closed file into packs, so the
    // staging files are gone and what is full is the packs.
    std::thread::sleep(Duration::from_secs(3));
    files
}

/// Writes `n` new files, retrying ENOSPC until `limit`; returns how long
/// it took for all of them to fit.
fn write_when_room(t: &TestFs, rng: &mut Rng, n: usize, limit: Duration) -> Duration {
    let start = Instant::now();
    for i in 0..n {
        let data = rng.bytes(FILE);
        let p = t.p(format!("new{i:04}"));
        loop {
            match write_new(&p, &data) {
                Ok(()) => break,
                Err(libc::ENOSPC) if start.elapsed() < limit => {
                    let _ = fs::remove_file(&p);
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!(
                    "file {i} of {n}: errno {e} after {:?}\n{}",
                    start.elapsed(),
                    t.log()
                ),
            }
        }
        assert_bytes_eq(&read_file(&p), &data, &format!("new{i:04}"));
    }
    start.elapsed()
}

fn with_small_store(size: &str, f: impl FnOnce(&mut TestFs, &Path)) {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("dedupfs-reclaim-")
        .tempdir()
        .unwrap();
    let tpath = dir.path().join("t");
    fs::create_dir(&tpath).unwrap();
    if let Err(e) = sys::mount_tmpfs(&tpath, size) {
        eprintln!("skipping: cannot mount a tmpfs (errno {e})");
        return;
    }
    let _tmpfs = Tmpfs(tpath.clone());
    let mut t = TestFs::at(tpath.join("store"), dir.path().join("mnt"));
    f(&mut t, &tpath);
}

#[test]
fn deleting_files_gives_their_space_back_without_a_command() {
    with_small_store("300m", |t, _| {
        let mut rng = Rng::new(seed(51));
        t.mount();
        fs::create_dir(t.p("empty")).unwrap();
        let files = fill_store(t, &mut rng, "f");
        fs::remove_dir(t.p("empty"))
            .unwrap_or_else(|e| panic!("rmdir on a full disk: {e}\n{}", t.log()));
        assert!(
            files.len() >= 40,
            "only {} files fit\n{}",
            files.len(),
            t.log()
        );
        // Removals work on the full disk: a quarter of the files, and a
        // rename, and an empty directory made before.
        let mut kept = Vec::new();
        let mut deleted = 0;
        for (i, (name, data)) in files.into_iter().enumerate() {
            if i % 4 == 0 {
                fs::remove_file(t.p(&name))
                    .unwrap_or_else(|e| panic!("unlink on a full disk: {e}\n{}", t.log()));
                deleted += 1;
            } else {
                kept.push((name, data));
            }
        }
        let (n0, d0) = kept.remove(0);
        fs::rename(t.p(&n0), t.p("renamed"))
            .unwrap_or_else(|e| panic!("rename on a full disk: {e}\n{}", t.log()));
        kept.push(("renamed".into(), d0));
        sys::fsync_dir(&t.mnt).unwrap();
        let took = write_when_room(t, &mut rng, deleted, Duration::from_secs(90));
        eprintln!("{deleted} deleted files' worth written again after {took:?}");
        for (name, data) in &kept {
            assert_bytes_eq(&read_file(&t.p(name)), data, name);
        }
        t.umount();
        t.assert_fsck_clean();
    });
}

#[test]
fn a_snapshot_keeps_deleted_space_until_it_goes() {
    with_small_store("300m", |t, tpath| {
        let mut rng = Rng::new(seed(52));
        t.mount();
        let mut files = fill_store(t, &mut rng, "f");
        // Room for the snapshot's own commit (a full disk may refuse it).
        for _ in 0..2 {
            if let Some((name, _)) = files.pop() {
                fs::remove_file(t.p(name)).unwrap();
            }
        }
        std::thread::sleep(Duration::from_secs(3));
        let out = Command::new(SNAPCTL)
            .arg("-m")
            .arg(&t.mnt)
            .args(["create", "s1"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "snapshot: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            t.log()
        );
        let free = |p: &Path| {
            let s = sys::statvfs(p).unwrap();
            s.f_bavail * s.f_frsize
        };
        // Let whatever ingest and gc had pending settle first.
        std::thread::sleep(Duration::from_secs(3));
        let before = free(tpath);
        let mut deleted = 0;
        for (i, (name, _)) in files.iter().enumerate() {
            if i % 4 == 0 {
                fs::remove_file(t.p(name)).unwrap();
                deleted += 1;
            }
        }
        // The snapshot holds them: their room does not come back.
        std::thread::sleep(Duration::from_secs(4));
        let gained = free(tpath).saturating_sub(before);
        assert!(
            gained < (deleted * FILE) as u64 / 4,
            "{gained} bytes came back after deleting {deleted} files a snapshot holds\n{}",
            t.log()
        );
        let out = Command::new(SNAPCTL)
            .arg("-m")
            .arg(&t.mnt)
            .args(["delete", "s1"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "snapshot delete on a full disk: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            t.log()
        );
        let took = write_when_room(t, &mut rng, deleted, Duration::from_secs(90));
        eprintln!("after the snapshot went, {deleted} files' worth written in {took:?}");
        for (i, (name, data)) in files.iter().enumerate() {
            if i % 4 != 0 {
                assert_bytes_eq(&read_file(&t.p(name)), data, name);
            }
        }
        t.umount();
        t.assert_fsck_clean();
    });
}

/// The same file written twice at once (two `cp` of one tree running
/// together): each copy is bigger than an ingest group, so the daemon's
/// two workers take one each and chunk them at the same time. Each
/// worker's batch used to store its own copy of every chunk, the second
/// commit keeping its copy as dead weight: a store that only received
/// copies was half dead (issue 12; item 4 of issue 13). Now a chunk in
/// flight is stored once.
#[test]
fn the_same_bytes_written_twice_at_once_are_stored_once() {
    with_fs(|t| {
        t.mount();
        let mut rng = Rng::new(seed(31));
        // Over INGEST_GROUP_BYTES (128 MiB): a group holds one copy.
        let data = rng.bytes(136 << 20);
        std::thread::scope(|s| {
            for name in ["a", "b"] {
                let (t, data) = (&*t, &data);
                s.spawn(move || write_file(&t.p(name), data));
            }
        });
        t.umount();
        let s = t.stats();
        let dead = s["dead_fraction"].as_f64().expect("dead_fraction");
        assert!(dead < 0.01, "dead fraction {dead} after copies only: {s}");
        t.mount();
        for name in ["a", "b"] {
            assert_bytes_eq(&read_file(&t.p(name)), &data, name);
        }
    });
}
