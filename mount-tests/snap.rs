//! Snapshots through snapctl: immutability across every kind of change and
//! a remount, browsing rules (hidden, read-only, own inode numbers), diff,
//! restore sharing chunks, rollback, deletion freeing space, names, and
//! snapctl finding the store with and without a mount.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use crate::harness::*;

const SNAPCTL: &str = env!("CARGO_BIN_EXE_snapctl");

fn snapctl(args: &[&str]) -> Output {
    Command::new(SNAPCTL)
        .args(args)
        .output()
        .expect("running snapctl")
}

/// Runs snapctl against a mount; panics with its stderr on failure.
fn ok(t: &TestFs, args: &[&str]) -> String {
    let mut full = vec!["-m", t.mnt.to_str().expect("utf-8 mountpoint")];
    full.extend_from_slice(args);
    let out = snapctl(&full);
    assert!(
        out.status.success(),
        "snapctl {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        t.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs snapctl against a mount expecting failure; returns stderr.
fn fails(t: &TestFs, args: &[&str]) -> String {
    let mut full = vec!["-m", t.mnt.to_str().expect("utf-8 mountpoint")];
    full.extend_from_slice(args);
    let out = snapctl(&full);
    assert!(
        !out.status.success(),
        "snapctl {args:?} should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(t: &TestFs, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&ok(t, &a)).expect("snapctl json")
}

fn populate(root: &Path, rng: &mut Rng) {
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    write_file(&root.join("small"), b"small file\n");
    write_file(&root.join("big"), &rng.bytes(600_000));
    write_file(&root.join("dir/mid"), &rng.bytes(70_000));
    write_file(&root.join("dir/sub/deep"), b"deep\n");
    fs::hard_link(root.join("big"), root.join("dir/big-link")).unwrap();
    std::os::unix::fs::symlink("../small", root.join("dir/ln")).unwrap();
    sys::setxattr(&root.join("small"), b"user.tag", b"v1", 0).unwrap();
    write_file(&root.join("trunc-me"), &rng.bytes(200_000));
}

/// Every kind of change the snapshot must not see.
fn churn(root: &Path, rng: &mut Rng) {
    write_file(&root.join("small"), b"overwritten\n");
    let f = fs::OpenOptions::new()
        .write(true)
        .open(root.join("big"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &rng.bytes(5000), 300_000).unwrap();
    drop(f);
    fs::remove_file(root.join("dir/mid")).unwrap();
    fs::rename(root.join("dir/sub"), root.join("moved")).unwrap();
    fs::hard_link(root.join("small"), root.join("small-link")).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(root.join("trunc-me"))
        .unwrap()
        .set_len(10)
        .unwrap();
    sys::setxattr(&root.join("small"), b"user.tag", b"v2", 0).unwrap();
    fs::set_permissions(root.join("dir"), fs::Permissions::from_mode(0o700)).unwrap();
    write_file(&root.join("new"), &rng.bytes(100_000));
}

#[test]
fn snapshot_never_changes_and_is_read_only() {
    with_fs(|t| {
        let mut rng = Rng::new(seed(41));
        t.mount();
        populate(&t.mnt, &mut rng);
        let before = snapshot_tree(&t.mnt);
        ok(t, &["create", "s1", "--label", "why=test"]);
        let snap = t.p(".snapshots/s1");
        assert_same_tree(&snapshot_tree(&snap), &before, "right after create");
        churn(&t.mnt, &mut rng);
        assert_same_tree(&snapshot_tree(&snap), &before, "after churn");
        // Hidden from the root's listing, there when named.
        let names: Vec<_> = fs::read_dir(&t.mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(!names.iter().any(|n| n == ".snapshots"), "{names:?}");
        // Read-only, with its own inode numbers.
        let erofs = |r: std::io::Result<()>| errno_of(&r.expect_err("must fail"));
        assert_eq!(erofs(fs::write(snap.join("small"), b"x")), libc::EROFS);
        assert_eq!(erofs(fs::write(snap.join("fresh"), b"x")), libc::EROFS);
        assert_eq!(erofs(fs::remove_file(snap.join("small"))), libc::EROFS);
        assert_eq!(erofs(fs::create_dir(snap.join("d"))), libc::EROFS);
        assert_eq!(
            sys::setxattr(&snap.join("small"), b"user.x", b"1", 0),
            Err(libc::EROFS)
        );
        let live_ino = fs::metadata(t.p("big")).unwrap().ino();
        let snap_ino = fs::metadata(snap.join("big")).unwrap().ino();
        assert_ne!(live_ino, snap_ino);
        assert_eq!(
            snap_ino,
            fs::metadata(snap.join("dir/big-link")).unwrap().ino(),
            "hard links stay one inode inside the snapshot"
        );
        t.remount();
        assert_same_tree(
            &snapshot_tree(&t.p(".snapshots/s1")),
            &before,
            "after remount",
        );
        let list = json(t, &["list"]);
        assert_eq!(list[0]["name"], "s1");
        assert_eq!(list[0]["labels"]["why"], "test");
        assert_eq!(list[0]["files"], 5, "{list}");
        t.umount();
        t.assert_fsck_clean();
    });
}

#[test]
fn diff_restore_rollback_delete() {
    with_fs(|t| {
        let mut rng = Rng::new(seed(42));
        t.mount();
        populate(&t.mnt, &mut rng);
        let at_s1 = snapshot_tree(&t.mnt);
        ok(t, &["create", "s1"]);
        churn(&t.mnt, &mut rng);
        // diff against the live tree names each change once.
        let d = json(t, &["diff", "s1"]);
        let has = |change: &str, path: &str| {
            d.as_array()
                .unwrap()
                .iter()
                .any(|e| e["change"] == change && e["path"] == path)
        };
        assert!(has("modified", "/small"), "{d}");
        assert!(has("modified", "/big"), "{d}");
        assert!(has("removed", "/dir/mid"), "{d}");
        assert!(has("renamed", "/moved"), "{d}");
        assert!(has("added", "/new"), "{d}");
        assert!(has("added", "/small-link"), "{d}");
        assert!(has("modified", "/trunc-me"), "{d}");
        assert!(has("modified", "/dir"), "mode change of a directory: {d}");
        assert!(!has("modified", "/dir/sub/deep"), "{d}");
        ok(t, &["create", "s2"]);
        let at_s2 = snapshot_tree(&t.mnt);
        assert_eq!(json(t, &["diff", "s2"]), Value::Array(vec![]));
        let between = json(t, &["diff", "s1", "s2"]);
        assert_eq!(
            between.as_array().unwrap().len(),
            d.as_array().unwrap().len()
        );

        // Restore costs metadata only: no new chunks.
        t.umount();
        let chunks = t.stat_u64("chunks");
        let unique = t.stat_u64("unique_bytes");
        t.mount();
        // Misses the kernel may cache (negative entries): restore and
        // rollback must invalidate them, or the names stay hidden.
        assert!(fs::symlink_metadata(t.p("dir-back")).is_err());
        assert!(fs::symlink_metadata(t.p("dir/mid")).is_err());
        // A destination in the tree is named by its path under the mount
        // (a path outside the mount copies out).
        let back = t.p("dir-back");
        ok(
            t,
            &["restore", "s1", "/dir", "--to", back.to_str().unwrap()],
        );
        // A relative path from inside the mount, to its old place.
        let out = Command::new(SNAPCTL)
            .current_dir(&t.mnt)
            .args(["restore", "s1", "big"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_bytes_eq(
            &read_file(&t.p("big")),
            at_s1[&b"big".to_vec()].content.as_ref().unwrap(),
            "restored big",
        );
        assert_bytes_eq(
            &read_file(&t.p("dir-back/mid")),
            at_s1[&b"dir/mid".to_vec()].content.as_ref().unwrap(),
            "restored dir/mid",
        );
        assert_eq!(read_file(&t.p("dir-back/sub/deep")), b"deep\n");
        t.umount();
        assert_eq!(t.stat_u64("chunks"), chunks, "restore stored no chunk");
        assert_eq!(t.stat_u64("unique_bytes"), unique);
        t.assert_fsck_clean();
        t.mount();

        // Fill the kernel's caches: directory listings (FOPEN_CACHE_DIR)
        // and file pages (a second open of an unchanged file keeps them).
        // Rollback must drop what it changes, or the tree below is stale.
        let _ = snapshot_tree(&t.mnt);
        let _ = snapshot_tree(&t.mnt);
        // Rollback refuses while a file is open for writing.
        let held = fs::OpenOptions::new().write(true).open(t.p("new")).unwrap();
        let err = fails(t, &["rollback", "s1"]);
        assert!(
            err.contains("s1") && err.contains("open for writing"),
            "{err}"
        );
        drop(held);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(fs::symlink_metadata(t.p("dir/mid")).is_err());
        ok(t, &["rollback", "s1"]);
        assert!(
            fs::symlink_metadata(t.p("dir/mid")).is_ok(),
            "a name rollback brought back is visible at once"
        );
        assert_same_tree(&snapshot_tree(&t.mnt), &at_s1, "live tree after rollback");
        // Later snapshots survive a rollback.
        assert_same_tree(
            &snapshot_tree(&t.p(".snapshots/s2")),
            &at_s2,
            "s2 after rollback",
        );
        t.remount();
        assert_same_tree(&snapshot_tree(&t.mnt), &at_s1, "rolled back, remounted");

        // Deleting every snapshot frees what only they held.
        write_file(&t.p("big"), b"gone");
        ok(t, &["delete", "s1", "s2"]);
        assert!(json(t, &["list"]).as_array().unwrap().is_empty());
        t.umount();
        let s = t.stats();
        let live = s["unique_bytes"].as_u64().unwrap();
        assert!(live < 400_000, "600 KB file no longer referenced: {s}");
        t.assert_fsck_clean();
    });
}

#[test]
fn names_errors_and_finding_the_store() {
    with_fs(|t| {
        t.mount();
        write_file(&t.p("f"), b"x");
        for (bad, why) in [
            ("a/b", "'/'"),
            (".hidden", "'.'"),
            (&"n".repeat(201)[..], "limit"),
        ] {
            let e = fails(t, &["create", bad]);
            assert!(e.contains(why) && e.contains("snapshot name"), "{bad}: {e}");
        }
        ok(t, &["create", "one"]);
        let e = fails(t, &["create", "one"]);
        assert!(e.contains("one") && e.contains("already exists"), "{e}");
        let e = fails(t, &["delete", "nope"]);
        assert!(e.contains("nope") && e.contains("does not exist"), "{e}");
        let e = fails(t, &["diff", "nope"]);
        assert!(e.contains("nope"), "{e}");
        // From inside the mount, and from the environment.
        let out = Command::new(SNAPCTL)
            .current_dir(t.p(""))
            .args(["create", "from-cwd"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Something for the diffs below to find.
        write_file(&t.p("g"), b"between");
        let out = Command::new(SNAPCTL)
            .env("DEDUPFS_STORE", &t.store)
            .current_dir("/")
            .args(["create", "from-env"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        t.umount();
        // Unmounted: snapctl opens the store itself.
        let store = t.store.to_str().unwrap().to_string();
        let s = store.as_str();
        let out = snapctl(&["-s", s, "create", "offline"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = snapctl(&["-s", s, "--json", "list"]);
        let list: Value = serde_json::from_slice(&out.stdout).unwrap();
        let names: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["one", "from-cwd", "from-env", "offline"]);
        // list, show and a diff of two snapshots read the records without
        // a volume; they must answer what the daemon answers.
        let offline_diff = snapctl(&["-s", s, "--json", "diff", "one", "from-env"]);
        assert!(offline_diff.status.success());
        let offline_diff: Value = serde_json::from_slice(&offline_diff.stdout).unwrap();
        assert!(offline_diff.to_string().contains("/g"), "{offline_diff}");
        let shown = snapctl(&["-s", s, "--json", "show", "offline"]);
        let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
        assert_eq!(shown["name"], "offline");
        let missing = snapctl(&["-s", s, "show", "nosuch"]);
        assert!(!missing.status.success());
        assert!(String::from_utf8_lossy(&missing.stderr).contains("nosuch"));
        t.mount();
        let online_diff = snapctl(&["-s", s, "--json", "diff", "one", "from-env"]);
        let online_diff: Value = serde_json::from_slice(&online_diff.stdout).unwrap();
        assert_eq!(offline_diff, online_diff);
        t.umount();
        assert!(
            snapctl(&["-s", s, "delete", "one", "offline"])
                .status
                .success()
        );
        t.assert_fsck_clean();
        // The mount option shows .snapshots in the root's listing.
        t.options = vec!["snapdir=visible".into()];
        t.mount();
        let names: Vec<_> = fs::read_dir(&t.mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(names.iter().any(|n| n == ".snapshots"), "{names:?}");
        assert!(t.p(".snapshots/from-env/f").exists());
    });
}

#[test]
fn policy_timer_takes_and_prunes() {
    with_fs(|t| {
        t.mount();
        write_file(&t.p("f"), b"x");
        ok(t, &["create", "manual"]);
        ok(t, &["policy", "set", "--every", "1s", "--keep-last", "2"]);
        let p = json(t, &["policy", "show"]);
        assert_eq!(p["every_secs"], 1);
        assert_eq!(p["keep_last"], 2);
        std::thread::sleep(std::time::Duration::from_millis(4500));
        ok(t, &["policy", "set"]); // timer off, no rules
        let list = json(t, &["list"]);
        let auto: Vec<&Value> = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["auto"] == true)
            .collect();
        assert!(
            !auto.is_empty(),
            "the timer took no snapshot: {list}\n{}",
            t.log()
        );
        assert!(auto.len() <= 2, "keep-last 2 not applied: {list}");
        assert!(
            list.as_array()
                .unwrap()
                .iter()
                .any(|s| s["name"] == "manual")
        );
        // By hand: a dry run names, a real run deletes, manual ones stay.
        ok(t, &["policy", "set", "--keep-last", "1"]);
        let dry = json(t, &["prune", "--dry-run"]);
        let would = dry["would_delete"].as_array().unwrap().len();
        assert_eq!(would, auto.len() - 1, "{dry}");
        assert_eq!(
            json(t, &["list"]).as_array().unwrap().len(),
            list.as_array().unwrap().len()
        );
        let done = json(t, &["prune"]);
        assert_eq!(done["deleted"].as_array().unwrap().len(), would);
        let left = json(t, &["list"]);
        assert!(
            left.as_array()
                .unwrap()
                .iter()
                .any(|s| s["name"] == "manual")
        );
        t.umount();
        t.assert_fsck_clean();
    });
}
