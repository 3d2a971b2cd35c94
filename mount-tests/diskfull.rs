//! Test 7: a full disk under the store. Writes fail with ENOSPC (at write,
//! close or fsync), reads keep working, and once space comes back writes
//! work again; fsck is clean afterwards.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::harness::*;

/// Appends to `p` until its filesystem is full.
fn fill(p: &Path) -> u64 {
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(p)
        .expect("open filler");
    let buf = vec![0xa5u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match f.write(&buf) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if errno_of(&e) == libc::ENOSPC => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    // Squeeze out the last partial page too.
    let _ = f.write(&buf[..4096]);
    n
}

#[test]
fn disk_full_is_enospc_and_recovers() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("dedupfs-full-")
        .tempdir()
        .unwrap();
    let tpath = dir.path().join("t");
    fs::create_dir(&tpath).unwrap();
    if let Err(e) = sys::mount_tmpfs(&tpath, "64m") {
        eprintln!("skipping: cannot mount a tmpfs (errno {e})");
        return;
    }
    let _tmpfs = Tmpfs(tpath.clone());
    // Dropped before the tmpfs guard (reverse order of declaration).
    let mut t = TestFs::at(tpath.join("store"), dir.path().join("mnt"));
    let mut rng = Rng::new(seed(7));
    let keep = rng.bytes(3 << 20);
    let small = b"small and inline".to_vec();
    t.mount();
    write_file(&t.p("keep"), &keep);
    write_file(&t.p("small"), &small);
    fs::create_dir(t.p("dir")).unwrap();
    t.remount();

    // Tight: room for a file's staged bytes but not for ingesting them
    // with the store's reserve on top (a 32 MiB pack for gc plus 1 MiB).
    // The close succeeds, the data reads back from staging, and ingest
    // waits for space.
    const LEFT: u64 = (33 + 4) << 20;
    let avail = {
        let s = sys::statvfs(&tpath).unwrap();
        s.f_bavail * s.f_frsize
    };
    {
        let f = fs::File::create(tpath.join("filler")).unwrap();
        f.set_len(avail.saturating_sub(LEFT)).unwrap();
        // tmpfs allocates on write: touch every page.
        let page = vec![0x5au8; 1 << 20];
        let mut off = 0;
        while off + (1 << 20) <= avail.saturating_sub(LEFT) {
            f.write_all_at(&page, off).unwrap();
            off += 1 << 20;
        }
    }
    let tight = rng.bytes(3 << 20);
    write_new(&t.p("tight"), &tight).expect("a 3 MiB file with 37 MiB free");
    assert_bytes_eq(&read_file(&t.p("tight")), &tight, "tight, staged");

    let filled = fill(&tpath.join("filler"));
    eprintln!("filler took {filled} more bytes");

    // New data has nowhere to go.
    let big = rng.bytes(8 << 20);
    let r = write_new(&t.p("new"), &big);
    assert_eq!(r, Err(libc::ENOSPC), "writing 8 MiB to a full disk");
    // Changing an existing file fails the same way (or succeeds only if
    // it fits in what the filler left).
    let r = (|| -> Result<(), i32> {
        let f = res(OpenOptions::new().write(true).open(t.p("keep")))?;
        for i in 0..8u64 {
            res(f.write_all_at(&big[..1 << 20], i << 20))?;
        }
        res(f.sync_all())
    })();
    assert_eq!(r, Err(libc::ENOSPC), "overwriting 8 MiB of keep");
    // Metadata alone: names with long xattrs until the metadata database
    // cannot grow either. Any failure must be ENOSPC.
    let value = vec![0x33u8; 4000];
    let mut made = 0;
    for i in 0..3000 {
        let p = t.p(format!("dir/m{i:05}"));
        let r = res(fs::create_dir(&p)).and_then(|_| sys::setxattr(&p, b"user.pad", &value, 0));
        match r {
            Ok(()) => made += 1,
            Err(e) => {
                assert_eq!(e, libc::ENOSPC, "metadata on a full disk (after {made})");
                break;
            }
        }
    }
    eprintln!("{made} dirs with 4 KB xattrs fit on the full disk");

    // Reads keep working, and show the last good content.
    assert_bytes_eq(&read_file(&t.p("small")), &small, "small on a full disk");
    let got_keep = read_file(&t.p("keep"));
    assert_eq!(got_keep.len(), keep.len());
    assert!(fs::metadata(t.p("dir")).unwrap().is_dir());
    assert!(fs::read_dir(&t.mnt).unwrap().count() >= 3);

    // Space comes back: writes work again.
    fs::remove_file(tpath.join("filler")).unwrap();
    let _ = fs::remove_file(t.p("new"));
    let fresh = rng.bytes(4 << 20);
    write_new(&t.p("new2"), &fresh)
        .unwrap_or_else(|e| panic!("writing once space is back: errno {e}\n{}", t.log()));
    assert_bytes_eq(&read_file(&t.p("new2")), &fresh, "new2");
    // keep: whatever the failed overwrite left, rewrite it whole.
    write_new(&t.p("keep"), &keep)
        .unwrap_or_else(|e| panic!("rewriting keep once space is back: errno {e}\n{}", t.log()));
    fs::create_dir(t.p("dir/after"))
        .unwrap_or_else(|e| panic!("mkdir once space is back: {e}\n{}", t.log()));

    assert_bytes_eq(
        &read_file(&t.p("tight")),
        &tight,
        "tight once space is back",
    );
    t.remount();
    assert_bytes_eq(&read_file(&t.p("keep")), &keep, "keep after remount");
    assert_bytes_eq(&read_file(&t.p("tight")), &tight, "tight after remount");
    assert_bytes_eq(&read_file(&t.p("new2")), &fresh, "new2 after remount");
    assert_bytes_eq(&read_file(&t.p("small")), &small, "small after remount");
    assert!(t.p("dir/after").is_dir());
    t.umount();
    t.assert_fsck_clean();
}
