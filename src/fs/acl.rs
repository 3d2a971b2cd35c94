//! POSIX ACLs as ext4 keeps them: the Linux `posix_acl_xattr` value format
//! (a version-2 header, then entries of tag u16, perm u16, id u32, all
//! little-endian) and the mode arithmetic the kernel applies around it
//! (`posix_acl_valid`, `posix_acl_equiv_mode`, `posix_acl_chmod`,
//! `posix_acl_create_masq` in fs/posix_acl.c).
//!
//! Invariant the volume keeps with these: a stored access ACL is never
//! equivalent to a mode (that one becomes the mode and is not stored), and
//! its owner, mask and other entries always agree with the inode's mode.
//!
//! Pure functions on bytes and modes; calls nothing.

/// The xattr that holds a file's access ACL.
pub const ACCESS: &[u8] = b"system.posix_acl_access";
/// The xattr that holds a directory's default ACL.
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
const HEADER: usize = 4;
const ENTRY: usize = 8;

pub const USER_OBJ: u16 = 0x01;
pub const USER: u16 = 0x02;
pub const GROUP_OBJ: u16 = 0x04;
pub const GROUP: u16 = 0x08;
pub const MASK: u16 = 0x10;
pub const OTHER: u16 = 0x20;

/// The id the format gives entries that name nobody (owner, mask, other).
const UNDEFINED_ID: u32 = u32::MAX;

/// Why a value is not an ACL. The errnos are the ones the kernel gives for
/// the same value (`posix_acl_from_xattr`, `posix_acl_valid`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    #[error("unsupported ACL xattr version {0}")]
    Version(u32),
    #[error("malformed ACL: {0}")]
    Malformed(&'static str),
}

impl AclError {
    pub fn errno(&self) -> i32 {
        match self {
            AclError::Version(_) => libc::EOPNOTSUPP,
            AclError::Malformed(_) => libc::EINVAL,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub tag: u16,
    pub perm: u16,
    pub id: u32,
}

/// A valid, non-empty ACL, entries in the order the kernel requires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<Entry>,
}

impl Acl {
    /// Parses and validates an xattr value. `Ok(None)` for a value with no
    /// entries: the kernel reads that as "remove the ACL".
    pub fn parse(b: &[u8]) -> Result<Option<Acl>, AclError> {
        if b.len() < HEADER {
            return Err(AclError::Malformed("shorter than its header"));
        }
        let version = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if version != VERSION {
            return Err(AclError::Version(version));
        }
        let body = &b[HEADER..];
        if !body.len().is_multiple_of(ENTRY) {
            return Err(AclError::Malformed(
                "length is not a whole number of entries",
            ));
        }
        if body.is_empty() {
            return Ok(None);
        }
        let entries = body
            .chunks_exact(ENTRY)
            .map(|e| Entry {
                tag: u16::from_le_bytes([e[0], e[1]]),
                perm: u16::from_le_bytes([e[2], e[3]]),
                id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            })
            .collect();
        let acl = Acl { entries };
        acl.validate()?;
        Ok(Some(acl))
    }

    /// `posix_acl_valid`: owner, named users, owning group, named groups,
    /// mask, other, in that order; a mask exactly when someone is named.
    fn validate(&self) -> Result<(), AclError> {
        #[derive(PartialEq)]
        enum State {
            UserObj,
            User,
            Group,
            Other,
            Done,
        }
        let mut state = State::UserObj;
        let mut needs_mask = false;
        let bad = AclError::Malformed;
        for e in &self.entries {
            if e.perm & !0o7 != 0 {
                return Err(bad("permission bits beyond rwx"));
            }
            match e.tag {
                USER_OBJ if state == State::UserObj => state = State::User,
                USER | GROUP if e.id == UNDEFINED_ID => return Err(bad("named entry without id")),
                USER if state == State::User => needs_mask = true,
                GROUP_OBJ if state == State::User => state = State::Group,
                GROUP if state == State::Group => needs_mask = true,
                MASK if state == State::Group => state = State::Other,
                OTHER if state == State::Other || (state == State::Group && !needs_mask) => {
                    state = State::Done
                }
                USER_OBJ | USER | GROUP_OBJ | GROUP | MASK | OTHER => {
                    return Err(bad("entries out of order or missing"));
                }
                _ => return Err(bad("unknown tag")),
            }
        }
        if state != State::Done {
            return Err(bad("entries out of order or missing"));
        }
        Ok(())
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + ENTRY * self.entries.len());
        out.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    /// The three-entry ACL a mode stands for.
    pub fn from_mode(mode: u32) -> Acl {
        let e = |tag, shift: u32| Entry {
            tag,
            perm: ((mode >> shift) & 0o7) as u16,
            id: UNDEFINED_ID,
        };
        Acl {
            entries: vec![e(USER_OBJ, 6), e(GROUP_OBJ, 3), e(OTHER, 0)],
        }
    }

    /// `posix_acl_equiv_mode`: the rwx bits this ACL gives the mode (the
    /// mask standing in for the group), and whether the mode says it all.
    /// An ACL with a mask is never equivalent, even with nobody named.
    pub fn mode_bits(&self) -> (u32, bool) {
        let mut mode = 0;
        let mut equiv = true;
        for e in &self.entries {
            let p = u32::from(e.perm & 0o7);
            match e.tag {
                USER_OBJ => mode |= p << 6,
                GROUP_OBJ => mode |= p << 3,
                OTHER => mode |= p,
                MASK => {
                    mode = (mode & !0o070) | (p << 3);
                    equiv = false;
                }
                _ => equiv = false,
            }
        }
        (mode, equiv)
    }

    /// `posix_acl_chmod`: the owner, mask (or owning group, with no mask)
    /// and other entries take the mode's bits; named entries stay.
    pub fn chmod(&mut self, mode: u32) {
        let has_mask = self.entries.iter().any(|e| e.tag == MASK);
        for e in &mut self.entries {
            match e.tag {
                USER_OBJ => e.perm = ((mode >> 6) & 0o7) as u16,
                MASK => e.perm = ((mode >> 3) & 0o7) as u16,
                GROUP_OBJ if !has_mask => e.perm = ((mode >> 3) & 0o7) as u16,
                OTHER => e.perm = (mode & 0o7) as u16,
                _ => {}
            }
        }
    }

    /// `posix_acl_create_masq`: a parent's default ACL turned into a new
    /// node's access ACL by the create mode, and the create mode turned
    /// into the node's mode by the ACL. Returns the new mode (non-rwx bits
    /// kept) and whether the ACL says more than the mode (must be stored).
    pub fn create_masq(&mut self, mode: u32) -> (u32, bool) {
        let mut m = mode & 0o777;
        let mut not_equiv = false;
        let has_mask = self.entries.iter().any(|e| e.tag == MASK);
        for e in &mut self.entries {
            match e.tag {
                USER_OBJ => {
                    e.perm &= ((m >> 6) & 0o7) as u16;
                    m &= (u32::from(e.perm) << 6) | !0o700;
                }
                USER | GROUP => not_equiv = true,
                OTHER => {
                    e.perm &= (m & 0o7) as u16;
                    m &= u32::from(e.perm) | !0o007;
                }
                MASK => not_equiv = true,
                _ => {}
            }
        }
        let group_tag = if has_mask { MASK } else { GROUP_OBJ };
        if let Some(e) = self.entries.iter_mut().find(|e| e.tag == group_tag) {
            e.perm &= ((m >> 3) & 0o7) as u16;
            m &= (u32::from(e.perm) << 3) | !0o070;
        }
        ((mode & !0o777) | (m & 0o777), not_equiv)
    }
}

/// What a new node gets from its parent's default ACL (`posix_acl_create`).
#[derive(Debug, PartialEq, Eq)]
pub struct Inherited {
    /// The node's mode bits (0o7777).
    pub perm: u32,
    /// Its access ACL, if the mode cannot say it all.
    pub access: Option<Vec<u8>>,
    /// Its default ACL (directories only).
    pub default: Option<Vec<u8>>,
}

/// The mode and ACLs of a new node of `mode` (0o7777 bits, as the caller
/// asked) under a parent whose default ACL is `parent_default`. Without a
/// default ACL the umask applies; with one it does not (the ACL's mask
/// takes its place). Symlinks never carry ACLs.
pub fn inherit(
    parent_default: Option<&[u8]>,
    mode: u32,
    umask: u32,
    is_dir: bool,
    is_symlink: bool,
) -> Result<Inherited, AclError> {
    let none = |perm| Inherited {
        perm,
        access: None,
        default: None,
    };
    if is_symlink {
        return Ok(none(mode));
    }
    let Some(default) = parent_default.map(Acl::parse).transpose()?.flatten() else {
        return Ok(none(mode & !(umask & 0o777)));
    };
    let mut access = default.clone();
    let (perm, not_equiv) = access.create_masq(mode);
    Ok(Inherited {
        perm,
        access: not_equiv.then(|| access.to_bytes()),
        default: is_dir.then(|| default.to_bytes()),
    })
}

/// A stored access ACL as a reader should see it under `mode`: its owner,
/// mask and other entries re-derived from the mode (the mode is the
/// authority, as after a chmod on ext4). None when the mode says it all
/// (an ACL stored before the daemon applied ACLs to the mode).
pub fn access_view(stored: &[u8], mode: u32) -> Result<Option<Vec<u8>>, AclError> {
    let Some(mut acl) = Acl::parse(stored)? else {
        return Ok(None);
    };
    if acl.mode_bits().1 {
        return Ok(None);
    }
    acl.chmod(mode);
    Ok(Some(acl.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut b = VERSION.to_le_bytes().to_vec();
        for &(tag, perm, id) in entries {
            b.extend_from_slice(&tag.to_le_bytes());
            b.extend_from_slice(&perm.to_le_bytes());
            b.extend_from_slice(&id.to_le_bytes());
        }
        b
    }

    const U: u32 = UNDEFINED_ID;

    fn extended() -> Vec<u8> {
        acl(&[
            (USER_OBJ, 6, U),
            (USER, 4, 1234),
            (GROUP_OBJ, 4, U),
            (GROUP, 6, 2345),
            (MASK, 6, U),
            (OTHER, 0, U),
        ])
    }

    #[test]
    fn round_trips_bytes() {
        let b = extended();
        let a = Acl::parse(&b).unwrap().unwrap();
        assert_eq!(a.entries().len(), 6);
        assert_eq!(a.to_bytes(), b);
        let m = Acl::from_mode(0o754);
        assert_eq!(Acl::parse(&m.to_bytes()).unwrap().unwrap(), m);
    }

    #[test]
    fn equivalence_to_mode() {
        let basic = Acl::parse(&acl(&[(USER_OBJ, 6, U), (GROUP_OBJ, 4, U), (OTHER, 4, U)]))
            .unwrap()
            .unwrap();
        assert_eq!(basic.mode_bits(), (0o644, true));
        assert_eq!(Acl::from_mode(0o751).mode_bits(), (0o751, true));
        let a = Acl::parse(&extended()).unwrap().unwrap();
        // The mask, not the owning group, is what the mode's group bits show.
        assert_eq!(a.mode_bits(), (0o660, false));
        // A mask with nobody named is still not a mode (ext4 keeps it).
        let masked = acl(&[
            (USER_OBJ, 7, U),
            (GROUP_OBJ, 5, U),
            (MASK, 1, U),
            (OTHER, 0, U),
        ]);
        let masked = Acl::parse(&masked).unwrap().unwrap();
        assert_eq!(masked.mode_bits(), (0o710, false));
    }

    #[test]
    fn chmod_updates_mask_or_group() {
        let mut a = Acl::parse(&extended()).unwrap().unwrap();
        a.chmod(0o705);
        assert_eq!(a.mode_bits(), (0o705, false));
        let e = a.entries();
        assert_eq!(
            e[2],
            Entry {
                tag: GROUP_OBJ,
                perm: 4,
                id: U
            },
            "owning group kept"
        );
        assert_eq!(e[1].perm, 4, "named user kept");
        assert_eq!(e[4].perm, 0, "mask from the group bits");
        let mut m = Acl::from_mode(0o644);
        m.chmod(0o750);
        assert_eq!(m, Acl::from_mode(0o750));
        // A reader sees the stored ACL under the current mode.
        let v = access_view(&extended(), 0o640).unwrap().unwrap();
        let v = Acl::parse(&v).unwrap().unwrap();
        assert_eq!(v.mode_bits(), (0o640, false));
        assert_eq!(
            access_view(&Acl::from_mode(0o644).to_bytes(), 0o600),
            Ok(None)
        );
    }

    #[test]
    fn inheritance() {
        let def = acl(&[
            (USER_OBJ, 7, U),
            (USER, 5, 1234),
            (GROUP_OBJ, 5, U),
            (MASK, 7, U),
            (OTHER, 5, U),
        ]);
        // A file created 0666 under it: no umask; mask and other cut by mode.
        let f = inherit(Some(&def), 0o666, 0o022, false, false).unwrap();
        assert_eq!(f.default, None);
        let a = Acl::parse(f.access.as_deref().unwrap()).unwrap().unwrap();
        assert_eq!(
            a.entries(),
            &[
                Entry {
                    tag: USER_OBJ,
                    perm: 6,
                    id: U
                },
                Entry {
                    tag: USER,
                    perm: 5,
                    id: 1234
                },
                Entry {
                    tag: GROUP_OBJ,
                    perm: 5,
                    id: U
                },
                Entry {
                    tag: MASK,
                    perm: 6,
                    id: U
                },
                Entry {
                    tag: OTHER,
                    perm: 4,
                    id: U
                },
            ]
        );
        assert_eq!(f.perm, 0o664);
        // A directory gets the default ACL too, and the mode keeps setgid.
        let d = inherit(Some(&def), 0o2777, 0o077, true, false).unwrap();
        assert_eq!(d.perm, 0o2775);
        assert_eq!(d.default.as_deref(), Some(&def[..]));
        assert!(d.access.is_some());
        // A minimal default ACL gives a mode only.
        let min = Acl::from_mode(0o750).to_bytes();
        let f = inherit(Some(&min), 0o666, 0o022, false, false).unwrap();
        assert_eq!((f.perm, f.access), (0o640, None));
        // Without a default ACL the umask applies.
        let f = inherit(None, 0o666, 0o027, false, false).unwrap();
        assert_eq!((f.perm, f.access, f.default), (0o640, None, None));
        // Symlinks carry nothing.
        let s = inherit(Some(&def), 0o777, 0o022, false, true).unwrap();
        assert_eq!((s.perm, s.access, s.default), (0o777, None, None));
    }

    #[test]
    fn malformed_values_are_refused() {
        let inval = |b: &[u8]| assert_eq!(Acl::parse(b).unwrap_err().errno(), libc::EINVAL);
        inval(b"");
        inval(&[2, 0]);
        // A partial entry.
        let mut b = Acl::from_mode(0o644).to_bytes();
        b.pop();
        inval(&b);
        // Missing other.
        inval(&acl(&[(USER_OBJ, 6, U), (GROUP_OBJ, 4, U)]));
        // Out of order.
        inval(&acl(&[(GROUP_OBJ, 4, U), (USER_OBJ, 6, U), (OTHER, 4, U)]));
        // A named user without a mask.
        inval(&acl(&[
            (USER_OBJ, 6, U),
            (USER, 4, 5),
            (GROUP_OBJ, 4, U),
            (OTHER, 4, U),
        ]));
        // Perm bits beyond rwx, an unknown tag, a named entry with no id.
        inval(&acl(&[(USER_OBJ, 8, U), (GROUP_OBJ, 4, U), (OTHER, 4, U)]));
        inval(&acl(&[(USER_OBJ, 6, U), (0x40, 4, U), (OTHER, 4, U)]));
        inval(&acl(&[
            (USER_OBJ, 6, U),
            (USER, 4, U),
            (GROUP_OBJ, 4, U),
            (MASK, 4, U),
            (OTHER, 4, U),
        ]));
        // Two owners.
        inval(&acl(&[
            (USER_OBJ, 6, U),
            (USER_OBJ, 6, U),
            (GROUP_OBJ, 4, U),
            (OTHER, 4, U),
        ]));
        // A version the format does not know.
        let mut v = Acl::from_mode(0o644).to_bytes();
        v[0] = 3;
        assert_eq!(Acl::parse(&v), Err(AclError::Version(3)));
        assert_eq!(AclError::Version(3).errno(), libc::EOPNOTSUPP);
        // No entries: a removal, not an error.
        assert_eq!(Acl::parse(&VERSION.to_le_bytes()), Ok(None));
    }
}
