//! The daemon's policy on descriptors: raise the open-files limit at start, then
//! share what it allows between connections and splice pipes.

use interceptor_common::host::{open_descriptors, open_files_limit, set_open_files_limit};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::copy::CopyMode;

/// Below this many descriptors the daemon warns: about half as many connections.
const FEW_OPEN_FILES: u64 = 16_384;

/// Descriptors kept free for what the daemon opens besides connections and pipes:
/// admin requests, DNS queries, config reloads.
const DESCRIPTOR_MARGIN: usize = 64;

/// Whether `error` says the daemon ran short of descriptors or memory: a failure that
/// passes, unlike a missing file or a denied one, so what met it is worth trying again.
pub fn is_shortage(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
    )
}

/// Each proxied connection holds two descriptors, and the soft limit is 1024 in many
/// containers and services, which would refuse connections past about 350. The hard
/// limit is the administrator's cap; raising the soft one up to it needs no privilege.
pub fn raise_open_files_limit() {
    let (soft, hard) = match open_files_limit() {
        Ok(limit) => limit,
        Err(error) => {
            warn!(%error, "cannot read the open files limit");
            return;
        }
    };
    let mut current = soft;
    if soft < hard {
        match set_open_files_limit(hard, hard) {
            Ok(()) => {
                info!(
                    from = soft,
                    to = hard,
                    "raised the open files limit to its hard limit"
                );
                current = hard;
            }
            Err(error) => {
                warn!(%error, soft, hard, "cannot raise the open files limit");
            }
        }
    }
    if current < FEW_OPEN_FILES {
        warn!(
            open_files = current,
            "the open files limit caps the proxy at about half as many connections; raise the hard limit (LimitNOFILE=, ulimit -Hn)"
        );
    }
}

/// How many connections the proxy serves at once, and how many splice pipes they
/// may hold open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub splice_pipes: usize,
}

/// The limits for a daemon that holds its `listeners` now; `max_connections` is the
/// operator's, if given.
pub fn connection_limits(
    listeners: usize,
    copy_mode: CopyMode,
    max_connections: Option<usize>,
) -> ConnectionLimits {
    share(
        descriptors_for_connections(listeners),
        copy_mode,
        max_connections,
    )
}

/// The descriptors connections and their splice pipes may use: the open-files limit
/// less the ones the daemon already holds (maps, programs, listeners, runtimes), a
/// margin, and one per listener (each may hold one accepted client while it waits
/// for a permit another listener took).
fn descriptors_for_connections(listeners: usize) -> usize {
    let Ok((soft, _)) = open_files_limit() else {
        return Semaphore::MAX_PERMITS;
    };
    usize::try_from(soft)
        .unwrap_or(usize::MAX)
        .saturating_sub(open_descriptors() + DESCRIPTOR_MARGIN + listeners)
}

/// By default three quarters of `descriptors` go to connections, two each (client
/// and upstream), and the rest to splice pipes, two each, so bulk transfers cannot
/// use up the descriptors new connections need; all go to connections when nothing
/// is spliced.
fn share(
    descriptors: usize,
    copy_mode: CopyMode,
    max_connections: Option<usize>,
) -> ConnectionLimits {
    let for_connections = match copy_mode {
        CopyMode::Splice => descriptors / 4 * 3,
        CopyMode::Userspace => descriptors,
    };
    let max_connections = max_connections
        .unwrap_or(for_connections / 2)
        .clamp(1, Semaphore::MAX_PERMITS);
    ConnectionLimits {
        max_connections,
        splice_pipes: descriptors.saturating_sub(2 * max_connections) / 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_get_three_quarters_when_splicing_and_all_otherwise() {
        assert_eq!(
            share(4000, CopyMode::Splice, None),
            ConnectionLimits {
                max_connections: 1500,
                splice_pipes: 500
            }
        );
        assert_eq!(
            share(4000, CopyMode::Userspace, None),
            ConnectionLimits {
                max_connections: 2000,
                splice_pipes: 0
            }
        );
    }

    #[test]
    fn an_operators_maximum_wins_and_leaves_the_rest_to_pipes() {
        assert_eq!(
            share(4000, CopyMode::Splice, Some(1900)),
            ConnectionLimits {
                max_connections: 1900,
                splice_pipes: 100
            }
        );
        assert_eq!(share(0, CopyMode::Splice, None).max_connections, 1);
    }
}
