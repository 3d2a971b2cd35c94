//! POSIX ACLs as ext4 keeps them. Copies from a plain disk (`cp -a`,
//! `cp -p`, `mv`, `rsync -aA`) keep every mode, ACL, owner and time; the
//! kernel enforces the copied ACLs for other users; one script of ACL
//! changes run on the backing disk (ext4 where these tests run) and on the
//! mount gives the same modes, ACLs, errors and inheritance; a snapshot
//! shows the ACLs a file had when it was taken.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::*;

const ACCESS: &[u8] = b"system.posix_acl_access";
const DEFAULT: &[u8] = b"system.posix_acl_default";

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Root, FUSE, and the ACL tools; says which is missing.
fn can_run(tools: &[&str]) -> bool {
    if !sys::is_root() {
        eprintln!("skipping: needs root (chown, other users)");
        return false;
    }
    for t in tools {
        if !have(t) {
            eprintln!("skipping: {t} is not installed (scripts/test installs it)");
            return false;
        }
    }
    true
}

/// Runs `script` with sh in `dir`; its stdout and stderr together.
fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("exec 2>&1\n{script}"))
        .current_dir(dir)
        .output()
        .expect("running sh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command, panicking with its output if it fails.
fn must(cmd: &str, args: &[&Path]) {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `cmd` succeeds as uid/gid with no supplementary groups.
fn as_user(uid: u32, gid: u32, cmd: &str, path: &Path) -> bool {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .args(["sh", "-c", cmd, "sh"])
        .arg(path)
        .output()
        .expect("running setpriv")
        .status
        .success()
}

/// A temp dir on the backing disk that other users may enter.
fn open_tempdir(prefix: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(std::env::temp_dir())
        .expect("tempdir");
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).expect("chmod tempdir");
    d
}

/// A mount that other users may reach.
fn open_mount(t: &mut TestFs) {
    if let Some(parent) = t.mnt.parent() {
        fs::set_permissions(parent, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    t.options = vec!["allow_other".into(), "snapdir=visible".into()];
    t.mount();
}

/// The source tree: every mode, setuid and setgid, an extended ACL with a
/// named user and group, a named user denied what others may do, a foreign
/// owner, and a directory with a default ACL and entries that inherited it.
const TREE: &str = r#"
set -e
umask 022
mkdir tree
cd tree
for m in 600 644 700 755 777 4755 2755 6750; do echo "mode $m" > f$m; chmod $m f$m; done
echo ext > ext; chmod 640 ext; setfacl -m u:1234:r,g:2345:rw ext
echo deny > deny; chmod 644 deny; setfacl -m u:1234:- deny
echo owned > owned; chown 1234:2345 owned; chmod 2750 owned
mkdir d700 d755 dsgid dacl
echo x > d700/in; echo y > d755/in
chmod 700 d700; chmod 755 d755; chmod 2775 dsgid
setfacl -m u:1234:rwx,d:u:1234:rx,d:g:2345:rwx,d:o::- dacl
echo inherited > dacl/file; mkdir dacl/sub; echo z > dacl/sub/deep
ln -s ext link
find . -depth -exec touch -h -d '2020-02-02 02:02:02.123456789' {} +
echo built
"#;

/// What must match between a source path and its copy.
#[derive(Debug, PartialEq)]
struct Seen {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    access: Result<Vec<u8>, i32>,
    default: Result<Vec<u8>, i32>,
    acl_names: Vec<Vec<u8>>,
}

fn seen(p: &Path) -> Seen {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let link = m.file_type().is_symlink();
    let get = |n| if link { Err(0) } else { sys::getxattr(p, n) };
    Seen {
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        mtime: (m.mtime(), m.mtime_nsec()),
        access: get(ACCESS),
        default: get(DEFAULT),
        acl_names: sys::listxattr(p)
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.starts_with(b"system.posix_acl"))
            .collect(),
    }
}

/// Every path under `root`, relative, parents first.
fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    let mut names: Vec<_> = fs::read_dir(root.join(rel))
        .expect("read_dir")
        .map(|e| e.expect("dirent").file_name())
        .collect();
    names.sort();
    for n in names {
        let r = rel.join(n);
        out.push(r.clone());
        if fs::symlink_metadata(root.join(&r)).is_ok_and(|m| m.is_dir()) {
            walk(root, &r, out);
        }
    }
}

fn assert_same_acls_and_owners(src: &Path, copy: &Path, how: &str) {
    let mut paths = vec![PathBuf::new()];
    walk(src, Path::new(""), &mut paths);
    for rel in paths {
        assert_eq!(
            seen(&copy.join(&rel)),
            seen(&src.join(&rel)),
            "{how}: {} differs from the source",
            rel.display()
        );
    }
}

/// The source's ACLs hold for other users in `tree`.
fn assert_enforced(tree: &Path, how: &str) {
    let cat = "cat \"$1\" >/dev/null";
    let p = |r: &str| tree.join(r);
    let cases: [(u32, u32, &str, &str, bool); 10] = [
        (1234, 1234, cat, "ext", true),
        (1234, 1234, cat, "deny", false),
        (4321, 4321, cat, "deny", true),
        (2222, 2345, cat, "ext", true),
        (2222, 2222, cat, "ext", false),
        (1234, 1234, "printf w >> \"$1\"", "ext", false),
        (1234, 1234, cat, "f600", false),
        (1234, 1234, cat, "f644", true),
        (1234, 1234, cat, "dacl/sub/deep", true),
        (4321, 4321, cat, "dacl/file", false),
    ];
    for (uid, gid, cmd, rel, want) in cases {
        assert_eq!(
            as_user(uid, gid, cmd, &p(rel)),
            want,
            "{how}: `{cmd}` on {rel} as {uid}:{gid} should {}",
            if want { "succeed" } else { "be refused" }
        );
    }
}

#[test]
fn acl_copies_keep_modes_acls_owners_and_times() {
    if !can_run(&["setfacl", "getfacl", "setpriv", "cp"]) {
        return;
    }
    let src = open_tempdir("dedupfs-acl-src-");
    assert!(
        sh(src.path(), TREE).ends_with("built\n"),
        "building the tree"
    );
    let tree = src.path().join("tree");
    // The expectations hold on the backing disk: they test the test.
    assert_enforced(&tree, "source");
    with_fs(|t| {
        open_mount(t);
        let mut copies: Vec<(&str, PathBuf)> = Vec::new();
        must("cp", &[Path::new("-a"), &tree, &t.p("cpa")]);
        copies.push(("cp -a", t.p("cpa")));
        must("cp", &[Path::new("-rp"), &tree, &t.p("cpp")]);
        copies.push(("cp -p", t.p("cpp")));
        let moving = src.path().join("moving");
        must("cp", &[Path::new("-a"), &tree, &moving]);
        must("mv", &[&moving, &t.p("mv")]);
        copies.push(("mv", t.p("mv")));
        if have("rsync") {
            let from = PathBuf::from(format!("{}/", tree.display()));
            must("rsync", &[Path::new("-aA"), &from, &t.p("rs")]);
            copies.push(("rsync -aA", t.p("rs")));
        } else {
            eprintln!("rsync is not installed: rsync -aA not checked (scripts/test installs it)");
        }
        for (how, copy) in &copies {
            assert_same_acls_and_owners(&tree, copy, how);
            assert_enforced(copy, how);
        }
        // And from the committed state.
        t.remount();
        for (how, copy) in &copies {
            assert_same_acls_and_owners(&tree, copy, how);
            assert_enforced(copy, how);
        }
        t.umount();
        t.assert_fsck_clean();
    });
}

/// ACL changes, inheritance and refusals, run once on the backing disk and
/// once on the mount; `state` lists the result.
const CHANGES: &str = r#"
state() { for f in "$@"; do stat -c '%n %A %a %u:%g' "$f"; getfacl -cpn "$f" | sed 's/^/  /'; done; }
mkdir d; setfacl -m d:u:1234:rwx,d:g:2345:rx,d:o::- d; echo "default acl: $?"
umask 077; touch d/f; mkdir d/sub; touch d/sub/g; mkfifo d/fifo; ln -s f d/l
mkdir plain; setfacl -d -m u::rwx,g::rx,o::rx plain
umask 027; touch p; mkdir pd; touch plain/f; mkdir plain/sub
state d d/f d/sub d/sub/g d/fifo p pd plain plain/f plain/sub
chmod 640 d/f; chmod 705 d/sub; state d/f d/sub
touch m; setfacl -m u::rwx,g::r,o::- m; state m
touch e; setfacl -m u:1234:rw,g:2345:r e; state e
setfacl -m m::r e; state e
chmod 777 e; state e
setfacl -x u:1234 e; state e
setfacl -b e; state e
touch s; chown 1234:2345 s; chmod 2770 s
setpriv --reuid=1234 --regid=1234 --clear-groups setfacl -m u:5:r s; echo "non-member: $?"; state s
touch s2; chown 1234:2345 s2; chmod 2770 s2
setpriv --reuid=1234 --regid=2345 --clear-groups setfacl -m u:5:r s2; echo "member: $?"; state s2
touch o; setpriv --reuid=1234 --regid=1234 --clear-groups setfacl -m u:5:r o; echo "non-owner: $?"
setfacl -d -m u:5:r o; echo "default on a file: $?"
setfacl -k d/sub; state d/sub
ls -ld d d/f d/sub m e s s2 o p | cut -c1-11
"#;

/// The errnos of raw xattr calls on the ACL names, for `dir` after CHANGES.
fn raw_errnos(dir: &Path) -> Vec<(&'static str, Result<(), i32>)> {
    let ok = |r: Result<Vec<u8>, i32>| r.map(|_| ());
    let basic = [
        2u8, 0, 0, 0, 1, 0, 6, 0, 255, 255, 255, 255, 4, 0, 4, 0, 255, 255, 255, 255,
    ];
    let mut full = basic.to_vec();
    full.extend_from_slice(&[32, 0, 4, 0, 255, 255, 255, 255]);
    let mut bad_version = full.clone();
    bad_version[0] = 3;
    vec![
        ("get missing", ok(sys::getxattr(&dir.join("p"), ACCESS))),
        (
            "get default missing",
            ok(sys::getxattr(&dir.join("pd"), DEFAULT)),
        ),
        (
            "set malformed",
            sys::setxattr(&dir.join("o"), ACCESS, &basic, 0),
        ),
        (
            "set bad version",
            sys::setxattr(&dir.join("o"), ACCESS, &bad_version, 0),
        ),
        (
            "set default on a file",
            sys::setxattr(&dir.join("o"), DEFAULT, &full, 0),
        ),
        ("remove missing", sys::removexattr(&dir.join("p"), ACCESS)),
        (
            "remove missing default",
            sys::removexattr(&dir.join("pd"), DEFAULT),
        ),
        (
            "set minimal",
            sys::setxattr(&dir.join("p"), ACCESS, &full, 0),
        ),
        ("then get", ok(sys::getxattr(&dir.join("p"), ACCESS))),
    ]
}

#[test]
fn acl_changes_and_inheritance_match_the_backing_disk() {
    if !can_run(&["setfacl", "getfacl", "setpriv", "mkfifo"]) {
        return;
    }
    let reference = open_tempdir("dedupfs-acl-ref-");
    let want = sh(reference.path(), CHANGES);
    let want_errnos = raw_errnos(reference.path());
    with_fs(|t| {
        open_mount(t);
        fs::create_dir(t.p("w")).unwrap();
        let got = sh(&t.p("w"), CHANGES);
        assert_eq!(
            got, want,
            "the mount (left) and the backing disk (right) differ"
        );
        assert_eq!(raw_errnos(&t.p("w")), want_errnos);

        // A snapshot shows the ACL under the mode the file had then.
        let before = sys::getxattr(&t.p("w/d/f"), ACCESS).expect("d/f has an ACL");
        let snapctl = env!("CARGO_BIN_EXE_snapctl");
        let out = Command::new(snapctl)
            .arg("-m")
            .arg(&t.mnt)
            .args(["create", "acl"])
            .output()
            .expect("snapctl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        fs::set_permissions(t.p("w/d/f"), fs::Permissions::from_mode(0o600)).unwrap();
        let after = sys::getxattr(&t.p("w/d/f"), ACCESS).expect("still an ACL");
        assert_ne!(after, before, "chmod changes the mask");
        let snap = t.p(".snapshots/acl/w");
        assert_eq!(sys::getxattr(&snap.join("d/f"), ACCESS), Ok(before));
        assert_eq!(
            sys::getxattr(&snap.join("d"), DEFAULT),
            sys::getxattr(&t.p("w/d"), DEFAULT)
        );
        assert_eq!(sys::getxattr(&snap.join("p"), ACCESS), Err(libc::ENODATA));
        assert!(as_user(1234, 1234, "cat \"$1\"", &snap.join("d/sub/g")));

        // The same after a remount.
        let listing = "state() { for f in \"$@\"; do stat -c '%n %a' \"$f\"; getfacl -cpn \"$f\"; done; }\n\
                       state d d/f d/sub d/sub/g e m p s s2";
        let live = sh(&t.p("w"), listing);
        t.remount();
        assert_eq!(sh(&t.p("w"), listing), live, "after remount");
        t.umount();
        t.assert_fsck_clean();
    });
}
