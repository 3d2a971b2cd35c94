//! The mount's readahead, which the kernel will not take through INIT.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Readahead for the mount, in KiB (`raise_readahead`).
pub const READAHEAD_KIB: u32 = 4096;

/// Sets the mount's readahead through sysfs. Why: the kernel starts a FUSE
/// mount at 128 KiB and refuses a larger `max_readahead` in INIT (fuser's
/// `set_max_readahead` failed silently), so a cold sequential read had at
/// most one 128 KiB request in flight. At 4 MiB, a fresh daemon read a
/// cold 1 GiB file at 680 and 754 MB/s against 529 and 388 at 128 KiB
/// (same sitting, alternating). Needs root; otherwise logged and left.
pub fn raise_readahead(mountpoint: &Path, kib: u32) {
    let dev = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|info| mount_device(&info, mountpoint));
    let Some(dev) = dev else {
        log::debug!("readahead: {} not in mountinfo", mountpoint.display());
        return;
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&knob, kib.to_string()) {
        Ok(()) => log::info!("readahead {kib} KiB ({knob})"),
        Err(e) => log::info!("readahead stays at the kernel's default: {knob}: {e}"),
    }
}

/// The `major:minor` of the last mount at `mountpoint` in a mountinfo
/// text (mount points there escape space, tab, newline and backslash).
fn mount_device(info: &str, mountpoint: &Path) -> Option<String> {
    let want = mountpoint.as_os_str().as_bytes();
    info.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let dev = f.nth(2)?;
        let point = unescape_mountinfo(f.nth(1)?);
        (point == want).then(|| dev.to_string())
    })
}

fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_device_finds_the_last_mount_at_an_escaped_path() {
        let info = "22 1 254:0 / / rw - ext4 /dev/vda rw\n\
                    40 22 0:39 / /home/a\\040b rw - fuse.dedupfs s rw\n\
                    41 40 0:40 / /home/a\\040b rw - fuse.dedupfs s rw\n\
                    42 22 0:41 / /home/ab rw - fuse.dedupfs s rw\n";
        let p = Path::new("/home/a b");
        assert_eq!(mount_device(info, p).as_deref(), Some("0:40"));
        assert_eq!(
            mount_device(info, Path::new("/home/ab")).as_deref(),
            Some("0:41")
        );
        assert_eq!(mount_device(info, Path::new("/nope")), None);
        assert_eq!(unescape_mountinfo("a\\134b\\011"), b"a\\b\t");
    }
}
