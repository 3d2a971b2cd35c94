//! Snapshot model test: random file operations against the mount and a
//! reference directory (as in `model`), interleaved with `snapctl` create,
//! delete and rollback. The model of a snapshot is the reference tree at
//! the moment it was taken, kept in memory with its hard-link groups; a
//! rollback rebuilds the reference directory from that record. Every
//! retained snapshot is compared with its record periodically, across a
//! remount and at the end; fsck must be clean with snapshots present and
//! after they are all deleted.
//!
//! Also: a snapshot of a file still open for writing holds exactly the
//! bytes written before `create` returned.
//!
//! Set DEDUPFS_SEED to replay a run and DEDUPFS_OPS to change its length.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::harness::*;
use crate::snapfault::{Tree, browsed, listed, snap_tree, snapctl, snapctl_ok};

const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
const XNAMES: [&[u8]; 2] = [b"user.x", b"user.y"];
const SLOTS: usize = 2;
/// Most snapshots kept at once (beyond it, snapshot ops delete).
const MAX_SNAPS: usize = 8;

/// One random file operation, by paths relative to a root.
#[derive(Clone, Debug)]
enum Op {
    Create {
        path: String,
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
    },
    RemoveXattr {
        path: String,
        name: &'static [u8],
    },
    /// Open read-write and keep the handle in a slot.
    Hold {
        slot: usize,
        path: String,
    },
    WriteHeld {
        slot: usize,
        off: u64,
        data: Vec<u8>,
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
                trunc,
                off,
                data,
            } => {
                format!("create {path} trunc={trunc} @{off} {}", d(data))
            }
            Op::Write { path, off, data } => format!("write {path} @{off} {}", d(data)),
            Op::WriteHeld { slot, off, data } => format!("write slot{slot} @{off} {}", d(data)),
            Op::SetXattr { path, name, value } => format!(
                "setxattr {path} {} {} bytes",
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
        self.root.join(rel)
    }

    fn held(&self) -> bool {
        self.slots.iter().any(|s| s.is_some())
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
                trunc,
                off,
                data,
            } => {
                let f = res(OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(*trunc)
                    .mode(0o644)
                    .open(self.p(path)))?;
                none(res(f.write_all_at(data, *off)))
            }
            Op::Write { path, off, data } => {
                let f = res(OpenOptions::new().write(true).open(self.p(path)))?;
                none(res(f.write_all_at(data, *off)))
            }
            Op::Truncate { path, size } => {
                let f = res(OpenOptions::new().write(true).open(self.p(path)))?;
                none(res(f.set_len(*size)))
            }
            Op::Read { path, off, len } => {
                let f = res(File::open(self.p(path)))?;
                let mut buf = vec![0u8; *len];
                let mut done = 0;
                while done < *len {
                    let n = res(f.read_at(&mut buf[done..], off + done as u64))?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                buf.truncate(done);
                Ok(buf)
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
            Op::SetXattr { path, name, value } => {
                none(sys::setxattr(&self.p(path), name, value, 0))
            }
            Op::RemoveXattr { path, name } => none(sys::removexattr(&self.p(path), name)),
            Op::Hold { slot, path } => {
                self.slots[*slot] = None;
                let f = res(OpenOptions::new().read(true).write(true).open(self.p(path)))?;
                self.slots[*slot] = Some(f);
                Ok(Vec::new())
            }
            Op::WriteHeld { slot, off, data } => {
                let f = self.slots[*slot].as_ref().ok_or(libc::EBADF)?;
                none(res(f.write_all_at(data, *off)))
            }
            Op::Close { slot } => {
                self.slots[*slot] = None;
                Ok(Vec::new())
            }
        }
    }
}

/// (dirs, all entries, regular files) of the reference tree, relative.
fn list(root: &Path) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut dirs = vec![String::new()];
    let (mut all, mut files) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < dirs.len() {
        let d = dirs[i].clone();
        let mut names: Vec<String> = fs::read_dir(root.join(&d))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        for n in names {
            let rel = if d.is_empty() { n } else { format!("{d}/{n}") };
            match fs::symlink_metadata(root.join(&rel)) {
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

/// Draws operations, using the reference tree to pick mostly existing
/// names.
struct Gen {
    rng: Rng,
    pattern: Vec<u8>,
}

impl Gen {
    fn data(&mut self) -> Vec<u8> {
        let r = &mut self.rng;
        let len = match r.below(10) {
            0 => 0,
            1..=5 => r.below(5000) as usize,
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
            _ => self.rng.below(200_000),
        }
    }

    fn path(&mut self, root: &Path) -> String {
        let (dirs, all, _) = list(root);
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

    fn file(&mut self, root: &Path) -> String {
        let (_, _, files) = list(root);
        if !files.is_empty() && self.rng.chance(85) {
            return self.rng.pick(&files).clone();
        }
        self.path(root)
    }

    fn op(&mut self, root: &Path, held: &[bool]) -> Op {
        let full: Vec<usize> = (0..SLOTS).filter(|i| held[*i]).collect();
        let slot = if !full.is_empty() && self.rng.chance(90) {
            *self.rng.pick(&full)
        } else {
            self.rng.below(SLOTS as u64) as usize
        };
        match self.rng.below(100) {
            0..=16 => Op::Create {
                path: self.path(root),
                trunc: self.rng.chance(30),
                off: self.off(),
                data: self.data(),
            },
            17..=31 => Op::Write {
                path: self.file(root),
                off: self.off(),
                data: self.data(),
            },
            32..=38 => Op::Truncate {
                path: self.file(root),
                size: self.off(),
            },
            39..=41 => Op::Read {
                path: self.file(root),
                off: self.off(),
                len: self.rng.below(100_000) as usize,
            },
            42..=49 => Op::Rename {
                from: self.path(root),
                to: self.path(root),
                flags: *self
                    .rng
                    .pick(&[0, 0, libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE]),
            },
            50..=55 => Op::Link {
                from: self.file(root),
                to: self.path(root),
            },
            56..=57 => Op::Symlink {
                target: self.path(root),
                path: self.path(root),
            },
            58..=63 => Op::Unlink {
                path: self.path(root),
            },
            64..=70 => Op::Mkdir {
                path: self.path(root),
            },
            71..=74 => Op::Rmdir {
                path: self.path(root),
            },
            75..=80 => Op::SetXattr {
                path: self.path(root),
                name: XNAMES[self.rng.below(XNAMES.len() as u64) as usize],
                value: {
                    let n = self.rng.below(200) as usize;
                    self.rng.bytes(n)
                },
            },
            81..=82 => Op::RemoveXattr {
                path: self.path(root),
                name: XNAMES[self.rng.below(XNAMES.len() as u64) as usize],
            },
            83..=87 => Op::Hold {
                slot: self.rng.below(SLOTS as u64) as usize,
                path: self.file(root),
            },
            88..=95 => Op::WriteHeld {
                slot,
                off: self.off(),
                data: self.data(),
            },
            _ => Op::Close { slot },
        }
    }
}

// ------------------------------------------------------------ the model

/// What a snapshot must hold: the reference tree when it was taken, and
/// which of its names were one inode (the tree alone cannot say).
#[derive(Clone)]
struct Record {
    tree: Tree,
    /// Groups of paths naming one non-directory inode, each sorted.
    links: Vec<Vec<Vec<u8>>>,
}

fn record(root: &Path) -> Record {
    let tree = snapshot_tree(root);
    let mut by_ino: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    for (rel, node) in &tree {
        if node.kind != Kind::Dir && node.nlink > 1 {
            let p = root.join(std::ffi::OsStr::from_bytes(rel));
            let md = fs::symlink_metadata(&p).expect("lstat for links");
            by_ino.entry(md.ino()).or_default().push(rel.clone());
        }
    }
    let links = by_ino.into_values().filter(|g| g.len() > 1).collect();
    Record { tree, links }
}

/// Replaces everything under `root` with what `rec` holds.
fn rebuild(root: &Path, rec: &Record) {
    for e in fs::read_dir(root).expect("readdir reference") {
        let p = e.expect("entry").path();
        if fs::symlink_metadata(&p).expect("lstat").is_dir() {
            fs::remove_dir_all(&p).expect("clearing reference dir");
        } else {
            fs::remove_file(&p).expect("clearing reference file");
        }
    }
    // The first name of each group is made; the others link to it.
    let mut first_of: BTreeMap<&[u8], &[u8]> = BTreeMap::new();
    for g in &rec.links {
        for p in &g[1..] {
            first_of.insert(p, &g[0]);
        }
    }
    let at = |rel: &[u8]| root.join(std::ffi::OsStr::from_bytes(rel));
    let mut dirs = Vec::new();
    // Parents sort before their children.
    for (rel, node) in &rec.tree {
        let p = at(rel);
        if let Some(first) = first_of.get(rel.as_slice()) {
            fs::hard_link(at(first), &p).expect("rebuilding a hard link");
            continue;
        }
        match &node.kind {
            Kind::Dir => {
                fs::create_dir(&p).expect("rebuilding a dir");
                dirs.push((p.clone(), node.mode));
            }
            Kind::File => {
                write_file(&p, node.content.as_deref().unwrap_or_default());
                fs::set_permissions(&p, fs::Permissions::from_mode(node.mode)).expect("chmod");
            }
            Kind::Symlink(target) => {
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &p)
                    .expect("rebuilding a symlink")
            }
            k => panic!("the model makes no {k:?}"),
        }
        for (n, v) in &node.xattrs {
            sys::setxattr(&p, n, v, 0).expect("rebuilding an xattr");
        }
    }
    for (p, mode) in dirs.into_iter().rev() {
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod dir");
    }
}

struct Run<'a> {
    t: &'a mut TestFs,
    seed: u64,
    ops: Gen,
    mount: Side,
    reference: Side,
    /// Every retained snapshot's record, by name.
    snaps: BTreeMap<String, Record>,
    next: usize,
    recent: VecDeque<String>,
    tally: BTreeMap<String, usize>,
}

impl Run<'_> {
    fn note(&mut self, s: String) {
        self.recent.push_back(s);
        if self.recent.len() > 30 {
            self.recent.pop_front();
        }
    }

    fn ctx(&self, when: &str) -> String {
        format!(
            "snapmodel seed {} {when}; recent ops:\n  {}\n{}",
            self.seed,
            self.recent.iter().cloned().collect::<Vec<_>>().join("\n  "),
            self.t.log()
        )
    }

    fn count(&mut self, key: String) {
        *self.tally.entry(key).or_default() += 1;
    }

    fn step(&mut self, i: usize) {
        if self.ops.rng.chance(10) {
            self.snap_step(i);
            return;
        }
        let held: Vec<bool> = self.reference.slots.iter().map(|s| s.is_some()).collect();
        let op = self.ops.op(&self.reference.root.clone(), &held);
        self.note(format!("#{i} {}", op.brief()));
        let want = self.reference.apply(&op);
        let got = self.mount.apply(&op);
        let kind = format!("{op:?}");
        let kind = kind.split([' ', '{']).next().unwrap_or("?").to_string();
        self.count(match &want {
            Ok(_) => format!("{kind} ok"),
            Err(e) => format!("{kind} errno {e}"),
        });
        if got != want {
            let show = |o: &Outcome| match o {
                Ok(v) => format!("ok ({} bytes, fnv {:016x})", v.len(), fnv(v)),
                Err(e) => format!("errno {e} ({})", std::io::Error::from_raw_os_error(*e)),
            };
            panic!(
                "{}\nop #{i} differs: mount {}, reference {}",
                self.ctx(&format!("op #{i}")),
                show(&got),
                show(&want)
            );
        }
    }

    /// A snapshot operation: create (half), delete or rollback.
    fn snap_step(&mut self, i: usize) {
        let names: Vec<String> = self.snaps.keys().cloned().collect();
        let r = self.ops.rng.below(4);
        if names.is_empty() || (r < 2 && names.len() < MAX_SNAPS) {
            self.snap_create(i);
        } else if r == 2 || names.len() >= MAX_SNAPS {
            let name = self.ops.rng.pick(&names).clone();
            self.snap_delete(i, &name);
        } else {
            let name = self.ops.rng.pick(&names).clone();
            self.snap_rollback(i, &name);
        }
    }

    fn snap_create(&mut self, i: usize) {
        // Sometimes a name already taken: refused, nothing changes.
        if !self.snaps.is_empty() && self.ops.rng.chance(10) {
            let names: Vec<String> = self.snaps.keys().cloned().collect();
            let name = self.ops.rng.pick(&names).clone();
            self.note(format!("#{i} snapctl create {name} (taken)"));
            let out = snapctl(self.t, &["create", &name]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.code() == Some(2) && err.contains(name.as_str()),
                "{}\ncreate of existing {name} should fail with exit code 2 naming it: \
                 {:?} {err}",
                self.ctx(&format!("op #{i}")),
                out.status
            );
            self.count("snap create-taken refused".into());
            self.compare_snap(&name, &format!("after a refused create, op #{i}"));
            return;
        }
        self.next += 1;
        let name = format!("m{:03}", self.next);
        let held = self.mount.held();
        self.note(format!("#{i} snapctl create {name} (handles open: {held})"));
        // The reference is at rest (this thread wrote it); record it first.
        let rec = record(&self.reference.root);
        snapctl_ok(self.t, &["create", &name, "--label", &format!("op={i}")]);
        self.snaps.insert(name.clone(), rec);
        self.count(format!("snap create (handles open: {held})"));
        self.compare_snap(&name, &format!("right after create, op #{i}"));
    }

    fn snap_delete(&mut self, i: usize, name: &str) {
        self.note(format!("#{i} snapctl delete {name}"));
        snapctl_ok(self.t, &["delete", name]);
        self.snaps.remove(name);
        self.count("snap delete".into());
        let gone = fs::symlink_metadata(self.t.p(".snapshots").join(name));
        assert_eq!(
            gone.as_ref().map_err(errno_of).err(),
            Some(libc::ENOENT),
            "{}\ndeleted snapshot {name} still resolves: {gone:?}",
            self.ctx(&format!("op #{i}"))
        );
        // Deleting nothing is an error that names it.
        if self.ops.rng.chance(20) {
            let out = snapctl(self.t, &["delete", name]);
            assert_eq!(out.status.code(), Some(2), "delete of a deleted {name}");
        }
    }

    fn snap_rollback(&mut self, i: usize, name: &str) {
        let held = self.mount.held();
        let force = held && self.ops.rng.chance(50);
        self.note(format!(
            "#{i} snapctl rollback {name} (handles open: {held}, force: {force})"
        ));
        if held && !force {
            let out = snapctl(self.t, &["rollback", name]);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{}\nrollback with files open for writing must be refused: {}",
                self.ctx(&format!("op #{i}")),
                String::from_utf8_lossy(&out.stdout)
            );
            self.count("snap rollback refused (open)".into());
            // Nothing changed.
            self.compare_live(&format!("after a refused rollback, op #{i}"));
            return;
        }
        if force {
            snapctl_ok(self.t, &["rollback", name, "--force"]);
        } else {
            snapctl_ok(self.t, &["rollback", name]);
        }
        // Forced: the mount's handles continue on the rolled-back content;
        // closing them must not bring back what they wrote before.
        self.mount.close_all();
        self.reference.close_all();
        let rec = self.snaps[name].clone();
        rebuild(&self.reference.root, &rec);
        assert_same_tree(
            &snapshot_tree(&self.reference.root),
            &rec.tree,
            &format!("rebuilt reference for {name} (a harness bug, not dedupfs)"),
        );
        self.count(format!("snap rollback (forced: {force})"));
        self.compare_live(&format!("right after rollback to {name}, op #{i}"));
    }

    fn compare_snap(&self, name: &str, when: &str) {
        let rec = &self.snaps[name];
        assert_same_tree(
            &snap_tree(self.t, name),
            &rec.tree,
            &self.ctx(&format!("snapshot {name} {when}")),
        );
    }

    fn compare_live(&self, when: &str) {
        assert_same_tree(
            &snapshot_tree(&self.mount.root),
            &snapshot_tree(&self.reference.root),
            &self.ctx(&format!("live tree {when}")),
        );
    }

    /// The live tree, the list of snapshots and each one's content.
    fn compare_all(&self, when: &str) {
        self.compare_live(when);
        let want: BTreeSet<String> = self.snaps.keys().cloned().collect();
        assert_eq!(
            listed(self.t),
            want,
            "{}",
            self.ctx(&format!("snapctl list {when}"))
        );
        assert_eq!(
            browsed(self.t),
            want,
            "{}",
            self.ctx(&format!(".snapshots {when}"))
        );
        for name in self.snaps.keys() {
            self.compare_snap(name, when);
        }
    }

    fn close_all(&mut self) {
        self.mount.close_all();
        self.reference.close_all();
    }
}

#[test]
fn snapshots_against_a_model() {
    with_fs(|t| {
        let seed = seed(0x05ee_d5a9);
        let ops = std::env::var("DEDUPFS_OPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(600usize);
        t.mount();
        let reference = reference_dir();
        let mut rng = Rng::new(seed);
        let pattern = rng.bytes(256 << 10);
        let mnt = t.mnt.clone();
        let mut run = Run {
            t,
            seed,
            ops: Gen { rng, pattern },
            mount: Side::new(mnt),
            reference: Side::new(reference.path().to_path_buf()),
            snaps: BTreeMap::new(),
            next: 0,
            recent: VecDeque::new(),
            tally: BTreeMap::new(),
        };
        for i in 0..ops {
            run.step(i);
            if i % 50 == 49 {
                run.compare_all(&format!("after op {i}"));
            }
            if i == ops / 2 {
                run.close_all();
                run.compare_all(&format!("before the remount at op {i}"));
                run.t.remount();
                run.compare_all(&format!("after the remount at op {i}"));
            }
        }
        run.close_all();
        eprintln!("seed {seed}: outcomes {:?}", run.tally);
        run.compare_all("at the end");
        run.t.remount();
        run.compare_all("after the last remount");
        run.t.umount();
        run.t.assert_fsck_clean();
        // Deleting every snapshot frees what only they held; the live tree
        // stays as it was.
        run.t.mount();
        let names: Vec<String> = run.snaps.keys().cloned().collect();
        if !names.is_empty() {
            let mut args = vec!["delete"];
            args.extend(names.iter().map(|s| s.as_str()));
            snapctl_ok(run.t, &args);
            run.snaps.clear();
        }
        run.compare_all("after deleting every snapshot");
        run.t.umount();
        run.t.assert_fsck_clean();
    });
}

/// A snapshot is one point in time even for files still open for writing:
/// it holds what was written before `create` returned, and nothing after.
#[test]
fn snapshot_of_files_open_for_writing() {
    with_fs(|t| {
        let mut rng = Rng::new(seed(0x0be9));
        t.mount();
        // Chunked, inline-sized, and created but not yet written.
        let big = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(t.p("big"))
            .unwrap();
        let small = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(t.p("small"))
            .unwrap();
        let empty = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(t.p("empty"))
            .unwrap();
        let mut big_want = rng.bytes(300_000);
        big.write_all_at(&big_want, 0).unwrap();
        let mut small_want = rng.bytes(1000);
        small.write_all_at(&small_want, 0).unwrap();
        // An existing file opened again for writing and patched.
        write_file(&t.p("old"), &rng.bytes(200_000));
        let old = OpenOptions::new().write(true).open(t.p("old")).unwrap();
        let mut old_want = read_file(&t.p("old"));
        let patch = rng.bytes(10_000);
        old.write_all_at(&patch, 50_000).unwrap();
        old_want[50_000..60_000].copy_from_slice(&patch);

        snapctl_ok(t, &["create", "open1"]);
        let s1 = (big_want.clone(), small_want.clone(), old_want.clone());

        // After create returned: overwrite inside, extend, and write the
        // empty file.
        let more = rng.bytes(70_000);
        big.write_all_at(&more, 100_000).unwrap();
        big.write_all_at(&more, 300_000).unwrap();
        big_want[100_000..170_000].copy_from_slice(&more);
        big_want.extend_from_slice(&more);
        let tail = rng.bytes(500);
        small.write_all_at(&tail, 800).unwrap();
        small_want.truncate(800);
        small_want.extend_from_slice(&tail);
        empty.write_all_at(b"late", 0).unwrap();
        old.set_len(1000).unwrap();
        old_want.truncate(1000);

        // A second snapshot of the same open handles sees the new bytes.
        snapctl_ok(t, &["create", "open2"]);
        let s2 = (big_want.clone(), small_want.clone(), old_want.clone());
        let last = rng.bytes(5000);
        big.write_all_at(&last, 0).unwrap();
        big_want[..5000].copy_from_slice(&last);
        // Only now the handles close.
        drop((big, small, empty, old));

        let check = |t: &TestFs, when: &str| {
            let snap = |s: &str, f: &str| read_file(&t.p(".snapshots").join(s).join(f));
            let files = [("big", 0), ("small", 1), ("old", 2)];
            for (f, k) in files {
                let pick = |s: &(Vec<u8>, Vec<u8>, Vec<u8>)| match k {
                    0 => s.0.clone(),
                    1 => s.1.clone(),
                    _ => s.2.clone(),
                };
                assert_bytes_eq(&snap("open1", f), &pick(&s1), &format!("open1/{f} {when}"));
                assert_bytes_eq(&snap("open2", f), &pick(&s2), &format!("open2/{f} {when}"));
            }
            assert_bytes_eq(&snap("open1", "empty"), b"", &format!("open1/empty {when}"));
            assert_bytes_eq(
                &snap("open2", "empty"),
                b"late",
                &format!("open2/empty {when}"),
            );
            let live = [
                ("big", &big_want),
                ("small", &small_want),
                ("old", &old_want),
            ];
            for (f, want) in live {
                assert_bytes_eq(&read_file(&t.p(f)), want, &format!("live {f} {when}"));
            }
            assert_bytes_eq(
                &read_file(&t.p("empty")),
                b"late",
                &format!("live empty {when}"),
            );
        };
        check(t, "after close");
        t.remount();
        check(t, "after remount");
        t.umount();
        t.assert_fsck_clean();
    });
}
