//! Guest clocks: read REALTIME/MONOTONIC/BOOTTIME, set REALTIME, write the RTC (in UTC, as
//! hwclock --utc does).
//!
//! A set must fall in a sane window unless the request says `force`: not before the agent's
//! build date (no guest it runs in lives in the past), and no further than `time_max_skew_s`
//! from the guest's own clock (a host bug must not move a guest to 2200). When the guest's
//! clock itself reads before the build date it is plainly wrong, and only the build-date floor
//! applies.

use std::path::Path;

use qx_proto::agent::{ErrorCode, TimeInfo, TimeSetReply, TimeSetRequest};

use super::{OpError, OpResult};
use crate::sys::{self, RtcTime};

/// Largest move of the clock without `force`, when the configuration names none: a year and a
/// day, enough for a guest restored from an old snapshot.
pub const DEFAULT_MAX_SKEW_S: u64 = 366 * 86_400;

/// The agent's build date (Unix seconds), stamped by the build script.
pub fn build_unix_s() -> i64 {
    env!("QX_AGENT_BUILD_UNIX_S").parse().unwrap_or(0)
}

/// Where a set may land without `force`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    pub not_before_ns: i64,
    pub max_skew_ns: i64,
}

impl TimeWindow {
    /// From the build date, at most `max_skew_s` from the guest's clock.
    pub fn new(max_skew_s: u64) -> Self {
        TimeWindow {
            not_before_ns: build_unix_s().saturating_mul(1_000_000_000),
            max_skew_ns: i64::try_from(max_skew_s)
                .unwrap_or(i64::MAX)
                .saturating_mul(1_000_000_000),
        }
    }

    /// Whether `unix_ns` may be set when the guest's clock reads `now_ns`; the error says why
    /// not.
    pub fn check(&self, unix_ns: i64, now_ns: i64) -> OpResult<()> {
        let day = |ns: i64| {
            let tm = utc_tm(ns.div_euclid(1_000_000_000));
            format!(
                "{:04}-{:02}-{:02}",
                tm.tm_year + 1900,
                tm.tm_mon + 1,
                tm.tm_mday
            )
        };
        if unix_ns < self.not_before_ns {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "unix_ns {unix_ns} ({}) is before the agent was built ({}); set force to set it anyway",
                    day(unix_ns),
                    day(self.not_before_ns)
                ),
            ));
        }
        let skew = unix_ns.saturating_sub(now_ns).saturating_abs();
        if now_ns >= self.not_before_ns && skew > self.max_skew_ns {
            return Err(OpError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "unix_ns {unix_ns} ({}) is {} days from the guest's clock ({}), more than time_max_skew_s allows ({} days); set force to set it anyway",
                    day(unix_ns),
                    skew / 86_400_000_000_000,
                    day(now_ns),
                    self.max_skew_ns / 86_400_000_000_000
                ),
            ));
        }
        Ok(())
    }
}

impl Default for TimeWindow {
    fn default() -> Self {
        TimeWindow::new(DEFAULT_MAX_SKEW_S)
    }
}

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

/// Sets CLOCK_REALTIME and, with `write_rtc`, the first RTC of `rtc_paths`, when the time is
/// in `window` or the request says `force`.
pub fn set_with_rtc(
    req: &TimeSetRequest,
    window: &TimeWindow,
    rtc_paths: &[&str],
) -> OpResult<TimeSetReply> {
    if req.unix_ns <= 0 {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!("unix_ns {} is not a time after 1970", req.unix_ns),
        ));
    }
    let previous = clock(libc::CLOCK_REALTIME, "CLOCK_REALTIME")? as i64;
    if !req.force {
        window.check(req.unix_ns, previous)?;
    }
    sys::set_realtime_ns(req.unix_ns).map_err(|e| OpError::io("clock_settime", &e))?;
    let rtc_written = req.write_rtc && write_rtc(req.unix_ns, rtc_paths);
    Ok(TimeSetReply {
        previous_unix_ns: previous,
        new_unix_ns: req.unix_ns,
        offset_ns: req.unix_ns.saturating_sub(previous),
        rtc_written,
    })
}

/// Sets CLOCK_REALTIME and, with `write_rtc`, the RTC (/dev/rtc0, else /dev/rtc), within
/// the default [`TimeWindow`] unless forced. `rtc_written` is true only when an RTC took the
/// time.
pub fn set(req: &TimeSetRequest) -> OpResult<TimeSetReply> {
    set_within(req, &TimeWindow::default())
}

/// [`set`] within `window` (the configured skew).
pub fn set_within(req: &TimeSetRequest, window: &TimeWindow) -> OpResult<TimeSetReply> {
    set_with_rtc(req, window, RTC_PATHS)
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
            (1_000_000_000, "before the agent was built"),
            (now + 200 * year_ns, "from the guest's clock"),
        ] {
            let mut req = TimeSetRequest {
                unix_ns,
                write_rtc: false,
                force: false,
            };
            let e = set_with_rtc(&req, &TimeWindow::default(), &[]).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{unix_ns}: {e}");
            assert!(e.message.contains(why), "{e}");
            assert!(e.message.contains("set force"), "{e}");
            // Forced, the window is not checked: the OS refuses this thread instead.
            req.force = true;
            let e = set_with_rtc(&req, &TimeWindow::default(), &[]).unwrap_err();
            assert_eq!(e.code, ErrorCode::PermissionDenied, "{unix_ns}: {e}");
        }
    }

    #[test]
    fn the_window_is_the_build_date_and_the_configured_skew() {
        let w = TimeWindow::new(3600);
        let built = build_unix_s() * 1_000_000_000;
        assert!(built > 1_700_000_000_000_000_000, "{built}");
        let hour = 3_600_000_000_000i64;
        let now = built + 100 * hour;
        assert!(w.check(now + hour, now).is_ok());
        assert!(w.check(now - hour, now).is_ok());
        assert!(w.check(now + hour + 1, now).is_err());
        // A guest clock before the build date is wrong: any time after the build date goes.
        assert!(w.check(built + 1000 * hour, built - hour).is_ok());
        assert!(w.check(built - 1, built - hour).is_err());
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
                force: false,
            },
            &TimeWindow::default(),
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
                force: true,
            })
            .unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument);
        }
    }
}
