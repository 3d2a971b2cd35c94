//! Every persisted type of the store, in one place: the store config, the blob
//! header, the pack header and record framing, and the encodings of the values
//! kept in the redb tables. `docs/format.md` is the written contract; this file
//! implements it byte for byte. Each structure carries a magic number and/or a
//! version, and an unknown version is a typed error, never a guess.
//!
//! This module calls nothing else in the crate.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors decoding a persisted structure.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("bad magic in {what}")]
    BadMagic { what: &'static str },
    #[error("{what} has format version {found}; this build understands {supported}")]
    UnknownVersion {
        what: &'static str,
        found: u32,
        supported: u32,
    },
    #[error("{what} is truncated ({len} bytes)")]
    Truncated { what: &'static str, len: usize },
    #[error("unknown compression code {0}")]
    UnknownCompression(u8),
    #[error("unknown sealing code {0}")]
    UnknownSealing(u8),
    #[error("{what} is malformed: {why}")]
    Malformed { what: &'static str, why: String },
}

// ---------------------------------------------------------------- ids

/// SHA-1 of a chunk's plaintext: the chunk's name everywhere.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 20]);

impl ChunkId {
    /// Not a chunk: a chunk list entry with this id is a hole, `len` bytes
    /// of zeros with nothing stored behind them (chunk list version 2).
    /// No data hashes to it in practice (a SHA-1 preimage of zero).
    pub const HOLE: ChunkId = ChunkId([0; 20]);

    pub fn of(data: &[u8]) -> ChunkId {
        use sha1::Digest;
        let digest = sha1::Sha1::digest(data);
        let mut id = [0u8; 20];
        id.copy_from_slice(&digest);
        ChunkId(id)
    }

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(40);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    pub fn from_hex(s: &str) -> Option<ChunkId> {
        if s.len() != 40 {
            return None;
        }
        let mut id = [0u8; 20];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(ChunkId(id))
    }

    /// The first eight bytes, for the negative cache's bit index.
    pub fn prefix_u64(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(b)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A pack file's number. Pack ids are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub u64);

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pack {:012x}", self.0)
    }
}

impl PackId {
    /// File name relative to `packs/`: a two-hex-digit fan-out directory keeps
    /// directories small on a store with many packs.
    pub fn rel_path(&self) -> String {
        format!("{:02x}/{:012x}.pack", self.0 & 0xff, self.0)
    }
}

/// Who holds a reference: the local volume, or on a target, one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerId(pub u32);

impl OwnerId {
    /// The local volume (the mounted filesystem and its snapshots).
    pub const LOCAL: OwnerId = OwnerId(1);
}

impl fmt::Display for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "owner {}", self.0)
    }
}

/// A named object's number: it keys the object's chunk list segments, so
/// replacing an object writes new segments beside the old ones. Never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub u64);

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "object {}", self.0)
    }
}

// ---------------------------------------------------------------- config

pub const STORE_MAGIC: &str = "dedupfs-store";
pub const STORE_FORMAT_VERSION: u32 = 1;
pub const CONFIG_FILE: &str = "config.json";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Zstd,
    Lz4,
}

impl Compression {
    pub fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Zstd => 1,
            Compression::Lz4 => 2,
        }
    }

    pub fn from_code(code: u8) -> Result<Compression, FormatError> {
        match code {
            0 => Ok(Compression::None),
            1 => Ok(Compression::Zstd),
            2 => Ok(Compression::Lz4),
            c => Err(FormatError::UnknownCompression(c)),
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            "lz4" => Ok(Compression::Lz4),
            other => Err(format!("unknown compression '{other}' (zstd, lz4 or none)")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams {
            min: 4 * 1024,
            avg: 16 * 1024,
            max: 64 * 1024,
        }
    }
}

impl ChunkerParams {
    /// The bounds the fastcdc v2020 implementation accepts, plus our own
    /// ordering rule; checked at `init` so a store never records parameters
    /// the chunker would reject.
    pub fn validate(&self) -> Result<(), String> {
        let ChunkerParams { min, avg, max } = *self;
        if !(64..=1_048_576).contains(&min) {
            return Err(format!("chunk-min {min} is outside 64..=1048576"));
        }
        if !(256..=4_194_304).contains(&avg) {
            return Err(format!("chunk-avg {avg} is outside 256..=4194304"));
        }
        if !(1024..=16_777_216).contains(&max) {
            return Err(format!("chunk-max {max} is outside 1024..=16777216"));
        }
        if min % 2 != 0 || avg % 2 != 0 || max % 2 != 0 {
            return Err("chunk sizes must be even".into());
        }
        if !(min < avg && avg < max) {
            return Err(format!(
                "need chunk-min < chunk-avg < chunk-max, got {min}/{avg}/{max}"
            ));
        }
        Ok(())
    }
}

/// `STORE/config.json`. Written once at `init` (new file, fsync, rename).
/// zstd level of a new store. 9, not zstd's own 3: on a real corpus
/// (7 Django sdists + 7 numpy wheels unpacked) it stored 6% fewer pack
/// bytes at the same ingest speed; 15 saved 4% more at half the speed.
pub const DEFAULT_ZSTD_LEVEL: i32 = 9;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreConfig {
    /// Always [`STORE_MAGIC`].
    pub format: String,
    pub version: u32,
    /// Random id of this store, hex; names it to mirrors and logs.
    pub store_id: String,
    pub chunker: ChunkerParams,
    pub compression: Compression,
    /// zstd level when `compression` is zstd.
    pub zstd_level: i32,
    /// Target pack size; a pack is sealed once it passes this.
    pub pack_target_bytes: u64,
}

impl StoreConfig {
    pub fn new(chunker: ChunkerParams, compression: Compression, store_id: String) -> StoreConfig {
        StoreConfig {
            format: STORE_MAGIC.to_string(),
            version: STORE_FORMAT_VERSION,
            store_id,
            chunker,
            compression,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            pack_target_bytes: 32 * 1024 * 1024,
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<StoreConfig, FormatError> {
        // Check the version before the full shape, so that a newer format with
        // new fields is reported as a version problem, not a parse error.
        let raw: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| FormatError::Malformed {
                what: "config.json",
                why: e.to_string(),
            })?;
        if raw.get("format").and_then(|v| v.as_str()) != Some(STORE_MAGIC) {
            return Err(FormatError::BadMagic {
                what: "config.json",
            });
        }
        let version = raw.get("version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
        if version != STORE_FORMAT_VERSION {
            return Err(FormatError::UnknownVersion {
                what: "store",
                found: version,
                supported: STORE_FORMAT_VERSION,
            });
        }
        let cfg: StoreConfig = serde_json::from_value(raw).map_err(|e| FormatError::Malformed {
            what: "config.json",
            why: e.to_string(),
        })?;
        cfg.chunker
            .validate()
            .map_err(|why| FormatError::Malformed {
                what: "config.json",
                why,
            })?;
        Ok(cfg)
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serializing a plain struct of strings and integers cannot fail.
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

// ---------------------------------------------------------------- blob

pub const BLOB_VERSION: u8 = 1;
pub const BLOB_HEADER_LEN: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sealing {
    None,
    /// Convergent AEAD (decision 8); used on the wire to untrusted remotes.
    Convergent,
    /// Sealed under one host's metadata key (a mirror's tree or chunk
    /// list, docs/security.md); only on the wire.
    Host,
}

/// The header in front of every blob, on disk and on the wire.
///
/// ```text
/// 0      1            2        3         4..8
/// version compression sealing  reserved  raw_len (u32 LE)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobHeader {
    pub compression: Compression,
    pub sealing: Sealing,
    /// Length of the plaintext chunk.
    pub raw_len: u32,
}

impl BlobHeader {
    pub fn encode(&self) -> [u8; BLOB_HEADER_LEN] {
        let mut h = [0u8; BLOB_HEADER_LEN];
        h[0] = BLOB_VERSION;
        h[1] = self.compression.code();
        h[2] = match self.sealing {
            Sealing::None => 0,
            Sealing::Convergent => 1,
            Sealing::Host => 2,
        };
        h[4..8].copy_from_slice(&self.raw_len.to_le_bytes());
        h
    }

    pub fn decode(b: &[u8]) -> Result<BlobHeader, FormatError> {
        if b.len() < BLOB_HEADER_LEN {
            return Err(FormatError::Truncated {
                what: "blob header",
                len: b.len(),
            });
        }
        if b[0] != BLOB_VERSION {
            return Err(FormatError::UnknownVersion {
                what: "blob",
                found: b[0] as u32,
                supported: BLOB_VERSION as u32,
            });
        }
        let compression = Compression::from_code(b[1])?;
        let sealing = match b[2] {
            0 => Sealing::None,
            1 => Sealing::Convergent,
            2 => Sealing::Host,
            c => return Err(FormatError::UnknownSealing(c)),
        };
        Ok(BlobHeader {
            compression,
            sealing,
            raw_len: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        })
    }
}

// ---------------------------------------------------------------- pack

pub const PACK_MAGIC: &[u8; 8] = b"DDFSPACK";
pub const PACK_VERSION: u32 = 1;
pub const PACK_HEADER_LEN: usize = 32;

/// ```text
/// 0..8 magic "DDFSPACK" | 8..12 version u32 LE | 12..20 pack id u64 LE | 20..32 zero
/// ```
pub fn encode_pack_header(id: PackId) -> [u8; PACK_HEADER_LEN] {
    let mut h = [0u8; PACK_HEADER_LEN];
    h[..8].copy_from_slice(PACK_MAGIC);
    h[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&id.0.to_le_bytes());
    h
}

pub fn decode_pack_header(b: &[u8]) -> Result<PackId, FormatError> {
    if b.len() < PACK_HEADER_LEN {
        return Err(FormatError::Truncated {
            what: "pack header",
            len: b.len(),
        });
    }
    if &b[..8] != PACK_MAGIC {
        return Err(FormatError::BadMagic {
            what: "pack header",
        });
    }
    let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if version != PACK_VERSION {
        return Err(FormatError::UnknownVersion {
            what: "pack",
            found: version,
            supported: PACK_VERSION,
        });
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&b[12..20]);
    Ok(PackId(u64::from_le_bytes(id)))
}

pub const RECORD_MAGIC: &[u8; 4] = b"DBR1";
pub const RECORD_HEADER_LEN: usize = 32;

/// One blob in a pack, framed so that a pack is its own index:
///
/// ```text
/// 0..4 magic "DBR1" | 4..24 chunk id | 24..28 blob_len u32 LE | 28..32 crc32 LE
/// 32..32+blob_len   blob (BlobHeader + payload)
/// ```
///
/// The CRC covers bytes 0..28 and the blob; it tells a torn or damaged record
/// from a whole one when a pack is scanned without the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub id: ChunkId,
    pub blob_len: u32,
    pub crc: u32,
}

impl RecordHeader {
    pub fn for_blob(id: ChunkId, blob_header: &[u8], payload: &[u8]) -> RecordHeader {
        let blob_len = (blob_header.len() + payload.len()) as u32;
        let mut h = crc32fast::Hasher::new();
        h.update(RECORD_MAGIC);
        h.update(&id.0);
        h.update(&blob_len.to_le_bytes());
        h.update(blob_header);
        h.update(payload);
        RecordHeader {
            id,
            blob_len,
            crc: h.finalize(),
        }
    }

    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[..4].copy_from_slice(RECORD_MAGIC);
        h[4..24].copy_from_slice(&self.id.0);
        h[24..28].copy_from_slice(&self.blob_len.to_le_bytes());
        h[28..32].copy_from_slice(&self.crc.to_le_bytes());
        h
    }

    pub fn decode(b: &[u8]) -> Result<RecordHeader, FormatError> {
        if b.len() < RECORD_HEADER_LEN {
            return Err(FormatError::Truncated {
                what: "record header",
                len: b.len(),
            });
        }
        if &b[..4] != RECORD_MAGIC {
            return Err(FormatError::BadMagic {
                what: "record header",
            });
        }
        let mut id = [0u8; 20];
        id.copy_from_slice(&b[4..24]);
        Ok(RecordHeader {
            id: ChunkId(id),
            blob_len: u32::from_le_bytes([b[24], b[25], b[26], b[27]]),
            crc: u32::from_le_bytes([b[28], b[29], b[30], b[31]]),
        })
    }

    /// Whether `blob` (the bytes after the header) matches the stored CRC.
    pub fn crc_matches(&self, blob: &[u8]) -> bool {
        let mut h = crc32fast::Hasher::new();
        h.update(RECORD_MAGIC);
        h.update(&self.id.0);
        h.update(&self.blob_len.to_le_bytes());
        h.update(blob);
        h.finalize() == self.crc
    }

    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + self.blob_len as u64
    }
}

// ---------------------------------------------------------------- index values

/// Version 2: varints, about 15 bytes for a chunk with one owner against
/// version 1's 47. Version 1 is still read.
pub const CHUNK_ENTRY_VERSION: u8 = 2;

/// Value of the `chunks` table (key: the 20-byte chunk id).
///
/// ```text
/// 0 version | 1..9 pack u64 | 9..17 offset u64 | 17..21 record_len u32
/// 21..25 raw_len u32 | 25..33 dead_since u64 | 33..35 owner count u16
/// then per owner: owner u32, count u64
/// ```
///
/// `dead_since` is 0 while any owner holds the chunk; otherwise the commit
/// sequence at which it lost its last reference (or was written unreferenced).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkEntry {
    pub pack: PackId,
    pub offset: u64,
    /// Bytes the record takes in the pack, header included.
    pub record_len: u32,
    pub raw_len: u32,
    pub dead_since: u64,
    pub owners: Vec<(OwnerId, u64)>,
}

impl ChunkEntry {
    pub fn is_live(&self) -> bool {
        !self.owners.is_empty()
    }

    pub fn total_refs(&self) -> u64 {
        self.owners.iter().map(|(_, c)| *c).sum()
    }

    pub fn refs_of(&self, owner: OwnerId) -> u64 {
        self.owners
            .iter()
            .find(|(o, _)| *o == owner)
            .map(|(_, c)| *c)
            .unwrap_or(0)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + 4 * self.owners.len());
        v.push(CHUNK_ENTRY_VERSION);
        for x in [
            self.pack.0,
            self.offset,
            u64::from(self.record_len),
            u64::from(self.raw_len),
            self.dead_since,
            self.owners.len() as u64,
        ] {
            put_varint(&mut v, x);
        }
        for (o, c) in &self.owners {
            put_varint(&mut v, u64::from(o.0));
            put_varint(&mut v, *c);
        }
        v
    }

    /// The version 1 layout, for tests that stand in for older stores.
    #[cfg(test)]
    pub fn encode_v1(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(35 + 12 * self.owners.len());
        v.push(1);
        v.extend_from_slice(&self.pack.0.to_le_bytes());
        v.extend_from_slice(&self.offset.to_le_bytes());
        v.extend_from_slice(&self.record_len.to_le_bytes());
        v.extend_from_slice(&self.raw_len.to_le_bytes());
        v.extend_from_slice(&self.dead_since.to_le_bytes());
        v.extend_from_slice(&(self.owners.len() as u16).to_le_bytes());
        for (o, c) in &self.owners {
            v.extend_from_slice(&o.0.to_le_bytes());
            v.extend_from_slice(&c.to_le_bytes());
        }
        v
    }

    pub fn decode(b: &[u8]) -> Result<ChunkEntry, FormatError> {
        let mut r = Reader::new(b, "chunk entry");
        let e = match r.u8()? {
            1 => {
                let pack = PackId(r.u64()?);
                let offset = r.u64()?;
                let record_len = r.u32()?;
                let raw_len = r.u32()?;
                let dead_since = r.u64()?;
                let n = r.u16()? as usize;
                let mut owners = Vec::with_capacity(n);
                for _ in 0..n {
                    owners.push((OwnerId(r.u32()?), r.u64()?));
                }
                ChunkEntry {
                    pack,
                    offset,
                    record_len,
                    raw_len,
                    dead_since,
                    owners,
                }
            }
            2 => {
                let pack = PackId(r.varint()?);
                let offset = r.varint()?;
                let record_len = r.varint_u32()?;
                let raw_len = r.varint_u32()?;
                let dead_since = r.varint()?;
                let n = r.varint()?;
                // Each owner takes at least two bytes: a count past what
                // is left is damage, not a reason to allocate.
                if n > r.b.len() as u64 / 2 {
                    return Err(FormatError::Malformed {
                        what: "chunk entry",
                        why: format!("{n} owners in {} bytes", r.b.len()),
                    });
                }
                let mut owners = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    owners.push((OwnerId(r.varint_u32()?), r.varint()?));
                }
                ChunkEntry {
                    pack,
                    offset,
                    record_len,
                    raw_len,
                    dead_since,
                    owners,
                }
            }
            version => {
                return Err(FormatError::UnknownVersion {
                    what: "chunk entry",
                    found: version as u32,
                    supported: CHUNK_ENTRY_VERSION as u32,
                });
            }
        };
        r.finish()?;
        Ok(e)
    }
}

/// Value of the `packs` table (key: pack id).
///
/// ```text
/// 0 version | 1..9 committed_len u64 | 9..17 dead_bytes u64 | 17 sealed u8
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PackEntry {
    /// Bytes of the pack file that the index vouches for; anything past this
    /// is a torn or uncommitted tail.
    pub committed_len: u64,
    /// Bytes of records in this pack that no live entry needs.
    pub dead_bytes: u64,
    /// No more appends will happen to this pack.
    pub sealed: bool,
}

impl PackEntry {
    pub fn encode(&self) -> [u8; 18] {
        let mut v = [0u8; 18];
        v[0] = 1;
        v[1..9].copy_from_slice(&self.committed_len.to_le_bytes());
        v[9..17].copy_from_slice(&self.dead_bytes.to_le_bytes());
        v[17] = self.sealed as u8;
        v
    }

    pub fn decode(b: &[u8]) -> Result<PackEntry, FormatError> {
        let mut r = Reader::new(b, "pack entry");
        let version = r.u8()?;
        if version != 1 {
            return Err(FormatError::UnknownVersion {
                what: "pack entry",
                found: version as u32,
                supported: 1,
            });
        }
        let e = PackEntry {
            committed_len: r.u64()?,
            dead_bytes: r.u64()?,
            sealed: r.u8()? != 0,
        };
        r.finish()?;
        Ok(e)
    }

    pub fn dead_fraction(&self) -> f64 {
        let body = self.committed_len.saturating_sub(PACK_HEADER_LEN as u64);
        if body == 0 {
            0.0
        } else {
            self.dead_bytes as f64 / body as f64
        }
    }
}

/// A chunk as a stream refers to it: its name and plaintext length; or a
/// hole (`ChunkId::HOLE`): that many zero bytes, no chunk behind them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

impl ChunkRef {
    pub fn hole(len: u32) -> ChunkRef {
        ChunkRef {
            id: ChunkId::HOLE,
            len,
        }
    }

    pub fn is_hole(&self) -> bool {
        self.id == ChunkId::HOLE
    }
}

/// A set of chunk ids. FxHash, not SipHash: a commit of an 8 GiB file
/// builds sets of its 500,000 chunks, and SipHash was two thirds of that
/// commit's time. The ids are SHA-1 of content, so no one picks them to
/// collide cheaply.
pub type ChunkIdSet = rustc_hash::FxHashSet<ChunkId>;

/// The chunks a list refers to, in order: every entry but its holes. Every
/// reference count and every fetch goes through this.
pub fn chunk_ids(list: &[ChunkRef]) -> impl Iterator<Item = ChunkId> + '_ {
    list.iter().filter(|c| !c.is_hole()).map(|c| c.id)
}

/// Version 1: chunks only. Version 2: may hold holes. A list is written at
/// 1 unless it holds a hole, so a binary that predates holes refuses only
/// the lists it would misread.
pub const CHUNK_LIST_VERSION: u8 = 1;
pub const CHUNK_LIST_VERSION_HOLES: u8 = 2;

/// A chunk list (an object's or a file's content): version byte, then
/// 24 bytes per chunk (20-byte id, u32 LE length).
pub fn encode_chunk_list(chunks: &[ChunkRef]) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + 24 * chunks.len());
    v.push(if chunks.iter().any(ChunkRef::is_hole) {
        CHUNK_LIST_VERSION_HOLES
    } else {
        CHUNK_LIST_VERSION
    });
    for c in chunks {
        v.extend_from_slice(&c.id.0);
        v.extend_from_slice(&c.len.to_le_bytes());
    }
    v
}

pub fn decode_chunk_list(b: &[u8]) -> Result<Vec<ChunkRef>, FormatError> {
    let Some((&version, rest)) = b.split_first() else {
        return Err(FormatError::Truncated {
            what: "chunk list",
            len: 0,
        });
    };
    if version != CHUNK_LIST_VERSION && version != CHUNK_LIST_VERSION_HOLES {
        return Err(FormatError::UnknownVersion {
            what: "chunk list",
            found: version as u32,
            supported: CHUNK_LIST_VERSION_HOLES as u32,
        });
    }
    if rest.len() % 24 != 0 {
        return Err(FormatError::Truncated {
            what: "chunk list",
            len: b.len(),
        });
    }
    let list: Vec<ChunkRef> = rest
        .chunks_exact(24)
        .map(|c| {
            let mut id = [0u8; 20];
            id.copy_from_slice(&c[..20]);
            ChunkRef {
                id: ChunkId(id),
                len: u32::from_le_bytes([c[20], c[21], c[22], c[23]]),
            }
        })
        .collect();
    if version == CHUNK_LIST_VERSION && list.iter().any(ChunkRef::is_hole) {
        return Err(FormatError::Malformed {
            what: "chunk list",
            why: "a hole in a version 1 list".into(),
        });
    }
    Ok(list)
}

/// Version 2 of the `objects` table's value. Version 1 was the object's whole
/// chunk list; its first byte (1) tells the two apart while an old store is
/// migrated.
pub const OBJECT_REC_VERSION: u8 = 2;

/// A named object: where its chunk list is (segments `(id, 0..segments)` of
/// the `object_segments` table) and what it adds up to, so listing objects
/// reads no chunk lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectRec {
    pub id: ObjectId,
    pub size: u64,
    pub chunks: u64,
    pub segments: u32,
}

impl ObjectRec {
    /// version u8 | id u64 | size u64 | chunks u64 | segments u32.
    pub fn encode(&self) -> [u8; 29] {
        let mut b = [0u8; 29];
        b[0] = OBJECT_REC_VERSION;
        b[1..9].copy_from_slice(&self.id.0.to_le_bytes());
        b[9..17].copy_from_slice(&self.size.to_le_bytes());
        b[17..25].copy_from_slice(&self.chunks.to_le_bytes());
        b[25..29].copy_from_slice(&self.segments.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<ObjectRec, FormatError> {
        let mut r = Reader::new(b, "object record");
        let version = r.u8()?;
        if version != OBJECT_REC_VERSION {
            return Err(FormatError::UnknownVersion {
                what: "object record",
                found: version as u32,
                supported: OBJECT_REC_VERSION as u32,
            });
        }
        let rec = ObjectRec {
            id: ObjectId(r.u64()?),
            size: r.u64()?,
            chunks: r.u64()?,
            segments: r.u32()?,
        };
        r.finish()?;
        Ok(rec)
    }
}

pub const PENDING_REC_VERSION: u8 = 1;

/// An object whose segments are committed but which no name shows: one
/// being written in parts, or one removed or replaced whose references are
/// being released. It holds its segments' references until they are freed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingRec {
    pub owner: OwnerId,
    /// The name it was written or known under, for messages.
    pub name: String,
}

impl PendingRec {
    /// version u8 | owner u32 | name (UTF-8, the rest of the value).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(5 + self.name.len());
        v.push(PENDING_REC_VERSION);
        v.extend_from_slice(&self.owner.0.to_le_bytes());
        v.extend_from_slice(self.name.as_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<PendingRec, FormatError> {
        let mut r = Reader::new(b, "pending object record");
        let version = r.u8()?;
        if version != PENDING_REC_VERSION {
            return Err(FormatError::UnknownVersion {
                what: "pending object record",
                found: version as u32,
                supported: PENDING_REC_VERSION as u32,
            });
        }
        let owner = OwnerId(r.u32()?);
        let name = String::from_utf8_lossy(r.b).into_owned();
        Ok(PendingRec { owner, name })
    }
}

/// The ref deltas of the last index commit that carried any, kept so that a
/// crash between the index commit and the meta commit can be undone at open.
/// Version byte, then per delta: chunk id, owner u32, delta i64 (all LE).
pub fn encode_ref_deltas(deltas: &[(ChunkId, OwnerId, i64)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + 32 * deltas.len());
    v.push(1);
    for (id, o, d) in deltas {
        v.extend_from_slice(&id.0);
        v.extend_from_slice(&o.0.to_le_bytes());
        v.extend_from_slice(&d.to_le_bytes());
    }
    v
}

pub fn decode_ref_deltas(b: &[u8]) -> Result<Vec<(ChunkId, OwnerId, i64)>, FormatError> {
    let mut r = Reader::new(b, "ref deltas");
    let version = r.u8()?;
    if version != 1 {
        return Err(FormatError::UnknownVersion {
            what: "ref deltas",
            found: version as u32,
            supported: 1,
        });
    }
    let mut out = Vec::new();
    while !r.is_empty() {
        let mut id = [0u8; 20];
        id.copy_from_slice(r.take(20)?);
        let owner = OwnerId(r.u32()?);
        let delta = r.u64()? as i64;
        out.push((ChunkId(id), owner, delta));
    }
    Ok(out)
}

// ---------------------------------------------------------------- fs records

/// `died` of a record no generation has replaced yet.
pub const LIVE: u64 = u64::MAX;

/// What an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
    CharDev = 5,
    BlockDev = 6,
    Socket = 7,
}

impl Kind {
    pub fn from_code(c: u8) -> Result<Kind, FormatError> {
        Ok(match c {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::CharDev,
            6 => Kind::BlockDev,
            7 => Kind::Socket,
            _ => {
                return Err(FormatError::Malformed {
                    what: "inode",
                    why: format!("unknown kind {c}"),
                });
            }
        })
    }

    /// The S_IFMT bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            Kind::File => 0o100000,
            Kind::Dir => 0o040000,
            Kind::Symlink => 0o120000,
            Kind::Fifo => 0o010000,
            Kind::CharDev => 0o020000,
            Kind::BlockDev => 0o060000,
            Kind::Socket => 0o140000,
        }
    }

    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & 0o170000 {
            0o100000 | 0 => Kind::File,
            0o040000 => Kind::Dir,
            0o120000 => Kind::Symlink,
            0o010000 => Kind::Fifo,
            0o020000 => Kind::CharDev,
            0o060000 => Kind::BlockDev,
            0o140000 => Kind::Socket,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Timespec {
    pub secs: i64,
    pub nanos: u32,
}

impl Timespec {
    pub fn now() -> Timespec {
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Timespec {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            },
            Err(_) => Timespec::default(),
        }
    }
}

/// Where a file's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// No bytes (a directory, a device, an empty file).
    Empty,
    /// Small file content or a symlink target, in the inode record itself.
    Inline(Vec<u8>),
    /// A chunk list in the `contents` table.
    Chunked,
}

pub const INODE_REC_VERSION: u8 = 4;

/// Value of the `inodes` table (key: ino, born generation). Version 4,
/// written since meta format 3: varints (LEB128) and times as offsets
/// from mtime, about half the bytes of version 3 on a real tree.
///
/// ```text
/// version u8 (4) | died+1 varint (LIVE wraps to 0) | kind u8
/// perm, uid, gid, nlink, rdev: varint each | size varint
/// mtime: zigzag(secs) varint, nanos varint
/// atime, ctime, btime: zigzag(secs - mtime secs) varint, nanos varint each
/// content tag u8 (0 empty, 1 inline, 2 chunked, 3 chunked with holes)
///   inline: len varint + bytes | holes: varint
/// parent varint | name len varint + bytes
/// crc u32 LE (CRC-32 of every byte before it)
/// ```
///
/// Older versions, still read (meta format 3 rewrites them on open):
///
/// ```text
/// version u8 | died u64 | kind u8 | perm u32 | uid u32 | gid u32 | nlink u32
/// rdev u32 | size u64 | atime, mtime, ctime, btime (i64 secs, u32 nanos each)
/// content tag u8 (0 empty, 1 inline, 2 chunked, 3 holes) | inline: len u32 +
/// bytes | holes: u64
/// v2: parent u64 | name len u16 + bytes
/// v3: crc u32 (CRC-32 of every byte before it)
/// ```
///
/// Version 1 records (no link) decode with parent 0 and an empty name;
/// version 2 records (no checksum) decode as they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeRec {
    pub died: u64,
    pub kind: Kind,
    /// Permission bits including set-id and sticky (mode & 0o7777).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u32,
    pub size: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub btime: Timespec,
    pub content: Content,
    /// How many bytes of a chunked file's list are holes (st_blocks leaves
    /// them out); 0 for other content.
    pub holes: u64,
    /// The directory and name this inode was last linked under: exact for
    /// directories (one name each), a hint for hard-linked files. Lets
    /// `..`, diff and restore name an inode without scanning directories.
    pub parent: u64,
    pub name: Vec<u8>,
}

impl InodeRec {
    /// A live inode made at `now` under (`parent`, `name`): no content,
    /// one link (two for a directory), every time `now`.
    #[allow(clippy::too_many_arguments)]
    pub fn new_live(
        kind: Kind,
        perm: u32,
        uid: u32,
        gid: u32,
        now: Timespec,
        parent: u64,
        name: &[u8],
    ) -> InodeRec {
        InodeRec {
            died: LIVE,
            kind,
            perm,
            uid,
            gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            rdev: 0,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            btime: now,
            content: Content::Empty,
            holes: 0,
            parent,
            name: name.to_vec(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(48 + self.name.len());
        v.push(INODE_REC_VERSION);
        put_died(&mut v, self.died);
        v.push(self.kind as u8);
        for x in [self.perm, self.uid, self.gid, self.nlink, self.rdev] {
            put_varint(&mut v, u64::from(x));
        }
        put_varint(&mut v, self.size);
        let m = self.mtime;
        put_varint(&mut v, zigzag(m.secs));
        put_varint(&mut v, u64::from(m.nanos));
        for t in [self.atime, self.ctime, self.btime] {
            put_varint(&mut v, zigzag(t.secs.wrapping_sub(m.secs)));
            put_varint(&mut v, u64::from(t.nanos));
        }
        match &self.content {
            Content::Empty => v.push(0),
            Content::Inline(b) => {
                v.push(1);
                put_varint(&mut v, b.len() as u64);
                v.extend_from_slice(b);
            }
            Content::Chunked if self.holes == 0 => v.push(2),
            Content::Chunked => {
                v.push(3);
                put_varint(&mut v, self.holes);
            }
        }
        put_varint(&mut v, self.parent);
        put_varint(&mut v, self.name.len() as u64);
        v.extend_from_slice(&self.name);
        let crc = crc32fast::hash(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// The version 3 layout, for tests that stand in for older stores.
    #[cfg(test)]
    pub fn encode_v3(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(96);
        v.push(3);
        v.extend_from_slice(&self.died.to_le_bytes());
        v.push(self.kind as u8);
        for x in [self.perm, self.uid, self.gid, self.nlink, self.rdev] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.extend_from_slice(&self.size.to_le_bytes());
        for t in [self.atime, self.mtime, self.ctime, self.btime] {
            v.extend_from_slice(&t.secs.to_le_bytes());
            v.extend_from_slice(&t.nanos.to_le_bytes());
        }
        match &self.content {
            Content::Empty => v.push(0),
            Content::Inline(b) => {
                v.push(1);
                v.extend_from_slice(&(b.len() as u32).to_le_bytes());
                v.extend_from_slice(b);
            }
            Content::Chunked if self.holes == 0 => v.push(2),
            Content::Chunked => {
                v.push(3);
                v.extend_from_slice(&self.holes.to_le_bytes());
            }
        }
        v.extend_from_slice(&self.parent.to_le_bytes());
        v.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        v.extend_from_slice(&self.name);
        let crc = crc32fast::hash(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<InodeRec, FormatError> {
        // Versions 3 and 4 end in a CRC-32 of everything before it: redb
        // checks its page checksums only when asked, so a damaged page that
        // still parsed served a small file's inline bytes wrong.
        let b = if matches!(b.first(), Some(&3) | Some(&4)) {
            let Some((body, crc)) = b.split_last_chunk::<4>() else {
                return Err(FormatError::Truncated {
                    what: "inode",
                    len: b.len(),
                });
            };
            if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
                return Err(FormatError::Malformed {
                    what: "inode",
                    why: "record checksum mismatch (damaged metadata)".into(),
                });
            }
            body
        } else {
            b
        };
        if b.first() == Some(&4) {
            return InodeRec::decode_v4(&b[1..]);
        }
        let mut r = Reader::new(b, "inode");
        let version = r.u8()?;
        if !(1..=3).contains(&version) {
            return Err(FormatError::UnknownVersion {
                what: "inode",
                found: version as u32,
                supported: INODE_REC_VERSION as u32,
            });
        }
        let died = r.u64()?;
        let kind = Kind::from_code(r.u8()?)?;
        let perm = r.u32()?;
        let uid = r.u32()?;
        let gid = r.u32()?;
        let nlink = r.u32()?;
        let rdev = r.u32()?;
        let size = r.u64()?;
        let mut ts = [Timespec::default(); 4];
        for t in &mut ts {
            t.secs = r.u64()? as i64;
            t.nanos = r.u32()?;
        }
        let (content, holes) = read_content(&mut r, false)?;
        let (parent, name) = if version >= 2 {
            let p = r.u64()?;
            let n = r.u16()? as usize;
            (p, r.take(n)?.to_vec())
        } else {
            (0, Vec::new())
        };
        r.finish()?;
        Ok(InodeRec {
            died,
            kind,
            perm,
            uid,
            gid,
            nlink,
            rdev,
            size,
            atime: ts[0],
            mtime: ts[1],
            ctime: ts[2],
            btime: ts[3],
            content,
            holes,
            parent,
            name,
        })
    }

    /// The body of a version 4 record: after the version byte, before
    /// the checksum.
    fn decode_v4(b: &[u8]) -> Result<InodeRec, FormatError> {
        let mut r = Reader::new(b, "inode");
        let died = read_died(&mut r)?;
        let kind = Kind::from_code(r.u8()?)?;
        let perm = r.varint_u32()?;
        let uid = r.varint_u32()?;
        let gid = r.varint_u32()?;
        let nlink = r.varint_u32()?;
        let rdev = r.varint_u32()?;
        let size = r.varint()?;
        let mtime = Timespec {
            secs: unzigzag(r.varint()?),
            nanos: r.varint_u32()?,
        };
        let mut ts = [Timespec::default(); 3];
        for t in &mut ts {
            t.secs = mtime.secs.wrapping_add(unzigzag(r.varint()?));
            t.nanos = r.varint_u32()?;
        }
        let (content, holes) = read_content(&mut r, true)?;
        let parent = r.varint()?;
        let n = usize::try_from(r.varint()?).unwrap_or(usize::MAX);
        let name = r.take(n)?.to_vec();
        r.finish()?;
        Ok(InodeRec {
            died,
            kind,
            perm,
            uid,
            gid,
            nlink,
            rdev,
            size,
            atime: ts[0],
            mtime,
            ctime: ts[1],
            btime: ts[2],
            content,
            holes,
            parent,
            name,
        })
    }
}

/// An inode record's content tag and what follows it: (content, holes).
/// Version 4 writes the inline length and the hole bytes as varints,
/// older versions as u32 and u64.
fn read_content(r: &mut Reader, varints: bool) -> Result<(Content, u64), FormatError> {
    let num = |r: &mut Reader, fixed: fn(&mut Reader) -> Result<u64, FormatError>| {
        if varints { r.varint() } else { fixed(r) }
    };
    Ok(match r.u8()? {
        0 => (Content::Empty, 0),
        1 => {
            let n = num(r, |r| r.u32().map(u64::from))?;
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            (Content::Inline(r.take(n)?.to_vec()), 0)
        }
        2 => (Content::Chunked, 0),
        3 => (Content::Chunked, num(r, |r| r.u64())?),
        c => {
            return Err(FormatError::Malformed {
                what: "inode",
                why: format!("unknown content tag {c}"),
            });
        }
    })
}

/// Value of the `dirents` table (key: parent ino, name, born generation).
/// Version 2 (meta format 3): version u8 (2) | died+1 varint | ino varint |
/// kind u8. Version 1: version u8 | died u64 | ino u64 | kind u8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirentVal {
    pub died: u64,
    pub ino: u64,
    pub kind: Kind,
}

impl DirentVal {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8);
        v.push(2);
        put_died(&mut v, self.died);
        put_varint(&mut v, self.ino);
        v.push(self.kind as u8);
        v
    }

    /// The version 1 layout, for tests that stand in for older stores.
    #[cfg(test)]
    pub fn encode_v1(&self) -> [u8; 18] {
        let mut v = [0u8; 18];
        v[0] = 1;
        v[1..9].copy_from_slice(&self.died.to_le_bytes());
        v[9..17].copy_from_slice(&self.ino.to_le_bytes());
        v[17] = self.kind as u8;
        v
    }

    pub fn decode(b: &[u8]) -> Result<DirentVal, FormatError> {
        let mut r = Reader::new(b, "dirent");
        let d = match r.u8()? {
            1 => DirentVal {
                died: r.u64()?,
                ino: r.u64()?,
                kind: Kind::from_code(r.u8()?)?,
            },
            2 => DirentVal {
                died: read_died(&mut r)?,
                ino: r.varint()?,
                kind: Kind::from_code(r.u8()?)?,
            },
            version => {
                return Err(FormatError::UnknownVersion {
                    what: "dirent",
                    found: version as u32,
                    supported: 2,
                });
            }
        };
        r.finish()?;
        Ok(d)
    }
}

/// Value of the `xattrs` and `contents` tables. Version 2 (meta format 3):
/// version u8 (2) | died+1 varint | body. Version 1: version u8 | died u64 |
/// body. For xattrs the body is the value; for contents, a chunk list.
pub fn encode_versioned(died: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(11 + body.len());
    v.push(2);
    put_died(&mut v, died);
    v.extend_from_slice(body);
    v
}

/// The version 1 layout, for tests that stand in for older stores.
#[cfg(test)]
pub fn encode_versioned_v1(died: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + body.len());
    v.push(1);
    v.extend_from_slice(&died.to_le_bytes());
    v.extend_from_slice(body);
    v
}

pub fn decode_versioned(b: &[u8]) -> Result<(u64, &[u8]), FormatError> {
    let mut r = Reader::new(b, "versioned record");
    let died = match r.u8()? {
        1 => r.u64()?,
        2 => read_died(&mut r)?,
        version => {
            return Err(FormatError::UnknownVersion {
                what: "versioned record",
                found: version as u32,
                supported: 2,
            });
        }
    };
    Ok((died, r.b))
}

/// Appends `x` as an unsigned LEB128 varint (1 byte below 128).
fn put_varint(v: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        v.push((x as u8) | 0x80);
        x >>= 7;
    }
    v.push(x as u8);
}

/// Zigzag: small negative and positive numbers both become small.
fn zigzag(x: i64) -> u64 {
    ((x << 1) ^ (x >> 63)) as u64
}

fn unzigzag(x: u64) -> i64 {
    ((x >> 1) as i64) ^ -((x & 1) as i64)
}

/// `died` as stored in version 4 records: LIVE (u64::MAX), by far the
/// most common, takes one byte.
fn put_died(v: &mut Vec<u8>, died: u64) {
    put_varint(v, died.wrapping_add(1));
}

fn read_died(r: &mut Reader) -> Result<u64, FormatError> {
    Ok(r.varint()?.wrapping_sub(1))
}

/// A little-endian cursor that turns running off the end into a typed error.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8], what: &'static str) -> Self {
        Reader { b, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.b.len() < n {
            return Err(FormatError::Truncated {
                what: self.what,
                len: self.b.len(),
            });
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// An unsigned LEB128 varint of at most 10 bytes.
    fn varint(&mut self) -> Result<u64, FormatError> {
        let mut x = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            x |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(x);
            }
        }
        Err(FormatError::Malformed {
            what: self.what,
            why: "varint longer than 10 bytes".into(),
        })
    }
    fn varint_u32(&mut self) -> Result<u32, FormatError> {
        let x = self.varint()?;
        u32::try_from(x).map_err(|_| FormatError::Malformed {
            what: self.what,
            why: format!("{x} does not fit 32 bits"),
        })
    }
    fn is_empty(&self) -> bool {
        self.b.is_empty()
    }
    fn finish(self) -> Result<(), FormatError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(FormatError::Malformed {
                what: self.what,
                why: format!("{} trailing bytes", self.b.len()),
            })
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn inode_records_carry_a_checksum_and_older_ones_still_decode() {
        let mut rec = InodeRec::new_live(Kind::File, 0o644, 1, 2, Timespec::now(), 1, b"f");
        rec.size = 5;
        rec.content = Content::Inline(b"hello".to_vec());
        let v = rec.encode_v3();
        assert_eq!(v[0], 3);
        assert_eq!(InodeRec::decode(&v).unwrap(), rec);
        // Any flipped byte is caught, inline bytes included.
        for i in 0..v.len() {
            let mut bad = v.clone();
            bad[i] ^= 0x10;
            assert!(
                InodeRec::decode(&bad).is_err(),
                "byte {i} flipped went unseen"
            );
        }
        // A version 2 record: the same bytes without the checksum.
        let mut v2 = v[..v.len() - 4].to_vec();
        v2[0] = 2;
        assert_eq!(InodeRec::decode(&v2).unwrap(), rec);
    }

    use super::*;

    #[test]
    fn version_4_inode_records_are_half_the_size_and_round_trip_at_the_edges() {
        let t = Timespec {
            secs: 1_733_000_000,
            nanos: 123_456_789,
        };
        let mut rec = InodeRec::new_live(Kind::File, 0o644, 1000, 1000, t, 4711, b"models.py");
        rec.size = 81_234;
        rec.content = Content::Chunked;
        rec.atime.secs -= 86_400;
        let v4 = rec.encode();
        assert_eq!(v4[0], 4);
        assert_eq!(InodeRec::decode(&v4).unwrap(), rec);
        assert!(
            v4.len() * 2 <= rec.encode_v3().len() + 8,
            "v4 {} bytes against v3 {}",
            v4.len(),
            rec.encode_v3().len()
        );
        for i in 0..v4.len() {
            let mut bad = v4.clone();
            bad[i] ^= 0x10;
            assert!(
                InodeRec::decode(&bad).is_err(),
                "byte {i} flipped went unseen"
            );
        }
        // Every field at its extremes.
        let far = |secs, nanos| Timespec { secs, nanos };
        let edge = InodeRec {
            died: u64::MAX - 1,
            kind: Kind::CharDev,
            perm: u32::MAX,
            uid: u32::MAX,
            gid: 0,
            nlink: u32::MAX,
            rdev: u32::MAX,
            size: u64::MAX,
            atime: far(i64::MIN, u32::MAX),
            mtime: far(i64::MAX, 0),
            ctime: far(-1, 999_999_999),
            btime: far(0, 1),
            content: Content::Chunked,
            holes: u64::MAX,
            parent: u64::MAX,
            name: vec![0xff; 300],
        };
        assert_eq!(InodeRec::decode(&edge.encode()).unwrap(), edge);
        for died in [0, 1, LIVE] {
            let r = InodeRec {
                died,
                ..edge.clone()
            };
            assert_eq!(InodeRec::decode(&r.encode()).unwrap(), r);
        }
        let mut inline = rec.clone();
        inline.content = Content::Inline(vec![7; 200]);
        assert_eq!(InodeRec::decode(&inline.encode()).unwrap(), inline);
        // Truncated anywhere: an error, never a panic.
        let v = inline.encode();
        for n in 0..v.len() {
            assert!(InodeRec::decode(&v[..n]).is_err());
        }
        for d in [
            DirentVal {
                died: LIVE,
                ino: u64::MAX,
                kind: Kind::Dir,
            },
            DirentVal {
                died: 0,
                ino: 1,
                kind: Kind::File,
            },
        ] {
            assert_eq!(DirentVal::decode(&d.encode()).unwrap(), d);
            let e = d.encode();
            for n in 0..e.len() {
                assert!(DirentVal::decode(&e[..n]).is_err());
            }
        }
    }

    #[test]
    fn chunk_entry_round_trips() {
        let e = ChunkEntry {
            pack: PackId(7),
            offset: 4096,
            record_len: 1234,
            raw_len: 16384,
            dead_since: 0,
            owners: vec![(OwnerId(1), 3), (OwnerId(9), 1)],
        };
        assert_eq!(ChunkEntry::decode(&e.encode()).unwrap(), e);
        assert_eq!(ChunkEntry::decode(&e.encode_v1()).unwrap(), e);
        assert!(e.encode().len() < 20, "{}", e.encode().len());
        let enc = e.encode();
        for n in 0..enc.len() {
            assert!(ChunkEntry::decode(&enc[..n]).is_err());
        }
        let mut bad = e.encode();
        bad[0] = 3;
        assert!(matches!(
            ChunkEntry::decode(&bad),
            Err(FormatError::UnknownVersion { found: 3, .. })
        ));
        assert!(ChunkEntry::decode(&e.encode_v1()[..20]).is_err());
    }

    #[test]
    fn record_crc_detects_damage() {
        let id = ChunkId::of(b"hello");
        let bh = BlobHeader {
            compression: Compression::None,
            sealing: Sealing::None,
            raw_len: 5,
        }
        .encode();
        let rh = RecordHeader::for_blob(id, &bh, b"hello");
        let mut blob = bh.to_vec();
        blob.extend_from_slice(b"hello");
        assert!(rh.crc_matches(&blob));
        blob[9] ^= 1;
        assert!(!rh.crc_matches(&blob));
        assert_eq!(RecordHeader::decode(&rh.encode()).unwrap(), rh);
    }

    #[test]
    fn config_rejects_unknown_version_and_foreign_files() {
        let cfg = StoreConfig::new(ChunkerParams::default(), Compression::Zstd, "ab".into());
        assert_eq!(StoreConfig::decode(&cfg.encode()).unwrap(), cfg);
        let newer = String::from_utf8(cfg.encode())
            .unwrap()
            .replace("\"version\": 1", "\"version\": 99");
        assert!(matches!(
            StoreConfig::decode(newer.as_bytes()),
            Err(FormatError::UnknownVersion { found: 99, .. })
        ));
        assert!(matches!(
            StoreConfig::decode(b"{\"format\":\"other\"}"),
            Err(FormatError::BadMagic { .. })
        ));
        assert!(StoreConfig::decode(b"not json").is_err());
    }

    #[test]
    fn inode_and_dirent_round_trip() {
        let mut rec = InodeRec {
            died: LIVE,
            kind: Kind::File,
            perm: 0o4755,
            uid: 1000,
            gid: 100,
            nlink: 2,
            rdev: 0,
            size: 5,
            atime: Timespec {
                secs: -5,
                nanos: 999_999_999,
            },
            mtime: Timespec { secs: 1, nanos: 2 },
            ctime: Timespec::now(),
            btime: Timespec::default(),
            content: Content::Inline(b"hello".to_vec()),
            holes: 0,
            parent: 9,
            name: b"n\xffame".to_vec(),
        };
        assert_eq!(InodeRec::decode(&rec.encode()).unwrap(), rec);
        rec.content = Content::Chunked;
        assert_eq!(InodeRec::decode(&rec.encode()).unwrap(), rec);
        rec.holes = 1 << 40;
        assert_eq!(InodeRec::decode(&rec.encode()).unwrap(), rec);
        rec.holes = 0;
        // A version 1 record is the v2 layout without the link (and v3
        // is v2 with a checksum after it).
        let mut v1 = rec.encode_v3();
        v1.truncate(v1.len() - 4 - 8 - 2 - rec.name.len());
        v1[0] = 1;
        let old = InodeRec::decode(&v1).unwrap();
        assert_eq!((old.parent, old.name.len()), (0, 0));
        let d = DirentVal {
            died: 7,
            ino: 42,
            kind: Kind::Symlink,
        };
        assert_eq!(DirentVal::decode(&d.encode()).unwrap(), d);
        assert_eq!(DirentVal::decode(&d.encode_v1()).unwrap(), d);
        let v = encode_versioned(9, b"xyz");
        assert_eq!(decode_versioned(&v).unwrap(), (9, &b"xyz"[..]));
        let v = encode_versioned(LIVE, b"");
        assert_eq!(decode_versioned(&v).unwrap(), (LIVE, &b""[..]));
        let v = encode_versioned_v1(9, b"xyz");
        assert_eq!(decode_versioned(&v).unwrap(), (9, &b"xyz"[..]));
        assert!(decode_versioned(&v[..5]).is_err());
    }

    #[test]
    fn hex_round_trips() {
        let id = ChunkId::of(b"x");
        assert_eq!(ChunkId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(ChunkId::from_hex("zz"), None);
    }

    #[test]
    fn chunk_list_and_deltas_round_trip() {
        let l = vec![
            ChunkRef {
                id: ChunkId::of(b"a"),
                len: 1,
            },
            ChunkRef {
                id: ChunkId::of(b"b"),
                len: 70000,
            },
        ];
        let enc = encode_chunk_list(&l);
        assert_eq!((enc[0], decode_chunk_list(&enc).unwrap()), (1, l.clone()));
        // A hole makes it version 2, and a version 1 list may hold none.
        let mut h = l.clone();
        h.insert(1, ChunkRef::hole(u32::MAX));
        let mut enc = encode_chunk_list(&h);
        assert_eq!((enc[0], decode_chunk_list(&enc).unwrap()), (2, h.clone()));
        assert_eq!(chunk_ids(&h).collect::<Vec<_>>(), [l[0].id, l[1].id]);
        enc[0] = 1;
        assert!(matches!(
            decode_chunk_list(&enc),
            Err(FormatError::Malformed { .. })
        ));
        let d = vec![(ChunkId::of(b"a"), OwnerId(1), -3i64)];
        assert_eq!(decode_ref_deltas(&encode_ref_deltas(&d)).unwrap(), d);
    }

    #[test]
    fn object_and_pending_records_round_trip() {
        let o = ObjectRec {
            id: ObjectId(42),
            size: 5 << 30,
            chunks: 327_680,
            segments: 80,
        };
        assert_eq!(ObjectRec::decode(&o.encode()).unwrap(), o);
        // A version 1 value (a bare chunk list) is not taken for a record.
        let old = encode_chunk_list(&[]);
        assert!(matches!(
            ObjectRec::decode(&old),
            Err(FormatError::UnknownVersion { found: 1, .. })
        ));
        assert!(ObjectRec::decode(&o.encode()[..20]).is_err());
        let p = PendingRec {
            owner: OwnerId(3),
            name: "big.iso".into(),
        };
        assert_eq!(PendingRec::decode(&p.encode()).unwrap(), p);
    }
}
