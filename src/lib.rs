//! dedupfs: a deduplicating filesystem for a home directory.
//!
//! Layers, lowest first; each calls only those below it:
//! `format` (persisted types) -> `chunker` -> `store` (packs + chunk index)
//! -> `meta` (records that hold references) -> `repo` (orders store and meta
//! commits, fsck, stats) -> `fs` (the live filesystem and its fuser layer)
//! -> `snapcmd` (snapctl's operations and the retention policy), `status`
//! (`dedupfs status`, the metrics page) -> `ctl`
//! (the daemon's control socket) -> the `dedupfs` and `snapctl` binaries
//! (thin CLIs). `metrics` (counters, std only) sits beside `format`: `fs`
//! records into it, `status` renders it. `tlsconf` (rustls settings for
//! both ends of the mirror protocol) sits below `serve`.
#![forbid(unsafe_code)]

pub mod chunker;
pub mod cli;
pub mod ctl;
pub mod format;
pub mod fs;
pub mod guard;
pub mod ingest;
pub mod meta;
pub mod metrics;
pub mod mirror;
pub mod repo;
pub mod seal;
pub mod serve;
pub mod snap;
pub mod snapcmd;
pub mod status;
pub mod store;
pub mod tlsconf;
pub mod tree;

/// Progress of a long operation; the CLI draws it, the library only reports.
pub trait Progress: Sync {
    fn set_len(&self, _len: u64) {}
    fn inc(&self, _n: u64) {}
}

/// Reports nothing.
pub struct NoProgress;
impl Progress for NoProgress {}
