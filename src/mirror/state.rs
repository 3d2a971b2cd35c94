//! What a host keeps about one remote, in `STORE/mirror/NAME.redb`
//! (docs/format.md, "Mirror state"):
//! - `names`: chunk SHA-1 -> sealed blob name (a hint: saves sealing a
//!   chunk again to learn its name);
//! - `refs`: blob name -> the count this host holds on the target, as of
//!   the last commit the target took (`seq`);
//! - `trees`: directory inode -> its tree blob's name at a generation at or
//!   after the base snapshot's, for directories unchanged since (a hint:
//!   a directory missing here is built again);
//! - `done`: snapshot name -> (seq, root id) of the commit that carried it;
//! - `meta`: `seq`, `base_gen`; `text`: `base_snap`;
//! - `intent`: the commit in flight, written before it is sent, so a
//!   commit whose reply was lost is applied (or dropped) on the next run.
//!
//! The database is opened for a run and closed after, so `snapctl` can
//! read it while the daemon is idle.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::client::CommitBody;
use super::wire::Name;

const NAMES: TableDefinition<&[u8; 20], &[u8; 32]> = TableDefinition::new("names");
const REFS: TableDefinition<&[u8; 32], u64> = TableDefinition::new("refs");
const TREES: TableDefinition<u64, &[u8; 32]> = TableDefinition::new("trees");
const DONE: TableDefinition<&str, (u64, &[u8; 32])> = TableDefinition::new("done");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const TEXT: TableDefinition<&str, &str> = TableDefinition::new("text");
const INTENT: TableDefinition<u64, &[u8]> = TableDefinition::new("intent");

/// A commit in flight, and what applying it locally means.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Intent {
    pub body: CommitBody,
    /// The snapshot the commit finishes: (name, generation, root id).
    pub done: Option<(String, u64, Name)>,
    /// Trees built for the snapshot: (directory inode, tree name).
    pub trees: Vec<(u64, Name)>,
}

pub struct State {
    db: Database,
}

type R<T> = Result<T, String>;

fn e(x: impl std::fmt::Display) -> String {
    format!("mirror state: {x}")
}

impl State {
    pub fn open(path: &Path) -> R<State> {
        let db = Database::create(path).map_err(|x| format!("{}: {x}", path.display()))?;
        let tx = db.begin_write().map_err(e)?;
        {
            tx.open_table(NAMES).map_err(e)?;
            tx.open_table(REFS).map_err(e)?;
            tx.open_table(TREES).map_err(e)?;
            tx.open_table(DONE).map_err(e)?;
            tx.open_table(META).map_err(e)?;
            tx.open_table(TEXT).map_err(e)?;
            tx.open_table(INTENT).map_err(e)?;
        }
        tx.commit().map_err(e)?;
        Ok(State { db })
    }

    fn meta(&self, key: &str) -> R<u64> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(META).map_err(e)?;
        Ok(t.get(key).map_err(e)?.map_or(0, |v| v.value()))
    }

    pub fn seq(&self) -> R<u64> {
        self.meta("seq")
    }

    /// The last snapshot committed, with its generation.
    pub fn base(&self) -> R<Option<(String, u64)>> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(TEXT).map_err(e)?;
        let name = t
            .get("base_snap")
            .map_err(e)?
            .map(|v| v.value().to_string());
        drop(t);
        drop(tx);
        Ok(match name {
            Some(n) => Some((n, self.meta("base_gen")?)),
            None => None,
        })
    }

    pub fn name_of(&self, id: &[u8; 20]) -> R<Option<Name>> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(NAMES).map_err(e)?;
        Ok(t.get(id).map_err(e)?.map(|v| *v.value()))
    }

    pub fn put_names(&self, pairs: &[([u8; 20], Name)]) -> R<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut t = tx.open_table(NAMES).map_err(e)?;
            for (id, n) in pairs {
                t.insert(id, n).map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }

    pub fn refs(&self, n: &Name) -> R<u64> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(REFS).map_err(e)?;
        Ok(t.get(n).map_err(e)?.map_or(0, |v| v.value()))
    }

    pub fn tree(&self, ino: u64) -> R<Option<Name>> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(TREES).map_err(e)?;
        Ok(t.get(ino).map_err(e)?.map(|v| *v.value()))
    }

    /// Snapshots already on the target: name -> (seq, root id).
    pub fn done(&self) -> R<Vec<(String, u64, Name)>> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(DONE).map_err(e)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            let (seq, id) = v.value();
            out.push((k.value().to_string(), seq, *id));
        }
        Ok(out)
    }

    pub fn is_done(&self, snap: &str) -> R<bool> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(DONE).map_err(e)?;
        Ok(t.get(snap).map_err(e)?.is_some())
    }

    /// Records a commit about to be sent.
    pub fn write_intent(&self, i: &Intent) -> R<()> {
        let bytes = serde_json::to_vec(i).map_err(e)?;
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut t = tx.open_table(INTENT).map_err(e)?;
            t.retain(|_, _| false).map_err(e)?;
            t.insert(i.body.seq, bytes.as_slice()).map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    pub fn intent(&self) -> R<Option<Intent>> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(INTENT).map_err(e)?;
        let Some(row) = t.iter().map_err(e)?.next() else {
            return Ok(None);
        };
        let (_, v) = row.map_err(e)?;
        serde_json::from_slice(v.value()).map(Some).map_err(e)
    }

    pub fn drop_intent(&self) -> R<()> {
        let tx = self.db.begin_write().map_err(e)?;
        tx.open_table(INTENT)
            .map_err(e)?
            .retain(|_, _| false)
            .map_err(e)?;
        tx.commit().map_err(e)
    }

    /// Applies a commit the target took: counts, sequence, and for the
    /// last commit of a snapshot, the snapshot as done and the new base.
    pub fn apply(&self, i: &Intent) -> R<()> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut refs = tx.open_table(REFS).map_err(e)?;
            for (h, n) in &i.body.add {
                let Some(name) = super::wire::parse_hex(h) else {
                    continue;
                };
                let was = refs.get(&name).map_err(e)?.map_or(0, |v| v.value());
                refs.insert(&name, was + n).map_err(e)?;
            }
            for (h, n) in &i.body.drop {
                let Some(name) = super::wire::parse_hex(h) else {
                    continue;
                };
                let was = refs.get(&name).map_err(e)?.map_or(0, |v| v.value());
                if was <= *n {
                    refs.remove(&name).map_err(e)?;
                } else {
                    refs.insert(&name, was - n).map_err(e)?;
                }
            }
            let mut meta = tx.open_table(META).map_err(e)?;
            meta.insert("seq", i.body.seq).map_err(e)?;
            if let Some((snap, generation, root)) = &i.done {
                tx.open_table(DONE)
                    .map_err(e)?
                    .insert(snap.as_str(), (i.body.seq, root))
                    .map_err(e)?;
                meta.insert("base_gen", *generation).map_err(e)?;
                tx.open_table(TEXT)
                    .map_err(e)?
                    .insert("base_snap", snap.as_str())
                    .map_err(e)?;
                let mut trees = tx.open_table(TREES).map_err(e)?;
                for (ino, n) in &i.trees {
                    trees.insert(*ino, n).map_err(e)?;
                }
            }
            tx.open_table(INTENT)
                .map_err(e)?
                .retain(|_, _| false)
                .map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    /// The target's sequence moved without this host's record of it (the
    /// state lost, or another host using this one's key): adopt it.
    pub fn adopt_seq(&self, seq: u64) -> R<()> {
        let tx = self.db.begin_write().map_err(e)?;
        tx.open_table(META)
            .map_err(e)?
            .insert("seq", seq)
            .map_err(e)?;
        tx.commit().map_err(e)
    }

    /// Forgets blobs the target turned out not to hold: their counts, the
    /// names that point at them and every cached tree (any may name them).
    pub fn forget(&self, gone: &[Name]) -> R<()> {
        let gone: std::collections::HashSet<Name> = gone.iter().copied().collect();
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut refs = tx.open_table(REFS).map_err(e)?;
            for n in &gone {
                refs.remove(n).map_err(e)?;
            }
            tx.open_table(NAMES)
                .map_err(e)?
                .retain(|_, v| !gone.contains(v))
                .map_err(e)?;
            tx.open_table(TREES)
                .map_err(e)?
                .retain(|_, _| false)
                .map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    /// Fills the hints and the record of what is done after a recovery.
    pub fn seed(
        &self,
        seq: u64,
        names: &[([u8; 20], Name)],
        done: &[(String, u64, Name)],
        base: Option<(&str, u64)>,
    ) -> R<()> {
        self.put_names(names)?;
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut d = tx.open_table(DONE).map_err(e)?;
            for (s, q, id) in done {
                d.insert(s.as_str(), (*q, id)).map_err(e)?;
            }
            let mut meta = tx.open_table(META).map_err(e)?;
            meta.insert("seq", seq).map_err(e)?;
            if let Some((s, g)) = base {
                meta.insert("base_gen", g).map_err(e)?;
                tx.open_table(TEXT)
                    .map_err(e)?
                    .insert("base_snap", s)
                    .map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }
}
