//! Snapshots as records (design decision 5), below the filesystem: a
//! snapshot is a name for a generation of the versioned meta records. This
//! module reads and writes those records and what follows from them: the
//! list with the space each snapshot alone holds, what deleting one frees,
//! and the diff between two generations, each costing what changed (it
//! reads the change log for the span it needs). It works on meta.redb
//! transactions and the store's index alone, so `snapctl` on an unmounted
//! store, a recovery and the mirror can use it without a mounted volume.
//! The live volume (`fs::volume`) adds what only it knows: staged data,
//! open files, kernel caches.
//!
//! Calls `meta`, `format`, `store`; never `fs`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use redb::{ReadTransaction, ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::format::{self, ChunkId, Content, DirentVal, InodeRec, Kind, Timespec};
use crate::meta::{self, Gens, NOW, Rec};
use crate::store::{self, Store};

/// Longest snapshot name (bytes); it must also fit a directory entry.
pub const SNAP_NAME_MAX: usize = 200;
pub const SNAP_REC_VERSION: u32 = 1;

/// Why a snapshot operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Refused, with the snapshot and the reason (no such snapshot, a bad
    /// name): the caller's mistake, not damage.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] store::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn refused(msg: String) -> Error {
    Error::Refused(msg)
}

/// A snapshot as stored in the `snapshots` table (JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapRec {
    pub v: u32,
    pub id: u64,
    pub generation: u64,
    pub created: i64,
    pub created_nanos: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Taken by the retention policy's timer (only those are pruned).
    #[serde(default)]
    pub auto: bool,
    /// What the snapshot refers to, computed on first demand (it never
    /// changes).
    #[serde(default)]
    pub refer: Option<Refer>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Refer {
    /// Logical bytes of the regular files the snapshot sees.
    pub bytes: u64,
    pub files: u64,
}

/// A snapshot as `snapctl list/show` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct SnapInfo {
    pub name: String,
    pub id: u64,
    pub generation: u64,
    pub created: String,
    pub created_unix: i64,
    pub labels: BTreeMap<String, String>,
    pub auto: bool,
    /// Bytes on disk that deleting this snapshot would free (the chunks
    /// and inline data only it holds), like zfs "used".
    pub used_bytes: Option<u64>,
    /// Logical bytes of the files it sees, like zfs "refer".
    pub refer_bytes: Option<u64>,
    pub files: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DeleteReport {
    pub name: String,
    pub versions_freed: u64,
    pub chunk_refs_dropped: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiffEntry {
    /// added, removed, modified or renamed
    pub change: &'static str,
    pub path: String,
    /// The old path of a renamed or moved entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    pub kind: &'static str,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_before: Option<u64>,
}

/// What differs between two versions of a file (`snap_diff`).
struct Differs {
    attrs: bool,
    xattrs: bool,
    bytes: bool,
}

/// Checks a snapshot name: what `snapctl` and `.snapshots/NAME` can carry.
pub fn validate_name(name: &str) -> Result<()> {
    let why = if name.is_empty() {
        Some("it is empty".to_string())
    } else if name.len() > SNAP_NAME_MAX {
        Some(format!(
            "it is {} bytes long (the limit is {SNAP_NAME_MAX})",
            name.len()
        ))
    } else if name.contains('/') {
        Some("it contains '/'".into())
    } else if name.starts_with('.') {
        Some("it starts with '.'".into())
    } else if name.chars().any(|c| c.is_control()) {
        Some("it contains a control character".into())
    } else {
        None
    };
    match why {
        Some(w) => Err(refused(format!("snapshot name {name:?} is invalid: {w}"))),
        None => Ok(()),
    }
}

pub fn decode_rec(name: &str, b: &[u8]) -> store::Result<SnapRec> {
    let r: SnapRec =
        serde_json::from_slice(b).map_err(|e| store::Error::Db(format!("snapshot {name}: {e}")))?;
    if r.v != SNAP_REC_VERSION {
        return Err(store::Error::Db(format!(
            "snapshot {name} has record version {}; this build understands {SNAP_REC_VERSION}",
            r.v
        )));
    }
    Ok(r)
}

pub fn encode_rec(r: &SnapRec) -> Vec<u8> {
    serde_json::to_vec(r).unwrap_or_default()
}

/// Every snapshot, oldest first.
pub fn load_snaps(rt: &ReadTransaction) -> store::Result<Vec<(String, SnapRec)>> {
    let t = match rt.open_table(meta::SNAPS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for row in t.iter()? {
        let (k, v) = row?;
        let name = k.value().to_string();
        let rec = decode_rec(&name, v.value())?;
        out.push((name, rec));
    }
    out.sort_by_key(|(_, r)| r.generation);
    Ok(out)
}

pub fn format_time(secs: i64, nanos: u32) -> String {
    chrono::DateTime::from_timestamp(secs, nanos)
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        })
        .unwrap_or_default()
}

/// A path for humans and JSON: UTF-8 where it is, `\xNN` where not.
pub fn show_path(p: &[u8]) -> String {
    let mut out = String::new();
    for chunk in p.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

pub fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::File => "file",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
        Kind::Fifo => "fifo",
        Kind::CharDev => "chardev",
        Kind::BlockDev => "blockdev",
        Kind::Socket => "socket",
    }
}

/// A key of a versioned record, as the change log names it.
pub type LogKey = (Rec, u64, Vec<u8>);

/// The distinct records the change log says generations in (lo, hi]
/// changed.
pub fn changed_keys(rt: &ReadTransaction, lo: u64, hi: u64) -> store::Result<BTreeSet<LogKey>> {
    let t = rt.open_table(meta::CHANGES)?;
    let empty: &[u8] = &[];
    let mut out = BTreeSet::new();
    if hi <= lo {
        return Ok(out);
    }
    for row in t.range((lo + 1, 0u8, 0u64, empty)..(hi.saturating_add(1), 0u8, 0u64, empty))? {
        let (k, _) = row?;
        let (_, tag, id, name) = k.value();
        if let Some(r) = Rec::from_code(tag) {
            out.insert((r, id, name.to_vec()));
        }
    }
    Ok(out)
}

/// One record version a snapshot deletion frees.
enum Doomed {
    Inode(u64, u64),
    Dirent(u64, Vec<u8>, u64),
    Xattr(u64, Vec<u8>, u64),
    Content(u64, u64),
}

/// The versions only snapshot `s` sees, given the retained snapshots around
/// it (`p`, 0 for none) and the last generation that can have ended one
/// (`hi`: the next snapshot, or the current generation): born in (p, s],
/// died in (s, hi].
fn doomed_versions(
    rt: &ReadTransaction,
    p: u64,
    s: u64,
    hi: u64,
) -> store::Result<(Vec<Doomed>, u64)> {
    let keys = changed_keys(rt, s, hi)?;
    let inodes = rt.open_table(meta::INODES)?;
    let dirents = rt.open_table(meta::DIRENTS)?;
    let xattrs = rt.open_table(meta::XATTRS)?;
    let contents = rt.open_table(meta::CONTENTS)?;
    let only_s = |born: u64, died: u64| p < born && born <= s && s < died && died <= hi;
    let mut out = Vec::new();
    let mut inline_bytes = 0u64;
    for (rec, id, name) in keys {
        match rec {
            Rec::Inode => {
                for row in inodes.range((id, 0)..=(id, u64::MAX))? {
                    let (k, v) = row?;
                    let r = InodeRec::decode(v.value())
                        .map_err(|e| store::Error::Db(format!("inode {id}: {e}")))?;
                    let born = k.value().1;
                    if only_s(born, r.died) {
                        if let Content::Inline(b) = &r.content {
                            inline_bytes += b.len() as u64;
                        }
                        out.push(Doomed::Inode(id, born));
                    }
                }
            }
            Rec::Dirent => {
                for row in
                    dirents.range((id, name.as_slice(), 0)..=(id, name.as_slice(), u64::MAX))?
                {
                    let (k, v) = row?;
                    let d = DirentVal::decode(v.value())
                        .map_err(|e| store::Error::Db(format!("dirent: {e}")))?;
                    let born = k.value().2;
                    if only_s(born, d.died) {
                        out.push(Doomed::Dirent(id, name.clone(), born));
                    }
                }
            }
            Rec::Xattr => {
                for row in
                    xattrs.range((id, name.as_slice(), 0)..=(id, name.as_slice(), u64::MAX))?
                {
                    let (k, v) = row?;
                    let (died, body) = format::decode_versioned(v.value())
                        .map_err(|e| store::Error::Db(format!("xattr: {e}")))?;
                    let born = k.value().2;
                    if only_s(born, died) {
                        inline_bytes += body.len() as u64;
                        out.push(Doomed::Xattr(id, name.clone(), born));
                    }
                }
            }
            Rec::Content => {
                for row in contents.range((id, 0)..=(id, u64::MAX))? {
                    let (k, v) = row?;
                    let (died, _) = format::decode_versioned(v.value())
                        .map_err(|e| store::Error::Db(format!("content: {e}")))?;
                    let born = k.value().1;
                    if only_s(born, died) {
                        out.push(Doomed::Content(id, born));
                    }
                }
            }
        }
    }
    Ok((out, inline_bytes))
}

/// The references freeing `doomed` drops: per inode, the chunks no
/// remaining version of it holds (one reference per chunk per inode).
fn ref_drops(rt: &ReadTransaction, doomed: &[Doomed]) -> store::Result<Vec<ChunkId>> {
    let contents = rt.open_table(meta::CONTENTS)?;
    let mut gone: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for d in doomed {
        if let Doomed::Content(ino, born) = d {
            gone.entry(*ino).or_default().push(*born);
        }
    }
    let mut out = Vec::new();
    for (ino, borns) in gone {
        let before = meta::chunks_of_ino(&contents, ino, &[])?;
        let after = meta::chunks_of_ino(&contents, ino, &borns)?;
        out.extend(before.difference(&after).copied());
    }
    Ok(out)
}

/// (parent, name) -> path, at generation `at`, through each directory's
/// recorded link.
pub fn path_at(
    inodes: &impl ReadableTable<(u64, u64), &'static [u8]>,
    parent: u64,
    name: &[u8],
    at: u64,
) -> store::Result<Vec<u8>> {
    let mut parts: Vec<Vec<u8>> = vec![name.to_vec()];
    let mut cur = parent;
    let mut depth = 0;
    while cur != meta::ROOT_INO {
        depth += 1;
        let rec = meta::inode_at(inodes, cur, at)?;
        match rec {
            Some((_, r)) if r.parent != 0 && depth < 4096 => {
                parts.push(r.name.clone());
                cur = r.parent;
            }
            _ => {
                parts.push(format!("?inode-{cur}").into_bytes());
                break;
            }
        }
    }
    let mut out = Vec::new();
    for p in parts.iter().rev() {
        out.push(b'/');
        out.extend_from_slice(p);
    }
    Ok(out)
}

/// A path of inode `ino` at generation `at`: its recorded link if that
/// still names it, else a name for it in the same directory (the recorded
/// link of a hard-linked file can be one since removed).
pub fn name_at(
    inodes: &impl ReadableTable<(u64, u64), &'static [u8]>,
    dirents: &impl ReadableTable<(u64, &'static [u8], u64), &'static [u8]>,
    ino: u64,
    rec: &InodeRec,
    at: u64,
) -> store::Result<Vec<u8>> {
    if meta::dirent_at(dirents, rec.parent, &rec.name, at)?.is_some_and(|(_, d)| d.ino == ino) {
        return path_at(inodes, rec.parent, &rec.name, at);
    }
    for (n, d) in meta::list_dir_at(dirents, rec.parent, at, None)? {
        if d.ino == ino {
            return path_at(inodes, rec.parent, &n, at);
        }
    }
    Ok(format!("?inode-{ino}").into_bytes())
}

/// Refers of a snapshot: a scan of the inodes it sees (once per snapshot).
fn refer_at(rt: &ReadTransaction, sgen: u64) -> store::Result<Refer> {
    let t = rt.open_table(meta::INODES)?;
    let mut out = Refer::default();
    for row in t.iter()? {
        let (k, v) = row?;
        if k.value().1 > sgen {
            continue;
        }
        let r = InodeRec::decode(v.value()).map_err(|e| store::Error::Db(format!("inode: {e}")))?;
        if r.died > sgen && r.kind == Kind::File {
            out.bytes += r.size;
            out.files += 1;
        }
    }
    Ok(out)
}

/// A snapshot as `snapctl list/show` reports it, with `used` bytes if known.
pub fn info_of(name: &str, r: &SnapRec, used: Option<u64>) -> SnapInfo {
    SnapInfo {
        name: name.to_string(),
        id: r.id,
        generation: r.generation,
        created: format_time(r.created, r.created_nanos),
        created_unix: r.created,
        labels: r.labels.clone(),
        auto: r.auto,
        used_bytes: used,
        refer_bytes: r.refer.map(|x| x.bytes),
        files: r.refer.map(|x| x.files),
    }
}

/// Whether a snapshot of that name exists.
pub fn exists(rt: &ReadTransaction, name: &str) -> Result<bool> {
    let t = match rt.open_table(meta::SNAPS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
        Err(e) => return Err(store::Error::from(e).into()),
    };
    Ok(t.get(name).map_err(store::Error::from)?.is_some())
}

/// Records snapshot `name` of the current generation in `tx` and moves
/// the tree on to the next generation; returns the record.
pub fn create(
    tx: &WriteTransaction,
    name: &str,
    labels: BTreeMap<String, String>,
    auto: bool,
    now: Timespec,
) -> store::Result<SnapRec> {
    let mut st = tx.open_table(meta::STATE)?;
    let g = Gens::load(&st)?;
    let id = st.get("next_snap_id")?.map(|v| v.value()).unwrap_or(1);
    let rec = SnapRec {
        v: SNAP_REC_VERSION,
        id,
        generation: g.current,
        created: now.secs,
        created_nanos: now.nanos,
        labels,
        auto,
        refer: None,
    };
    tx.open_table(meta::SNAPS)?
        .insert(name, encode_rec(&rec).as_slice())?;
    st.insert("next_snap_id", id + 1)?;
    st.insert("last_snap", g.current)?;
    st.insert("gen", g.current + 1)?;
    Ok(rec)
}

/// What [`list`] returns: the snapshots as reported, and the records whose
/// `refer` it computed.
pub type Listing = (Vec<SnapInfo>, Vec<(String, SnapRec)>);

/// Every snapshot, oldest first; with `space`, what each alone keeps
/// alive and what it refers to. The second list holds the records whose
/// `refer` was computed now: a caller that can write keeps them
/// ([`keep_refer`]), since they never change.
pub fn list(rt: &ReadTransaction, index: &Store, space: bool) -> Result<Listing> {
    let snaps = load_snaps(rt)?;
    if !space {
        let out = snaps.iter().map(|(n, r)| info_of(n, r, None)).collect();
        return Ok((out, Vec::new()));
    }
    let g = Gens::load(&rt.open_table(meta::STATE).map_err(store::Error::from)?)?;
    let mut out = Vec::new();
    let mut computed: Vec<(String, SnapRec)> = Vec::new();
    for (i, (name, r)) in snaps.iter().enumerate() {
        let p = if i > 0 { snaps[i - 1].1.generation } else { 0 };
        let hi = snaps.get(i + 1).map_or(g.current, |n| n.1.generation);
        let (doomed, inline) = doomed_versions(rt, p, r.generation, hi)?;
        let mut refs: HashMap<ChunkId, u64> = HashMap::new();
        for c in ref_drops(rt, &doomed)? {
            *refs.entry(c).or_default() += 1;
        }
        let mut used = inline;
        for (id, n) in refs {
            if let Some(e) = index.lookup(&id)? {
                let held: u64 = e.owners.iter().map(|(_, c)| *c).sum();
                if held <= n {
                    used += e.record_len as u64;
                }
            }
        }
        let mut r = r.clone();
        if r.refer.is_none() {
            r.refer = Some(refer_at(rt, r.generation)?);
            computed.push((name.clone(), r.clone()));
        }
        out.push(info_of(name, &r, Some(used)));
    }
    Ok((out, computed))
}

/// Keeps the `refer` figures [`list`] computed, for snapshots still there.
pub fn keep_refer(tx: &WriteTransaction, computed: &[(String, SnapRec)]) -> store::Result<()> {
    let mut t = tx.open_table(meta::SNAPS)?;
    for (name, r) in computed {
        if t.get(name.as_str())?.is_some() {
            t.insert(name.as_str(), encode_rec(r).as_slice())?;
        }
    }
    Ok(())
}

/// What deleting one snapshot does, read from a snapshot of the records:
/// the versions only it sees, and the chunk references they drop.
pub struct DeletePlan {
    pub name: String,
    doomed: Vec<Doomed>,
    /// One reference per chunk per inode, to drop in the same commit.
    pub drops: Vec<ChunkId>,
    /// The snapshot before it (0: none) and after it (None: none).
    prev: u64,
    next: Option<u64>,
    oldest: bool,
}

impl DeletePlan {
    pub fn report(&self) -> DeleteReport {
        DeleteReport {
            name: self.name.clone(),
            versions_freed: self.doomed.len() as u64,
            chunk_refs_dropped: self.drops.len() as u64,
        }
    }
}

/// Plans the deletion of snapshot `name`.
pub fn plan_delete(rt: &ReadTransaction, name: &str) -> Result<DeletePlan> {
    let snaps = load_snaps(rt)?;
    let i = snaps
        .iter()
        .position(|(n, _)| n == name)
        .ok_or_else(|| refused(format!("snapshot {name} does not exist")))?;
    let g = Gens::load(&rt.open_table(meta::STATE).map_err(store::Error::from)?)?;
    let s = snaps[i].1.generation;
    let prev = if i > 0 { snaps[i - 1].1.generation } else { 0 };
    let next = snaps.get(i + 1).map(|n| n.1.generation);
    let (doomed, _) = doomed_versions(rt, prev, s, next.unwrap_or(g.current))?;
    let drops = ref_drops(rt, &doomed)?;
    Ok(DeletePlan {
        name: name.to_string(),
        doomed,
        drops,
        prev,
        next,
        oldest: i == 0,
    })
}

/// Removes the planned versions and the snapshot's record in `tx` (the
/// commit that also drops `plan.drops` from the index).
pub fn apply_delete(tx: &WriteTransaction, plan: &DeletePlan) -> store::Result<()> {
    let mut inodes = tx.open_table(meta::INODES)?;
    let mut dirents = tx.open_table(meta::DIRENTS)?;
    let mut xattrs = tx.open_table(meta::XATTRS)?;
    let mut contents = tx.open_table(meta::CONTENTS)?;
    for d in &plan.doomed {
        match d {
            Doomed::Inode(ino, born) => {
                inodes.remove((*ino, *born))?;
            }
            Doomed::Dirent(parent, name, born) => {
                dirents.remove((*parent, name.as_slice(), *born))?;
            }
            Doomed::Xattr(ino, name, born) => {
                xattrs.remove((*ino, name.as_slice(), *born))?;
            }
            Doomed::Content(ino, born) => {
                contents.remove((*ino, *born))?;
            }
        }
    }
    tx.open_table(meta::SNAPS)?.remove(plan.name.as_str())?;
    if plan.next.is_none() {
        tx.open_table(meta::STATE)?.insert("last_snap", plan.prev)?;
    }
    if plan.oldest {
        // Nothing retained reaches back past the next snapshot (or, with
        // none left, anywhere): drop that log span.
        let mut log = tx.open_table(meta::CHANGES)?;
        let empty: &[u8] = &[];
        let end = plan.next.map_or(u64::MAX, |n| n.saturating_add(1));
        log.retain_in((0u64, 0u8, 0u64, empty)..(end, 0u8, 0u64, empty), |_, _| {
            false
        })?;
    }
    Ok(())
}

/// What changed from snapshot `a` to snapshot `b` (None: the records of
/// the live tree as committed), read from `rt`.
pub fn diff(rt: &ReadTransaction, a: &str, b: Option<&str>) -> Result<Vec<DiffEntry>> {
    let snaps = load_snaps(rt)?;
    let gen_of = |n: &str| {
        snaps
            .iter()
            .find(|(m, _)| m == n)
            .map(|(_, r)| r.generation)
            .ok_or_else(|| refused(format!("snapshot {n} does not exist")))
    };
    let g = Gens::load(&rt.open_table(meta::STATE).map_err(store::Error::from)?)?;
    let ga = gen_of(a)?;
    let gb = match b {
        Some(n) => gen_of(n)?,
        None => NOW,
    };
    let (lo, hi) = if ga <= gb {
        (ga, gb.min(g.current))
    } else {
        (gb, ga)
    };
    let keys = changed_keys(rt, lo, hi)?;
    let inodes = rt.open_table(meta::INODES).map_err(store::Error::from)?;
    let dirents = rt.open_table(meta::DIRENTS).map_err(store::Error::from)?;
    let xattrs = rt.open_table(meta::XATTRS).map_err(store::Error::from)?;
    let contents = rt.open_table(meta::CONTENTS).map_err(store::Error::from)?;
    // Names that now point elsewhere, per inode.
    let mut gone: BTreeMap<u64, Vec<(u64, Vec<u8>, Kind)>> = BTreeMap::new();
    let mut came: BTreeMap<u64, Vec<(u64, Vec<u8>, Kind)>> = BTreeMap::new();
    let mut touched: BTreeSet<u64> = BTreeSet::new();
    for (rec, id, name) in &keys {
        match rec {
            Rec::Dirent => {
                let before = meta::dirent_at(&dirents, *id, name, ga)?.map(|x| x.1);
                let after = meta::dirent_at(&dirents, *id, name, gb)?.map(|x| x.1);
                if before.map(|d| d.ino) == after.map(|d| d.ino) {
                    continue;
                }
                if let Some(d) = before {
                    gone.entry(d.ino)
                        .or_default()
                        .push((*id, name.clone(), d.kind));
                }
                if let Some(d) = after {
                    came.entry(d.ino)
                        .or_default()
                        .push((*id, name.clone(), d.kind));
                }
            }
            _ => {
                touched.insert(*id);
            }
        }
    }
    let mut out = Vec::new();
    // The inode of each removed or added entry, in step with `out`.
    let mut entry_ino: Vec<Option<u64>> = Vec::new();
    let size_at = |ino: u64, at: u64| -> store::Result<u64> {
        Ok(meta::inode_at(&inodes, ino, at)?.map_or(0, |(_, r)| r.size))
    };
    for (ino, olds) in &gone {
        let news = came.get(ino).cloned().unwrap_or_default();
        for (k, (p, n, kind)) in olds.iter().enumerate() {
            let from = show_path(&path_at(&inodes, *p, n, ga)?);
            match news.get(k) {
                Some((np, nn, _)) => {
                    entry_ino.push(None);
                    out.push(DiffEntry {
                        change: "renamed",
                        path: show_path(&path_at(&inodes, *np, nn, gb)?),
                        from: Some(from),
                        kind: kind_name(*kind),
                        size: size_at(*ino, gb)?,
                        size_before: None,
                    });
                }
                None => {
                    out.push(DiffEntry {
                        change: "removed",
                        path: from,
                        from: None,
                        kind: kind_name(*kind),
                        size: size_at(*ino, ga)?,
                        size_before: None,
                    });
                    entry_ino.push(Some(*ino));
                }
            }
        }
    }
    for (ino, news) in &came {
        let skip = gone.get(ino).map_or(0, |o| o.len());
        for (p, n, kind) in news.iter().skip(skip) {
            out.push(DiffEntry {
                change: "added",
                path: show_path(&path_at(&inodes, *p, n, gb)?),
                from: None,
                kind: kind_name(*kind),
                size: size_at(*ino, gb)?,
                size_before: None,
            });
            entry_ino.push(Some(*ino));
        }
    }
    // What differs between inode `ia` at `ga` and `ib` at `gb`, by
    // value: a rollback writes new versions equal to the old ones, and
    // comparing when versions were born reported those as modified.
    let compare = |ia: u64, ra: &InodeRec, ib: u64, rb: &InodeRec| -> store::Result<Differs> {
        let content_changed = meta::content_at(&contents, ia, ga)?.map(|x| x.1)
            != meta::content_at(&contents, ib, gb)?.map(|x| x.1);
        let xattrs = {
            let na = meta::list_xattrs_at(&xattrs, ia, ga)?;
            let nb = meta::list_xattrs_at(&xattrs, ib, gb)?;
            let mut differ = na != nb;
            for n in &na {
                if differ {
                    break;
                }
                differ = meta::xattr_at(&xattrs, ia, n, ga)?.map(|x| x.1)
                    != meta::xattr_at(&xattrs, ib, n, gb)?.map(|x| x.1);
            }
            differ
        };
        Ok(Differs {
            attrs: ra.perm != rb.perm || ra.uid != rb.uid || ra.gid != rb.gid,
            xattrs,
            bytes: ra.size != rb.size || ra.content != rb.content || content_changed,
        })
    };
    for ino in touched {
        let (Some((_, ra)), Some((_, rb))) = (
            meta::inode_at(&inodes, ino, ga)?,
            meta::inode_at(&inodes, ino, gb)?,
        ) else {
            continue; // added or removed: reported by name above
        };
        let d = compare(ino, &ra, ino, &rb)?;
        // A directory whose only change is its entries (reported by
        // name) or its times is not itself modified; a file's mtime
        // moving (touch) is.
        let modified = if ra.kind == Kind::Dir {
            d.attrs || d.xattrs
        } else {
            d.attrs || d.xattrs || d.bytes || ra.mtime != rb.mtime
        };
        if !modified {
            continue;
        }
        out.push(DiffEntry {
            change: "modified",
            path: show_path(&name_at(&inodes, &dirents, ino, &rb, gb)?),
            from: None,
            kind: kind_name(rb.kind),
            size: rb.size,
            size_before: Some(ra.size),
        });
    }
    // A name whose file was replaced by another (an editor or git
    // writing a new file and renaming it over) is one modification,
    // or none when the new file equals the old; not a removal and an
    // addition of the same path.
    let mut removed_at: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let mut added_at: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for (i, (e, ino)) in out.iter().zip(&entry_ino).enumerate() {
        let Some(ino) = ino else { continue };
        match e.change {
            "removed" => removed_at.insert(e.path.clone(), (i, *ino)),
            "added" => added_at.insert(e.path.clone(), (i, *ino)),
            _ => None,
        };
    }
    let mut drop_entries: BTreeSet<usize> = BTreeSet::new();
    for (path, (ri, ia)) in &removed_at {
        let Some((ai, ib)) = added_at.get(path) else {
            continue;
        };
        let (Some((_, ra)), Some((_, rb))) = (
            meta::inode_at(&inodes, *ia, ga)?,
            meta::inode_at(&inodes, *ib, gb)?,
        ) else {
            continue;
        };
        if ra.kind != rb.kind || ra.kind == Kind::Dir {
            continue;
        }
        let d = compare(*ia, &ra, *ib, &rb)?;
        drop_entries.insert(*ri);
        if d.attrs || d.xattrs || d.bytes {
            let e = &mut out[*ai];
            e.change = "modified";
            e.size_before = Some(ra.size);
        } else {
            drop_entries.insert(*ai);
        }
    }
    let mut out: Vec<DiffEntry> = out
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !drop_entries.contains(i))
        .map(|(_, e)| e)
        .collect();
    out.sort_by(|x, y| x.path.cmp(&y.path).then(x.change.cmp(y.change)));
    Ok(out)
}
