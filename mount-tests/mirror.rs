//! The mirror end to end (issue 15): a real target on loopback, two
//! hosts' daemons, `snapctl remote`, `restore --remote`, `dedupfs recover`.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Output};

use serde_json::Value;

use crate::harness::{Rng, TestFs, assert_same_tree, snapshot_tree};

const BIN: &str = env!("CARGO_BIN_EXE_dedupfs");
const SNAPCTL: &str = env!("CARGO_BIN_EXE_snapctl");

/// A `dedupfs serve` on a free loopback port, killed when dropped.
struct Target {
    child: Child,
    dir: tempfile::TempDir,
    url: String,
}

impl Target {
    fn start() -> Target {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(BIN)
            .args(["serve", "--store"])
            .arg(dir.path())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dedupfs serve");
        let url = format!("http://127.0.0.1:{port}");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Target { child, dir, url }
    }

    fn register(&self, host: &str, key: &str) {
        let out = Command::new(BIN)
            .args(["serve", "--store"])
            .arg(self.dir.path())
            .args(["client", "add", host, "--key", key])
            .output()
            .expect("client add");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn snapctl(t: &TestFs, args: &[&str]) -> Output {
    Command::new(SNAPCTL)
        .arg("-m")
        .arg(&t.mnt)
        .args(args)
        .env("DEDUPFS_PASSPHRASE", "correct horse")
        .output()
        .expect("snapctl")
}

fn json_ok(t: &TestFs, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = snapctl(t, &a);
    assert!(
        out.status.success(),
        "snapctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// Adds the remote as `host`, registers it, and pushes: the push's report.
fn add_and_push(t: &TestFs, target: &Target, host: &str) -> u64 {
    let added = json_ok(t, &["remote", "add", "origin", &target.url, "--host", host]);
    target.register(host, added["public_key"].as_str().expect("key"));
    push(t)
}

/// Pushes, then the bytes sent by the run that mirrored the newest
/// snapshot (the daemon's thread may have got there first).
fn push(t: &TestFs) -> u64 {
    json_ok(t, &["remote", "push", "origin"]);
    let st = json_ok(t, &["remote", "status", "origin"]);
    assert!(st[0]["last_error"].is_null(), "{st}");
    assert_eq!(st[0]["snapshots_behind"].as_u64(), Some(0), "{st}");
    st[0]["bytes_sent_last_run"].as_u64().expect("bytes sent")
}

fn write_tree(root: &Path, seed: u64) {
    let mut rng = Rng::new(seed);
    fs::create_dir_all(root.join("src/deep")).expect("mkdir");
    for i in 0..40 {
        let n = 1000 + rng.below(200_000) as usize;
        fs::write(root.join(format!("src/f{i}")), rng.bytes(n)).expect("write");
    }
    fs::write(root.join("src/deep/big"), rng.bytes(24 << 20)).expect("write");
    std::os::unix::fs::symlink("../f1", root.join("src/deep/link")).expect("symlink");
    fs::hard_link(root.join("src/f2"), root.join("src/f2-again")).expect("link");
    let f = fs::File::create(root.join("sparse")).expect("create");
    f.set_len(8 << 20).expect("truncate");
}

#[test]
fn two_hosts_share_blobs_restore_and_recover() {
    let target = Target::start();
    let mut a = TestFs::new();
    a.mount();
    write_tree(&a.mnt, 7);
    json_ok(&a, &["create", "s1"]);
    let first = add_and_push(&a, &target, "host-a");
    let first_bytes = first;
    assert!(first_bytes > 20 << 20, "first push sent {first_bytes}");

    // Another host, other keys, the same files: almost nothing to send.
    let mut b = TestFs::new();
    b.mount();
    write_tree(&b.mnt, 7);
    json_ok(&b, &["create", "b1"]);
    let second = add_and_push(&b, &target, "host-b");
    let second_bytes = second;
    assert!(
        second_bytes * 20 < first_bytes,
        "the second host sent {second_bytes} of the first's {first_bytes}"
    );

    // 1 MiB edited in the middle of the big file: about that much goes.
    let mut rng = Rng::new(99);
    let big = a.p("src/deep/big");
    let mut data = fs::read(&big).expect("read");
    data[12 << 20..13 << 20].copy_from_slice(&rng.bytes(1 << 20));
    fs::write(&big, &data).expect("write");
    json_ok(&a, &["create", "s2"]);
    let inc_bytes = push(&a);
    assert!(
        inc_bytes < (3 << 19) + (256 << 10),
        "incremental push sent {inc_bytes}"
    );

    eprintln!(
        "mirror bytes: first {first_bytes}, second host {second_bytes}, after a 1 MiB edit {inc_bytes}"
    );
    // Restore from the remote, byte for byte.
    let out = tempfile::tempdir().expect("tempdir");
    let dest = out.path().join("r");
    json_ok(
        &a,
        &[
            "restore",
            "--remote",
            "origin",
            "s1",
            "/",
            "--to",
            dest.to_str().expect("utf8"),
        ],
    );
    let want = snapshot_tree(&a.mnt.join(".snapshots/s1"));
    assert_same_tree(&snapshot_tree(&dest), &want, "restore --remote s1");

    // Recovery into an empty store: both snapshots, as they were.
    let rec = tempfile::tempdir().expect("tempdir");
    let store = rec.path().join("store");
    let r = Command::new(BIN)
        .args(["recover", "--remote", &target.url, "--host", "host-a"])
        .arg(&store)
        .env("DEDUPFS_PASSPHRASE", "correct horse")
        .output()
        .expect("recover");
    assert!(
        r.status.success(),
        "recover: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let mut c = TestFs::at(store, rec.path().join("mnt"));
    c.mount();
    for s in ["s1", "s2"] {
        let got = snapshot_tree(&c.mnt.join(".snapshots").join(s));
        let want = snapshot_tree(&a.mnt.join(".snapshots").join(s));
        assert_same_tree(&got, &want, &format!("recovered {s}"));
    }
    // The mirror continues: nothing new to send.
    let again = json_ok(&c, &["remote", "push", "origin"]);
    assert_eq!(again["blobs_sent"].as_u64(), Some(0), "{again}");
    c.umount();
    b.umount();
    a.umount();
}
