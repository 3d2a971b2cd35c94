//! Test 6: a damaged chunk is EIO for the bytes it holds and nothing else;
//! the log names it; the rest of the file and other files read fine.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use dedupfs::format::{ChunkId, RECORD_HEADER_LEN};
use dedupfs::store::pack;

use crate::harness::*;

/// Flips the last byte of the pack record holding `id`; returns whether
/// it was found.
fn damage_chunk(store: &Path, id: &ChunkId) -> bool {
    for (_, path) in pack::list_pack_files(store).unwrap() {
        let (_, scan) = pack::scan_pack(&path, true).unwrap();
        for r in scan.records {
            if r.header.id == *id {
                let at = r.offset + RECORD_HEADER_LEN as u64 + r.header.blob_len as u64 - 1;
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .unwrap();
                let mut b = [0u8; 1];
                f.read_exact_at(&mut b, at).unwrap();
                b[0] ^= 0x5a;
                f.write_all_at(&b, at).unwrap();
                f.sync_all().unwrap();
                return true;
            }
        }
    }
    false
}

/// pread with O_DIRECT, so the kernel asks for exactly this range (no
/// readahead into a neighbouring, damaged chunk).
fn read_range(p: &Path, off: u64, len: usize) -> Result<Vec<u8>, i32> {
    let f = res(OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(p))?;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = res(f.read_at(&mut buf[done..], off + done as u64))?;
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    Ok(buf)
}

#[test]
fn corrupt_chunk_is_eio_for_its_range_only() {
    with_fs(|t| {
        let mut rng = Rng::new(seed(6));
        let a = rng.bytes(600_000);
        let b = rng.bytes(300_000);
        t.mount();
        write_file(&t.p("a"), &a);
        write_file(&t.p("b"), &b);
        let ino_a = fs::metadata(t.p("a")).unwrap().ino();
        t.umount();

        let list = chunks_of(&t.store, ino_a);
        assert!(list.len() >= 5, "600 KB should make several chunks");
        let k = list.len() / 2;
        let bad = list[k].id;
        let start: u64 = list[..k].iter().map(|c| c.len as u64).sum();
        let len = list[k].len as u64;
        assert!(
            damage_chunk(&t.store, &bad),
            "chunk {bad} not found in packs"
        );

        t.mount();
        let pa = t.p("a");
        assert_eq!(
            read_range(&pa, start, len as usize),
            Err(libc::EIO),
            "reading the damaged chunk's bytes"
        );
        assert_eq!(
            read_range(&pa, start + len / 2, 1),
            Err(libc::EIO),
            "one byte inside the damaged chunk"
        );
        assert_eq!(
            res(fs::read(&pa)).unwrap_err(),
            libc::EIO,
            "reading the whole file"
        );
        // Every other chunk's bytes read back exactly.
        let mut off = 0u64;
        for (i, c) in list.iter().enumerate() {
            let n = c.len as u64;
            if i != k {
                let got = read_range(&pa, off, n as usize)
                    .unwrap_or_else(|e| panic!("chunk {i} at {off} (not damaged): errno {e}"));
                assert_bytes_eq(
                    &got,
                    &a[off as usize..(off + n) as usize],
                    &format!("chunk {i}"),
                );
            }
            off += n;
        }
        assert_bytes_eq(&read_file(&t.p("b")), &b, "the other file");
        let log = fs::read_to_string(t.store.join("dedupfs.log")).unwrap();
        assert!(
            log.contains(&bad.to_hex()),
            "dedupfs.log does not name chunk {bad}:\n{}",
            t.log()
        );
        t.umount();

        let (clean, report) = t.fsck();
        assert!(!clean, "fsck missed the damaged chunk: {report}");
        assert!(
            report.contains(&bad.to_hex()),
            "fsck does not name the damaged chunk: {report}"
        );
    });
}
