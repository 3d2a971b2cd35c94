//! Where a target keeps sealed blobs: a storage trait, and its first
//! implementation, a directory (the embedded default; an object store
//! follows, issue 16). A blob is durable when `put` returns.
//!
//! Calls std only.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::PathBuf;

pub type Name = [u8; 32];

pub fn hex(n: &Name) -> String {
    n.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_name(s: &str) -> Option<Name> {
    if s.len() != 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Storage for sealed blobs, named by the hash of their bytes.
pub trait BlobStore: Send + Sync {
    /// Stores `bytes` under `name`, durably, before returning.
    fn put(&self, name: &Name, bytes: &[u8]) -> io::Result<()>;
    /// The blob's bytes, or None.
    fn get(&self, name: &Name) -> io::Result<Option<Vec<u8>>>;
    /// Removes a blob (no error if it is gone).
    fn delete(&self, name: &Name) -> io::Result<()>;
}

/// Blobs as files `DIR/ab/cdef...` (the first byte names the directory),
/// written to a temporary name, fsynced, renamed, the directory fsynced.
pub struct DirStore {
    dir: PathBuf,
}

impl DirStore {
    pub fn open(dir: PathBuf) -> io::Result<DirStore> {
        fs::create_dir_all(&dir)?;
        Ok(DirStore { dir })
    }

    fn path(&self, name: &Name) -> PathBuf {
        let h = hex(name);
        self.dir.join(&h[..2]).join(&h[2..])
    }
}

impl BlobStore for DirStore {
    fn put(&self, name: &Name, bytes: &[u8]) -> io::Result<()> {
        let path = self.path(name);
        let parent = path
            .parent()
            .ok_or_else(|| io::Error::other("blob path has no parent"))?;
        fs::create_dir_all(parent)?;
        let tmp = parent.join(format!(".tmp.{}.{}", hex(name), std::process::id()));
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &path)?;
        File::open(parent)?.sync_all()
    }

    fn get(&self, name: &Name) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.path(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn delete(&self, name: &Name) -> io::Result<()> {
        match fs::remove_file(self.path(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_only_as_64_lowercase_hex() {
        let n = [0xabu8; 32];
        assert_eq!(parse_name(&hex(&n)), Some(n));
        assert_eq!(parse_name(&hex(&n).to_uppercase()), None);
        assert_eq!(parse_name("ab"), None);
        assert_eq!(parse_name(&"g".repeat(64)), None);
        assert_eq!(parse_name(&"../".repeat(21)), None);
    }

    #[test]
    fn a_directory_store_keeps_what_it_is_given() {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::open(d.path().join("blobs")).unwrap();
        let n = [7u8; 32];
        assert_eq!(s.get(&n).unwrap(), None);
        s.put(&n, b"sealed").unwrap();
        assert_eq!(s.get(&n).unwrap().as_deref(), Some(&b"sealed"[..]));
        s.delete(&n).unwrap();
        s.delete(&n).unwrap();
        assert_eq!(s.get(&n).unwrap(), None);
    }
}
