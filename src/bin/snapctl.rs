//! `snapctl`: snapshots of a dedupfs store. Finds the store from `-s`, from
//! the mountpoint given with `-m`, from `DEDUPFS_STORE`, or from the mount
//! the current directory is in; talks to the daemon when the store is
//! mounted and opens it directly when not.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use dedupfs::repo::Repo;
use dedupfs::snapcmd::{self, Policy};

/// `println!` that ends the process quietly on a closed pipe (see
/// `dedupfs::cli`).
macro_rules! outln {
    ($($arg:tt)*) => { dedupfs::outln!("snapctl"; $($arg)*) };
}

use dedupfs::cli::is_broken_pipe;

#[derive(Parser)]
#[command(
    name = "snapctl",
    version,
    about = "Take, browse, compare, restore and prune dedupfs snapshots"
)]
struct Cli {
    /// The store (default: from -m, $DEDUPFS_STORE, or the mount the
    /// current directory is in).
    #[arg(short = 's', long, global = true, conflicts_with = "mountpoint")]
    store: Option<PathBuf>,
    /// A mountpoint of the store.
    #[arg(short = 'm', long, global = true)]
    mountpoint: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Take a snapshot of the whole tree (default name: the local time).
    Create {
        name: Option<String>,
        /// A label, key=value (repeatable).
        #[arg(long = "label", value_name = "K=V")]
        labels: Vec<String>,
    },
    /// List snapshots with the space each alone holds and what it refers to.
    List,
    /// One snapshot in detail.
    Show { name: String },
    /// Delete snapshots, freeing what nothing else holds.
    Delete {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// What changed from snapshot A to snapshot B (default: the live tree).
    Diff { a: String, b: Option<String> },
    /// Copy a file or directory back from a snapshot. Inside the tree it
    /// shares chunks (metadata only) and replaces what is at the
    /// destination; with --to outside the mount it writes a plain copy
    /// (modes, times, ownership when root, xattrs) to a destination that
    /// must not exist yet.
    Restore {
        snap: String,
        path: PathBuf,
        /// Where to put it (default: where it was). A path under the
        /// mountpoint (or relative, from inside the mount) is a place in
        /// the tree; any other path, while the store is mounted, gets a
        /// plain copy. With the store unmounted, a path in the tree.
        #[arg(long)]
        to: Option<PathBuf>,
        /// Restore from this remote's copy of the snapshot instead (PATH
        /// is inside the snapshot; --to, a new local path, is required).
        /// Only blobs the local store lacks are fetched; every blob is
        /// checked.
        #[arg(long, value_name = "NAME")]
        remote: Option<String>,
    },
    /// Put the whole live tree back to a snapshot.
    Rollback {
        snap: String,
        /// Even while files are open for writing (their handles continue
        /// on the rolled-back content).
        #[arg(long)]
        force: bool,
    },
    /// The retention policy the daemon applies on a timer.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Mirrors of the snapshots on `dedupfs serve` targets: each new
    /// snapshot's delta is sealed (the target reads none of it) and sent
    /// by the daemon, deduplicated against all the target holds.
    Remote {
        #[command(subcommand)]
        cmd: RemoteCmd,
    },
    /// Delete the automatic snapshots the policy no longer keeps.
    Prune {
        /// Only say what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Prune manually named snapshots too.
        #[arg(long)]
        include_manual: bool,
    },
    /// Write the manual pages and shell completions into DIR (man/man1,
    /// bash-completion, zsh, fish), for scripts/mount and scripts/package.
    #[command(hide = true)]
    Generate {
        /// Directory to write into, laid out as /usr/local/share.
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum RemoteCmd {
    /// Add a remote. The keys are derived from the passphrase and the
    /// host name (Argon2id): with both, `dedupfs recover` rebuilds the
    /// store on another machine. Prints the public key to register on
    /// the target (`dedupfs serve client add HOST --key KEY`).
    Add {
        name: String,
        /// The target, e.g. https://backup.example:8443 (plain http only
        /// to a loopback address).
        url: String,
        /// Read the passphrase from this file (mode 600) instead of
        /// DEDUPFS_PASSPHRASE or a prompt.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// Seal chunks with this secret too (mode 600): chunks then dedup
        /// only among hosts sharing it, and hosts without it cannot
        /// confirm that this host stores a file they know. Default: none
        /// (dedup with every host of the target).
        #[arg(long, value_name = "FILE")]
        convergence_secret_file: Option<PathBuf>,
        /// The name this host has on the target (default: its host name).
        #[arg(long)]
        host: Option<String>,
        /// Trust this CA certificate (PEM) for the target's TLS.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
    },
    /// The remotes, with their URLs and this host's public key.
    List,
    /// Forget a remote here (what the target holds stays there).
    Remove { name: String },
    /// Last snapshot mirrored, bytes sent, lag, last error, next attempt.
    Status { name: Option<String> },
    /// Mirror now: every snapshot the remote lacks, or only SNAP.
    Push { name: String, snap: Option<String> },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Set the policy (rules not given are cleared).
    Set {
        /// Take a snapshot this often (e.g. 15m, 1h, 1d).
        #[arg(long)]
        every: Option<String>,
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        #[arg(long, default_value_t = 0)]
        keep_hourly: u32,
        #[arg(long, default_value_t = 0)]
        keep_daily: u32,
        #[arg(long, default_value_t = 0)]
        keep_weekly: u32,
        #[arg(long, default_value_t = 0)]
        keep_monthly: u32,
        #[arg(long, default_value_t = 0)]
        keep_yearly: u32,
    },
    /// Show the policy.
    Show,
}

/// Where the store is and, if mounted, where.
struct Target {
    store: PathBuf,
    mountpoint: Option<PathBuf>,
}

fn find_target(cli: &Cli) -> anyhow::Result<Target> {
    if let Some(s) = &cli.store {
        return Ok(Target {
            mountpoint: dedupfs::ctl::mountpoint_of_store(s),
            store: s.clone(),
        });
    }
    if let Some(m) = &cli.mountpoint {
        refuse_dead_mount(m)?;
        let store = dedupfs::ctl::store_of_mount(m)
            .ok_or_else(|| anyhow::anyhow!("{} is not a mounted dedupfs store", m.display()))?;
        return Ok(Target {
            store,
            mountpoint: std::fs::canonicalize(m).ok(),
        });
    }
    if let Some(s) = std::env::var_os("DEDUPFS_STORE") {
        let s = PathBuf::from(s);
        return Ok(Target {
            mountpoint: dedupfs::ctl::mountpoint_of_store(&s),
            store: s,
        });
    }
    let cwd = std::env::current_dir()?;
    if let Some((m, s)) = dedupfs::ctl::mount_containing(&cwd) {
        return Ok(Target {
            store: s,
            mountpoint: Some(m),
        });
    }
    anyhow::bail!(
        "no store given: use -s STORE or -m MOUNTPOINT, set DEDUPFS_STORE, or run inside a mounted dedupfs"
    )
}

/// A path argument as a path inside the tree: paths under the mountpoint
/// (absolute, or relative to a current directory inside it) lose the
/// mountpoint; anything else is taken from the tree's root.
fn tree_path(arg: &Path, mountpoint: Option<&Path>) -> Vec<u8> {
    let mut abs = arg.to_path_buf();
    if let Some(mp) = mountpoint {
        if !arg.is_absolute()
            && let Ok(cwd) = std::env::current_dir()
            && cwd.starts_with(mp)
        {
            abs = cwd.join(arg);
        }
        if let Ok(rel) = normalize(&abs).strip_prefix(mp) {
            abs = Path::new("/").join(rel);
        }
    }
    let mut out = Vec::new();
    for c in normalize(&abs).components() {
        if let Component::Normal(n) = c {
            out.push(b'/');
            out.extend_from_slice(n.as_bytes());
        }
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Fails with what to do when `mp` is a mount whose daemon is gone: the
/// kernel answers ENOTCONN there. Opening the store directly would then
/// work on it behind the dead mount's back and hold off the remount.
fn refuse_dead_mount(mp: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(mp) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => anyhow::bail!(
            "the mount at {0} is dead (its daemon is gone); run `fusermount3 -u {0}` \
             (or `umount -l {0}`) and mount the store again",
            mp.display()
        ),
        _ => Ok(()),
    }
}

/// Runs one operation: through the daemon when the store is mounted,
/// directly otherwise.
fn run_op(store: &Path, mountpoint: Option<&Path>, args: Value) -> anyhow::Result<Value> {
    match Repo::open(store) {
        Ok(repo) => {
            // Nobody holds the store, yet the mount table names a mount
            // of it: that mount is dead.
            if let Some(mp) = mountpoint {
                refuse_dead_mount(mp)?;
            }
            if let Some(r) = snapcmd::handle_offline(&repo, &args) {
                return r.map_err(|e| anyhow::anyhow!(e));
            }
            let vol = dedupfs::fs::volume::Volume::start(repo, false, 1)?;
            let r = snapcmd::handle(&vol, &args);
            vol.shutdown();
            r.map_err(|e| anyhow::anyhow!(e))
        }
        Err(dedupfs::store::Error::Locked(_)) => {
            dedupfs::ctl::call(store, snapcmd::CTL_COMMAND, args).map_err(|e| anyhow::anyhow!(e))
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs a remote operation: through the daemon when the store is
/// mounted, on the store directly otherwise.
fn mirror_op(store: &Path, args: Value) -> anyhow::Result<Value> {
    use dedupfs::mirror::cmd;
    match Repo::open(store) {
        Ok(repo) => cmd::handle(&repo, store, &args, None).map_err(|e| anyhow::anyhow!(e)),
        Err(dedupfs::store::Error::Locked(_)) => {
            dedupfs::ctl::call(store, cmd::CTL_COMMAND, args).map_err(|e| anyhow::anyhow!(e))
        }
        Err(e) => Err(e.into()),
    }
}

/// `snapctl remote ...` and `restore --remote`; None for other commands.
fn remote_cmd(cli: &Cli, target: &Target) -> anyhow::Result<Option<ExitCode>> {
    let store = &target.store;
    let mp = target.mountpoint.as_deref();
    let out = match &cli.cmd {
        Cmd::Restore {
            snap,
            path,
            to,
            remote: Some(remote),
        } => {
            let Some(to) = to else {
                anyhow::bail!("restore --remote needs --to DEST (a new local path)");
            };
            let to = std::path::absolute(to)?;
            mirror_op(
                store,
                json!({"op": "restore", "remote": remote, "snap": snap,
                       "path": bytes_json(&tree_path(path, mp)),
                       "to": to.to_string_lossy()}),
            )?
        }
        Cmd::Remote { cmd } => match cmd {
            RemoteCmd::Add {
                name,
                url,
                passphrase_file,
                convergence_secret_file,
                host,
                ca_file,
            } => remote_add(
                store,
                name,
                url,
                passphrase_file.as_deref(),
                convergence_secret_file.as_deref(),
                host.clone(),
                ca_file.clone(),
            )?,
            RemoteCmd::List => mirror_op(store, json!({"op": "list"}))?,
            RemoteCmd::Remove { name } => {
                mirror_op(store, json!({"op": "remove", "remote": name}))?
            }
            RemoteCmd::Status { name } => {
                mirror_op(store, json!({"op": "status", "remote": name}))?
            }
            RemoteCmd::Push { name, snap } => {
                let spin = dedupfs::cli::spinner(&format!("mirroring to {name}"));
                let r = mirror_op(store, json!({"op": "push", "remote": name, "snap": snap}));
                drop(spin);
                r?
            }
        },
        _ => return Ok(None),
    };
    if cli.json {
        outln!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_remote(&cli.cmd, &out);
    }
    Ok(Some(ExitCode::SUCCESS))
}

fn remote_add(
    store: &Path,
    name: &str,
    url: &str,
    passphrase_file: Option<&Path>,
    secret_file: Option<&Path>,
    host: Option<String>,
    ca_file: Option<PathBuf>,
) -> anyhow::Result<Value> {
    use dedupfs::mirror;
    mirror::validate_name(name).map_err(|e| anyhow::anyhow!(e))?;
    check_url(url)?;
    let host = host.unwrap_or_else(mirror::hostname);
    let pass = mirror::passphrase(passphrase_file, true).map_err(|e| anyhow::anyhow!(e))?;
    let secret = match secret_file {
        Some(f) => mirror::read_secret_file(f).map_err(|e| anyhow::anyhow!(e))?,
        None => Vec::new(),
    };
    let ca_file = match ca_file {
        Some(f) => Some(std::path::absolute(f)?),
        None => None,
    };
    let spin = dedupfs::cli::spinner("deriving keys (Argon2id, 256 MiB)");
    let keys = mirror::derive(&pass, &host, secret).map_err(|e| anyhow::anyhow!(e))?;
    drop(spin);
    let cfg = mirror::Config {
        url: url.trim_end_matches('/').to_string(),
        host: host.clone(),
        ca_file,
        added: mirror::unix_now(),
    };
    let r = mirror::Remote::add(store, name, cfg, &keys).map_err(|e| anyhow::anyhow!(e))?;
    let public = mirror::hex(keys.signing.verifying_key().as_bytes());
    // Is the host registered yet? A hint only: the remote is added either way.
    let registered = match r.client().map(|c| c.account()) {
        Ok(Ok(_)) => json!(true),
        Ok(Err(e)) if e.code() == Some("unknown_client") => json!(false),
        Ok(Err(e)) => json!(format!("could not ask: {e}")),
        Err(e) => json!(format!("could not ask: {e}")),
    };
    if dedupfs::ctl::socket_path(store).exists() {
        let _ = dedupfs::ctl::call(
            store,
            dedupfs::mirror::cmd::CTL_COMMAND,
            json!({"op": "wake"}),
        );
    }
    Ok(
        json!({"name": name, "url": r.cfg.url, "host": host, "public_key": public,
              "registered": registered,
              "register_with": format!("dedupfs serve --store DIR client add {host} --key {public}")}),
    )
}

/// Plain HTTP only to a loopback address: everything else must be https.
fn check_url(url: &str) -> anyhow::Result<()> {
    if url.starts_with("https://") {
        return Ok(());
    }
    let Some(rest) = url.strip_prefix("http://") else {
        anyhow::bail!("{url}: the URL must start with https:// (or http:// to a loopback address)");
    };
    let hostport = rest.split('/').next().unwrap_or("");
    let host = hostport
        .strip_prefix('[')
        .and_then(|h| h.split(']').next())
        .unwrap_or_else(|| hostport.rsplit_once(':').map_or(hostport, |(h, _)| h));
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        anyhow::bail!("{url}: plain http is for loopback targets only; use https://");
    }
    Ok(())
}

fn print_remote(cmd: &Cmd, v: &Value) {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    match cmd {
        Cmd::Restore { .. } => outln!(
            "restored {} files, {} directories, {} from snapshot {} ({} blobs fetched, {}; {} chunks from the local store)",
            n("files"),
            n("dirs"),
            human(n("bytes")),
            v["snapshot"].as_str().unwrap_or(""),
            n("blobs_fetched"),
            human(n("bytes_fetched")),
            n("chunks_local")
        ),
        Cmd::Remote { cmd } => match cmd {
            RemoteCmd::Add { .. } => {
                outln!(
                    "added remote {} ({}) as host {}",
                    v["name"].as_str().unwrap_or(""),
                    v["url"].as_str().unwrap_or(""),
                    v["host"].as_str().unwrap_or("")
                );
                outln!("public key: {}", v["public_key"].as_str().unwrap_or(""));
                if v["registered"] != json!(true) {
                    outln!("not registered on the target yet; there, run:");
                    outln!("  {}", v["register_with"].as_str().unwrap_or(""));
                }
            }
            RemoteCmd::List => {
                for r in v.as_array().into_iter().flatten() {
                    outln!(
                        "{:<16} {:<40} host {}  key {}",
                        r["name"].as_str().unwrap_or(""),
                        r["url"].as_str().unwrap_or(""),
                        r["host"].as_str().unwrap_or(""),
                        r["public_key"]
                            .as_str()
                            .unwrap_or(r["error"].as_str().unwrap_or(""))
                    );
                }
            }
            RemoteCmd::Remove { .. } => {
                outln!("removed remote {}", v["removed"].as_str().unwrap_or(""))
            }
            RemoteCmd::Status { .. } => {
                for r in v.as_array().into_iter().flatten() {
                    let when = |k: &str| {
                        r[k].as_i64()
                            .map(|t| dedupfs::snap::format_time(t, 0))
                            .unwrap_or_else(|| "-".into())
                    };
                    outln!(
                        "{} ({})",
                        r["remote"].as_str().unwrap_or(""),
                        r["url"].as_str().unwrap_or("")
                    );
                    outln!(
                        "  last snapshot mirrored: {} at {}",
                        r["last_snapshot"].as_str().unwrap_or("none"),
                        when("last_mirrored")
                    );
                    outln!(
                        "  behind: {} snapshot(s){}",
                        r["snapshots_behind"].as_u64().unwrap_or(0),
                        r["lag_seconds"]
                            .as_i64()
                            .map(|s| format!(", oldest unmirrored {s} s old"))
                            .unwrap_or_default()
                    );
                    outln!(
                        "  sent: {} last run, {} in all",
                        human(r["bytes_sent_last_run"].as_u64().unwrap_or(0)),
                        human(r["bytes_sent_total"].as_u64().unwrap_or(0))
                    );
                    if let Some(e) = r["last_error"].as_str() {
                        outln!("  last error: {e}");
                        outln!("  next attempt: {}", when("next_attempt"));
                    }
                }
            }
            RemoteCmd::Push { name, .. } => {
                let snaps: Vec<&str> = v["snapshots"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_str())
                    .collect();
                if snaps.is_empty() {
                    outln!("{name}: nothing to mirror");
                } else {
                    outln!(
                        "{name}: mirrored {} ({} blobs, {} sent, {} chunks sealed, {:.1} s)",
                        snaps.join(", "),
                        n("blobs_sent"),
                        human(n("bytes_sent")),
                        n("chunks_sealed"),
                        v["seconds"].as_f64().unwrap_or(0.0)
                    );
                }
            }
        },
        _ => {}
    }
}

fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "K", "M", "G", "T", "P"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

fn bytes_json(p: &[u8]) -> Value {
    Value::Array(p.iter().map(|b| json!(b)).collect())
}

fn print_snaps(v: &Value) {
    outln!(
        "{:<28} {:<25} {:>8} {:>8} {:>8}  LABELS",
        "NAME",
        "CREATED",
        "USED",
        "REFER",
        "FILES"
    );
    for s in v.as_array().into_iter().flatten() {
        let opt = |k: &str| s[k].as_u64().map(human).unwrap_or_else(|| "-".into());
        let labels: Vec<String> = s["labels"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect();
        outln!(
            "{:<28} {:<25} {:>8} {:>8} {:>8}  {}",
            s["name"].as_str().unwrap_or(""),
            s["created"].as_str().unwrap_or(""),
            opt("used_bytes"),
            opt("refer_bytes"),
            s["files"]
                .as_u64()
                .map(|f| f.to_string())
                .unwrap_or_else(|| "-".into()),
            labels.join(",")
        );
    }
}

/// One snapshot, a field a line.
fn print_show(s: &Value) {
    let opt = |k: &str| {
        s[k].as_u64()
            .map(|b| format!("{} ({b} bytes)", human(b)))
            .unwrap_or_else(|| "-".into())
    };
    outln!("name:        {}", s["name"].as_str().unwrap_or(""));
    outln!("generation:  {}", s["generation"]);
    outln!("id:          {}", s["id"]);
    outln!("created:     {}", s["created"].as_str().unwrap_or(""));
    outln!(
        "taken by:    {}",
        if s["auto"].as_bool() == Some(true) {
            "the retention policy (pruned by it)"
        } else {
            "hand (kept until deleted)"
        }
    );
    outln!("used:        {}  (freed by deleting it)", opt("used_bytes"));
    outln!("refer:       {}  (what it sees)", opt("refer_bytes"));
    outln!(
        "files:       {}",
        s["files"]
            .as_u64()
            .map(|f| f.to_string())
            .unwrap_or_else(|| "-".into())
    );
    let labels: Vec<String> = s["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    outln!(
        "labels:      {}",
        if labels.is_empty() {
            "-".to_string()
        } else {
            labels.join(", ")
        }
    );
}

/// The retention policy as a small table.
fn print_policy(p: &Value) {
    let every = p["every_secs"]
        .as_u64()
        .map(interval)
        .unwrap_or_else(|| "- (no automatic snapshots)".into());
    outln!("{:<14} {every}", "every");
    let rules = [
        ("keep_last", "keep last"),
        ("keep_hourly", "keep hourly"),
        ("keep_daily", "keep daily"),
        ("keep_weekly", "keep weekly"),
        ("keep_monthly", "keep monthly"),
        ("keep_yearly", "keep yearly"),
    ];
    let mut any = false;
    for (k, label) in rules {
        let n = p[k].as_u64().unwrap_or(0);
        any |= n > 0;
        outln!(
            "{label:<14} {}",
            if n == 0 {
                "-".to_string()
            } else {
                n.to_string()
            }
        );
    }
    if !any {
        outln!("(no keep rule: prune deletes nothing)");
    }
}

/// Seconds as the largest whole unit: "1h", "90s", "2d".
fn interval(secs: u64) -> String {
    for (unit, n) in [("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)] {
        if secs >= n && secs.is_multiple_of(n) {
            return format!("{}{unit}", secs / n);
        }
    }
    format!("{secs}s")
}

fn print_restored(out: &Value) {
    outln!(
        "restored {} to {}: {}, {}, {}{}",
        out["path"].as_str().unwrap_or(""),
        out["to"].as_str().unwrap_or(""),
        count(out["files"].as_u64().unwrap_or(0), "file"),
        count(out["dirs"].as_u64().unwrap_or(0), "directory"),
        human(out["bytes"].as_u64().unwrap_or(0)),
        if out["replaced"].as_bool() == Some(true) {
            " (replaced what was there)"
        } else {
            ""
        }
    )
}

/// "1 file", "2 files", "1 directory", "3 directories".
fn count(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else if let Some(stem) = what.strip_suffix('y') {
        format!("{n} {stem}ies")
    } else {
        format!("{n} {what}s")
    }
}

/// A `--to` destination outside the mounted tree, made absolute; None
/// when it names a place in the tree (or nothing is mounted, where paths
/// are tree paths).
fn outside_the_tree(to: &Path, mountpoint: Option<&Path>) -> Option<PathBuf> {
    let mp = mountpoint?;
    let abs = normalize(&std::env::current_dir().ok()?.join(to));
    (!abs.starts_with(mp)).then_some(abs)
}

/// `restore --to DEST` outside the mount: a plain copy of what the
/// snapshot holds at `tree` (read through `MNT/.snapshots/SNAP`) written
/// to `dest`, which must not exist.
fn copy_out(mp: &Path, snap: &str, tree: &[u8], dest: &Path) -> anyhow::Result<Value> {
    let root = mp.join(".snapshots").join(snap);
    if let Err(e) = std::fs::symlink_metadata(&root) {
        anyhow::bail!("snapshot {snap} is not readable at {}: {e}", root.display());
    }
    let rel = std::ffi::OsStr::from_bytes(tree.strip_prefix(b"/").unwrap_or(tree));
    let src = root.join(rel);
    let shown = String::from_utf8_lossy(tree).into_owned();
    if std::fs::symlink_metadata(&src).is_err() {
        anyhow::bail!("snapshot {snap} has no {shown}");
    }
    if std::fs::symlink_metadata(dest).is_ok() {
        anyhow::bail!(
            "{} exists; copying out never replaces anything: remove it or name another destination",
            dest.display()
        );
    }
    let total = copyout::tree_bytes(&src);
    let bar = copyout::bar(total);
    let mut c = copyout::Copier::new(&bar);
    c.copy(&src, dest)?;
    bar.finish_and_clear();
    Ok(json!({
        "path": shown,
        "to": dest.display().to_string(),
        "files": c.files,
        "dirs": c.dirs,
        "bytes": c.bytes,
        "replaced": false,
        "copied_out": true,
        "skipped": c.skipped,
    }))
}

/// Writing a plain copy of a tree read from a snapshot.
mod copyout {
    use std::collections::HashMap;
    use std::fs;
    use std::io::{self, IsTerminal, Read, Write};
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::{Path, PathBuf};

    use anyhow::Context;
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

    /// Bytes of the regular files under `p` (for the progress bar).
    pub fn tree_bytes(p: &Path) -> u64 {
        let Ok(m) = fs::symlink_metadata(p) else {
            return 0;
        };
        if m.is_dir() {
            fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| tree_bytes(&e.path()))
                .sum()
        } else if m.is_file() {
            m.len()
        } else {
            0
        }
    }

    /// A spinner naming the operation, on a terminal, for operations that
    /// can take long on a big tree (restore, rollback, delete, prune, diff,
    /// list with sizes); hidden otherwise and when not a terminal.
    pub fn working(args: &serde_json::Value) -> ProgressBar {
        let op = args.get("op").and_then(|v| v.as_str()).unwrap_or("");
        let what = match op {
            "restore" => "restoring",
            "rollback" => "rolling back",
            "delete" => "deleting",
            "prune" => "pruning",
            "diff" => "comparing",
            "list" | "show" => "sizing snapshots",
            _ => return ProgressBar::hidden(),
        };
        if !io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
            pb.set_style(style);
        }
        pb.set_message(what);
        pb.enable_steady_tick(std::time::Duration::from_millis(120));
        pb
    }

    /// A bar on a terminal, nothing otherwise.
    pub fn bar(total: u64) -> ProgressBar {
        if !io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "copying out [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb
    }

    pub struct Copier<'a> {
        bar: &'a ProgressBar,
        /// Hard links stay hard links: (dev, ino) to the first copy.
        links: HashMap<(u64, u64), PathBuf>,
        pub files: u64,
        pub dirs: u64,
        pub bytes: u64,
        /// Devices and sockets, which a copy cannot make.
        pub skipped: Vec<String>,
    }

    impl<'a> Copier<'a> {
        pub fn new(bar: &'a ProgressBar) -> Copier<'a> {
            Copier {
                bar,
                links: HashMap::new(),
                files: 0,
                dirs: 0,
                bytes: 0,
                skipped: Vec::new(),
            }
        }

        pub fn copy(&mut self, src: &Path, dst: &Path) -> anyhow::Result<()> {
            let m = fs::symlink_metadata(src).with_context(|| format!("{}", src.display()))?;
            let ft = m.file_type();
            let made = |r: io::Result<()>| r.with_context(|| format!("writing {}", dst.display()));
            if ft.is_dir() {
                made(fs::create_dir(dst))?;
                self.dirs += 1;
                let mut entries: Vec<_> = fs::read_dir(src)
                    .with_context(|| format!("{}", src.display()))?
                    .collect::<io::Result<_>>()?;
                entries.sort_by_key(|e| e.file_name());
                for e in entries {
                    self.copy(&e.path(), &dst.join(e.file_name()))?;
                }
            } else if ft.is_file() {
                if m.nlink() > 1 {
                    if let Some(first) = self.links.get(&(m.dev(), m.ino())) {
                        made(fs::hard_link(first, dst))?;
                        return Ok(());
                    }
                    self.links.insert((m.dev(), m.ino()), dst.to_path_buf());
                }
                let mut from = fs::File::open(src).with_context(|| format!("{}", src.display()))?;
                let mut to =
                    fs::File::create(dst).with_context(|| format!("writing {}", dst.display()))?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = from
                        .read(&mut buf)
                        .with_context(|| format!("{}", src.display()))?;
                    if n == 0 {
                        break;
                    }
                    made(to.write_all(&buf[..n]))?;
                    self.bar.inc(n as u64);
                    self.bytes += n as u64;
                }
                made(to.sync_all())?;
                self.files += 1;
            } else if ft.is_symlink() {
                made(std::os::unix::fs::symlink(fs::read_link(src)?, dst))?;
            } else if ft.is_fifo() {
                made(
                    rustix::fs::mknodat(
                        rustix::fs::CWD,
                        dst,
                        rustix::fs::FileType::Fifo,
                        rustix::fs::Mode::from_raw_mode(m.mode() & 0o7777),
                        0,
                    )
                    .map_err(io::Error::from),
                )?;
            } else {
                self.skipped.push(src.display().to_string());
                return Ok(());
            }
            self.attributes(src, dst, &m)
        }

        /// Xattrs, ownership (root only), mode, then times last (the
        /// others move ctime, not mtime, but a directory's mtime moved
        /// with every entry made in it).
        fn attributes(&self, src: &Path, dst: &Path, m: &fs::Metadata) -> anyhow::Result<()> {
            let ctx = || format!("setting attributes of {}", dst.display());
            copy_xattrs(src, dst).with_context(ctx)?;
            // Ownership as in the snapshot when we may (root); a user's
            // copy is the user's.
            if let Err(e) = std::os::unix::fs::lchown(dst, Some(m.uid()), Some(m.gid()))
                && e.kind() != io::ErrorKind::PermissionDenied
            {
                return Err(e).with_context(ctx);
            }
            if !m.file_type().is_symlink() {
                fs::set_permissions(dst, fs::Permissions::from_mode(m.mode() & 0o7777))
                    .with_context(ctx)?;
            }
            let ts = |s: i64, ns: i64| rustix::fs::Timespec {
                tv_sec: s,
                tv_nsec: ns as _,
            };
            rustix::fs::utimensat(
                rustix::fs::CWD,
                dst,
                &rustix::fs::Timestamps {
                    last_access: ts(m.atime(), m.atime_nsec()),
                    last_modification: ts(m.mtime(), m.mtime_nsec()),
                },
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(io::Error::from)
            .with_context(ctx)?;
            Ok(())
        }
    }

    fn copy_xattrs(src: &Path, dst: &Path) -> io::Result<()> {
        let n = rustix::fs::llistxattr_query(src)?;
        if n == 0 {
            return Ok(());
        }
        let mut names = vec![0u8; n];
        let n = rustix::fs::llistxattr(src, &mut names[..])?;
        for name in names[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
            let name = std::ffi::OsStr::from_bytes(name);
            let len = rustix::fs::lgetxattr_query(src, name)?;
            let mut value = vec![0u8; len];
            let len = rustix::fs::lgetxattr(src, name, &mut value[..])?;
            match rustix::fs::lsetxattr(dst, name, &value[..len], rustix::fs::XattrFlags::empty()) {
                Ok(()) => {}
                // A namespace the destination does not take (trusted.*
                // as a user, user.* on a symlink): the copy goes on.
                Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::PERM => {
                    log::warn!(
                        "{}: xattr {} not copied: {e}",
                        dst.display(),
                        name.to_string_lossy()
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    use std::os::unix::ffi::OsStrExt;
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Cmd::Generate { dir } = &cli.cmd {
        use clap::CommandFactory;
        for path in dedupfs::cli::write_docs(Cli::command(), dir)? {
            outln!("{}", path.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let target = find_target(&cli)?;
    let mp = target.mountpoint.as_deref();
    if let Some(code) = remote_cmd(&cli, &target)? {
        return Ok(code);
    }
    if let Cmd::Restore {
        snap,
        path,
        to: Some(to),
        remote: None,
    } = &cli.cmd
        && let Some(dest) = outside_the_tree(to, mp)
    {
        let Some(mp) = mp else {
            anyhow::bail!("copying out of a snapshot needs the store mounted");
        };
        let out = copy_out(mp, snap, &tree_path(path, Some(mp)), &dest)?;
        if cli.json {
            outln!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            print_restored(&out);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let args = match &cli.cmd {
        Cmd::Create { name, labels } => {
            let mut map = BTreeMap::new();
            for l in labels {
                let (k, v) = l
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("label {l:?} is not key=value"))?;
                if k.is_empty() {
                    anyhow::bail!("label {l:?} has an empty key");
                }
                map.insert(k.to_string(), v.to_string());
            }
            json!({"op": "create", "name": name, "labels": map})
        }
        Cmd::List => json!({"op": "list", "space": true}),
        Cmd::Show { name } => json!({"op": "show", "name": name}),
        Cmd::Delete { names } => json!({"op": "delete", "names": names}),
        Cmd::Diff { a, b } => json!({"op": "diff", "a": a, "b": b}),
        Cmd::Restore { snap, path, to, .. } => json!({
            "op": "restore",
            "snap": snap,
            "path": bytes_json(&tree_path(path, mp)),
            "to": to.as_ref().map(|t| bytes_json(&tree_path(t, mp))),
        }),
        Cmd::Rollback { snap, force } => json!({"op": "rollback", "snap": snap, "force": force}),
        // Answered above.
        Cmd::Generate { .. } | Cmd::Remote { .. } => return Ok(ExitCode::SUCCESS),
        Cmd::Policy { cmd } => match cmd {
            PolicyCmd::Show => json!({"op": "policy_show"}),
            PolicyCmd::Set {
                every,
                keep_last,
                keep_hourly,
                keep_daily,
                keep_weekly,
                keep_monthly,
                keep_yearly,
            } => {
                let every_secs = match every {
                    Some(e) => Some(snapcmd::parse_interval(e).map_err(|e| anyhow::anyhow!(e))?),
                    None => None,
                };
                let p = Policy {
                    every_secs,
                    keep_last: *keep_last,
                    keep_hourly: *keep_hourly,
                    keep_daily: *keep_daily,
                    keep_weekly: *keep_weekly,
                    keep_monthly: *keep_monthly,
                    keep_yearly: *keep_yearly,
                };
                json!({"op": "policy_set", "policy": p})
            }
        },
        Cmd::Prune {
            dry_run,
            include_manual,
        } => json!({"op": "prune", "dry_run": dry_run, "include_manual": include_manual}),
    };
    let spinner = copyout::working(&args);
    let out = run_op(&target.store, mp, args);
    spinner.finish_and_clear();
    let out = out?;
    if cli.json {
        outln!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    match &cli.cmd {
        Cmd::Create { .. } => outln!(
            "created snapshot {} (generation {})",
            out["name"].as_str().unwrap_or(""),
            out["generation"]
        ),
        Cmd::List => print_snaps(&out),
        Cmd::Show { .. } => print_show(&out),
        Cmd::Delete { .. } => {
            for d in out.as_array().into_iter().flatten() {
                outln!(
                    "deleted {} ({} freed)",
                    d["name"].as_str().unwrap_or(""),
                    count(d["versions_freed"].as_u64().unwrap_or(0), "version")
                );
            }
        }
        Cmd::Diff { .. } => {
            for e in out.as_array().into_iter().flatten() {
                let path = e["path"].as_str().unwrap_or("");
                let size = e["size"].as_u64().unwrap_or(0);
                match e["change"].as_str().unwrap_or("") {
                    "added" => outln!("+ {path} ({})", human(size)),
                    "removed" => outln!("- {path} ({})", human(size)),
                    "renamed" => outln!(
                        "R {} -> {path} ({})",
                        e["from"].as_str().unwrap_or(""),
                        human(size)
                    ),
                    _ => outln!(
                        "M {path} ({} -> {})",
                        human(e["size_before"].as_u64().unwrap_or(0)),
                        human(size)
                    ),
                }
            }
        }
        Cmd::Restore { .. } => print_restored(&out),
        Cmd::Remote { .. } => {}
        Cmd::Rollback { .. } => outln!(
            "rolled back to {}: {} reverted",
            out["snapshot"].as_str().unwrap_or(""),
            count(out["records_reverted"].as_u64().unwrap_or(0), "record")
        ),
        Cmd::Policy { .. } => print_policy(&out),
        Cmd::Generate { .. } => {}
        Cmd::Prune { dry_run, .. } => {
            let key = if *dry_run { "would_delete" } else { "deleted" };
            let names: Vec<&str> = out[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str())
                .collect();
            let verb = if *dry_run { "would delete" } else { "deleted" };
            if names.is_empty() {
                outln!("nothing to prune");
            } else {
                outln!("{verb}: {}", names.join(" "));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(c) => c,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapctl: {e:#}");
            ExitCode::from(2)
        }
    }
}
