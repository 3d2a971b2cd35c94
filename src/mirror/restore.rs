//! Reading a remote back: finding a snapshot's root, walking its sealed
//! trees, and writing files, trees or a whole store from them. Every blob
//! fetched is checked against its name, opened under its key and, for a
//! chunk, checked against its SHA-1; a chunk the local store already holds
//! is read from there instead of fetched.
//!
//! `recover` rebuilds a store on an empty machine: it mounts a new store,
//! writes each snapshot into it (only what changed from the one before),
//! snapshots it under its old name and labels, and leaves the remote
//! configured so the mirror continues from there.

use std::collections::HashMap;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::client::Client;
use super::wire::{self, Body, ChunkEnt, Entry, Name, Root, Segment, Tree};
use super::{Keys, Remote};
use crate::format::{ChunkId, Kind};
use crate::store::Store;

type R<T> = Result<T, String>;

fn s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// What a restore or recovery did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub snapshot: String,
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub blobs_fetched: u64,
    pub bytes_fetched: u64,
    pub chunks_local: u64,
}

/// Reads a host's blobs from a target.
pub struct Reader<'a> {
    pub client: &'a Client,
    pub keys: &'a Keys,
    pub local: Option<&'a Store>,
    pub rep: Report,
    /// Every chunk seen in a tree: its SHA-1 and sealed name (a recovery
    /// seeds the mirror's name cache with them).
    pub names: HashMap<[u8; 20], Name>,
}

impl<'a> Reader<'a> {
    pub fn new(client: &'a Client, keys: &'a Keys, local: Option<&'a Store>) -> Reader<'a> {
        Reader {
            client,
            keys,
            local,
            rep: Report::default(),
            names: HashMap::new(),
        }
    }

    fn fetch(&mut self, n: &Name) -> R<Vec<u8>> {
        let b = self.client.get(n).map_err(s)?;
        self.rep.blobs_fetched += 1;
        self.rep.bytes_fetched += b.len() as u64;
        Ok(b)
    }

    pub fn tree(&mut self, n: &Name) -> R<Tree> {
        let b = self.fetch(n)?;
        let t: Tree = wire::open_blob(&self.keys.meta, &b)
            .map_err(|e| format!("tree {}: {e}", wire::hex(n)))?;
        for e in &t.entries {
            if let Body::Chunks(c) = &e.body {
                self.note(c);
            }
        }
        Ok(t)
    }

    fn note(&mut self, chunks: &[ChunkEnt]) {
        for c in chunks.iter().filter(|c| !c.is_hole()) {
            self.names.insert(c.id, c.name);
        }
    }

    /// A file's chunk list, segments fetched.
    pub fn chunks(&mut self, body: &Body) -> R<Vec<ChunkEnt>> {
        Ok(match body {
            Body::Chunks(c) => c.clone(),
            Body::Segments(segs) => {
                let mut out = Vec::new();
                for sref in segs {
                    let b = self.fetch(&sref.name)?;
                    let seg: Segment = wire::open_blob(&self.keys.meta, &b)
                        .map_err(|e| format!("segment {}: {e}", wire::hex(&sref.name)))?;
                    self.note(&seg.chunks);
                    out.extend(seg.chunks);
                }
                out
            }
            _ => Vec::new(),
        })
    }

    /// A chunk's bytes: from the local store when it has them, else
    /// fetched, opened and checked.
    pub fn chunk(&mut self, c: &ChunkEnt) -> R<Vec<u8>> {
        let id = ChunkId(c.id);
        if let Some(st) = self.local
            && st.lookup(&id).map_err(s)?.is_some()
            && let Ok(b) = st.read_chunk(&id)
        {
            self.rep.chunks_local += 1;
            return Ok(b);
        }
        let sealed = self.fetch(&c.name)?;
        let blob = crate::seal::open_chunk(&sealed, &id, &self.keys.secret)
            .map_err(|e| format!("chunk {id}: {e}"))?;
        crate::store::pack::decode_blob_as(&blob, &id, true).map_err(|e| format!("chunk {id}: {e}"))
    }
}

/// Every root this host has on the target, opened and checked, oldest
/// first: (id, root).
pub fn roots(client: &Client, keys: &Keys) -> R<Vec<(Name, Root)>> {
    let mut out = Vec::new();
    for (id, _, seq) in client.roots().map_err(s)? {
        let sealed = client.root(&id).map_err(s)?;
        let r = wire::open_root(&keys.meta, &sealed)
            .map_err(|e| format!("root {}: {e}", wire::hex(&id)))?;
        if r.seq != seq {
            return Err(format!(
                "root {} says it was committed at {} but the target lists it at {seq}: refusing it",
                wire::hex(&id),
                r.seq
            ));
        }
        out.push((id, r));
    }
    out.sort_by_key(|(_, r)| r.seq);
    Ok(out)
}

/// Restores `path` of remote snapshot `snap` to `dest` (which must not
/// exist).
pub fn restore(
    remote: &Remote,
    local: Option<&Store>,
    snap: &str,
    path: &[u8],
    dest: &Path,
) -> R<Report> {
    if fs::symlink_metadata(dest).is_ok() {
        return Err(format!(
            "{}: exists; restore writes a new path",
            dest.display()
        ));
    }
    let client = remote.client()?;
    let all = roots(&client, &remote.keys)?;
    let (_, root) = all
        .into_iter()
        .rev()
        .find(|(_, r)| r.snapshot == snap)
        .ok_or_else(|| format!("remote {} has no snapshot {snap}", remote.name))?;
    let mut rd = Reader::new(&client, &remote.keys, local);
    rd.rep.snapshot = snap.to_string();
    let mut entry = root.top.clone();
    for c in crate::tree::components(path) {
        let Body::Tree(t) = &entry.body else {
            return Err(format!("{}: not a directory", String::from_utf8_lossy(c)));
        };
        let tree = rd.tree(t)?;
        entry = tree
            .entries
            .into_iter()
            .find(|e| e.name == c)
            .ok_or_else(|| {
                format!(
                    "{} is not in snapshot {snap}",
                    String::from_utf8_lossy(path)
                )
            })?;
    }
    let mut links = HashMap::new();
    write_entry(&mut rd, &entry, dest, &mut links)?;
    Ok(rd.rep)
}

/// Owner, mode, extended attributes and times of `e` onto `p`.
fn apply_attrs(e: &Entry, p: &Path) -> R<()> {
    use rustix::fs::{AtFlags, CWD, Gid, Mode, Timespec, Timestamps, Uid, XattrFlags};
    let err = |what: &str, x: rustix::io::Errno| format!("{what} {}: {x}", p.display());
    let symlink = e.kind == Kind::Symlink as u8;
    let owner = rustix::fs::chownat(
        CWD,
        p,
        Some(Uid::from_raw(e.uid)),
        Some(Gid::from_raw(e.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    );
    match owner {
        // Not root: the files are the restorer's.
        Ok(()) | Err(rustix::io::Errno::PERM) => {}
        Err(x) => return Err(err("chown", x)),
    }
    if !symlink {
        rustix::fs::chmod(p, Mode::from_raw_mode(e.perm)).map_err(|x| err("chmod", x))?;
    }
    for (k, v) in &e.xattrs {
        let name = std::ffi::OsStr::from_bytes(k);
        match rustix::fs::lsetxattr(p, name, v, XattrFlags::empty()) {
            Ok(()) => {}
            // A namespace this filesystem or user may not set (trusted.*
            // as non-root): said, and the rest goes on.
            Err(x @ (rustix::io::Errno::PERM | rustix::io::Errno::NOTSUP)) => {
                log::info!("{}: xattr {name:?} not restored: {x}", p.display());
            }
            Err(x) => return Err(err("setxattr", x)),
        }
    }
    let ts = Timestamps {
        last_access: Timespec {
            tv_sec: e.atime.0,
            tv_nsec: e.atime.1.into(),
        },
        last_modification: Timespec {
            tv_sec: e.mtime.0,
            tv_nsec: e.mtime.1.into(),
        },
    };
    rustix::fs::utimensat(CWD, p, &ts, AtFlags::SYMLINK_NOFOLLOW).map_err(|x| err("utimensat", x))
}

/// Writes one entry (and, for a directory, everything below it) at `p`.
fn write_entry(
    rd: &mut Reader<'_>,
    e: &Entry,
    p: &Path,
    links: &mut HashMap<u64, PathBuf>,
) -> R<()> {
    let kind = Kind::from_code(e.kind).map_err(s)?;
    match kind {
        Kind::Dir => {
            fs::create_dir(p).map_err(|x| format!("{}: {x}", p.display()))?;
            rd.rep.dirs += 1;
            if let Body::Tree(t) = &e.body {
                let tree = rd.tree(t)?;
                for child in &tree.entries {
                    write_entry(
                        rd,
                        child,
                        &p.join(std::ffi::OsStr::from_bytes(&child.name)),
                        links,
                    )?;
                }
            }
        }
        Kind::File => {
            if e.link != 0
                && let Some(first) = links.get(&e.link)
            {
                fs::hard_link(first, p).map_err(|x| format!("{}: {x}", p.display()))?;
                return Ok(());
            }
            write_file(rd, e, p)?;
            if e.link != 0 {
                links.insert(e.link, p.to_path_buf());
            }
        }
        Kind::Symlink => {
            let Body::Inline(t) = &e.body else {
                return Err(format!("{}: a symlink without a target", p.display()));
            };
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(t), p)
                .map_err(|x| format!("{}: {x}", p.display()))?;
        }
        Kind::Fifo | Kind::CharDev | Kind::BlockDev | Kind::Socket => {
            use rustix::fs::FileType;
            let t = match kind {
                Kind::Fifo => FileType::Fifo,
                Kind::CharDev => FileType::CharacterDevice,
                Kind::BlockDev => FileType::BlockDevice,
                _ => FileType::Socket,
            };
            rustix::fs::mknodat(
                rustix::fs::CWD,
                p,
                t,
                rustix::fs::Mode::from_raw_mode(0o600),
                u64::from(e.rdev),
            )
            .map_err(|x| format!("mknod {}: {x}", p.display()))?;
        }
    }
    apply_attrs(e, p)
}

fn write_file(rd: &mut Reader<'_>, e: &Entry, p: &Path) -> R<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(p)
        .map_err(|x| format!("{}: {x}", p.display()))?;
    let err = |x: std::io::Error| format!("{}: {x}", p.display());
    match &e.body {
        Body::Inline(b) => f.write_all(b).map_err(err)?,
        Body::Chunks(_) | Body::Segments(_) => {
            let list = rd.chunks(&e.body)?;
            let mut off = 0u64;
            for c in &list {
                if !c.is_hole() {
                    let data = rd.chunk(c)?;
                    if data.len() != c.len as usize {
                        return Err(format!(
                            "{}: chunk {} has {} bytes, the list says {}",
                            p.display(),
                            ChunkId(c.id),
                            data.len(),
                            c.len
                        ));
                    }
                    f.write_all_at(&data, off).map_err(err)?;
                }
                off += u64::from(c.len);
            }
            f.seek(SeekFrom::Start(0)).map_err(err)?;
        }
        _ => {}
    }
    f.set_len(e.size).map_err(err)?;
    rd.rep.files += 1;
    rd.rep.bytes += e.size;
    Ok(())
}

fn remove_any(p: &Path) -> R<()> {
    let m = fs::symlink_metadata(p).map_err(|x| format!("{}: {x}", p.display()))?;
    if m.is_dir() {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    }
    .map_err(|x| format!("{}: {x}", p.display()))
}

/// Makes directory `p`, which holds tree `old` (None: empty), hold tree
/// `new`: what is gone removed, what changed written again, the rest
/// left alone (a subtree whose name did not change is not even read).
pub fn sync_dir(
    rd: &mut Reader<'_>,
    p: &Path,
    old: Option<&Name>,
    new: &Name,
    links: &mut HashMap<u64, PathBuf>,
) -> R<()> {
    if old == Some(new) {
        return Ok(());
    }
    let new_t = rd.tree(new)?;
    let old_t = match old {
        Some(o) => rd.tree(o)?.entries,
        None => Vec::new(),
    };
    let mut olds: HashMap<&[u8], &Entry> = old_t.iter().map(|e| (e.name.as_slice(), e)).collect();
    let names: std::collections::HashSet<&[u8]> =
        new_t.entries.iter().map(|e| e.name.as_slice()).collect();
    for e in &old_t {
        if !names.contains(e.name.as_slice()) {
            remove_any(&p.join(std::ffi::OsStr::from_bytes(&e.name)))?;
        }
    }
    for e in &new_t.entries {
        let at = p.join(std::ffi::OsStr::from_bytes(&e.name));
        match olds.remove(e.name.as_slice()) {
            Some(o) if o == e => {
                if e.link != 0 {
                    links.entry(e.link).or_insert(at);
                }
            }
            Some(o) if o.kind == Kind::Dir as u8 && e.kind == Kind::Dir as u8 => {
                if let (Body::Tree(ot), Body::Tree(nt)) = (&o.body, &e.body) {
                    sync_dir(rd, &at, Some(ot), nt, links)?;
                }
                apply_attrs(e, &at)?;
            }
            Some(_) => {
                remove_any(&at)?;
                write_entry(rd, e, &at, links)?;
            }
            None => write_entry(rd, e, &at, links)?,
        }
    }
    Ok(())
}

/// The snapshot's top directory's owner, mode, xattrs and times onto `p`.
pub fn apply_top(top: &Entry, p: &Path) -> R<()> {
    apply_attrs(top, p)
}
