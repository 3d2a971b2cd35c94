//! What the volume reports about itself for `dedupfs status` and the
//! metrics page: its counters, and the ingest backlog read at the moment.
//! Reads only; never called under a request.
//!
//! Calls the core (`staged`, `pending`).

use super::*;

/// Files written and not yet committed by ingest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Backlog {
    /// Files closed and queued for ingest, not yet committed.
    pub queued_files: u64,
    /// Files with a staging state (open for writing, or waiting).
    pub staged_files: u64,
    /// Their sizes, summed.
    pub staged_bytes: u64,
    /// Bytes of them written since their last commit: what ingest has
    /// left to chunk.
    pub pending_bytes: u64,
}

impl Volume {
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The ingest backlog now. Takes each staged file's lock in turn, after
    /// the map's (the lock order puts a `Staged` lock first), like
    /// `queue_idle_staged`.
    pub fn backlog(&self) -> Backlog {
        let queued_files = *self.pending.lock();
        let all: Vec<Arc<Mutex<Staged>>> = self.staged.lock().values().cloned().collect();
        let mut b = Backlog {
            queued_files,
            staged_files: all.len() as u64,
            ..Backlog::default()
        };
        for st in all {
            let st = st.lock();
            b.staged_bytes += st.size;
            // A whole staging file (passthrough) is written by the kernel
            // unseen: all of it may have changed.
            b.pending_bytes += if st.whole { st.size } else { st.dirty.total() };
        }
        b
    }

    /// How long the volume has been up.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Cache;

    #[test]
    fn backlog_and_counters_follow_a_write_through_ingest() {
        let dir = tempfile::tempdir().unwrap();
        Repo::init(dir.path(), &store::InitOptions::default()).unwrap();
        let vol = Volume::start(Repo::open(dir.path()).unwrap(), false, 1).unwrap();
        let root = Caller { uid: 0, gid: 0 };
        let a = vol
            .make_node(root, meta::ROOT_INO, b"f", Kind::File, 0o644, 0, 0, None)
            .unwrap();
        let o = vol.open_file(a.ino, libc::O_WRONLY, false).unwrap();
        vol.write(o.fh, 0, &[7u8; 5000]).unwrap();
        let b = vol.backlog();
        assert_eq!((b.staged_files, b.staged_bytes), (1, 5000), "{b:?}");
        assert!(b.pending_bytes >= 5000, "{b:?}");
        vol.release(o.fh).unwrap();
        assert!(vol.wait_all_committed(Duration::from_secs(30)));
        assert_eq!(vol.backlog(), Backlog::default());
        let t = vol.metrics().ingest_totals();
        assert_eq!((t.files, t.bytes), (1, 5000), "{t:?}");
        assert!(t.commits >= 1 && vol.metrics().last_commit().is_some());
        // The first read builds the chunk map, the second finds it.
        for _ in 0..2 {
            assert_eq!(vol.read(a.ino, 0, 8192).unwrap().len(), 5000);
        }
        let (hits, misses) = vol.metrics().cache_counts(Cache::ChunkMap);
        assert!(
            hits >= 1 && misses >= 1,
            "chunk map: {hits} hits, {misses} misses"
        );
        let (hits, misses) = vol.metrics().cache_counts(Cache::Chunk);
        assert!(
            hits >= 1 && misses >= 1,
            "chunks: {hits} hits, {misses} misses"
        );
        // A second read-only open of an unchanged file keeps the kernel's pages.
        for _ in 0..2 {
            let o = vol.open_file(a.ino, libc::O_RDONLY, false).unwrap();
            vol.release(o.fh).unwrap();
        }
        assert_eq!(vol.metrics().cache_counts(Cache::KernelPages), (1, 1));
        vol.shutdown();
    }
}
