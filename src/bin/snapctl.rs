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

/// `println!` that ends the process quietly when stdout is a closed pipe
/// (`snapctl list | head`), where `println!` panics.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            output_failed(&e)
        }
    }};
}

/// Stdout is gone: a closed pipe ends the command quietly (what a
/// reader that stopped reading wants); anything else is an error.
fn output_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("snapctl: writing output: {e}");
    std::process::exit(2);
}

/// Whether an error is a write to a closed pipe.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let kind = match c.downcast_ref::<std::io::Error>() {
            Some(io) => Some(io.kind()),
            None => c
                .downcast_ref::<serde_json::Error>()
                .and_then(|j| j.io_error_kind()),
        };
        kind == Some(std::io::ErrorKind::BrokenPipe)
    })
}

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
    /// Copy a file or directory back from a snapshot (metadata only).
    Restore {
        snap: String,
        path: PathBuf,
        /// Where to put it (default: where it was).
        #[arg(long)]
        to: Option<PathBuf>,
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
    /// Delete the automatic snapshots the policy no longer keeps.
    Prune {
        /// Only say what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Prune manually named snapshots too.
        #[arg(long)]
        include_manual: bool,
    },
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

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let target = find_target(&cli)?;
    let mp = target.mountpoint.as_deref();
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
        Cmd::Restore { snap, path, to } => json!({
            "op": "restore",
            "snap": snap,
            "path": bytes_json(&tree_path(path, mp)),
            "to": to.as_ref().map(|t| bytes_json(&tree_path(t, mp))),
        }),
        Cmd::Rollback { snap, force } => json!({"op": "rollback", "snap": snap, "force": force}),
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
    let out = run_op(&target.store, mp, args)?;
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
        Cmd::Show { .. } => print_snaps(&Value::Array(vec![out])),
        Cmd::Delete { .. } => {
            for d in out.as_array().into_iter().flatten() {
                outln!(
                    "deleted {} ({} versions freed)",
                    d["name"].as_str().unwrap_or(""),
                    d["versions_freed"]
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
        Cmd::Restore { .. } => outln!(
            "restored {} to {}: {} files, {} directories, {} ({}replaced what was there)",
            out["path"].as_str().unwrap_or(""),
            out["to"].as_str().unwrap_or(""),
            out["files"],
            out["dirs"],
            human(out["bytes"].as_u64().unwrap_or(0)),
            if out["replaced"].as_bool() == Some(true) {
                ""
            } else {
                "nothing "
            }
        ),
        Cmd::Rollback { .. } => outln!(
            "rolled back to {}: {} records reverted",
            out["snapshot"].as_str().unwrap_or(""),
            out["records_reverted"]
        ),
        Cmd::Policy { .. } => outln!("{}", serde_json::to_string_pretty(&out)?),
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
