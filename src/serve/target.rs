//! The target's state and every rule of docs/protocol.md that changes it:
//! registered clients, per blob an owner list with a count per client,
//! pending uploads, sealed roots, and the checks on each request (quota,
//! sequence, ownership). Synchronous: `http` calls it from blocking tasks.
//!
//! Tables of `target.redb`:
//! - `clients`: name -> ClientRec (JSON)
//! - `blobs`: name -> (size, clients with it pending)
//! - `refs`: (name, client) -> count (a row only while count > 0)
//! - `pending`: (client, name) -> unix time of upload
//! - `roots`: (client, root id) -> (seq, sealed bytes)
//!
//! Calls `seal` (signatures), `serve::blobs`; never `fs` or the store.

use std::collections::HashMap;
use std::path::Path;

use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::blobs::{BlobStore, Name, hex};

const CLIENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("clients");
const BLOBS: TableDefinition<&[u8; 32], (u64, u64)> = TableDefinition::new("blobs");
const REFS: TableDefinition<(&[u8; 32], &str), u64> = TableDefinition::new("refs");
const PENDING: TableDefinition<(&str, &[u8; 32]), i64> = TableDefinition::new("pending");
/// A root's row: the seq of the commit that put it, and its sealed bytes.
type RootRow = (u64, &'static [u8]);
const ROOTS: TableDefinition<(&str, &[u8; 32]), RootRow> = TableDefinition::new("roots");

/// Protocol limits (v1), reported by `GET /v1/info`.
pub const BLOB_MAX: usize = 16 << 20;
pub const JSON_MAX: usize = 8 << 20;
pub const HAVE_MAX: usize = 16_384;
pub const ROOT_MAX: usize = 1 << 20;
pub const ROOTS_PER_COMMIT: usize = 64;
pub const SKEW_SECS: i64 = 300;

/// A refusal: HTTP status, protocol error code, message, extra fields.
#[derive(Debug)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub extra: serde_json::Value,
}

impl Refusal {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
            extra: serde_json::Value::Null,
        }
    }

    fn with(mut self, extra: serde_json::Value) -> Refusal {
        self.extra = extra;
        self
    }
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    log::error!("target: {e}");
    Refusal::new(500, "internal", "internal error (see the target's log)")
}

macro_rules! db {
    ($e:expr) => {
        $e.map_err(internal)?
    };
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientRec {
    /// Ed25519 public key, hex.
    pub key: String,
    pub quota: Option<u64>,
    /// Sequence of the last commit applied.
    pub seq: u64,
    pub referenced_bytes: u64,
    pub pending_bytes: u64,
    pub added: i64,
    /// Unix seconds, to the minute (see `Target::seen`).
    pub last_seen: i64,
}

/// A client as `serve client list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ClientInfo {
    pub name: String,
    #[serde(flatten)]
    pub rec: ClientRec,
}

/// A request's signature headers, as received.
pub struct Signed<'a> {
    pub client: Option<&'a str>,
    pub time: Option<&'a str>,
    pub nonce: Option<&'a str>,
    pub signature: Option<&'a str>,
}

/// What `POST /v1/commit` carries.
#[derive(Debug, Default, Deserialize)]
pub struct Commit {
    pub seq: u64,
    #[serde(default)]
    pub add: Vec<(String, u64)>,
    #[serde(default)]
    pub drop: Vec<(String, u64)>,
    #[serde(default)]
    pub roots_put: Vec<RootPut>,
    #[serde(default)]
    pub roots_drop: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct RootPut {
    pub id: String,
    /// Base64 (standard, padded).
    pub sealed: String,
}

pub struct Target {
    db: Database,
    blobs: Box<dyn BlobStore>,
    /// Nonces seen per client, with their request time, for the skew
    /// window. Not persisted: a restarted target accepts only requests
    /// signed after it started (`started`), so none seen before can replay.
    nonces: Mutex<Nonces>,
    /// When each client's `last_seen` was last written: it is written at
    /// most once a minute, not in a write transaction per request.
    noted: Mutex<HashMap<String, i64>>,
    /// Held across every change of the `blobs` table together with the
    /// file it names (a put's commit, a collect's commit and its deletes),
    /// so a blob listed is always a blob stored.
    lock: Mutex<()>,
    pub started: i64,
}

/// Nonces seen, and when they were last pruned.
#[derive(Default)]
struct Nonces {
    seen: HashMap<(String, String), i64>,
    pruned: i64,
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn name_of(s: &str) -> Result<Name, Refusal> {
    super::blobs::parse_name(s)
        .ok_or_else(|| Refusal::new(400, "bad_request", format!("not a blob name: {s:.80}")))
}

impl Target {
    pub fn open(dir: &Path, blobs: Box<dyn BlobStore>) -> Result<Target, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("target.redb");
        let db = Database::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        for r in [
            tx.open_table(CLIENTS).map(|_| ()),
            tx.open_table(BLOBS).map(|_| ()),
            tx.open_table(REFS).map(|_| ()),
            tx.open_table(PENDING).map(|_| ()),
            tx.open_table(ROOTS).map(|_| ()),
        ] {
            r.map_err(|e| e.to_string())?;
        }
        tx.commit().map_err(|e| e.to_string())?;
        Ok(Target {
            db,
            blobs,
            nonces: Mutex::new(Nonces::default()),
            noted: Mutex::new(HashMap::new()),
            lock: Mutex::new(()),
            started: now(),
        })
    }

    // ------------------------------------------------------------ clients

    pub fn client_add(&self, name: &str, key_hex: &str, quota: Option<u64>) -> Result<(), String> {
        if name.is_empty() || name.len() > 128 || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "client name '{name}': 1 to 128 printable ASCII characters"
            ));
        }
        let key = parse_key(key_hex).ok_or_else(|| {
            "--key: an Ed25519 public key, 64 hex digits (snapctl remote add prints it)".to_string()
        })?;
        let tx = self.db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut t = tx.open_table(CLIENTS).map_err(|e| e.to_string())?;
            if t.get(name).map_err(|e| e.to_string())?.is_some() {
                return Err(format!("client '{name}' already exists"));
            }
            for row in t.iter().map_err(|e| e.to_string())? {
                let (k, v) = row.map_err(|e| e.to_string())?;
                let r: ClientRec = serde_json::from_slice(v.value()).map_err(|e| e.to_string())?;
                if r.key == hex32(&key) {
                    return Err(format!("that key is already client '{}'", k.value()));
                }
            }
            let rec = ClientRec {
                key: hex32(&key),
                quota,
                added: now(),
                ..Default::default()
            };
            let bytes = serde_json::to_vec(&rec).map_err(|e| e.to_string())?;
            t.insert(name, bytes.as_slice())
                .map_err(|e| e.to_string())?;
        }
        tx.commit().map_err(|e| e.to_string())
    }

    pub fn client_list(&self) -> Result<Vec<ClientInfo>, String> {
        let tx = self.db.begin_read().map_err(|e| e.to_string())?;
        let t = tx.open_table(CLIENTS).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| e.to_string())? {
            let (k, v) = row.map_err(|e| e.to_string())?;
            let rec: ClientRec = serde_json::from_slice(v.value()).map_err(|e| e.to_string())?;
            out.push(ClientInfo {
                name: k.value().to_string(),
                rec,
            });
        }
        Ok(out)
    }

    /// Removes a client and every reference, pending upload and root it
    /// had; blobs nobody else holds are deleted.
    pub fn client_remove(&self, name: &str) -> Result<u64, String> {
        let _l = self.lock.lock();
        let tx = self.db.begin_write().map_err(|e| e.to_string())?;
        let mut doomed: Vec<Name> = Vec::new();
        {
            let mut clients = tx.open_table(CLIENTS).map_err(|e| e.to_string())?;
            if clients.remove(name).map_err(|e| e.to_string())?.is_none() {
                return Err(format!("no client '{name}'"));
            }
            let mut refs = tx.open_table(REFS).map_err(|e| e.to_string())?;
            let mut pending = tx.open_table(PENDING).map_err(|e| e.to_string())?;
            let mut blobs = tx.open_table(BLOBS).map_err(|e| e.to_string())?;
            let mut roots = tx.open_table(ROOTS).map_err(|e| e.to_string())?;
            let mine: Vec<Name> = pending
                .range((name, &[0u8; 32])..=(name, &[0xffu8; 32]))
                .map_err(|e| e.to_string())?
                .filter_map(|r| r.ok().map(|(k, _)| *k.value().1))
                .collect();
            for n in &mine {
                pending.remove((name, n)).map_err(|e| e.to_string())?;
                let cur = blobs.get(n).map_err(|e| e.to_string())?.map(|v| v.value());
                if let Some((size, p)) = cur {
                    blobs
                        .insert(n, (size, p.saturating_sub(1)))
                        .map_err(|e| e.to_string())?;
                }
                doomed.push(*n);
            }
            // Refs are keyed by blob first: a scan finds this client's.
            let held: Vec<Name> = refs
                .iter()
                .map_err(|e| e.to_string())?
                .filter_map(|r| r.ok())
                .filter(|(k, _)| k.value().1 == name)
                .map(|(k, _)| *k.value().0)
                .collect();
            for n in &held {
                refs.remove((n, name)).map_err(|e| e.to_string())?;
                doomed.push(*n);
            }
            let ids: Vec<Name> = roots
                .range((name, &[0u8; 32])..=(name, &[0xffu8; 32]))
                .map_err(|e| e.to_string())?
                .filter_map(|r| r.ok().map(|(k, _)| *k.value().1))
                .collect();
            for id in ids {
                roots.remove((name, &id)).map_err(|e| e.to_string())?;
            }
        }
        let freed = self.collect_in(&tx, &doomed).map_err(|e| e.message)?;
        tx.commit().map_err(|e| e.to_string())?;
        self.delete_blobs(&freed);
        Ok(freed.len() as u64)
    }

    fn client(&self, name: &str) -> Result<Option<ClientRec>, Refusal> {
        let tx = db!(self.db.begin_read());
        let t = db!(tx.open_table(CLIENTS));
        let v = db!(t.get(name));
        match v {
            Some(v) => Ok(Some(db!(serde_json::from_slice(v.value())))),
            None => Ok(None),
        }
    }

    pub fn account(&self, name: &str) -> Result<ClientRec, Refusal> {
        self.client(name)?
            .ok_or_else(|| Refusal::new(401, "unknown_client", format!("no client '{name}'")))
    }

    // ------------------------------------------------------------ auth

    /// Checks a request's signature headers (docs/protocol.md,
    /// "Authentication"); returns the client's name.
    pub fn authenticate(
        &self,
        h: &Signed<'_>,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<String, Refusal> {
        use base64::Engine;
        let (Some(client), Some(time), Some(nonce), Some(sig)) =
            (h.client, h.time, h.nonce, h.signature)
        else {
            return Err(Refusal::new(401, "unsigned", "the request is not signed"));
        };
        let time: i64 = time
            .parse()
            .map_err(|_| Refusal::new(401, "unsigned", "Dedupfs-Time is not a number"))?;
        if nonce.len() != 32 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Refusal::new(
                401,
                "unsigned",
                "Dedupfs-Nonce: 32 hex digits",
            ));
        }
        let sig = base64::engine::general_purpose::STANDARD
            .decode(sig)
            .map_err(|_| Refusal::new(401, "unsigned", "Dedupfs-Signature is not base64"))?;
        let rec = self.account(client)?;
        let t = now();
        if (t - time).abs() > SKEW_SECS || time < self.started {
            return Err(Refusal::new(
                401,
                "stale",
                format!("request time {time} is not within {SKEW_SECS} s of the target's {t}"),
            ));
        }
        let key = parse_key(&rec.key)
            .and_then(|k| ed25519_dalek::VerifyingKey::from_bytes(&k).ok())
            .ok_or_else(|| internal(format!("client {client}: stored key does not parse")))?;
        let msg = crate::seal::request_message(method, path, time, nonce, body);
        crate::seal::verify_request(&key, &msg, &sig)
            .map_err(|_| Refusal::new(401, "bad_signature", "the signature does not verify"))?;
        let mut n = self.nonces.lock();
        // Expired nonces go once per skew window, not at every request.
        if t - n.pruned >= SKEW_SECS {
            n.seen.retain(|_, at| (t - *at).abs() <= 2 * SKEW_SECS);
            n.pruned = t;
        }
        if n.seen
            .insert((client.to_string(), nonce.to_string()), time)
            .is_some()
        {
            return Err(Refusal::new(401, "replayed", "this nonce was used already"));
        }
        Ok(client.to_string())
    }

    /// Notes that a client was seen (for `client list`), at most once a
    /// minute per client; best effort.
    pub fn seen(&self, client: &str) {
        let at = now();
        {
            let mut noted = self.noted.lock();
            if noted.get(client).is_some_and(|last| at - last < 60) {
                return;
            }
            noted.insert(client.to_string(), at);
        }
        let r = (|| -> Result<(), Refusal> {
            let mut tx = db!(self.db.begin_write());
            db!(tx.set_durability(redb::Durability::None));
            {
                let mut t = db!(tx.open_table(CLIENTS));
                let cur = db!(t.get(client)).map(|v| v.value().to_vec());
                if let Some(b) = cur {
                    let mut rec: ClientRec = db!(serde_json::from_slice(&b));
                    rec.last_seen = at;
                    let b = db!(serde_json::to_vec(&rec));
                    db!(t.insert(client, b.as_slice()));
                }
            }
            db!(tx.commit());
            Ok(())
        })();
        if let Err(e) = r {
            log::warn!("noting client {client} seen: {}", e.message);
        }
    }

    // ------------------------------------------------------------ blobs

    pub fn have(&self, names: &[String]) -> Result<Vec<String>, Refusal> {
        if names.len() > HAVE_MAX {
            return Err(Refusal::new(
                413,
                "too_large",
                format!("at most {HAVE_MAX} names per request"),
            ));
        }
        let tx = db!(self.db.begin_read());
        let t = db!(tx.open_table(BLOBS));
        let mut missing = Vec::new();
        for s in names {
            let n = name_of(s)?;
            if db!(t.get(&n)).is_none() {
                missing.push(s.clone());
            }
        }
        Ok(missing)
    }

    /// Stores an uploaded blob, durably, pending for `client`. Returns
    /// whether it was new to the target.
    pub fn put(&self, client: &str, name: &str, body: &[u8]) -> Result<bool, Refusal> {
        let n = name_of(name)?;
        if body.len() > BLOB_MAX {
            return Err(Refusal::new(
                413,
                "too_large",
                format!("a blob is at most {BLOB_MAX} bytes"),
            ));
        }
        if crate::seal::blob_name(body) != n {
            return Err(Refusal::new(
                422,
                "name_mismatch",
                "the blob's bytes do not hash to its name",
            ));
        }
        match crate::format::BlobHeader::decode(body) {
            Ok(h) if h.sealing != crate::format::Sealing::None => {}
            _ => {
                return Err(Refusal::new(
                    422,
                    "bad_blob",
                    "not a sealed blob of version 1",
                ));
            }
        }
        let size = body.len() as u64;
        let rec = self.account(client)?;
        let held = {
            let tx = db!(self.db.begin_read());
            db!(db!(tx.open_table(BLOBS)).get(&n)).is_some()
        };
        if !held {
            if let Some(q) = rec.quota
                && rec.referenced_bytes + rec.pending_bytes + size > q
            {
                return Err(quota(client, q));
            }
            db!(self.blobs.put(&n, body));
        }
        // Pending for this client (once), so a commit may reference it and
        // a fetch may read it back.
        let _l = self.lock.lock();
        let tx = db!(self.db.begin_write());
        {
            let mut pending = db!(tx.open_table(PENDING));
            let mut blobs = db!(tx.open_table(BLOBS));
            let refs = db!(tx.open_table(REFS));
            if db!(blobs.get(&n)).is_none() {
                // Collected since the check above (or never written):
                // stored again under the lock, before it is listed.
                db!(self.blobs.put(&n, body));
            }
            let already =
                db!(pending.get((client, &n))).is_some() || db!(refs.get((&n, client))).is_some();
            if !already {
                let (sz, p) = db!(blobs.get(&n)).map_or((size, 0), |v| v.value());
                db!(blobs.insert(&n, (sz, p + 1)));
                db!(pending.insert((client, &n), now()));
                self.adjust(&tx, client, |r| r.pending_bytes += sz)?;
            }
        }
        db!(tx.commit());
        Ok(!held)
    }

    /// A blob's bytes, for a client that references it or has it pending.
    pub fn get(&self, client: &str, name: &str) -> Result<Vec<u8>, Refusal> {
        let n = name_of(name)?;
        let mine = {
            let tx = db!(self.db.begin_read());
            db!(db!(tx.open_table(REFS)).get((&n, client))).is_some()
                || db!(db!(tx.open_table(PENDING)).get((client, &n))).is_some()
        };
        let missing = || Refusal::new(404, "no_such_blob", format!("no blob {name} of yours"));
        if !mine {
            return Err(missing());
        }
        db!(self.blobs.get(&n)).ok_or_else(missing)
    }

    // ------------------------------------------------------------ commit

    /// Applies a commit: all of it or none (docs/protocol.md).
    pub fn commit(&self, client: &str, c: &Commit) -> Result<ClientRec, Refusal> {
        use base64::Engine;
        if c.roots_put.len() > ROOTS_PER_COMMIT {
            return Err(Refusal::new(
                413,
                "too_large",
                format!("at most {ROOTS_PER_COMMIT} roots per commit"),
            ));
        }
        let add: Vec<(Name, u64)> = c
            .add
            .iter()
            .map(|(s, k)| Ok((name_of(s)?, *k)))
            .collect::<Result<_, Refusal>>()?;
        let drop: Vec<(Name, u64)> = c
            .drop
            .iter()
            .map(|(s, k)| Ok((name_of(s)?, *k)))
            .collect::<Result<_, Refusal>>()?;
        let mut roots_put: Vec<(Name, Vec<u8>)> = Vec::new();
        for r in &c.roots_put {
            let b = base64::engine::general_purpose::STANDARD
                .decode(&r.sealed)
                .map_err(|_| Refusal::new(400, "bad_request", "a root is not base64"))?;
            if b.len() > ROOT_MAX {
                return Err(Refusal::new(
                    413,
                    "too_large",
                    format!("a root is at most {ROOT_MAX} bytes"),
                ));
            }
            roots_put.push((name_of(&r.id)?, b));
        }
        let roots_drop: Vec<Name> = c
            .roots_drop
            .iter()
            .map(|s| name_of(s))
            .collect::<Result<_, Refusal>>()?;
        let _l = self.lock.lock();
        let tx = db!(self.db.begin_write());
        let rec = self.account(client)?;
        if c.seq != rec.seq + 1 {
            return Err(Refusal::new(
                409,
                "seq_conflict",
                format!(
                    "commit {} follows {}, not {}",
                    c.seq,
                    c.seq.saturating_sub(1),
                    rec.seq
                ),
            )
            .with(serde_json::json!({"seq": rec.seq})));
        }
        let mut gained = 0u64;
        let mut lost = 0u64;
        let mut pending_freed = 0u64;
        let mut maybe_free: Vec<Name> = Vec::new();
        {
            let mut blobs = db!(tx.open_table(BLOBS));
            let mut refs = db!(tx.open_table(REFS));
            let mut pending = db!(tx.open_table(PENDING));
            let mut missing = Vec::new();
            for (n, k) in &add {
                let Some((size, p)) = db!(blobs.get(n)).map(|v| v.value()) else {
                    missing.push(hex(n));
                    continue;
                };
                let cur = db!(refs.get((n, client))).map_or(0, |v| v.value());
                if cur == 0 {
                    gained += size;
                }
                db!(refs.insert((n, client), cur + k));
                if db!(pending.remove((client, n))).is_some() {
                    pending_freed += size;
                    db!(blobs.insert(n, (size, p.saturating_sub(1))));
                }
            }
            if !missing.is_empty() {
                return Err(Refusal::new(
                    409,
                    "missing_blobs",
                    format!("{} added blob(s) are not on the target", missing.len()),
                )
                .with(serde_json::json!({"missing": missing})));
            }
            for (n, k) in &drop {
                let cur = db!(refs.get((n, client))).map_or(0, |v| v.value());
                if *k > cur {
                    return Err(Refusal::new(
                        403,
                        "not_owner",
                        format!(
                            "drop of {k} reference(s) to {} that holds {cur} of yours",
                            hex(n)
                        ),
                    ));
                }
                if cur == *k {
                    db!(refs.remove((n, client)));
                    lost += db!(blobs.get(n)).map_or(0, |v| v.value().0);
                    maybe_free.push(*n);
                } else {
                    db!(refs.insert((n, client), cur - k));
                }
            }
            let mut roots = db!(tx.open_table(ROOTS));
            for id in &roots_drop {
                if db!(roots.remove((client, id))).is_none() {
                    return Err(Refusal::new(
                        404,
                        "no_such_root",
                        format!("no root {} of yours", hex(id)),
                    ));
                }
            }
            for (id, b) in &roots_put {
                db!(roots.insert((client, id), (c.seq, b.as_slice())));
            }
        }
        let mut after = rec.clone();
        after.seq = c.seq;
        after.referenced_bytes = (rec.referenced_bytes + gained).saturating_sub(lost);
        after.pending_bytes = rec.pending_bytes.saturating_sub(pending_freed);
        if let Some(q) = rec.quota
            && after.referenced_bytes + after.pending_bytes > q
            && gained > 0
        {
            return Err(quota(client, q));
        }
        let a = after.clone();
        self.adjust(&tx, client, move |r| *r = a)?;
        let freed = self.collect_in(&tx, &maybe_free)?;
        db!(tx.commit());
        self.delete_blobs(&freed);
        Ok(after)
    }

    pub fn roots(&self, client: &str) -> Result<Vec<(String, u64, u64)>, Refusal> {
        let tx = db!(self.db.begin_read());
        let t = db!(tx.open_table(ROOTS));
        let mut out = Vec::new();
        for row in db!(t.range((client, &[0u8; 32])..=(client, &[0xffu8; 32]))) {
            let (k, v) = db!(row);
            let (seq, b) = v.value();
            out.push((hex(k.value().1), b.len() as u64, seq));
        }
        Ok(out)
    }

    pub fn root(&self, client: &str, id: &str) -> Result<Vec<u8>, Refusal> {
        let n = name_of(id)?;
        let tx = db!(self.db.begin_read());
        let t = db!(tx.open_table(ROOTS));
        let v = db!(t.get((client, &n)));
        v.map(|v| v.value().1.to_vec())
            .ok_or_else(|| Refusal::new(404, "no_such_root", format!("no root {id} of yours")))
    }

    /// Blob count and bytes, for /metrics.
    pub fn totals(&self) -> Result<(u64, u64, u64), Refusal> {
        let tx = db!(self.db.begin_read());
        let t = db!(tx.open_table(BLOBS));
        let (mut n, mut bytes) = (0u64, 0u64);
        for row in db!(t.iter()) {
            let (_, v) = db!(row);
            n += 1;
            bytes += v.value().0;
        }
        let clients = db!(db!(tx.open_table(CLIENTS)).len());
        Ok((n, bytes, clients))
    }

    // ------------------------------------------------------------ upkeep

    fn adjust(
        &self,
        tx: &redb::WriteTransaction,
        client: &str,
        f: impl FnOnce(&mut ClientRec),
    ) -> Result<(), Refusal> {
        let mut t = db!(tx.open_table(CLIENTS));
        let cur = db!(t.get(client)).map(|v| v.value().to_vec());
        let Some(b) = cur else {
            return Err(Refusal::new(
                401,
                "unknown_client",
                format!("no client '{client}'"),
            ));
        };
        let mut rec: ClientRec = db!(serde_json::from_slice(&b));
        f(&mut rec);
        let b = db!(serde_json::to_vec(&rec));
        db!(t.insert(client, b.as_slice()));
        Ok(())
    }

    /// Of `names`, removes those no client references or has pending from
    /// `blobs`, in `tx`; returns them, for deletion after the commit.
    fn collect_in(
        &self,
        tx: &redb::WriteTransaction,
        names: &[Name],
    ) -> Result<Vec<Name>, Refusal> {
        let mut blobs = db!(tx.open_table(BLOBS));
        let refs = db!(tx.open_table(REFS));
        let mut out = Vec::new();
        for n in names {
            let Some((_, pending)) = db!(blobs.get(n)).map(|v| v.value()) else {
                continue;
            };
            let referenced = db!(refs.range((n, "")..))
                .next()
                .transpose()
                .map_err(internal)?
                .is_some_and(|(k, _)| k.value().0 == n);
            if pending == 0 && !referenced {
                db!(blobs.remove(n));
                out.push(*n);
            }
        }
        Ok(out)
    }

    fn delete_blobs(&self, names: &[Name]) {
        for n in names {
            if let Err(e) = self.blobs.delete(n) {
                // Unreferenced and unlisted: a leftover file, not a loss.
                log::warn!("deleting blob {}: {e}", hex(n));
            }
        }
    }
}

fn quota(client: &str, q: u64) -> Refusal {
    Refusal::new(
        507,
        "quota_exceeded",
        format!("client {client} would exceed its quota of {q} bytes; nothing it had was changed"),
    )
}

fn parse_key(s: &str) -> Option<[u8; 32]> {
    super::blobs::parse_name(&s.to_ascii_lowercase())
}

fn hex32(k: &[u8; 32]) -> String {
    hex(k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{BlobHeader, ChunkId, Compression, Sealing};
    use crate::seal::{HostKeys, KdfParams};
    use base64::Engine;

    const CHEAP: KdfParams = KdfParams {
        mem_kib: 64,
        passes: 1,
        lanes: 1,
    };

    fn target() -> (tempfile::TempDir, Target) {
        let d = tempfile::tempdir().unwrap();
        let t = super::super::open(d.path()).unwrap();
        (d, t)
    }

    fn keys(host: &str) -> HostKeys {
        HostKeys::derive(b"pass", host, CHEAP).unwrap()
    }

    fn sealed(data: &[u8]) -> (String, Vec<u8>) {
        let h = BlobHeader {
            compression: Compression::None,
            sealing: Sealing::None,
            raw_len: data.len() as u32,
        };
        let mut b = h.encode().to_vec();
        b.extend_from_slice(data);
        let s = crate::seal::seal_chunk(&b, &ChunkId::of(data), b"").unwrap();
        (hex(&crate::seal::blob_name(&s)), s)
    }

    struct Req {
        time: String,
        nonce: String,
        sig: String,
    }

    fn sign(k: &HostKeys, method: &str, path: &str, body: &[u8], time: i64, nonce: &str) -> Req {
        let msg = crate::seal::request_message(method, path, time, nonce, body);
        let sig = crate::seal::sign_request(&k.signing, &msg);
        Req {
            time: time.to_string(),
            nonce: nonce.to_string(),
            sig: base64::engine::general_purpose::STANDARD.encode(sig),
        }
    }

    fn auth(
        t: &Target,
        who: &str,
        r: &Req,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<String, Refusal> {
        t.authenticate(
            &Signed {
                client: Some(who),
                time: Some(&r.time),
                nonce: Some(&r.nonce),
                signature: Some(&r.sig),
            },
            method,
            path,
            body,
        )
    }

    const N1: &str = "0123456789abcdef0123456789abcdef";
    const N2: &str = "fedcba9876543210fedcba9876543210";

    #[test]
    fn requests_are_refused_unless_signed_fresh_and_once() {
        let (_d, t) = target();
        let a = keys("a");
        let b = keys("b");
        t.client_add("a", &hex(a.public().as_bytes()), None)
            .unwrap();
        t.client_add("b", &hex(b.public().as_bytes()), None)
            .unwrap();
        let now = now();
        let ok = sign(&a, "POST", "/v1/have", b"{}", now, N1);
        assert_eq!(auth(&t, "a", &ok, "POST", "/v1/have", b"{}").unwrap(), "a");
        let code = |r: Result<String, Refusal>| r.unwrap_err().code;
        assert_eq!(
            code(auth(&t, "a", &ok, "POST", "/v1/have", b"{}")),
            "replayed"
        );
        let unsigned = t.authenticate(
            &Signed {
                client: Some("a"),
                time: None,
                nonce: None,
                signature: None,
            },
            "GET",
            "/v1/client",
            b"",
        );
        assert_eq!(code(unsigned), "unsigned");
        // Signed by a, sent as b: b's key does not verify it.
        let as_b = sign(&a, "GET", "/v1/client", b"", now, N2);
        assert_eq!(
            code(auth(&t, "b", &as_b, "GET", "/v1/client", b"")),
            "bad_signature"
        );
        // Body, path or method changed after signing.
        let r = sign(
            &a,
            "PUT",
            "/v1/blobs/x",
            b"one",
            now,
            "11111111111111111111111111111111",
        );
        assert_eq!(
            code(auth(&t, "a", &r, "PUT", "/v1/blobs/x", b"two")),
            "bad_signature"
        );
        assert_eq!(
            code(auth(&t, "a", &r, "PUT", "/v1/blobs/y", b"one")),
            "bad_signature"
        );
        let stale = sign(&a, "GET", "/v1/client", b"", now - 2 * SKEW_SECS, N2);
        assert_eq!(
            code(auth(&t, "a", &stale, "GET", "/v1/client", b"")),
            "stale"
        );
        let r = sign(&a, "GET", "/v1/client", b"", now, N2);
        assert_eq!(
            code(auth(&t, "nobody", &r, "GET", "/v1/client", b"")),
            "unknown_client"
        );
        // The same key cannot be registered twice, nor a name reused.
        assert!(
            t.client_add("c", &hex(a.public().as_bytes()), None)
                .is_err()
        );
        assert!(
            t.client_add("a", &hex(keys("z").public().as_bytes()), None)
                .is_err()
        );
    }

    #[test]
    fn blobs_are_shared_counted_per_client_and_freed_when_nobody_holds_them() {
        let (_d, t) = target();
        for c in ["a", "b"] {
            t.client_add(c, &hex(keys(c).public().as_bytes()), None)
                .unwrap();
        }
        let (name, bytes) = sealed(b"a chunk both hosts have");
        assert_eq!(
            t.have(std::slice::from_ref(&name)).unwrap(),
            vec![name.clone()]
        );
        // Refused: bytes that do not hash to the name, unsealed bytes.
        let mut bad = bytes.clone();
        bad[10] ^= 1;
        assert_eq!(t.put("a", &name, &bad).unwrap_err().code, "name_mismatch");
        assert!(t.put("a", &name, &bytes).unwrap());
        assert!(t.have(std::slice::from_ref(&name)).unwrap().is_empty());
        // b may not read it before it holds it.
        assert_eq!(t.get("b", &name).unwrap_err().code, "no_such_blob");
        assert_eq!(t.get("a", &name).unwrap(), bytes);
        let commit = |seq, add: Vec<(String, u64)>, drop: Vec<(String, u64)>| Commit {
            seq,
            add,
            drop,
            ..Default::default()
        };
        t.commit("a", &commit(1, vec![(name.clone(), 1)], vec![]))
            .unwrap();
        // b references the blob a uploaded without sending it.
        t.commit("b", &commit(1, vec![(name.clone(), 2)], vec![]))
            .unwrap();
        assert_eq!(t.get("b", &name).unwrap(), bytes);
        // Refused, changing nothing: a replayed seq, a drop beyond the
        // count, a reference to a blob the target lacks.
        assert_eq!(
            t.commit("a", &commit(1, vec![], vec![])).unwrap_err().code,
            "seq_conflict"
        );
        assert_eq!(
            t.commit("a", &commit(2, vec![], vec![(name.clone(), 2)]))
                .unwrap_err()
                .code,
            "not_owner"
        );
        let (other, _) = sealed(b"never sent");
        assert_eq!(
            t.commit("a", &commit(2, vec![(other, 1)], vec![]))
                .unwrap_err()
                .code,
            "missing_blobs"
        );
        assert_eq!(t.account("a").unwrap().seq, 1);
        // a drops its reference: b still holds the blob.
        t.commit("a", &commit(2, vec![], vec![(name.clone(), 1)]))
            .unwrap();
        assert_eq!(t.get("b", &name).unwrap(), bytes);
        assert_eq!(t.get("a", &name).unwrap_err().code, "no_such_blob");
        // b drops both of its references: the blob is gone.
        t.commit("b", &commit(2, vec![], vec![(name.clone(), 2)]))
            .unwrap();
        assert_eq!(
            t.have(std::slice::from_ref(&name)).unwrap(),
            vec![name.clone()]
        );
        assert_eq!(t.totals().unwrap().0, 0);
    }

    #[test]
    fn quotas_refuse_uploads_and_commits_and_harm_nothing() {
        let (_d, t) = target();
        t.client_add("a", &hex(keys("a").public().as_bytes()), Some(200))
            .unwrap();
        let (n1, b1) = sealed(&[1u8; 100]);
        let (n2, b2) = sealed(&[2u8; 100]);
        t.put("a", &n1, &b1).unwrap();
        assert_eq!(t.put("a", &n2, &b2).unwrap_err().code, "quota_exceeded");
        assert_eq!(t.get("a", &n1).unwrap(), b1);
        let roots = vec![RootPut {
            id: hex(&[9u8; 32]),
            sealed: base64::engine::general_purpose::STANDARD.encode(b"sealed root"),
        }];
        t.commit(
            "a",
            &Commit {
                seq: 1,
                add: vec![(n1.clone(), 1)],
                roots_put: roots,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(t.roots("a").unwrap().len(), 1);
        assert_eq!(t.root("a", &hex(&[9u8; 32])).unwrap(), b"sealed root");
        assert_eq!(t.account("a").unwrap().pending_bytes, 0);
        // Removing the client frees what only it held.
        assert_eq!(t.client_remove("a").unwrap(), 1);
        assert_eq!(t.totals().unwrap(), (0, 0, 0));
    }
}
