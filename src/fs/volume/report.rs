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
