//! Guest clocks: read REALTIME/MONOTONIC/BOOTTIME, set REALTIME, write the RTC (in UTC, as
//! hwclock --utc does).

use std::path::Path;

use qx_proto::agent::{ErrorCode, TimeInfo, TimeSetReply, TimeSetRequest};

use super::{OpError, OpResult};
use crate::sys::{self, RtcTime};

/// RTC device nodes tried in order.
pub const RTC_PATHS: &[&str] = &["/dev/rtc0", "/dev/rtc"];

fn clock(id: libc::clockid_t, what: &str) -> OpResult<i128> {
    sys::clock_ns(id).map_err(|e| OpError::io(what, &e))
}

/// The guest's clocks, and whether an RTC device exists.
pub fn get() -> OpResult<TimeInfo> {
    Ok(TimeInfo {
        unix_ns: clock(libc::CLOCK_REALTIME, "CLOCK_REALTIME")? as i64,
        monotonic_ns: clock(libc::CLOCK_MONOTONIC, "CLOCK_MONOTONIC")? as u64,
        boottime_ns: clock(libc::CLOCK_BOOTTIME, "CLOCK_BOOTTIME")? as u64,
        rtc_present: RTC_PATHS.iter().any(|p| Path::new(p).exists()),
    })
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31) (Howard Hinnant's civil_from_days).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Broken-down UTC time of Unix seconds, as struct rtc_time wants it.
pub fn utc_tm(unix_s: i64) -> RtcTime {
    let days = unix_s.div_euclid(86_400);
    let secs = unix_s.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    const BEFORE_MONTH: [i32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = BEFORE_MONTH[(m - 1) as usize] + d as i32 - 1 + i32::from(leap && m > 2);
    RtcTime {
        tm_sec: (secs % 60) as i32,
        tm_min: (secs / 60 % 60) as i32,
        tm_hour: (secs / 3600) as i32,
        tm_mday: d as i32,
        tm_mon: m as i32 - 1,
        tm_year: (y - 1900) as i32,
        // 1970-01-01 was a Thursday.
        tm_wday: (days + 4).rem_euclid(7) as i32,
        tm_yday: yday,
        tm_isdst: 0,
    }
}

/// Writes `unix_ns` (UTC, whole seconds) to the first RTC of `rtc_paths` that accepts it.
fn write_rtc(unix_ns: i64, rtc_paths: &[&str]) -> bool {
    let tm = utc_tm(unix_ns.div_euclid(1_000_000_000));
    rtc_paths.iter().any(|p| {
        std::fs::File::open(p)
            .and_then(|f| sys::rtc_set_time(&f, &tm))
            .is_ok()
    })
}

/// Sets CLOCK_REALTIME and, with `write_rtc`, the first RTC of `rtc_paths`.
pub fn set_with_rtc(req: &TimeSetRequest, rtc_paths: &[&str]) -> OpResult<TimeSetReply> {
    if req.unix_ns <= 0 {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!("unix_ns {} is not a time after 1970", req.unix_ns),
        ));
    }
    let previous = clock(libc::CLOCK_REALTIME, "CLOCK_REALTIME")? as i64;
    sys::set_realtime_ns(req.unix_ns).map_err(|e| OpError::io("clock_settime", &e))?;
    let rtc_written = req.write_rtc && write_rtc(req.unix_ns, rtc_paths);
    Ok(TimeSetReply {
        previous_unix_ns: previous,
        new_unix_ns: req.unix_ns,
        offset_ns: req.unix_ns.saturating_sub(previous),
        rtc_written,
    })
}

/// Sets CLOCK_REALTIME and, with `write_rtc`, the RTC (/dev/rtc0, else /dev/rtc).
/// `rtc_written` is true only when an RTC took the time.
pub fn set(req: &TimeSetRequest) -> OpResult<TimeSetReply> {
    set_with_rtc(req, RTC_PATHS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::ops::testutil::TempDir;

    #[test]
    fn clocks_are_consistent_with_the_system() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        let t = get().unwrap();
        assert!(t.unix_ns >= before);
        assert!(t.monotonic_ns > 0);
        assert!(t.boottime_ns >= t.monotonic_ns);
        assert_eq!(
            t.rtc_present,
            Path::new("/dev/rtc0").exists() || Path::new("/dev/rtc").exists()
        );
    }

    #[test]
    fn utc_breakdown_matches_date_for_sample_instants() {
        for s in [
            0i64,
            951_782_400,
            1_709_210_096,
            4_107_542_399,
            1_735_689_599,
        ] {
            let tm = utc_tm(s);
            let out = std::process::Command::new("date")
                .args(["-u", "-d", &format!("@{s}"), "+%Y %m %d %H %M %S %w %j"])
                .output()
                .unwrap();
            let f: Vec<i32> = String::from_utf8(out.stdout)
                .unwrap()
                .split_whitespace()
                .map(|v| v.trim_start_matches('0').parse().unwrap_or(0))
                .collect();
            assert_eq!(
                [
                    tm.tm_year + 1900,
                    tm.tm_mon + 1,
                    tm.tm_mday,
                    tm.tm_hour,
                    tm.tm_min,
                    tm.tm_sec,
                    tm.tm_wday,
                    tm.tm_yday + 1
                ]
                .to_vec(),
                f,
                "@{s}"
            );
        }
    }

    #[test]
    fn a_time_outside_the_sane_window_is_refused_with_the_reason() {
        // Without CAP_SYS_TIME on this thread: a missing check fails with EPERM rather than
        // setting the machine's clock to 1970.
        let _unprivileged = crate::sys::attack::ThreadEuid::set(65534).unwrap();
        let now = get().unwrap().unix_ns;
        let year_ns = 365 * 86_400 * 1_000_000_000i64;
        for (unix_ns, why) in [
            (1_000_000_000, "build"),
            (now + 200 * year_ns, "from the guest's clock"),
            (now - 3 * year_ns, "from the guest's clock"),
        ] {
            let e = set_with_rtc(
                &TimeSetRequest {
                    unix_ns,
                    write_rtc: false,
                },
                &[],
            )
            .unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{unix_ns}: {e}");
            assert!(e.message.contains(why), "{e}");
        }
    }

    #[test]
    fn set_takes_the_time_and_reports_the_rtc_honestly() {
        let t = TempDir::new("rtc");
        std::fs::write(t.join("not-an-rtc"), b"").unwrap();
        let not_rtc = t.s("not-an-rtc");
        // Setting the clock to what it already reads leaves the machine's time alone.
        let now = get().unwrap().unix_ns;
        let reply = set_with_rtc(
            &TimeSetRequest {
                unix_ns: now,
                write_rtc: true,
            },
            &["/nonexistent/rtc", &not_rtc],
        );
        match reply {
            Ok(r) => {
                assert_eq!(r.new_unix_ns, now);
                assert_eq!(r.offset_ns, now - r.previous_unix_ns);
                assert!(r.previous_unix_ns >= now);
                assert!(!r.rtc_written, "a regular file is no RTC");
                assert!(get().unwrap().unix_ns >= now);
            }
            // Without CAP_SYS_TIME the OS refuses, and says so.
            Err(e) => assert_eq!(e.code, ErrorCode::PermissionDenied, "{e}"),
        }
        for bad in [0, -5] {
            let e = set(&TimeSetRequest {
                unix_ns: bad,
                write_rtc: false,
            })
            .unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument);
        }
    }
}
