//! Pack files: append-only containers of framed blobs.
//!
//! Invariant: bytes before a pack's committed length (recorded in the index)
//! are never rewritten; appends go past it and become visible only when the
//! index commit that names them lands, after the pack has been synced.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::format::{
    self, BlobHeader, ChunkId, Compression, PACK_HEADER_LEN, PackId, RECORD_HEADER_LEN,
    RecordHeader, Sealing,
};

pub fn pack_path(dir: &Path, id: PackId) -> PathBuf {
    dir.join("packs").join(id.rel_path())
}

/// An open pack being appended to by one batch at a time.
pub struct PackWriter {
    pub id: PackId,
    file: File,
    buf: Vec<u8>,
    /// File length including buffered bytes.
    pub len: u64,
    /// Length the index vouches for (synced and committed).
    pub committed_len: u64,
    /// Length known to be on stable storage.
    synced_len: u64,
    /// A thread that starts writeback of what we appended while we go on
    /// chunking, so the commit's sync finds little left to wait for.
    writeback: Option<std::sync::mpsc::SyncSender<()>>,
    written_since_kick: u64,
}

/// Bytes appended between early-writeback kicks.
const WRITEBACK_EVERY: u64 = 8 << 20;

const WRITE_BUF: usize = 1 << 20;

impl PackWriter {
    pub fn create(dir: &Path, id: PackId) -> io::Result<PackWriter> {
        let path = pack_path(dir, id);
        let parent = path.parent().unwrap_or(dir);
        fs::create_dir_all(parent)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.write_all(&format::encode_pack_header(id))?;
        // No sync here: the first commit that names this pack syncs its data
        // and the packs directory (`sync`, `is_new`).
        Ok(PackWriter {
            id,
            file,
            buf: Vec::with_capacity(WRITE_BUF),
            len: PACK_HEADER_LEN as u64,
            committed_len: 0,
            synced_len: 0,
            writeback: None,
            written_since_kick: 0,
        })
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
        if self.buf.len() + rec_len as usize > WRITE_BUF {
            self.flush()?;
        }
        self.buf.extend_from_slice(&rh.encode());
        self.buf.extend_from_slice(blob_header);
        self.buf.extend_from_slice(payload);
        self.len += rec_len;
        Ok((offset, rec_len as u32))
    }

    /// Appends a record that is already framed (gc copies records verbatim).
    pub fn append_raw(&mut self, record: &[u8]) -> io::Result<u64> {
        let offset = self.len;
        if self.buf.len() + record.len() > WRITE_BUF {
            self.flush()?;
        }
        self.buf.extend_from_slice(record);
        self.len += record.len() as u64;
        Ok(offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all(&self.buf)?;
            self.written_since_kick += self.buf.len() as u64;
            self.buf.clear();
            if self.written_since_kick >= WRITEBACK_EVERY {
                self.written_since_kick = 0;
                self.kick_writeback();
            }
        }
        Ok(())
    }

    fn kick_writeback(&mut self) {
        if self.writeback.is_none() {
            let Ok(f) = self.file.try_clone() else { return };
            let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
            let spawned = std::thread::Builder::new()
                .name("pack-writeback".into())
                .spawn(move || {
                    while rx.recv().is_ok() {
                        // Errors surface at the commit's own sync.
                        let _ = f.sync_data();
                    }
                });
            if spawned.is_ok() {
                self.writeback = Some(tx);
            }
        }
        if let Some(tx) = &self.writeback {
            // Full means a sync is already under way: that will do.
            let _ = tx.try_send(());
        }
    }

    /// Whether no commit has named this pack yet (its directory entry may
    /// not be durable).
    pub fn is_new(&self) -> bool {
        self.committed_len == 0
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.flush()?;
        if self.synced_len != self.len {
            self.file.sync_data()?;
            self.synced_len = self.len;
        }
        Ok(())
    }

    /// Throws away everything past the committed length (after a failed or
    /// abandoned batch), so the pack holds no unindexed records.
    pub fn rollback(&mut self) -> io::Result<()> {
        self.buf.clear();
        let keep = self.committed_len.max(PACK_HEADER_LEN as u64);
        self.file.set_len(keep)?;
        self.len = keep;
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
    if ChunkId::of(&data) != *expect {
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
    Ok(&rec[RECORD_HEADER_LEN..])
}

/// One record found by scanning a pack without the index.
pub struct ScannedRecord {
    pub offset: u64,
    pub header: RecordHeader,
    /// Plaintext length from the blob header.
    pub raw_len: u32,
    /// The CRC matched and the blob header parsed.
    pub intact: bool,
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
        if want_records || !intact {
            records.push(ScannedRecord {
                offset: off,
                header: rh,
                raw_len: parsed.map(|h| h.raw_len).unwrap_or(0),
                intact,
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
