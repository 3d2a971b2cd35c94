//! Stores written by older builds keep working: the fixture is opened by
//! this build, migrated, read back in full (live tree and snapshot) and
//! written to; and the offline compaction survives kill -9 anywhere.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

fn unpack(fixture: &str, into: &Path) {
    fs::create_dir_all(into).expect("mkdir store");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let ok = Command::new("tar")
        .arg("-xzf")
        .arg(&path)
        .arg("-C")
        .arg(into)
        .status()
        .expect("running tar")
        .success();
    assert!(ok, "unpacking {}", path.display());
}

fn seq(from: u32, to: u32) -> Vec<u8> {
    (from..=to)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect()
}

/// `tests/fixtures/meta-v2-fs-store.tar.gz` was written by 80dde75 (meta
/// format 2: inode records version 3, small files up to 4 KiB inline)
/// with `dedupfs init --chunk-min 64 --chunk-avg 256 --chunk-max 1024`,
/// mounted, and:
/// ```text
/// mkdir -p d/sub; printf 'small file\n' > d/small
/// d/inline: "line N of the inline file\n" for N in 0..130 (3,440 bytes)
/// seq 1 30000 > d/big; ln -s small d/link; ln d/big d/hard
/// setfattr -n user.k -v value d/small; : > d/empty; echo deep > d/sub/deep
/// mkfifo d/fifo; touch -d '2001-02-03 04:05:06.123456789' d/small
/// chmod 640 d/inline; snapctl create s1
/// echo "appended after s1" >> d/inline; rm d/sub/deep
/// seq 1 1000 | dd of=d/big bs=1 seek=50000 conv=notrunc; echo new > d/after
/// dedupfs umount
/// ```
#[test]
fn a_meta_format_2_filesystem_is_migrated_and_reads_back_whole() {
    if !fuse_available() {
        return;
    }
    let mut t = TestFs::new();
    unpack("meta-v2-fs-store.tar.gz", &t.store);
    let inline: Vec<u8> = (0..130)
        .flat_map(|i| format!("line {i} of the inline file\n").into_bytes())
        .collect();
    let mut inline_now = inline.clone();
    inline_now.extend_from_slice(b"appended after s1\n");
    let big = seq(1, 30000);
    let mut big_now = big.clone();
    let patch = seq(1, 1000);
    big_now[50000..50000 + patch.len()].copy_from_slice(&patch);

    t.mount();
    let check_live = |t: &TestFs| {
        assert_bytes_eq(&fs::read(t.p("d/small")).unwrap(), b"small file\n", "small");
        assert_bytes_eq(&fs::read(t.p("d/inline")).unwrap(), &inline_now, "inline");
        assert_bytes_eq(&fs::read(t.p("d/big")).unwrap(), &big_now, "big");
        assert_bytes_eq(&fs::read(t.p("d/hard")).unwrap(), &big_now, "hard");
        assert_eq!(fs::metadata(t.p("d/big")).unwrap().nlink(), 2);
        assert_eq!(fs::read_link(t.p("d/link")).unwrap(), Path::new("small"));
        assert_eq!(fs::read(t.p("d/empty")).unwrap(), b"");
        assert_eq!(fs::read(t.p("d/after")).unwrap(), b"new\n");
        assert!(
            fs::symlink_metadata(t.p("d/fifo"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        assert!(!t.p("d/sub/deep").exists());
        assert_eq!(sys::getxattr(&t.p("d/small"), b"user.k").unwrap(), b"value");
        let m = fs::metadata(t.p("d/small")).unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec()), (981173106, 123456789));
        assert_eq!(
            fs::metadata(t.p("d/inline")).unwrap().mode() & 0o7777,
            0o640
        );
    };
    check_live(&t);
    // The snapshot, as it was before the changes.
    let s1 = t.p(".snapshots/s1/d");
    assert_bytes_eq(&fs::read(s1.join("inline")).unwrap(), &inline, "s1 inline");
    assert_bytes_eq(&fs::read(s1.join("big")).unwrap(), &big, "s1 big");
    assert_eq!(fs::read(s1.join("sub/deep")).unwrap(), b"deep\n");
    assert!(!s1.join("after").exists());

    // Written by this build: a new small file goes to packs, the old
    // inline one keeps reading until it changes.
    fs::write(t.p("d/new-small"), b"0123456789".repeat(100)).unwrap();
    fs::write(t.p("d/small"), b"changed\n").unwrap();
    t.umount();
    t.assert_fsck_clean();
    t.mount();
    assert_eq!(
        fs::read(t.p("d/new-small")).unwrap(),
        b"0123456789".repeat(100)
    );
    assert_eq!(fs::read(t.p("d/small")).unwrap(), b"changed\n");
    assert_bytes_eq(&fs::read(t.p("d/inline")).unwrap(), &inline_now, "inline");
    assert_eq!(
        fs::read(t.p(".snapshots/s1/d/small")).unwrap(),
        b"small file\n"
    );
    t.umount();
    t.assert_fsck_clean();
}

/// A store whose databases are worth compacting: many files made, half
/// removed, then the daemon stopped by fusermount3 (no compaction on the
/// way out). Returns what stays.
fn fragmented_store(t: &mut TestFs) -> Vec<(String, Vec<u8>)> {
    t.mount();
    fs::create_dir(t.p("t")).unwrap();
    let mut kept = Vec::new();
    // Long names and an xattr each, so that the two thirds removed leave
    // megabytes of free pages behind.
    let pad = pad_of();
    for i in 0..3000u32 {
        let body = format!("file {i} ")
            .repeat(1 + (i as usize % 40))
            .into_bytes();
        let name = format!("t/{}{i:05}", "n".repeat(120));
        fs::write(t.p(&name), &body).unwrap();
        sys::setxattr(&t.p(&name), b"user.pad", &pad, 0).unwrap();
        if i % 3 == 0 {
            kept.push((name, body));
        }
    }
    for i in (0..3000u32).filter(|i| i % 3 != 0) {
        fs::remove_file(t.p(format!("t/{}{i:05}", "n".repeat(120)))).unwrap();
    }
    let ok = Command::new("sync").status().unwrap().success();
    assert!(ok);
    let ok = Command::new("fusermount3")
        .arg("-u")
        .arg(&t.mnt)
        .status()
        .unwrap()
        .success();
    assert!(ok, "fusermount3 -u");
    t.mounted = false;
    t.wait_store_unlocked(Duration::from_secs(60));
    kept
}

fn pad_of() -> Vec<u8> {
    vec![b'x'; 1500]
}

#[test]
fn a_compaction_killed_anywhere_loses_nothing() {
    if !fuse_available() {
        return;
    }
    let mut t = TestFs::new();
    let kept = fragmented_store(&mut t);
    let template = t.store.with_file_name("template");
    let ok = Command::new("cp")
        .arg("-a")
        .arg(&t.store)
        .arg(&template)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    // How long a whole compaction takes, so the kills land across it.
    let t0 = Instant::now();
    let out = Command::new(BIN)
        .args(["gc", "--json"])
        .arg(&t.store)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let full = t0.elapsed();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["db_bytes_freed"].as_u64().unwrap() > 0,
        "the fixture must need compacting: {report}"
    );
    let mut rng = Rng::new(seed(0xc0_4ac7));
    for round in 0..20 {
        fs::remove_dir_all(&t.store).unwrap();
        let ok = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&t.store)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let mut child = Command::new(BIN)
            .arg("gc")
            .arg(&t.store)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let at = Duration::from_micros(rng.below(full.as_micros() as u64 * 3 / 2 + 1));
        std::thread::sleep(at);
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGKILL);
        }
        let _ = child.wait();
        t.assert_fsck_clean();
        t.mount();
        for (name, body) in &kept {
            assert_eq!(
                sys::getxattr(&t.p(name), b"user.pad").unwrap(),
                pad_of(),
                "{name}"
            );
            let got = fs::read(t.p(name))
                .unwrap_or_else(|e| panic!("round {round} ({at:?}): {name}: {e}"));
            assert_bytes_eq(&got, body, name);
        }
        let n = fs::read_dir(t.p("t")).unwrap().count();
        assert_eq!(n, kept.len(), "round {round}");
        t.umount();
    }
}

/// `dedupfs gc` on a mounted store compacts meta.redb while a writer and a
/// reader keep making requests: meta.redb shrinks, no request fails, and
/// every file fsynced before a kill -9 right after it is there, whole,
/// after the remount. Before the compaction could run mounted, the
/// command refused a mounted store and the free pages stayed until the
/// unmount.
#[test]
fn meta_is_compacted_while_mounted_and_requests_keep_working() {
    if !fuse_available() {
        return;
    }
    let mut t = TestFs::new();
    t.mount();
    fs::create_dir(t.p("t")).unwrap();
    let pad = pad_of();
    let mut kept = Vec::new();
    for i in 0..3000u32 {
        let body = format!("file {i} ").repeat(1 + (i as usize % 40));
        let name = format!("t/{}{i:05}", "n".repeat(120));
        fs::write(t.p(&name), &body).unwrap();
        sys::setxattr(&t.p(&name), b"user.pad", &pad, 0).unwrap();
        if i % 3 == 0 {
            kept.push((name, body.into_bytes()));
        }
    }
    for i in (0..3000u32).filter(|i| i % 3 != 0) {
        fs::remove_file(t.p(format!("t/{}{i:05}", "n".repeat(120)))).unwrap();
    }
    fs::create_dir(t.p("w")).unwrap();
    // The flusher commits what the removals left within two seconds.
    std::thread::sleep(Duration::from_secs(3));
    let meta_len = || fs::metadata(t.store.join("meta.redb")).unwrap().len();
    let before = meta_len();

    let stop = std::sync::atomic::AtomicBool::new(false);
    let (written, freed) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut written = Vec::new();
            let mut rng = Rng::new(seed(0x11fe));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = format!("w/{:05}", written.len());
                let len = 1 + rng.below(20_000) as usize;
                let body = rng.bytes(len);
                write_new(&t.p(&name), &body)
                    .unwrap_or_else(|e| panic!("writing {name} during gc: errno {e}"));
                written.push((name, body));
            }
            written
        });
        let reader = s.spawn(|| {
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (name, body) = &kept[rounds % kept.len()];
                assert_bytes_eq(&read_file(&t.p(name)), body, name);
                assert_eq!(sys::getxattr(&t.p(name), b"user.pad").unwrap(), pad);
                rounds += 1;
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        let out = Command::new(BIN)
            .args(["gc", "--json"])
            .arg(&t.store)
            .output()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let written = writer.join().unwrap();
        reader.join().unwrap();
        assert!(
            out.status.success(),
            "gc on the mounted store: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            t.log()
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (written, report["db_bytes_freed"].as_u64().unwrap())
    });
    let after = meta_len();
    assert!(
        freed > 0 && after < before,
        "meta.redb {before} -> {after} bytes, {freed} freed\n{}",
        t.log()
    );
    assert!(!written.is_empty());
    t.crash();
    t.mount();
    for (name, body) in kept.iter().chain(&written) {
        assert_bytes_eq(&read_file(&t.p(name)), body, name);
    }
    assert_eq!(fs::read_dir(t.p("t")).unwrap().count(), kept.len());
    assert_eq!(fs::read_dir(t.p("w")).unwrap().count(), written.len());
    t.umount();
    t.assert_fsck_clean();
}
