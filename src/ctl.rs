//! The control socket (decision 1): a mounted daemon owns the store, so
//! commands that need it (`stats`, `fsck`, later `snapctl`) talk to the
//! daemon through `STORE/ctl.sock` (mode 0600). One JSON request per line,
//! one JSON response per line: `{"ok": true, "result": ...}` or
//! `{"ok": false, "error": "..."}`.
//!
//! Calls nothing but std and serde_json; the daemon supplies the handler.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Value, json};

pub const SOCKET: &str = "ctl.sock";

pub fn socket_path(store: &Path) -> PathBuf {
    store.join(SOCKET)
}

/// A request handler: a command name and its arguments to a result.
pub type Handler = dyn Fn(&str, &Value) -> Result<Value, String> + Send + Sync;

/// The listening side, running on its own thread until dropped.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(store: &Path, handler: Arc<Handler>) -> io::Result<Server> {
        let path = socket_path(store);
        // A stale socket from a crashed daemon: we hold the store lock, so
        // nobody else is listening on it.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ctl".into())
            .spawn(move || {
                // Blocking accept: Drop wakes it with a connection of its
                // own. (Polling every 50 ms put up to 50 ms on every
                // snapctl call, a whole snapshot's budget.)
                loop {
                    let accepted = listener.accept();
                    if stop2.load(Ordering::Relaxed) {
                        return;
                    }
                    match accepted {
                        Ok((conn, _)) => {
                            let h = handler.clone();
                            let _ = std::thread::Builder::new()
                                .name("ctl-conn".into())
                                .spawn(move || serve(conn, &*h));
                        }
                        Err(e) => {
                            log::error!("control socket: {e}");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            })?;
        Ok(Server {
            path,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(conn: UnixStream, handler: &Handler) {
    let _ = conn.set_nonblocking(false);
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let reader = BufReader::new(conn);
    for line in reader.lines() {
        let Ok(line) = line else { return };
        let resp = match serde_json::from_str::<Value>(&line) {
            Ok(req) => {
                let cmd = req.get("cmd").and_then(|c| c.as_str()).unwrap_or("");
                let args = req.get("args").cloned().unwrap_or(Value::Null);
                match handler(cmd, &args) {
                    Ok(v) => json!({"ok": true, "result": v}),
                    Err(e) => json!({"ok": false, "error": e}),
                }
            }
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        if writeln!(out, "{resp}").is_err() {
            return;
        }
    }
}

/// Sends one request to the daemon of `store`.
pub fn call(store: &Path, cmd: &str, args: Value) -> Result<Value, String> {
    let path = socket_path(store);
    let conn = UnixStream::connect(&path)
        .map_err(|e| format!("cannot reach the daemon at {}: {e}", path.display()))?;
    let mut w = conn.try_clone().map_err(|e| e.to_string())?;
    writeln!(w, "{}", json!({"cmd": cmd, "args": args})).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&line).map_err(|e| format!("bad response: {e}"))?;
    if v.get("ok").and_then(|o| o.as_bool()) == Some(true) {
        Ok(v.get("result").cloned().unwrap_or(Value::Null))
    } else {
        Err(v
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("unknown error")
            .to_string())
    }
}

/// The mounts of dedupfs stores: (mountpoint, store), from the mount
/// table (our FSName is the store's absolute path).
pub fn dedupfs_mounts() -> Vec<(PathBuf, PathBuf)> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    let unescape = |s: &str| {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let src = f.next()?;
            let mnt = f.next()?;
            let fstype = f.next()?;
            if fstype != "fuse" && fstype != "fuse.dedupfs" {
                return None;
            }
            let store = PathBuf::from(unescape(src));
            crate::store::is_store(&store).then(|| (PathBuf::from(unescape(mnt)), store))
        })
        .collect()
}

/// The store mounted at `mountpoint`.
pub fn store_of_mount(mountpoint: &Path) -> Option<PathBuf> {
    let target = std::fs::canonicalize(mountpoint).ok()?;
    dedupfs_mounts()
        .into_iter()
        .find(|(m, _)| *m == target)
        .map(|(_, s)| s)
}

/// The dedupfs mount that contains `path` (the deepest one): (mountpoint,
/// store).
pub fn mount_containing(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let p = std::fs::canonicalize(path).ok()?;
    dedupfs_mounts()
        .into_iter()
        .filter(|(m, _)| p.starts_with(m))
        .max_by_key(|(m, _)| m.as_os_str().len())
}

/// Where `store` is mounted, if it is.
pub fn mountpoint_of_store(store: &Path) -> Option<PathBuf> {
    let s = std::fs::canonicalize(store).ok()?;
    dedupfs_mounts()
        .into_iter()
        .find(|(_, st)| *st == s)
        .map(|(m, _)| m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let t = tempfile::tempdir().unwrap();
        let h: Arc<Handler> = Arc::new(|cmd: &str, args: &Value| match cmd {
            "echo" => Ok(args.clone()),
            other => Err(format!("unknown command {other}")),
        });
        let server = Server::start(t.path(), h).unwrap();
        let mode = std::fs::metadata(socket_path(t.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            call(t.path(), "echo", json!({"a": 1})).unwrap(),
            json!({"a": 1})
        );
        assert_eq!(
            call(t.path(), "nope", Value::Null).unwrap_err(),
            "unknown command nope"
        );
        drop(server);
        assert!(!socket_path(t.path()).exists());
        assert!(call(t.path(), "echo", Value::Null).is_err());
    }
}
