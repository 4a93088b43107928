//! Which filesystem a library lives on, from `/proc/self/mountinfo`, and whether inotify can be
//! trusted there.
//!
//! inotify only reports changes made through this machine's kernel. On network filesystems
//! (NFS, SMB/CIFS, 9p, AFS, Ceph …), on FUSE filesystems (sshfs, rclone, gvfs …) and on VM
//! shared folders (virtiofs, vboxsf) other machines — or the FUSE daemon itself — change files
//! behind its back, so those libraries are polled instead. `fuseblk` (ntfs-3g, exFAT on a local
//! disk) is treated as local: every change goes through this kernel there.
//!
//! The library root's filesystem is the mount whose mount point is the longest
//! component-wise prefix of the (canonical) root; later lines win over earlier ones for the same
//! mount point, as the last mount on a path hides the ones below it.

use std::path::{Path, PathBuf};

/// One line of mountinfo, the parts corald uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    /// Whether changes can happen without this kernel seeing them (inotify would be blind).
    pub fn is_remote(&self) -> bool {
        is_remote_fs_type(&self.fs_type)
    }
}

/// Filesystem types where inotify misses changes made elsewhere.
pub fn is_remote_fs_type(fs_type: &str) -> bool {
    const REMOTE: &[&str] = &[
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "9p",
        "afs",
        "coda",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "ocfs2",
        "gfs2",
        "davfs",
        "virtiofs",
        "vboxsf",
        "sshfs",
        "fuse",
    ];
    REMOTE.contains(&fs_type) || (fs_type.starts_with("fuse.") && fs_type.len() > 5)
}

/// Undo mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Parse mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    use std::os::unix::ffi::OsStringExt;
    text.lines()
        .filter_map(|line| {
            // id parent major:minor root mount_point options [optional…] - fstype source super
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fs_type = r.next()?.to_owned();
            let source = r.next().unwrap_or_default();
            if fs_type.is_empty() || !mount_point.starts_with('/') {
                return None;
            }
            Some(MountEntry {
                mount_point: PathBuf::from(std::ffi::OsString::from_vec(unescape(mount_point))),
                fs_type,
                source: String::from_utf8_lossy(&unescape(source)).into_owned(),
            })
        })
        .collect()
}

/// The mount that holds `path` (longest component-wise mount-point prefix; the last listed wins
/// among equals).
pub fn mount_of<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    let mut best: Option<&MountEntry> = None;
    for m in mounts {
        if !path.starts_with(&m.mount_point) {
            continue;
        }
        let depth = m.mount_point.components().count();
        if best.is_none_or(|b| depth >= b.mount_point.components().count()) {
            best = Some(m);
        }
    }
    best
}

/// The mount holding `path` on this machine, if mountinfo can be read.
pub fn current_mount_of(path: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mounts = parse_mountinfo(&text);
    mount_of(&mounts, path).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
40 27 0:50 / /mnt/nas rw,relatime shared:40 - nfs4 nas:/export/music rw,vers=4.2
41 40 0:51 / /mnt/nas/local rw,relatime - ext4 /dev/sdb1 rw
42 27 0:52 / /media/share rw,relatime - cifs //server/share rw,vers=3.0
43 27 0:53 / /home/u/remote rw,nosuid,nodev - fuse.sshfs u@host:/music rw,user_id=0
44 27 0:54 / /mnt/usb rw,relatime - fuseblk /dev/sdc1 rw,user_id=0
45 27 0:55 / /mnt/My\\040Music rw - smb3 //srv/My\\040Music rw
46 27 0:56 / /mnt/vm rw - 9p hostshare rw,trans=virtio
47 27 0:57 / /mnt/nasdisk rw - ext4 /dev/sdd1 rw
48 27 0:58 / /mnt/nas rw - tmpfs tmpfs rw
garbage line without separator
";

    fn fs_of(path: &str) -> (String, bool) {
        let mounts = parse_mountinfo(SAMPLE);
        let m = mount_of(&mounts, Path::new(path)).expect("a mount");
        (m.fs_type.clone(), m.is_remote())
    }

    #[test]
    fn longest_prefix_decides_the_filesystem() {
        assert_eq!(fs_of("/home/me/Music"), ("ext4".into(), false));
        assert_eq!(fs_of("/media/share/Albums"), ("cifs".into(), true));
        assert_eq!(fs_of("/home/u/remote/a"), ("fuse.sshfs".into(), true));
        assert_eq!(fs_of("/mnt/usb/music"), ("fuseblk".into(), false));
        assert_eq!(fs_of("/mnt/vm"), ("9p".into(), true));
        // Component-wise: /mnt/nasdisk is not under /mnt/nas.
        assert_eq!(fs_of("/mnt/nasdisk/x"), ("ext4".into(), false));
        // A local disk mounted inside a network mount is local.
        assert_eq!(fs_of("/mnt/nas/local/x"), ("ext4".into(), false));
    }

    #[test]
    fn the_last_mount_on_a_path_hides_earlier_ones() {
        assert_eq!(fs_of("/mnt/nas/music"), ("tmpfs".into(), false));
        let without_last: String = SAMPLE
            .lines()
            .filter(|l| !l.starts_with("48 "))
            .map(|l| format!("{l}\n"))
            .collect();
        let mounts = parse_mountinfo(&without_last);
        let m = mount_of(&mounts, Path::new("/mnt/nas/music")).expect("mount");
        assert_eq!(m.fs_type, "nfs4");
        assert_eq!(m.source, "nas:/export/music");
        assert!(m.is_remote());
    }

    #[test]
    fn escaped_mount_points_are_decoded() {
        assert_eq!(fs_of("/mnt/My Music/Jazz"), ("smb3".into(), true));
        let mounts = parse_mountinfo(SAMPLE);
        let m = mount_of(&mounts, Path::new("/mnt/My Music")).expect("mount");
        assert_eq!(m.source, "//srv/My Music");
    }

    #[test]
    fn remote_types() {
        for t in [
            "nfs",
            "nfs4",
            "cifs",
            "smb3",
            "9p",
            "fuse.rclone",
            "fuse",
            "virtiofs",
        ] {
            assert!(is_remote_fs_type(t), "{t}");
        }
        for t in [
            "ext4", "xfs", "btrfs", "zfs", "tmpfs", "overlay", "fuseblk", "fuse.",
        ] {
            assert!(!is_remote_fs_type(t), "{t}");
        }
    }

    #[test]
    fn this_machine_has_a_root_mount() {
        if std::path::Path::new("/proc/self/mountinfo").exists() {
            assert!(current_mount_of(Path::new("/")).is_some());
        }
    }
}
