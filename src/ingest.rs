//! The ingest stage's own work, below any filesystem: re-chunking a
//! changed file against its old chunk list (only from the first changed
//! chunk until the cut points line up with the old ones again; holes of
//! `HOLE_MIN` and more listed, not stored), writing the new chunks into a
//! store batch, and the reference change between the old and new lists.
//! The live volume (`fs::volume::ingest`) supplies a staged file through
//! [`Changed`] and commits the result with the file's records; anything
//! else that turns changed bytes into chunks (the mirror's receiving side,
//! a restore) can use the same.
//!
//! Calls `chunker`, `store` (batches), `format`; never `fs`.

use std::io::{self, Read};

use crate::format::{self, ChunkId, ChunkRef, ChunkerParams};
use crate::store::{self, Batch};

/// A stretch of a file that reads as zeros without being stored (a hole of
/// its staging file, of its old chunk list, or past what was written) is
/// listed as a hole instead of chunked if it is at least this long. Why:
/// `truncate -s 1T` chunked and hashed a terabyte of zeros at ingest and
/// listed the zero chunk 16 million times. Shorter holes are chunked with
/// the data around them, so an ordinary file chunks the same whether its
/// zeros were written or skipped.
pub const HOLE_MIN: u64 = 1 << 20;
/// The longest hole entry (a chunk list length is a u32).
pub const HOLE_ENTRY_MAX: u64 = 1 << 31;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A file's chunk list with the offset where each chunk starts.
#[derive(Debug, Default)]
pub struct ChunkMap {
    pub chunks: Vec<ChunkRef>,
    /// `starts[i]` is chunk i's offset; one extra entry holds the total.
    pub starts: Vec<u64>,
    /// The list's holes, adjacent hole entries merged, in order.
    holes: Vec<(u64, u64)>,
    /// See [`ChunkMap::mark`]; computed on first use.
    mark: std::sync::OnceLock<BaseMark>,
}

/// Names the chunk list a staged layout was made against, so a replay (and
/// fsck) can tell whether the committed list is still that one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BaseMark {
    pub chunks: u64,
    pub len: u64,
    /// CRC-32 of the entries (id and length of each), in order.
    pub crc: u32,
}

impl BaseMark {
    pub fn of(chunks: &[ChunkRef]) -> BaseMark {
        let mut h = crc32fast::Hasher::new();
        let mut len = 0u64;
        for c in chunks {
            h.update(&c.id.0);
            h.update(&c.len.to_le_bytes());
            len += c.len as u64;
        }
        BaseMark {
            chunks: chunks.len() as u64,
            len,
            crc: h.finalize(),
        }
    }
}

impl ChunkMap {
    pub fn new(chunks: Vec<ChunkRef>) -> ChunkMap {
        let mut starts = Vec::with_capacity(chunks.len() + 1);
        let mut holes: Vec<(u64, u64)> = Vec::new();
        let mut off = 0u64;
        for c in &chunks {
            starts.push(off);
            let end = off + c.len as u64;
            if c.is_hole() {
                match holes.last_mut() {
                    Some(h) if h.1 == off => h.1 = end,
                    _ => holes.push((off, end)),
                }
            }
            off = end;
        }
        starts.push(off);
        ChunkMap {
            chunks,
            starts,
            holes,
            mark: std::sync::OnceLock::new(),
        }
    }

    /// The mark of this list (see [`BaseMark`]).
    pub fn mark(&self) -> BaseMark {
        *self.mark.get_or_init(|| BaseMark::of(&self.chunks))
    }

    /// How many bytes below `end` are holes.
    pub fn hole_bytes_below(&self, end: u64) -> u64 {
        self.holes
            .iter()
            .take_while(|h| h.0 < end)
            .map(|h| h.1.min(end) - h.0)
            .sum()
    }

    /// The first hole that ends after `off`, starting no earlier than it.
    pub fn hole_from(&self, off: u64) -> Option<(u64, u64)> {
        let i = self.holes.partition_point(|h| h.1 <= off);
        self.holes.get(i).map(|&(s, e)| (s.max(off), e))
    }

    pub fn len(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Index of the chunk holding byte `off` (None past the end).
    pub fn find(&self, off: u64) -> Option<usize> {
        if off >= self.len() {
            return None;
        }
        Some(self.starts.partition_point(|s| *s <= off) - 1)
    }

    /// Whether a chunk starts exactly at `off`.
    pub fn is_cut(&self, off: u64) -> Option<usize> {
        self.starts[..self.chunks.len()].binary_search(&off).ok()
    }
}

/// A file whose bytes changed since its chunk list `base` was made.
pub trait Changed {
    fn size(&self) -> u64;
    fn base(&self) -> &ChunkMap;
    /// The first offset whose byte may differ from the base's; None when
    /// the file is the base, whole.
    fn first_change(&self) -> Option<u64>;
    /// The end of the last changed range, if any was written.
    fn last_change_end(&self) -> Option<u64>;
    /// Whether the base's tail is still the file's tail, so re-chunking
    /// may stop at a base cut point past the last change.
    fn tail_intact(&self) -> bool;
    /// The first hole of at least `min` bytes in [from, end).
    fn first_hole(&self, from: u64, end: u64, min: u64) -> io::Result<Option<(u64, u64)>>;
    /// The file's bytes at `off`, exactly `out.len()` of them.
    fn read_at(&self, off: u64, out: &mut [u8]) -> io::Result<()>;
}

/// The file's new chunk list: the base's chunks before the first change,
/// new chunks (written into `batch`) from the chunk holding it until a
/// cut lines up with the base's past the last change, then the base's.
pub fn rechunk(
    src: &impl Changed,
    chunker: ChunkerParams,
    batch: &mut Batch<'_>,
) -> Result<Vec<ChunkRef>, Error> {
    let base = src.base();
    let size = src.size();
    let Some(first) = src.first_change() else {
        return Ok(base.chunks.clone());
    };
    // Start at the chunk holding the first change; a change at or past
    // the end re-cuts the last chunk, whose end was only the file's end.
    let i0 = base
        .find(first)
        .unwrap_or(base.chunks.len().saturating_sub(1));
    let start = base.starts.get(i0).copied().unwrap_or(0);
    let mut list: Vec<ChunkRef> = base.chunks[..i0].to_vec();
    let last_dirty = src.last_change_end().unwrap_or(first);
    let tail_ok = src.tail_intact();
    // Where the base's own cut points take over again.
    let resynced = |pos: u64| {
        if tail_ok && pos > last_dirty {
            base.is_cut(pos)
        } else {
            None
        }
    };
    let mut pos = start;
    let mut suffix: Option<usize> = None;
    // Data runs are chunked; holes of HOLE_MIN and more are listed as
    // holes, neither read, hashed nor stored.
    while pos < size && suffix.is_none() {
        let hole = if size - pos >= HOLE_MIN {
            src.first_hole(pos, size, HOLE_MIN)?
        } else {
            None
        };
        let data_end = hole.map_or(size, |h| h.0);
        let reader = Merged {
            src,
            pos,
            end: data_end,
        };
        let res = crate::chunker::chunk_stream(chunker, reader, |data| -> Result<(), Stop> {
            list.push(batch.put_chunk(data).map_err(Stop::Store)?);
            pos += data.len() as u64;
            suffix = resynced(pos);
            match suffix {
                Some(_) => Err(Stop::Resynced),
                None => Ok(()),
            }
        });
        match res {
            Ok(_) | Err(Stop::Resynced) => {}
            Err(Stop::Store(e)) => return Err(e.into()),
            Err(Stop::Io(e)) => return Err(e.into()),
        }
        let Some((_, hole_end)) = hole else { break };
        while pos < hole_end && suffix.is_none() {
            // Entries end at multiples of HOLE_ENTRY_MAX, so the same
            // hole lists the same way wherever its re-chunk started.
            let e = ((pos / HOLE_ENTRY_MAX + 1) * HOLE_ENTRY_MAX).min(hole_end);
            list.push(ChunkRef::hole((e - pos) as u32));
            pos = e;
            suffix = resynced(pos);
        }
    }
    if let Some(j) = suffix {
        list.extend_from_slice(&base.chunks[j..]);
    }
    Ok(list)
}

/// Why chunking stopped early.
enum Stop {
    Store(store::Error),
    Io(io::Error),
    /// The cut points line up with the base's again.
    Resynced,
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop::Io(e)
    }
}

/// Reads a changed file's bytes in [pos, end).
struct Merged<'a, C> {
    src: &'a C,
    pos: u64,
    end: u64,
}

impl<C: Changed> Read for Merged<'_, C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let end = (self.pos + buf.len() as u64).min(self.end);
        if self.pos >= end {
            return Ok(0);
        }
        let n = (end - self.pos) as usize;
        self.src.read_at(self.pos, &mut buf[..n])?;
        self.pos = end;
        Ok(n)
    }
}

/// The reference change of replacing `old` by `new` when they are a file's
/// only versions (one reference per distinct chunk): the chunks of `new`
/// that `old` lacks gain one, those of `old` that `new` lacks lose one.
/// Only the middles between their common prefix and suffix can differ;
/// None when those are long (a rewrite: the sets cost the same then).
pub fn list_ref_change(old: &[ChunkRef], new: &[ChunkRef]) -> Option<(Vec<ChunkId>, Vec<ChunkId>)> {
    const MIDDLE_MAX: usize = 4096;
    let p = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let s = old[p..]
        .iter()
        .rev()
        .zip(new[p..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let (om, nm) = (&old[p..old.len() - s], &new[p..new.len() - s]);
    if om.len() + nm.len() > MIDDLE_MAX {
        return None;
    }
    let om: format::ChunkIdSet = format::chunk_ids(om).collect();
    let nm: format::ChunkIdSet = format::chunk_ids(nm).collect();
    let mut add: format::ChunkIdSet = nm.difference(&om).copied().collect();
    let mut drop: format::ChunkIdSet = om.difference(&nm).copied().collect();
    if !add.is_empty() || !drop.is_empty() {
        // The shared prefix and suffix are in both versions.
        for id in format::chunk_ids(&old[..p]).chain(format::chunk_ids(&old[old.len() - s..])) {
            add.remove(&id);
            drop.remove(&id);
        }
    }
    Some((add.into_iter().collect(), drop.into_iter().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The middle diff gives what diffing the two lists' sets gives,
        /// for edits anywhere, chunks repeated within a list, and holes.
        #[test]
        fn list_ref_change_matches_set_diff(
            old in proptest::collection::vec(0u8..12, 0..40),
            at in 0usize..40,
            cut in 0usize..8,
            ins in proptest::collection::vec(0u8..12, 0..8),
        ) {
            // Id 0 stands for a hole.
            let r = |b: &u8| if *b == 0 {
                ChunkRef::hole(7)
            } else {
                ChunkRef { id: ChunkId::of(&[*b]), len: 1 }
            };
            let old: Vec<ChunkRef> = old.iter().map(r).collect();
            let at = at.min(old.len());
            let end = (at + cut).min(old.len());
            let mut new = old[..at].to_vec();
            new.extend(ins.iter().map(r));
            new.extend_from_slice(&old[end..]);
            let set = |l: &[ChunkRef]| -> format::ChunkIdSet { format::chunk_ids(l).collect() };
            let (before, after) = (set(&old), set(&new));
            let mut want_add: Vec<ChunkId> = after.difference(&before).copied().collect();
            let mut want_drop: Vec<ChunkId> = before.difference(&after).copied().collect();
            let (mut add, mut drop) = list_ref_change(&old, &new).unwrap();
            for v in [&mut want_add, &mut want_drop, &mut add, &mut drop] {
                v.sort();
            }
            proptest::prop_assert_eq!(add, want_add);
            proptest::prop_assert_eq!(drop, want_drop);
        }
    }
}
