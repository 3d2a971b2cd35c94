//! What a mirror puts on a target besides chunks (docs/format.md, "Mirror
//! trees and roots"): one tree blob per directory, chunk-list segments for
//! long files, and a sealed root per snapshot. Encoded with postcard,
//! compressed with zstd, sealed under the host's metadata key
//! (deterministically: an unchanged directory seals to the same name and
//! is not sent again; two hosts' trees never match).
//!
//! Pure functions over bytes: calls `seal`, `format`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::format::{BLOB_HEADER_LEN, BlobHeader, ChunkId, Compression, Sealing};
use crate::seal;

/// A blob's name on a target: BLAKE3 of its sealed bytes.
pub type Name = [u8; 32];

pub const TREE_VERSION: u8 = 1;
pub const ROOT_VERSION: u8 = 1;

/// A file whose chunk list is longer than this goes into segments.
pub const INLINE_CHUNKS: usize = 64;
/// A segment ends after a chunk whose id's first two bytes are 0 modulo
/// this (content-defined, so an edit moves only the segments it touches),
/// or at `SEGMENT_MAX` chunks.
pub const SEGMENT_SPLIT: u16 = 256;
pub const SEGMENT_MAX: usize = 4096;

/// One chunk of a file: its SHA-1, its sealed blob's name, its length. A
/// hole has the zero id and the zero name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEnt {
    pub id: [u8; 20],
    pub name: Name,
    pub len: u32,
}

impl ChunkEnt {
    pub fn is_hole(&self) -> bool {
        self.id == ChunkId::HOLE.0
    }
}

/// A segment of a long file's chunk list, named in the file's entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegRef {
    pub name: Name,
    pub chunks: u32,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// A directory's tree blob.
    Tree(Name),
    /// A small file's bytes or a symlink's target.
    Inline(Vec<u8>),
    Chunks(Vec<ChunkEnt>),
    Segments(Vec<SegRef>),
    Empty,
}

/// One name in a directory, with what `stat` and `getfattr` show of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: Vec<u8>,
    /// `format::Kind` code.
    pub kind: u8,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// For a file with several links: an id shared by its names within
    /// one snapshot (restore links them again); 0 otherwise.
    pub link: u64,
    pub body: Body,
}

impl Entry {
    /// The blobs this entry names (a subtree, segments, chunks).
    pub fn children(&self) -> Vec<Name> {
        match &self.body {
            Body::Tree(n) => vec![*n],
            Body::Chunks(c) => c.iter().filter(|c| !c.is_hole()).map(|c| c.name).collect(),
            Body::Segments(s) => s.iter().map(|s| s.name).collect(),
            Body::Inline(_) | Body::Empty => Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub v: u8,
    pub entries: Vec<Entry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub v: u8,
    pub chunks: Vec<ChunkEnt>,
}

/// A snapshot as a target keeps it: sealed, named by `root_id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    pub v: u8,
    pub host: String,
    /// The host's commit sequence that carried it (rollback check).
    pub seq: u64,
    pub snapshot: String,
    pub labels: BTreeMap<String, String>,
    pub generation: u64,
    pub created: (i64, u32),
    /// The tree's top directory, its body the top tree.
    pub top: Entry,
}

/// Why a blob or root would not open.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Seal(#[from] seal::Error),
    #[error("mirror metadata: {0}")]
    Format(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn bad(e: impl std::fmt::Display) -> Error {
    Error::Format(e.to_string())
}

/// Seals `value` as a metadata blob: a blob header (sealing = host), then
/// the zstd-compressed postcard bytes under the host's key.
pub fn seal_blob<T: Serialize>(meta_key: &[u8; 32], value: &T) -> Result<Vec<u8>> {
    let plain = postcard::to_stdvec(value).map_err(bad)?;
    let packed = zstd::bulk::compress(&plain, 3).map_err(bad)?;
    let head = BlobHeader {
        compression: Compression::Zstd,
        sealing: Sealing::Host,
        raw_len: u32::try_from(plain.len()).map_err(|_| bad("metadata blob over 4 GiB"))?,
    }
    .encode();
    let mut out = head.to_vec();
    out.extend_from_slice(&seal::seal_meta(meta_key, &packed)?);
    Ok(out)
}

/// Opens a metadata blob sealed by `seal_blob` under this key.
pub fn open_blob<T: for<'de> Deserialize<'de>>(meta_key: &[u8; 32], sealed: &[u8]) -> Result<T> {
    let h = BlobHeader::decode(sealed).map_err(bad)?;
    if h.sealing != Sealing::Host || h.compression != Compression::Zstd {
        return Err(bad("not a host-sealed metadata blob"));
    }
    let packed = seal::open_meta(meta_key, &sealed[BLOB_HEADER_LEN..])?;
    let plain = zstd::bulk::decompress(&packed, h.raw_len as usize).map_err(bad)?;
    if plain.len() != h.raw_len as usize {
        return Err(bad("metadata blob length does not match its header"));
    }
    postcard::from_bytes(&plain).map_err(bad)
}

pub fn seal_root(meta_key: &[u8; 32], root: &Root) -> Result<Vec<u8>> {
    let plain = postcard::to_stdvec(root).map_err(bad)?;
    Ok(seal::seal_meta(meta_key, &plain)?)
}

pub fn open_root(meta_key: &[u8; 32], sealed: &[u8]) -> Result<Root> {
    let plain = seal::open_meta(meta_key, sealed)?;
    let r: Root = postcard::from_bytes(&plain).map_err(bad)?;
    if r.v != ROOT_VERSION {
        return Err(bad(format!(
            "root version {} (this build reads {ROOT_VERSION})",
            r.v
        )));
    }
    Ok(r)
}

/// The id a snapshot's root has on a target: keyed by the host's key, so
/// the target learns nothing from it; the name and creation time make it
/// unique per snapshot, across a recovery.
pub fn root_id(meta_key: &[u8; 32], snapshot: &str, created: (i64, u32)) -> Name {
    let mut h = blake3::Hasher::new_keyed(meta_key);
    h.update(b"root\0");
    h.update(&(snapshot.len() as u64).to_le_bytes());
    h.update(snapshot.as_bytes());
    h.update(&created.0.to_le_bytes());
    h.update(&created.1.to_le_bytes());
    *h.finalize().as_bytes()
}

/// Splits a long chunk list into segments at content-defined points.
pub fn split_segments(chunks: &[ChunkEnt]) -> Vec<&[ChunkEnt]> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in chunks.iter().enumerate() {
        let cut = u16::from_le_bytes([c.id[0], c.id[1]]) % SEGMENT_SPLIT == 0 && !c.is_hole();
        if cut || i + 1 - start >= SEGMENT_MAX {
            out.push(&chunks[start..=i]);
            start = i + 1;
        }
    }
    if start < chunks.len() {
        out.push(&chunks[start..]);
    }
    out
}

pub fn hex(n: &Name) -> String {
    n.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_hex(s: &str) -> Option<Name> {
    if s.len() != 64 {
        return None;
    }
    let mut n = [0u8; 32];
    for (i, b) in n.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(i: u32) -> ChunkEnt {
        let id = ChunkId::of(&i.to_le_bytes()).0;
        ChunkEnt {
            id,
            name: [i as u8; 32],
            len: 65536,
        }
    }

    #[test]
    fn trees_seal_deterministically_and_open_only_under_their_key() {
        let k1 = [7u8; 32];
        let k2 = [8u8; 32];
        let t = Tree {
            v: TREE_VERSION,
            entries: vec![Entry {
                name: b"a".to_vec(),
                kind: 1,
                perm: 0o644,
                uid: 1,
                gid: 2,
                rdev: 0,
                size: 3,
                atime: (1, 2),
                mtime: (3, 4),
                xattrs: vec![(b"user.x".to_vec(), b"y".to_vec())],
                link: 0,
                body: Body::Inline(b"abc".to_vec()),
            }],
        };
        let a = seal_blob(&k1, &t).unwrap();
        assert_eq!(a, seal_blob(&k1, &t).unwrap());
        assert_ne!(a, seal_blob(&k2, &t).unwrap());
        assert_eq!(open_blob::<Tree>(&k1, &a).unwrap(), t);
        assert!(open_blob::<Tree>(&k2, &a).is_err());
        let mut cut = a.clone();
        let last = cut.len() - 1;
        cut[last] ^= 1;
        assert!(open_blob::<Tree>(&k1, &cut).is_err());
    }

    #[test]
    fn segments_move_only_where_the_list_changed() {
        let list: Vec<ChunkEnt> = (0..20_000).map(ent).collect();
        let a = split_segments(&list);
        assert!(a.len() > 20, "{} segments", a.len());
        assert_eq!(a.iter().map(|s| s.len()).sum::<usize>(), list.len());
        let mut edited = list.clone();
        edited[10_000] = ent(1_000_000);
        edited.insert(10_001, ent(1_000_001));
        let b = split_segments(&edited);
        let same = b.iter().filter(|s| a.contains(s)).count();
        assert!(
            b.len() - same <= 2,
            "{} of {} segments changed",
            b.len() - same,
            b.len()
        );
    }

    #[test]
    fn root_ids_differ_by_key_name_and_time() {
        let k = [1u8; 32];
        let a = root_id(&k, "s", (1, 0));
        assert_ne!(a, root_id(&[2u8; 32], "s", (1, 0)));
        assert_ne!(a, root_id(&k, "t", (1, 0)));
        assert_ne!(a, root_id(&k, "s", (1, 1)));
        assert_eq!(parse_hex(&hex(&a)), Some(a));
    }
}
