//! The POSIX namespace of the live volume: lookup, create, link, unlink,
//! rename, attributes, extended attributes and ACLs, and directory
//! listings, each one meta transaction (`Volume::meta_write`). Snapshot
//! inodes are refused here (read-only) and served by `snap`.
//!
//! Calls the volume's core (records, space checks), `acl`, `meta`,
//! `format`; never ingest or the fuser glue.

use super::*;

impl Volume {
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        if is_snap_ino(parent) {
            return self.snap_lookup(parent, name);
        }
        if parent == meta::ROOT_INO && name == SNAPDIR_NAME {
            return self.snapdir_attr();
        }
        check_name(name)?;
        let epoch = self.map_epoch.load(Ordering::SeqCst);
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        let d = rt.open_table(meta::DIRENTS).map_err(store::Error::from)?;
        let (_, ent) = meta::lookup_dirent(&d, parent, name)?.ok_or(Error::Errno(libc::ENOENT))?;
        let t = rt.open_table(meta::INODES).map_err(store::Error::from)?;
        let (_, rec) = meta::live_inode(&t, ent.ino)?.ok_or(Error::Errno(libc::ENOENT))?;
        self.attr_settled(ent.ino, epoch, rec)
    }

    /// The inode a live name points at, if any (no attributes read).
    pub fn child_ino(&self, parent: u64, name: &[u8]) -> Option<u64> {
        if is_snap_ino(parent) || check_name(name).is_err() {
            return None;
        }
        let rt = self.repo.meta().begin_read().ok()?;
        let d = rt.open_table(meta::DIRENTS).ok()?;
        meta::lookup_dirent(&d, parent, name)
            .ok()?
            .map(|(_, e)| e.ino)
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        if is_snap_ino(ino) {
            return self.snap_readlink(ino);
        }
        let rec = self.read_inode(ino)?;
        match (rec.kind, rec.content) {
            (Kind::Symlink, Content::Inline(t)) => Ok(t),
            _ => Err(Error::Errno(libc::EINVAL)),
        }
    }

    // ------------------------------------------------------------ creation

    /// Creates an inode and links it at (parent, name).
    #[allow(clippy::too_many_arguments)]
    pub fn make_node(
        &self,
        who: Caller,
        parent: u64,
        name: &[u8],
        kind: Kind,
        mode: u32,
        umask: u32,
        rdev: u32,
        target: Option<&[u8]>,
    ) -> Result<Attr> {
        check_name(name)?;
        refuse_snap_name(parent, name, libc::EEXIST)?;
        let epoch = self.map_epoch.load(Ordering::SeqCst);
        let (ino, rec) = self.meta_write(Space::Grows, |m| {
            let mut p = m.dir(parent)?;
            if meta::lookup_dirent(&*m.t.dirents.get()?, parent, name)?.is_some() {
                return Err(Error::Errno(libc::EEXIST));
            }
            let ino = meta::alloc_ino(&mut m.state)?;
            let now = Timespec::now();
            // The kernel leaves the umask to us (FUSE_DONT_MASK): a parent's
            // default ACL replaces it (`posix_acl_create`).
            let parent_default = meta::get_xattr(&*m.t.xattrs.get()?, parent, acl::DEFAULT)?;
            let inherited = acl::inherit(
                parent_default.as_deref(),
                mode & 0o7777,
                umask,
                kind == Kind::Dir,
                kind == Kind::Symlink,
            )
            .map_err(|e| stored_acl_error(parent, &e))?;
            let mut perm = inherited.perm;
            let mut gid = who.gid;
            if p.perm & 0o2000 != 0 {
                // BSD group semantics under a set-group-id directory.
                gid = p.gid;
                if kind == Kind::Dir {
                    perm |= 0o2000;
                }
            }
            let (size, content) = match target {
                Some(t) => (t.len() as u64, Content::Inline(t.to_vec())),
                None => (0, Content::Empty),
            };
            let mut rec = InodeRec::new_live(kind, perm, who.uid, gid, now, parent, name);
            rec.rdev = rdev;
            rec.size = size;
            rec.content = content;
            m.t.write_inode(ino, &rec)?;
            if let Some(a) = &inherited.access {
                m.t.set_xattr(ino, acl::ACCESS, a)?;
            }
            if let Some(d) = &inherited.default {
                m.t.set_xattr(ino, acl::DEFAULT, d)?;
            }
            m.t.write_dirent(parent, name, ino, kind)?;
            if kind == Kind::Dir {
                p.nlink += 1;
            }
            p.mtime = now;
            p.ctime = now;
            m.t.write_inode(parent, &p)?;
            Ok((ino, rec))
        })?;
        self.attr_settled(ino, epoch, rec)
    }

    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<Attr> {
        refuse_snap(ino)?;
        refuse_snap_name(parent, name, libc::EEXIST)?;
        check_name(name)?;
        let epoch = self.map_epoch.load(Ordering::SeqCst);
        let rec = self.meta_write(Space::Grows, |m| {
            let mut p = m.dir(parent)?;
            let mut rec = m.inode(ino)?;
            if rec.kind == Kind::Dir {
                return Err(Error::Errno(libc::EPERM));
            }
            if meta::lookup_dirent(&*m.t.dirents.get()?, parent, name)?.is_some() {
                return Err(Error::Errno(libc::EEXIST));
            }
            let now = Timespec::now();
            rec.nlink += 1;
            rec.ctime = now;
            m.t.write_inode(ino, &rec)?;
            m.t.write_dirent(parent, name, ino, rec.kind)?;
            p.mtime = now;
            p.ctime = now;
            m.t.write_inode(parent, &p)?;
            Ok(rec)
        })?;
        self.attr_settled(ino, epoch, rec)
    }

    // ------------------------------------------------------------ removal

    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        refuse_snap_name(parent, name, libc::EROFS)?;
        check_name(name)?;
        self.meta_write(Space::Frees, |m| {
            let mut p = m.dir(parent)?;
            let (_, ent) = meta::lookup_dirent(&*m.t.dirents.get()?, parent, name)?
                .ok_or(Error::Errno(libc::ENOENT))?;
            if ent.kind == Kind::Dir {
                return Err(Error::Errno(libc::EISDIR));
            }
            m.t.remove_dirent(parent, name)?;
            m.drop_link(ent.ino, false)?;
            let now = Timespec::now();
            p.mtime = now;
            p.ctime = now;
            m.t.write_inode(parent, &p)?;
            Ok(())
        })?;
        self.orphans_changed();
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        refuse_snap_name(parent, name, libc::EROFS)?;
        check_name(name)?;
        if name == b"." {
            return Err(Error::Errno(libc::EINVAL));
        }
        if name == b".." {
            return Err(Error::Errno(libc::ENOTEMPTY));
        }
        self.meta_write(Space::Frees, |m| {
            let mut p = m.dir(parent)?;
            let (_, ent) = meta::lookup_dirent(&*m.t.dirents.get()?, parent, name)?
                .ok_or(Error::Errno(libc::ENOENT))?;
            if ent.kind != Kind::Dir {
                return Err(Error::Errno(libc::ENOTDIR));
            }
            if !meta::list_dir(&*m.t.dirents.get()?, ent.ino, Some(1))?.is_empty() {
                return Err(Error::Errno(libc::ENOTEMPTY));
            }
            m.t.remove_dirent(parent, name)?;
            m.drop_link(ent.ino, true)?;
            let now = Timespec::now();
            p.nlink = p.nlink.saturating_sub(1);
            p.mtime = now;
            p.ctime = now;
            m.t.write_inode(parent, &p)?;
            Ok(())
        })?;
        self.orphans_changed();
        Ok(())
    }

    pub fn rename(
        &self,
        who: Caller,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        check_name(name)?;
        check_name(newname)?;
        if is_snap_ino(parent) != is_snap_ino(newparent) {
            return Err(Error::Errno(libc::EXDEV));
        }
        refuse_snap_name(parent, name, libc::EROFS)?;
        refuse_snap_name(newparent, newname, libc::EROFS)?;
        const NOREPLACE: u32 = libc::RENAME_NOREPLACE;
        const EXCHANGE: u32 = libc::RENAME_EXCHANGE;
        // Leaves a whiteout (a 0/0 character device) where the source was,
        // as overlayfs asks of its upper filesystem; ext4 supports it.
        const WHITEOUT: u32 = libc::RENAME_WHITEOUT;
        if flags & !(NOREPLACE | EXCHANGE | WHITEOUT) != 0
            || flags & EXCHANGE != 0 && flags & (NOREPLACE | WHITEOUT) != 0
        {
            return Err(Error::Errno(libc::EINVAL));
        }
        self.meta_write(Space::Frees, |m| {
            let now = Timespec::now();
            let (_, src) = meta::lookup_dirent(&*m.t.dirents.get()?, parent, name)?
                .ok_or(Error::Errno(libc::ENOENT))?;
            let dst =
                meta::lookup_dirent(&*m.t.dirents.get()?, newparent, newname)?.map(|(_, d)| d);
            if parent == newparent && name == newname {
                return Ok(());
            }
            if flags & EXCHANGE != 0 {
                let dst = dst.ok_or(Error::Errno(libc::ENOENT))?;
                m.t.write_dirent(parent, name, dst.ino, dst.kind)?;
                m.t.write_dirent(newparent, newname, src.ino, src.kind)?;
                if parent != newparent && (src.kind == Kind::Dir) != (dst.kind == Kind::Dir) {
                    let (gain, lose) = if src.kind == Kind::Dir {
                        (newparent, parent)
                    } else {
                        (parent, newparent)
                    };
                    m.adjust_nlink(gain, 1)?;
                    m.adjust_nlink(lose, -1)?;
                }
                for (ino, p, n) in [(src.ino, newparent, newname), (dst.ino, parent, name)] {
                    let mut r = m.inode(ino)?;
                    r.ctime = now;
                    r.parent = p;
                    r.name = n.to_vec();
                    m.t.write_inode(ino, &r)?;
                }
            } else {
                if let Some(d) = dst {
                    if flags & NOREPLACE != 0 {
                        return Err(Error::Errno(libc::EEXIST));
                    }
                    if d.ino == src.ino {
                        // Two links to one inode: POSIX says do nothing.
                        return Ok(());
                    }
                    match (src.kind == Kind::Dir, d.kind == Kind::Dir) {
                        (true, false) => return Err(Error::Errno(libc::ENOTDIR)),
                        (false, true) => return Err(Error::Errno(libc::EISDIR)),
                        (true, true) => {
                            if !meta::list_dir(&*m.t.dirents.get()?, d.ino, Some(1))?.is_empty() {
                                return Err(Error::Errno(libc::ENOTEMPTY));
                            }
                            m.adjust_nlink(newparent, -1)?;
                        }
                        (false, false) => {}
                    }
                    m.drop_link(d.ino, d.kind == Kind::Dir)?;
                }
                m.t.remove_dirent(parent, name)?;
                m.t.write_dirent(newparent, newname, src.ino, src.kind)?;
                if src.kind == Kind::Dir && parent != newparent {
                    m.adjust_nlink(parent, -1)?;
                    m.adjust_nlink(newparent, 1)?;
                }
                let mut r = m.inode(src.ino)?;
                r.ctime = now;
                r.parent = newparent;
                r.name = newname.to_vec();
                m.t.write_inode(src.ino, &r)?;
                if flags & WHITEOUT != 0 {
                    let ino = meta::alloc_ino(&mut m.state)?;
                    let w =
                        InodeRec::new_live(Kind::CharDev, 0, who.uid, who.gid, now, parent, name);
                    m.t.write_inode(ino, &w)?;
                    m.t.write_dirent(parent, name, ino, Kind::CharDev)?;
                }
            }
            for p in [parent, newparent] {
                let mut r = m.inode(p)?;
                r.mtime = now;
                r.ctime = now;
                m.t.write_inode(p, &r)?;
            }
            Ok(())
        })?;
        self.orphans_changed();
        Ok(())
    }

    // ------------------------------------------------------------ attributes

    pub fn setattr(&self, who: Caller, ino: u64, s: &SetAttr) -> Result<Attr> {
        refuse_snap(ino)?;
        // Decide on space before touching staging, so a refused truncate
        // changes nothing. Cutting a file frees space; anything else may
        // grow the metadata.
        let cuts = s
            .size
            .is_some_and(|n| self.getattr(ino).is_ok_and(|a| n < a.size));
        let space = if cuts { Space::Frees } else { Space::Grows };
        self.check_space(space)?;
        if let Some(size) = s.size {
            let rec = self.read_inode(ino)?;
            match rec.kind {
                Kind::Dir => return Err(Error::Errno(libc::EISDIR)),
                Kind::File => {}
                _ => return Err(Error::Errno(libc::EINVAL)),
            }
            self.check_writable()?;
            // A truncate is a short-lived writer: registering keeps ingest
            // from committing (and dropping) the staged state between our
            // lookup and the change, which would lose the new size.
            let st = self.stage_writer(ino)?;
            let r = st
                .lock()
                .set_size(size)
                .map_err(|e| io_err("truncating staging", e));
            self.drop_writer(ino, &st);
            r?;
        }
        // Hold the file's staged entry (if any) across the commit. Ingest
        // commits a staged file's mtime from the view it chunked, so an
        // explicit mtime committed between that view and ingest's commit
        // was overwritten (a lost utimensat). With the entry locked,
        // ingest either committed before us or sees the bumped version and
        // goes again. Lock order: Staged lock, then the meta write, as in
        // ingest.
        let staged = self.staged_of(ino);
        let mut guard = staged.as_ref().map(|st| st.lock());
        if let Some(st) = &staged
            && !self.is_current(ino, st)
        {
            guard = None;
        }
        let epoch = self.map_epoch.load(Ordering::SeqCst);
        let rec = self.meta_write(space, |m| {
            let mut rec = m.inode(ino)?;
            let now = Timespec::now();
            if let Some(mode) = s.mode {
                rec.perm = mode & 0o7777;
                // Only a group member (or root) keeps set-group-id.
                if who.uid != 0 && rec.gid != who.gid && rec.kind != Kind::Dir {
                    rec.perm &= !0o2000;
                }
                // `posix_acl_chmod`: the ACL's owner, mask and other
                // entries follow the new mode.
                let stored = meta::get_xattr(&*m.t.xattrs.get()?, ino, acl::ACCESS)?;
                if let Some(old) = stored
                    && let Ok(Some(mut a)) = acl::Acl::parse(&old)
                {
                    a.chmod(rec.perm);
                    let new = a.to_bytes();
                    if new != old {
                        m.t.set_xattr(ino, acl::ACCESS, &new)?;
                    }
                }
            }
            if s.uid.is_some() || s.gid.is_some() {
                let new_uid = s.uid.unwrap_or(rec.uid);
                let new_gid = s.gid.unwrap_or(rec.gid);
                if rec.kind != Kind::Dir
                    && (new_uid != rec.uid || new_gid != rec.gid || who.uid != 0)
                {
                    rec.perm = without_setid(rec.perm);
                }
                rec.uid = new_uid;
                rec.gid = new_gid;
            }
            if let Some(t) = s.atime {
                rec.atime = t;
            }
            if let Some(t) = s.mtime {
                rec.mtime = t;
            }
            if s.size.is_some() && s.mtime.is_none() {
                rec.mtime = now;
            }
            rec.ctime = s.ctime.unwrap_or(now);
            m.t.write_inode(ino, &rec)?;
            Ok(rec)
        })?;
        if let Some(st) = guard.as_mut() {
            // An explicit mtime wins over the one writes left behind.
            if s.mtime.is_some() {
                st.mtime = rec.mtime;
                st.version += 1;
                if st.whole {
                    st.set_file_mtime();
                }
            }
            st.ctime = st.ctime.max(rec.ctime);
        }
        drop(guard);
        self.attr_settled(ino, epoch, rec)
    }

    // ------------------------------------------------------------ xattrs

    /// `in_group_or_capable(gid)` says whether the caller may keep a
    /// file's set-group-id when it sets an access ACL (see `set_acl`).
    pub fn setxattr(
        &self,
        who: Caller,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: i32,
        in_group_or_capable: &dyn Fn(u32) -> bool,
    ) -> Result<()> {
        refuse_snap(ino)?;
        check_xattr_name(name)?;
        if name == acl::ACCESS || name == acl::DEFAULT {
            return self.set_acl(who, ino, name, value, in_group_or_capable);
        }
        self.meta_write(Space::Grows, |m| {
            let mut rec = m.inode(ino)?;
            let exists = meta::get_xattr(&*m.t.xattrs.get()?, ino, name)?.is_some();
            if flags & libc::XATTR_CREATE != 0 && exists {
                return Err(Error::Errno(libc::EEXIST));
            }
            if flags & libc::XATTR_REPLACE != 0 && !exists {
                return Err(Error::Errno(libc::ENODATA));
            }
            m.t.set_xattr(ino, name, value)?;
            rec.ctime = Timespec::now();
            m.t.write_inode(ino, &rec)?;
            Ok(())
        })
    }

    /// setxattr of an ACL, as ext4 does it (`ext4_set_acl`). An access ACL
    /// sets the mode's owner, group (the mask, if any) and other bits; one
    /// the mode says in full is then dropped, any other is kept. The
    /// set-group-id bit goes unless the caller is in the file's group or
    /// holds CAP_FSETID (`posix_acl_update_mode`). The kernel checks the
    /// value, the owner and the file type before it asks; these checks
    /// repeat them with ext4's errnos for any other way in.
    pub(super) fn set_acl(
        &self,
        who: Caller,
        ino: u64,
        name: &[u8],
        value: &[u8],
        in_group_or_capable: &dyn Fn(u32) -> bool,
    ) -> Result<()> {
        let parsed = acl::Acl::parse(value).map_err(|e| Error::Errno(e.errno()))?;
        self.meta_write(Space::Grows, |m| {
            let mut rec = m.inode(ino)?;
            if who.uid != 0 && who.uid != rec.uid {
                return Err(Error::Errno(libc::EPERM));
            }
            if rec.kind == Kind::Symlink {
                return Err(Error::Errno(libc::EOPNOTSUPP));
            }
            match parsed {
                _ if name == acl::DEFAULT && rec.kind != Kind::Dir => {
                    return match parsed {
                        Some(_) => Err(Error::Errno(libc::EACCES)),
                        None => Ok(()),
                    };
                }
                None => {
                    m.t.remove_xattr(ino, name)?;
                }
                Some(a) if name == acl::DEFAULT => m.t.set_xattr(ino, name, &a.to_bytes())?,
                Some(a) => {
                    let (bits, equiv) = a.mode_bits();
                    rec.perm = (rec.perm & !0o777) | bits;
                    if !in_group_or_capable(rec.gid) {
                        rec.perm &= !0o2000;
                    }
                    if equiv {
                        m.t.remove_xattr(ino, name)?;
                    } else {
                        m.t.set_xattr(ino, name, &a.to_bytes())?;
                    }
                }
            }
            rec.ctime = Timespec::now();
            m.t.write_inode(ino, &rec)?;
            Ok(())
        })
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        if is_snap_ino(ino) {
            check_xattr_name(name)?;
            return self.snap_getxattr(ino, name);
        }
        check_xattr_name(name)?;
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        let t = rt.open_table(meta::XATTRS).map_err(store::Error::from)?;
        let stored = meta::get_xattr(&t, ino, name)?;
        if name == acl::ACCESS && stored.is_some() {
            let inodes = rt.open_table(meta::INODES).map_err(store::Error::from)?;
            let (_, rec) = meta::live_inode(&inodes, ino)?.ok_or(Error::Errno(libc::ENOENT))?;
            return xattr_view(ino, name, stored, rec.perm);
        }
        stored.ok_or(Error::Errno(libc::ENODATA))
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        if is_snap_ino(ino) {
            return self.snap_listxattr(ino);
        }
        let perm = self.read_inode(ino)?.perm;
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        let t = rt.open_table(meta::XATTRS).map_err(store::Error::from)?;
        let names = meta::list_xattrs(&t, ino)?;
        list_view(ino, names, perm, |n| meta::get_xattr(&t, ino, n))
    }

    /// Removing an ACL leaves the mode as it is; removing one there is not
    /// succeeds, as on ext4.
    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        refuse_snap(ino)?;
        check_xattr_name(name)?;
        let is_acl = name == acl::ACCESS || name == acl::DEFAULT;
        self.meta_write(Space::Frees, |m| {
            let mut rec = m.inode(ino)?;
            if !m.t.remove_xattr(ino, name)? {
                return if is_acl {
                    Ok(())
                } else {
                    Err(Error::Errno(libc::ENODATA))
                };
            }
            rec.ctime = Timespec::now();
            m.t.write_inode(ino, &rec)?;
            Ok(())
        })
    }

    // ------------------------------------------------------------ dirs

    /// A live directory's entries, "." and ".." first; none once it has
    /// been removed (as on ext4: an open, removed directory lists empty).
    pub(super) fn list_dir(&self, ino: u64) -> Result<Vec<DirEntry>> {
        let rt = self.repo.meta().begin_read().map_err(store::Error::from)?;
        let t = rt.open_table(meta::INODES).map_err(store::Error::from)?;
        let Some((_, rec)) = meta::live_inode(&t, ino)? else {
            return Ok(Vec::new());
        };
        let d = rt.open_table(meta::DIRENTS).map_err(store::Error::from)?;
        let up = if rec.parent == 0 {
            meta::ROOT_INO
        } else {
            rec.parent
        };
        let mut entries = dot_entries(ino, up);
        if ino == meta::ROOT_INO && self.snaps.visible.load(Ordering::Relaxed) {
            entries.push(DirEntry {
                name: SNAPDIR_NAME.to_vec(),
                ino: SNAPDIR_INO,
                kind: Kind::Dir,
            });
        }
        for (name, v) in meta::list_dir(&d, ino, None)? {
            entries.push(DirEntry {
                name,
                ino: v.ino,
                kind: v.kind,
            });
        }
        Ok(entries)
    }

    /// The listing a readdir at `offset` of directory `ino` reads from:
    /// a fresh one at offset 0, else the one the offset names. If that one
    /// has aged out, a fresh listing is read from the same position.
    pub fn listing(&self, ino: u64, offset: u64) -> Result<Listing> {
        let id = (offset >> 32) as u32;
        let start = (offset & 0xffff_ffff) as usize;
        // Offset 0 starts a listing; any other resumes one, from the cache.
        let hit = (offset != 0)
            .then(|| self.listings.lock().get(&id).cloned())
            .flatten();
        if offset != 0 {
            self.metrics.cache(Cache::Listing, hit.is_some());
        }
        if let Some(entries) = hit {
            return Ok(Listing { id, entries, start });
        }
        let entries = Arc::new(if is_snap_ino(ino) {
            self.snap_entries(ino)?
        } else {
            self.list_dir(ino)?
        });
        // Ids stay below 2^31 so offsets stay positive as the kernel's
        // signed loff_t, and skip 0 so no offset but the first is 0.
        let id = self
            .next_listing
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_rem(1 << 31)
            .max(1);
        self.listings.lock().put(id, entries.clone());
        Ok(Listing { id, entries, start })
    }

    /// The listing has been read to its end.
    pub fn listing_done(&self, id: u32) {
        self.listings.lock().pop(&id);
    }

    // ------------------------------------------------------------ files
}

/// A file's permission bits after a change that drops its privileges
/// (chown, or a truncate by an unprivileged caller): set-user-id goes, and
/// set-group-id when the group may execute (otherwise it marks mandatory
/// locking, which stays).
pub(super) fn without_setid(perm: u32) -> u32 {
    let perm = perm & !0o4000;
    if perm & 0o010 != 0 {
        perm & !0o2000
    } else {
        perm
    }
}

/// A directory listing's "." and "..".
pub(super) fn dot_entries(ino: u64, up: u64) -> Vec<DirEntry> {
    vec![
        DirEntry {
            name: b".".to_vec(),
            ino,
            kind: Kind::Dir,
        },
        DirEntry {
            name: b"..".to_vec(),
            ino: up,
            kind: Kind::Dir,
        },
    ]
}

/// Snapshots are read-only.
pub(super) fn refuse_snap(ino: u64) -> Result<()> {
    if is_snap_ino(ino) {
        return Err(Error::Errno(libc::EROFS));
    }
    Ok(())
}

/// Refuses a change inside a snapshot (EROFS) or to `/.snapshots` itself
/// (`errno`).
pub(super) fn refuse_snap_name(parent: u64, name: &[u8], errno: i32) -> Result<()> {
    refuse_snap(parent)?;
    if parent == meta::ROOT_INO && name == SNAPDIR_NAME {
        return Err(Error::Errno(errno));
    }
    Ok(())
}

pub(super) fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(Error::Errno(libc::ENAMETOOLONG));
    }
    if name.is_empty() || name.contains(&b'/') {
        return Err(Error::Errno(libc::EINVAL));
    }
    Ok(())
}

pub(super) fn check_xattr_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > 255 {
        return Err(Error::Errno(libc::ERANGE));
    }
    let ok = [&b"user."[..], b"security.", b"trusted.", b"system."]
        .iter()
        .any(|p| name.starts_with(p));
    if !ok {
        return Err(Error::Errno(libc::EOPNOTSUPP));
    }
    Ok(())
}

/// getxattr's answer for `name` of `ino`, stored as `stored`, the inode's
/// mode being `perm`: an access ACL is shown under the mode (see
/// `acl::access_view`), and one the mode says in full is not there.
pub(crate) fn xattr_view(
    ino: u64,
    name: &[u8],
    stored: Option<Vec<u8>>,
    perm: u32,
) -> Result<Vec<u8>> {
    let v = stored.ok_or(Error::Errno(libc::ENODATA))?;
    if name != acl::ACCESS {
        return Ok(v);
    }
    match acl::access_view(&v, perm) {
        Ok(Some(v)) => Ok(v),
        Ok(None) => Err(Error::Errno(libc::ENODATA)),
        Err(e) => Err(stored_acl_error(ino, &e)),
    }
}

/// listxattr's answer: the names, each NUL-terminated, without an access
/// ACL that getxattr would not show (`xattr_view`).
pub(crate) fn list_view(
    ino: u64,
    names: Vec<Vec<u8>>,
    perm: u32,
    get: impl Fn(&[u8]) -> std::result::Result<Option<Vec<u8>>, store::Error>,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for n in names {
        if n == acl::ACCESS {
            match xattr_view(ino, &n, get(&n)?, perm) {
                Err(e) if e.errno() == libc::ENODATA => continue,
                r => {
                    r?;
                }
            }
        }
        out.extend_from_slice(&n);
        out.push(0);
    }
    Ok(out)
}

/// A stored ACL that does not parse: only a damaged store holds one (every
/// ACL is checked before it is stored), so EIO, and a log line.
pub(super) fn stored_acl_error(ino: u64, e: &acl::AclError) -> Error {
    log::error!("inode {ino}: stored ACL is unreadable: {e}");
    Error::Errno(libc::EIO)
}
