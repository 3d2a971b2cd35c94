//! Crash tests over every way bytes reach a file: write, copy_file_range
//! (whole and partial, from chunked and from staged sources, into new,
//! existing, truncated and sparse files, mixed with writes), fallocate
//! (punch, zero, extend), truncate and rename-over. Each change is fsynced
//! (file, and directory where a name changed) and then the daemon is killed
//! with -9 at a random moment; every fsynced file must read back exactly.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};

use crate::crash::{Event, crash_rounds};
use crate::harness::*;

/// copy_file_range of `len` bytes, looping over short copies as `cp` does.
fn copy_range(src: &File, off_in: u64, dst: &File, off_out: u64, len: u64) -> Result<(), i32> {
    let (mut i, mut o) = (off_in as i64, off_out as i64);
    let end = off_in + len;
    while (i as u64) < end {
        // SAFETY: copy_file_range between descriptors we own, with
        // offsets we own.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut i,
                dst.as_raw_fd(),
                &mut o,
                (end - i as u64) as usize,
                0,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
        if n == 0 {
            break;
        }
    }
    Ok(())
}

fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> Result<(), i32> {
    // SAFETY: fallocate on a descriptor we own.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    Ok(())
}

/// What GNU `cp a b` does inside the mount: O_CREAT|O_EXCL, then
/// copy_file_range of the whole source.
fn cp_new(src: &Path, dst: &Path) -> Result<(), i32> {
    let s = res(File::open(src))?;
    let len = res(s.metadata())?.len();
    let d = res(OpenOptions::new().write(true).create_new(true).open(dst))?;
    copy_range(&s, 0, &d, 0, len)?;
    res(d.sync_all())
}

/// `cp a b && sync b && sync .` then kill -9: the copy must come back
/// whole, not as zeros, for a chunked source of any size.
#[test]
fn cp_of_a_chunked_file_survives_kill_9() {
    with_fs(|t| {
        let mut rng = Rng::new(seed(21));
        t.mount();
        let sizes = [20_000usize, 70_000, 300_000, 8 << 20];
        for (i, n) in sizes.iter().enumerate() {
            write_file(&t.p(format!("src{i}")), &rng.bytes(*n));
        }
        // Chunked: ingest has run and the files are no longer staged.
        t.remount();
        for i in 0..sizes.len() {
            cp_new(&t.p(format!("src{i}")), &t.p(format!("dst{i}"))).unwrap();
        }
        sys::fsync_dir(&t.mnt).unwrap();
        t.crash();
        t.mount();
        for i in 0..sizes.len() {
            let want = read_file(&t.p(format!("src{i}")));
            let got = read_file(&t.p(format!("dst{i}")));
            assert_bytes_eq(&got, &want, &format!("dst{i} after kill -9\n{}", t.log()));
        }
        t.umount();
        t.assert_fsck_clean();
    });
}

const ROUNDS: usize = 24;

#[test]
fn kill_9_loses_nothing_fsynced_whatever_wrote_it() {
    with_fs(|t| {
        crash_rounds(
            t,
            seed(22),
            ROUNDS,
            [50, 400, 2500],
            6,
            |dir, round, s, known, tx, stop| {
                let (ops, kinds) = writer(dir, round, s, known, tx, stop);
                format!("{ops} writer ops ({kinds:?})")
            },
        );
    });
}

/// The kinds of change the writer makes, counted for the log.
const KINDS: usize = 11;

/// Changes files every way it can until the mount dies; reports what
/// became durable. Returns the number of operations and how many of each
/// kind ran.
fn writer(
    dir: PathBuf,
    round: usize,
    seed: u64,
    mut known: Vec<(String, Vec<u8>)>,
    tx: mpsc::Sender<Event>,
    stop: Arc<AtomicBool>,
) -> (usize, [u32; KINDS]) {
    let mut rng = Rng::new(seed);
    let mut n = 0;
    let mut kinds = [0u32; KINDS];
    let send = |ev| {
        let _ = tx.send(ev);
    };
    while !stop.load(Ordering::Relaxed) {
        let kind = if known.is_empty() {
            0
        } else {
            rng.below(KINDS as u64) as usize
        };
        let fresh = format!("r{round}_{n}");
        let r: Result<(), i32> = (|| {
            match kind {
                // A new file written in pieces.
                0 => {
                    let size = match rng.below(3) {
                        0 => rng.below(4000),
                        1 => rng.below(300_000),
                        _ => rng.below(3 << 20),
                    } as usize;
                    let data = rng.bytes(size);
                    send(Event::Touch(fresh.clone()));
                    let f = res(OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(dir.join(&fresh)))?;
                    for (i, piece) in data.chunks(256 << 10).enumerate() {
                        res(f.write_all_at(piece, (i * (256 << 10)) as u64))?;
                    }
                    res(f.sync_all())?;
                    sys::fsync_dir(&dir)?;
                    send(Event::Synced(fresh.clone(), data.clone()));
                    known.push((fresh, data));
                }
                // cp: a new file, the whole source by copy_file_range,
                // sometimes followed by a write into the copy.
                1 | 2 => {
                    let (src, data) = known[rng.below(known.len() as u64) as usize].clone();
                    send(Event::Touch(fresh.clone()));
                    let s = res(File::open(dir.join(&src)))?;
                    let d = res(OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(dir.join(&fresh)))?;
                    copy_range(&s, 0, &d, 0, data.len() as u64)?;
                    let mut data = data;
                    if kind == 2 {
                        let off = rng.below(data.len() as u64 + 1) as usize;
                        let patch = {
                            let n = rng.below(20_000) as usize;
                            rng.bytes(n)
                        };
                        res(d.write_all_at(&patch, off as u64))?;
                        put(&mut data, off, &patch);
                    }
                    res(d.sync_all())?;
                    sys::fsync_dir(&dir)?;
                    send(Event::Synced(fresh.clone(), data.clone()));
                    known.push((fresh, data));
                }
                // A partial range into an existing file.
                3 => {
                    let (src, sdata) = known[rng.below(known.len() as u64) as usize].clone();
                    let i = rng.below(known.len() as u64) as usize;
                    let (dst, ddata) = &mut known[i];
                    if *dst == src {
                        return Ok(());
                    }
                    let off_in = rng.below(sdata.len() as u64 + 1);
                    let len = rng.below(sdata.len() as u64 - off_in + 1);
                    let off_out = rng.below(ddata.len() as u64 + 10_000);
                    send(Event::Touch(dst.clone()));
                    let s = res(File::open(dir.join(&src)))?;
                    let d = res(OpenOptions::new().write(true).open(dir.join(&*dst)))?;
                    copy_range(&s, off_in, &d, off_out, len)?;
                    put(
                        ddata,
                        off_out as usize,
                        &sdata[off_in as usize..(off_in + len) as usize],
                    );
                    res(d.sync_all())?;
                    send(Event::Synced(dst.clone(), ddata.clone()));
                }
                // The whole source into an existing file opened O_TRUNC.
                4 => {
                    let (src, sdata) = known[rng.below(known.len() as u64) as usize].clone();
                    let i = rng.below(known.len() as u64) as usize;
                    let (dst, ddata) = &mut known[i];
                    if *dst == src {
                        return Ok(());
                    }
                    send(Event::Touch(dst.clone()));
                    let s = res(File::open(dir.join(&src)))?;
                    let d = res(OpenOptions::new()
                        .write(true)
                        .truncate(true)
                        .open(dir.join(&*dst)))?;
                    copy_range(&s, 0, &d, 0, sdata.len() as u64)?;
                    res(d.sync_all())?;
                    *ddata = sdata;
                    send(Event::Synced(dst.clone(), ddata.clone()));
                }
                // A copy into a new sparse file, at an offset past a hole.
                5 => {
                    let (src, sdata) = known[rng.below(known.len() as u64) as usize].clone();
                    let at = rng.below(3 << 20);
                    let size = at + sdata.len() as u64 + rng.below(2 << 20);
                    send(Event::Touch(fresh.clone()));
                    let s = res(File::open(dir.join(&src)))?;
                    let d = res(OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(dir.join(&fresh)))?;
                    res(d.set_len(size))?;
                    copy_range(&s, 0, &d, at, sdata.len() as u64)?;
                    res(d.sync_all())?;
                    sys::fsync_dir(&dir)?;
                    let mut data = vec![0u8; size as usize];
                    put(&mut data, at as usize, &sdata);
                    send(Event::Synced(fresh.clone(), data.clone()));
                    known.push((fresh, data));
                }
                // Punch a hole, or zero a range (KEEP_SIZE either way).
                6 => {
                    let i = rng.below(known.len() as u64) as usize;
                    let (name, data) = &mut known[i];
                    let off = rng.below(data.len() as u64 + 1);
                    let len = rng.below(3 << 20) + 1;
                    let mode = if rng.chance(50) {
                        libc::FALLOC_FL_PUNCH_HOLE
                    } else {
                        libc::FALLOC_FL_ZERO_RANGE
                    } | libc::FALLOC_FL_KEEP_SIZE;
                    send(Event::Touch(name.clone()));
                    let f = res(OpenOptions::new().write(true).open(dir.join(&*name)))?;
                    fallocate(&f, mode, off, len)?;
                    let end = (off + len).min(data.len() as u64) as usize;
                    data[off as usize..end].fill(0);
                    res(f.sync_all())?;
                    send(Event::Synced(name.clone(), data.clone()));
                }
                // fallocate mode 0 past the end: the size grows.
                7 => {
                    let i = rng.below(known.len() as u64) as usize;
                    let (name, data) = &mut known[i];
                    let off = rng.below(data.len() as u64 + 100_000);
                    let len = rng.below(500_000) + 1;
                    send(Event::Touch(name.clone()));
                    let f = res(OpenOptions::new().write(true).open(dir.join(&*name)))?;
                    fallocate(&f, 0, off, len)?;
                    let end = (off + len) as usize;
                    if data.len() < end {
                        data.resize(end, 0);
                    }
                    res(f.sync_all())?;
                    send(Event::Synced(name.clone(), data.clone()));
                }
                // Truncate, shorter or longer.
                8 => {
                    let i = rng.below(known.len() as u64) as usize;
                    let (name, data) = &mut known[i];
                    let size = rng.below(data.len() as u64 * 2 + 1) as usize;
                    send(Event::Touch(name.clone()));
                    let f = res(OpenOptions::new().write(true).open(dir.join(&*name)))?;
                    res(f.set_len(size as u64))?;
                    data.resize(size, 0);
                    res(f.sync_all())?;
                    send(Event::Synced(name.clone(), data.clone()));
                }
                // Rename-over, as editors and git save: a new file, fsync,
                // rename onto an existing name, fsync the directory.
                9 => {
                    let i = rng.below(known.len() as u64) as usize;
                    let (name, data) = &mut known[i];
                    let new = {
                        let n = rng.below(400_000) as usize;
                        rng.bytes(n)
                    };
                    let tmp = format!("{fresh}.tmp");
                    send(Event::Touch(name.clone()));
                    let f = res(OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(dir.join(&tmp)))?;
                    res(f.write_all_at(&new, 0))?;
                    res(f.sync_all())?;
                    drop(f);
                    res(fs::rename(dir.join(&tmp), dir.join(&*name)))?;
                    sys::fsync_dir(&dir)?;
                    *data = new;
                    send(Event::Synced(name.clone(), data.clone()));
                }
                // A write into an existing file.
                _ => {
                    let i = rng.below(known.len() as u64) as usize;
                    let (name, data) = &mut known[i];
                    let off = rng.below(data.len() as u64 + 1000) as usize;
                    let patch = {
                        let n = rng.below(70_000) as usize;
                        rng.bytes(n)
                    };
                    send(Event::Touch(name.clone()));
                    let f = res(OpenOptions::new().write(true).open(dir.join(&*name)))?;
                    res(f.write_all_at(&patch, off as u64))?;
                    put(data, off, &patch);
                    res(f.sync_all())?;
                    send(Event::Synced(name.clone(), data.clone()));
                }
            }
            Ok(())
        })();
        n += 1;
        kinds[kind] += 1;
        if r.is_err() {
            // The mount is gone (ENOTCONN and friends): stop.
            break;
        }
    }
    (n, kinds)
}

/// Writes `patch` at `off`, growing `data` with zeros as a file grows.
fn put(data: &mut Vec<u8>, off: usize, patch: &[u8]) {
    if patch.is_empty() {
        return;
    }
    if data.len() < off + patch.len() {
        data.resize(off + patch.len(), 0);
    }
    data[off..off + patch.len()].copy_from_slice(patch);
}
