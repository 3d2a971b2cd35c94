//! The command line as a user meets it: stopping the daemon with a signal,
//! snapctl on a dead mount, closed pipes, a quiet log, what `stats`,
//! `snapctl diff`/`restore` report, and the wording of messages.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

const SNAPCTL: &str = env!("CARGO_BIN_EXE_snapctl");

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().expect("running")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn snapctl(t: &TestFs, args: &[&str]) -> Output {
    let mut full = vec!["-m", t.mnt.to_str().expect("utf-8 mountpoint")];
    full.extend_from_slice(args);
    run(SNAPCTL, &full)
}

fn snapctl_ok(t: &TestFs, args: &[&str]) -> String {
    let out = snapctl(t, args);
    let (o, e) = text(&out);
    assert!(
        out.status.success(),
        "snapctl {args:?} failed: {e}\n{}",
        t.log()
    );
    o
}

/// The whole daemon log (the harness shows only its tail).
fn full_log(t: &TestFs) -> String {
    fs::read_to_string(t.store.join("dedupfs.log")).unwrap_or_default()
}

#[test]
fn sigterm_with_a_file_open_stops_in_bounded_time_and_keeps_data() {
    with_fs(|t| {
        t.mount();
        write_file(&t.p("closed"), &vec![7u8; 300_000]);
        let mut held = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(t.p("held"))
            .unwrap();
        held.write_all(&vec![9u8; 200_000]).unwrap();
        held.sync_all().unwrap();
        let pid = t.signal_daemon(libc::SIGTERM);
        std::thread::sleep(Duration::from_millis(300));
        // A second signal is answered, not dropped silently.
        // SAFETY: kill(2) of the daemon of our own store.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        while t.daemon_pid().is_some() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the daemon did not exit within 20 s of SIGTERM\n{}",
                t.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The handle is dead now; the mount is gone from the table.
        drop(held);
        assert!(!is_mounted(&t.mnt), "mount still there after SIGTERM");
        let log = full_log(t);
        assert!(log.contains("detached"), "the stop is not logged:\n{log}");
        assert!(log.contains("already stopping"), "second signal:\n{log}");
        let w = warnings(t);
        assert!(w.is_empty(), "warnings in the log:\n{}", w.join("\n"));
        t.wait_store_unlocked(Duration::from_secs(30));
        t.assert_fsck_clean();
        t.mount();
        assert_eq!(read_file(&t.p("closed")), vec![7u8; 300_000]);
        assert_eq!(read_file(&t.p("held")), vec![9u8; 200_000]);
        t.umount();
    });
}

#[test]
fn snapctl_on_a_dead_mount_says_so_and_fails() {
    with_fs(|t| {
        t.mount();
        write_file(&t.p("f"), b"x");
        t.signal_daemon(libc::SIGKILL);
        t.wait_store_unlocked(Duration::from_secs(30));
        let s = t.store.to_str().unwrap();
        for out in [
            snapctl(t, &["create", "while-dead"]),
            run(SNAPCTL, &["-s", s, "create", "while-dead"]),
        ] {
            let (_, e) = text(&out);
            assert!(!out.status.success(), "snapctl succeeded on a dead mount");
            assert!(
                e.contains("dead") && e.contains("fusermount3 -u"),
                "no recovery advice: {e}"
            );
        }
        // Nothing was taken, and the store is free to mount again.
        let _ = Command::new("fusermount3").arg("-uz").arg(&t.mnt).status();
        t.mount();
        let list = snapctl_ok(t, &["--json", "list"]);
        assert!(!list.contains("while-dead"), "{list}");
        t.umount();
    });
}

/// The log lines at WARN or ERROR.
fn warnings(t: &TestFs) -> Vec<String> {
    full_log(t)
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(String::from)
        .collect()
}

#[test]
fn a_closed_pipe_ends_commands_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let files = dir.path().join("files");
    fs::create_dir(&files).unwrap();
    for i in 0..3000 {
        fs::write(
            files.join(format!("object-with-a-longish-name-{i:05}")),
            b"x",
        )
        .unwrap();
    }
    let s = store.to_str().unwrap();
    assert!(run(BIN, &["init", s]).status.success());
    let put = run(BIN, &["object", "put", s, files.to_str().unwrap()]);
    assert!(put.status.success(), "{:?}", text(&put));
    for args in [vec!["object", "ls", s], vec!["object", "ls", s, "--json"]] {
        let mut child = Command::new(BIN)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Read one line, then close the pipe (what `| head -1` does).
        let mut line = String::new();
        let mut r = std::io::BufReader::new(child.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut r, &mut line).unwrap();
        drop(r);
        let out = child.wait_with_output().unwrap();
        let (_, e) = text(&out);
        assert!(
            !e.contains("panicked") && !e.contains("Broken pipe") && e.is_empty(),
            "{args:?} on a closed pipe: {e}"
        );
        assert!(out.status.success(), "{args:?}: {:?}", out.status);
    }
    // snapctl too: a reader gone before anything is written.
    assert!(run(SNAPCTL, &["-s", s, "create", "one"]).status.success());
    for args in [
        vec!["-s", s, "list"],
        vec!["-s", s, "--json", "show", "one"],
    ] {
        let mut child = Command::new(SNAPCTL)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let (_, e) = text(&out);
        assert!(e.is_empty(), "snapctl {args:?} on a closed pipe: {e}");
        assert!(out.status.success(), "snapctl {args:?}: {:?}", out.status);
    }
}

#[test]
fn ioctls_and_unmount_log_no_warnings() {
    with_fs(|t| {
        t.mount();
        fs::create_dir(t.p("d")).unwrap();
        write_file(&t.p("d/f"), b"hello\n");
        let f = t.p("d/f");
        let f = f.to_str().unwrap();
        let py = Command::new("python3")
            .arg("-c")
            .arg(
                r#"
import fcntl, struct, sys, errno
p = sys.argv[1]
assert open(p).read() == "hello\n"
with open(p, "rb") as fh:
    flags = fcntl.ioctl(fh, 0x80086601, b"\0" * 8)   # FS_IOC_GETFLAGS
    assert flags == b"\0" * 8, flags
    x = fcntl.ioctl(fh, 0x801c581f, b"\0" * 28)      # FS_IOC_FSGETXATTR
    assert x == b"\0" * 28, x
    try:
        fcntl.ioctl(fh, 0x5401, b"\0" * 60)            # TCGETS
        raise SystemExit("TCGETS succeeded")
    except OSError as e:
        assert e.errno == errno.ENOTTY, e
"#,
            )
            .arg(f)
            .output()
            .unwrap();
        assert!(py.status.success(), "python: {:?}", text(&py));
        let ls = run("lsattr", &[f]);
        let (o, e) = text(&ls);
        assert!(ls.status.success(), "lsattr: {e}");
        assert!(o.starts_with("----"), "lsattr: {o}");
        assert!(
            run("lsattr", &["-d", t.p("d").to_str().unwrap()])
                .status
                .success()
        );
        // Setting no flags is fine; setting one we do not keep is refused.
        assert!(run("chattr", &["=", f]).status.success());
        let ch = run("chattr", &["+A", f]);
        let (_, e) = text(&ch);
        assert!(
            !ch.status.success() && e.contains("not supported"),
            "chattr +A: {e}"
        );
        t.umount();
        let w = warnings(t);
        assert!(w.is_empty(), "warnings in the log:\n{}", w.join("\n"));
    });
}

#[test]
fn stats_logical_bytes_are_the_apparent_size_of_the_tree() {
    with_fs(|t| {
        t.mount();
        let mut rng = Rng::new(seed(12));
        let mut sum = 0u64;
        fs::create_dir(t.p("small")).unwrap();
        for i in 0..50 {
            let data = rng.bytes(10 + i * 37);
            sum += data.len() as u64;
            write_file(&t.p(format!("small/{i}")), &data);
        }
        // One block four times over: its chunks repeat inside the file.
        let block = rng.bytes(300_000);
        let mut rep = Vec::new();
        for _ in 0..4 {
            rep.extend_from_slice(&block);
        }
        sum += rep.len() as u64;
        write_file(&t.p("repeated"), &rep);
        // A hard link counts once, as du counts it.
        fs::hard_link(t.p("repeated"), t.p("link")).unwrap();
        let big = rng.bytes(1_000_000);
        sum += big.len() as u64;
        write_file(&t.p("big"), &big);
        t.umount();
        let s = t.stats();
        assert_eq!(s["logical_bytes"].as_u64(), Some(sum), "stats: {s}");
    });
}

fn diff_json(t: &TestFs, snap: &str) -> Vec<serde_json::Value> {
    let out = snapctl_ok(t, &["--json", "diff", snap]);
    serde_json::from_str::<serde_json::Value>(&out)
        .expect("diff json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn diff_after_rollback_is_empty() {
    with_fs(|t| {
        t.mount();
        let mut rng = Rng::new(seed(21));
        fs::create_dir(t.p("dir")).unwrap();
        write_file(&t.p("dir/big"), &rng.bytes(400_000));
        write_file(&t.p("small"), b"inline\n");
        write_file(&t.p("gone"), &rng.bytes(100_000));
        sys::setxattr(&t.p("small"), b"user.k", b"v1", 0).unwrap();
        snapctl_ok(t, &["create", "s"]);
        let mut more = read_file(&t.p("dir/big"));
        more.extend_from_slice(&rng.bytes(50_000));
        write_file(&t.p("dir/big"), &more);
        write_file(&t.p("small"), b"changed\n");
        sys::setxattr(&t.p("small"), b"user.k", b"v2", 0).unwrap();
        fs::remove_file(t.p("gone")).unwrap();
        write_file(&t.p("new"), b"new\n");
        assert!(!diff_json(t, "s").is_empty());
        snapctl_ok(t, &["rollback", "s"]);
        let d = diff_json(t, "s");
        assert!(d.is_empty(), "diff after rollback: {d:?}");
        t.umount();
    });
}

#[test]
fn a_file_replaced_by_rename_shows_as_modified() {
    with_fs(|t| {
        t.mount();
        let mut rng = Rng::new(seed(22));
        write_file(&t.p("edited"), &rng.bytes(30_000));
        write_file(&t.p("same"), b"unchanged\n");
        snapctl_ok(t, &["create", "s"]);
        // How editors and git save: write a new file, rename it over.
        write_file(&t.p(".edited.swp"), &rng.bytes(31_000));
        fs::rename(t.p(".edited.swp"), t.p("edited")).unwrap();
        write_file(&t.p(".same.tmp"), b"unchanged\n");
        fs::rename(t.p(".same.tmp"), t.p("same")).unwrap();
        let d = diff_json(t, "s");
        assert_eq!(d.len(), 1, "diff: {d:?}");
        assert_eq!(d[0]["change"], "modified", "diff: {d:?}");
        assert_eq!(d[0]["path"], "/edited", "diff: {d:?}");
        assert_eq!(d[0]["size_before"], 30_000, "diff: {d:?}");
        assert_eq!(d[0]["size"], 31_000, "diff: {d:?}");
        let text = snapctl_ok(t, &["diff", "s"]);
        assert!(text.starts_with("M /edited"), "{text}");
        t.umount();
    });
}

#[test]
fn restore_to_a_path_outside_the_mount_copies_out() {
    with_fs(|t| {
        t.mount();
        let mut rng = Rng::new(seed(23));
        fs::create_dir_all(t.p("dir/sub")).unwrap();
        let big = rng.bytes(500_000);
        write_file(&t.p("dir/big"), &big);
        write_file(&t.p("dir/sub/small"), b"small\n");
        std::os::unix::fs::symlink("sub/small", t.p("dir/link")).unwrap();
        sys::setxattr(&t.p("dir/big"), b"user.tag", b"blue", 0).unwrap();
        fs::set_permissions(
            t.p("dir/big"),
            std::os::unix::fs::PermissionsExt::from_mode(0o640),
        )
        .unwrap();
        sys::utimens(&t.p("dir/sub/small"), (1_000_000, 0), (1_500_000_000, 7)).unwrap();
        snapctl_ok(t, &["create", "s"]);
        write_file(&t.p("dir/big"), b"overwritten");
        fs::remove_file(t.p("dir/sub/small")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("copy");
        let said = snapctl_ok(
            t,
            &[
                "restore",
                "s",
                t.p("dir").to_str().unwrap(),
                "--to",
                dest.to_str().unwrap(),
            ],
        );
        assert!(said.contains("2 files"), "{said}");
        assert_eq!(read_file(&dest.join("big")), big);
        assert_eq!(read_file(&dest.join("sub/small")), b"small\n");
        assert_eq!(
            fs::read_link(dest.join("link")).unwrap(),
            Path::new("sub/small")
        );
        assert_eq!(
            fs::metadata(dest.join("big")).unwrap().mode() & 0o7777,
            0o640
        );
        assert_eq!(
            sys::getxattr(&dest.join("big"), b"user.tag").unwrap(),
            b"blue"
        );
        let m = fs::metadata(dest.join("sub/small")).unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_500_000_000, 7));
        // One file, and a destination that exists is refused.
        let one = out.path().join("one");
        snapctl_ok(
            t,
            &[
                "restore",
                "s",
                "/dir/sub/small",
                "--to",
                one.to_str().unwrap(),
            ],
        );
        assert_eq!(read_file(&one), b"small\n");
        let again = snapctl(
            t,
            &[
                "restore",
                "s",
                "/dir/sub/small",
                "--to",
                one.to_str().unwrap(),
            ],
        );
        let (_, e) = text(&again);
        assert!(!again.status.success() && e.contains("exists"), "{e}");
        // The live tree is untouched.
        assert_eq!(read_file(&t.p("dir/big")), b"overwritten");
        t.umount();
    });
}

#[test]
fn messages_read_well() {
    with_fs(|t| {
        t.mount();
        write_file(&t.p("one"), b"1\n");
        // A store given by a relative path, in use: named once, as given
        // or in full, not "store store". (gc works on a mounted store, so
        // the refusal comes from fsck --repair, which needs it unmounted.)
        let parent = t.store.parent().unwrap();
        let canonical = fs::canonicalize(&t.store).unwrap();
        let out = Command::new(BIN)
            .current_dir(parent)
            .args(["fsck", "--repair", "store"])
            .output()
            .unwrap();
        let (_, e) = text(&out);
        assert!(!out.status.success());
        assert!(!e.contains("store store"), "{e}");
        assert_eq!(e.matches(canonical.to_str().unwrap()).count(), 1, "{e}");
        let mnt2 = parent.join("mnt2");
        fs::create_dir(&mnt2).unwrap();
        let out = Command::new(BIN)
            .current_dir(parent)
            .args(["mount", "store", "mnt2"])
            .output()
            .unwrap();
        let (_, e) = text(&out);
        assert!(!out.status.success());
        assert_eq!(e.matches("dedupfs:").count(), 1, "{e}");
        // Mounting again where it is mounted says so (it said nothing and
        // succeeded: the mount it waited for was already there).
        let out = run(
            BIN,
            &["mount", t.store.to_str().unwrap(), t.mnt.to_str().unwrap()],
        );
        let (_, e) = text(&out);
        assert!(!out.status.success() && e.contains("already"), "{e}");
        // Plurals.
        snapctl_ok(t, &["create", "s", "--label", "why=test"]);
        let two = t.p("two");
        let said = snapctl_ok(t, &["restore", "s", "/one", "--to", two.to_str().unwrap()]);
        assert!(said.contains(" 1 file,"), "{said}");
        let said = snapctl_ok(t, &["rollback", "s"]);
        assert!(!said.contains(" 1 records"), "{said}");
        // policy show: a table by default, JSON with --json.
        let said = snapctl_ok(t, &["policy", "show"]);
        assert!(!said.trim_start().starts_with('{'), "{said}");
        assert!(said.contains("every") && said.contains("keep"), "{said}");
        let js = snapctl_ok(t, &["--json", "policy", "show"]);
        serde_json::from_str::<serde_json::Value>(&js).expect("policy json");
        // show: the whole record.
        let said = snapctl_ok(t, &["show", "s"]);
        for want in [
            "generation",
            "why=test",
            "created",
            "used",
            "refer",
            "files",
        ] {
            assert!(
                said.to_lowercase().contains(want),
                "show lacks {want}: {said}"
            );
        }
        t.umount();
        // object ls: a header unless --json.
        let s = t.store.to_str().unwrap();
        let ls = run(BIN, &["object", "ls", s]);
        let (o, _) = text(&ls);
        assert!(
            o.starts_with("SIZE") || o.contains("NAME"),
            "object ls: {o}"
        );
        let fsck = run(BIN, &["fsck", s]);
        let (o, _) = text(&fsck);
        assert!(!o.contains(" 1 chunks") && !o.contains(" 1 objects"), "{o}");
        // Real help on every subcommand.
        for sub in ["init", "stats", "fsck", "gc", "mount", "umount", "object"] {
            let h = run(BIN, &[sub, "--help"]);
            let (o, _) = text(&h);
            assert!(
                o.contains("Example"),
                "dedupfs {sub} --help has no example:\n{o}"
            );
        }
        for sub in ["put", "get", "rm", "ls"] {
            let h = run(BIN, &["object", sub, "--help"]);
            let (o, _) = text(&h);
            assert!(o.contains("Example"), "dedupfs object {sub} --help:\n{o}");
        }
    });
}
