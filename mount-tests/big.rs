//! Tests 3 and 4: big files change and copy at the cost of what changed.
//! A 4 KiB write into a 64 MiB file re-chunks a few chunks, not the file;
//! `cp` inside the mount shares the source's chunks.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::process::Command;

use crate::harness::*;

const BIG: usize = 64 << 20;

#[test]
fn overwrite_in_large_file_rechunks_little() {
    with_fs(|t| {
        let mut rng = Rng::new(seed(3));
        let mut data = rng.bytes(BIG);
        t.mount();
        write_file(&t.p("big"), &data);
        t.umount();
        let unique0 = t.stat_u64("unique_bytes");
        let packs0 = t.stat_u64("pack_bytes");
        assert!(
            unique0 >= BIG as u64,
            "a 64 MiB random file stores at least 64 MiB unique ({unique0})"
        );

        t.mount();
        let patch = rng.bytes(4096);
        let at = 32 << 20;
        {
            let f = OpenOptions::new().write(true).open(t.p("big")).unwrap();
            f.write_all_at(&patch, at as u64).unwrap();
        }
        data[at..at + 4096].copy_from_slice(&patch);
        assert_bytes_eq(&read_file(&t.p("big")), &data, "after the patch (staged)");
        t.umount();
        let unique1 = t.stat_u64("unique_bytes");
        let packs1 = t.stat_u64("pack_bytes");
        eprintln!("unique {unique0} -> {unique1}, packs {packs0} -> {packs1} after a 4 KiB patch");
        // The new chunks around the patch (max 64 KiB each, a handful of
        // them) are all that may be added; the replaced ones are freed.
        assert!(
            unique1 < unique0 + (1 << 20),
            "unique bytes grew by {} for a 4 KiB write",
            unique1 as i64 - unique0 as i64
        );
        assert!(
            packs1 < packs0 + (1 << 20),
            "packs grew by {} for a 4 KiB write",
            packs1 as i64 - packs0 as i64
        );

        t.mount();
        assert_bytes_eq(&read_file(&t.p("big")), &data, "after remount (chunked)");
        t.umount();
        t.assert_fsck_clean();
    });
}

#[test]
fn cp_inside_the_mount_shares_chunks() {
    with_fs(|t| {
        let mut rng = Rng::new(seed(4));
        let data = rng.bytes(BIG);
        t.mount();
        write_file(&t.p("src"), &data);
        t.umount();
        let packs0 = t.stat_u64("pack_bytes");

        t.mount();
        let out = Command::new("cp")
            .arg(t.p("src"))
            .arg(t.p("copy"))
            .output()
            .expect("running cp");
        assert!(
            out.status.success(),
            "cp failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_bytes_eq(&read_file(&t.p("copy")), &data, "copy (staged)");
        t.umount();
        let packs1 = t.stat_u64("pack_bytes");
        eprintln!("pack bytes {packs0} -> {packs1} after cp of 64 MiB");
        assert!(
            packs1 < packs0 + packs0 / 100,
            "cp of a 64 MiB file grew the packs by {} bytes (more than 1%)",
            packs1 - packs0
        );

        t.mount();
        assert_bytes_eq(&read_file(&t.p("copy")), &data, "copy after remount");
        assert_bytes_eq(&read_file(&t.p("src")), &data, "source after remount");
        // The copy is a file of its own: changing it leaves the source.
        {
            let f = OpenOptions::new().write(true).open(t.p("copy")).unwrap();
            f.write_all_at(b"only in the copy", 1000).unwrap();
        }
        t.remount();
        assert_bytes_eq(&read_file(&t.p("src")), &data, "source after copy changed");
        assert_eq!(&read_file(&t.p("copy"))[1000..1016], b"only in the copy");
        fs::remove_file(t.p("src")).unwrap();
        t.umount();
        t.assert_fsck_clean();
    });
}
