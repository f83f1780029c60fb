//! The operations' libc calls: uname, getifaddrs, statvfs, the filesystem ioctls, the RTC,
//! and clocks. Part of [`crate::sys`], re-exported there.

use std::ffi::CStr;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// uname(2) fields.
#[derive(Debug, Clone, Default)]
pub struct Uname {
    pub nodename: String,
    pub release: String,
    pub version: String,
    pub machine: String,
}

fn c_chars_to_string(chars: &[libc::c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

pub fn uname() -> io::Result<Uname> {
    // SAFETY: utsname is plain old data; all-zero bytes are a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname for the duration of the call.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Uname {
        nodename: c_chars_to_string(&uts.nodename),
        release: c_chars_to_string(&uts.release),
        version: c_chars_to_string(&uts.version),
        machine: c_chars_to_string(&uts.machine),
    })
}

/// The address part of one getifaddrs entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfAddress {
    V4 {
        addr: Ipv4Addr,
        prefix: u32,
    },
    V6 {
        addr: Ipv6Addr,
        prefix: u32,
    },
    /// AF_PACKET: the link-layer address.
    Link {
        mac: Vec<u8>,
    },
    Other,
}

/// One getifaddrs entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    pub name: String,
    pub flags: u32,
    pub address: IfAddress,
}

/// Copies the getifaddrs(3) list into owned values.
pub fn getifaddrs() -> io::Result<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; on success it owns a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a non-null node of the list getifaddrs returned and that we have not
        // freed yet.
        let ifa = unsafe { &*cur };
        let name = if ifa.ifa_name.is_null() {
            String::new()
        } else {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            unsafe { CStr::from_ptr(ifa.ifa_name) }
                .to_string_lossy()
                .into_owned()
        };
        // SAFETY: ifa_addr and ifa_netmask are null or point at sockaddrs of the family given
        // in their sa_family, owned by the list.
        let address = unsafe { decode_sockaddr(ifa.ifa_addr, ifa.ifa_netmask) };
        out.push(IfAddr {
            name,
            flags: ifa.ifa_flags,
            address,
        });
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// # Safety
/// `addr` and `mask` must be null or point at valid sockaddrs whose size matches their
/// `sa_family`.
unsafe fn decode_sockaddr(addr: *const libc::sockaddr, mask: *const libc::sockaddr) -> IfAddress {
    if addr.is_null() {
        return IfAddress::Other;
    }
    // SAFETY: non-null, valid per the function's contract.
    let family = i32::from(unsafe { (*addr).sa_family });
    match family {
        libc::AF_INET => {
            // SAFETY: AF_INET means the storage is a sockaddr_in.
            let sin = unsafe { &*(addr as *const libc::sockaddr_in) };
            let prefix = if mask.is_null() {
                0
            } else {
                // SAFETY: the netmask of an AF_INET address is a sockaddr_in.
                let m = unsafe { &*(mask as *const libc::sockaddr_in) };
                u32::from_be(m.sin_addr.s_addr).count_ones()
            };
            IfAddress::V4 {
                addr: Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                prefix,
            }
        }
        libc::AF_INET6 => {
            // SAFETY: AF_INET6 means the storage is a sockaddr_in6.
            let sin6 = unsafe { &*(addr as *const libc::sockaddr_in6) };
            let prefix = if mask.is_null() {
                0
            } else {
                // SAFETY: the netmask of an AF_INET6 address is a sockaddr_in6.
                let m = unsafe { &*(mask as *const libc::sockaddr_in6) };
                m.sin6_addr.s6_addr.iter().map(|b| b.count_ones()).sum()
            };
            IfAddress::V6 {
                addr: Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                prefix,
            }
        }
        libc::AF_PACKET => {
            // SAFETY: AF_PACKET means the storage is a sockaddr_ll.
            let sll = unsafe { &*(addr as *const libc::sockaddr_ll) };
            let len = usize::from(sll.sll_halen).min(sll.sll_addr.len());
            IfAddress::Link {
                mac: sll.sll_addr[..len].to_vec(),
            }
        }
        _ => IfAddress::Other,
    }
}

/// statvfs(3) in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsSpace {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub available_bytes: u64,
    pub read_only: bool,
}

pub fn statvfs(path: &Path) -> io::Result<FsSpace> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: statvfs is plain old data; all-zero bytes are a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is writable for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = u64::from(st.f_frsize as u32).max(1);
    Ok(FsSpace {
        total_bytes: (st.f_blocks as u64).saturating_mul(frsize),
        free_bytes: (st.f_bfree as u64).saturating_mul(frsize),
        available_bytes: (st.f_bavail as u64).saturating_mul(frsize),
        read_only: (st.f_flag & libc::ST_RDONLY) != 0,
    })
}

// linux/fs.h: _IOWR('X', 119, int), _IOWR('X', 120, int), _IOWR('X', 121, struct fstrim_range).
const FIFREEZE: u64 = 0xC004_5877;
const FITHAW: u64 = 0xC004_5878;
const FITRIM: u64 = 0xC018_5879;
// linux/rtc.h: _IOW('p', 0x0a, struct rtc_time).
const RTC_SET_TIME: u64 = 0x4024_700A;

fn ioctl_ret(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// FIFREEZE on the filesystem `dir` (an open directory on it) belongs to.
pub fn fifreeze(dir: &std::fs::File) -> io::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE takes (and ignores) an int pointer; `dir` is an open fd.
    ioctl_ret(unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, &mut arg) })
}

/// FITHAW on the filesystem `dir` belongs to.
pub fn fithaw(dir: &std::fs::File) -> io::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: FITHAW takes (and ignores) an int pointer; `dir` is an open fd.
    ioctl_ret(unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW as _, &mut arg) })
}

#[repr(C)]
struct FstrimRange {
    start: u64,
    len: u64,
    minlen: u64,
}

/// FITRIM over the whole filesystem; returns the bytes the kernel reports as trimmed.
pub fn fitrim(dir: &std::fs::File, minimum_bytes: u64) -> io::Result<u64> {
    let mut range = FstrimRange {
        start: 0,
        len: u64::MAX,
        minlen: minimum_bytes,
    };
    // SAFETY: FITRIM reads and updates a struct fstrim_range, which `range` matches in layout
    // (three u64, repr(C)); `dir` is an open fd.
    ioctl_ret(unsafe { libc::ioctl(dir.as_raw_fd(), FITRIM as _, &mut range) })?;
    Ok(range.len)
}

/// Broken-down UTC time as struct rtc_time wants it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RtcTime {
    pub tm_sec: libc::c_int,
    pub tm_min: libc::c_int,
    pub tm_hour: libc::c_int,
    pub tm_mday: libc::c_int,
    pub tm_mon: libc::c_int,
    pub tm_year: libc::c_int,
    pub tm_wday: libc::c_int,
    pub tm_yday: libc::c_int,
    pub tm_isdst: libc::c_int,
}

pub fn rtc_set_time(rtc: &std::fs::File, tm: &RtcTime) -> io::Result<()> {
    // SAFETY: RTC_SET_TIME reads a struct rtc_time (nine ints), which RtcTime matches in
    // layout; `rtc` is an open fd.
    ioctl_ret(unsafe { libc::ioctl(rtc.as_raw_fd(), RTC_SET_TIME as _, tm as *const RtcTime) })
}

/// clock_gettime(2) in nanoseconds.
pub fn clock_ns(clock: libc::clockid_t) -> io::Result<i128> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a writable timespec for the call.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec))
}

/// clock_settime(CLOCK_REALTIME) to `unix_ns` (non-negative).
pub fn set_realtime_ns(unix_ns: i64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as _,
        tv_nsec: (unix_ns % 1_000_000_000) as _,
    };
    // SAFETY: `ts` is a valid timespec for the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The local time zone now, as localtime_r(3) sees it (TZ, else /etc/localtime): the offset
/// from UTC in seconds and the zone's abbreviation ("CET"; empty when unknown).
pub fn local_utc_offset() -> (i64, String) {
    // SAFETY: time(NULL) only returns the time.
    let now = unsafe { libc::time(std::ptr::null_mut()) };
    // SAFETY: tm is plain old data; all-zero bytes are a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: `now` and `tm` are valid for the call; localtime_r is the thread-safe variant.
    if unsafe { libc::localtime_r(&now, &mut tm) }.is_null() {
        return (0, String::new());
    }
    let zone = if tm.tm_zone.is_null() {
        String::new()
    } else {
        // SAFETY: a non-null tm_zone points to a NUL-terminated string owned by libc that
        // lives at least until the next time-zone call; it is copied at once.
        unsafe { std::ffi::CStr::from_ptr(tm.tm_zone) }
            .to_string_lossy()
            .into_owned()
    };
    (tm.tm_gmtoff, zone)
}
