//! Panics become errors. A panic under a FUSE request took the mount down
//! ("Transport endpoint is not connected"), and redb panics on a page
//! damaged outside it, so one damaged page made every command exit 101.
//! This module catches a panic where a request, a background round or a
//! command runs, and logs where it happened once; callers turn it into
//! their own error (EIO for a request, a one-line message for a command).
//! It calls nothing of the crate.

use std::panic::{self, AssertUnwindSafe};

/// What a caught panic said.
#[derive(Debug, Clone)]
pub struct Panicked(pub String);

impl std::fmt::Display for Panicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "internal error: {}", self.0)
    }
}

impl std::error::Error for Panicked {}

/// Runs `f`, turning a panic into `Err`.
///
/// Callers hold no lock across `f` that a half-done `f` could leave
/// inconsistent: parking_lot locks do not poison, redb aborts the
/// transactions a panic drops, and a store that failed mid-write marks
/// itself failed.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, Panicked> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = if let Some(s) = p.downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = p.downcast_ref::<String>() {
            s.clone()
        } else {
            "a panic without a message".to_string()
        };
        Panicked(msg)
    })
}

/// Replaces the default hook, which printed a panic's message and a note
/// about backtraces to stderr, with one log line at `level` naming the
/// thread and place (and a backtrace when RUST_BACKTRACE asks for one).
pub fn install_hook(level: log::Level) {
    panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let place = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            String::new()
        };
        let bt = std::backtrace::Backtrace::capture();
        if bt.status() == std::backtrace::BacktraceStatus::Captured {
            log::log!(level, "panic in thread {name} at {place}: {msg}\n{bt}");
        } else {
            log::log!(level, "panic in thread {name} at {place}: {msg}");
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message() {
        let r: Result<u32, _> = catch(|| panic!("page {} is damaged", 7));
        assert_eq!(r.unwrap_err().0, "page 7 is damaged");
        assert_eq!(catch(|| 5).unwrap(), 5);
    }
}
