//! What the running kernel offers, learnt from the programs themselves as they load
//! and attach, not from its version number: distributions backport features, so a
//! number proves nothing either way. The number is only named in the message.
//!
//! A failure in a program the daemon cannot work without ends the start with one line
//! naming the kernel release and the missing feature; the verifier's log goes to the
//! debug log, never to the user. A failure in an optional program is logged once,
//! saying what the daemon does without it, and the start goes on.

use std::fmt;

use aya::{EbpfError, maps::MapError, programs::ProgramError};
use tracing::{debug, warn};

use super::KernelError;

/// A kernel feature one program needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub what: &'static str,
    /// The oldest release known to offer it: the mainline release that brought it
    /// where that is certain, else the oldest kernel `cargo xtask vm` passed (5.10).
    pub since: &'static str,
    /// What the daemon does without it; `None`: it cannot run without it.
    pub without: Option<&'static str>,
}

const SOCKOPS: Feature = Feature {
    what: "sock_ops programs with socket storage (bpf_sk_storage_get)",
    since: "5.10",
    without: None,
};
const CONNECT: Feature = Feature {
    what: "cgroup connect programs with socket storage and the network namespace cookie",
    since: "5.10",
    without: None,
};
const GETPEERNAME: Feature = Feature {
    what: "cgroup getpeername programs",
    since: "5.8",
    without: Some(
        "getpeername() on a redirected socket returns the proxy's address, not the original destination",
    ),
};
const RING_BUFFER: Feature = Feature {
    what: "BPF ring buffers",
    since: "5.8",
    without: None,
};
const PROGRAM_LOAD: Feature = Feature {
    what: "loading the BPF programs",
    since: "5.10",
    without: None,
};

/// The feature a program of the object stands for.
pub fn of_program(name: &str) -> Feature {
    match name {
        "egress_sockops" => SOCKOPS,
        "egress_connect4" | "egress_connect6" => CONNECT,
        "egress_getpeername4" | "egress_getpeername6" => GETPEERNAME,
        _ => PROGRAM_LOAD,
    }
}

/// The daemon cannot run on this kernel: one line, the kernel named first.
#[derive(Debug, PartialEq, Eq)]
pub struct Unsupported {
    pub release: String,
    pub missing: String,
    pub since: &'static str,
    /// What the kernel answered, reduced to one clause (an errno, a missing helper).
    pub answer: String,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Linux {} cannot run {} (known on Linux {} or later) for this process: {}",
            self.release, self.missing, self.since, self.answer
        )
    }
}

impl std::error::Error for Unsupported {}

/// A program's load and attach, judged: `Ok` also when it failed but is optional.
pub fn check(program: &'static str, attached: Result<(), ProgramError>) -> Result<(), KernelError> {
    match attached {
        Ok(()) => Ok(()),
        Err(error) => judge_program(program, &error).map_err(KernelError::Unsupported),
    }
}

/// The object's load failure, as the kernel feature it shows missing where it does.
pub fn object_error(error: EbpfError) -> KernelError {
    match judge_object(&error) {
        Some(unsupported) => KernelError::Unsupported(unsupported),
        None => KernelError::Load(error),
    }
}

/// `uname -r`, for the messages.
pub fn running_release() -> String {
    // SAFETY: uname fills the zeroed struct it is given; the fields are
    // NUL-terminated by the kernel.
    unsafe {
        let mut name: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut name) != 0 {
            return "(unknown release)".into();
        }
        std::ffi::CStr::from_ptr(name.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
}

/// A program failed to load or attach: `Ok` when the daemon can run without it (the
/// degradation is logged), the one-line refusal otherwise.
fn judge_program(program: &'static str, error: &ProgramError) -> Result<(), Unsupported> {
    judge(&running_release(), of_program(program), program, error)
}

fn judge(
    release: &str,
    feature: Feature,
    program: &str,
    error: &ProgramError,
) -> Result<(), Unsupported> {
    let answer = match error {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            debug!(program, verifier_log = %log, "the verifier rejected {program}");
            match (missing_helper(&log), io_error.raw_os_error()) {
                (Some(helper), _) => format!("the verifier rejected {program}: no helper {helper}"),
                // Not a missing feature: older kernels hold some verifier checks to
                // more privilege than CAP_BPF (CAP_PERFMON, or CAP_SYS_ADMIN).
                (None, Some(libc::EACCES | libc::EPERM)) => format!(
                    "the verifier refused {program} to this process's privileges ({io_error}); \
                     on older kernels it may need CAP_PERFMON or CAP_SYS_ADMIN too \
                     (RUST_LOG=debug shows the verifier's log)"
                ),
                (None, _) => format!(
                    "the verifier rejected {program} ({io_error}; RUST_LOG=debug shows its log)"
                ),
            }
        }
        other => format!("attaching {program} failed: {}", first_cause(other)),
    };
    match feature.without {
        Some(effect) => {
            warn!(
                kernel = release,
                "running without {}: {answer}; {effect}", feature.what
            );
            Ok(())
        }
        None => Err(Unsupported {
            release: release.into(),
            missing: feature.what.into(),
            since: feature.since,
            answer,
        }),
    }
}

/// The object failed to load before any program did: a map type the kernel lacks
/// (the ring buffer) is the one failure here a kernel causes.
fn judge_object(error: &EbpfError) -> Option<Unsupported> {
    let EbpfError::MapError(MapError::CreateError { name, io_error, .. }) = error else {
        return None;
    };
    // The only map type newer than the programs' other needs.
    (name == interceptor_common::REDIRECTS_RING).then(|| Unsupported {
        release: running_release(),
        missing: RING_BUFFER.what.into(),
        since: RING_BUFFER.since,
        answer: format!("creating the map {name} failed: {io_error}"),
    })
}

/// The helper a verifier log says the kernel does not offer to this program type:
/// "unknown func bpf_get_netns_cookie#122" or "program of this type cannot use
/// helper bpf_sk_storage_get#107".
fn missing_helper(log: &str) -> Option<&str> {
    log.lines().find_map(|line| {
        let rest = line
            .split_once("unknown func ")
            .or_else(|| line.split_once("cannot use helper "))?
            .1;
        let helper = rest.split(|c: char| c == '#' || c.is_whitespace()).next()?;
        (!helper.is_empty()).then_some(helper)
    })
}

fn first_cause(error: &dyn std::error::Error) -> String {
    match error.source() {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use aya_obj::VerifierLog;

    use super::*;

    fn rejected(log: &str) -> ProgramError {
        ProgramError::LoadError {
            io_error: io::Error::from_raw_os_error(libc::EINVAL),
            verifier_log: VerifierLog::new(log.into()),
        }
    }

    #[test]
    fn a_missing_helper_is_named_and_the_log_is_left_out() {
        let log = "0: (bf) r6 = r1\n1: (85) call bpf_get_netns_cookie#122\nunknown func bpf_get_netns_cookie#122\nprocessed 2 insns";
        let refusal = judge(
            "5.4.0-1-amd64",
            of_program("egress_connect4"),
            "egress_connect4",
            &rejected(log),
        )
        .unwrap_err();
        let line = refusal.to_string();
        assert_eq!(
            line,
            "Linux 5.4.0-1-amd64 cannot run cgroup connect programs with socket storage and \
             the network namespace cookie (known on Linux 5.10 or later) for this process: \
             the verifier rejected egress_connect4: no helper bpf_get_netns_cookie"
        );
        assert!(!line.contains('\n'), "one line: {line}");
        assert!(!line.contains("processed"), "no verifier log: {line}");
    }

    #[test]
    fn a_rejection_without_a_named_helper_still_leaves_the_log_out() {
        let refusal = judge(
            "5.4.0",
            of_program("egress_sockops"),
            "egress_sockops",
            &rejected("R1 invalid mem access 'scalar'\nprocessed 9 insns"),
        )
        .unwrap_err();
        let line = refusal.to_string();
        assert!(
            line.starts_with("Linux 5.4.0 cannot run sock_ops programs"),
            "{line}"
        );
        assert!(line.contains("RUST_LOG=debug"), "{line}");
        assert!(!line.contains("invalid mem access"), "{line}");
    }

    #[test]
    fn a_privilege_refusal_is_not_reported_as_a_missing_feature() {
        let refused = ProgramError::LoadError {
            io_error: io::Error::from_raw_os_error(libc::EACCES),
            verifier_log: VerifierLog::new("R1 pointer arithmetic prohibited\n".into()),
        };
        let line = judge("6.1.0-50-cloud-amd64", SOCKOPS, "egress_sockops", &refused)
            .unwrap_err()
            .to_string();
        assert!(line.contains("to this process's privileges"), "{line}");
        assert!(line.contains("CAP_PERFMON"), "{line}");
        assert!(!line.contains("pointer arithmetic"), "{line}");
    }

    #[test]
    fn getpeername_is_optional_and_the_rest_is_required() {
        let attach_failed = ProgramError::AlreadyAttached;
        for program in ["egress_getpeername4", "egress_getpeername6"] {
            assert_eq!(
                judge("5.7.0", of_program(program), program, &attach_failed),
                Ok(())
            );
        }
        for program in ["egress_connect4", "egress_connect6", "egress_sockops"] {
            let refusal = judge("5.7.0", of_program(program), program, &attach_failed);
            assert!(refusal.is_err(), "{program} must be required");
        }
    }

    #[test]
    fn helpers_are_found_in_both_phrasings() {
        assert_eq!(
            missing_helper("x\nprogram of this type cannot use helper bpf_sk_storage_get#107\n"),
            Some("bpf_sk_storage_get")
        );
        assert_eq!(
            missing_helper("unknown func bpf_ringbuf_output#130"),
            Some("bpf_ringbuf_output")
        );
        assert_eq!(missing_helper("R2 type=scalar expected=map_ptr"), None);
    }
}
