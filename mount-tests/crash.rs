//! Test 5: kill -9 the daemon while a writer runs, at random points, many
//! times. After each crash the store must mount again and every file whose
//! last change was fsynced (file and directory) must hold exactly that
//! content; a name whose removal was fsynced must stay gone; nothing may
//! read back as an error. fsck must be clean after unmounting.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use crate::harness::*;

/// What the writer tells the checker, in order.
pub(crate) enum Event {
    /// The file's state is no longer known (a change began).
    Touch(String),
    /// The file's last change is durable: this is its content.
    Synced(String, Vec<u8>),
    /// The removal is durable: the name must not exist.
    Gone(String),
}

/// The expected state of a name: present with content, or absent.
pub(crate) type Expect = BTreeMap<String, Option<Vec<u8>>>;

const ROUNDS: usize = 20;

#[test]
fn kill_9_loses_nothing_fsynced() {
    with_fs(|t| {
        crash_rounds(
            t,
            seed(5),
            ROUNDS,
            [30, 300, 1200],
            5,
            |dir, round, s, known, tx, stop| {
                format!("{} writer ops", writer(dir, round, s, known, tx, stop))
            },
        );
    });
}

/// A writer for [`crash_rounds`]: it works in `dir` until `stop` (or the
/// mount dies), reports in order what it changed and what became durable,
/// and returns a summary for the log.
pub(crate) type Writer =
    fn(PathBuf, usize, u64, Vec<(String, Vec<u8>)>, mpsc::Sender<Event>, Arc<AtomicBool>) -> String;

/// `rounds` rounds of: `writer` runs in `w/` for a random while (under
/// `waits[0]` ms, under `waits[1]`, or `waits[1]` plus under `waits[2]`,
/// a third of the rounds each, sometimes long enough for closes to reach
/// ingest), the daemon is killed with -9, the store is mounted again and
/// every file whose last change was fsynced must read back exactly; every
/// `fsck_every` rounds a clean remount, fsck, and the same check again.
pub(crate) fn crash_rounds(
    t: &mut TestFs,
    seed: u64,
    rounds: usize,
    waits: [u64; 3],
    fsck_every: usize,
    writer: Writer,
) {
    let mut rng = Rng::new(seed);
    let mut expect: Expect = BTreeMap::new();
    let mut history: History = BTreeMap::new();
    t.mount();
    // The writer works in a directory that exists only inside the
    // mount: once the dead mount is detached, its paths fail instead
    // of landing in the bare mountpoint below (where an fsync would
    // "succeed" and the check would then blame the filesystem).
    fs::create_dir(t.p("w")).unwrap();
    sys::fsync_dir(&t.mnt).expect("fsync of the mount's root");
    for round in 0..rounds {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let known: Vec<(String, Vec<u8>)> = expect
            .iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)))
            .collect();
        let handle = {
            let (mnt, stop) = (t.p("w"), stop.clone());
            let wseed = rng.next();
            std::thread::spawn(move || writer(mnt, round, wseed, known, tx, stop))
        };
        let ms = match rng.below(3) {
            0 => rng.below(waits[0]),
            1 => rng.below(waits[1]),
            _ => waits[1] + rng.below(waits[2]),
        };
        std::thread::sleep(Duration::from_millis(ms));
        t.crash();
        stop.store(true, Ordering::Relaxed);
        let did = handle.join().expect("writer thread");
        for ev in rx.try_iter() {
            match ev {
                Event::Touch(n) => {
                    expect.remove(&n);
                }
                Event::Synced(n, c) => {
                    history.entry(n.clone()).or_default().push(c.clone());
                    expect.insert(n, Some(c));
                }
                Event::Gone(n) => {
                    expect.insert(n, None);
                }
            }
        }
        t.mount();
        let durable = expect.values().filter(|v| v.is_some()).count();
        eprintln!("round {round}: killed after {ms} ms, {did}, {durable} durable files");
        verify(t, &expect, &history, &format!("seed {seed} round {round}"));
        if round % fsck_every == fsck_every - 1 {
            t.umount();
            t.assert_fsck_clean();
            t.mount();
            verify(
                t,
                &expect,
                &history,
                &format!("seed {seed} round {round}, clean remount"),
            );
        }
    }
    t.umount();
    t.assert_fsck_clean();
}

/// Every content a name was ever synced with, oldest first.
pub(crate) type History = BTreeMap<String, Vec<Vec<u8>>>;

/// What wrong bytes look like, to tell lost data (zeros, an older
/// version) from crossed files (another name's content) in a CI log.
fn explain_mismatch(
    p: &Path,
    got: &[u8],
    want: &[u8],
    name: &str,
    expect: &Expect,
    history: &History,
) -> String {
    use std::os::unix::fs::MetadataExt;
    let ino = fs::metadata(p).map(|m| m.ino()).unwrap_or(0);
    let zeros = got.iter().filter(|b| **b == 0).count();
    let older = history
        .get(name)
        .and_then(|v| v.iter().rposition(|c| c == got));
    let other: Vec<&String> = expect
        .iter()
        .filter(|(n, c)| n.as_str() != name && c.as_deref() == Some(got))
        .map(|(n, _)| n)
        .collect();
    let other_hist: Vec<&String> = history
        .iter()
        .filter(|(n, v)| n.as_str() != name && v.iter().any(|c| c == got))
        .map(|(n, _)| n)
        .collect();
    // Where the zeros are (runs of 16 or more), and how each synced
    // version compares, to tell a lost write from a hole from a crossed
    // staging file next time.
    let mut runs = Vec::new();
    let mut i = 0;
    while i < got.len() {
        if got[i] == 0 {
            let start = i;
            while i < got.len() && got[i] == 0 {
                i += 1;
            }
            if i - start >= 16 {
                runs.push((start, i));
            }
        } else {
            i += 1;
        }
    }
    let versions: Vec<String> = history
        .get(name)
        .map(|v| {
            v.iter()
                .map(|c| {
                    format!(
                        "{} bytes, {} zeros, first diff {:?}",
                        c.len(),
                        c.iter().filter(|b| **b == 0).count(),
                        first_diff(got, c)
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "contents differ: got {} bytes, want {}, first difference at {:?}; inode {ino}; \
         {zeros} zero bytes got (runs {runs:?}); equals this name's synced version {older:?} of {}; \
         equals the expected content of {other:?}; equals a past version of {other_hist:?}; \
         synced versions against got: {versions:?}",
        got.len(),
        want.len(),
        first_diff(got, want),
        history.get(name).map_or(0, |v| v.len()),
    )
}

pub(crate) fn verify(t: &TestFs, expect: &Expect, history: &History, ctx: &str) {
    let mnt = &t.p("w");
    let ctx = &format!("{ctx}\n{}", t.log());
    for (name, want) in expect {
        let p = mnt.join(name);
        match want {
            Some(c) => {
                let got = fs::read(&p).unwrap_or_else(|e| {
                    let listed = fs::read_dir(mnt)
                        .map(|rd| rd.flatten().any(|d| d.file_name() == name.as_str()))
                        .unwrap_or(false);
                    panic!("{ctx}\nfsynced file {name} cannot be read: {e} (listed in readdir: {listed})")
                });
                if &got != c {
                    panic!(
                        "{ctx}\nfsynced file {name}: {}",
                        explain_mismatch(&p, &got, c, name, expect, history)
                    );
                }
            }
            None => assert!(
                fs::symlink_metadata(&p).is_err(),
                "{ctx}: {name} was removed and synced, yet exists"
            ),
        }
    }
    // Whatever else survived must read without error.
    for e in fs::read_dir(mnt).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            fs::read(e.path())
                .unwrap_or_else(|err| panic!("{ctx}: {:?} cannot be read: {err}", e.file_name()));
        }
    }
}

/// Writes, rewrites, patches, truncates and removes files until the mount
/// dies; reports what became durable. Returns the number of operations.
fn writer(
    mnt: PathBuf,
    round: usize,
    seed: u64,
    known: Vec<(String, Vec<u8>)>,
    tx: mpsc::Sender<Event>,
    stop: Arc<AtomicBool>,
) -> usize {
    let mut rng = Rng::new(seed);
    let mut known = known;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let r = match rng.below(10) {
            0..=4 => {
                let name = format!("r{round}_{n}");
                let size = match rng.below(4) {
                    0 => rng.below(4000),
                    1 | 2 => rng.below(200_000),
                    _ => rng.below(3 << 20),
                } as usize;
                let data = rng.bytes(size);
                let sync = rng.chance(60);
                create(&mnt, &name, &data, sync, &tx).map(|_| {
                    if sync {
                        known.push((name, data));
                    }
                })
            }
            5..=6 if !known.is_empty() => {
                let i = rng.below(known.len() as u64) as usize;
                let (name, data) = &mut known[i];
                let off = rng.below(data.len() as u64 + 1000) as usize;
                let patch_len = rng.below(70_000) as usize;
                let patch = rng.bytes(patch_len);
                patch_file(&mnt, name, data, off, &patch, &tx)
            }
            7 if !known.is_empty() => {
                let i = rng.below(known.len() as u64) as usize;
                let (name, data) = &mut known[i];
                let size = rng.below(data.len() as u64 * 2 + 1) as usize;
                truncate(&mnt, name, data, size, &tx)
            }
            8 if !known.is_empty() => {
                let i = rng.below(known.len() as u64) as usize;
                let (name, _) = known.swap_remove(i);
                remove(&mnt, &name, &tx)
            }
            _ => {
                let name = format!("r{round}_{n}_nosync");
                let len = rng.below(100_000) as usize;
                let data = rng.bytes(len);
                create(&mnt, &name, &data, false, &tx)
            }
        };
        n += 1;
        if r.is_err() {
            // The mount is gone (ENOTCONN and friends): stop.
            break;
        }
    }
    n
}

fn create(
    mnt: &Path,
    name: &str,
    data: &[u8],
    sync: bool,
    tx: &mpsc::Sender<Event>,
) -> Result<(), i32> {
    let _ = tx.send(Event::Touch(name.to_string()));
    let f = res(OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(mnt.join(name)))?;
    // In pieces, so a crash can land between writes.
    for (i, piece) in data.chunks(256 << 10).enumerate() {
        res(f.write_all_at(piece, (i * (256 << 10)) as u64))?;
    }
    if sync {
        res(f.sync_all())?;
        sys::fsync_dir(mnt)?;
        let _ = tx.send(Event::Synced(name.to_string(), data.to_vec()));
    }
    Ok(())
}

fn patch_file(
    mnt: &Path,
    name: &str,
    data: &mut Vec<u8>,
    off: usize,
    patch: &[u8],
    tx: &mpsc::Sender<Event>,
) -> Result<(), i32> {
    let _ = tx.send(Event::Touch(name.to_string()));
    let f = res(OpenOptions::new().write(true).open(mnt.join(name)))?;
    res(f.write_all_at(patch, off as u64))?;
    if data.len() < off + patch.len() {
        data.resize(off + patch.len(), 0);
    }
    data[off..off + patch.len()].copy_from_slice(patch);
    res(f.sync_all())?;
    let _ = tx.send(Event::Synced(name.to_string(), data.clone()));
    Ok(())
}

fn truncate(
    mnt: &Path,
    name: &str,
    data: &mut Vec<u8>,
    size: usize,
    tx: &mpsc::Sender<Event>,
) -> Result<(), i32> {
    let _ = tx.send(Event::Touch(name.to_string()));
    let f = res(OpenOptions::new().write(true).open(mnt.join(name)))?;
    res(f.set_len(size as u64))?;
    data.resize(size, 0);
    res(f.sync_all())?;
    let _ = tx.send(Event::Synced(name.to_string(), data.clone()));
    Ok(())
}

fn remove(mnt: &Path, name: &str, tx: &mpsc::Sender<Event>) -> Result<(), i32> {
    let _ = tx.send(Event::Touch(name.to_string()));
    res(fs::remove_file(mnt.join(name)))?;
    sys::fsync_dir(mnt)?;
    let _ = tx.send(Event::Gone(name.to_string()));
    Ok(())
}

/// A kill between an ingest commit and the unlink of its staging file
/// leaves a layout made against the chunks the file had before. Replayed
/// against the record the commit left, it must give the same bytes, also
/// when that record holds them inline (a truncate to a few KiB: nothing
/// dirty, every byte from the old chunks). Such files read back as zeros.
#[test]
fn layout_replayed_after_its_commit_keeps_the_bytes() {
    with_fs(|t| {
        let mut rng = Rng::new(seed(7));
        let data = rng.bytes(10_000);
        t.mount();
        let f = t.p("f");
        fs::write(&f, &data).unwrap();
        t.remount();
        let ino = {
            use std::os::unix::fs::MetadataExt;
            fs::metadata(&f).unwrap().ino()
        };
        let staging = t.store.join("staging");
        let saved = tempfile::tempdir().unwrap();
        let names = [ino.to_string(), format!("{ino}.side")];
        {
            let h = OpenOptions::new().write(true).open(&f).unwrap();
            h.set_len(2682).unwrap();
            h.sync_all().unwrap();
            // While the writer is open nothing is ingested: this is the
            // layout a kill would leave.
            for n in &names {
                fs::copy(staging.join(n), saved.path().join(n))
                    .unwrap_or_else(|e| panic!("staging/{n}: {e}\n{}", t.log()));
            }
        }
        // The commit lands (inline: 2,682 bytes) and staging is cleared.
        t.umount();
        assert!(
            !staging.join(&names[1]).exists(),
            "layout left after commit"
        );
        for n in &names {
            fs::copy(saved.path().join(n), staging.join(n)).unwrap();
        }
        t.mount();
        assert_bytes_eq(&fs::read(&f).unwrap(), &data[..2682], "replayed file");
        t.remount();
        assert_bytes_eq(&fs::read(&f).unwrap(), &data[..2682], "after its ingest");
        t.umount();
        t.assert_fsck_clean();
    });
}

/// A layout made against another chunk list than the one committed would
/// replay its clean ranges from the wrong chunks. fsck must report it; a
/// mount must keep the committed file and set the staged bytes aside.
#[test]
fn layout_made_against_another_list_is_reported_and_not_replayed() {
    with_fs(|t| {
        use std::os::unix::fs::MetadataExt;
        let mut rng = Rng::new(seed(8));
        let first = rng.bytes(300_000);
        let second = rng.bytes(500_000);
        t.mount();
        let f = t.p("f");
        fs::write(&f, &first).unwrap();
        t.remount();
        let ino = fs::metadata(&f).unwrap().ino();
        let staging = t.store.join("staging");
        let saved = tempfile::tempdir().unwrap();
        let names = [ino.to_string(), format!("{ino}.side")];
        {
            let h = OpenOptions::new().write(true).open(&f).unwrap();
            h.write_all_at(&rng.bytes(5000), 1000).unwrap();
            h.sync_all().unwrap();
            for n in &names {
                fs::copy(staging.join(n), saved.path().join(n))
                    .unwrap_or_else(|e| panic!("staging/{n}: {e}\n{}", t.log()));
            }
        }
        // The file is then rewritten whole and committed: another list.
        t.remount();
        fs::write(&f, &second).unwrap();
        t.umount();
        for n in &names {
            fs::copy(saved.path().join(n), staging.join(n)).unwrap();
        }
        let (clean, report) = t.fsck();
        assert!(!clean, "fsck missed a layout it cannot replay: {report}");
        assert!(
            report.contains(&format!("staged inode {ino}")),
            "fsck does not name the inode: {report}"
        );
        t.mount();
        assert_bytes_eq(
            &fs::read(&f).unwrap(),
            &second,
            "f keeps its committed content",
        );
        assert!(
            t.log()
                .contains(&format!("staged writes of inode {ino} not replayed")),
            "{}",
            t.log()
        );
        t.umount();
        let aside: Vec<_> = fs::read_dir(staging.join("lost+found"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(aside.len(), 2, "the staged bytes and their layout are kept");
        let (clean, report) = t.fsck();
        assert!(!clean && report.contains("lost+found"), "{report}");
    });
}
