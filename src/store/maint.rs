//! Store maintenance: gc (pack compaction), verification, and rebuilding the
//! index from the packs. Each works on packs in offset order, so the cost is
//! one sequential pass over what it touches.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::pack::{self, PackWriter};
use super::{
    CHUNKS, Counters, Error, INDEX_FILE, INDEX_FORMAT_VERSION, PACKS, Result, STATE, Store, UNDO,
    adjust_pack,
};
use crate::Progress;
use crate::format::{ChunkEntry, ChunkId, OwnerId, PACK_HEADER_LEN, PackEntry, PackId};

fn decode_entry(v: &[u8]) -> Result<ChunkEntry> {
    ChunkEntry::decode(v).map_err(|e| Error::Db(e.to_string()))
}

fn all_packs(store: &Store) -> Result<Vec<(PackId, PackEntry)>> {
    let rt = store.db.begin_read()?;
    let t = rt.open_table(PACKS)?;
    let mut out = Vec::new();
    for row in t.iter()? {
        let (k, v) = row?;
        out.push((
            PackId(k.value()),
            PackEntry::decode(v.value()).map_err(|e| Error::Db(e.to_string()))?,
        ));
    }
    Ok(out)
}

/// Removes index entries for records a shortened or missing pack no longer
/// holds, so nothing in the index points past a pack's end.
pub(super) fn forget_lost_records(store: &Store, shortened: &[(PackId, u64)]) -> Result<()> {
    let limits: HashMap<PackId, u64> = shortened.iter().copied().collect();
    let tx = store.db.begin_write()?;
    {
        let mut chunks = tx.open_table(CHUNKS)?;
        let mut st = tx.open_table(STATE)?;
        let mut counters = Counters::load(&st)?;
        let mut lost = Vec::new();
        for row in chunks.iter()? {
            let (k, v) = row?;
            let e = decode_entry(v.value())?;
            if let Some(&end) = limits.get(&e.pack)
                && e.offset + e.record_len as u64 > end
            {
                lost.push((ChunkId(*k.value()), e));
            }
        }
        for (id, e) in &lost {
            if e.is_live() {
                log::error!("chunk {id} (referenced) was in the lost part of {}", e.pack);
                counters.live_chunks -= 1;
                counters.live_raw_bytes -= e.raw_len as u64;
                counters.live_stored_bytes -= e.record_len as u64;
                counters.logical_bytes = counters
                    .logical_bytes
                    .saturating_sub(e.raw_len as u64 * e.total_refs());
            }
            counters.total_chunks -= 1;
            chunks.remove(&id.0)?;
        }
        let mut packs = tx.open_table(PACKS)?;
        for (id, end) in shortened {
            if *end < PACK_HEADER_LEN as u64 {
                packs.remove(id.0)?;
                continue;
            }
            // What is left past the last whole record is dead weight.
            adjust_pack(&mut packs, *id, |p| {
                p.committed_len = *end;
                p.sealed = true;
            })?;
        }
        counters.save(&mut st)?;
    }
    tx.commit()?;
    recount_pack_dead_bytes(store)?;
    Ok(())
}

/// Sets every pack's dead bytes to its body minus its live records: the
/// definition the incremental accounting maintains.
fn recount_pack_dead_bytes(store: &Store) -> Result<()> {
    let tx = store.db.begin_write()?;
    {
        let chunks = tx.open_table(CHUNKS)?;
        let mut live: HashMap<PackId, u64> = HashMap::new();
        for row in chunks.iter()? {
            let (_, v) = row?;
            let e = decode_entry(v.value())?;
            if e.is_live() {
                *live.entry(e.pack).or_default() += e.record_len as u64;
            }
        }
        let mut packs = tx.open_table(PACKS)?;
        let ids: Vec<u64> = packs
            .iter()?
            .map(|r| r.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        for id in ids {
            let l = live.get(&PackId(id)).copied().unwrap_or(0);
            adjust_pack(&mut packs, PackId(id), |p| {
                p.dead_bytes = p
                    .committed_len
                    .saturating_sub(PACK_HEADER_LEN as u64)
                    .saturating_sub(l);
            })?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// For one old pack: the records copied (id, new pack, new offset) and the
/// dead ones left behind.
type CompactionPlan = (PackId, Vec<(ChunkId, PackId, u64)>, Vec<ChunkId>);

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    pub packs_compacted: u64,
    pub chunks_moved: u64,
    pub chunks_dropped: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Packs left for a later round: too little free space to copy their
    /// live records first (their dead records are punched out instead).
    #[serde(default)]
    pub packs_skipped_for_space: u64,
    /// Bytes of dead records punched out of packs that could not be
    /// compacted for want of space.
    #[serde(default)]
    pub bytes_punched: u64,
    /// Bytes the databases gave back by compaction (`dedupfs gc`: both
    /// offline, meta.redb alone on a mounted store).
    #[serde(default)]
    pub db_bytes_freed: u64,
}

/// Compacts every idle pack whose dead fraction is at least `threshold`
/// (see [`gc_with`]), leaving `GC_FREE_FLOOR` bytes free.
pub fn gc(store: &Store, threshold: f64, progress: &dyn Progress) -> Result<GcReport> {
    gc_with(
        store,
        &GcOptions {
            threshold,
            free_floor: GC_FREE_FLOOR,
            max_packs: usize::MAX,
        },
        progress,
    )
}

/// What gc leaves free on the store's filesystem: it may dip into the
/// reserve the filesystem keeps for its own commits, since every round
/// ends by freeing more than it wrote.
pub const GC_FREE_FLOOR: u64 = 1 << 20;

#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Packs whose dead fraction is at least this are compacted.
    pub threshold: f64,
    /// Free bytes a round must leave on the store's filesystem.
    pub free_floor: u64,
    /// Compact at most this many packs (a background round's bound).
    pub max_packs: usize,
}

/// Compacts idle packs whose dead fraction is at least `threshold`, one
/// pack a round, most dead first: a round copies the pack's live records
/// (and dead ones a running batch may still claim) to the gc writer,
/// points the index at the copies in one commit, and only then deletes
/// the old pack.
///
/// Why a pack a round: compacting every candidate before deleting any
/// needed free space for all their live bytes at once, so on a full disk
/// gc itself failed with ENOSPC and the space never came back. A round
/// needs room for one pack's live bytes (none for a pack that is all
/// dead), and a pack without that room is skipped.
pub fn gc_with(store: &Store, opts: &GcOptions, progress: &dyn Progress) -> Result<GcReport> {
    let _gc = store.gc_lock.lock();
    let wanted = |e: &PackEntry| e.dead_bytes > 0 && e.dead_fraction() >= opts.threshold;
    let packs = all_packs(store)?;
    // Idle writers' packs are fair game once worth compacting: retire
    // those, so only packs a running batch is appending to are left
    // alone. Not the others: a background round each second would seal
    // every pack being filled and leave many small ones.
    let due: std::collections::HashSet<PackId> = packs
        .iter()
        .filter(|(_, e)| wanted(e))
        .map(|(id, _)| *id)
        .collect();
    if due.is_empty() {
        return Ok(GcReport::default());
    }
    let idle: Vec<PackWriter> = {
        let mut ws = store.writers.lock();
        let (retire, keep): (Vec<_>, Vec<_>) = ws.drain(..).partition(|w| due.contains(&w.id));
        *ws = keep;
        retire
    };
    for w in idle {
        store.return_writer(w, false);
    }
    let active = store.active_packs.lock().clone();
    let open: std::collections::HashSet<PackId> =
        store.writers.lock().iter().map(|w| w.id).collect();
    let mut candidates: Vec<(PackId, PackEntry)> = packs
        .into_iter()
        .filter(|(id, e)| !active.contains(id) && !open.contains(id) && wanted(e))
        .collect();
    candidates.sort_by(|a, b| b.1.dead_fraction().total_cmp(&a.1.dead_fraction()));
    // A pack already punched at its current dead bytes and without room
    // to be copied has nothing more to give now: leave it out, so the
    // bound on a round reaches the others.
    let free = free_bytes(store.dir())?;
    {
        let punched = store.punched_at.lock();
        candidates.retain(|(id, e)| {
            punched.get(id) != Some(&e.dead_bytes) || live_bytes(e) + opts.free_floor <= free
        });
    }
    candidates.truncate(opts.max_packs);
    let mut report = GcReport::default();
    if candidates.is_empty() {
        return Ok(report);
    }
    progress.set_len(candidates.iter().map(|(_, e)| e.committed_len).sum());
    let mut writer: Option<PackWriter> = None;
    let mut result = Ok(());
    for c in &candidates {
        let live = live_bytes(&c.1);
        if live > 0 && free_bytes(store.dir())? < live.saturating_add(opts.free_floor) {
            // No room to copy it: punch its dead records out instead, which
            // needs none, and leave the copying for when there is room.
            report.packs_skipped_for_space += 1;
            progress.inc(c.1.committed_len);
            let seen = store.punched_at.lock().get(&c.0).copied();
            if seen != Some(c.1.dead_bytes) {
                result = punch_dead(store, c.0, &mut report);
                store.punched_at.lock().insert(c.0, c.1.dead_bytes);
                if result.is_err() {
                    break;
                }
            }
            continue;
        }
        result = compact(
            store,
            std::slice::from_ref(c),
            &mut writer,
            &mut report,
            progress,
        );
        if result.is_err() {
            break;
        }
    }
    if let Some(w) = writer {
        store.return_writer(w, true);
    }
    result.map(|()| report)
}

/// Drops the index entries of `pid`'s dead chunks that no running batch
/// can still claim (as compaction drops them), then punches the whole
/// blocks of their blobs out of the pack. The pack keeps its length and
/// record headers, so scans step over the holes; later compaction copies
/// what lives and removes the pack.
fn punch_dead(store: &Store, pid: PackId, report: &mut GcReport) -> Result<()> {
    let path = pack::pack_path(store.dir(), pid);
    let (_, scan) =
        pack::scan_pack(&path, true).map_err(|e| Error::io(format!("scanning {pid}"), e))?;
    let oldest = store.oldest_batch_seq();
    let mut dead = Vec::new();
    {
        let rt = store.db.begin_read()?;
        for rec in scan.records.iter().filter(|r| r.intact) {
            let Some(e) = super::lookup_in(&rt, &rec.header.id)? else {
                continue;
            };
            if e.pack == pid
                && e.offset == rec.offset
                && !e.is_live()
                && e.dead_since < oldest
                && pack::punchable(rec.offset, e.record_len as u64).is_some()
            {
                dead.push((rec.header.id, rec.offset, e.record_len as u64));
            }
        }
    }
    if dead.is_empty() {
        return Ok(());
    }
    // Index first: a crash after it leaves dead bytes, never a chunk the
    // index names with its body punched out.
    let mut gone = Vec::with_capacity(dead.len());
    {
        let _c = store.commit_lock.lock();
        let oldest = store.oldest_batch_seq();
        let tx = store.db.begin_write()?;
        {
            let mut chunks = tx.open_table(CHUNKS)?;
            let mut st = tx.open_table(STATE)?;
            let mut counters = Counters::load(&st)?;
            for (id, off, len) in &dead {
                let Some(v) = chunks.get(&id.0)? else {
                    continue;
                };
                let e = decode_entry(v.value())?;
                drop(v);
                // Revived or stored again meanwhile: keep it.
                if e.pack != pid || e.offset != *off || e.is_live() || e.dead_since >= oldest {
                    continue;
                }
                chunks.remove(&id.0)?;
                counters.total_chunks -= 1;
                gone.push((*off, *len));
            }
            counters.commits += 1;
            let seq = st.get("commit_seq")?.map(|v| v.value()).unwrap_or(0) + 1;
            st.insert("commit_seq", seq)?;
            counters.save(&mut st)?;
        }
        tx.commit()?;
    }
    let f = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {pid} to punch"), e))?;
    let mode = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
    for (off, len) in gone {
        let Some((a, b)) = pack::punchable(off, len) else {
            continue;
        };
        match rustix::fs::fallocate(&f, mode, a, b - a) {
            Ok(()) => {
                report.bytes_punched += b - a;
                report.chunks_dropped += 1;
            }
            // A filesystem without holes: the bytes stay until compaction.
            Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) => return Ok(()),
            Err(e) => return Err(Error::io(format!("punching {pid}"), e.into())),
        }
    }
    Ok(())
}

/// Bytes of a pack's records that something still needs.
fn live_bytes(e: &PackEntry) -> u64 {
    e.committed_len
        .saturating_sub(PACK_HEADER_LEN as u64)
        .saturating_sub(e.dead_bytes)
}

/// Free bytes on the filesystem holding `dir`, as an unprivileged writer
/// sees them.
pub fn free_bytes(dir: &Path) -> Result<u64> {
    let s = rustix::fs::statvfs(dir).map_err(|e| Error::io("statvfs", e.into()))?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// One gc round over `candidates` (see [`gc_with`]), appending to
/// `writer`.
fn compact(
    store: &Store,
    candidates: &[(PackId, PackEntry)],
    writer: &mut Option<PackWriter>,
    report: &mut GcReport,
    progress: &dyn Progress,
) -> Result<()> {
    let mut plans: Vec<CompactionPlan> = Vec::new();
    let oldest = store.oldest_batch_seq();
    for (pid, pentry) in candidates {
        report.bytes_before += pentry.committed_len;
        let path = pack::pack_path(store.dir(), *pid);
        let (_, scan) =
            pack::scan_pack(&path, true).map_err(|e| Error::io(format!("scanning {pid}"), e))?;
        let file = fs::File::open(&path).map_err(|e| Error::io(format!("opening {pid}"), e))?;
        let rt = store.db.begin_read()?;
        let mut moved = Vec::new();
        let mut dropped = Vec::new();
        for rec in scan.records.iter().filter(|r| r.intact) {
            let Some(e) = super::lookup_in(&rt, &rec.header.id)? else {
                continue;
            };
            if e.pack != *pid || e.offset != rec.offset {
                continue; // a duplicate or superseded copy
            }
            if !e.is_live() && e.dead_since < oldest {
                dropped.push(rec.header.id);
                continue;
            }
            let bytes = pack::read_record(&file, rec.offset, e.record_len)
                .map_err(|why| Error::io(format!("reading {pid}"), std::io::Error::other(why)))?;
            if writer.is_none() {
                *writer = Some(store.take_writer(None)?);
            }
            if let Some(w) = writer.as_mut() {
                let off = w
                    .append_raw(&bytes)
                    .map_err(|e| Error::io(format!("appending to {}", w.id), e))?;
                moved.push((rec.header.id, w.id, off));
            }
        }
        progress.inc(pentry.committed_len);
        plans.push((*pid, moved, dropped));
    }
    if let Some(w) = writer.as_mut() {
        w.sync()
            .map_err(|e| Error::io(format!("syncing {}", w.id), e))?;
        // The pack gc copied into may be new: its directory entry must be
        // durable before the index names it, as in a batch commit.
        if w.is_new() {
            super::sync_pack_dirs(&store.dir)?;
        }
    }
    let _c = store.commit_lock.lock();
    let oldest = store.oldest_batch_seq();
    let tx = store.db.begin_write()?;
    let mut removed_packs = Vec::new();
    {
        let mut chunks = tx.open_table(CHUNKS)?;
        let mut packs = tx.open_table(PACKS)?;
        let mut st = tx.open_table(STATE)?;
        let mut counters = Counters::load(&st)?;
        let mut new_dead = 0u64;
        'packs: for (pid, moved, dropped) in &plans {
            // Re-check drops under the commit lock: a chunk revived since the
            // scan keeps the whole pack for another round.
            // Only entries that still name this pack's copy go: a batch may
            // have stored the chunk again elsewhere since it died (removing
            // that live copy lost chunks: NotFound on a later drop).
            let mut gone = Vec::with_capacity(dropped.len());
            for id in dropped {
                if let Some(v) = chunks.get(&id.0)? {
                    let e = decode_entry(v.value())?;
                    if e.pack != *pid {
                        continue;
                    }
                    gone.push(*id);
                    if e.is_live() || e.dead_since >= oldest {
                        log::info!("gc: {pid} kept, chunk {id} was claimed meanwhile");
                        // The copies become dead weight in the new pack.
                        new_dead += moved
                            .iter()
                            .filter_map(|(id, _, _)| {
                                chunks
                                    .get(&id.0)
                                    .ok()
                                    .flatten()
                                    .and_then(|v| decode_entry(v.value()).ok())
                                    .map(|e| e.record_len as u64)
                            })
                            .sum::<u64>();
                        continue 'packs;
                    }
                }
            }
            for (id, npack, noff) in moved {
                let Some(v) = chunks.get(&id.0)? else {
                    continue;
                };
                let mut e = decode_entry(v.value())?;
                drop(v);
                if e.pack != *pid {
                    new_dead += e.record_len as u64;
                    continue;
                }
                if !e.is_live() {
                    new_dead += e.record_len as u64;
                }
                e.pack = *npack;
                e.offset = *noff;
                chunks.insert(&id.0, e.encode().as_slice())?;
                report.chunks_moved += 1;
            }
            for id in gone {
                chunks.remove(&id.0)?;
                counters.total_chunks -= 1;
                report.chunks_dropped += 1;
            }
            packs.remove(pid.0)?;
            removed_packs.push(*pid);
        }
        if let Some(w) = writer.as_ref() {
            let len = w.len;
            adjust_pack(&mut packs, w.id, |p| {
                p.committed_len = len;
                p.dead_bytes += new_dead;
            })?;
        }
        counters.commits += 1;
        let seq = st.get("commit_seq")?.map(|v| v.value()).unwrap_or(0) + 1;
        st.insert("commit_seq", seq)?;
        counters.save(&mut st)?;
    }
    tx.commit()?;
    if let Some(w) = writer.as_mut() {
        report.bytes_after += w.len - w.committed_len;
        w.committed_len = w.len;
    }
    for pid in &removed_packs {
        store.forget_pack_file(*pid);
        let path = pack::pack_path(store.dir(), *pid);
        if let Err(e) = fs::remove_file(&path) {
            log::warn!("gc: cannot remove {}: {e}", path.display());
        }
        report.packs_compacted += 1;
    }
    if let Ok(d) = fs::File::open(store.dir().join("packs")) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// One chunk that did not verify.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BadChunk {
    pub chunk: String,
    pub pack: u64,
    pub offset: u64,
    pub why: String,
}

/// A chunk whose owners in the index differ from the references held.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RefMismatch {
    pub chunk: String,
    /// (owner, count) pairs the layer above holds.
    pub expected: Vec<(u32, u64)>,
    /// (owner, count) pairs the index records.
    pub found: Vec<(u32, u64)>,
}

/// The references held per chunk: (owner, count) sorted by owner, no zeros.
pub type RefMap = HashMap<ChunkId, Vec<(OwnerId, u64)>>;

/// What the store-level check found.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub corrupt: Vec<BadChunk>,
    /// References the layer above holds to chunks the index lacks.
    pub missing: Vec<String>,
    pub refcount_mismatches: Vec<RefMismatch>,
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty()
            && self.missing.is_empty()
            && self.refcount_mismatches.is_empty()
            && self.problems.is_empty()
    }
}

/// Reads every indexed blob and checks it against its name, compares each
/// chunk's owners with `expected` (the references the layer above holds),
/// and checks the counters and pack accounting.
pub fn verify(store: &Store, expected: &RefMap, progress: &dyn Progress) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let rt = store.db.begin_read()?;
    let chunks = rt.open_table(CHUNKS)?;
    let mut by_pack: HashMap<PackId, Vec<(u64, ChunkId, u32)>> = HashMap::new();
    let mut counted = Counters::default();
    let mut live_per_pack: HashMap<PackId, u64> = HashMap::new();
    let mut matched = 0usize;
    for row in chunks.iter()? {
        let (k, v) = row?;
        let id = ChunkId(*k.value());
        let e = match ChunkEntry::decode(v.value()) {
            Ok(e) => e,
            Err(err) => {
                report.problems.push(format!("entry of chunk {id}: {err}"));
                continue;
            }
        };
        counted.total_chunks += 1;
        if e.is_live() {
            counted.live_chunks += 1;
            counted.live_raw_bytes += e.raw_len as u64;
            counted.live_stored_bytes += e.record_len as u64;
            counted.logical_bytes += e.raw_len as u64 * e.total_refs();
            *live_per_pack.entry(e.pack).or_default() += e.record_len as u64;
        }
        let want = match expected.get(&id) {
            Some(w) => {
                matched += 1;
                w.as_slice()
            }
            None => &[],
        };
        if want != e.owners.as_slice() {
            report.refcount_mismatches.push(RefMismatch {
                chunk: id.to_hex(),
                expected: want.iter().map(|(o, c)| (o.0, *c)).collect(),
                found: e.owners.iter().map(|(o, c)| (o.0, *c)).collect(),
            });
        }
        by_pack
            .entry(e.pack)
            .or_default()
            .push((e.offset, id, e.record_len));
    }
    if matched < expected.len() {
        for id in expected.keys() {
            if chunks.get(&id.0)?.is_none() {
                report.missing.push(id.to_hex());
            }
        }
        report.missing.sort();
    }
    drop(chunks);
    let st = rt.open_table(STATE)?;
    let stored = Counters::load(&st)?;
    counted.commits = stored.commits;
    if stored != counted {
        report.problems.push(format!(
            "stored counters {stored:?} differ from recomputed {counted:?}"
        ));
    }
    let packs = all_packs(store)?;
    progress.set_len(packs.iter().map(|(_, e)| e.committed_len).sum());
    for (pid, pe) in &packs {
        let live = live_per_pack.get(pid).copied().unwrap_or(0);
        let want_dead = pe
            .committed_len
            .saturating_sub(PACK_HEADER_LEN as u64)
            .saturating_sub(live);
        if want_dead != pe.dead_bytes {
            report.problems.push(format!(
                "{pid}: dead bytes recorded {} but {} by its records",
                pe.dead_bytes, want_dead
            ));
        }
        let mut list = by_pack.remove(pid).unwrap_or_default();
        list.sort();
        let path = pack::pack_path(store.dir(), *pid);
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                report.problems.push(format!("{pid}: cannot open: {e}"));
                continue;
            }
        };
        for (offset, id, len) in list {
            report.chunks_checked += 1;
            report.bytes_checked += len as u64;
            let bad = |why: String| BadChunk {
                chunk: id.to_hex(),
                pack: pid.0,
                offset,
                why,
            };
            if offset + len as u64 > pe.committed_len {
                report
                    .corrupt
                    .push(bad("record lies past the pack's committed end".into()));
                continue;
            }
            let res = pack::read_record(&file, offset, len).and_then(|rec| {
                let blob = pack::check_record(&rec, &id)?;
                pack::decode_blob(blob, &id).map(|_| ())
            });
            if let Err(why) = res {
                report.corrupt.push(bad(why));
            }
        }
        progress.inc(pe.committed_len);
    }
    for (pid, list) in by_pack {
        report.problems.push(format!(
            "{} index entries point into {pid}, which the index does not list",
            list.len()
        ));
    }
    Ok(report)
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RebuildReport {
    pub packs_scanned: u64,
    pub chunks_found: u64,
    pub damaged_records: u64,
    /// Records of dropped chunks whose bodies gc punched out.
    #[serde(default)]
    pub punched_records: u64,
    pub duplicate_records: u64,
    /// Referenced chunks no pack holds.
    pub missing: Vec<String>,
    pub old_index_kept_as: Option<String>,
}

/// Rebuilds `index.redb` from the packs alone plus `refs`, the references
/// the layer above holds. The old file, if any, is kept beside it. The
/// caller holds the store lock.
pub fn rebuild_index(
    dir: &Path,
    refs: &RefMap,
    ref_seq: u64,
    progress: &dyn Progress,
) -> Result<RebuildReport> {
    let mut report = RebuildReport::default();
    let files = pack::list_pack_files(dir).map_err(|e| Error::io("listing packs", e))?;
    progress.set_len(
        files
            .iter()
            .filter_map(|(_, p)| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum(),
    );
    let new_path = dir.join("index.redb.new");
    let _ = fs::remove_file(&new_path);
    let db = Database::create(&new_path)?;
    let tx = db.begin_write()?;
    {
        let mut chunks = tx.open_table(CHUNKS)?;
        let mut packs = tx.open_table(PACKS)?;
        tx.open_table(UNDO)?;
        for (pid, path) in &files {
            let (hdr_id, scan) = match pack::scan_pack(path, true) {
                Ok(s) => s,
                Err(e) => {
                    log::error!("{}: unreadable pack, skipped: {e}", path.display());
                    continue;
                }
            };
            if hdr_id != *pid {
                log::warn!("{}: header names {hdr_id}", path.display());
            }
            report.packs_scanned += 1;
            for rec in &scan.records {
                if rec.punched {
                    report.punched_records += 1;
                    continue;
                }
                if !rec.intact {
                    report.damaged_records += 1;
                    log::error!(
                        "{pid}: record of chunk {} at offset {} is damaged; skipped",
                        rec.header.id,
                        rec.offset
                    );
                    continue;
                }
                if chunks.get(&rec.header.id.0)?.is_some() {
                    report.duplicate_records += 1;
                    continue;
                }
                let raw_len = rec.raw_len;
                let e = ChunkEntry {
                    pack: *pid,
                    offset: rec.offset,
                    record_len: rec.header.record_len() as u32,
                    raw_len,
                    dead_since: 1,
                    owners: Vec::new(),
                };
                chunks.insert(&rec.header.id.0, e.encode().as_slice())?;
                report.chunks_found += 1;
            }
            packs.insert(
                pid.0,
                PackEntry {
                    committed_len: scan.file_len,
                    dead_bytes: 0,
                    sealed: true,
                }
                .encode()
                .as_slice(),
            )?;
            progress.inc(scan.file_len);
        }
        for (id, owners) in refs {
            let Some(v) = chunks.get(&id.0)? else {
                report.missing.push(id.to_hex());
                continue;
            };
            let mut e = decode_entry(v.value())?;
            drop(v);
            e.owners = owners.clone();
            e.dead_since = 0;
            chunks.insert(&id.0, e.encode().as_slice())?;
        }
        report.missing.sort();
        let mut counters = Counters::default();
        let mut live: HashMap<PackId, u64> = HashMap::new();
        for row in chunks.iter()? {
            let (_, v) = row?;
            let e = decode_entry(v.value())?;
            counters.total_chunks += 1;
            if e.is_live() {
                counters.live_chunks += 1;
                counters.live_raw_bytes += e.raw_len as u64;
                counters.live_stored_bytes += e.record_len as u64;
                counters.logical_bytes += e.raw_len as u64 * e.total_refs();
                *live.entry(e.pack).or_default() += e.record_len as u64;
            }
        }
        let ids: Vec<u64> = packs
            .iter()?
            .map(|r| r.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        for id in ids {
            let l = live.get(&PackId(id)).copied().unwrap_or(0);
            adjust_pack(&mut packs, PackId(id), |p| {
                p.dead_bytes = p
                    .committed_len
                    .saturating_sub(PACK_HEADER_LEN as u64)
                    .saturating_sub(l);
            })?;
        }
        let mut st = tx.open_table(STATE)?;
        st.insert("index_format", INDEX_FORMAT_VERSION)?;
        st.insert("commit_seq", 1)?;
        st.insert("ref_seq", ref_seq)?;
        counters.save(&mut st)?;
        let _ = chunks.len()?;
    }
    tx.commit()?;
    drop(db);
    let path = dir.join(INDEX_FILE);
    if path.exists() {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let kept = dir.join(format!("index.redb.broken-{secs}"));
        fs::rename(&path, &kept).map_err(|e| Error::io("setting the old index aside", e))?;
        report.old_index_kept_as = Some(kept.display().to_string());
    }
    fs::rename(&new_path, &path).map_err(|e| Error::io("installing the new index", e))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("syncing the store directory", e))?;
    Ok(report)
}
