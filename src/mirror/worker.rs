//! The daemon's mirror thread: after each snapshot, and on a retry
//! schedule with backoff after a failure, it runs `push` for every remote
//! of the store. It reads the store through short transactions and never
//! takes a lock a FUSE request waits on for long, so requests go on while
//! it runs.
//!
//! The daemon hands it a way to reach the store (`WithRepo`) instead of
//! the volume: this module stays below `fs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::{Remote, Status, unix_now};
use crate::repo::Repo;

/// Runs the closure it is given with the store; false once the store is
/// gone (the daemon stopping).
pub type WithRepo = Box<dyn Fn(&mut dyn FnMut(&Repo)) -> bool + Send + Sync>;

/// How often the thread looks for a new snapshot without being woken.
const TICK: Duration = Duration::from_secs(5);
/// Backoff after failures: 30 s doubling, at most an hour.
const BACKOFF_FIRST: i64 = 30;
const BACKOFF_MAX: i64 = 3600;

struct Inner {
    store: PathBuf,
    woken: Mutex<bool>,
    cv: Condvar,
    stop: AtomicBool,
}

pub struct Worker {
    inner: Arc<Inner>,
}

impl Worker {
    pub fn start(store: PathBuf, with_repo: WithRepo) -> std::io::Result<Worker> {
        let inner = Arc::new(Inner {
            store,
            woken: Mutex::new(true),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let i = inner.clone();
        std::thread::Builder::new()
            .name("mirror".into())
            .stack_size(16 << 20)
            .spawn(move || run(&i, &with_repo))?;
        Ok(Worker { inner })
    }

    /// Looks at every remote now (a snapshot was taken, a push asked for).
    pub fn wake(&self) {
        *self.inner.woken.lock() = true;
        self.inner.cv.notify_one();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.cv.notify_one();
    }
}

/// The delay before attempt `failures + 1`, with up to 10% jitter.
pub fn backoff(failures: u32) -> i64 {
    let base = BACKOFF_FIRST
        .saturating_mul(1i64 << failures.saturating_sub(1).min(20))
        .min(BACKOFF_MAX);
    let mut b = [0u8; 2];
    let jitter = if getrandom::fill(&mut b).is_ok() {
        i64::from(u16::from_le_bytes(b)) * base / 10 / 65536
    } else {
        0
    };
    base + jitter
}

fn run(inner: &Inner, with_repo: &WithRepo) {
    let mut last_newest: Option<String> = None;
    loop {
        let woken = {
            let mut w = inner.woken.lock();
            if !*w {
                inner.cv.wait_for(&mut w, TICK);
            }
            std::mem::replace(&mut *w, false)
        };
        if inner.stop.load(Ordering::SeqCst) {
            return;
        }
        let names = Remote::names(&inner.store);
        if names.is_empty() {
            continue;
        }
        let mut newest = None;
        let alive = with_repo(&mut |repo| {
            if let Ok(rt) = repo.meta().begin_read()
                && let Ok(all) = crate::snap::load_snaps(&rt)
            {
                newest = all
                    .iter()
                    .max_by_key(|(_, r)| r.generation)
                    .map(|(n, _)| n.clone());
            }
        });
        if !alive {
            return;
        }
        let Some(newest) = newest else { continue };
        let changed = last_newest.as_ref() != Some(&newest);
        last_newest = Some(newest.clone());
        for name in names {
            let remote = match Remote::open(&inner.store, &name) {
                Ok(r) => r,
                Err(e) => {
                    log::error!("remote {name}: {e}");
                    continue;
                }
            };
            let st = remote.status();
            let now = unix_now();
            let due = if st.failures_in_a_row > 0 {
                st.next_attempt.is_none_or(|t| t <= now)
            } else {
                woken || changed || st.last_snapshot.as_deref() != Some(newest.as_str())
            };
            if !due || inner.stop.load(Ordering::SeqCst) {
                continue;
            }
            let alive = with_repo(&mut |repo| {
                // The outcome is in the remote's status (and the log).
                let _ = run_logged(repo, &remote);
            });
            if !alive {
                return;
            }
        }
    }
}

/// One push with its status recorded (the daemon's and `remote push`'s).
pub fn run_logged(repo: &Repo, remote: &Remote) -> Result<super::push::Report, String> {
    run_logged_only(repo, remote, None)
}

pub fn run_logged_only(
    repo: &Repo,
    remote: &Remote,
    only: Option<&str>,
) -> Result<super::push::Report, String> {
    let started = unix_now();
    let t0 = std::time::Instant::now();
    let res = super::push::push(repo, remote, only);
    let mut st: Status = remote.status();
    st.remote = remote.name.clone();
    st.url = remote.cfg.url.clone();
    st.last_run_started = Some(started);
    st.last_run_seconds = Some(t0.elapsed().as_secs_f64());
    match &res {
        Ok(rep) => {
            if let Some(last) = rep.snapshots.last() {
                st.last_snapshot = Some(last.clone());
                st.last_mirrored = Some(unix_now());
                if let Ok(rt) = repo.meta().begin_read()
                    && let Ok(all) = crate::snap::load_snaps(&rt)
                {
                    st.last_snapshot_created =
                        all.iter().find(|(n, _)| n == last).map(|(_, r)| r.created);
                }
                st.referenced_bytes = Some(rep.referenced_bytes);
            }
            // "Last run": the last that mirrored something.
            if !rep.snapshots.is_empty() {
                st.bytes_sent_last_run = rep.bytes_sent;
            }
            st.bytes_sent_total += rep.bytes_sent;
            st.blobs_sent_total += rep.blobs_sent;
            st.last_error = None;
            st.failures_in_a_row = 0;
            st.next_attempt = None;
        }
        Err(e) => {
            log::error!("remote {}: mirror failed: {e}", remote.name);
            st.last_error = Some(e.clone());
            st.failures_in_a_row += 1;
            st.next_attempt = Some(unix_now() + backoff(st.failures_in_a_row));
        }
    }
    remote.save_status(&st);
    res
}
