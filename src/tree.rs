//! A read view of the tree at one generation (design decision 5): what a
//! snapshot, or the live tree as last committed, holds. Lookup, listing,
//! a file's chunk list, extended attributes and a walk of a subtree, each
//! reading only the rows it names (the versioned tables are keyed by
//! inode, then generation). `.snapshots`, `snapctl restore` and the
//! mirror read snapshots through this, on a meta.redb read transaction
//! alone: no mounted volume, no staging.
//!
//! Calls `meta`, `format`, `store` (for its error type); never `fs`,
//! `snap` or anything above.

use redb::{ReadOnlyTable, ReadTransaction};

use crate::format::{ChunkRef, Content, DirentVal, InodeRec, Kind};
use crate::meta;
use crate::store;

type InoTable = ReadOnlyTable<(u64, u64), &'static [u8]>;
type NameTable = ReadOnlyTable<(u64, &'static [u8], u64), &'static [u8]>;

/// The tree as generation `generation` saw it.
pub struct View {
    pub generation: u64,
    inodes: InoTable,
    dirents: NameTable,
    xattrs: NameTable,
    contents: InoTable,
}

/// One node of a walk, in the order visited: a directory comes before
/// what it holds.
pub struct Visit {
    pub ino: u64,
    /// The index, in visit order, of the directory it was found in; None
    /// for the walk's root.
    pub parent: Option<usize>,
    pub name: Vec<u8>,
    pub rec: InodeRec,
}

impl View {
    pub fn at(rt: &ReadTransaction, generation: u64) -> store::Result<View> {
        Ok(View {
            generation,
            inodes: rt.open_table(meta::INODES)?,
            dirents: rt.open_table(meta::DIRENTS)?,
            xattrs: rt.open_table(meta::XATTRS)?,
            contents: rt.open_table(meta::CONTENTS)?,
        })
    }

    pub fn inode(&self, ino: u64) -> store::Result<Option<InodeRec>> {
        Ok(meta::inode_at(&self.inodes, ino, self.generation)?.map(|(_, r)| r))
    }

    pub fn lookup(&self, dir: u64, name: &[u8]) -> store::Result<Option<DirentVal>> {
        Ok(meta::dirent_at(&self.dirents, dir, name, self.generation)?.map(|(_, d)| d))
    }

    /// The inode a path inside the tree names ("/a/b", "a/b/"), if any.
    pub fn resolve(&self, path: &[u8]) -> store::Result<Option<u64>> {
        let mut ino = meta::ROOT_INO;
        for c in components(path) {
            match self.lookup(ino, c)? {
                Some(d) => ino = d.ino,
                None => return Ok(None),
            }
        }
        Ok(Some(ino))
    }

    /// A directory's entries, by name.
    pub fn list(&self, dir: u64) -> store::Result<Vec<(Vec<u8>, DirentVal)>> {
        meta::list_dir_at(&self.dirents, dir, self.generation, None)
    }

    /// A regular file's chunk list (None when its bytes are inline or it
    /// has none).
    pub fn chunks(&self, ino: u64) -> store::Result<Option<Vec<ChunkRef>>> {
        Ok(meta::content_at(&self.contents, ino, self.generation)?.map(|(_, l)| l))
    }

    /// The chunk list of `rec`, read only when its content is chunked.
    pub fn chunks_of(&self, ino: u64, rec: &InodeRec) -> store::Result<Option<Vec<ChunkRef>>> {
        match rec.content {
            Content::Chunked => self.chunks(ino),
            _ => Ok(None),
        }
    }

    pub fn xattr(&self, ino: u64, name: &[u8]) -> store::Result<Option<Vec<u8>>> {
        Ok(meta::xattr_at(&self.xattrs, ino, name, self.generation)?.map(|(_, v)| v))
    }

    pub fn xattr_names(&self, ino: u64) -> store::Result<Vec<Vec<u8>>> {
        meta::list_xattrs_at(&self.xattrs, ino, self.generation)
    }

    /// Every extended attribute of `ino`, names with values.
    pub fn xattrs(&self, ino: u64) -> store::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for n in self.xattr_names(ino)? {
            if let Some(v) = self.xattr(ino, &n)? {
                out.push((n, v));
            }
        }
        Ok(out)
    }

    /// Visits `root` (named `name`) and everything below it, a directory
    /// before its entries. A hard-linked file is visited once per link.
    /// An inode the entries name but the table lacks is damage: the error
    /// `missing(ino)` makes is returned.
    pub fn walk<E: From<store::Error>>(
        &self,
        root: u64,
        name: Vec<u8>,
        missing: impl Fn(u64) -> E,
        mut visit: impl FnMut(&Visit) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut stack: Vec<(u64, Option<usize>, Vec<u8>)> = vec![(root, None, name)];
        let mut seen = 0usize;
        while let Some((ino, parent, name)) = stack.pop() {
            let rec = self.inode(ino)?.ok_or_else(|| missing(ino))?;
            let me = seen;
            seen += 1;
            if rec.kind == Kind::Dir {
                for (n, d) in self.list(ino)? {
                    stack.push((d.ino, Some(me), n));
                }
            }
            visit(&Visit {
                ino,
                parent,
                name,
                rec,
            })?;
        }
        Ok(())
    }
}

/// Splits a path inside the tree into its names ("/a/b", "a/b/" -> a, b).
pub fn components(path: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}
