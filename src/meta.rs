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

pub fn create(dir: &Path) -> Result<Database> {
    let db = Database::create(dir.join(META_FILE))?;
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
        .set_cache_size(32 << 20)
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
