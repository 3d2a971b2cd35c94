//! Real programs in the mount, as a home directory runs them: git (many
//! small files, renames over existing names, packing with mmap) and SQLite
//! in WAL mode from two processes at once (shared writable mmap of the
//! -shm file, fsync on every commit). Each checks its own data with its own
//! tool, again after a remount, and fsck of the store stays clean.
//! `scripts/test` installs git and python3.

use std::path::Path;
use std::process::Command;

use crate::harness::*;

/// Runs a program in `dir`; panics with its output (and the daemon log)
/// unless it succeeds. Returns stdout.
#[track_caller]
fn run(t: &TestFs, dir: &Path, prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.org")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.org")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}):\n{}{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        t.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(prog: &str) -> bool {
    Command::new(prog)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn git_repository_lives_in_the_mount() {
    if !have("git") {
        eprintln!("git missing: scripts/test installs it");
        return;
    }
    with_fs(|t| {
        t.mount();
        let repo = t.p("repo");
        std::fs::create_dir(&repo).unwrap();
        let mut rng = Rng::new(seed(41));
        for d in 0..12 {
            let dir = repo.join(format!("dir{d}"));
            std::fs::create_dir(&dir).unwrap();
            for f in 0..25 {
                let n = 200 + rng.below(20_000) as usize;
                let text: Vec<u8> = rng.bytes(n).iter().map(|b| b'a' + b % 26).collect();
                write_file(&dir.join(format!("f{f}.txt")), &text);
            }
        }
        run(t, &repo, "git", &["init", "-q", "-b", "main"]);
        run(t, &repo, "git", &["add", "-A"]);
        run(t, &repo, "git", &["commit", "-q", "-m", "one"]);
        // Edit, rename and delete, as work on a branch does.
        for d in 0..12 {
            let dir = repo.join(format!("dir{d}"));
            let mut text = read_file(&dir.join("f0.txt"));
            text.extend_from_slice(b"\nchanged\n");
            write_file(&dir.join("f0.txt"), &text);
            std::fs::rename(dir.join("f1.txt"), dir.join("moved.txt")).unwrap();
            std::fs::remove_file(dir.join("f2.txt")).unwrap();
        }
        run(t, &repo, "git", &["checkout", "-q", "-b", "topic"]);
        run(t, &repo, "git", &["add", "-A"]);
        run(t, &repo, "git", &["commit", "-q", "-m", "two"]);
        run(t, &repo, "git", &["checkout", "-q", "main"]);
        assert!(
            repo.join("dir3/f2.txt").exists(),
            "checkout did not restore f2"
        );
        run(t, &repo, "git", &["merge", "-q", "--ff-only", "topic"]);
        run(
            t,
            &repo,
            "git",
            &["gc", "-q", "--aggressive", "--prune=now"],
        );
        run(
            t,
            &repo,
            "git",
            &["fsck", "--full", "--strict", "--no-dangling"],
        );
        let status = run(t, &repo, "git", &["status", "--porcelain"]);
        assert_eq!(status, "", "git status after gc");
        t.remount();
        run(
            t,
            &repo,
            "git",
            &["fsck", "--full", "--strict", "--no-dangling"],
        );
        let status = run(t, &repo, "git", &["status", "--porcelain"]);
        assert_eq!(status, "", "git status after remount");
        let log = run(t, &repo, "git", &["log", "--format=%s"]);
        assert_eq!(log, "two\none\n");
        t.umount();
        t.assert_fsck_clean();
    });
}

/// Two processes commit to one WAL database at once, 300 transactions
/// each; SQLite's own integrity check and the row count must hold, also
/// after VACUUM and a remount.
#[test]
fn sqlite_wal_from_two_processes() {
    if !have("python3") {
        eprintln!("python3 missing: scripts/test installs it");
        return;
    }
    const SCRIPT: &str = r#"
import multiprocessing, os, sqlite3, sys
db = sys.argv[1]
def work(n):
    c = sqlite3.connect(db, timeout=120)
    c.execute('pragma journal_mode=wal')
    c.execute('pragma mmap_size=268435456')
    for i in range(300):
        c.execute('insert into t(k, v) values (?, ?)', (n * 100000 + i, os.urandom(300 + i)))
        c.commit()
    c.close()
if __name__ == '__main__':
    c = sqlite3.connect(db)
    c.execute('pragma journal_mode=wal')
    c.execute('create table t(k integer primary key, v blob)')
    c.commit()
    c.close()
    ps = [multiprocessing.Process(target=work, args=(i,)) for i in range(2)]
    [p.start() for p in ps]
    [p.join() for p in ps]
    assert all(p.exitcode == 0 for p in ps), [p.exitcode for p in ps]
    c = sqlite3.connect(db)
    c.execute('vacuum')
    c.close()
"#;
    const CHECK: &str = r#"
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
print(c.execute('pragma integrity_check').fetchone()[0], c.execute('select count(*) from t').fetchone()[0])
"#;
    with_fs(|t| {
        t.mount();
        let db = t.p("db.sqlite");
        let db = db.to_str().unwrap();
        let mnt = t.mnt.clone();
        run(t, &mnt, "python3", &["-c", SCRIPT, db]);
        assert_eq!(run(t, &mnt, "python3", &["-c", CHECK, db]), "ok 600\n");
        t.remount();
        assert_eq!(run(t, &mnt, "python3", &["-c", CHECK, db]), "ok 600\n");
        t.umount();
        t.assert_fsck_clean();
    });
}
