//! Pack files: append-only containers of framed blobs.
//!
//! Invariant: bytes before a pack's committed length (recorded in the index)
//! are never rewritten; appends go past it and become visible only when the
//! index commit that names them lands, after the pack has been synced. The
//! one exception: once the index has dropped a dead chunk, gc may punch the
//! whole blocks of its blob out ([`punchable`]), so a full disk gets space
//! back without first finding room to copy a pack.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::format::{
    self, BlobHeader, ChunkId, Compression, PACK_HEADER_LEN, PackId, RECORD_HEADER_LEN,
    RecordHeader, Sealing,
};

pub fn pack_path(dir: &Path, id: PackId) -> PathBuf {
    dir.join("packs").join(id.rel_path())
}

/// An open pack being appended to by one batch at a time.
///
/// The caller fills a buffer; a writer thread (an `IoLane`) does the
/// `pwrite`s and the syncs, so the ingest thread goes on chunking and
/// hashing while the disk works. `sync` and `rollback` wait for every write
/// handed over before them, so the order blobs, then index still holds.
pub struct PackWriter {
    pub id: PackId,
    file: Arc<File>,
    /// The same pack opened with O_DIRECT, if the filesystem allows it.
    direct: Option<Arc<File>>,
    buf: Vec<u8>,
    /// File length including buffered bytes.
    pub len: u64,
    /// Length the index vouches for (synced and committed).
    pub committed_len: u64,
    /// Bytes handed to the writer thread: `buf` starts at this offset.
    handed_len: u64,
    /// Length known to be on stable storage.
    synced_len: u64,
    lane: Arc<IoLane>,
    /// Reply to a sync started when the pack filled up (`seal`).
    pending_sync: Option<(u64, Receiver<io::Result<()>>)>,
    /// Set once a write or sync failed: the pack takes no more appends and
    /// is retired, never pooled.
    failed: bool,
}

/// Size of one buffer handed to the writer thread.
const WRITE_BUF: usize = 1 << 20;
/// Buffers queued on a lane before the ingest thread waits: with the one
/// being written and the one being filled, a lane holds at most
/// `QUEUE_DEPTH + 2` buffers however slow the disk.
const QUEUE_DEPTH: usize = 4;
/// Bytes a lane writes to one pack between syncs of its own, so the data
/// reaches the disk while ingest goes on and the commit's sync finds little
/// left to wait for.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Alignment of O_DIRECT offsets, lengths and memory: the page size, which
/// covers the logical block size of every disk in use.
const DIRECT_ALIGN: u64 = 4096;

enum IoMsg {
    Write {
        file: Arc<File>,
        direct: Option<Arc<File>>,
        at: u64,
        buf: Vec<u8>,
    },
    /// Reply once everything before it is written (and `sync` synced).
    Barrier {
        sync: Option<Arc<File>>,
        reply: SyncSender<io::Result<()>>,
    },
}

/// A writer thread with a bounded queue. A batch's packs share one lane
/// (a full pack passes its lane on to the next), so the memory in flight is
/// bounded per batch, not per pack.
pub struct IoLane {
    tx: SyncSender<IoMsg>,
    /// Emptied buffers coming back for reuse (a Mutex only to make the
    /// lane Sync; one batch uses it at a time).
    spare: Mutex<Receiver<Vec<u8>>>,
    handle: Option<JoinHandle<()>>,
}

impl IoLane {
    pub fn spawn() -> io::Result<Arc<IoLane>> {
        let (tx, rx) = sync_channel::<IoMsg>(QUEUE_DEPTH);
        let (spare_tx, spare) = sync_channel::<Vec<u8>>(QUEUE_DEPTH + 1);
        let handle = std::thread::Builder::new()
            .name("pack-writer".into())
            .spawn(move || io_loop(&rx, &spare_tx))?;
        Ok(Arc::new(IoLane {
            tx,
            spare: Mutex::new(spare),
            handle: Some(handle),
        }))
    }

    /// Frees the buffers kept for reuse (an idle writer holds none).
    fn free_spares(&self) {
        let spare = self.spare.lock();
        while spare.try_recv().is_ok() {}
    }
}

impl Drop for IoLane {
    fn drop(&mut self) {
        // Closing the channel ends the thread once it has written what it
        // holds; joining means no write can land after we return.
        let (dead, _) = sync_channel(0);
        drop(std::mem::replace(&mut self.tx, dead));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The writer thread: writes buffers in order, syncs a pack every
/// `WRITEBACK_EVERY` bytes, and answers barriers. After the first error it
/// writes nothing more and reports that error to every barrier.
fn io_loop(rx: &Receiver<IoMsg>, spare: &SyncSender<Vec<u8>>) {
    let mut err: Option<io::Error> = None;
    let mut unsynced = 0u64;
    let mut out = DirectOut::new();
    for msg in rx {
        match msg {
            IoMsg::Write {
                file,
                direct,
                at,
                mut buf,
            } => {
                if err.is_none() {
                    match out.write(&file, direct.as_deref(), at, &buf) {
                        Ok(()) => unsynced += buf.len() as u64,
                        Err(e) => err = Some(e),
                    }
                }
                if err.is_none() && unsynced >= WRITEBACK_EVERY {
                    unsynced = 0;
                    if let Err(e) = file.sync_data() {
                        err = Some(e);
                    }
                }
                buf.clear();
                let _ = spare.try_send(buf);
            }
            IoMsg::Barrier { sync, reply } => {
                if err.is_none()
                    && let Err(e) = out.flush_tail()
                {
                    err = Some(e);
                }
                if err.is_none()
                    && let Some(f) = sync
                {
                    unsynced = 0;
                    if let Err(e) = f.sync_data() {
                        err = Some(e);
                    }
                }
                let _ = reply.send(match &err {
                    None => Ok(()),
                    Some(e) => Err(copy_err(e)),
                });
            }
        }
    }
    if err.is_none()
        && let Err(e) = out.flush_tail()
    {
        log::warn!("pack writer: last partial block not written: {e}");
    }
}

/// Writes packs with O_DIRECT where it can. Pack bytes are written once and
/// rarely read soon after, and copying them into the page cache cost the
/// writer thread more CPU than the disk time it hid (on this project's VMs,
/// 0.7 to 7 s of system time per GiB against 0.25 s direct), CPU the ingest
/// threads need. Direct writes must be block aligned, so the bytes after the
/// last whole block are held back (`tail`) and put in front of the next
/// write, or written through the page cache at the next barrier.
struct DirectOut {
    /// Cleared when the filesystem refuses an aligned direct write.
    enabled: bool,
    mem: Vec<u8>,
    tail: Option<Tail>,
}

/// Bytes from an aligned offset of `file` that are not written yet.
struct Tail {
    file: Arc<File>,
    start: u64,
    bytes: Vec<u8>,
}

impl DirectOut {
    fn new() -> DirectOut {
        DirectOut {
            enabled: true,
            mem: Vec::new(),
            tail: None,
        }
    }

    /// Writes the held-back bytes through the page cache.
    fn flush_tail(&mut self) -> io::Result<()> {
        match self.tail.take() {
            Some(t) => t.file.write_all_at(&t.bytes, t.start),
            None => Ok(()),
        }
    }

    fn write(
        &mut self,
        file: &Arc<File>,
        direct: Option<&File>,
        at: u64,
        data: &[u8],
    ) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let Some(direct) = direct.filter(|_| self.enabled) else {
            self.flush_tail()?;
            return file.write_all_at(data, at);
        };
        let start = at - at % DIRECT_ALIGN;
        let head = (at - start) as usize;
        let continues = matches!(&self.tail, Some(t)
            if Arc::ptr_eq(&t.file, file) && t.start == start && t.bytes.len() == head);
        let tail = if continues { self.tail.take() } else { None };
        self.flush_tail()?;
        let total = head + data.len();
        let whole = total - total % DIRECT_ALIGN as usize;
        let buf = aligned(&mut self.mem, total);
        if let Some(t) = &tail {
            buf[..head].copy_from_slice(&t.bytes);
        } else if head > 0 {
            file.read_exact_at(&mut buf[..head], start)?;
        }
        buf[head..].copy_from_slice(data);
        let mut done = 0;
        let mut refused = false;
        while done < whole {
            match direct.write_at(&buf[done..whole], start + done as u64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    log::warn!(
                        "pack writer: direct write refused ({e}); writing through the page cache"
                    );
                    refused = true;
                    break;
                }
                Err(e) => return Err(e),
            }
            if done % DIRECT_ALIGN as usize != 0 {
                break; // a short write off the block grid: finish buffered
            }
        }
        if done < whole {
            file.write_all_at(&buf[done..whole], start + done as u64)?;
        }
        if whole < total {
            self.tail = Some(Tail {
                file: file.clone(),
                start: start + whole as u64,
                bytes: buf[whole..].to_vec(),
            });
        }
        if refused {
            self.enabled = false;
        }
        Ok(())
    }
}

/// An aligned `n`-byte window of `mem`, grown as needed.
fn aligned(mem: &mut Vec<u8>, n: usize) -> &mut [u8] {
    let a = DIRECT_ALIGN as usize;
    if mem.len() < n + a {
        *mem = vec![0; n.next_multiple_of(a) + a];
    }
    let off = mem.as_ptr().align_offset(a);
    &mut mem[off..off + n]
}

/// io::Error is not Clone; keep the OS error (ENOSPC must stay ENOSPC).
fn copy_err(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

fn lane_gone() -> io::Error {
    io::Error::other("pack writer thread is gone")
}

impl PackWriter {
    /// Creates pack `id`, written through `lane` (a new one if `None`).
    pub fn create(dir: &Path, id: PackId, lane: Option<Arc<IoLane>>) -> io::Result<PackWriter> {
        let path = pack_path(dir, id);
        let parent = path.parent().unwrap_or(dir);
        fs::create_dir_all(parent)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.write_all(&format::encode_pack_header(id))?;
        let direct = match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
        {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                log::debug!("{id}: no O_DIRECT ({e}); writing through the page cache");
                None
            }
        };
        // No sync here: the first commit that names this pack syncs its data
        // and the packs directory (`sync`, `is_new`).
        let lane = match lane {
            Some(l) => l,
            None => IoLane::spawn()?,
        };
        Ok(PackWriter {
            id,
            file: Arc::new(file),
            direct,
            buf: Vec::new(),
            len: PACK_HEADER_LEN as u64,
            committed_len: 0,
            handed_len: PACK_HEADER_LEN as u64,
            synced_len: 0,
            lane,
            pending_sync: None,
            failed: false,
        })
    }

    /// The lane this pack is written through, to pass on to the next pack.
    pub fn lane(&self) -> Arc<IoLane> {
        self.lane.clone()
    }

    /// Appends one record; returns its offset and length.
    pub fn append(
        &mut self,
        id: ChunkId,
        blob_header: &[u8],
        payload: &[u8],
    ) -> io::Result<(u64, u32)> {
        let rh = RecordHeader::for_blob(id, blob_header, payload);
        let offset = self.len;
        let rec_len = rh.record_len();
        self.make_room(rec_len as usize)?;
        self.buf.extend_from_slice(&rh.encode());
        self.buf.extend_from_slice(blob_header);
        self.buf.extend_from_slice(payload);
        self.len += rec_len;
        Ok((offset, rec_len as u32))
    }

    /// Appends a record that is already framed (gc copies records verbatim).
    pub fn append_raw(&mut self, record: &[u8]) -> io::Result<u64> {
        let offset = self.len;
        self.make_room(record.len())?;
        self.buf.extend_from_slice(record);
        self.len += record.len() as u64;
        Ok(offset)
    }

    /// Hands the buffer over if `n` more bytes would not fit, and makes sure
    /// there is a buffer to append to.
    fn make_room(&mut self, n: usize) -> io::Result<()> {
        if self.failed {
            return Err(self.barrier(None).err().unwrap_or_else(lane_gone));
        }
        if !self.buf.is_empty() && self.buf.len() + n > WRITE_BUF {
            self.hand_over()?;
        }
        if self.buf.capacity() == 0 {
            self.buf = self.lane.spare.lock().try_recv().unwrap_or_default();
            self.buf.reserve(WRITE_BUF.max(n));
        }
        Ok(())
    }

    /// Sends the buffered bytes to the writer thread.
    fn hand_over(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let n = buf.len() as u64;
        let msg = IoMsg::Write {
            file: self.file.clone(),
            direct: self.direct.clone(),
            at: self.handed_len,
            buf,
        };
        if self.lane.tx.send(msg).is_err() {
            self.failed = true;
            return Err(lane_gone());
        }
        self.handed_len += n;
        Ok(())
    }

    /// Sends a barrier (syncing this pack if `sync` is given).
    fn send_barrier(&self, sync: Option<Arc<File>>) -> Option<Receiver<io::Result<()>>> {
        let (reply, rx) = sync_channel(1);
        self.lane
            .tx
            .send(IoMsg::Barrier { sync, reply })
            .ok()
            .map(|_| rx)
    }

    /// Waits until the lane has done everything handed to it (and synced
    /// `sync`); returns its first error, if any.
    fn barrier(&mut self, sync: Option<Arc<File>>) -> io::Result<()> {
        let r = match self.send_barrier(sync) {
            Some(rx) => rx.recv().unwrap_or_else(|_| Err(lane_gone())),
            None => Err(lane_gone()),
        };
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    /// Called when the pack is full: hands over the last bytes and starts
    /// their sync without waiting for it. The commit's `sync` collects the
    /// result.
    pub fn seal(&mut self) -> io::Result<()> {
        self.hand_over()?;
        self.buf = Vec::new();
        match self.send_barrier(Some(self.file.clone())) {
            Some(rx) => self.pending_sync = Some((self.handed_len, rx)),
            None => {
                self.failed = true;
                return Err(lane_gone());
            }
        }
        Ok(())
    }

    /// Frees this writer's buffers while it sits idle in the pool.
    pub fn free_buffers(&mut self) {
        self.buf = Vec::new();
        self.lane.free_spares();
    }

    /// Whether a write or sync failed (the writer must not be reused).
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// Whether no commit has named this pack yet (its directory entry may
    /// not be durable).
    pub fn is_new(&self) -> bool {
        self.committed_len == 0
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        if let Some((upto, rx)) = self.pending_sync.take() {
            match rx.recv().unwrap_or_else(|_| Err(lane_gone())) {
                Ok(()) => self.synced_len = self.synced_len.max(upto),
                Err(e) => {
                    self.failed = true;
                    return Err(e);
                }
            }
        }
        if self.synced_len != self.len {
            self.hand_over()?;
            self.barrier(Some(self.file.clone()))?;
            self.synced_len = self.len;
        }
        Ok(())
    }

    /// Throws away everything past the committed length (after a failed or
    /// abandoned batch), so the pack holds no unindexed records.
    pub fn rollback(&mut self) -> io::Result<()> {
        self.buf.clear();
        self.pending_sync = None;
        // No write handed over before this may land after the cut; an
        // error it hit does not matter, those bytes are being cut anyway.
        let _ = self.barrier(None);
        let keep = self.committed_len.max(PACK_HEADER_LEN as u64);
        self.file.set_len(keep)?;
        self.len = keep;
        self.handed_len = keep;
        self.synced_len = keep.min(self.synced_len);
        Ok(())
    }

    pub fn has_uncommitted(&self) -> bool {
        self.len > self.committed_len.max(PACK_HEADER_LEN as u64)
    }
}

/// Compresses chunks the way the store is configured, reusing one zstd
/// context (creating one per chunk costs more than compressing it), and
/// falling back to storing a chunk plain when compression does not pay.
pub struct BlobEncoder {
    compression: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
}

impl BlobEncoder {
    pub fn new(compression: Compression, zstd_level: i32) -> BlobEncoder {
        let zstd = match compression {
            Compression::Zstd => zstd::bulk::Compressor::new(zstd_level).ok(),
            _ => None,
        };
        BlobEncoder {
            compression,
            zstd,
            scratch: Vec::new(),
        }
    }

    /// Returns the blob header and the payload to store after it.
    pub fn encode<'a>(&'a mut self, data: &'a [u8]) -> ([u8; format::BLOB_HEADER_LEN], &'a [u8]) {
        self.scratch.clear();
        let compressed = match (self.compression, self.zstd.as_mut()) {
            (Compression::Zstd, Some(z)) => {
                self.scratch
                    .reserve(zstd::zstd_safe::compress_bound(data.len()));
                matches!(z.compress_to_buffer(data, &mut self.scratch), Ok(n) if n < data.len())
            }
            (Compression::Lz4, _) => {
                self.scratch
                    .resize(lz4_flex::block::get_maximum_output_size(data.len()), 0);
                match lz4_flex::block::compress_into(data, self.scratch.as_mut_slice()) {
                    Ok(n) if n < data.len() => {
                        self.scratch.truncate(n);
                        true
                    }
                    _ => false,
                }
            }
            _ => false,
        };
        let header = BlobHeader {
            compression: if compressed {
                self.compression
            } else {
                Compression::None
            },
            sealing: Sealing::None,
            raw_len: data.len() as u32,
        };
        let payload: &[u8] = if compressed { &self.scratch } else { data };
        (header.encode(), payload)
    }
}

/// Why a blob did not decode to the chunk it should hold.
pub fn decode_blob(blob: &[u8], expect: &ChunkId) -> Result<Vec<u8>, String> {
    decode_blob_as(blob, expect, true)
}

/// `decode_blob`, checking the plaintext's SHA-1 against `expect` only if
/// `check_name` (a caller that checked the record's CRC may skip it).
pub fn decode_blob_as(blob: &[u8], expect: &ChunkId, check_name: bool) -> Result<Vec<u8>, String> {
    let h = BlobHeader::decode(blob).map_err(|e| e.to_string())?;
    if h.sealing != Sealing::None {
        return Err("sealed blob in a local pack".into());
    }
    let payload = &blob[format::BLOB_HEADER_LEN..];
    let raw_len = h.raw_len as usize;
    let data = match h.compression {
        Compression::None => payload.to_vec(),
        Compression::Zstd => {
            zstd::bulk::decompress(payload, raw_len).map_err(|e| format!("zstd: {e}"))?
        }
        Compression::Lz4 => {
            lz4_flex::block::decompress(payload, raw_len).map_err(|e| format!("lz4: {e}"))?
        }
    };
    if data.len() != raw_len {
        return Err(format!(
            "decoded {} bytes, header says {raw_len}",
            data.len()
        ));
    }
    if check_name && ChunkId::of(&data) != *expect {
        return Err("content does not match its SHA-1 name".into());
    }
    Ok(data)
}

/// Reads one whole record at `offset` and checks its framing.
pub fn read_record(file: &File, offset: u64, record_len: u32) -> Result<Vec<u8>, String> {
    let mut rec = vec![0u8; record_len as usize];
    file.read_exact_at(&mut rec, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            "record runs past the end of the pack".to_string()
        } else {
            e.to_string()
        }
    })?;
    Ok(rec)
}

/// Checks a record's frame against the chunk the index expects there and
/// returns the blob slice.
pub fn check_record<'a>(rec: &'a [u8], expect: &ChunkId) -> Result<&'a [u8], String> {
    check_record_as(rec, expect, false)
}

/// `check_record`, also checking the record's CRC if `crc`.
pub fn check_record_as<'a>(rec: &'a [u8], expect: &ChunkId, crc: bool) -> Result<&'a [u8], String> {
    let rh = RecordHeader::decode(rec).map_err(|e| e.to_string())?;
    if rh.id != *expect {
        return Err(format!("record names chunk {}", rh.id));
    }
    if rh.record_len() != rec.len() as u64 {
        return Err(format!(
            "record length {} differs from the index's {}",
            rh.record_len(),
            rec.len()
        ));
    }
    let blob = &rec[RECORD_HEADER_LEN..];
    if crc && !rh.crc_matches(blob) {
        return Err("record CRC does not match".into());
    }
    Ok(blob)
}

/// One record found by scanning a pack without the index.
pub struct ScannedRecord {
    pub offset: u64,
    pub header: RecordHeader,
    /// Plaintext length from the blob header.
    pub raw_len: u32,
    /// The CRC matched and the blob header parsed.
    pub intact: bool,
    /// Not intact because gc punched its body out (see [`punchable`]):
    /// the chunk had been dropped from the index, nothing is lost.
    pub punched: bool,
}

/// The part of a record at `offset` of `record_len` bytes that gc may
/// punch out once its chunk is dropped: the whole filesystem blocks of
/// its blob, never the record header, so a scan still steps over it.
pub fn punchable(offset: u64, record_len: u64) -> Option<(u64, u64)> {
    const BLOCK: u64 = 4096;
    let start = (offset + RECORD_HEADER_LEN as u64).div_ceil(BLOCK) * BLOCK;
    let end = (offset + record_len) / BLOCK * BLOCK;
    (end > start).then_some((start, end))
}

/// What a sequential scan of a pack found.
pub struct PackScan {
    pub records: Vec<ScannedRecord>,
    /// Where parsing stopped: the end of the last parseable record.
    pub parsed_end: u64,
    pub file_len: u64,
}

/// Walks a pack's records from the start. A record with a bad CRC is
/// reported (not intact) and skipped by its length; an unparseable header
/// ends the scan (a torn tail, or damage the framing cannot step over).
pub fn scan_pack(path: &Path, want_records: bool) -> io::Result<(PackId, PackScan)> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut r = io::BufReader::with_capacity(1 << 20, file);
    let mut head = [0u8; PACK_HEADER_LEN];
    r.read_exact(&mut head)?;
    let id = format::decode_pack_header(&head)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let mut off = PACK_HEADER_LEN as u64;
    let mut records = Vec::new();
    let mut blob = Vec::new();
    loop {
        if off + RECORD_HEADER_LEN as u64 > file_len {
            break;
        }
        let mut hb = [0u8; RECORD_HEADER_LEN];
        if r.read_exact(&mut hb).is_err() {
            break;
        }
        let Ok(rh) = RecordHeader::decode(&hb) else {
            break;
        };
        if off + rh.record_len() > file_len {
            break;
        }
        blob.resize(rh.blob_len as usize, 0);
        if r.read_exact(&mut blob).is_err() {
            break;
        }
        let parsed = BlobHeader::decode(&blob).ok();
        let intact = parsed.is_some() && rh.crc_matches(&blob);
        let punched = !intact
            && punchable(off, rh.record_len()).is_some_and(|(a, b)| {
                let base = off + RECORD_HEADER_LEN as u64;
                blob[(a - base) as usize..(b - base) as usize]
                    .iter()
                    .all(|x| *x == 0)
            });
        if want_records || !intact {
            records.push(ScannedRecord {
                offset: off,
                header: rh,
                raw_len: parsed.map(|h| h.raw_len).unwrap_or(0),
                intact,
                punched,
            });
        }
        off += rh.record_len();
    }
    Ok((
        id,
        PackScan {
            records,
            parsed_end: off,
            file_len,
        },
    ))
}

/// Lists the pack files under `STORE/packs` by id.
pub fn list_pack_files(dir: &Path) -> io::Result<Vec<(PackId, PathBuf)>> {
    let mut out = Vec::new();
    let packs = dir.join("packs");
    for fan in fs::read_dir(&packs)? {
        let fan = fan?;
        if !fan.file_type()?.is_dir() {
            continue;
        }
        for f in fs::read_dir(fan.path())? {
            let f = f?;
            let name = f.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".pack")) else {
                continue;
            };
            if let Ok(n) = u64::from_str_radix(stem, 16) {
                out.push((PackId(n), f.path()));
            }
        }
    }
    out.sort_by_key(|(id, _)| *id);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Append(usize),
        Sync,
        Rollback,
        NextPack,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (1usize..3 * WRITE_BUF).prop_map(Op::Append),
            3 => (1usize..9000).prop_map(Op::Append),
            2 => Just(Op::Sync),
            1 => Just(Op::Rollback),
            1 => Just(Op::NextPack),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Whatever the mix of record sizes, syncs, rollbacks and packs
        /// sharing one lane, each pack file ends up holding exactly its
        /// header and the records appended since its last commit point,
        /// whether the lane wrote them direct or through the page cache.
        #[test]
        fn pack_files_hold_exactly_what_was_appended(ops in prop::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let io = |e: io::Error| TestCaseError::fail(e.to_string());
            let mut id = 1u64;
            let mut w = PackWriter::create(dir.path(), PackId(id), None).map_err(io)?;
            let mut want = format::encode_pack_header(PackId(id)).to_vec();
            let mut done = Vec::new();
            let mut byte = 0u8;
            for op in ops {
                match op {
                    Op::Append(n) => {
                        let rec: Vec<u8> = (0..n).map(|i| byte.wrapping_add(i as u8)).collect();
                        byte = byte.wrapping_add(7);
                        let at = w.append_raw(&rec).map_err(io)?;
                        prop_assert_eq!(at, want.len() as u64);
                        want.extend_from_slice(&rec);
                    }
                    Op::Sync => {
                        w.sync().map_err(io)?;
                        w.committed_len = w.len;
                    }
                    Op::Rollback => {
                        w.rollback().map_err(io)?;
                        want.truncate(w.len as usize);
                    }
                    Op::NextPack => {
                        w.sync().map_err(io)?;
                        id += 1;
                        let next = PackWriter::create(dir.path(), PackId(id), Some(w.lane())).map_err(io)?;
                        done.push((std::mem::replace(&mut w, next), std::mem::take(&mut want)));
                        want = format::encode_pack_header(PackId(id)).to_vec();
                    }
                }
            }
            w.sync().map_err(io)?;
            done.push((w, want));
            for (w, want) in done {
                let got = fs::read(pack_path(dir.path(), w.id)).map_err(io)?;
                prop_assert_eq!(got.len(), want.len(), "{} length", w.id);
                prop_assert!(got == want, "{} content differs", w.id);
            }
        }
    }
}
