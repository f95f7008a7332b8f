//! What a worker can see of its own confinement, logged once as it starts: the pod's
//! security context as the kernel applies it (user, effective capabilities, no-new-privs,
//! seccomp mode, a read-only root, writable scratch). An operator reads it in the pod's log;
//! the real-node tests assert it from there. Nothing here changes the worker's work: a
//! field that cannot be read is reported as unknown.

use std::path::Path;

/// The worker's confinement, as read from `/proc/self` and the filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// Effective user id (`Uid:` of /proc/self/status, second field).
    pub uid: Option<u32>,
    /// Effective capabilities, hex (`CapEff:`); all zeros means none.
    pub cap_eff: Option<String>,
    /// `NoNewPrivs:` (set by `allowPrivilegeEscalation: false`).
    pub no_new_privs: Option<bool>,
    /// `Seccomp:`: 0 off, 1 strict, 2 filter (`RuntimeDefault`).
    pub seccomp: Option<u8>,
    /// Whether `/` is mounted read-only (`readOnlyRootFilesystem`), from mountinfo.
    pub root_read_only: Option<bool>,
    /// Whether a file could be made in the scratch folder (the pod's `emptyDir`).
    pub scratch_writable: bool,
}

impl Sandbox {
    /// Reads this process's confinement; `scratch` is the folder it writes temporary
    /// files to.
    pub fn inspect(scratch: &Path) -> Sandbox {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut sandbox = Sandbox::from_proc(&status, &mountinfo);
        sandbox.scratch_writable = tempfile::tempfile_in(scratch).is_ok();
        sandbox
    }

    /// The fields /proc gives, from the text of `status` and `mountinfo`.
    pub fn from_proc(status: &str, mountinfo: &str) -> Sandbox {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        Sandbox {
            uid: field("Uid")
                .and_then(|ids| ids.split_whitespace().nth(1))
                .and_then(|id| id.parse().ok()),
            cap_eff: field("CapEff").map(str::to_owned),
            no_new_privs: field("NoNewPrivs").map(|v| v == "1"),
            seccomp: field("Seccomp").and_then(|v| v.parse().ok()),
            root_read_only: root_read_only(mountinfo),
            scratch_writable: false,
        }
    }

    /// Logs the confinement (INFO, `worker sandbox`).
    pub fn log(&self) {
        let shown = |known: Option<String>| known.unwrap_or_else(|| "unknown".to_owned());
        tracing::info!(
            uid = %shown(self.uid.map(|u| u.to_string())),
            cap_eff = %shown(self.cap_eff.clone()),
            no_new_privs = %shown(self.no_new_privs.map(|b| b.to_string())),
            seccomp = %shown(self.seccomp.map(|s| s.to_string())),
            root_fs = %match self.root_read_only {
                Some(true) => "read-only",
                Some(false) => "writable",
                None => "unknown",
            },
            scratch = %if self.scratch_writable {
                "writable"
            } else {
                "not writable"
            },
            "worker sandbox"
        );
    }
}

/// Whether the mount on `/` (the last one listed: later mounts hide earlier ones) is
/// read-only; mountinfo's sixth field holds the per-mount options.
fn root_read_only(mountinfo: &str) -> Option<bool> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let mount_point = fields.nth(4)?;
            let options = fields.next()?;
            (mount_point == "/").then(|| options.split(',').any(|o| o == "ro"))
        })
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tkinsight\nUid:\t0\t65532\t65532\t65532\nGid:\t65532\t65532\t65532\t65532\nCapEff:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n";
    const MOUNTS: &str = "\
        600 500 0:50 / / rw,relatime - overlay overlay rw\n\
        601 600 0:50 / / ro,relatime - overlay overlay rw\n\
        602 601 0:51 / /tmp rw,nosuid - tmpfs tmpfs rw\n";

    #[test]
    fn a_restricted_pods_confinement_is_read_from_proc() {
        let sandbox = Sandbox::from_proc(STATUS, MOUNTS);
        assert_eq!(
            sandbox.uid,
            Some(65532),
            "the effective id, not the real one"
        );
        assert_eq!(sandbox.cap_eff.as_deref(), Some("0000000000000000"));
        assert_eq!(sandbox.no_new_privs, Some(true));
        assert_eq!(sandbox.seccomp, Some(2));
        assert_eq!(
            sandbox.root_read_only,
            Some(true),
            "the last mount on / counts"
        );
    }

    #[test]
    fn what_proc_does_not_say_stays_unknown() {
        let sandbox = Sandbox::from_proc("Name:\tx\n", "");
        assert_eq!(sandbox.uid, None);
        assert_eq!(sandbox.cap_eff, None);
        assert_eq!(sandbox.no_new_privs, None);
        assert_eq!(sandbox.seccomp, None);
        assert_eq!(sandbox.root_read_only, None);
        let writable_root = Sandbox::from_proc("", "1 0 0:1 / / rw,relatime - ext4 /dev/x rw\n");
        assert_eq!(writable_root.root_read_only, Some(false));
    }

    #[test]
    fn this_process_is_inspected_without_failing() {
        let scratch = tempfile::tempdir().expect("temp dir");
        let sandbox = Sandbox::inspect(scratch.path());
        assert!(sandbox.scratch_writable);
        assert!(sandbox.uid.is_some(), "Linux has /proc/self/status");
    }
}
