//! Opt-in busy polling for the proxy's worker threads, like HAProxy's `busy-polling`.
//!
//! A worker with nothing to run would block in epoll_wait, and the next packet then
//! has to wake its thread, and often its CPU out of an idle halt (in a VM, a trip
//! through the hypervisor). With a budget, a worker about to block first spins for
//! up to that long, watching its runtime's epoll descriptor with a zero-timeout
//! poll(2) that consumes nothing; once an event is queued it lets the runtime go on,
//! and epoll_wait returns at once. A worker that stays idle past the budget blocks as
//! before, so an idle daemon costs no CPU; a busy one trades CPU for latency.

use std::{
    collections::BTreeSet,
    fs, io,
    os::fd::RawFd,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use tokio::runtime::{Builder, Runtime};
use tracing::warn;

/// Only one runtime may be built at a time, so that the new epoll descriptors are
/// known to be the runtime's.
static BUILDING: Mutex<()> = Mutex::new(());

#[derive(Debug, thiserror::Error)]
pub enum BusyPollError {
    #[error("building the worker runtime: {0}")]
    Build(#[source] io::Error),
    #[error("listing /proc/self/fd: {0}")]
    ListDescriptors(#[source] io::Error),
    #[error("the runtime opened no epoll descriptor")]
    EpollNotFound,
}

/// A current-thread runtime for a worker; with a nonzero `budget`, it spins up to
/// that long before each time it would block.
pub fn worker_runtime(budget: Duration) -> Result<Runtime, BusyPollError> {
    let mut builder = Builder::new_current_thread();
    builder.enable_all();
    if budget.is_zero() {
        return builder.build().map_err(BusyPollError::Build);
    }
    let _building = BUILDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let before = epoll_descriptors()?;
    // tokio opens its epoll descriptor when the runtime is built, after the hook is
    // set; the hook reads the descriptors found afterwards. tokio duplicates the
    // descriptor for its registry, so there are usually two, of one epoll instance.
    let epoll = Arc::new(OnceLock::<Vec<libc::pollfd>>::new());
    let hook_epoll = Arc::clone(&epoll);
    builder.on_thread_park(move || {
        if let Some(descriptors) = hook_epoll.get() {
            spin_until_ready(descriptors, budget);
        }
    });
    let runtime = builder.build().map_err(BusyPollError::Build)?;
    // The runtime is kept either way: dropping it here, inside the daemon's own
    // runtime, would panic. Without its descriptor the hook never spins.
    let opened = epoll_descriptors().and_then(|after| {
        let opened: Vec<libc::pollfd> = after
            .difference(&before)
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if opened.is_empty() {
            Err(BusyPollError::EpollNotFound)
        } else {
            Ok(opened)
        }
    });
    match opened {
        Ok(opened) => {
            let _ = epoll.set(opened);
        }
        Err(error) => warn!(%error, "busy polling is off for this worker"),
    }
    Ok(runtime)
}

/// Spins until one of the runtime's epoll descriptors has an event queued, or
/// `budget` has passed. An unrelated descriptor among them could only end a spin early.
fn spin_until_ready(descriptors: &[libc::pollfd], budget: Duration) {
    let deadline = Instant::now() + budget;
    let mut polled = descriptors.to_vec();
    loop {
        // SAFETY: valid pollfds the runtime keeps open; a zero timeout never blocks.
        let ready = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, 0) };
        if ready != 0 || Instant::now() >= deadline {
            return;
        }
        std::hint::spin_loop();
    }
}

fn epoll_descriptors() -> Result<BTreeSet<RawFd>, BusyPollError> {
    let entries = fs::read_dir("/proc/self/fd").map_err(BusyPollError::ListDescriptors)?;
    Ok(entries
        .filter_map(Result::ok)
        .filter(|entry| {
            fs::read_link(entry.path())
                .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventpoll]")
        })
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect())
}
