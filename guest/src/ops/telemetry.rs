//! Periodic telemetry from /proc, statvfs and /proc/net/dev. A sample reads a handful of
//! small files and never statvfs's a network filesystem; it still runs on the worker thread,
//! since statvfs of a local filesystem whose device or FUSE daemon hangs would wait too.

use std::time::{SystemTime, UNIX_EPOCH};

use qx_proto::agent::{CpuStats, LoadAverage, MemoryStats, Telemetry};

use super::{disks, netinfo, sysinfo};

/// The "cpu" line and cpu count of /proc/stat text, plus procs_running.
pub fn parse_proc_stat(text: &str) -> (CpuStats, u32) {
    let mut cpu = CpuStats::default();
    let mut running = 0;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("cpu") => {
                let v: Vec<u64> = f.map(|x| x.parse().unwrap_or(0)).collect();
                let at = |i: usize| v.get(i).copied().unwrap_or(0);
                cpu.user = at(0);
                cpu.nice = at(1);
                cpu.system = at(2);
                cpu.idle = at(3);
                cpu.iowait = at(4);
                cpu.irq = at(5);
                cpu.softirq = at(6);
                cpu.steal = at(7);
            }
            Some(k) if k.starts_with("cpu") => cpu.cpus += 1,
            Some("procs_running") => {
                running = f.next().and_then(|x| x.parse().ok()).unwrap_or(0);
            }
            _ => {}
        }
    }
    (cpu, running)
}

/// (busy, total) jiffies of a CpuStats; iowait counts as idle.
fn busy_total(c: &CpuStats) -> (u64, u64) {
    let idle = c.idle + c.iowait;
    let total = c.user + c.nice + c.system + idle + c.irq + c.softirq + c.steal;
    (total - idle, total)
}

/// /proc/meminfo text in bytes.
pub fn parse_meminfo(text: &str) -> MemoryStats {
    let mut m = MemoryStats::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let kib: u64 = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bytes = kib.saturating_mul(1024);
        match key {
            "MemTotal" => m.total_bytes = bytes,
            "MemFree" => m.free_bytes = bytes,
            "MemAvailable" => m.available_bytes = bytes,
            "Buffers" => m.buffers_bytes = bytes,
            "Cached" => m.cached_bytes = bytes,
            "SwapTotal" => m.swap_total_bytes = bytes,
            "SwapFree" => m.swap_free_bytes = bytes,
            _ => {}
        }
    }
    m
}

/// /proc/loadavg text.
pub fn parse_loadavg(text: &str) -> LoadAverage {
    let mut f = text.split_whitespace().map(|v| v.parse().unwrap_or(0.0));
    LoadAverage {
        one: f.next().unwrap_or(0.0),
        five: f.next().unwrap_or(0.0),
        fifteen: f.next().unwrap_or(0.0),
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Number of processes (numeric entries of /proc).
fn count_processes() -> u32 {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                })
                .count() as u32
        })
        .unwrap_or(0)
}

/// Keeps the previous CPU sample so usage is a share of the interval between samples.
#[derive(Debug, Default)]
pub struct Collector {
    previous_cpu: Option<(u64, u64)>,
}

impl Collector {
    pub fn new() -> Self {
        Collector::default()
    }

    /// CPU counters with the busy share since the previous call (0 on the first).
    pub fn cpu(&mut self, proc_stat: &str) -> (CpuStats, u32) {
        let (mut cpu, running) = parse_proc_stat(proc_stat);
        let now = busy_total(&cpu);
        if let Some((busy0, total0)) = self.previous_cpu {
            let total = now.1.saturating_sub(total0);
            if total > 0 {
                let busy = now.0.saturating_sub(busy0).min(total);
                cpu.usage_percent = (busy as f64 * 100.0 / total as f64) as f32;
            }
        }
        self.previous_cpu = Some(now);
        (cpu, running)
    }

    /// Takes one sample. Sources that cannot be read leave their fields at zero.
    pub fn sample(&mut self) -> Telemetry {
        let (cpu, running) = self.cpu(&read("/proc/stat"));
        let uptime_s = read("/proc/uptime")
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        Telemetry {
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
            uptime_s,
            cpu: Some(cpu),
            memory: Some(parse_meminfo(&read("/proc/meminfo"))),
            load: Some(parse_loadavg(&read("/proc/loadavg"))),
            processes: count_processes(),
            processes_running: running,
            filesystems: disks::filesystems(),
            network: netinfo::counters(),
            hostname: sysinfo::hostname(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn cpu_usage_is_the_busy_share_between_samples() {
        let mut c = Collector::new();
        let (first, running) =
            c.cpu("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\ncpu1 1 2 3 4\nprocs_running 3\n");
        assert_eq!(first.cpus, 2);
        assert_eq!(running, 3);
        assert_eq!(first.usage_percent, 0.0);
        // +300 busy (user 200, system 100), +100 idle: 75 %.
        let (second, _) = c.cpu("cpu  300 0 200 900 0 0 0 0 0 0\ncpu0 1\n");
        assert_eq!(second.usage_percent, 75.0);
        assert_eq!((second.user, second.system, second.idle), (300, 200, 900));
    }

    #[test]
    fn meminfo_and_loadavg_parse_to_bytes_and_floats() {
        let m = parse_meminfo(
            "MemTotal:  2048 kB\nMemFree: 1024 kB\nMemAvailable: 1536 kB\nSwapTotal: 0 kB\n",
        );
        assert_eq!(m.total_bytes, 2048 * 1024);
        assert_eq!(m.free_bytes, 1024 * 1024);
        assert_eq!(m.available_bytes, 1536 * 1024);
        let l = parse_loadavg("0.50 1.25 2.00 1/123 4567\n");
        assert_eq!((l.one, l.five, l.fifteen), (0.5, 1.25, 2.0));
    }

    #[test]
    fn a_real_sample_has_memory_cpus_processes_uptime_and_lo() {
        let mut c = Collector::new();
        let s = c.sample();
        let mem = s.memory.unwrap();
        assert!(mem.total_bytes > 0);
        assert!(mem.free_bytes <= mem.total_bytes);
        assert!(mem.available_bytes <= mem.total_bytes);
        let cpu = s.cpu.unwrap();
        assert!(cpu.cpus >= 1);
        assert!(cpu.user + cpu.system + cpu.idle > 0);
        assert!(s.uptime_s > 0);
        // This test's own process is one of them.
        assert!(s.processes >= 1);
        assert!(std::path::Path::new(&format!("/proc/{}", std::process::id())).exists());
        assert!(s.processes_running >= 1);
        assert!(s.network.iter().any(|n| n.interface == "lo"));
        assert_eq!(s.hostname, sysinfo::hostname());
        assert!(s.unix_ms > 1_600_000_000_000);
        // Burn some CPU so the second sample has an interval to measure.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let s2 = c.sample();
        let u = s2.cpu.unwrap().usage_percent;
        assert!((0.0..=100.0).contains(&u), "{u}");
    }
}
