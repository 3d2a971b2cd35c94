//! `snapctl remote ...` and `snapctl restore --remote`, one entry point
//! for both places they run: the daemon (control command "mirror") and a
//! store opened directly. `remote add` runs in `snapctl` itself (it may
//! prompt for the passphrase) and only writes the remote's files.
//!
//! Calls `mirror`, `snap`, `repo`; never `fs`.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::worker::{self, Worker};
use super::{Remote, unix_now};
use crate::repo::Repo;

pub const CTL_COMMAND: &str = "mirror";

fn str_arg<'a>(args: &'a Value, key: &str) -> Result<&'a str, String> {
    args.get(key)
        .and_then(|v| v.as_str())
        .ok_or_else(|| format!("missing argument '{key}'"))
}

fn to_json<T: serde::Serialize>(v: T) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| e.to_string())
}

/// One remote operation on `repo` (the store at `store`).
pub fn handle(
    repo: &Repo,
    store: &Path,
    args: &Value,
    w: Option<&Worker>,
) -> Result<Value, String> {
    match str_arg(args, "op")? {
        "push" => {
            let r = Remote::open(store, str_arg(args, "remote")?)?;
            let snap = args.get("snap").and_then(|v| v.as_str());
            to_json(worker::run_logged_only(repo, &r, snap)?)
        }
        "list" => {
            let mut out = Vec::new();
            for n in Remote::names(store) {
                match Remote::open(store, &n) {
                    Ok(r) => out.push(json!({
                        "name": n, "url": r.cfg.url, "host": r.cfg.host,
                        "public_key": super::hex(r.keys.signing.verifying_key().as_bytes()),
                        "convergence_secret": !r.keys.secret.is_empty(),
                    })),
                    Err(e) => out.push(json!({"name": n, "error": e})),
                }
            }
            Ok(Value::Array(out))
        }
        "status" => {
            let names = match args.get("remote").and_then(|v| v.as_str()) {
                Some(n) => vec![n.to_string()],
                None => Remote::names(store),
            };
            let snaps = {
                let rt = repo.meta().begin_read().map_err(|e| e.to_string())?;
                crate::snap::load_snaps(&rt).map_err(|e| e.to_string())?
            };
            let mut out = Vec::new();
            for n in names {
                let r = Remote::open(store, &n)?;
                let st = r.status();
                // Snapshots newer than the last one mirrored.
                let last_created = st.last_snapshot_created.unwrap_or(i64::MIN);
                let behind: Vec<&(String, crate::snap::SnapRec)> = snaps
                    .iter()
                    .filter(|(_, s)| s.created > last_created)
                    .collect();
                let lag_secs = behind
                    .iter()
                    .map(|(_, s)| s.created)
                    .min()
                    .map(|oldest| (unix_now() - oldest).max(0));
                let mut v = to_json(&st)?;
                v["snapshots_behind"] = json!(behind.len());
                v["lag_seconds"] = json!(lag_secs);
                out.push(v);
            }
            Ok(Value::Array(out))
        }
        "remove" => {
            let n = str_arg(args, "remote")?;
            Remote::remove(store, n)?;
            Ok(json!({"removed": n}))
        }
        "wake" => {
            if let Some(w) = w {
                w.wake();
            }
            Ok(Value::Null)
        }
        "restore" => {
            let r = Remote::open(store, str_arg(args, "remote")?)?;
            let path: Vec<u8> =
                serde_json::from_value(args.get("path").cloned().unwrap_or_default())
                    .map_err(|_| "missing argument 'path'".to_string())?;
            let to = PathBuf::from(str_arg(args, "to")?);
            to_json(super::restore::restore(
                &r,
                Some(repo.store()),
                str_arg(args, "snap")?,
                &path,
                &to,
            )?)
        }
        other => Err(format!("unknown remote operation '{other}'")),
    }
}
