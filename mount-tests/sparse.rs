//! Sparse files: holes are listed, not stored. A terabyte `truncate -s`
//! ingests without chunking its zeros, SEEK_DATA and SEEK_HOLE find the
//! data before and after ingest, and a punched range becomes a hole.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};

use crate::harness::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn seek(f: &File, off: u64, whence: i32) -> Result<u64, i32> {
    // SAFETY: lseek on a descriptor we own.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r as u64)
    }
}

fn data_from(f: &File, off: u64) -> Result<u64, i32> {
    seek(f, off, libc::SEEK_DATA)
}

fn hole_from(f: &File, off: u64) -> Result<u64, i32> {
    seek(f, off, libc::SEEK_HOLE)
}

fn assert_zeros(f: &File, off: u64, len: usize, what: &str) {
    let mut buf = vec![1u8; len];
    f.read_exact_at(&mut buf, off).unwrap();
    assert!(buf.iter().all(|b| *b == 0), "{what}: {off} is not zeros");
}

fn assert_bytes_at(f: &File, off: u64, want: &[u8], what: &str) {
    let mut buf = vec![0u8; want.len()];
    f.read_exact_at(&mut buf, off).unwrap();
    assert_bytes_eq(&buf, want, what);
}

/// A 1 TiB file with 1 MiB of data at 600 GiB and at its end. Chunking its
/// zeros would take many minutes and list the zero chunk 16 million times;
/// the list must hold a few hundred entries, nearly all of them holes.
#[test]
fn terabyte_sparse_file_is_listed_as_holes() {
    with_fs(|t| {
        t.mount();
        let mut rng = Rng::new(seed(11));
        let size = 1u64 << 40;
        let (a, b) = (600 * GIB, size - MIB);
        let (da, db) = (rng.bytes(MIB as usize), rng.bytes(MIB as usize));
        {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(t.p("disk.img"))
                .unwrap();
            f.set_len(size).unwrap();
            f.write_all_at(&da, a).unwrap();
            f.write_all_at(&db, b).unwrap();
        }
        let ino = fs::metadata(t.p("disk.img")).unwrap().ino();
        // `first`: where SEEK_DATA from 0 lands.
        let check = |t: &TestFs, when: &str, first: u64| {
            let f = File::open(t.p("disk.img")).unwrap();
            let m = f.metadata().unwrap();
            assert_eq!(m.len(), size, "{when}: size");
            // st_blocks counts the data, not the holes.
            assert!(m.blocks() * 512 < 64 * MIB, "{when}: {} blocks", m.blocks());
            assert_bytes_at(&f, a, &da, &format!("{when}: data at 600 GiB"));
            assert_bytes_at(&f, b, &db, &format!("{when}: data at the end"));
            for off in [0, 4096, a - 4096, a + MIB, 900 * GIB] {
                assert_zeros(&f, off, 4096, when);
            }
            assert_eq!(hole_from(&f, 0), Ok(0), "{when}: SEEK_HOLE 0");
            assert_eq!(data_from(&f, 0), Ok(first), "{when}: SEEK_DATA 0");
            assert_eq!(data_from(&f, a + 5), Ok(a + 5), "{when}: SEEK_DATA in data");
            assert_eq!(hole_from(&f, a), Ok(a + MIB), "{when}: SEEK_HOLE a");
            assert_eq!(data_from(&f, a + MIB), Ok(b), "{when}: SEEK_DATA past a");
            assert_eq!(hole_from(&f, b), Ok(size), "{when}: SEEK_HOLE b");
            assert_eq!(data_from(&f, size), Err(libc::ENXIO), "{when}: at the end");
        };
        check(t, "staged", a);
        t.remount();
        check(t, "chunked", a);

        // A write inside the big hole re-lists the hole around it only.
        let c = 301 * GIB + 123;
        let dc = rng.bytes(4096);
        {
            let f = OpenOptions::new()
                .write(true)
                .open(t.p("disk.img"))
                .unwrap();
            f.write_all_at(&dc, c).unwrap();
        }
        let check_c = |t: &TestFs, when: &str| {
            let f = File::open(t.p("disk.img")).unwrap();
            // At or before the write (the staging file's block holding it).
            let first = data_from(&f, 0).unwrap();
            assert!((300 * GIB..=c).contains(&first), "SEEK_DATA 0 gave {first}");
            check(t, when, first);
            assert_bytes_at(&f, c, &dc, &format!("{when}: data at 301 GiB"));
            assert_zeros(&f, c - 8192, 8192, when);
            assert_zeros(&f, c + 4096, 8192, when);
        };
        check_c(t, "after the write, staged");
        t.umount();
        let list = chunks_of(&t.store, ino);
        let holes: u64 = list
            .iter()
            .filter(|c| c.is_hole())
            .map(|c| c.len as u64)
            .sum();
        let total: u64 = list.iter().map(|c| c.len as u64).sum();
        eprintln!("{} entries, {holes} bytes of holes", list.len());
        assert_eq!(total, size, "the list adds up to the size");
        assert!(list.len() < 1000, "{} list entries", list.len());
        assert!(holes >= size - 4 * MIB, "only {holes} bytes of holes");
        t.assert_fsck_clean();
        t.mount();
        check_c(t, "after the write, chunked");
        t.umount();
    });
}

/// fallocate PUNCH_HOLE in a chunked file: the range reads as zeros, is a
/// hole to SEEK_HOLE before and after ingest, and is listed as one.
#[test]
fn punched_range_is_a_hole() {
    with_fs(|t| {
        t.mount();
        let mut rng = Rng::new(seed(12));
        let mut data = rng.bytes(8 * MIB as usize);
        write_file(&t.p("f"), &data);
        let ino = fs::metadata(t.p("f")).unwrap().ino();
        t.remount();
        {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(t.p("f"))
                .unwrap();
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: fallocate on a descriptor we own.
            let r =
                unsafe { libc::fallocate(f.as_raw_fd(), punch, 2 * MIB as i64, 4 * MIB as i64) };
            assert_eq!(r, 0, "punch: {}", std::io::Error::last_os_error());
        }
        data[2 * MIB as usize..6 * MIB as usize].fill(0);
        let check = |t: &TestFs, when: &str| {
            let f = File::open(t.p("f")).unwrap();
            assert_eq!(f.metadata().unwrap().len(), 8 * MIB, "{when}: size");
            assert_bytes_eq(&read_file(&t.p("f")), &data, when);
            assert_eq!(hole_from(&f, 0), Ok(2 * MIB), "{when}: SEEK_HOLE 0");
            assert_eq!(data_from(&f, 2 * MIB), Ok(6 * MIB), "{when}: SEEK_DATA");
            assert_eq!(hole_from(&f, 6 * MIB), Ok(8 * MIB), "{when}: SEEK_HOLE");
        };
        check(t, "staged");
        t.umount();
        let list = chunks_of(&t.store, ino);
        let holes: Vec<u64> = list
            .iter()
            .filter(|c| c.is_hole())
            .map(|c| c.len as u64)
            .collect();
        assert_eq!(holes, [4 * MIB], "the punched range is one hole");
        t.assert_fsck_clean();
        t.mount();
        check(t, "chunked");
        let blocks = fs::metadata(t.p("f")).unwrap().blocks();
        assert_eq!(blocks * 512, 4 * MIB, "st_blocks leaves the hole out");
        t.umount();
    });
}
