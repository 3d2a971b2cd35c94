//! `meta.redb`: the records that hold references to chunks: named objects
//! (an owner's named chunk lists, kept in bounded segments) and the
//! filesystem's inodes, directory entries and file contents.
//!
//! Invariants:
//! - `state.ref_seq` is the index's `ref_seq` of the last index commit whose
//!   reference changes this database holds. The repo compares the two at
//!   open to undo an index commit whose meta commit never landed.
//! - Every row of `object_segments` belongs to exactly one object id, which
//!   is either named (a row of `objects`) or pending (a row of
//!   `pending_objects`); the references a segment holds are counted for
//!   that one object, whichever table names it.
//!
//! Calls `format` only.

use std::path::Path;

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition};

use crate::format::{self, ChunkId, ChunkRef, ObjectId, ObjectRec, OwnerId, PendingRec};
use crate::store::{Error, Result};

pub const META_FILE: &str = "meta.redb";
/// 1: objects' chunk lists whole. 2: in segments. 3: inode records
/// version 4 and dirent values version 2 (varints), half the bytes.
pub const META_FORMAT_VERSION: u64 = 3;

pub const STATE: TableDefinition<&str, u64> = TableDefinition::new("state");
/// (owner, name) -> object record.
pub const OBJECTS: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("objects");
/// (object id, segment number) -> chunk list of at most `SEGMENT_CHUNKS`.
pub const OBJECT_SEGMENTS: TableDefinition<(u64, u32), &[u8]> =
    TableDefinition::new("object_segments");
/// Object id -> pending record: objects that hold references but no name
/// (written in parts and not finished, or removed and not yet released).
pub const PENDING_OBJECTS: TableDefinition<u64, &[u8]> = TableDefinition::new("pending_objects");

/// Chunks per object segment (a 96 KiB value): writing or reading an object
/// of any size holds one segment at a time, and no redb page grows with it.
pub const SEGMENT_CHUNKS: usize = 4096;

/// redb's page cache for meta.redb when nothing asks for more: short-lived
/// commands (object put and get, fsck) stream chunk lists through it once,
/// so a bigger cache only grows with the store (16 MiB cost 4 x 1 GiB files
/// 1.45x the peak memory of one).
pub const CACHE_BYTES: usize = 4 << 20;
/// For the filesystem daemon, which reads the same inodes and directory
/// entries over and over.
pub const DAEMON_CACHE_BYTES: usize = 16 << 20;

/// Objects whose chunks a migration transaction converts before it commits.
const MIGRATE_CHUNKS_PER_TX: usize = 1 << 18;
/// Inode and dirent records a format 2 -> 3 transaction rewrites.
const MIGRATE_RECORDS_PER_TX: usize = 1 << 16;

pub fn create(dir: &Path) -> Result<Database> {
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(dir.join(META_FILE))?;
    let tx = db.begin_write()?;
    {
        let mut st = tx.open_table(STATE)?;
        st.insert("meta_format", META_FORMAT_VERSION)?;
        st.insert("ref_seq", 0)?;
        st.insert("next_object", 1)?;
        tx.open_table(OBJECTS)?;
        tx.open_table(OBJECT_SEGMENTS)?;
        tx.open_table(PENDING_OBJECTS)?;
    }
    tx.commit()?;
    Ok(db)
}

/// Opens meta.redb with a page cache of `cache_bytes`, migrating a format 1
/// database to format 2 on the way.
pub fn open(dir: &Path, cache_bytes: usize) -> Result<Database> {
    let path = dir.join(META_FILE);
    crate::guard::catch(|| open_unguarded(&path, cache_bytes)).unwrap_or_else(|p| {
        Err(Error::MetaDamaged {
            path: path.clone(),
            why: p.0,
        })
    })
}

/// Every table of meta.redb, for [`check_tables`].
fn walk_all(rt: &ReadTransaction, table: &std::cell::Cell<&'static str>) -> Result<u64> {
    use crate::store::walk_table;
    let mut rows = 0;
    macro_rules! walk {
        ($($def:expr => $name:literal),* $(,)?) => {$(
            table.set($name);
            rows += walk_table(rt, $def)?;
        )*};
    }
    walk!(
        STATE => "state",
        OBJECTS => "objects",
        OBJECT_SEGMENTS => "object_segments",
        PENDING_OBJECTS => "pending_objects",
        INODES => "inodes",
        DIRENTS => "dirents",
        XATTRS => "xattrs",
        CONTENTS => "contents",
        ORPHANS => "orphans",
        CHANGES => "changes",
        SNAPS => "snapshots",
        SETTINGS => "settings",
    );
    Ok(rows)
}

/// Reads every row of every table, so damage anywhere in meta.redb's live
/// pages is an [`Error::MetaDamaged`] naming the table, not a panic in
/// whatever reads it first. Costs a pass over the database.
pub fn check_tables(db: &Database, dir: &Path) -> Result<u64> {
    let path = dir.join(META_FILE);
    let table = std::cell::Cell::new("");
    let r = crate::guard::catch(|| -> Result<u64> {
        let rt = db.begin_read()?;
        walk_all(&rt, &table)
    });
    let why = match r {
        Ok(Ok(n)) => return Ok(n),
        Ok(Err(e)) => e.to_string(),
        Err(p) => p.0,
    };
    Err(Error::MetaDamaged {
        path,
        why: format!("{why} (table {})", table.get()),
    })
}

fn open_unguarded(path: &Path, cache_bytes: usize) -> Result<Database> {
    let path = path.to_path_buf();
    let damaged = |why: String| Error::MetaDamaged {
        path: path.clone(),
        why,
    };
    if !path.is_file() {
        return Err(damaged("the file is missing".into()));
    }
    let db = match Database::builder().set_cache_size(cache_bytes).open(&path) {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
            return Err(Error::Locked(path.clone()));
        }
        Err(e) => return Err(damaged(e.to_string())),
    };
    let rt = db.begin_read()?;
    let st = rt.open_table(STATE).map_err(|e| damaged(e.to_string()))?;
    let version = st.get("meta_format")?.map(|v| v.value());
    drop(st);
    drop(rt);
    let mut version = version;
    loop {
        match version {
            Some(META_FORMAT_VERSION) => break,
            Some(1) => {
                migrate_v1(&db, MIGRATE_CHUNKS_PER_TX)?;
                version = Some(2);
            }
            Some(2) => {
                migrate_v2(&db, MIGRATE_RECORDS_PER_TX)?;
                version = Some(3);
            }
            Some(v) => {
                return Err(Error::Format {
                    path,
                    err: format::FormatError::UnknownVersion {
                        what: "metadata",
                        found: v as u32,
                        supported: META_FORMAT_VERSION as u32,
                    },
                });
            }
            None => return Err(damaged("no format version recorded".into())),
        }
    }
    Ok(db)
}

/// Format 1 kept each object's whole chunk list as its `objects` value.
/// Rewrites each one as segments plus an object record, a bounded number of
/// chunks per transaction. A value whose first byte is 1 (a chunk list) is
/// still to do, so an interrupted migration resumes where it stopped;
/// `meta_format` becomes 2 in the last transaction. No reference changes.
fn migrate_v1(db: &Database, chunks_per_tx: usize) -> Result<()> {
    log::info!("meta.redb: migrating objects to meta format 2 (chunk lists in segments)");
    let mut resume: Option<(u32, String)> = None;
    loop {
        let tx = db.begin_write()?;
        let finished;
        {
            let mut st = tx.open_table(STATE)?;
            let mut next = st.get("next_object")?.map(|v| v.value()).unwrap_or(1);
            let mut objects = tx.open_table(OBJECTS)?;
            let mut segments = tx.open_table(OBJECT_SEGMENTS)?;
            tx.open_table(PENDING_OBJECTS)?;
            let mut todo: Vec<(u32, String, Vec<ChunkRef>)> = Vec::new();
            let mut chunks = 0usize;
            let mut more = false;
            {
                let rows = match &resume {
                    Some((o, n)) => objects.range((*o, n.as_str())..)?,
                    None => objects.range::<(u32, &str)>(..)?,
                };
                for row in rows {
                    let (k, v) = row?;
                    let (owner, name) = k.value();
                    if v.value().first() != Some(&format::CHUNK_LIST_VERSION) {
                        continue;
                    }
                    if chunks >= chunks_per_tx && !todo.is_empty() {
                        more = true;
                        break;
                    }
                    let list = format::decode_chunk_list(v.value())
                        .map_err(|e| Error::Db(format!("object {name}: {e}")))?;
                    chunks += list.len();
                    todo.push((owner, name.to_string(), list));
                }
            }
            for (owner, name, list) in &todo {
                let id = ObjectId(next);
                next += 1;
                let n = write_segments(&mut segments, id, 0, list)?;
                let rec = ObjectRec {
                    id,
                    size: list.iter().map(|c| c.len as u64).sum(),
                    chunks: list.len() as u64,
                    segments: n,
                };
                objects.insert((*owner, name.as_str()), rec.encode().as_slice())?;
            }
            st.insert("next_object", next)?;
            finished = !more;
            if finished {
                st.insert("meta_format", 2)?;
            }
            if let Some((o, n, _)) = todo.pop() {
                resume = Some((o, n));
            }
        }
        tx.commit()?;
        if finished {
            return Ok(());
        }
    }
}

/// Format 2 wrote inode records at version 1-3 and dirent values at
/// version 1, with fixed-width fields. Rewrites each one in the compact
/// encoding, `per_tx` records per transaction; a record already rewritten
/// is skipped, so an interrupted migration resumes. A record that does not
/// decode (damaged) is left as it is for fsck to report. Small files kept
/// inline stay inline: their bytes move to packs when they next change.
/// `meta_format` becomes 3 in the last transaction; no reference changes.
/// A `dirents` key, owned: (parent, name, born).
type DirentKey = (u64, Vec<u8>, u64);

fn migrate_v2(db: &Database, per_tx: usize) -> Result<()> {
    log::info!("meta.redb: migrating inodes and directory entries to meta format 3 (compact)");
    let mut ino_from = (0u64, 0u64);
    let mut dir_from: DirentKey = (0, Vec::new(), 0);
    loop {
        let tx = db.begin_write()?;
        let mut done = 0usize;
        let mut skipped = 0usize;
        {
            let mut inodes = tx.open_table(INODES)?;
            let mut todo: Vec<((u64, u64), Vec<u8>)> = Vec::new();
            for row in inodes.range(ino_from..)? {
                if todo.len() >= per_tx {
                    break;
                }
                let (k, v) = row?;
                let v = v.value();
                if v.first() == Some(&format::INODE_REC_VERSION) {
                    continue;
                }
                match format::InodeRec::decode(v) {
                    Ok(r) => todo.push((k.value(), r.encode())),
                    Err(e) => {
                        skipped += 1;
                        log::warn!("inode {:?}: left as it is ({e})", k.value());
                    }
                }
            }
            if let Some((k, _)) = todo.last() {
                ino_from = (k.0, k.1.saturating_add(1));
            }
            done += todo.len();
            for (k, v) in &todo {
                inodes.insert(*k, v.as_slice())?;
            }
        }
        if done < per_tx {
            let mut dirents = tx.open_table(DIRENTS)?;
            let mut todo: Vec<(DirentKey, Vec<u8>)> = Vec::new();
            let from = (dir_from.0, dir_from.1.as_slice(), dir_from.2);
            for row in dirents.range(from..)? {
                if done + todo.len() >= per_tx {
                    break;
                }
                let (k, v) = row?;
                let v = v.value();
                if v.first() == Some(&2) {
                    continue;
                }
                let (p, n, b) = k.value();
                match format::DirentVal::decode(v) {
                    Ok(d) => todo.push(((p, n.to_vec(), b), d.encode())),
                    Err(e) => {
                        skipped += 1;
                        log::warn!("dirent {p}/{}: left as it is ({e})", n.escape_ascii());
                    }
                }
            }
            if let Some(((p, n, b), _)) = todo.last() {
                dir_from = (*p, n.clone(), b.saturating_add(1));
            }
            done += todo.len();
            for ((p, n, b), v) in &todo {
                dirents.insert((*p, n.as_slice(), *b), v.as_slice())?;
            }
        }
        let finished = done < per_tx;
        if finished {
            tx.open_table(STATE)?.insert("meta_format", 3)?;
        }
        tx.commit()?;
        if skipped > 0 {
            log::warn!("meta.redb: {skipped} damaged records left for fsck");
        }
        if finished {
            return Ok(());
        }
    }
}

pub fn ref_seq(db: &Database) -> Result<u64> {
    let rt = db.begin_read()?;
    let st = rt.open_table(STATE)?;
    Ok(st.get("ref_seq")?.map(|v| v.value()).unwrap_or(0))
}

/// The first object id no committed record uses.
pub fn next_object_id(db: &Database) -> Result<u64> {
    let rt = db.begin_read()?;
    let st = rt.open_table(STATE)?;
    Ok(st.get("next_object")?.map(|v| v.value()).unwrap_or(1))
}

fn decode_object(name: &str, v: &[u8]) -> Result<ObjectRec> {
    ObjectRec::decode(v).map_err(|e| Error::Db(format!("object {name}: {e}")))
}

/// An object's segment. Objects never hold holes (only the filesystem
/// lists them), so one that does is damaged.
fn decode_segment(id: ObjectId, seg: u32, v: &[u8]) -> Result<Vec<ChunkRef>> {
    let list =
        format::decode_chunk_list(v).map_err(|e| Error::Db(format!("{id} segment {seg}: {e}")))?;
    if list.iter().any(ChunkRef::is_hole) {
        return Err(Error::Db(format!("{id} segment {seg}: holds a hole")));
    }
    Ok(list)
}

pub fn get_object(db: &Database, owner: OwnerId, name: &str) -> Result<Option<ObjectRec>> {
    let rt = db.begin_read()?;
    let t = rt.open_table(OBJECTS)?;
    match t.get((owner.0, name))? {
        None => Ok(None),
        Some(v) => Ok(Some(decode_object(name, v.value())?)),
    }
}

/// Calls `f` with each segment of `rec`'s chunk list in order, and checks
/// that they add up to the record.
fn visit_segments(
    rt: &ReadTransaction,
    name: &str,
    rec: &ObjectRec,
    mut f: impl FnMut(&[ChunkRef]) -> Result<()>,
) -> Result<()> {
    let t = rt.open_table(OBJECT_SEGMENTS)?;
    let (mut segments, mut chunks, mut size) = (0u32, 0u64, 0u64);
    for row in t.range((rec.id.0, 0)..=(rec.id.0, u32::MAX))? {
        let (k, v) = row?;
        let seg = k.value().1;
        if seg != segments {
            return Err(Error::Db(format!(
                "object {name}: segment {segments} of {} is missing",
                rec.id
            )));
        }
        let list = decode_segment(rec.id, seg, v.value())?;
        segments += 1;
        chunks += list.len() as u64;
        size += list.iter().map(|c| c.len as u64).sum::<u64>();
        f(&list)?;
    }
    if (segments, chunks, size) != (rec.segments, rec.chunks, rec.size) {
        return Err(Error::Db(format!(
            "object {name}: its segments hold {chunks} chunks ({size} bytes) in {segments} \
             segments, its record says {} ({} bytes) in {}",
            rec.chunks, rec.size, rec.segments
        )));
    }
    Ok(())
}

/// Reads object `name` a segment at a time, in one read transaction (so a
/// concurrent replacement is not seen half way). `None` if there is none.
pub fn read_object(
    db: &Database,
    owner: OwnerId,
    name: &str,
    f: impl FnMut(&[ChunkRef]) -> Result<()>,
) -> Result<Option<ObjectRec>> {
    let rt = db.begin_read()?;
    let rec = {
        let t = rt.open_table(OBJECTS)?;
        match t.get((owner.0, name))? {
            None => return Ok(None),
            Some(v) => decode_object(name, v.value())?,
        }
    };
    visit_segments(&rt, name, &rec, f)?;
    Ok(Some(rec))
}

/// Every named object of every owner, in key order (records only).
pub fn for_each_object(
    db: &Database,
    mut f: impl FnMut(OwnerId, &str, &ObjectRec) -> Result<()>,
) -> Result<()> {
    let rt = db.begin_read()?;
    let t = rt.open_table(OBJECTS)?;
    for row in t.iter()? {
        let (k, v) = row?;
        let (owner, name) = k.value();
        f(OwnerId(owner), name, &decode_object(name, v.value())?)?;
    }
    Ok(())
}

pub fn object_count(db: &Database) -> Result<u64> {
    use redb::ReadableTableMetadata;
    let rt = db.begin_read()?;
    Ok(rt.open_table(OBJECTS)?.len()?)
}

/// Every chunk reference objects hold, a segment at a time: named objects
/// (`named` true) and then pending ones.
pub fn for_each_object_segment(
    db: &Database,
    mut f: impl FnMut(OwnerId, &str, bool, &[ChunkRef]) -> Result<()>,
) -> Result<()> {
    let rt = db.begin_read()?;
    {
        let t = rt.open_table(OBJECTS)?;
        for row in t.iter()? {
            let (k, v) = row?;
            let (owner, name) = k.value();
            let rec = decode_object(name, v.value())?;
            visit_segments(&rt, name, &rec, |list| f(OwnerId(owner), name, true, list))?;
        }
    }
    let pending = rt.open_table(PENDING_OBJECTS)?;
    let segments = rt.open_table(OBJECT_SEGMENTS)?;
    for row in pending.iter()? {
        let (k, v) = row?;
        let id = ObjectId(k.value());
        let p = decode_pending(id, v.value())?;
        for row in segments.range((id.0, 0)..=(id.0, u32::MAX))? {
            let (k, v) = row?;
            f(
                p.owner,
                &p.name,
                false,
                &decode_segment(id, k.value().1, v.value())?,
            )?;
        }
    }
    Ok(())
}

fn decode_pending(id: ObjectId, v: &[u8]) -> Result<PendingRec> {
    PendingRec::decode(v).map_err(|e| Error::Db(format!("pending {id}: {e}")))
}

/// The pending objects (after a crash: those to release).
pub fn pending_objects(db: &Database) -> Result<Vec<(ObjectId, PendingRec)>> {
    let rt = db.begin_read()?;
    let t = rt.open_table(PENDING_OBJECTS)?;
    let mut out = Vec::new();
    for row in t.iter()? {
        let (k, v) = row?;
        let id = ObjectId(k.value());
        out.push((id, decode_pending(id, v.value())?));
    }
    Ok(out)
}

/// Writes `chunks` as segments `first..` of object `id`; returns how many.
fn write_segments(
    t: &mut redb::Table<(u64, u32), &'static [u8]>,
    id: ObjectId,
    first: u32,
    chunks: &[ChunkRef],
) -> Result<u32> {
    let mut n = 0u32;
    for seg in chunks.chunks(SEGMENT_CHUNKS) {
        t.insert((id.0, first + n), format::encode_chunk_list(seg).as_slice())?;
        n += 1;
    }
    Ok(n)
}

/// How many segments `chunks` chunks take.
pub fn segments_for(chunks: usize) -> u32 {
    chunks.div_ceil(SEGMENT_CHUNKS) as u32
}

/// Part of an object's chunk list, committed with the references it holds.
pub struct ObjectPart<'a> {
    pub id: ObjectId,
    pub name: &'a str,
    /// Segments of this object committed before this part.
    pub first_segment: u32,
    pub chunks: &'a [ChunkRef],
    /// On the object's last part: its totals. Committing it names the
    /// object; until then a pending record holds what its parts hold.
    pub finished: Option<(u64, u64)>,
}

/// Writes object parts and the ref sequence they match, in one commit. A
/// finished object takes its name; the object that had the name (if any)
/// becomes pending, and its id is returned for the caller to release.
pub fn commit_object_parts(
    db: &Database,
    owner: OwnerId,
    parts: &[ObjectPart<'_>],
    ref_seq: Option<u64>,
) -> Result<Vec<ObjectId>> {
    let mut displaced = Vec::new();
    let tx = db.begin_write()?;
    {
        let mut objects = tx.open_table(OBJECTS)?;
        let mut segments = tx.open_table(OBJECT_SEGMENTS)?;
        let mut pending = tx.open_table(PENDING_OBJECTS)?;
        let mut st = tx.open_table(STATE)?;
        let mut next = st.get("next_object")?.map(|v| v.value()).unwrap_or(1);
        for p in parts {
            next = next.max(p.id.0 + 1);
            let n = write_segments(&mut segments, p.id, p.first_segment, p.chunks)?;
            let Some((size, chunks)) = p.finished else {
                let rec = PendingRec {
                    owner,
                    name: p.name.to_string(),
                };
                pending.insert(p.id.0, rec.encode().as_slice())?;
                continue;
            };
            pending.remove(p.id.0)?;
            let rec = ObjectRec {
                id: p.id,
                size,
                chunks,
                segments: p.first_segment + n,
            };
            let old = objects.insert((owner.0, p.name), rec.encode().as_slice())?;
            if let Some(old) = old {
                let old = decode_object(p.name, old.value())?;
                let rec = PendingRec {
                    owner,
                    name: p.name.to_string(),
                };
                pending.insert(old.id.0, rec.encode().as_slice())?;
                displaced.push(old.id);
            }
        }
        st.insert("next_object", next)?;
        if let Some(s) = ref_seq {
            st.insert("ref_seq", s)?;
        }
    }
    tx.commit()?;
    Ok(displaced)
}

/// Takes names away from objects: each becomes pending, still holding its
/// references, and its id is returned for the caller to release. Fails,
/// changing nothing, if any name is missing.
pub fn unname_objects(db: &Database, owner: OwnerId, names: &[String]) -> Result<Vec<ObjectId>> {
    let tx = db.begin_write()?;
    let mut ids = Vec::new();
    let mut missing = Vec::new();
    {
        let mut objects = tx.open_table(OBJECTS)?;
        let mut pending = tx.open_table(PENDING_OBJECTS)?;
        for name in names {
            let Some(old) = objects.remove((owner.0, name.as_str()))? else {
                missing.push(name.as_str());
                continue;
            };
            let old = decode_object(name, old.value())?;
            let rec = PendingRec {
                owner,
                name: name.clone(),
            };
            pending.insert(old.id.0, rec.encode().as_slice())?;
            ids.push(old.id);
        }
    }
    if !missing.is_empty() {
        tx.abort()?;
        return Err(Error::Invalid(format!(
            "no object named {}",
            missing.join(", ")
        )));
    }
    tx.commit()?;
    Ok(ids)
}

/// What one commit releases of a pending object: see `next_release`.
pub struct Release {
    pub owner: OwnerId,
    pub chunks: Vec<ChunkId>,
    pub last_segment: Option<u32>,
    pub more: bool,
}

/// The next references to release of pending object `id`: its owner, the
/// chunks of its first segments (at least one segment, then up to
/// `max_chunks`), the last of those segments, and whether more remain.
/// `None` if `id` is not pending.
pub fn next_release(db: &Database, id: ObjectId, max_chunks: usize) -> Result<Option<Release>> {
    let rt = db.begin_read()?;
    let pending = rt.open_table(PENDING_OBJECTS)?;
    let Some(v) = pending.get(id.0)? else {
        return Ok(None);
    };
    let mut r = Release {
        owner: decode_pending(id, v.value())?.owner,
        chunks: Vec::new(),
        last_segment: None,
        more: false,
    };
    let segments = rt.open_table(OBJECT_SEGMENTS)?;
    for row in segments.range((id.0, 0)..=(id.0, u32::MAX))? {
        let (k, v) = row?;
        if r.last_segment.is_some() && r.chunks.len() >= max_chunks {
            r.more = true;
            break;
        }
        let seg = k.value().1;
        r.chunks
            .extend(format::chunk_ids(&decode_segment(id, seg, v.value())?));
        r.last_segment = Some(seg);
    }
    Ok(Some(r))
}

/// Deletes the segments of pending object `id` up to `last_segment`, with
/// the ref sequence of the index commit that dropped their references; with
/// `done`, the pending record too.
pub fn release_segments(
    db: &Database,
    id: ObjectId,
    last_segment: Option<u32>,
    done: bool,
    ref_seq: Option<u64>,
) -> Result<()> {
    let tx = db.begin_write()?;
    {
        let mut segments = tx.open_table(OBJECT_SEGMENTS)?;
        if let Some(last) = last_segment {
            segments.retain_in((id.0, 0)..=(id.0, last), |_, _| false)?;
        }
        if done {
            tx.open_table(PENDING_OBJECTS)?.remove(id.0)?;
        }
        if let Some(s) = ref_seq {
            tx.open_table(STATE)?.insert("ref_seq", s)?;
        }
    }
    tx.commit()?;
    Ok(())
}

// ---------------------------------------------------------------- filesystem

/// (ino, born) -> inode record.
pub const INODES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("inodes");
/// (parent, name, born) -> dirent.
pub const DIRENTS: TableDefinition<(u64, &[u8], u64), &[u8]> = TableDefinition::new("dirents");
/// (ino, name, born) -> versioned value.
pub const XATTRS: TableDefinition<(u64, &[u8], u64), &[u8]> = TableDefinition::new("xattrs");
/// (ino, born) -> versioned chunk list. These versions hold chunk references.
pub const CONTENTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("contents");
/// Inodes whose link count reached zero, for the reaper.
pub const ORPHANS: TableDefinition<u64, u64> = TableDefinition::new("orphans");
/// The change log: (generation, record kind, id, name) for every record a
/// generation gave a new version or ended while a snapshot existed. Diff,
/// rollback and snapshot deletion read the span they need from it, so they
/// cost what changed, not what exists.
pub const CHANGES: TableDefinition<(u64, u8, u64, &[u8]), ()> = TableDefinition::new("changes");
/// Snapshot name -> snapshot record (JSON, see `snap::SnapRec`).
pub const SNAPS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// Settings that are not counters (the retention policy), as JSON.
pub const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");

pub const ROOT_INO: u64 = 1;
/// A generation past every real one: "the live tree" in `*_at` lookups.
pub const NOW: u64 = format::LIVE - 1;

/// What a change log entry is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rec {
    Inode = 1,
    Dirent = 2,
    Xattr = 3,
    Content = 4,
}

impl Rec {
    pub fn from_code(c: u8) -> Option<Rec> {
        Some(match c {
            1 => Rec::Inode,
            2 => Rec::Dirent,
            3 => Rec::Xattr,
            4 => Rec::Content,
            _ => return None,
        })
    }
}

/// The generation counters every versioned write needs.
#[derive(Clone, Copy, Debug)]
pub struct Gens {
    /// The current generation G: new versions are born here.
    pub current: u64,
    /// The generation of the newest snapshot (0: none). A version born
    /// after it is seen by no snapshot and may change in place.
    pub last_snap: u64,
}

impl Gens {
    pub fn load(t: &impl ReadableTable<&'static str, u64>) -> Result<Gens> {
        Ok(Gens {
            current: t.get("gen")?.map(|v| v.value()).unwrap_or(1),
            last_snap: t.get("last_snap")?.map(|v| v.value()).unwrap_or(0),
        })
    }

    fn in_place(&self, born: u64) -> bool {
        born > self.last_snap
    }
}

fn corrupt(what: &str, e: format::FormatError) -> Error {
    Error::Db(format!("{what}: {e}"))
}

pub type Inodes<'t> = redb::Table<'t, (u64, u64), &'static [u8]>;
pub type Dirents<'t> = redb::Table<'t, (u64, &'static [u8], u64), &'static [u8]>;
pub type Xattrs<'t> = redb::Table<'t, (u64, &'static [u8], u64), &'static [u8]>;
pub type Contents<'t> = redb::Table<'t, (u64, u64), &'static [u8]>;
pub type Changes<'t> = redb::Table<'t, (u64, u8, u64, &'static [u8]), ()>;

/// Creates the filesystem tables and the root directory if missing.
pub fn ensure_fs(db: &Database, uid: u32, gid: u32) -> Result<()> {
    let tx = db.begin_write()?;
    {
        let mut st = tx.open_table(STATE)?;
        if st.get("gen")?.is_none() {
            st.insert("gen", 1)?;
            st.insert("last_snap", 0)?;
            st.insert("next_ino", ROOT_INO + 1)?;
        }
        tx.open_table(DIRENTS)?;
        tx.open_table(XATTRS)?;
        tx.open_table(CONTENTS)?;
        tx.open_table(ORPHANS)?;
        tx.open_table(CHANGES)?;
        tx.open_table(SNAPS)?;
        tx.open_table(SETTINGS)?;
        let mut inodes = tx.open_table(INODES)?;
        if live_inode(&inodes, ROOT_INO)?.is_none() {
            let now = format::Timespec::now();
            let root =
                format::InodeRec::new_live(format::Kind::Dir, 0o755, uid, gid, now, ROOT_INO, b"");
            inodes.insert((ROOT_INO, 1), root.encode().as_slice())?;
        }
    }
    tx.commit()?;
    Ok(())
}

// ------------------------------------------------------------ reads at a gen

/// The version of an inode generation `at` sees (`NOW`: the live one).
pub fn inode_at(
    t: &impl ReadableTable<(u64, u64), &'static [u8]>,
    ino: u64,
    at: u64,
) -> Result<Option<(u64, format::InodeRec)>> {
    let mut it = t.range((ino, 0)..=(ino, at))?;
    if let Some(row) = it.next_back() {
        let (k, v) = row?;
        let rec = format::InodeRec::decode(v.value()).map_err(|e| corrupt("inode", e))?;
        if rec.died > at {
            return Ok(Some((k.value().1, rec)));
        }
    }
    Ok(None)
}

/// The apparent size of the live tree: the sizes of its regular files,
/// each inode once (what `du -sb --apparent-size` counts), and how many.
pub fn live_file_bytes(db: &Database) -> Result<(u64, u64)> {
    let rt = db.begin_read()?;
    let t = match rt.open_table(INODES) {
        Ok(t) => t,
        // A store that never held a filesystem.
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((0, 0)),
        Err(e) => return Err(e.into()),
    };
    let (mut bytes, mut files) = (0, 0);
    for row in t.iter()? {
        let (_, v) = row?;
        let rec = format::InodeRec::decode(v.value()).map_err(|e| corrupt("inode", e))?;
        if rec.died > NOW && rec.kind == format::Kind::File {
            bytes += rec.size;
            files += 1;
        }
    }
    Ok((bytes, files))
}

/// The live version of an inode: (born, record).
pub fn live_inode(
    t: &impl ReadableTable<(u64, u64), &'static [u8]>,
    ino: u64,
) -> Result<Option<(u64, format::InodeRec)>> {
    inode_at(t, ino, NOW)
}

pub fn dirent_at(
    t: &impl ReadableTable<(u64, &'static [u8], u64), &'static [u8]>,
    parent: u64,
    name: &[u8],
    at: u64,
) -> Result<Option<(u64, format::DirentVal)>> {
    let mut it = t.range((parent, name, 0)..=(parent, name, at))?;
    if let Some(row) = it.next_back() {
        let (k, v) = row?;
        let d = format::DirentVal::decode(v.value()).map_err(|e| corrupt("dirent", e))?;
        if d.died > at {
            return Ok(Some((k.value().2, d)));
        }
    }
    Ok(None)
}

pub fn lookup_dirent(
    t: &impl ReadableTable<(u64, &'static [u8], u64), &'static [u8]>,
    parent: u64,
    name: &[u8],
) -> Result<Option<(u64, format::DirentVal)>> {
    dirent_at(t, parent, name, NOW)
}

/// The entries of a directory generation `at` sees, in name order.
pub fn list_dir_at(
    t: &impl ReadableTable<(u64, &'static [u8], u64), &'static [u8]>,
    parent: u64,
    at: u64,
    limit: Option<usize>,
) -> Result<Vec<(Vec<u8>, format::DirentVal)>> {
    let empty: &[u8] = &[];
    let mut out: Vec<(Vec<u8>, format::DirentVal)> = Vec::new();
    for row in t.range((parent, empty, 0)..(parent + 1, empty, 0))? {
        let (k, v) = row?;
        let (_, name, born) = k.value();
        if born > at {
            continue;
        }
        let d = format::DirentVal::decode(v.value()).map_err(|e| corrupt("dirent", e))?;
        if d.died <= at {
            continue;
        }
        out.push((name.to_vec(), d));
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
    }
    Ok(out)
}

/// The live entries of a directory, in name order.
pub fn list_dir(
    t: &impl ReadableTable<(u64, &'static [u8], u64), &'static [u8]>,
    parent: u64,
    limit: Option<usize>,
) -> Result<Vec<(Vec<u8>, format::DirentVal)>> {
    list_dir_at(t, parent, NOW, limit)
}

pub fn xattr_at(
    t: &impl ReadableTable<(u64, &'static [u8], u64), &'static [u8]>,
    ino: u64,
    name: &[u8],
    at: u64,
) -> Result<Option<(u64, Vec<u8>)>> {
    let mut it = t.range((ino, name, 0)..=(ino, name, at))?;
    if let Some(row) = it.next_back() {
        let (k, v) = row?;
        let (died, body) = format::decode_versioned(v.value()).map_err(|e| corrupt("xattr", e))?;
        if died > at {
            return Ok(Some((k.value().2, body.to_vec())));
        }
    }
    Ok(None)
}

pub fn get_xattr(
    t: &impl ReadableTable<(u64, &'static [u8], u64), &'static [u8]>,
    ino: u64,
    name: &[u8],
) -> Result<Option<Vec<u8>>> {
    Ok(xattr_at(t, ino, name, NOW)?.map(|(_, v)| v))
}

/// The attribute names of an inode generation `at` sees.
pub fn list_xattrs_at(
    t: &impl ReadableTable<(u64, &'static [u8], u64), &'static [u8]>,
    ino: u64,
    at: u64,
) -> Result<Vec<Vec<u8>>> {
    let empty: &[u8] = &[];
    let mut out: Vec<Vec<u8>> = Vec::new();
    for row in t.range((ino, empty, 0)..(ino + 1, empty, 0))? {
        let (k, v) = row?;
        if k.value().2 > at {
            continue;
        }
        let (died, _) = format::decode_versioned(v.value()).map_err(|e| corrupt("xattr", e))?;
        if died > at {
            out.push(k.value().1.to_vec());
        }
    }
    out.dedup();
    Ok(out)
}

pub fn list_xattrs(
    t: &impl ReadableTable<(u64, &'static [u8], u64), &'static [u8]>,
    ino: u64,
) -> Result<Vec<Vec<u8>>> {
    list_xattrs_at(t, ino, NOW)
}

/// The chunk list of a file generation `at` sees: (born, chunks).
pub fn content_at(
    t: &impl ReadableTable<(u64, u64), &'static [u8]>,
    ino: u64,
    at: u64,
) -> Result<Option<(u64, Vec<ChunkRef>)>> {
    let mut it = t.range((ino, 0)..=(ino, at))?;
    if let Some(row) = it.next_back() {
        let (k, v) = row?;
        let (died, body) =
            format::decode_versioned(v.value()).map_err(|e| corrupt("content", e))?;
        if died > at {
            return Ok(Some((k.value().1, decode_chunk_list_body(body)?)));
        }
    }
    Ok(None)
}

/// The live chunk list of a file: (born, chunks).
pub fn live_content(
    t: &impl ReadableTable<(u64, u64), &'static [u8]>,
    ino: u64,
) -> Result<Option<(u64, Vec<ChunkRef>)>> {
    content_at(t, ino, NOW)
}

fn decode_chunk_list_body(body: &[u8]) -> Result<Vec<ChunkRef>> {
    format::decode_chunk_list(body).map_err(|e| corrupt("content", e))
}

// ------------------------------------------------------------ versioned writes

/// The versioned tables of one write transaction, with the generation rule
/// of design decision 5 in one place: a record born after the newest
/// snapshot changes in place; an older one is ended at G and a new version
/// is born at G, and the change log notes (G, record).
pub struct Versioned<'t> {
    pub g: Gens,
    pub inodes: Lazy<'t, (u64, u64), &'static [u8]>,
    pub dirents: Lazy<'t, (u64, &'static [u8], u64), &'static [u8]>,
    pub xattrs: Lazy<'t, (u64, &'static [u8], u64), &'static [u8]>,
    pub contents: Lazy<'t, (u64, u64), &'static [u8]>,
    pub changes: Lazy<'t, (u64, u8, u64, &'static [u8]), ()>,
}

/// A table of a write transaction, opened on first use. Why: most
/// metadata changes touch one or two tables, and opening one costs a
/// lookup and a type check in redb; opening all of them was 11 of the
/// 39 us a setattr spent in its transaction.
pub struct Lazy<'t, K: redb::Key + 'static, V: redb::Value + 'static> {
    tx: &'t redb::WriteTransaction,
    def: TableDefinition<'static, K, V>,
    table: Option<redb::Table<'t, K, V>>,
}

impl<'t, K: redb::Key + 'static, V: redb::Value + 'static> Lazy<'t, K, V> {
    pub fn new(tx: &'t redb::WriteTransaction, def: TableDefinition<'static, K, V>) -> Self {
        Lazy {
            tx,
            def,
            table: None,
        }
    }

    pub fn get(&mut self) -> Result<&mut redb::Table<'t, K, V>> {
        let t = match self.table.take() {
            Some(t) => t,
            None => self.tx.open_table(self.def)?,
        };
        Ok(self.table.insert(t))
    }
}

impl<'t> Versioned<'t> {
    pub fn open(tx: &'t redb::WriteTransaction, g: Gens) -> Result<Versioned<'t>> {
        Ok(Versioned {
            g,
            inodes: Lazy::new(tx, INODES),
            dirents: Lazy::new(tx, DIRENTS),
            xattrs: Lazy::new(tx, XATTRS),
            contents: Lazy::new(tx, CONTENTS),
            changes: Lazy::new(tx, CHANGES),
        })
    }

    /// Notes that generation G changed a record. Nothing needs the log
    /// while no snapshot exists.
    fn log(&mut self, rec: Rec, id: u64, name: &[u8]) -> Result<()> {
        if self.g.last_snap != 0 {
            self.changes
                .get()?
                .insert((self.g.current, rec as u8, id, name), ())?;
        }
        Ok(())
    }

    /// Writes the live version of an inode.
    pub fn write_inode(&mut self, ino: u64, rec: &format::InodeRec) -> Result<()> {
        let born = match live_inode(&*self.inodes.get()?, ino)? {
            Some((born, _)) if self.g.in_place(born) => born,
            Some((born, mut old)) => {
                old.died = self.g.current;
                self.inodes
                    .get()?
                    .insert((ino, born), old.encode().as_slice())?;
                self.log(Rec::Inode, ino, &[])?;
                self.g.current
            }
            None => {
                self.log(Rec::Inode, ino, &[])?;
                self.g.current
            }
        };
        let mut rec = rec.clone();
        rec.died = format::LIVE;
        self.inodes
            .get()?
            .insert((ino, born), rec.encode().as_slice())?;
        Ok(())
    }

    /// Ends the live version of an inode.
    pub fn remove_inode(&mut self, ino: u64) -> Result<()> {
        if let Some((born, mut old)) = live_inode(&*self.inodes.get()?, ino)? {
            if self.g.in_place(born) {
                self.inodes.get()?.remove((ino, born))?;
            } else {
                old.died = self.g.current;
                self.inodes
                    .get()?
                    .insert((ino, born), old.encode().as_slice())?;
                self.log(Rec::Inode, ino, &[])?;
            }
        }
        Ok(())
    }

    pub fn write_dirent(
        &mut self,
        parent: u64,
        name: &[u8],
        ino: u64,
        kind: format::Kind,
    ) -> Result<()> {
        let born = match lookup_dirent(&*self.dirents.get()?, parent, name)? {
            Some((born, _)) if self.g.in_place(born) => born,
            Some((born, mut old)) => {
                old.died = self.g.current;
                self.dirents
                    .get()?
                    .insert((parent, name, born), old.encode().as_slice())?;
                self.log(Rec::Dirent, parent, name)?;
                self.g.current
            }
            None => {
                self.log(Rec::Dirent, parent, name)?;
                self.g.current
            }
        };
        let d = format::DirentVal {
            died: format::LIVE,
            ino,
            kind,
        };
        self.dirents
            .get()?
            .insert((parent, name, born), d.encode().as_slice())?;
        Ok(())
    }

    pub fn remove_dirent(&mut self, parent: u64, name: &[u8]) -> Result<()> {
        if let Some((born, mut old)) = lookup_dirent(&*self.dirents.get()?, parent, name)? {
            if self.g.in_place(born) {
                self.dirents.get()?.remove((parent, name, born))?;
            } else {
                old.died = self.g.current;
                self.dirents
                    .get()?
                    .insert((parent, name, born), old.encode().as_slice())?;
                self.log(Rec::Dirent, parent, name)?;
            }
        }
        Ok(())
    }

    pub fn set_xattr(&mut self, ino: u64, name: &[u8], value: &[u8]) -> Result<()> {
        let born = match xattr_at(&*self.xattrs.get()?, ino, name, NOW)? {
            Some((born, _)) if self.g.in_place(born) => born,
            Some((born, old)) => {
                let enc = format::encode_versioned(self.g.current, &old);
                self.xattrs
                    .get()?
                    .insert((ino, name, born), enc.as_slice())?;
                self.log(Rec::Xattr, ino, name)?;
                self.g.current
            }
            None => {
                self.log(Rec::Xattr, ino, name)?;
                self.g.current
            }
        };
        let enc = format::encode_versioned(format::LIVE, value);
        self.xattrs
            .get()?
            .insert((ino, name, born), enc.as_slice())?;
        Ok(())
    }

    /// Returns whether the attribute existed.
    pub fn remove_xattr(&mut self, ino: u64, name: &[u8]) -> Result<bool> {
        match xattr_at(&*self.xattrs.get()?, ino, name, NOW)? {
            None => Ok(false),
            Some((born, old)) => {
                if self.g.in_place(born) {
                    self.xattrs.get()?.remove((ino, name, born))?;
                } else {
                    let enc = format::encode_versioned(self.g.current, &old);
                    self.xattrs
                        .get()?
                        .insert((ino, name, born), enc.as_slice())?;
                    self.log(Rec::Xattr, ino, name)?;
                }
                Ok(true)
            }
        }
    }

    /// Replaces (or with `None`, ends) a file's live chunk list. Returns the
    /// old list when its references are no longer held by any version
    /// (changed in place), so the caller drops them in the same commit.
    pub fn write_content(
        &mut self,
        ino: u64,
        new: Option<&[ChunkRef]>,
    ) -> Result<Option<Vec<ChunkRef>>> {
        let freed = match live_content(&*self.contents.get()?, ino)? {
            Some((born, old)) if self.g.in_place(born) => {
                self.contents.get()?.remove((ino, born))?;
                Some(old)
            }
            Some((born, old)) => {
                let enc = format::encode_chunk_list(&old);
                self.contents.get()?.insert(
                    (ino, born),
                    format::encode_versioned(self.g.current, &enc).as_slice(),
                )?;
                self.log(Rec::Content, ino, &[])?;
                None
            }
            None => {
                if new.is_some() {
                    self.log(Rec::Content, ino, &[])?;
                }
                None
            }
        };
        if let Some(list) = new {
            let enc = format::encode_chunk_list(list);
            self.contents.get()?.insert(
                (ino, self.g.current),
                format::encode_versioned(format::LIVE, &enc).as_slice(),
            )?;
        }
        Ok(freed)
    }
}

/// The distinct chunks of every content version of `ino`, leaving out the
/// versions born at `skip`. The filesystem holds one reference to each
/// (decision 5's "references follow versions", counted per inode: a new
/// version of a big file that shares most chunks with a version a snapshot
/// keeps adds references only for its new chunks).
pub fn chunks_of_ino(
    t: &impl ReadableTable<(u64, u64), &'static [u8]>,
    ino: u64,
    skip: &[u64],
) -> Result<format::ChunkIdSet> {
    let mut out = format::ChunkIdSet::default();
    for row in t.range((ino, 0)..=(ino, u64::MAX))? {
        let (k, v) = row?;
        if skip.contains(&k.value().1) {
            continue;
        }
        let (_, body) = format::decode_versioned(v.value()).map_err(|e| corrupt("content", e))?;
        out.extend(format::chunk_ids(&decode_chunk_list_body(body)?));
    }
    Ok(out)
}

/// How many content versions `ino` has (live and those snapshots keep).
pub fn content_versions(
    t: &impl ReadableTable<(u64, u64), &'static [u8]>,
    ino: u64,
) -> Result<usize> {
    let mut n = 0;
    for row in t.range((ino, 0)..=(ino, u64::MAX))? {
        row?;
        n += 1;
    }
    Ok(n)
}

/// Every chunk reference the filesystem's content versions hold.
pub fn for_each_content(
    db: &Database,
    mut f: impl FnMut(u64, &[ChunkRef]) -> Result<()>,
) -> Result<()> {
    let rt = db.begin_read()?;
    let t = match rt.open_table(CONTENTS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for row in t.iter()? {
        let (k, v) = row?;
        let (_, body) = format::decode_versioned(v.value()).map_err(|e| corrupt("content", e))?;
        f(k.value().0, &decode_chunk_list_body(body)?)?;
    }
    Ok(())
}

/// Allocates an inode number (never reused).
pub fn alloc_ino(st: &mut redb::Table<&'static str, u64>) -> Result<u64> {
    let n = st
        .get("next_ino")?
        .map(|v| v.value())
        .unwrap_or(ROOT_INO + 1);
    st.insert("next_ino", n + 1)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(seed: u8, n: usize) -> Vec<ChunkRef> {
        (0..n)
            .map(|i| ChunkRef {
                id: ChunkId::of(&[seed, i as u8, (i >> 8) as u8]),
                len: 100 + i as u32,
            })
            .collect()
    }

    fn read_all(db: &Database, name: &str) -> (ObjectRec, Vec<ChunkRef>) {
        let mut out = Vec::new();
        let rec = read_object(db, OwnerId::LOCAL, name, |l| {
            out.extend_from_slice(l);
            Ok(())
        })
        .unwrap()
        .unwrap();
        (rec, out)
    }

    /// A format 1 database: whole chunk lists as `objects` values, one of
    /// them ("b") already migrated, as an interrupted migration leaves it.
    #[test]
    fn format_1_objects_migrate_in_several_transactions_and_resume() {
        let t = tempfile::tempdir().unwrap();
        let lists = [
            ("a", chunks(1, 3)),
            ("b", chunks(2, 2)),
            ("c", Vec::new()),
            ("d", chunks(4, SEGMENT_CHUNKS + 5)),
            ("e", chunks(5, 1)),
        ];
        let db = Database::create(t.path().join(META_FILE)).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut st = tx.open_table(STATE).unwrap();
            st.insert("meta_format", 1).unwrap();
            st.insert("ref_seq", 7).unwrap();
            let mut objects = tx.open_table(OBJECTS).unwrap();
            let mut segments = tx.open_table(OBJECT_SEGMENTS).unwrap();
            for (name, list) in &lists {
                if *name == "b" {
                    let id = ObjectId(1);
                    write_segments(&mut segments, id, 0, list).unwrap();
                    let rec = ObjectRec {
                        id,
                        size: list.iter().map(|c| c.len as u64).sum(),
                        chunks: list.len() as u64,
                        segments: 1,
                    };
                    objects.insert((1, *name), rec.encode().as_slice()).unwrap();
                    st.insert("next_object", 2).unwrap();
                } else {
                    let v = format::encode_chunk_list(list);
                    objects.insert((1, *name), v.as_slice()).unwrap();
                }
            }
        }
        tx.commit().unwrap();
        drop(db);

        let db = Database::create(t.path().join(META_FILE)).unwrap();
        migrate_v1(&db, 2).unwrap();
        let mut ids = Vec::new();
        for (name, list) in &lists {
            let (rec, got) = read_all(&db, name);
            assert_eq!(&got, list, "{name}");
            assert_eq!(rec.segments, segments_for(list.len()), "{name}");
            ids.push(rec.id);
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), lists.len(), "ids are distinct");
        assert!(next_object_id(&db).unwrap() > ids.iter().map(|i| i.0).max().unwrap());
        assert_eq!(ref_seq(&db).unwrap(), 7);
        drop(db);
        // Now it opens without migrating the objects again (and goes on
        // to the current format).
        let db = open(t.path(), CACHE_BYTES).unwrap();
        let rt = db.begin_read().unwrap();
        let st = rt.open_table(STATE).unwrap();
        assert_eq!(
            st.get("meta_format").unwrap().unwrap().value(),
            META_FORMAT_VERSION
        );
        assert_eq!(read_all(&db, "d").1, lists[3].1);
    }

    #[test]
    fn format_2_inodes_and_dirents_migrate_in_several_transactions_and_resume() {
        use format::{Content, DirentVal, InodeRec, Kind, Timespec};
        let t = tempfile::tempdir().unwrap();
        let now = Timespec::now();
        let mut want_inodes = Vec::new();
        let mut want_dirents = Vec::new();
        for ino in 1..=40u64 {
            let kind = if ino % 5 == 0 { Kind::Dir } else { Kind::File };
            let mut r =
                InodeRec::new_live(kind, 0o640, 1000, 100, now, 1, format!("f{ino}").as_bytes());
            r.size = ino * 100;
            r.content = if ino % 3 == 0 {
                Content::Inline(vec![ino as u8; r.size as usize])
            } else {
                Content::Chunked
            };
            // An ended version beside the live one for some.
            if ino % 4 == 0 {
                let mut old = r.clone();
                old.died = 3;
                want_inodes.push(((ino, 1), old));
                want_inodes.push(((ino, 3), r.clone()));
            } else {
                want_inodes.push(((ino, 1), r.clone()));
            }
            let d = DirentVal {
                died: format::LIVE,
                ino,
                kind,
            };
            want_dirents.push(((1u64, format!("f{ino}").into_bytes(), 1u64), d));
        }
        let db = Database::create(t.path().join(META_FILE)).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut st = tx.open_table(STATE).unwrap();
            st.insert("meta_format", 2).unwrap();
            let mut inodes = tx.open_table(INODES).unwrap();
            for (k, r) in &want_inodes {
                inodes.insert(*k, r.encode_v3().as_slice()).unwrap();
            }
            // One damaged record: left for fsck, not a failed open.
            let mut bad = want_inodes[0].1.encode_v3();
            bad[20] ^= 1;
            inodes.insert((999, 1), bad.as_slice()).unwrap();
            let mut dirents = tx.open_table(DIRENTS).unwrap();
            for ((p, n, b), d) in &want_dirents {
                dirents
                    .insert((*p, n.as_slice(), *b), d.encode_v1().as_slice())
                    .unwrap();
            }
        }
        tx.commit().unwrap();
        // Interrupted: one transaction of 7 records, then a crash (the
        // database dropped without finishing).
        {
            let tx = db.begin_write().unwrap();
            let n = {
                let mut inodes = tx.open_table(INODES).unwrap();
                let mut n = 0;
                for (k, r) in want_inodes.iter().take(7) {
                    inodes.insert(*k, r.encode().as_slice()).unwrap();
                    n += 1;
                }
                n
            };
            assert_eq!(n, 7);
            tx.commit().unwrap();
        }
        migrate_v2(&db, 9).unwrap();
        let rt = db.begin_read().unwrap();
        let inodes = rt.open_table(INODES).unwrap();
        for (k, r) in &want_inodes {
            let v = inodes.get(*k).unwrap().unwrap();
            assert_eq!(v.value()[0], format::INODE_REC_VERSION, "{k:?}");
            assert_eq!(&InodeRec::decode(v.value()).unwrap(), r, "{k:?}");
        }
        assert!(InodeRec::decode(inodes.get((999, 1)).unwrap().unwrap().value()).is_err());
        let dirents = rt.open_table(DIRENTS).unwrap();
        for ((p, n, b), d) in &want_dirents {
            let v = dirents.get((*p, n.as_slice(), *b)).unwrap().unwrap();
            assert_eq!(v.value()[0], 2);
            assert_eq!(&DirentVal::decode(v.value()).unwrap(), d);
        }
        let st = rt.open_table(STATE).unwrap();
        assert_eq!(st.get("meta_format").unwrap().unwrap().value(), 3);
    }

    #[test]
    fn an_unknown_meta_format_is_a_typed_error() {
        let t = tempfile::tempdir().unwrap();
        let db = create(t.path()).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(STATE)
            .unwrap()
            .insert("meta_format", 99)
            .unwrap();
        tx.commit().unwrap();
        drop(db);
        let err = open(t.path(), CACHE_BYTES).err().unwrap();
        assert!(
            err.to_string()
                .contains("metadata has format version 99; this build understands 3"),
            "{err}"
        );
    }
}
