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
        // The same file inside a snapshot shows the same hole.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_snapctl"))
            .args(["-m", t.mnt.to_str().unwrap(), "create", "s1"])
            .output()
            .unwrap();
        assert!(out.status.success(), "snapctl: {out:?}");
        let f = File::open(t.p(".snapshots/s1/f")).unwrap();
        assert_eq!(hole_from(&f, 0), Ok(2 * MIB), "snapshot: SEEK_HOLE 0");
        assert_eq!(data_from(&f, 2 * MIB), Ok(6 * MIB), "snapshot: SEEK_DATA");
        assert_eq!(
            f.metadata().unwrap().blocks() * 512,
            4 * MIB,
            "snapshot st_blocks"
        );
        drop(f);
        t.umount();
    });
}

/// The bytes of a sparse file as runs of data; everything else is zeros.
#[derive(Default)]
struct Sparse {
    size: u64,
    runs: std::collections::BTreeMap<u64, Vec<u8>>,
}

impl Sparse {
    /// Removes [a, b) from the runs, splitting those that straddle it.
    fn cut(&mut self, a: u64, b: u64) {
        let hit: Vec<u64> = self
            .runs
            .range(..b)
            .filter(|(s, d)| **s + d.len() as u64 > a)
            .map(|(s, _)| *s)
            .collect();
        for s in hit {
            let d = self.runs.remove(&s).unwrap();
            let e = s + d.len() as u64;
            if s < a {
                self.runs.insert(s, d[..(a - s) as usize].to_vec());
            }
            if e > b {
                self.runs.insert(b, d[(b - s) as usize..].to_vec());
            }
        }
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        self.cut(off, off + data.len() as u64);
        self.runs.insert(off, data.to_vec());
        self.size = self.size.max(off + data.len() as u64);
    }

    fn truncate(&mut self, len: u64) {
        self.cut(len, u64::MAX);
        self.size = len;
    }

    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let end = (off + len as u64).min(self.size);
        let mut out = vec![0u8; end.saturating_sub(off) as usize];
        for (s, d) in &self.runs {
            let e = s + d.len() as u64;
            let (a, b) = ((*s).max(off), e.min(end));
            if a < b {
                out[(a - off) as usize..(b - off) as usize]
                    .copy_from_slice(&d[(a - s) as usize..(b - s) as usize]);
            }
        }
        out
    }

    fn data_bytes(&self) -> u64 {
        self.runs.values().map(|d| d.len() as u64).sum()
    }

    /// Offsets worth reading around: every run's edges, the 2 GiB marks
    /// where hole entries end, and the end.
    fn edges(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .runs
            .iter()
            .flat_map(|(s, d)| [*s, s + d.len() as u64])
            .collect();
        v.extend((1..8).map(|i| i * 2 * GIB));
        v.push(self.size);
        v
    }
}

/// Checks a file in the mount against the model: size, the bytes around
/// every edge, that SEEK_DATA/SEEK_HOLE never call data a hole, and that
/// st_blocks covers at least the data.
fn check_model(t: &TestFs, name: &str, m: &Sparse, when: &str) {
    let f = File::open(t.p(name)).unwrap();
    let meta = f.metadata().unwrap();
    assert_eq!(meta.len(), m.size, "{when}: size");
    for e in m.edges() {
        let a = e.saturating_sub(8192).min(m.size);
        let got = {
            let want_len = ((e + 8192).min(m.size) - a) as usize;
            let mut b = vec![0xeeu8; want_len];
            f.read_exact_at(&mut b, a).unwrap();
            b
        };
        assert_bytes_eq(&got, &m.read(a, got.len()), &format!("{when}: around {e}"));
    }
    // Every hole SEEK_HOLE/SEEK_DATA report must hold no model data.
    let mut pos = 0;
    while pos < m.size {
        let h = hole_from(&f, pos).unwrap();
        let d = data_from(&f, h).unwrap_or(m.size);
        assert!(h < d || h == m.size, "{when}: hole [{h}, {d})");
        for (s, run) in &m.runs {
            let e = s + run.len() as u64;
            // A run may report zeros inside it as a hole only where the
            // run's own bytes are zeros; the runs here are random.
            assert!(
                e <= h || *s >= d,
                "{when}: data [{s}, {e}) inside reported hole [{h}, {d})"
            );
        }
        pos = d;
    }
    assert!(
        meta.blocks() * 512 >= m.data_bytes(),
        "{when}: {} blocks for {} bytes of data",
        meta.blocks(),
        m.data_bytes()
    );
}

/// Edits at the awkward places of a listed-as-holes file, each checked
/// staged and again after a remount (re-chunked on a base with holes):
/// truncating into a hole entry and extending past the old end, writes
/// touching a hole's edges, a punch across a 2 GiB mark, and a
/// copy_file_range of a sparse range.
#[test]
fn sparse_edits_match_a_model() {
    with_fs(|t| {
        t.mount();
        let mut rng = Rng::new(seed(13));
        let mut m = Sparse::default();
        let name = "img";
        let open_rw = |t: &TestFs| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(t.p(name))
                .unwrap()
        };
        let step = |t: &mut TestFs, m: &Sparse, what: &str| {
            check_model(t, name, m, &format!("{what}, staged"));
            t.remount();
            check_model(t, name, m, &format!("{what}, chunked"));
        };

        // Holes crossing the 2 and 4 GiB marks.
        {
            let f = open_rw(t);
            f.set_len(6 * GIB).unwrap();
            for off in [GIB, 5 * GIB] {
                let d = rng.bytes(64 << 10);
                f.write_all_at(&d, off).unwrap();
                m.write(off, &d);
            }
            m.truncate(6 * GIB);
        }
        step(t, &m, "laid out");

        // Into the middle of a hole entry, then past the old end.
        {
            let f = open_rw(t);
            f.set_len(3 * GIB).unwrap();
            m.truncate(3 * GIB);
            f.set_len(7 * GIB + 123).unwrap();
            m.truncate(7 * GIB + 123);
        }
        step(t, &m, "truncated into a hole and extended");

        // Writes touching a hole's edges, from either side.
        {
            let f = open_rw(t);
            for off in [GIB + (64 << 10), GIB - 4096, 6 * GIB] {
                let d = rng.bytes(4096);
                f.write_all_at(&d, off).unwrap();
                m.write(off, &d);
            }
        }
        step(t, &m, "written at hole edges");

        // Data across the 2 GiB mark, then a punch across the mark.
        {
            let f = open_rw(t);
            let d = rng.bytes(3 * MIB as usize);
            f.write_all_at(&d, 2 * GIB - 3 * MIB / 2).unwrap();
            m.write(2 * GIB - 3 * MIB / 2, &d);
        }
        step(t, &m, "data across 2 GiB");
        {
            let f = open_rw(t);
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            let at = 2 * GIB - MIB;
            // SAFETY: fallocate on a descriptor we own.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), punch, at as i64, 2 * MIB as i64) };
            assert_eq!(r, 0, "punch: {}", std::io::Error::last_os_error());
            m.write(at, &vec![0u8; 2 * MIB as usize]);
            // The model keeps the zeros as a run; drop it so SEEK_HOLE may
            // report the punched range as a hole.
            m.cut(at, at + 2 * MIB);
        }
        step(t, &m, "punched across 2 GiB");

        // copy_file_range of everything past 1 MiB into a new file.
        {
            let src = File::open(t.p(name)).unwrap();
            let dst = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(t.p("copy"))
                .unwrap();
            let (mut off_in, mut off_out) = (MIB as i64, MIB as i64);
            let end = m.size as i64;
            while off_in < end {
                // SAFETY: copy_file_range between descriptors we own.
                let n = unsafe {
                    libc::copy_file_range(
                        src.as_raw_fd(),
                        &mut off_in,
                        dst.as_raw_fd(),
                        &mut off_out,
                        (end - off_in) as usize,
                        0,
                    )
                };
                assert!(
                    n > 0,
                    "copy_file_range: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        let mut c = Sparse::default();
        for (s, d) in &m.runs {
            if *s >= MIB {
                c.write(*s, d);
            }
        }
        c.truncate(m.size);
        check_model(t, "copy", &c, "copy, staged");
        t.remount();
        check_model(t, "copy", &c, "copy, chunked");

        // st_blocks of a file rewritten on a base that was all holes.
        {
            let f = open_rw(t);
            f.set_len(0).unwrap();
            f.set_len(GIB).unwrap();
        }
        m = Sparse::default();
        m.truncate(GIB);
        step(t, &m, "1 GiB of hole");
        {
            let f = open_rw(t);
            let d = rng.bytes(8 * MIB as usize);
            f.write_all_at(&d, 100 * MIB).unwrap();
            m.write(100 * MIB, &d);
            // Still open: staged on a base that is all hole.
            check_model(t, name, &m, "written on a hole, open");
        }
        step(t, &m, "written on a hole");

        let ino = fs::metadata(t.p(name)).unwrap().ino();
        t.umount();
        let total: u64 = chunks_of(&t.store, ino).iter().map(|c| c.len as u64).sum();
        assert_eq!(total, m.size, "the list adds up to the size");
        t.assert_fsck_clean();
    });
}
