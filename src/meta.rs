//! `meta.redb`: the records that hold references to chunks. In this version
//! that is named objects (an owner's named chunk lists); the filesystem's
//! inodes and chunk maps join it in the next format version.
//!
//! Invariant: `state.ref_seq` is the index's `ref_seq` of the last index
//! commit whose reference changes this database holds. The repo compares the
//! two at open to undo an index commit whose meta commit never landed.
//!
//! Calls `format` only.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::format::{self, ChunkRef, OwnerId};
use crate::store::{Error, Result};

pub const META_FILE: &str = "meta.redb";
pub const META_FORMAT_VERSION: u64 = 1;

pub const STATE: TableDefinition<&str, u64> = TableDefinition::new("state");
/// (owner, name) -> chunk list.
pub const OBJECTS: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("objects");

/// redb's page cache for meta.redb: bounded, so memory does not grow with
/// the store.
const CACHE_BYTES: usize = 16 << 20;

pub fn create(dir: &Path) -> Result<Database> {
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(dir.join(META_FILE))?;
    let tx = db.begin_write()?;
    {
        let mut st = tx.open_table(STATE)?;
        st.insert("meta_format", META_FORMAT_VERSION)?;
        st.insert("ref_seq", 0)?;
        tx.open_table(OBJECTS)?;
    }
    tx.commit()?;
    Ok(db)
}

pub fn open(dir: &Path) -> Result<Database> {
    let path = dir.join(META_FILE);
    let damaged = |why: String| Error::Db(format!("{} is unusable: {why}", path.display()));
    if !path.is_file() {
        return Err(damaged("the file is missing".into()));
    }
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .open(&path)
        .map_err(|e| damaged(e.to_string()))?;
    let rt = db.begin_read()?;
    let st = rt.open_table(STATE).map_err(|e| damaged(e.to_string()))?;
    match st.get("meta_format")?.map(|v| v.value()) {
        Some(META_FORMAT_VERSION) => {}
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
    drop(st);
    drop(rt);
    Ok(db)
}

pub fn ref_seq(db: &Database) -> Result<u64> {
    let rt = db.begin_read()?;
    let st = rt.open_table(STATE)?;
    Ok(st.get("ref_seq")?.map(|v| v.value()).unwrap_or(0))
}

pub fn get_object(db: &Database, owner: OwnerId, name: &str) -> Result<Option<Vec<ChunkRef>>> {
    let rt = db.begin_read()?;
    let t = rt.open_table(OBJECTS)?;
    match t.get((owner.0, name))? {
        None => Ok(None),
        Some(v) => format::decode_chunk_list(v.value())
            .map(Some)
            .map_err(|e| Error::Db(format!("object {name}: {e}"))),
    }
}

/// Every object of every owner, in key order.
pub fn for_each_object(
    db: &Database,
    mut f: impl FnMut(OwnerId, &str, Vec<ChunkRef>) -> Result<()>,
) -> Result<()> {
    let rt = db.begin_read()?;
    let t = rt.open_table(OBJECTS)?;
    for row in t.iter()? {
        let (k, v) = row?;
        let (owner, name) = k.value();
        let list = format::decode_chunk_list(v.value())
            .map_err(|e| Error::Db(format!("object {name}: {e}")))?;
        f(OwnerId(owner), name, list)?;
    }
    Ok(())
}

/// Writes object changes and the ref sequence they match, in one commit.
/// `None` removes the object.
pub fn commit_objects(
    db: &Database,
    owner: OwnerId,
    changes: &[(String, Option<Vec<ChunkRef>>)],
    ref_seq: Option<u64>,
) -> Result<()> {
    let tx = db.begin_write()?;
    {
        let mut t = tx.open_table(OBJECTS)?;
        for (name, list) in changes {
            match list {
                Some(l) => {
                    t.insert(
                        (owner.0, name.as_str()),
                        format::encode_chunk_list(l).as_slice(),
                    )?;
                }
                None => {
                    t.remove((owner.0, name.as_str()))?;
                }
            }
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
            let root = format::InodeRec {
                died: format::LIVE,
                kind: format::Kind::Dir,
                perm: 0o755,
                uid,
                gid,
                nlink: 2,
                rdev: 0,
                size: 0,
                atime: now,
                mtime: now,
                ctime: now,
                btime: now,
                content: format::Content::Empty,
                parent: ROOT_INO,
                name: Vec::new(),
            };
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
    pub inodes: Inodes<'t>,
    pub dirents: Dirents<'t>,
    pub xattrs: Xattrs<'t>,
    pub contents: Contents<'t>,
    pub changes: Changes<'t>,
}

impl<'t> Versioned<'t> {
    pub fn open(tx: &'t redb::WriteTransaction, g: Gens) -> Result<Versioned<'t>> {
        Ok(Versioned {
            g,
            inodes: tx.open_table(INODES)?,
            dirents: tx.open_table(DIRENTS)?,
            xattrs: tx.open_table(XATTRS)?,
            contents: tx.open_table(CONTENTS)?,
            changes: tx.open_table(CHANGES)?,
        })
    }

    /// Notes that generation G changed a record. Nothing needs the log
    /// while no snapshot exists.
    fn log(&mut self, rec: Rec, id: u64, name: &[u8]) -> Result<()> {
        if self.g.last_snap != 0 {
            self.changes
                .insert((self.g.current, rec as u8, id, name), ())?;
        }
        Ok(())
    }

    /// Writes the live version of an inode.
    pub fn write_inode(&mut self, ino: u64, rec: &format::InodeRec) -> Result<()> {
        let born = match live_inode(&self.inodes, ino)? {
            Some((born, _)) if self.g.in_place(born) => born,
            Some((born, mut old)) => {
                old.died = self.g.current;
                self.inodes.insert((ino, born), old.encode().as_slice())?;
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
        self.inodes.insert((ino, born), rec.encode().as_slice())?;
        Ok(())
    }

    /// Ends the live version of an inode.
    pub fn remove_inode(&mut self, ino: u64) -> Result<()> {
        if let Some((born, mut old)) = live_inode(&self.inodes, ino)? {
            if self.g.in_place(born) {
                self.inodes.remove((ino, born))?;
            } else {
                old.died = self.g.current;
                self.inodes.insert((ino, born), old.encode().as_slice())?;
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
        let born = match lookup_dirent(&self.dirents, parent, name)? {
            Some((born, _)) if self.g.in_place(born) => born,
            Some((born, mut old)) => {
                old.died = self.g.current;
                self.dirents
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
            .insert((parent, name, born), d.encode().as_slice())?;
        Ok(())
    }

    pub fn remove_dirent(&mut self, parent: u64, name: &[u8]) -> Result<()> {
        if let Some((born, mut old)) = lookup_dirent(&self.dirents, parent, name)? {
            if self.g.in_place(born) {
                self.dirents.remove((parent, name, born))?;
            } else {
                old.died = self.g.current;
                self.dirents
                    .insert((parent, name, born), old.encode().as_slice())?;
                self.log(Rec::Dirent, parent, name)?;
            }
        }
        Ok(())
    }

    pub fn set_xattr(&mut self, ino: u64, name: &[u8], value: &[u8]) -> Result<()> {
        let born = match xattr_at(&self.xattrs, ino, name, NOW)? {
            Some((born, _)) if self.g.in_place(born) => born,
            Some((born, old)) => {
                let enc = format::encode_versioned(self.g.current, &old);
                self.xattrs.insert((ino, name, born), enc.as_slice())?;
                self.log(Rec::Xattr, ino, name)?;
                self.g.current
            }
            None => {
                self.log(Rec::Xattr, ino, name)?;
                self.g.current
            }
        };
        let enc = format::encode_versioned(format::LIVE, value);
        self.xattrs.insert((ino, name, born), enc.as_slice())?;
        Ok(())
    }

    /// Returns whether the attribute existed.
    pub fn remove_xattr(&mut self, ino: u64, name: &[u8]) -> Result<bool> {
        match xattr_at(&self.xattrs, ino, name, NOW)? {
            None => Ok(false),
            Some((born, old)) => {
                if self.g.in_place(born) {
                    self.xattrs.remove((ino, name, born))?;
                } else {
                    let enc = format::encode_versioned(self.g.current, &old);
                    self.xattrs.insert((ino, name, born), enc.as_slice())?;
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
        let freed = match live_content(&self.contents, ino)? {
            Some((born, old)) if self.g.in_place(born) => {
                self.contents.remove((ino, born))?;
                Some(old)
            }
            Some((born, old)) => {
                let enc = format::encode_chunk_list(&old);
                self.contents.insert(
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
            self.contents.insert(
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
) -> Result<std::collections::HashSet<format::ChunkId>> {
    let mut out = std::collections::HashSet::new();
    for row in t.range((ino, 0)..=(ino, u64::MAX))? {
        let (k, v) = row?;
        if skip.contains(&k.value().1) {
            continue;
        }
        let (_, body) = format::decode_versioned(v.value()).map_err(|e| corrupt("content", e))?;
        for c in decode_chunk_list_body(body)? {
            out.insert(c.id);
        }
    }
    Ok(out)
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
