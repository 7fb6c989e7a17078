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

/// Serialises the runtimes this function builds, so that the epoll descriptors that
/// appear during a build are that runtime's. Another thread could open one at the
/// same moment; polling it too could only end a spin early.
static BUILDING: Mutex<()> = Mutex::new(());

/// More descriptors than a runtime opens (tokio duplicates its one epoll descriptor
/// for its registry); the spin polls at most this many without allocating.
const MAX_POLLED: usize = 4;

/// A current-thread runtime for a worker; with a nonzero `budget`, it spins up to
/// that long before each time it would block. If its epoll descriptor cannot be
/// found, the runtime works as usual and never spins.
pub fn worker_runtime(budget: Duration) -> io::Result<Runtime> {
    let mut builder = Builder::new_current_thread();
    builder.enable_all();
    if budget.is_zero() {
        return builder.build();
    }
    let _building = BUILDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let before = match epoll_descriptors() {
        Ok(before) => before,
        Err(error) => {
            warn!(%error, "cannot list /proc/self/fd: busy polling is off for this worker");
            return builder.build();
        }
    };
    // tokio opens its epoll descriptor when the runtime is built, after the hook is
    // set; the hook reads the descriptors found afterwards.
    let polled = Arc::new(OnceLock::<([libc::pollfd; MAX_POLLED], usize)>::new());
    let hook_polled = Arc::clone(&polled);
    builder.on_thread_park(move || {
        if let Some((descriptors, count)) = hook_polled.get() {
            spin_until_ready(*descriptors, *count, budget);
        }
    });
    let runtime = builder.build()?;
    match epoll_descriptors() {
        Ok(after) => {
            let mut descriptors = [libc::pollfd {
                fd: -1,
                events: libc::POLLIN,
                revents: 0,
            }; MAX_POLLED];
            let opened: Vec<RawFd> = after.difference(&before).copied().collect();
            if opened.is_empty() || opened.len() > MAX_POLLED {
                warn!(
                    opened = opened.len(),
                    "the runtime's epoll descriptor is not recognisable: busy polling is off for this worker"
                );
            } else {
                for (slot, fd) in descriptors.iter_mut().zip(&opened) {
                    slot.fd = *fd;
                }
                let _ = polled.set((descriptors, opened.len()));
            }
        }
        Err(error) => {
            warn!(%error, "cannot list /proc/self/fd: busy polling is off for this worker")
        }
    }
    Ok(runtime)
}

/// Spins until one of the runtime's epoll descriptors has an event queued, or
/// `budget` has passed. Timers the runtime holds fire late by up to the budget.
fn spin_until_ready(mut descriptors: [libc::pollfd; MAX_POLLED], count: usize, budget: Duration) {
    let deadline = Instant::now() + budget;
    loop {
        // SAFETY: `count` valid pollfds the runtime keeps open; a zero timeout never
        // blocks.
        let ready = unsafe { libc::poll(descriptors.as_mut_ptr(), count as libc::nfds_t, 0) };
        if ready != 0 || Instant::now() >= deadline {
            return;
        }
        std::hint::spin_loop();
    }
}

fn epoll_descriptors() -> io::Result<BTreeSet<RawFd>> {
    Ok(fs::read_dir("/proc/self/fd")?
        .filter_map(Result::ok)
        .filter(|entry| {
            fs::read_link(entry.path())
                .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventpoll]")
        })
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect())
}
