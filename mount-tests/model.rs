//! Test 2: model-based. A seeded RNG drives random operations against the
//! mount and against a plain directory on the host filesystem (the model);
//! every result (value or errno) must agree, and so must the whole trees,
//! checked periodically, across remounts, and at the end. A second test
//! runs three such workers concurrently, each in its own subdirectory.
//!
//! Set DEDUPFS_SEED to replay a run; a failure prints the seed and the
//! last operations.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::harness::*;

const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
const XNAMES: [&[u8]; 3] = [b"user.x", b"user.y", b"user.long.attribute.name"];
const SLOTS: usize = 3;

/// One random operation, described by paths relative to a root.
#[derive(Clone, Debug)]
enum Op {
    Create {
        path: String,
        excl: bool,
        trunc: bool,
        off: u64,
        data: Vec<u8>,
    },
    Write {
        path: String,
        off: u64,
        data: Vec<u8>,
    },
    Truncate {
        path: String,
        size: u64,
    },
    Read {
        path: String,
        off: u64,
        len: usize,
    },
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    Link {
        from: String,
        to: String,
    },
    Symlink {
        target: String,
        path: String,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
    },
    Rmdir {
        path: String,
    },
    SetXattr {
        path: String,
        name: &'static [u8],
        value: Vec<u8>,
        flags: i32,
    },
    RemoveXattr {
        path: String,
        name: &'static [u8],
    },
    /// Open and keep a handle in a slot (closing what was there).
    Hold {
        slot: usize,
        path: String,
    },
    WriteHeld {
        slot: usize,
        off: u64,
        data: Vec<u8>,
    },
    ReadHeld {
        slot: usize,
        off: u64,
        len: usize,
    },
    SyncHeld {
        slot: usize,
    },
    Close {
        slot: usize,
    },
}

impl Op {
    fn brief(&self) -> String {
        let d = |v: &Vec<u8>| format!("{} bytes fnv {:08x}", v.len(), fnv(v) as u32);
        match self {
            Op::Create {
                path,
                excl,
                trunc,
                off,
                data,
            } => format!("create {path} excl={excl} trunc={trunc} @{off} {}", d(data)),
            Op::Write { path, off, data } => format!("write {path} @{off} {}", d(data)),
            Op::WriteHeld { slot, off, data } => format!("write slot{slot} @{off} {}", d(data)),
            Op::SetXattr {
                path,
                name,
                value,
                flags,
            } => format!(
                "setxattr {path} {} {} flags={flags}",
                String::from_utf8_lossy(name),
                value.len()
            ),
            Op::RemoveXattr { path, name } => {
                format!("removexattr {path} {}", String::from_utf8_lossy(name))
            }
            o => format!("{o:?}"),
        }
    }
}

/// What an operation returned: data (for reads) or an errno.
type Outcome = Result<Vec<u8>, i32>;

/// One side of the comparison: a root and the handles held under it.
struct Side {
    root: PathBuf,
    slots: Vec<Option<File>>,
}

impl Side {
    fn new(root: PathBuf) -> Side {
        Side {
            root,
            slots: (0..SLOTS).map(|_| None).collect(),
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    fn close_all(&mut self) {
        for s in &mut self.slots {
            *s = None;
        }
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        let none = |r: Result<(), i32>| r.map(|_| Vec::new());
        match op {
            Op::Create {
                path,
                excl,
                trunc,
                off,
                data,
            } => {
                let f = res(OpenOptions::new()
                    .write(true)
                    .create(!excl)
                    .create_new(*excl)
                    .truncate(*trunc)
                    .mode(0o644)
                    .open(self.p(path)))?;
                res(f.write_all_at(data, *off))?;
                Ok(Vec::new())
            }
            Op::Write { path, off, data } => {
                let f = res(OpenOptions::new().write(true).open(self.p(path)))?;
                res(f.write_all_at(data, *off))?;
                Ok(Vec::new())
            }
            Op::Truncate { path, size } => {
                let f = res(OpenOptions::new().write(true).open(self.p(path)))?;
                none(res(f.set_len(*size)))
            }
            Op::Read { path, off, len } => {
                let f = res(File::open(self.p(path)))?;
                read_at(&f, *off, *len)
            }
            Op::Rename { from, to, flags } => {
                none(sys::renameat2(&self.p(from), &self.p(to), *flags))
            }
            Op::Link { from, to } => none(res(fs::hard_link(self.p(from), self.p(to)))),
            Op::Symlink { target, path } => {
                none(res(std::os::unix::fs::symlink(target, self.p(path))))
            }
            Op::Unlink { path } => none(res(fs::remove_file(self.p(path)))),
            Op::Mkdir { path } => none(res(fs::create_dir(self.p(path)))),
            Op::Rmdir { path } => none(res(fs::remove_dir(self.p(path)))),
            Op::SetXattr {
                path,
                name,
                value,
                flags,
            } => none(sys::setxattr(&self.p(path), name, value, *flags)),
            Op::RemoveXattr { path, name } => none(sys::removexattr(&self.p(path), name)),
            Op::Hold { slot, path } => {
                self.slots[*slot] = None;
                let f = res(OpenOptions::new().read(true).write(true).open(self.p(path)))?;
                self.slots[*slot] = Some(f);
                Ok(Vec::new())
            }
            Op::WriteHeld { slot, off, data } => {
                let f = self.slots[*slot].as_ref().ok_or(libc::EBADF)?;
                res(f.write_all_at(data, *off))?;
                Ok(Vec::new())
            }
            Op::ReadHeld { slot, off, len } => {
                let f = self.slots[*slot].as_ref().ok_or(libc::EBADF)?;
                read_at(f, *off, *len)
            }
            Op::SyncHeld { slot } => {
                let f = self.slots[*slot].as_ref().ok_or(libc::EBADF)?;
                none(res(f.sync_all()))
            }
            Op::Close { slot } => {
                self.slots[*slot] = None;
                Ok(Vec::new())
            }
        }
    }
}

fn read_at(f: &File, off: u64, len: usize) -> Outcome {
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

/// Draws operations, using the model tree to pick mostly existing names.
struct Gen {
    rng: Rng,
    /// Fixed bytes that writes copy from, so chunks repeat (dedup paths).
    pattern: Vec<u8>,
}

impl Gen {
    fn new(seed: u64) -> Gen {
        let mut rng = Rng::new(seed);
        let pattern = rng.bytes(256 << 10);
        Gen { rng, pattern }
    }

    fn data(&mut self) -> Vec<u8> {
        let r = &mut self.rng;
        let len = match r.below(10) {
            0 => 0,
            1..=5 => r.below(6000) as usize,
            6..=8 => r.below(40_000) as usize,
            _ => r.below(150_000) as usize,
        };
        if r.chance(50) {
            let start = r.below((self.pattern.len() - len) as u64 + 1) as usize;
            self.pattern[start..start + len].to_vec()
        } else {
            r.bytes(len)
        }
    }

    fn off(&mut self) -> u64 {
        match self.rng.below(4) {
            0 => 0,
            1 => self.rng.below(5000),
            2 => self.rng.below(100_000),
            _ => self.rng.below(250_000),
        }
    }

    /// A path: an existing entry (under `base`) most of the time, else a
    /// possibly new name in an existing dir.
    fn path(&mut self, model: &Path, base: &str) -> String {
        let (dirs, all, _) = list(model, base);
        if !all.is_empty() && self.rng.chance(70) {
            return self.rng.pick(&all).clone();
        }
        let dir = self.rng.pick(&dirs).clone();
        let name = *self.rng.pick(&NAMES);
        if dir.is_empty() {
            name.to_string()
        } else {
            format!("{dir}/{name}")
        }
    }

    /// A path that names an existing regular file most of the time.
    fn file(&mut self, model: &Path, base: &str) -> String {
        let (_, _, files) = list(model, base);
        if !files.is_empty() && self.rng.chance(85) {
            return self.rng.pick(&files).clone();
        }
        self.path(model, base)
    }

    /// `held[i]`: whether slot i holds a handle on the model side.
    fn op(&mut self, model: &Path, base: &str, held: &[bool]) -> Op {
        let full: Vec<usize> = (0..SLOTS).filter(|i| held[*i]).collect();
        let slot = if !full.is_empty() && self.rng.chance(90) {
            *self.rng.pick(&full)
        } else {
            self.rng.below(SLOTS as u64) as usize
        };
        match self.rng.below(100) {
            0..=14 => Op::Create {
                path: self.path(model, base),
                excl: self.rng.chance(20),
                trunc: self.rng.chance(30),
                off: self.off(),
                data: self.data(),
            },
            15..=29 => Op::Write {
                path: self.file(model, base),
                off: self.off(),
                data: self.data(),
            },
            30..=36 => Op::Truncate {
                path: self.file(model, base),
                size: self.off(),
            },
            37..=41 => Op::Read {
                path: self.file(model, base),
                off: self.off(),
                len: self.rng.below(100_000) as usize,
            },
            42..=48 => Op::Rename {
                from: self.path(model, base),
                to: self.path(model, base),
                flags: *self
                    .rng
                    .pick(&[0, 0, libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE]),
            },
            49..=52 => Op::Link {
                from: self.path(model, base),
                to: self.path(model, base),
            },
            53..=54 => Op::Symlink {
                target: self.path(model, base),
                path: self.path(model, base),
            },
            55..=60 => Op::Unlink {
                path: self.path(model, base),
            },
            61..=66 => Op::Mkdir {
                path: self.path(model, base),
            },
            67..=70 => Op::Rmdir {
                path: self.path(model, base),
            },
            71..=76 => Op::SetXattr {
                path: self.path(model, base),
                name: XNAMES[self.rng.below(XNAMES.len() as u64) as usize],
                value: {
                    let n = self.rng.below(300) as usize;
                    self.rng.bytes(n)
                },
                flags: *self
                    .rng
                    .pick(&[0, 0, libc::XATTR_CREATE, libc::XATTR_REPLACE]),
            },
            77..=79 => Op::RemoveXattr {
                path: self.path(model, base),
                name: XNAMES[self.rng.below(XNAMES.len() as u64) as usize],
            },
            80..=84 => Op::Hold {
                slot: self.rng.below(SLOTS as u64) as usize,
                path: self.file(model, base),
            },
            85..=91 => Op::WriteHeld {
                slot,
                off: self.off(),
                data: self.data(),
            },
            92..=94 => Op::ReadHeld {
                slot,
                off: self.off(),
                len: self.rng.below(100_000) as usize,
            },
            95..=96 => Op::SyncHeld { slot },
            _ => Op::Close { slot },
        }
    }
}

/// (dirs, all entries, regular files) under `base` of the model, relative
/// to its root.
fn list(model: &Path, base: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut dirs = vec![base.to_string()];
    let mut all = Vec::new();
    let mut files = Vec::new();
    let mut i = 0;
    while i < dirs.len() {
        let d = dirs[i].clone();
        let abs = if d.is_empty() {
            model.to_path_buf()
        } else {
            model.join(&d)
        };
        let mut names: Vec<String> = fs::read_dir(&abs)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        for n in names {
            let rel = if d.is_empty() { n } else { format!("{d}/{n}") };
            match fs::symlink_metadata(model.join(&rel)) {
                Ok(m) if m.is_dir() => dirs.push(rel.clone()),
                Ok(m) if m.is_file() => files.push(rel.clone()),
                _ => {}
            }
            all.push(rel);
        }
        i += 1;
    }
    (dirs, all, files)
}

/// Runs `n` operations under `base` on both sides, comparing as it goes.
/// `between` runs every `every` operations with both sides' handles closed.
struct Run<'a> {
    name: String,
    seed: u64,
    ops: Gen,
    mount: Side,
    model: Side,
    base: &'a str,
    recent: VecDeque<String>,
    /// Outcomes seen: successes and each errno, for the closing summary.
    tally: std::collections::BTreeMap<String, usize>,
}

impl Run<'_> {
    fn step(&mut self, i: usize) {
        let held: Vec<bool> = self.model.slots.iter().map(|s| s.is_some()).collect();
        let op = self.ops.op(&self.model.root.clone(), self.base, &held);
        self.recent.push_back(format!("#{i} {}", op.brief()));
        if self.recent.len() > 25 {
            self.recent.pop_front();
        }
        let want = self.model.apply(&op);
        let got = self.mount.apply(&op);
        let kind = format!("{op:?}");
        let kind = kind.split([' ', '{']).next().unwrap_or("?");
        let key = match &want {
            Ok(_) => format!("{kind} ok"),
            Err(e) => format!("{kind} errno {e}"),
        };
        *self.tally.entry(key).or_default() += 1;
        if got != want {
            panic!(
                "{}: seed {}: op #{i} differs:\n  mount: {}\n  model: {}\nrecent ops:\n  {}",
                self.name,
                self.seed,
                show(&got),
                show(&want),
                self.recent.iter().cloned().collect::<Vec<_>>().join("\n  ")
            );
        }
    }

    fn close_all(&mut self) {
        self.mount.close_all();
        self.model.close_all();
    }

    fn compare(&self, when: &str) {
        let sub = |root: &Path| {
            if self.base.is_empty() {
                root.to_path_buf()
            } else {
                root.join(self.base)
            }
        };
        let got = snapshot_tree(&sub(&self.mount.root));
        let want = snapshot_tree(&sub(&self.model.root));
        let ctx = format!(
            "{} seed {} {when}; recent ops:\n  {}",
            self.name,
            self.seed,
            self.recent.iter().cloned().collect::<Vec<_>>().join("\n  ")
        );
        assert_same_tree(&got, &want, &ctx);
    }
}

fn show(o: &Outcome) -> String {
    match o {
        Ok(v) => format!("ok ({} bytes, fnv {:016x})", v.len(), fnv(v)),
        Err(e) => format!("errno {e} ({})", std::io::Error::from_raw_os_error(*e)),
    }
}

/// The number of operations: DEDUPFS_OPS, or `default`.
fn ops(default: usize) -> usize {
    std::env::var("DEDUPFS_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn model_random_ops() {
    with_fs(|t| {
        t.mount();
        let reference = reference_dir();
        let seed = seed(0x5eed_0001);
        let mut run = Run {
            name: "model".into(),
            seed,
            ops: Gen::new(seed),
            mount: Side::new(t.mnt.clone()),
            model: Side::new(reference.path().to_path_buf()),
            base: "",
            recent: VecDeque::new(),
            tally: Default::default(),
        };
        let ops = ops(400);
        for i in 0..ops {
            run.step(i);
            if i % 25 == 24 {
                run.compare(&format!("after op {i}"));
            }
            if i % 100 == 99 && i + 1 < ops {
                run.close_all();
                run.compare(&format!("before remount at op {i}"));
                t.remount();
                run.compare(&format!("after remount at op {i}"));
            }
        }
        run.close_all();
        eprintln!("outcomes: {:?}", run.tally);
        run.compare("at the end");
        t.remount();
        run.compare("after the last remount");
        t.umount();
        t.assert_fsck_clean();
    });
}

#[test]
fn model_concurrent_workers() {
    with_fs(|t| {
        t.mount();
        let reference = reference_dir();
        let seed = seed(0x5eed_0002);
        let names = ["w0", "w1", "w2"];
        for n in names {
            fs::create_dir(t.p(n)).unwrap();
            fs::create_dir(reference.path().join(n)).unwrap();
        }
        let ops = ops(250);
        let mnt = t.mnt.clone();
        let refp = reference.path().to_path_buf();
        let runs: Vec<Run<'static>> = std::thread::scope(|s| {
            let hs: Vec<_> = names
                .iter()
                .enumerate()
                .map(|(k, base)| {
                    let (mnt, refp) = (mnt.clone(), refp.clone());
                    s.spawn(move || {
                        let seed = seed.wrapping_add(k as u64 * 7919);
                        let mut run = Run {
                            name: format!("worker {base}"),
                            seed,
                            ops: Gen::new(seed),
                            mount: Side::new(mnt),
                            model: Side::new(refp),
                            base,
                            recent: VecDeque::new(),
                            tally: Default::default(),
                        };
                        for i in 0..ops {
                            run.step(i);
                            if i % 50 == 49 {
                                run.compare(&format!("after op {i}"));
                            }
                        }
                        run.close_all();
                        run
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        let whole = |when: &str| {
            assert_same_tree(
                &snapshot_tree(&mnt),
                &snapshot_tree(&refp),
                &format!("concurrent, seed {seed}, {when}"),
            )
        };
        whole("at the end");
        t.remount();
        whole("after remount");
        for r in &runs {
            r.compare("after remount");
        }
        t.umount();
        t.assert_fsck_clean();
    });
}

/// Names in the model are plain ASCII; make sure the generator's paths
/// round-trip as bytes (guards the harness, not the filesystem).
#[test]
fn model_paths_are_ascii() {
    let d = reference_dir();
    fs::create_dir(d.path().join("a")).unwrap();
    fs::write(d.path().join("a/b"), b"").unwrap();
    let (dirs, all, files) = list(d.path(), "");
    assert_eq!(files, vec!["a/b".to_string()]);
    assert_eq!(dirs, vec!["".to_string(), "a".to_string()]);
    assert_eq!(all, vec!["a".to_string(), "a/b".to_string()]);
    assert!(all.iter().all(|p| p.as_bytes().is_ascii()));
}
