//! Mounted filesystems (/proc/self/mountinfo + statvfs) and block devices (/sys/block).
//!
//! Network filesystems are never statvfs'ed: a dead server would block the call, and with it
//! the agent's loop. Block devices of size 0 (unattached loop devices) are left out.

use std::path::Path;

use qx_proto::agent::{BlockDevice, DisksInfo, FilesystemUsage};

use super::{OpError, OpResult};
use crate::sys;

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Major:minor of the filesystem (the same for every bind mount of it).
    pub dev: (u32, u32),
    pub mountpoint: String,
    pub fstype: String,
    pub source: String,
    pub read_only: bool,
}

/// Filesystem types that live on a local block device.
const DISK_FS: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "msdos", "exfat", "f2fs", "jfs", "reiserfs",
    "zfs", "ntfs", "ntfs3", "hfsplus", "nilfs2", "bcachefs", "udf", "iso9660", "erofs", "squashfs",
];

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
pub(crate) fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                let v = (u32::from(d[0] - b'0') << 6)
                    | (u32::from(d[1] - b'0') << 3)
                    | u32::from(d[2] - b'0');
                out.push(v as u8);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mounts of /proc/self/mountinfo text, in mount order.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            if sep < 6 || fields.len() < sep + 3 {
                return None;
            }
            let (maj, min) = fields[2].split_once(':')?;
            let opts_ro = fields[5].split(',').any(|o| o == "ro");
            let super_ro = fields
                .get(sep + 3)
                .is_some_and(|s| s.split(',').any(|o| o == "ro"));
            Some(Mount {
                dev: (maj.parse().ok()?, min.parse().ok()?),
                mountpoint: unescape(fields[4]),
                fstype: fields[sep + 1].to_string(),
                source: unescape(fields[sep + 2]),
                read_only: opts_ro || super_ro,
            })
        })
        .collect()
}

/// Mounts in mount order.
pub fn mounts() -> OpResult<Vec<Mount>> {
    mounts_from(Path::new("/proc/self/mountinfo"))
}

/// Mounts of a mountinfo file, in mount order.
pub fn mounts_from(mountinfo: &Path) -> OpResult<Vec<Mount>> {
    let text = std::fs::read_to_string(mountinfo)
        .map_err(|e| OpError::io(&mountinfo.display().to_string(), &e))?;
    Ok(parse_mountinfo(&text))
}

/// True for filesystem types that live on a local block device.
pub fn is_local_disk_fs(fstype: &str) -> bool {
    DISK_FS.contains(&fstype) || fstype.starts_with("fuseblk")
}

/// Memory-backed filesystems shown by `disks` next to the disk ones.
fn is_memory_fs(fstype: &str) -> bool {
    matches!(fstype, "tmpfs" | "ramfs")
}

/// The first mount of each filesystem among those `keep` accepts. (A mount table is short:
/// a list is searched, no hash set is built.)
fn unique_mounts(mounts: Vec<Mount>, keep: impl Fn(&Mount) -> bool) -> Vec<Mount> {
    let mut picked: Vec<Mount> = Vec::new();
    for m in mounts {
        if keep(&m) && !picked.iter().any(|p| p.dev == m.dev) {
            picked.push(m);
        }
    }
    picked
}

fn usage(m: &Mount) -> Option<FilesystemUsage> {
    let space = sys::statvfs(Path::new(&m.mountpoint)).ok()?;
    Some(FilesystemUsage {
        mountpoint: m.mountpoint.clone(),
        device: m.source.clone(),
        fstype: m.fstype.clone(),
        total_bytes: space.total_bytes,
        used_bytes: space.total_bytes.saturating_sub(space.free_bytes),
        available_bytes: space.available_bytes,
        read_only: m.read_only || space.read_only,
    })
}

/// Usage of the real local filesystems (one entry per filesystem), for telemetry.
pub fn filesystems() -> Vec<FilesystemUsage> {
    let Ok(all) = mounts() else {
        return Vec::new();
    };
    unique_mounts(all, |m| is_local_disk_fs(&m.fstype))
        .iter()
        .filter_map(usage)
        .collect()
}

fn read_trim(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn read_flag(path: &Path) -> bool {
    read_trim(path) == "1"
}

fn block_device(dir: &Path, name: &str, partition: bool) -> BlockDevice {
    let sectors: u64 = read_trim(&dir.join("size")).parse().unwrap_or(0);
    let mut model = read_trim(&dir.join("device/model"));
    if model.is_empty() && !partition {
        if let Ok(driver) = std::fs::read_link(dir.join("device/driver")) {
            if driver.file_name().is_some_and(|d| d == "virtio_blk") {
                model = "virtio-blk".to_string();
            }
        }
    }
    let mut serial = read_trim(&dir.join("serial"));
    if serial.is_empty() {
        serial = read_trim(&dir.join("device/serial"));
    }
    BlockDevice {
        name: name.to_string(),
        // /sys/block sizes are in 512-byte sectors whatever the device's block size.
        size_bytes: sectors.saturating_mul(512),
        model: if partition { String::new() } else { model },
        serial: if partition { String::new() } else { serial },
        removable: read_flag(&dir.join("removable")),
        rotational: read_flag(&dir.join("queue/rotational")),
        read_only: read_flag(&dir.join("ro")),
        partition,
    }
}

/// Block devices of a /sys/block-like directory, with their partitions, sorted by name.
pub fn block_devices_in(sys_block: &Path) -> Vec<BlockDevice> {
    let Ok(rd) = std::fs::read_dir(sys_block) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = sys_block.join(&name);
        let dev = block_device(&dir, &name, false);
        if dev.size_bytes == 0 {
            continue;
        }
        out.push(dev);
        if let Ok(parts) = std::fs::read_dir(&dir) {
            for p in parts.flatten() {
                let pdir = p.path();
                if pdir.join("partition").exists() {
                    let pname = p.file_name().to_string_lossy().into_owned();
                    let mut part = block_device(&pdir, &pname, true);
                    part.rotational = out.last().is_some_and(|d: &BlockDevice| d.rotational);
                    out.push(part);
                }
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Mounted disk and memory filesystems (one entry per filesystem) and block devices.
pub fn disks() -> OpResult<DisksInfo> {
    let all = mounts()?;
    let filesystems = unique_mounts(all, |m| {
        is_local_disk_fs(&m.fstype) || is_memory_fs(&m.fstype)
    })
    .iter()
    .filter_map(usage)
    .collect();
    Ok(DisksInfo {
        filesystems,
        devices: block_devices_in(Path::new("/sys/block")),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const SAMPLE: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
40 27 254:0 /srv /mnt/bind rw,relatime shared:5 master:1 - ext4 /dev/vda rw
41 27 7:0 / /mnt/with\\040space ro,relatime - xfs /dev/loop0 rw
42 27 0:50 / /run rw,nosuid - tmpfs tmpfs rw,size=1024k
43 27 0:51 / /net rw - nfs4 server:/export rw
44 27 8:1 / /boot rw - vfat /dev/sda1 ro
";

    #[test]
    fn mountinfo_parses_escapes_optional_fields_and_read_only() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 7);
        assert_eq!(m[1].dev, (254, 0));
        assert_eq!(m[2].mountpoint, "/mnt/bind");
        assert_eq!(m[2].fstype, "ext4");
        assert_eq!(m[3].mountpoint, "/mnt/with space");
        assert!(m[3].read_only);
        assert!(!m[1].read_only);
        assert!(m[6].read_only, "super options ro");
        assert_eq!(m[5].source, "server:/export");
    }

    #[test]
    fn one_entry_per_local_disk_filesystem() {
        let m = unique_mounts(parse_mountinfo(SAMPLE), |m| is_local_disk_fs(&m.fstype));
        let points: Vec<&str> = m.iter().map(|m| m.mountpoint.as_str()).collect();
        assert_eq!(points, ["/", "/mnt/with space", "/boot"]);
    }

    #[test]
    fn root_filesystem_usage_matches_statvfs_and_the_mount_table() {
        let mounts = mounts().unwrap();
        let root = mounts.iter().rev().find(|m| m.mountpoint == "/").unwrap();
        let info = disks().unwrap();
        if is_local_disk_fs(&root.fstype) {
            let fs = filesystems();
            let r = fs.iter().find(|f| f.mountpoint == "/").unwrap();
            assert_eq!(r.fstype, root.fstype);
            assert!(r.total_bytes > 0 && r.used_bytes <= r.total_bytes);
            assert!(r.available_bytes <= r.total_bytes);
            assert!(info.filesystems.iter().any(|f| f.mountpoint == "/"));
        }
        // Pseudo filesystems never appear.
        assert!(!info
            .filesystems
            .iter()
            .any(|f| f.fstype == "proc" || f.fstype == "sysfs"));
    }

    #[test]
    fn block_devices_match_sysfs_sizes() {
        let devices = block_devices_in(Path::new("/sys/block"));
        for d in devices.iter().filter(|d| !d.partition) {
            let sectors: u64 = read_trim(&Path::new("/sys/block").join(&d.name).join("size"))
                .parse()
                .unwrap();
            assert_eq!(d.size_bytes, sectors * 512);
            assert!(d.size_bytes > 0);
        }
        // The device holding / is listed, when / is on a block device.
        let root = mounts()
            .unwrap()
            .into_iter()
            .rev()
            .find(|m| m.mountpoint == "/")
            .unwrap();
        if let Some(dev) = root.source.strip_prefix("/dev/") {
            if Path::new("/sys/class/block").join(dev).exists() {
                assert!(
                    devices.iter().any(|d| d.name == dev),
                    "{dev} in {devices:?}"
                );
            }
        }
    }
}
