//! The mirror (issue 15, docs/protocol.md, docs/security.md): each
//! snapshot's delta shipped to `dedupfs serve` targets, sealed so that
//! the target can read none of it, deduplicated against everything any
//! host sent there.
//!
//! A store's remotes live in `STORE/mirror/` (mode 0700):
//! - `NAME.json`: the target's URL, the name this host has there, the CA
//!   file to trust;
//! - `NAME.key` (0600): the keys derived from the passphrase (the signing
//!   key, the metadata key) and the convergence secret; never the
//!   passphrase;
//! - `NAME.redb`: what the target holds for this host (`state`);
//! - `NAME.status.json`: the last run, for `snapctl remote status`;
//! - `NAME.lock`: one run per remote at a time, across processes.
//!
//! Calls `snap`, `tree`, `store`, `seal`; never `fs` (the daemon's thread
//! in `worker` gets a `Repo`, not a volume).

pub mod client;
pub mod cmd;
pub mod push;
pub mod recover;
pub mod restore;
pub mod state;
pub mod wire;
pub mod worker;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::seal::{HostKeys, KdfParams};

pub const DIR: &str = "mirror";

/// A remote as `snapctl remote add` wrote it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    pub url: String,
    /// The name this host is registered under on the target (its host
    /// name by default; also the salt of its keys).
    pub host: String,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    pub added: i64,
}

/// The keys a remote needs, derived once at `remote add`.
pub struct Keys {
    pub signing: SigningKey,
    pub meta: [u8; 32],
    /// The convergence secret (empty: dedup with every host of the target).
    pub secret: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    v: u32,
    signing: String,
    meta: String,
    secret: String,
}

/// The last run of a remote, as `remote status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub remote: String,
    pub url: String,
    pub last_snapshot: Option<String>,
    /// Unix seconds the last snapshot was committed on the target.
    pub last_mirrored: Option<i64>,
    /// The last snapshot's creation time (unix seconds).
    pub last_snapshot_created: Option<i64>,
    pub bytes_sent_last_run: u64,
    pub bytes_sent_total: u64,
    pub blobs_sent_total: u64,
    pub last_run_started: Option<i64>,
    pub last_run_seconds: Option<f64>,
    pub last_error: Option<String>,
    /// Unix seconds of the next attempt the daemon has scheduled.
    pub next_attempt: Option<i64>,
    pub failures_in_a_row: u32,
    pub referenced_bytes: Option<u64>,
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Checks a remote's name: a file name in `mirror/`.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "remote name {name:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'"
        ))
    }
}

/// Writes a file only its owner can read, atomically.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let err = |x: std::io::Error| format!("{}: {x}", path.display());
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)?;
    if let Some(d) = path.parent() {
        fs::File::open(d).and_then(|d| d.sync_all()).map_err(err)?;
    }
    Ok(())
}

/// Reads a secret from a file that only its owner may read.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, String> {
    let meta = fs::metadata(path).map_err(|x| format!("{}: {x}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{}: readable by group or others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        ));
    }
    let mut b = fs::read(path).map_err(|x| format!("{}: {x}", path.display()))?;
    while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
        b.pop();
    }
    if b.is_empty() {
        return Err(format!("{}: empty", path.display()));
    }
    Ok(b)
}

/// The passphrase: from a file (owner-only), `DEDUPFS_PASSPHRASE`, or a
/// prompt on the terminal.
pub fn passphrase(file: Option<&Path>, confirm: bool) -> Result<Vec<u8>, String> {
    if let Some(f) = file {
        return read_secret_file(f);
    }
    if let Ok(p) = std::env::var("DEDUPFS_PASSPHRASE")
        && !p.is_empty()
    {
        return Ok(p.into_bytes());
    }
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Err(
            "no passphrase: give --passphrase-file, set DEDUPFS_PASSPHRASE, or run on a terminal"
                .into(),
        );
    }
    let p = rpassword::prompt_password("passphrase: ").map_err(|e| e.to_string())?;
    if confirm {
        let q = rpassword::prompt_password("again: ").map_err(|e| e.to_string())?;
        if p != q {
            return Err("the passphrases differ".into());
        }
    }
    if p.is_empty() {
        return Err("empty passphrase".into());
    }
    Ok(p.into_bytes())
}

/// The host's name as the system knows it.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Derives a host's keys (Argon2id, protocol v1's cost: about a second
/// and 256 MiB).
pub fn derive(passphrase: &[u8], host: &str, secret: Vec<u8>) -> Result<Keys, String> {
    let k = HostKeys::derive(passphrase, host, KdfParams::V1).map_err(|e| e.to_string())?;
    Ok(Keys {
        signing: k.signing,
        meta: k.meta_key,
        secret,
    })
}

/// A remote of a store.
pub struct Remote {
    pub name: String,
    pub dir: PathBuf,
    pub cfg: Config,
    pub keys: Keys,
}

pub fn mirror_dir(store: &Path) -> PathBuf {
    store.join(DIR)
}

impl Remote {
    fn path(dir: &Path, name: &str, ext: &str) -> PathBuf {
        dir.join(format!("{name}.{ext}"))
    }

    pub fn file(&self, ext: &str) -> PathBuf {
        Remote::path(&self.dir, &self.name, ext)
    }

    /// Writes a new remote's files (refusing a name already taken).
    pub fn add(store: &Path, name: &str, cfg: Config, keys: &Keys) -> Result<Remote, String> {
        validate_name(name)?;
        let dir = mirror_dir(store);
        fs::create_dir_all(&dir).map_err(|x| format!("{}: {x}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(|x| format!("{}: {x}", dir.display()))?;
        if Remote::path(&dir, name, "json").exists() {
            return Err(format!("remote {name} already exists"));
        }
        let kf = KeyFile {
            v: 1,
            signing: hex(keys.signing.as_bytes()),
            meta: hex(&keys.meta),
            secret: hex(&keys.secret),
        };
        write_private(
            &Remote::path(&dir, name, "key"),
            &serde_json::to_vec(&kf).map_err(|e| e.to_string())?,
        )?;
        write_private(
            &Remote::path(&dir, name, "json"),
            &serde_json::to_vec_pretty(&cfg).map_err(|e| e.to_string())?,
        )?;
        Remote::open(store, name)
    }

    pub fn open(store: &Path, name: &str) -> Result<Remote, String> {
        validate_name(name)?;
        let dir = mirror_dir(store);
        let cfgp = Remote::path(&dir, name, "json");
        let cfg: Config = match fs::read(&cfgp) {
            Ok(b) => serde_json::from_slice(&b).map_err(|x| format!("{}: {x}", cfgp.display()))?,
            Err(x) if x.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!("no remote named {name}"));
            }
            Err(x) => return Err(format!("{}: {x}", cfgp.display())),
        };
        let keyp = Remote::path(&dir, name, "key");
        let kf: KeyFile = serde_json::from_slice(&read_secret_file(&keyp)?)
            .map_err(|x| format!("{}: {x}", keyp.display()))?;
        let bad = || format!("{}: malformed key", keyp.display());
        let seed: [u8; 32] = unhex(&kf.signing)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(bad)?;
        let meta: [u8; 32] = unhex(&kf.meta)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(bad)?;
        let secret = unhex(&kf.secret).ok_or_else(bad)?;
        Ok(Remote {
            name: name.to_string(),
            dir,
            cfg,
            keys: Keys {
                signing: SigningKey::from_bytes(&seed),
                meta,
                secret,
            },
        })
    }

    /// Every remote of a store, by name.
    pub fn names(store: &Path) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(mirror_dir(store))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n.strip_suffix(".json")
                    .filter(|s| !s.ends_with(".status"))
                    .map(str::to_string)
            })
            .collect();
        out.sort();
        out
    }

    /// Removes a remote's local files (the target keeps what it holds).
    pub fn remove(store: &Path, name: &str) -> Result<(), String> {
        let r = Remote::open(store, name)?;
        let _lock = r.lock()?;
        for ext in ["json", "key", "redb", "status.json"] {
            match fs::remove_file(r.file(ext)) {
                Ok(()) => {}
                Err(x) if x.kind() == std::io::ErrorKind::NotFound => {}
                Err(x) => return Err(format!("{}: {x}", r.file(ext).display())),
            }
        }
        Ok(())
    }

    pub fn agent(&self) -> Result<ureq::Agent, String> {
        let ca = match &self.cfg.ca_file {
            Some(f) => Some(fs::read(f).map_err(|x| format!("{}: {x}", f.display()))?),
            None => None,
        };
        make_agent(ca.as_deref())
    }

    pub fn client(&self) -> Result<client::Client, String> {
        Ok(client::Client::new(
            self.agent()?,
            &self.cfg.url,
            &self.cfg.host,
            self.keys.signing.clone(),
        ))
    }

    /// Holds the remote's lock file (one run at a time, across
    /// processes) until dropped.
    pub fn lock(&self) -> Result<fs::File, String> {
        let p = self.file("lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&p)
            .map_err(|x| format!("{}: {x}", p.display()))?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|x| format!("{}: {x}", p.display()))?;
        Ok(f)
    }

    pub fn status(&self) -> Status {
        fs::read(self.file("status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| Status {
                remote: self.name.clone(),
                url: self.cfg.url.clone(),
                ..Status::default()
            })
    }

    pub fn save_status(&self, s: &Status) {
        let r = serde_json::to_vec_pretty(s)
            .map_err(std::io::Error::other)
            .and_then(|b| crate::store::write_file_atomic(&self.file("status.json"), &b));
        if let Err(x) = r {
            log::error!("remote {}: saving its status: {x}", self.name);
        }
    }
}

/// An HTTP agent for targets: TLS trusting `ca_pem` (a self-signed
/// target) or the built-in roots; refusals come back as replies.
pub fn make_agent(ca_pem: Option<&[u8]>) -> Result<ureq::Agent, String> {
    crate::tlsconf::agent(ca_pem)
}
