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
        t.signal_daemon(libc::SIGTERM);
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
