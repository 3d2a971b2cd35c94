//! Disaster recovery (`dedupfs recover`): on an empty machine, the
//! passphrase and the host name rebuild a store holding every snapshot
//! the host mirrored to a target. The new store is mounted (by this
//! program, at a private mountpoint), each snapshot written into it as
//! the change from the one before and snapshotted under its old name and
//! labels, and the remote left configured, its state seeded from the
//! trees read, so the mirror continues from the newest snapshot.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use serde_json::json;

use super::restore::{self, Reader};
use super::state::State;
use super::wire::{Body, Name};
use super::{Config, Keys, Remote};

type R<T> = Result<T, String>;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub store: PathBuf,
    pub remote: String,
    pub snapshots: Vec<String>,
    pub blobs_fetched: u64,
    pub bytes_fetched: u64,
    pub files_written: u64,
}

/// Unmounts the private mountpoint and removes it, whatever happened.
struct Mounted {
    exe: PathBuf,
    mnt: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let ok = Command::new(&self.exe)
            .arg("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            log::error!("recover: could not unmount {}", self.mnt.display());
            return;
        }
        let _ = std::fs::remove_dir(&self.mnt);
    }
}

/// Rebuilds `store` (missing or empty) from the target at `url`, as host
/// `cfg.host`, into a remote named `remote_name`.
pub fn recover(store: &Path, remote_name: &str, cfg: Config, keys: Keys) -> R<Report> {
    super::validate_name(remote_name)?;
    let nonempty = std::fs::read_dir(store).is_ok_and(|mut d| d.next().is_some());
    if nonempty {
        return Err(format!(
            "{}: not empty; recover builds a new store",
            store.display()
        ));
    }
    let agent = match &cfg.ca_file {
        Some(f) => super::make_agent(Some(
            &std::fs::read(f).map_err(|x| format!("{}: {x}", f.display()))?,
        ))?,
        None => super::make_agent(None)?,
    };
    let client = super::client::Client::new(agent, &cfg.url, &cfg.host, keys.signing.clone());
    client.info().map_err(|e| e.to_string())?;
    let acct = client.account().map_err(|e| e.to_string())?;
    let roots = restore::roots(&client, &keys)?;
    if roots.is_empty() {
        return Err(format!(
            "{} holds no snapshot of host {}",
            cfg.url, cfg.host
        ));
    }
    crate::repo::Repo::init(store, &crate::store::InitOptions::default())
        .map_err(|e| format!("{}: {e}", store.display()))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mnt = std::env::temp_dir().join(format!("dedupfs-recover.{}", std::process::id()));
    std::fs::create_dir_all(&mnt).map_err(|x| format!("{}: {x}", mnt.display()))?;
    let ok = Command::new(&exe)
        .arg("mount")
        .arg(store)
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = std::fs::remove_dir(&mnt);
        return Err(format!(
            "could not mount the new store at {}",
            mnt.display()
        ));
    }
    let mounted = Mounted { exe, mnt };
    let mut rep = Report {
        store: store.to_path_buf(),
        remote: remote_name.to_string(),
        ..Report::default()
    };
    let mut rd = Reader::new(&client, &keys, None);
    let mut prev: Option<Name> = None;
    let mut done = Vec::new();
    let mut base = None;
    for (id, root) in &roots {
        let Body::Tree(top) = &root.top.body else {
            return Err(format!(
                "snapshot {}: its top is not a directory",
                root.snapshot
            ));
        };
        let mut links = HashMap::new();
        restore::sync_dir(&mut rd, &mounted.mnt, prev.as_ref(), top, &mut links)?;
        restore::apply_top(&root.top, &mounted.mnt)?;
        prev = Some(*top);
        let made = crate::ctl::call(
            store,
            "snap",
            json!({"op": "create", "name": root.snapshot, "labels": root.labels}),
        )
        .map_err(|e| format!("snapshot {}: {e}", root.snapshot))?;
        log::info!("recovered snapshot {}", root.snapshot);
        rep.snapshots.push(root.snapshot.clone());
        done.push((root.snapshot.clone(), root.seq, *id));
        base = made["generation"]
            .as_u64()
            .map(|g| (root.snapshot.clone(), g));
    }
    rep.blobs_fetched = rd.rep.blobs_fetched;
    rep.bytes_fetched = rd.rep.bytes_fetched;
    rep.files_written = rd.rep.files;
    let names: Vec<([u8; 20], Name)> = rd.names.iter().map(|(k, v)| (*k, *v)).collect();
    drop(mounted);
    let remote = Remote::add(store, remote_name, cfg, &keys)?;
    let st = State::open(&remote.file("redb"))?;
    st.seed(
        acct.seq,
        &names,
        &done,
        base.as_ref().map(|(n, g)| (n.as_str(), *g)),
    )?;
    Ok(rep)
}
