//! Adaptive busy polling for the proxy's worker threads.
//!
//! A worker with nothing to run would block in epoll_wait, and the next packet then
//! has to wake its thread, and often its CPU out of an idle halt (in a VM, a trip
//! through the hypervisor). That wake-up is most of what a proxy hop adds to a
//! request/response round trip. So a worker about to block may first spin, watching
//! its runtime's epoll descriptor with a zero-timeout poll(2) that consumes nothing;
//! once an event is queued it lets the runtime go on, and epoll_wait returns at once.
//!
//! How long it spins adapts to the gaps between its events, the way the kernel's
//! guest halt-polling adapts its window: a gap longer than the window but within the
//! budget widens it, a gap longer than the budget halves it, down to not spinning at
//! all. So a worker spins through its gaps only while its events come closer
//! together than the budget, which is when it is busy enough for the spin to pay.
//! After a burst it spins once for its window and then blocks as before; between
//! requests spaced wider than the budget it spins a quarter of the budget after each
//! (a request's own events reopen the window that far). The spin yields the CPU on
//! every turn, so on a machine short of CPUs the client and the backend run first;
//! then the spin can end later than its window.
//!
//! The workers spin as a group ([`SpinGroup`]): while any worker's window is open to
//! the whole budget, every worker spins as long as it does. One spinning worker keeps
//! only its own CPU awake, and the client and the backend it wakes are then often
//! woken on another, halted CPU (the scheduler prefers idle CPUs for the threads it
//! wakes), paying the very exit from the halt the spin saves the worker. HAProxy's
//! busy polling spins every thread for the same reason.

use std::{
    collections::BTreeSet,
    fs, io,
    os::fd::{BorrowedFd, RawFd},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tokio::runtime::{Builder, Handle, Runtime};
use tracing::warn;

/// Where a worker adds the time it spent spinning.
pub type SpinCounter =
    prometheus_client::metrics::counter::Counter<f64, std::sync::atomic::AtomicU64>;

/// Serialises the runtimes this function builds, so that the epoll descriptors that
/// appear during a build are that runtime's. Another thread could open one at the
/// same moment; polling it too could only end a spin early.
static BUILDING: Mutex<()> = Mutex::new(());

/// More descriptors than a runtime opens (tokio duplicates its one epoll descriptor
/// for its registry); the spin polls at most this many without allocating.
const MAX_POLLED: usize = 4;

/// The workers that spin together: while any of them is busy, every one spins.
pub struct SpinGroup {
    epoch: Instant,
    /// Nanoseconds after `epoch` until which every member spins.
    busy_until: AtomicU64,
    /// The members' runtimes, woken when the group turns busy so that those blocked
    /// in epoll_wait join the spin.
    members: OnceLock<Vec<Handle>>,
}

impl SpinGroup {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            busy_until: AtomicU64::new(0),
            members: OnceLock::new(),
        })
    }

    /// Names the members' runtimes, once they are all built.
    pub fn join(&self, members: Vec<Handle>) {
        let _ = self.members.set(members);
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    fn busy_until(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.busy_until.load(Ordering::Relaxed))
    }

    /// `member` is busy: every member spins until at least `until`. If the group was
    /// not busy at `now`, the others may be blocked in epoll_wait, and are woken to
    /// join.
    fn keep_busy(&self, member: usize, now: Instant, until: Instant) {
        let was = self
            .busy_until
            .fetch_max(self.nanos(until), Ordering::Relaxed);
        if was > self.nanos(now) {
            return;
        }
        for (index, handle) in self.members.get().into_iter().flatten().enumerate() {
            if index != member {
                // An empty task: the runtime wakes, runs it, and parks again, now
                // spinning since the group is busy.
                drop(handle.spawn(async {}));
            }
        }
    }
}

/// A current-thread runtime for worker `member` of `group`; with a nonzero `budget`,
/// it may spin up to that long before each time it would block ([`SpinWindow`]
/// decides how long), or longer while another member of the group is busy, and adds
/// the time spun to `spun`. If its epoll descriptor cannot be found, the runtime
/// works as usual and never spins.
pub fn worker_runtime(
    budget: Duration,
    spun: SpinCounter,
    group: Arc<SpinGroup>,
    member: usize,
) -> io::Result<Runtime> {
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
    let polled = Arc::new(OnceLock::<([PollFd<'static>; MAX_POLLED], usize)>::new());
    // Only the worker's own thread parks this runtime, so the lock is never contended.
    let window = Arc::new(Mutex::new(SpinWindow::new(budget)));
    let park_window = Arc::clone(&window);
    let hook_polled = Arc::clone(&polled);
    builder.on_thread_park(move || {
        let Some((descriptors, count)) = hook_polled.get() else {
            return;
        };
        let parking = Instant::now();
        let spin = lock(&park_window).parking(parking);
        // A window opened to the whole budget: this worker's events come nearly a
        // budget apart, so it waits on threads it woke (the client, the backend),
        // whose CPUs the other workers keep awake by spinning as long as it does.
        // Events closer together keep the CPUs busy on their own.
        if spin >= budget {
            group.keep_busy(member, parking, parking + spin);
        }
        let own = parking + spin;
        let until = || own.max(group.busy_until());
        if until() > parking {
            spin_until_ready(descriptors.clone(), *count, until);
            spun.inc_by(parking.elapsed().as_secs_f64());
        }
    });
    builder.on_thread_unpark(move || lock(&window).woke(Instant::now()));
    let runtime = builder.build()?;
    match epoll_descriptors() {
        Ok(after) => {
            let opened: Vec<RawFd> = after.difference(&before).copied().collect();
            if opened.is_empty() || opened.len() > MAX_POLLED {
                warn!(
                    opened = opened.len(),
                    "the runtime's epoll descriptor is not recognisable: busy polling is off for this worker"
                );
            } else {
                // SAFETY: the runtime keeps its epoll descriptors open for as long as
                // it lives, and only its own park hook polls them.
                let watch =
                    |fd| PollFd::new(unsafe { BorrowedFd::borrow_raw(fd) }, PollFlags::POLLIN);
                // Slots past the count repeat the first descriptor and are never polled.
                let descriptors = std::array::from_fn(|index| {
                    watch(opened.get(index).copied().unwrap_or(opened[0]))
                });
                let _ = polled.set((descriptors, opened.len()));
            }
        }
        Err(error) => {
            warn!(%error, "cannot list /proc/self/fd: busy polling is off for this worker")
        }
    }
    Ok(runtime)
}

fn lock(window: &Mutex<SpinWindow>) -> std::sync::MutexGuard<'_, SpinWindow> {
    window
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How long a worker spins before it blocks, learned from how long it stayed parked
/// the times before.
#[derive(Debug)]
struct SpinWindow {
    budget: Duration,
    window: Duration,
    parked_at: Option<Instant>,
}

impl SpinWindow {
    fn new(budget: Duration) -> Self {
        Self {
            budget,
            window: Duration::ZERO,
            parked_at: None,
        }
    }

    /// The smallest window that spins at all: below it a spin rarely catches an
    /// event, and halving towards zero would take many idle gaps.
    fn smallest(&self) -> Duration {
        self.budget / 4
    }

    /// The worker is about to block: how long to spin first.
    fn parking(&mut self, now: Instant) -> Duration {
        self.parked_at = Some(now);
        self.window
    }

    /// The worker runs again; `now - parked_at` is the gap it waited for.
    fn woke(&mut self, now: Instant) {
        let Some(parked_at) = self.parked_at.take() else {
            return;
        };
        let gap = now.saturating_duration_since(parked_at);
        if gap <= self.window {
            // The spin caught the event: keep the window.
        } else if gap <= self.budget {
            // A wider spin would have caught it.
            self.window = (self.window * 2).clamp(self.smallest(), self.budget);
        } else {
            // Nothing a spin within the budget could have caught: spin less.
            self.window /= 2;
            if self.window < self.smallest() {
                self.window = Duration::ZERO;
            }
        }
    }
}

/// Spins until one of the runtime's epoll descriptors has an event queued, or until
/// `deadline()`, which other workers may push back while it spins. Timers the
/// runtime holds fire late by up to the spin, and by a scheduler turn more when a
/// yield lets other threads run past the deadline.
fn spin_until_ready(
    mut descriptors: [PollFd<'static>; MAX_POLLED],
    count: usize,
    deadline: impl Fn() -> Instant,
) {
    loop {
        // A zero timeout never blocks.
        let ready = poll(&mut descriptors[..count], PollTimeout::ZERO);
        if ready != Ok(0) || Instant::now() >= deadline() {
            return;
        }
        // Any other thread runnable on this CPU (on a small machine, often the
        // client or the backend this worker is waiting for) runs first: this is
        // sched_yield(2).
        std::thread::yield_now();
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

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Duration = Duration::from_micros(40);

    /// Parks and wakes the window once, `gap` apart; returns the spin it offered.
    fn park_for(window: &mut SpinWindow, gap: Duration) -> Duration {
        let parked = Instant::now();
        let spin = window.parking(parked);
        window.woke(parked + gap);
        spin
    }

    #[test]
    fn a_new_worker_does_not_spin() {
        let mut window = SpinWindow::new(BUDGET);
        assert_eq!(
            park_for(&mut window, Duration::from_secs(1)),
            Duration::ZERO
        );
        assert_eq!(window.window, Duration::ZERO);
    }

    #[test]
    fn gaps_within_the_budget_widen_the_window_up_to_it() {
        let mut window = SpinWindow::new(BUDGET);
        let gap = Duration::from_micros(35);
        let spins: Vec<u64> = (0..5)
            .map(|_| park_for(&mut window, gap).as_micros() as u64)
            .collect();
        assert_eq!(spins, [0, 10, 20, 40, 40]);
    }

    #[test]
    fn gaps_the_window_covers_keep_it() {
        let mut window = SpinWindow::new(BUDGET);
        park_for(&mut window, Duration::from_micros(30));
        park_for(&mut window, Duration::from_micros(30));
        assert_eq!(window.window, Duration::from_micros(20));
        for _ in 0..10 {
            park_for(&mut window, Duration::from_micros(15));
        }
        assert_eq!(window.window, Duration::from_micros(20));
    }

    #[test]
    fn gaps_past_the_budget_halve_the_window_down_to_nothing() {
        let mut window = SpinWindow::new(BUDGET);
        for _ in 0..4 {
            park_for(&mut window, Duration::from_micros(39));
        }
        assert_eq!(window.window, BUDGET);
        let idle = Duration::from_millis(5);
        let spins: Vec<u64> = (0..4)
            .map(|_| park_for(&mut window, idle).as_micros() as u64)
            .collect();
        assert_eq!(spins, [40, 20, 10, 0]);
        assert_eq!(window.window, Duration::ZERO);
    }

    /// Two current-thread runtimes, never driven, so a task spawned on one stays
    /// alive and shows that the group woke it.
    fn group_of_two() -> (Arc<SpinGroup>, [Runtime; 2]) {
        let runtime = || Builder::new_current_thread().build().expect("a runtime");
        let runtimes = [runtime(), runtime()];
        let group = SpinGroup::new();
        group.join(runtimes.iter().map(|r| r.handle().clone()).collect());
        (group, runtimes)
    }

    fn woken(runtime: &Runtime) -> usize {
        runtime.metrics().num_alive_tasks()
    }

    #[test]
    fn a_member_turning_the_group_busy_wakes_the_others_once() {
        let (group, runtimes) = group_of_two();
        let now = Instant::now();
        group.keep_busy(0, now, now + BUDGET);
        assert_eq!(group.busy_until(), now + BUDGET);
        assert_eq!((woken(&runtimes[0]), woken(&runtimes[1])), (0, 1));
        // Still busy: the others are spinning already.
        group.keep_busy(0, now + BUDGET / 2, now + BUDGET * 3 / 2);
        group.keep_busy(1, now + BUDGET, now + BUDGET * 2);
        assert_eq!((woken(&runtimes[0]), woken(&runtimes[1])), (0, 1));
        assert_eq!(group.busy_until(), now + BUDGET * 2);
        // Idle since, then busy again.
        group.keep_busy(1, now + BUDGET * 5, now + BUDGET * 6);
        assert_eq!((woken(&runtimes[0]), woken(&runtimes[1])), (1, 1));
    }

    #[test]
    fn the_group_stays_busy_until_its_latest_deadline() {
        let (group, _runtimes) = group_of_two();
        let now = Instant::now();
        group.keep_busy(0, now, now + BUDGET * 2);
        group.keep_busy(1, now, now + BUDGET);
        assert_eq!(group.busy_until(), now + BUDGET * 2);
    }

    #[test]
    fn a_wake_without_a_park_changes_nothing() {
        let mut window = SpinWindow::new(BUDGET);
        window.woke(Instant::now());
        assert_eq!(window.window, Duration::ZERO);
    }
}
