//! How many CPUs this process may use: the container's CPU limit when there is one.
//!
//! In a pod with `resources.limits.cpu: 2` on a 64-core node,
//! `std::thread::available_parallelism` says 64 (it sees the CPU set, not the CFS quota),
//! and ONNX Runtime would start one thread per core: dozens of threads throttled onto two
//! CPUs' worth of time. The quota is in cgroup v2's `cpu.max` (`"<quota> <period>"`, or
//! `"max <period>"` without a limit).

use std::path::Path;

/// Where cgroup v2 exposes the CPU limit of the process's own cgroup inside a container.
const CPU_MAX: &str = "/sys/fs/cgroup/cpu.max";

/// The CPUs this process may use: the cgroup v2 CPU quota rounded up (at least 1), capped
/// by [`std::thread::available_parallelism`]; that alone when there is no quota.
pub fn cpu_limit() -> usize {
    let available = std::thread::available_parallelism().map_or(1, usize::from);
    let quota = read_cpu_max(Path::new(CPU_MAX));
    match quota {
        Some(limit) => limit.min(available),
        None => available,
    }
}

fn read_cpu_max(path: &Path) -> Option<usize> {
    parse_cpu_max(&std::fs::read_to_string(path).ok()?)
}

/// Parses cgroup v2 `cpu.max`: `"<quota> <period>"` in microseconds gives
/// `ceil(quota / period)` CPUs (at least 1); `"max ..."` (no limit) or anything
/// unreadable gives `None`.
pub(crate) fn parse_cpu_max(text: &str) -> Option<usize> {
    let mut fields = text.split_whitespace();
    let quota: u64 = fields.next()?.parse().ok()?;
    let period: u64 = match fields.next() {
        Some(period) => period.parse().ok()?,
        // The period is optional when written; the kernel default is 100 ms.
        None => 100_000,
    };
    if fields.next().is_some() || quota == 0 || period == 0 {
        return None;
    }
    usize::try_from(quota.div_ceil(period))
        .ok()
        .map(|cpus| cpus.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quota_and_period() {
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2));
        assert_eq!(parse_cpu_max("150000 100000"), Some(2));
        assert_eq!(parse_cpu_max("50000 100000"), Some(1));
        assert_eq!(parse_cpu_max("1000 100000"), Some(1));
        assert_eq!(parse_cpu_max("400000 50000"), Some(8));
        assert_eq!(parse_cpu_max("300000"), Some(3));
    }

    #[test]
    fn no_limit_or_garbage_is_none() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("max"), None);
        assert_eq!(parse_cpu_max(""), None);
        assert_eq!(parse_cpu_max("0 100000"), None);
        assert_eq!(parse_cpu_max("100000 0"), None);
        assert_eq!(parse_cpu_max("-5 100000"), None);
        assert_eq!(parse_cpu_max("1.5 100000"), None);
        assert_eq!(parse_cpu_max("100000 100000 7"), None);
    }

    #[test]
    fn reads_a_file_and_never_exceeds_the_cpus() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cpu.max");
        std::fs::write(&path, "250000 100000\n").unwrap();
        assert_eq!(read_cpu_max(&path), Some(3));
        assert_eq!(read_cpu_max(&dir.path().join("missing")), None);
        let limit = cpu_limit();
        assert!(limit >= 1);
        assert!(limit <= std::thread::available_parallelism().map_or(1, usize::from));
    }
}
