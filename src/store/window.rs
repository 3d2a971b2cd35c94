//! Reading pack records with O_DIRECT, through a small cache of windows.
//!
//! Why: on the machines we measure, filling fresh page-cache pages costs
//! more than the disk read itself. A cold 4 GiB `dd` took 8.6 to 11.4 s
//! buffered (8 to 10 s of it system time) and 5.0 to 5.7 s with
//! `iflag=direct` (0.3 to 0.5 s system). A cold read through the mount
//! filled the page cache twice, once with pack bytes and once with the
//! file's. Reading packs with O_DIRECT into reused buffers leaves only the
//! second, which reading the same file from the disk pays too.
//!
//! A record no cached window holds is read as the aligned span around it.
//! When that span starts where the previous window read from the same pack
//! ended (a sequential read), `SEQ_WINDOW` bytes are read instead, and the
//! records that follow are cut from them. A window is read once: threads
//! that need it while it is being read wait for that read.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;

use crate::format::PackId;

/// O_DIRECT offsets, lengths and memory are aligned to this.
const ALIGN: u64 = 4096;
/// What a sequential read reads at a time.
const SEQ_WINDOW: u64 = 1 << 20;
/// A miss this close to where the pack's last window ended counts as
/// sequential (records of other files may sit in between).
const SEQ_SLACK: u64 = 256 << 10;
/// Window bytes kept; the oldest window goes first. A sequential read
/// needs a few (one per request in flight); the rest serve re-reads.
const CACHE_BYTES: u64 = 32 << 20;
/// Full-size buffers kept for reuse: memory the process already touched
/// costs nothing to fill again, fresh memory does (see above).
const POOL_MAX: usize = 16;

type Pool = Mutex<Vec<Vec<u8>>>;

/// Aligned bytes read from a pack; the memory goes back to the pool.
struct Buf {
    mem: Vec<u8>,
    off: usize,
    len: usize,
    pool: Weak<Pool>,
}

impl Buf {
    fn bytes(&self) -> &[u8] {
        &self.mem[self.off..self.off + self.len]
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if self.mem.len() != (SEQ_WINDOW + ALIGN) as usize {
            return;
        }
        if let Some(pool) = self.pool.upgrade() {
            let mut p = pool.lock();
            if p.len() < POOL_MAX {
                p.push(std::mem::take(&mut self.mem));
            }
        }
    }
}

struct Slot {
    start: u64,
    /// Planned length; a read at the end of the pack may return less.
    len: u64,
    data: OnceLock<Result<Buf, ReadError>>,
}

/// A failed window read, kept so every waiter gets the same error
/// (io::Error is not Clone; ENOSPC, EIO and EINVAL must stay themselves).
struct ReadError {
    kind: io::ErrorKind,
    os: Option<i32>,
    msg: String,
}

impl ReadError {
    fn from_io(e: &io::Error) -> ReadError {
        ReadError {
            kind: e.kind(),
            os: e.raw_os_error(),
            msg: e.to_string(),
        }
    }

    fn to_io(&self) -> io::Error {
        match self.os {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(self.kind, self.msg.clone()),
        }
    }
}

#[derive(Default)]
struct State {
    map: BTreeMap<(PackId, u64), Arc<Slot>>,
    order: VecDeque<(PackId, u64)>,
    bytes: u64,
    /// Where the last window read from each pack ends.
    last_end: HashMap<PackId, u64>,
}

/// A record's bytes inside a cached window.
pub struct Record {
    slot: Arc<Slot>,
    from: usize,
    len: usize,
}

impl Record {
    pub fn bytes(&self) -> &[u8] {
        match self.slot.data.get() {
            Some(Ok(b)) => &b.bytes()[self.from..self.from + self.len],
            // A Record is only made from a slot read without error.
            _ => &[],
        }
    }
}

pub struct Windows {
    state: Mutex<State>,
    pool: Arc<Pool>,
}

impl Default for Windows {
    fn default() -> Self {
        Windows {
            state: Mutex::new(State::default()),
            pool: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

impl Windows {
    /// The `len` bytes at `off` of pack `pack`, whose O_DIRECT handle is
    /// `file`. EINVAL means the filesystem refuses these direct reads.
    pub fn record(&self, pack: PackId, file: &File, off: u64, len: u64) -> io::Result<Record> {
        // A window read short (the pack has grown since) is read again once.
        for _ in 0..2 {
            let slot = self.slot_for(pack, off, len);
            let got = slot.data.get_or_init(|| {
                self.read(file, slot.start, slot.len)
                    .map_err(|e| ReadError::from_io(&e))
            });
            match got {
                Ok(b) if slot.start + b.len as u64 >= off + len => {
                    return Ok(Record {
                        from: (off - slot.start) as usize,
                        len: len as usize,
                        slot,
                    });
                }
                Ok(_) => self.forget(pack, &slot),
                Err(e) => {
                    let e = e.to_io();
                    self.forget(pack, &slot);
                    return Err(e);
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "record runs past the end of the pack",
        ))
    }

    /// Drops every window of a pack (it is about to be removed).
    pub fn forget_pack(&self, pack: PackId) {
        let mut st = self.state.lock();
        let keys: Vec<(PackId, u64)> = st
            .map
            .range((pack, 0)..=(pack, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            if let Some(s) = st.map.remove(&k) {
                st.bytes -= s.len;
            }
        }
        st.order.retain(|k| k.0 != pack);
        st.last_end.remove(&pack);
    }

    /// The window holding [off, off + len), planned and cached if none does.
    fn slot_for(&self, pack: PackId, off: u64, len: u64) -> Arc<Slot> {
        let end = off + len;
        let mut st = self.state.lock();
        // A window planned over the range but already read short (its pack
        // has grown since) does not hold it: plan a new one. Waiting on it
        // again is how two short windows used up both attempts and a whole
        // record read as "past the end of the pack".
        if let Some((_, s)) = st.map.range((pack, 0)..=(pack, off)).next_back()
            && s.start + s.len >= end
            && !matches!(s.data.get(), Some(Ok(b)) if s.start + (b.len as u64) < end)
        {
            return s.clone();
        }
        let start = off - off % ALIGN;
        let span_end = end.next_multiple_of(ALIGN);
        let sequential = st
            .last_end
            .get(&pack)
            .is_some_and(|&e| start <= e && e - start <= SEQ_SLACK);
        let wlen = if sequential {
            (span_end - start).max(SEQ_WINDOW)
        } else {
            span_end - start
        };
        let slot = Arc::new(Slot {
            start,
            len: wlen,
            data: OnceLock::new(),
        });
        if let Some(old) = st.map.insert((pack, start), slot.clone()) {
            st.bytes -= old.len;
        }
        st.order.push_back((pack, start));
        st.bytes += wlen;
        if st.last_end.len() > 4096 {
            st.last_end.clear();
        }
        st.last_end.insert(pack, start + wlen);
        while st.bytes > CACHE_BYTES {
            let Some(k) = st.order.pop_front() else { break };
            if let Some(s) = st.map.remove(&k) {
                st.bytes -= s.len;
            }
        }
        slot
    }

    /// Removes `slot` from the cache if it is still the one cached there.
    fn forget(&self, pack: PackId, slot: &Arc<Slot>) {
        let mut st = self.state.lock();
        let key = (pack, slot.start);
        if st.map.get(&key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            st.map.remove(&key);
            st.bytes -= slot.len;
        }
    }

    fn read(&self, file: &File, start: u64, len: u64) -> io::Result<Buf> {
        let n = len as usize;
        // Only full windows take pooled memory; a record-sized read keeps
        // a record-sized buffer, so the cache's byte count is its memory.
        let mut mem = if len == SEQ_WINDOW {
            self.pool.lock().pop().unwrap_or_default()
        } else {
            Vec::new()
        };
        if mem.len() < n + ALIGN as usize {
            mem = vec![0u8; n + ALIGN as usize];
        }
        let off = mem.as_ptr().align_offset(ALIGN as usize);
        let mut got = 0usize;
        while got < n {
            // Aligned: off and start are, and `got` stays a multiple of
            // ALIGN until the short read at the end of the file.
            match file.read_at(&mut mem[off + got..off + n], start + got as u64) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if !got.is_multiple_of(ALIGN as usize) {
                break;
            }
        }
        Ok(Buf {
            mem,
            off,
            len: got,
            pool: Arc::downgrade(&self.pool),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs::OpenOptions;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2] ^ seed)
            .collect()
    }

    fn direct(path: &std::path::Path) -> File {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .expect("O_DIRECT open (the test needs a filesystem that allows it)")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Reads in any order, sequential runs and jumps, across window
        /// edges and up to the end of the file, return exactly the file's
        /// bytes; a read past the end is an error, not short data.
        #[test]
        fn records_read_back_exactly(
            len in 1usize..(3 << 20),
            reads in prop::collection::vec((0.0f64..1.0, 1u64..70_000, any::<bool>()), 1..60),
        ) {
            let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let path = dir.path().join("pack");
            let data = pattern(len, 7);
            std::fs::write(&path, &data).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let f = direct(&path);
            let w = Windows::default();
            let mut next = 0u64;
            for (at, n, follow) in reads {
                let off = if follow { next } else { (at * len as f64) as u64 };
                let got = w.record(PackId(1), &f, off, n);
                if off + n <= len as u64 {
                    let r = got.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(r.bytes(), &data[off as usize..(off + n) as usize]);
                } else {
                    prop_assert!(got.is_err(), "read past the end at {off}+{n} of {len}");
                }
                next = (off + n) % len as u64;
            }
        }
    }

    /// A window read while the pack was shorter is read again once the
    /// pack has grown (packs are appended to while they are read).
    #[test]
    fn a_short_window_is_read_again_after_the_pack_grows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pack");
        let data = pattern(3 << 20, 3);
        std::fs::write(&path, &data[..100_000]).unwrap();
        let f = direct(&path);
        let w = Windows::default();
        // Sequential reads, so the second plans a full window past the end.
        assert_eq!(
            w.record(PackId(1), &f, 0, 50_000).unwrap().bytes(),
            &data[..50_000]
        );
        assert_eq!(
            w.record(PackId(1), &f, 50_000, 50_000).unwrap().bytes(),
            &data[50_000..100_000]
        );
        assert!(w.record(PackId(1), &f, 100_000, 10_000).is_err());
        let mut a = OpenOptions::new().append(true).open(&path).unwrap();
        a.write_all(&data[100_000..]).unwrap();
        a.sync_all().unwrap();
        for off in [60_000u64, 100_000, 1_500_000, 3_000_000] {
            let r = w.record(PackId(1), &f, off, 100_000).unwrap();
            assert_eq!(
                r.bytes(),
                &data[off as usize..off as usize + 100_000],
                "at {off}"
            );
        }
    }
}
