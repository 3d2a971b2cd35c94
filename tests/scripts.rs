//! scripts/mount on a machine that lacks everything, with apt, cargo,
//! rustc and install replaced by stubs that record their arguments.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn stub(dir: &Path, name: &str, body: &str) {
    let p = dir.join(name);
    fs::write(&p, format!("#!/bin/bash\n{body}\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn mount_script_installs_what_a_fresh_machine_lacks() {
    let t = tempfile::tempdir().unwrap();
    let bin = t.path().join("bin");
    let prefix = t.path().join("prefix");
    let home = t.path().join("home");
    for d in [&bin, &prefix, &home] {
        fs::create_dir(d).unwrap();
    }
    // The few real tools the script uses; no fusermount3, cc, pkg-config.
    for tool in [
        "bash", "dirname", "id", "sed", "cut", "sort", "head", "mkdir", "cat", "cp", "mktemp",
        "find", "rm",
    ] {
        let real = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} not found"));
        std::os::unix::fs::symlink(real, bin.join(tool)).unwrap();
    }
    let log = t.path().join("log");
    let l = log.display();
    let ver = t.path().join("rustc-version");
    fs::write(&ver, "1.63.0").unwrap();
    let v = ver.display();
    // Installing the rustup package brings rustup.
    let later = t.path().join("later");
    fs::create_dir(&later).unwrap();
    stub(
        &bin,
        "apt-get",
        &format!(
            "echo \"apt-get $*\" >> {l}; case \"$*\" in *rustup*) cp {0}/rustup {1}/rustup;; esac",
            later.display(),
            bin.display()
        ),
    );
    stub(
        &bin,
        "apt-cache",
        "echo 'rustup:'; echo '  Candidate: 1.27.1-1'",
    );
    stub(&bin, "rustc", &format!("echo \"rustc $(cat {v}) (stub)\""));
    stub(
        &later,
        "rustup",
        &format!("echo \"rustup $*\" >> {l}; echo 1.90.0 > {v}"),
    );
    stub(&bin, "cargo", &format!("echo \"cargo $*\" >> {l}"));
    stub(&bin, "install", &format!("echo \"install $*\" >> {l}"));
    // PREFIX is a prefix: the installed command is PREFIX/bin/dedupfs.
    fs::create_dir(prefix.join("bin")).unwrap();
    stub(
        &prefix.join("bin"),
        "dedupfs",
        &format!("echo \"dedupfs $*\" >> {l}"),
    );
    // What cargo would have built, in CARGO_TARGET_DIR: `generate DIR`
    // writes a manual page there, as the real commands do.
    let built = t.path().join("target/release");
    fs::create_dir_all(&built).unwrap();
    for name in ["dedupfs", "snapctl"] {
        stub(
            &built,
            name,
            &format!(
                "echo \"built-{name} $*\" >> {l}; mkdir -p \"$2/man/man1\"; echo page > \"$2/man/man1/{name}.1\""
            ),
        );
    }
    let out = Command::new(bin.join("bash"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/mount"))
        .arg(t.path().join("store"))
        .arg(t.path().join("mnt"))
        .env_clear()
        .env("PATH", &bin)
        .env("HOME", &home)
        .env("PREFIX", &prefix)
        .env("CARGO_TARGET_DIR", t.path().join("target"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    let log = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        out.status.success(),
        "{said}\n{}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = log.lines().collect();
    let has = |want: &str| lines.iter().any(|l| l.contains(want));
    // apt waits for a lock another apt holds.
    assert!(
        lines
            .iter()
            .filter(|l| l.starts_with("apt-get"))
            .all(|l| l.contains("DPkg::Lock::Timeout=600")),
        "{log}"
    );
    assert!(
        has("install -y -qq fuse3 build-essential pkg-config"),
        "{log}"
    );
    assert!(
        has("install -y -qq rustup") && has("rustup default stable"),
        "{log}"
    );
    // cargo's own progress shows (no --quiet), and both binaries go on PATH.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("cargo build --release") && !l.contains("quiet")),
        "{log}"
    );
    assert!(has("release/dedupfs") && has("release/snapctl"), "{log}");
    // Manual pages (and completions) generated and installed under share/.
    assert!(
        has("built-dedupfs generate") && has("built-snapctl generate"),
        "{log}"
    );
    assert!(
        has("share/man/man1/dedupfs.1") && has("share/man/man1/snapctl.1"),
        "{log}"
    );
    assert!(has("dedupfs mount"), "{log}");
    assert!(said.contains("building"), "{said}");
}
