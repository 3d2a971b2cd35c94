//! Snapshot fault test: kill -9 the daemon while `snapctl` creates,
//! deletes, rolls back or prunes, at a random moment (before the request
//! reaches the daemon, while it works, or after it answered). After each
//! remount every snapshot either exists whole or not at all, no snapshot
//! the operation did not touch changed, the live tree is the one before the
//! operation (or, for a rollback, the snapshot's), an operation that
//! reported success before the kill is durable, and fsck stays clean.
//!
//! The expected content of each snapshot is its tree read through
//! `.snapshots/NAME` right after it was made (and checked against the live
//! tree of that moment). Set DEDUPFS_SEED to replay a run and
//! DEDUPFS_ROUNDS to change the number of kill rounds.
//!
//! The small `snapctl` helpers here are also used by `snapmodel`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

pub const SNAPCTL: &str = env!("CARGO_BIN_EXE_snapctl");

pub type Tree = BTreeMap<Vec<u8>, Node>;

/// How long one snapctl call may take before the test calls it hung.
const SNAPCTL_LIMIT: Duration = Duration::from_secs(90);

/// `snapctl -m MOUNT args...`, waited for (a call that hangs fails the
/// test, with what the daemon's threads are waiting on).
pub fn snapctl(t: &TestFs, args: &[&str]) -> Output {
    let child = Command::new(SNAPCTL)
        .arg("-m")
        .arg(&t.mnt)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running snapctl");
    wait_limited(child, SNAPCTL_LIMIT, t, &format!("snapctl {args:?}"))
}

/// Waits for a child; past `limit`, kills it and panics.
fn wait_limited(mut child: Child, limit: Duration, t: &TestFs, what: &str) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().expect("polling snapctl").is_some() {
            return child.wait_with_output().expect("snapctl output");
        }
        if start.elapsed() > limit {
            let threads = daemon_threads(t);
            let _ = child.kill();
            let out = child.wait_with_output().expect("snapctl output");
            panic!(
                "{what} did not finish within {limit:?} (a deadlock?): {}\n\
                 daemon threads (name: kernel wait channel):\n  {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                threads.join("\n  "),
                t.log()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The daemon's threads and where each sleeps, for a hang report.
fn daemon_threads(t: &TestFs) -> Vec<String> {
    let Some(pid) = t.daemon_pid() else {
        return vec!["(no daemon)".into()];
    };
    let mut out = Vec::new();
    for e in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let read = |f: &str| {
            fs::read_to_string(e.path().join(f))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        out.push(format!("{}: {}", read("comm"), read("wchan")));
    }
    out
}

/// Runs snapctl; panics with its stderr and the daemon log on failure.
#[track_caller]
pub fn snapctl_ok(t: &TestFs, args: &[&str]) -> String {
    let out = snapctl(t, args);
    assert!(
        out.status.success(),
        "snapctl {args:?} failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        t.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The snapshots `snapctl list --json` reports, by name.
#[track_caller]
pub fn listed(t: &TestFs) -> BTreeSet<String> {
    let out = snapctl_ok(t, &["--json", "list"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("snapctl list json");
    v.as_array()
        .unwrap_or_else(|| panic!("snapctl list: not an array: {out}"))
        .iter()
        .map(|s| {
            s["name"]
                .as_str()
                .unwrap_or_else(|| panic!("snapctl list: entry without a name: {s}"))
                .to_string()
        })
        .collect()
}

/// The names `readdir(MOUNT/.snapshots)` shows.
pub fn browsed(t: &TestFs) -> BTreeSet<String> {
    fs::read_dir(t.p(".snapshots"))
        .unwrap_or_else(|e| panic!("readdir .snapshots: {e}"))
        .map(|e| {
            e.expect("readdir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

pub fn snap_tree(t: &TestFs, name: &str) -> Tree {
    snapshot_tree(&t.p(".snapshots").join(name))
}

/// `snapshot_tree(root)`, failing with `ctx` when the tree cannot be read
/// (a half-deleted snapshot fails in the walk, not in the comparison).
pub fn read_tree(root: &Path, ctx: &str) -> Tree {
    std::panic::catch_unwind(|| snapshot_tree(root)).unwrap_or_else(|e| {
        let why = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("{ctx}\n{} cannot be read whole: {why}", root.display())
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Create,
    Delete,
    Rollback,
    Prune,
}

const ROUNDS: usize = 24;
/// Directories of the populated tree and files in each.
const DIRS: usize = 8;
const FILES_PER_DIR: usize = 40;

/// What the test knows: each snapshot's content and the live tree, both
/// durable at the start of a round.
struct Known {
    snaps: BTreeMap<String, Tree>,
    /// Creation order (names are zero-padded, so also name order).
    order: Vec<String>,
    live: Tree,
    next: usize,
}

impl Known {
    fn fresh_name(&mut self) -> String {
        self.next += 1;
        format!("s{:04}", self.next)
    }

    fn newest(&self) -> Option<&String> {
        self.order
            .iter()
            .rev()
            .find(|n| self.snaps.contains_key(*n))
    }

    fn forget(&mut self, name: &str) {
        self.snaps.remove(name);
        self.order.retain(|n| n != name);
    }
}

/// How a round ended, for the closing summary.
#[derive(Default)]
struct Tally(BTreeMap<String, usize>);

impl Tally {
    fn add(&mut self, what: String) {
        *self.0.entry(what).or_default() += 1;
    }
}

#[test]
fn snapshot_ops_survive_kill_9() {
    with_fs(|t| {
        let seed = seed(0x5a9f_0001);
        let rounds = std::env::var("DEDUPFS_ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(ROUNDS);
        let mut rng = Rng::new(seed);
        let pattern = rng.bytes(512 << 10);
        t.mount();
        populate(&t.mnt, &mut rng, &pattern);
        make_durable(&t.mnt, &all_files(&t.mnt));
        snapctl_ok(t, &["policy", "set", "--keep-last", "1"]);
        let mut known = Known {
            snaps: BTreeMap::new(),
            order: Vec::new(),
            live: snapshot_tree(&t.mnt),
            next: 0,
        };
        let mut tally = Tally::default();
        // Each block of four rounds runs every operation once, in a
        // random order.
        let mut schedule = Vec::new();
        while schedule.len() < rounds {
            let mut block = vec![Op::Create, Op::Delete, Op::Rollback, Op::Prune];
            for i in (1..block.len()).rev() {
                block.swap(i, rng.below(i as u64 + 1) as usize);
            }
            schedule.extend(block);
        }
        schedule.truncate(rounds);
        for (round, op) in schedule.into_iter().enumerate() {
            let ctx = format!("seed {seed} round {round} ({op:?})");
            let outcome = run_round(t, &mut rng, &pattern, &mut known, op, &ctx);
            eprintln!("{ctx}: {outcome}");
            tally.add(format!(
                "{op:?} {}",
                outcome.split(':').next().unwrap_or("")
            ));
            if round % 4 == 3 || round + 1 == rounds {
                t.umount();
                t.assert_fsck_clean();
                t.mount();
                verify_unchanged(t, &known, &format!("{ctx}, after fsck"));
            }
        }
        eprintln!("outcomes: {:?}", tally.0);
        t.umount();
        t.assert_fsck_clean();
    });
}

/// One round: prepare, run the operation, kill the daemon, remount and
/// check. Returns a line saying how it ended.
fn run_round(
    t: &mut TestFs,
    rng: &mut Rng,
    pattern: &[u8],
    known: &mut Known,
    op: Op,
    ctx: &str,
) -> String {
    // Operations on snapshots need a few to work on; make them differ.
    let want = if op == Op::Create {
        0
    } else {
        2 + rng.below(3) as usize
    };
    while known.snaps.len() < want {
        churn_durably(t, rng, pattern);
        let name = known.fresh_name();
        take_snapshot(t, known, &name, ctx);
    }
    churn_durably(t, rng, pattern);
    known.live = snapshot_tree(&t.mnt);
    let names: Vec<String> = known.order.clone();
    let (args, targets): (Vec<String>, Vec<String>) = match op {
        Op::Create => {
            let n = known.fresh_name();
            (vec!["create".into(), n.clone()], vec![n])
        }
        Op::Delete => {
            let k = if names.len() > 2 && rng.chance(30) {
                2
            } else {
                1
            };
            let mut pick = names.clone();
            for i in (1..pick.len()).rev() {
                pick.swap(i, rng.below(i as u64 + 1) as usize);
            }
            pick.truncate(k);
            let mut args = vec!["delete".to_string()];
            args.extend(pick.iter().cloned());
            (args, pick)
        }
        Op::Rollback => {
            // Often an older one: newer snapshots must survive it.
            let n = rng.pick(&names).clone();
            (vec!["rollback".into(), n.clone()], vec![n])
        }
        Op::Prune => (
            vec!["prune".into(), "--include-manual".into()],
            names.clone(),
        ),
    };
    let delay = rng.below(41);
    let mut child = spawn_snapctl(t, &args);
    std::thread::sleep(Duration::from_millis(delay));
    let answered = child.try_wait().expect("polling snapctl");
    t.crash();
    let out = wait_child(child, t);
    let succeeded = answered.is_some_and(|s| s.success());
    // A request that fails for another reason than the kill is a bug too.
    if answered.is_some() && !succeeded {
        panic!(
            "{ctx}: snapctl {args:?} failed before the kill: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            t.log()
        );
    }
    t.mount();
    let ctx = &format!(
        "{ctx}: snapctl {args:?}, killed after {delay} ms, answered before: {succeeded}\n\
         snapctl said: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let verdict = check_after(t, known, op, &targets, succeeded, ctx);
    format!("{verdict}: {delay} ms, answered before: {succeeded}")
}

/// Checks the remounted store against what the operation may have done and
/// updates `known` to what survived. Returns what happened ("whole",
/// "none", ...).
fn check_after(
    t: &TestFs,
    known: &mut Known,
    op: Op,
    targets: &[String],
    succeeded: bool,
    ctx: &str,
) -> String {
    let ctx = &format!("{ctx}\n{}", t.log());
    let list = listed(t);
    let dir = browsed(t);
    assert_eq!(
        list, dir,
        "{ctx}: snapctl list and readdir of .snapshots disagree"
    );
    // Everything listed is a snapshot we know (or the one being made) and
    // holds exactly what it held when made.
    for name in &list {
        let want = match known.snaps.get(name) {
            Some(tree) => tree,
            None if op == Op::Create && targets.contains(name) => &known.live,
            None => panic!("{ctx}: snapshot {name} appeared from nowhere (listed: {list:?})"),
        };
        let what = format!("{ctx}\nsnapshot {name} is not whole");
        assert_same_tree(
            &read_tree(&t.p(".snapshots").join(name), &what),
            want,
            &what,
        );
    }
    // Nothing the operation could not remove is gone.
    for name in known.snaps.keys() {
        let may_go = match op {
            Op::Create | Op::Rollback => false,
            Op::Delete => targets.contains(name),
            Op::Prune => Some(name) != known.newest(),
        };
        assert!(
            list.contains(name) || may_go,
            "{ctx}: snapshot {name} vanished though the operation could not remove it \
             (listed: {list:?})"
        );
    }
    let live = read_tree(&t.mnt, &format!("{ctx}\nthe live tree"));
    let verdict = match op {
        Op::Create => {
            let made = list.contains(&targets[0]);
            assert!(
                made || !succeeded,
                "{ctx}: create of {} answered success but the snapshot is gone after the kill",
                targets[0]
            );
            assert_same_tree(
                &live,
                &known.live,
                &format!("{ctx}\nlive tree after create"),
            );
            if made {
                known.snaps.insert(targets[0].clone(), known.live.clone());
                known.order.push(targets[0].clone());
                "whole"
            } else {
                "absent"
            }
        }
        Op::Delete => {
            // Names go in the order given.
            let gone: Vec<bool> = targets.iter().map(|n| !list.contains(n)).collect();
            for i in 1..gone.len() {
                assert!(
                    gone[i - 1] || !gone[i],
                    "{ctx}: delete removed {} but not {} before it",
                    targets[i],
                    targets[i - 1]
                );
            }
            assert!(
                !succeeded || gone.iter().all(|g| *g),
                "{ctx}: delete answered success but {targets:?} are still listed: {list:?}"
            );
            assert_same_tree(
                &live,
                &known.live,
                &format!("{ctx}\nlive tree after delete"),
            );
            match gone.iter().filter(|g| **g).count() {
                0 => "kept",
                n if n == gone.len() => "deleted",
                _ => "partly deleted",
            }
        }
        Op::Rollback => {
            let snap = &known.snaps[&targets[0]];
            let back = live == *snap;
            if !back {
                assert!(
                    !succeeded,
                    "{ctx}: rollback answered success but the live tree is not the snapshot's"
                );
                assert_same_tree(
                    &live,
                    &known.live,
                    &format!(
                        "{ctx}\nlive tree after an interrupted rollback is neither the \
                         snapshot's nor the one before (compared with the one before)"
                    ),
                );
            }
            if back && *snap != known.live {
                "rolled back"
            } else if back {
                "rolled back (no change)"
            } else {
                "not rolled back"
            }
        }
        Op::Prune => {
            if succeeded {
                let newest: BTreeSet<String> = known.newest().into_iter().cloned().collect();
                assert_eq!(
                    list, newest,
                    "{ctx}: prune (keep-last 1) answered success; only the newest may remain"
                );
            }
            assert_same_tree(&live, &known.live, &format!("{ctx}\nlive tree after prune"));
            let gone = known.snaps.keys().filter(|n| !list.contains(*n)).count();
            if gone == 0 {
                "none pruned"
            } else if gone + 1 == known.snaps.len() {
                "all pruned"
            } else {
                "some pruned"
            }
        }
    };
    let dead: Vec<String> = known
        .snaps
        .keys()
        .filter(|n| !list.contains(*n))
        .cloned()
        .collect();
    for n in dead {
        known.forget(&n);
    }
    known.live = live;
    verdict.to_string()
}

/// After a clean remount: every known snapshot and the live tree as known.
fn verify_unchanged(t: &TestFs, known: &Known, ctx: &str) {
    let names: BTreeSet<String> = known.snaps.keys().cloned().collect();
    assert_eq!(listed(t), names, "{ctx}: listed snapshots");
    for (name, tree) in &known.snaps {
        assert_same_tree(
            &snap_tree(t, name),
            tree,
            &format!("{ctx}: snapshot {name}"),
        );
    }
    assert_same_tree(
        &snapshot_tree(&t.mnt),
        &known.live,
        &format!("{ctx}: live tree"),
    );
}

/// Takes a snapshot without interference and records its tree, which must
/// be the live tree's.
fn take_snapshot(t: &TestFs, known: &mut Known, name: &str, ctx: &str) {
    let live = snapshot_tree(&t.mnt);
    snapctl_ok(t, &["create", name]);
    let tree = snap_tree(t, name);
    assert_same_tree(
        &tree,
        &live,
        &format!("{ctx}: snapshot {name} right after create, against the live tree"),
    );
    known.snaps.insert(name.to_string(), tree);
    known.order.push(name.to_string());
}

fn spawn_snapctl(t: &TestFs, args: &[String]) -> Child {
    Command::new(SNAPCTL)
        .arg("-m")
        .arg(&t.mnt)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting snapctl")
}

/// Waits for snapctl after the kill (it fails on the dead socket or, if it
/// found the store unlocked, finishes the work itself).
fn wait_child(child: Child, t: &TestFs) -> Output {
    wait_limited(child, SNAPCTL_LIMIT, t, "snapctl after the kill")
}

// ------------------------------------------------------------ the tree

fn data(rng: &mut Rng, pattern: &[u8], len: usize) -> Vec<u8> {
    // Half from a shared pattern, so chunks repeat across files and
    // snapshots (reference counts shared between them).
    if len <= pattern.len() && rng.chance(50) {
        let start = rng.below((pattern.len() - len) as u64 + 1) as usize;
        pattern[start..start + len].to_vec()
    } else {
        rng.bytes(len)
    }
}

/// A size: mostly small enough to be stored inline, some chunked.
fn size(rng: &mut Rng) -> usize {
    match rng.below(10) {
        0..=5 => rng.below(4000) as usize,
        6..=8 => 4097 + rng.below(30_000) as usize,
        _ => (64 << 10) + rng.below(200_000) as usize,
    }
}

/// A few hundred files in DIRS directories, with hard links, symlinks,
/// xattrs and an odd mode.
fn populate(root: &Path, rng: &mut Rng, pattern: &[u8]) {
    for d in 0..DIRS {
        let dir = root.join(format!("d{d}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..FILES_PER_DIR {
            let n = size(rng);
            write_file(&dir.join(format!("f{f:03}")), &data(rng, pattern, n));
        }
        fs::hard_link(dir.join("f000"), dir.join("hard")).unwrap();
        std::os::unix::fs::symlink("f001", dir.join("link")).unwrap();
        sys::setxattr(
            &dir.join("f002"),
            b"user.tag",
            format!("d{d}").as_bytes(),
            0,
        )
        .unwrap();
        sys::setxattr(&dir, b"user.dir", b"x", 0).unwrap();
        fs::create_dir(dir.join("sub")).unwrap();
        write_file(&dir.join("sub/deep"), &data(rng, pattern, 100_000));
    }
    fs::set_permissions(root.join("d0/f003"), fs::Permissions::from_mode(0o600)).unwrap();
}

/// Every regular file under `root`, relative (names only, no reads).
fn all_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(d) = dirs.pop() {
        let mut entries: Vec<_> = fs::read_dir(root.join(&d))
            .unwrap_or_else(|e| panic!("readdir {}: {e}", d.display()))
            .map(|e| e.expect("readdir entry"))
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let ft = e.file_type().expect("file type");
            let rel = d.join(e.file_name());
            if ft.is_dir() {
                dirs.push(rel);
            } else if ft.is_file() {
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

/// fsyncs the files, then the metadata (fsyncdir commits all of it).
fn make_durable(root: &Path, files: &[PathBuf]) {
    for f in files {
        let p = root.join(f);
        if let Ok(h) = fs::File::open(&p) {
            h.sync_all()
                .unwrap_or_else(|e| panic!("fsync {}: {e}", p.display()));
        }
    }
    sys::fsync_dir(root).expect("fsync of the root");
}

/// Changes the live tree (every kind of change) and makes it durable, so a
/// kill afterwards must not lose it.
fn churn_durably(t: &TestFs, rng: &mut Rng, pattern: &[u8]) {
    let root = &t.mnt;
    let mut touched = Vec::new();
    let changes = 10 + rng.below(40);
    for _ in 0..changes {
        let files = all_files(root);
        let f = rng.pick(&files).clone();
        let p = root.join(&f);
        let d = format!("d{}", rng.below(DIRS as u64));
        match rng.below(9) {
            0 | 1 => {
                let n = size(rng);
                write_file(&p, &data(rng, pattern, n));
                touched.push(f);
            }
            2 => {
                let h = OpenOptions::new().write(true).open(&p).unwrap();
                let len = h.metadata().unwrap().len();
                let off = rng.below(len + 100);
                let n = rng.below(20_000) as usize;
                h.write_all_at(&data(rng, pattern, n), off).unwrap();
                touched.push(f);
            }
            3 => {
                let h = OpenOptions::new().write(true).open(&p).unwrap();
                let len = h.metadata().unwrap().len();
                h.set_len(rng.below(len + 10_000)).unwrap();
                touched.push(f);
            }
            4 => {
                let to = PathBuf::from(format!("{d}/n{}", rng.next() % 100_000));
                let n = size(rng);
                write_file(&root.join(&to), &data(rng, pattern, n));
                touched.push(to);
            }
            5 if files.len() > 100 => fs::remove_file(&p).unwrap(),
            6 => {
                let to = format!("{d}/r{}", rng.next() % 100_000);
                fs::rename(&p, root.join(to)).unwrap();
            }
            7 => {
                let to = root.join(format!("{d}/l{}", rng.next() % 100_000));
                if !to.exists() {
                    fs::hard_link(&p, to).unwrap();
                }
            }
            _ => {
                let n = rng.below(100) as usize;
                let v = rng.bytes(n);
                sys::setxattr(&p, b"user.churn", &v, 0).unwrap();
            }
        }
    }
    make_durable(root, &touched);
}
