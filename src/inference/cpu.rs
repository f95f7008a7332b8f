//! How many CPUs this process may use, for thread counts.

/// The CPUs this process may use (at least 1): [`std::thread::available_parallelism`],
/// which on Linux honours the CPU affinity mask and the cgroup v1/v2 CPU quota (a pod's
/// `resources.limits.cpu`, rounded down, at least 1), so ONNX Runtime does not start one
/// thread per core of a large node inside a small pod.
pub fn cpu_limit() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
