//! Forwarding bytes both ways with half-close, holding buffers only while data waits.
//!
//! Reads land in one buffer per runtime thread and are written on at once; only the
//! bytes a destination does not take right away are copied into a buffer the
//! connection owns until they are written. An idle connection holds none: its cost is
//! the task and the two sockets. A direction whose reads fill the read size grows it
//! (16 KiB to 256 KiB, as ztunnel does), so bulk transfers need few system calls.
//!
//! In [`CopyMode::Splice`], a direction that fills a buffer switches to splice(2)
//! through a pipe, so its bytes never enter user space. Request/response traffic
//! never fills a buffer and never pays for the pipe.
//!
//! A close passes through as what it was: a FIN as a FIN (half-close included), and
//! a reset as a reset, so a truncated answer never looks complete to the client, nor
//! an aborted upload to the upstream.

use std::{
    fmt, io,
    os::fd::{AsFd, AsRawFd as _, OwnedFd},
    pin::pin,
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use nix::{
    errno::Errno,
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl},
    sys::socket::{Shutdown, shutdown},
    unistd::pipe2,
};

use tokio::{
    io::Interest,
    net::{TcpStream, UnixStream},
    time::Instant,
};

use crate::socket::reset_on_close;

/// How bytes are moved; both are correct, and `cargo xtask bench --scenario bulk`
/// compares them. The variants' docs are `--copy-mode`'s help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CopyMode {
    /// read(2)/write(2) through adaptive user-space buffers.
    Userspace,
    /// Like userspace, but bulk directions switch to splice(2), which costs the proxy
    /// less CPU per byte.
    #[default]
    Splice,
}

const INITIAL_BUFFER: usize = 16 * 1024;
const MAX_BUFFER: usize = 256 * 1024;

/// A socket tokio can wait on and use through a shared reference, so both directions
/// of one connection can run at once.
///
/// Readiness is polled, not awaited through `readable()`/`writable()`: those futures
/// each hold a waiter node (150 bytes) inside the connection's task for as long as it
/// waits, which an idle connection does all its life. The poll functions keep one
/// waker per direction in the socket's own registration instead, and each socket has
/// one reader and one writer here (the two directions), which is what they allow.
pub trait Socket: AsFd {
    fn poll_read_ready(&self, context: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&self, context: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize>;
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    /// Bytes written to the socket that its peer has not acknowledged yet, which a
    /// reset would throw away. A unix socket's bytes are in its peer's queue as soon
    /// as they are written, and its close never discards them.
    fn unacknowledged(&self) -> io::Result<usize> {
        Ok(0)
    }
}

macro_rules! socket {
    ($type:ty $(, $($extra:tt)*)?) => {
        impl Socket for $type {
            fn poll_read_ready(&self, context: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$type>::poll_read_ready(self, context)
            }
            fn poll_write_ready(&self, context: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$type>::poll_write_ready(self, context)
            }
            fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
                <$type>::try_write(self, bytes)
            }
            fn try_io<R>(
                &self,
                interest: Interest,
                f: impl FnOnce() -> io::Result<R>,
            ) -> io::Result<R> {
                <$type>::try_io(self, interest, f)
            }
            $($($extra)*)?
        }
    };
}
socket!(
    TcpStream,
    fn unacknowledged(&self) -> io::Result<usize> {
        let mut queued: libc::c_int = 0;
        // SIOCOUTQ (TIOCOUTQ's number): for TCP, bytes sent or queued and not yet
        // acknowledged.
        // SAFETY: the ioctl writes one int into `queued`, which we own.
        if unsafe { libc::ioctl(self.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(queued).unwrap_or(0))
    }
);
socket!(UnixStream);

/// How many splice pipes may be open at once. Each holds two descriptors, which
/// would otherwise be missing when a new connection needs its sockets; a direction
/// that finds none left stays in user space.
#[derive(Debug, Default)]
pub struct PipeBudget {
    left: AtomicUsize,
    /// Pipes opened so far, for tests and the curious.
    opened: AtomicU64,
}

impl PipeBudget {
    pub fn new(pipes: usize) -> Self {
        Self {
            left: AtomicUsize::new(pipes),
            opened: AtomicU64::new(0),
        }
    }

    /// Adds `pipes` to what may be open (once the daemon knows its limits).
    pub fn grant(&self, pipes: usize) {
        self.left.fetch_add(pipes, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub fn left(&self) -> usize {
        self.left.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    fn take(&self) -> bool {
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        self.left.fetch_add(1, Ordering::Relaxed);
    }
}

/// One of the two sockets of a relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    pub const ALL: [Self; 2] = [Self::Client, Self::Upstream];

    pub fn label(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Upstream => "upstream",
        }
    }
}

/// How a side ended its part of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// A FIN: the side finished sending, and its peer gets a clean end of stream.
    Fin,
    /// A reset, or a write into a connection the side had already closed.
    Reset,
    /// Any other failure of the proxy's I/O on that side (timed out, unreachable).
    /// The other side is reset all the same: a failure must not look like an end.
    Error,
}

impl How {
    pub const ALL: [Self; 3] = [Self::Fin, Self::Reset, Self::Error];

    pub fn label(self) -> &'static str {
        match self {
            Self::Fin => "fin",
            Self::Reset => "reset",
            Self::Error => "error",
        }
    }

    /// How a failed read or write on a side ended it. EPIPE is what a write into a
    /// reset TCP connection returns once the reset was reported, and what a unix
    /// socket, which has no reset, returns for a peer that went away.
    pub fn of(error: &io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Self::Reset,
            _ => Self::Error,
        }
    }
}

/// What ended a connection: the side that reset or failed, if one did, wherever in
/// the connection's life; otherwise the side whose FIN came first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub side: Side,
    pub how: How,
}

/// `client_fin`, `upstream_reset`, ...: the closing log line's `close` field.
impl fmt::Display for Close {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}_{}", self.side.label(), self.how.label())
    }
}

/// How a relayed connection went.
#[derive(Debug)]
pub struct Copied {
    /// Bytes client → upstream, the preface included.
    pub sent: u64,
    /// Bytes upstream → client.
    pub received: u64,
    pub close: Close,
    /// What failed, when the close is not a FIN.
    pub error: Option<io::Error>,
}

/// How long the survivor of a reset has to take the bytes the proxy already holds
/// for it before it is reset too: the failed side had sent them before its reset,
/// and a peer connected directly would have had them. A peer that does not read
/// them in this time loses them, as it may when a connection fails anyway.
const FLUSH_BEFORE_RESET: Duration = Duration::from_secs(1);

/// Writes `preface` (bytes already read from the client) to the upstream, then
/// copies `client` ↔ `upstream` until both directions reached EOF, or a side reset
/// or failed.
///
/// A side that resets or fails gets its reset passed on: the direction reading from
/// it forwards what it sent before the reset, the other side is given up to
/// [`FLUSH_BEFORE_RESET`] to take what the proxy holds for it, and both sockets are
/// set to reset when closed. The caller must close both sockets when this returns:
/// after a clean end, the direction that ended last leaves its FIN to that close,
/// which sends it anyway, saving a shutdown(2) per connection.
///
/// An async block, not an async fn, so that its arguments are kept once in its state
/// (an async fn keeps them twice), which is part of every connection's task.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice"
)]
pub fn bidirectional<'a>(
    client: &'a impl Socket,
    upstream: &'a impl Socket,
    preface: Vec<u8>,
    mode: CopyMode,
    pipes: &'a PipeBudget,
) -> impl Future<Output = Copied> + 'a {
    async move {
        let ends = Ends::default();
        let (mut sent, mut received) = (0, 0);
        let mut first_fin = None;
        let failure = {
            let mut upload = pin!(async {
                sent = preface.len() as u64;
                write_all(upstream, &preface).await.map_err(Broken::to)?;
                // A long-lived connection should not keep the ClientHello or request head.
                drop(preface);
                one_way(client, upstream, mode, pipes, &ends, &mut sent).await
            });
            let mut download = pin!(one_way(upstream, client, mode, pipes, &ends, &mut received));
            let (mut upload_done, mut download_done) = (false, false);
            let failure = loop {
                let (from, result) = tokio::select! {
                    result = &mut upload, if !upload_done => {
                        upload_done = true;
                        (Side::Client, result)
                    }
                    result = &mut download, if !download_done => {
                        download_done = true;
                        (Side::Upstream, result)
                    }
                };
                match result {
                    Ok(()) => {
                        first_fin.get_or_insert(from);
                        if upload_done && download_done {
                            break None;
                        }
                    }
                    Err(broken) => break Some((broken.side(from), broken.error)),
                }
            };
            if let Some((failed, _)) = &failure {
                // Whatever the failed side sent before its reset is still to be read:
                // the direction from it forwards that, and then stops at the reset (or
                // at an EOF, once the other direction has taken the reset's error).
                ends.failed.store(true, Ordering::Relaxed);
                // Boxed: the timers' space would otherwise be part of every connection's
                // task for its whole life, and a failure is rare.
                let deadline = Instant::now() + FLUSH_BEFORE_RESET;
                match failed {
                    Side::Client => {
                        if !upload_done {
                            let _ = Box::pin(tokio::time::timeout_at(deadline, &mut upload)).await;
                        }
                        Box::pin(flush(upstream, deadline)).await;
                    }
                    Side::Upstream => {
                        if !download_done {
                            let _ =
                                Box::pin(tokio::time::timeout_at(deadline, &mut download)).await;
                        }
                        Box::pin(flush(client, deadline)).await;
                    }
                }
            }
            failure
        };
        match failure {
            None => Copied {
                sent,
                received,
                // Both directions ended, so one was first.
                close: Close {
                    side: first_fin.unwrap_or(Side::Client),
                    how: How::Fin,
                },
                error: None,
            },
            Some((side, error)) => {
                // The failed side's socket is dead after a reset, but not after a failure
                // of the proxy's own, which must not look like a clean end either.
                let _ = reset_on_close(client);
                let _ = reset_on_close(upstream);
                Copied {
                    sent,
                    received,
                    close: Close {
                        side,
                        how: How::of(&error),
                    },
                    error: Some(error),
                }
            }
        }
    }
}

/// What the two directions of a connection tell each other.
#[derive(Default)]
struct Ends {
    /// One direction has passed its EOF on.
    one_finished: AtomicBool,
    /// A side reset or failed: an EOF from now on is not passed on, since it is the
    /// failed side's socket ending, not a FIN.
    failed: AtomicBool,
}

/// A direction that stopped because a read or write on one of its sockets failed.
struct Broken {
    at: End,
    error: io::Error,
}

enum End {
    From,
    To,
}

impl Broken {
    fn from(error: io::Error) -> Self {
        Self {
            at: End::From,
            error,
        }
    }

    fn to(error: io::Error) -> Self {
        Self { at: End::To, error }
    }

    /// The side that failed, in a direction reading from `from`.
    fn side(&self, from: Side) -> Side {
        match (&self.at, from) {
            (End::From, side) => side,
            (End::To, Side::Client) => Side::Upstream,
            (End::To, Side::Upstream) => Side::Client,
        }
    }
}

/// Waits until `survivor` has acknowledged what the proxy wrote to it, or until
/// `deadline`, so that its reset does not throw those bytes away.
async fn flush(survivor: &impl Socket, deadline: Instant) {
    let mut pause = Duration::from_millis(1);
    while survivor.unacknowledged().is_ok_and(|bytes| bytes > 0) && Instant::now() < deadline {
        tokio::time::sleep_until((Instant::now() + pause).min(deadline)).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Passes an EOF from one socket on to the other.
fn pass_eof(to: &impl Socket, ends: &Ends) -> Result<(), Broken> {
    if ends.failed.load(Ordering::Relaxed) || ends.one_finished.swap(true, Ordering::Relaxed) {
        // Either both directions are done and the caller closes both sockets next
        // (nothing is left unread on `to`, so its close sends the FIN), or the other
        // side failed and `to` is to be reset, not sent a FIN.
        Ok(())
    } else {
        shutdown_write(to).map_err(Broken::to)
    }
}

/// Copies `from` → `to` until EOF, adding what it forwards to `total`.
/// An async block for the reason [`bidirectional`] is one.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice"
)]
fn one_way<'a>(
    from: &'a impl Socket,
    to: &'a impl Socket,
    mode: CopyMode,
    pipes: &'a PipeBudget,
    ends: &'a Ends,
    total: &'a mut u64,
) -> impl Future<Output = Result<(), Broken>> + 'a {
    async move {
        let mut size = INITIAL_BUFFER;
        let mut pipe: Option<Pipe> = None;
        loop {
            readable(from).await.map_err(Broken::from)?;
            if let Some(pipe) = &pipe {
                if splice_while_ready(from, to, pipe, total).await? {
                    return pass_eof(to, ends);
                }
                continue;
            }
            loop {
                let (read, unsent) = read_and_forward(from, to, size);
                let bytes = match read? {
                    Read::Eof => return pass_eof(to, ends),
                    Read::WouldBlock => break,
                    Read::Data { bytes, drained } => {
                        if let Some(unsent) = unsent {
                            write_all(to, &unsent).await.map_err(Broken::to)?;
                        }
                        *total += bytes as u64;
                        if drained {
                            break;
                        }
                        bytes
                    }
                };
                if bytes == size {
                    if mode == CopyMode::Splice {
                        // Bulk: from here on this direction moves bytes in the kernel.
                        // Without a pipe (none left in the budget, or the descriptor
                        // limit), it stays in user space.
                        pipe = Pipe::new(pipes).ok();
                        if pipe.is_some() {
                            break;
                        }
                    }
                    size = (size * 4).min(MAX_BUFFER);
                }
            }
        }
    }
}

thread_local! {
    /// Each runtime thread reads into one buffer that outlives connections, so
    /// forwarding a message allocates nothing unless the destination pushes back.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One read of at most `size` bytes, written on at once as far as the destination
/// takes it. Returns what was read and, if the destination would block, the bytes
/// still to write, copied out of the shared buffer so the caller can wait.
fn read_and_forward(
    from: &impl Socket,
    to: &impl Socket,
    size: usize,
) -> (Result<Read, Broken>, Option<Vec<u8>>) {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch.clear();
        scratch.reserve(size);
        let read = match read_some(from, &mut scratch, size) {
            Ok(read @ Read::Data { .. }) => read,
            other => return (other.map_err(Broken::from), None),
        };
        let mut sent = 0;
        while sent < scratch.len() {
            match to.try_write(&scratch[sent..]) {
                Ok(written) => sent += written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return (Err(Broken::to(error)), None),
            }
        }
        let unsent = (sent < scratch.len()).then(|| scratch[sent..].to_vec());
        (Ok(read), unsent)
    })
}

enum Read {
    Eof,
    /// `drained`: the read came back short, so the socket had nothing more and tokio
    /// has already been told to wait for the next edge.
    Data {
        bytes: usize,
        drained: bool,
    },
    WouldBlock,
}

/// One recv into the buffer's spare capacity. A short read means the socket is
/// drained: reporting it to tokio as WouldBlock (with the bytes kept) clears the
/// readiness at once, which saves the recv that would only return EAGAIN on every
/// message of request/response traffic. tokio only clears it if no new readiness
/// arrived meanwhile, so no wake-up is lost.
fn read_some(from: &impl Socket, buffer: &mut Vec<u8>, limit: usize) -> io::Result<Read> {
    let mut short_read = 0;
    let result = from.try_io(Interest::READABLE, || {
        let spare = buffer.spare_capacity_mut();
        let room = spare.len().min(limit);
        // By hand: nix's recv takes an initialised slice, and zeroing the spare
        // capacity first would cost a memset per read.
        // SAFETY: recv writes at most `room` bytes into the spare capacity we own.
        let received =
            unsafe { libc::recv(from.as_fd().as_raw_fd(), spare.as_mut_ptr().cast(), room, 0) };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        let received = received as usize;
        // SAFETY: the kernel initialised `received` bytes past the current length.
        unsafe { buffer.set_len(buffer.len() + received) };
        if received > 0 && received < room {
            short_read = received;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(received)
    });
    match result {
        Ok(0) => Ok(Read::Eof),
        Ok(bytes) => Ok(Read::Data {
            bytes,
            drained: false,
        }),
        Err(error) if error.kind() == io::ErrorKind::WouldBlock && short_read > 0 => {
            Ok(Read::Data {
                bytes: short_read,
                drained: true,
            })
        }
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(Read::WouldBlock),
        Err(error) => Err(error),
    }
}

async fn readable(socket: &impl Socket) -> io::Result<()> {
    std::future::poll_fn(|context| socket.poll_read_ready(context)).await
}

async fn writable(socket: &impl Socket) -> io::Result<()> {
    std::future::poll_fn(|context| socket.poll_write_ready(context)).await
}

async fn write_all(to: &impl Socket, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        writable(to).await?;
        match to.try_write(bytes) {
            Ok(written) => bytes = &bytes[written..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Passes the EOF on: the peer sees the half-close, and the other direction goes on.
fn shutdown_write(socket: &impl AsFd) -> io::Result<()> {
    match shutdown(socket.as_fd().as_raw_fd(), Shutdown::Write) {
        // The peer may already be gone; the other direction reports that.
        Ok(()) | Err(Errno::ENOTCONN) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

const PIPE_CAPACITY: usize = 256 * 1024;

struct Pipe<'a> {
    read: OwnedFd,
    write: OwnedFd,
    // Last: fields drop in order, so the descriptors are closed before the pipe
    // goes back to the budget.
    _slot: PipeSlot<'a>,
}

/// One pipe's share of a [`PipeBudget`], given back on drop.
struct PipeSlot<'a>(&'a PipeBudget);

impl Drop for PipeSlot<'_> {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

impl<'a> Pipe<'a> {
    fn new(budget: &'a PipeBudget) -> io::Result<Self> {
        if !budget.take() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let slot = PipeSlot(budget);
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        budget.opened.fetch_add(1, Ordering::Relaxed);
        // A larger pipe means fewer splice calls; the default (64 KiB) still works.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_CAPACITY as libc::c_int));
        Ok(Self {
            read,
            write,
            _slot: slot,
        })
    }
}

fn splice(from: impl AsFd, to: impl AsFd, length: usize) -> io::Result<usize> {
    Ok(nix::fcntl::splice(
        from,
        None,
        to,
        None,
        length,
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
    )?)
}

/// Moves bytes socket → pipe → socket until the source would block (returns false)
/// or reaches EOF (returns true). The pipe is always
/// drained before the next read, so EAGAIN on the read side can only mean that the
/// socket has nothing more, never that the pipe is full.
async fn splice_while_ready(
    from: &impl Socket,
    to: &impl Socket,
    pipe: &Pipe<'_>,
    total: &mut u64,
) -> Result<bool, Broken> {
    loop {
        let read = match from.try_io(Interest::READABLE, || {
            splice(from.as_fd(), &pipe.write, PIPE_CAPACITY)
        }) {
            Ok(0) => return Ok(true),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(error) => return Err(Broken::from(error)),
        };
        let mut pending = read;
        while pending > 0 {
            writable(to).await.map_err(Broken::to)?;
            match to.try_io(Interest::WRITABLE, || {
                splice(&pipe.read, to.as_fd(), pending)
            }) {
                Ok(written) => pending -= written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(Broken::to(error)),
            }
        }
        *total += read as u64;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// Two connected loopback sockets: (the end a test drives, the end the copy uses).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let outer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (inner, _) = listener.accept().await.unwrap();
        (outer, inner)
    }

    fn pattern(length: usize, seed: u8) -> Vec<u8> {
        (0..length)
            .map(|index| (index % 251) as u8 ^ seed)
            .collect()
    }

    /// A slow reader on one side makes the copy hold unsent bytes and wait; a bulk
    /// direction switches to splice; half-closes pass through in both orders, and the
    /// counts match what went each way.
    async fn slow_reader_and_half_close(mode: CopyMode, pipes: &'static PipeBudget) {
        const UPLOAD: usize = 2 * 1024 * 1024;
        const DOWNLOAD: usize = 300 * 1024;
        let (mut client, client_inner) = pair().await;
        let (mut upstream, upstream_inner) = pair().await;
        // Small buffers towards the upstream, so the upload cannot hide in them.
        socket2::SockRef::from(&upstream_inner)
            .set_send_buffer_size(64 * 1024)
            .unwrap();
        socket2::SockRef::from(&upstream)
            .set_recv_buffer_size(64 * 1024)
            .unwrap();
        let relay = tokio::spawn(async move {
            bidirectional(&client_inner, &upstream_inner, Vec::new(), mode, pipes).await
        });

        let upload = pattern(UPLOAD, 0x5a);
        let writer = {
            let upload = upload.clone();
            tokio::spawn(async move {
                client.write_all(&upload).await.unwrap();
                client.shutdown().await.unwrap();
                let mut download = Vec::new();
                client.read_to_end(&mut download).await.unwrap();
                download
            })
        };
        // Read slowly at first, so the copy meets a full socket and must wait.
        let mut received = Vec::with_capacity(UPLOAD);
        let mut chunk = vec![0; 4096];
        for _ in 0..64 {
            let read = upstream.read(&mut chunk).await.unwrap();
            received.extend_from_slice(&chunk[..read]);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        upstream.read_to_end(&mut received).await.unwrap();
        assert!(received == upload, "upload arrived damaged or incomplete");

        let download = pattern(DOWNLOAD, 0xa5);
        upstream.write_all(&download).await.unwrap();
        drop(upstream);
        let downloaded = writer.await.unwrap();
        assert!(
            downloaded == download,
            "download arrived damaged or incomplete"
        );

        let copied = relay.await.unwrap();
        assert_eq!(
            (copied.sent, copied.received),
            (UPLOAD as u64, DOWNLOAD as u64)
        );
        assert_eq!(copied.close.to_string(), "client_fin");
        assert!(copied.error.is_none(), "{copied:?}");
    }

    fn budget(pipes: usize) -> &'static PipeBudget {
        Box::leak(Box::new(PipeBudget::new(pipes)))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn userspace_copy_survives_a_slow_reader_and_passes_half_closes() {
        let pipes = budget(2);
        slow_reader_and_half_close(CopyMode::Userspace, pipes).await;
        assert_eq!(pipes.opened(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn splice_copy_survives_a_slow_reader_and_passes_half_closes() {
        let pipes = budget(2);
        slow_reader_and_half_close(CopyMode::Splice, pipes).await;
        assert_eq!(pipes.opened(), 2, "both bulk directions went through pipes");
        assert_eq!(pipes.left(), 2, "the pipes went back to the budget");
    }

    /// One pipe in the budget: the upload takes it and gives it back when it ends,
    /// and the download, which starts after that, takes it again.
    #[tokio::test(flavor = "current_thread")]
    async fn a_pipe_goes_back_to_the_budget_when_its_direction_ends() {
        let pipes = budget(1);
        slow_reader_and_half_close(CopyMode::Splice, pipes).await;
        assert_eq!((pipes.opened(), pipes.left()), (2, 1));
    }

    /// With no pipe left, a bulk direction stays in user space and loses nothing.
    #[tokio::test(flavor = "current_thread")]
    async fn splice_copy_without_pipes_left_copies_in_user_space() {
        let pipes = budget(0);
        slow_reader_and_half_close(CopyMode::Splice, pipes).await;
        assert_eq!((pipes.opened(), pipes.left()), (0, 0));
    }

    /// The first direction to end sends its FIN at once, while the other keeps going.
    #[tokio::test(flavor = "current_thread")]
    async fn the_first_eof_is_passed_on_while_the_other_direction_flows() {
        let (mut client, client_inner) = pair().await;
        let (mut upstream, upstream_inner) = pair().await;
        let relay = tokio::spawn(async move {
            bidirectional(
                &client_inner,
                &upstream_inner,
                Vec::new(),
                CopyMode::default(),
                budget(2),
            )
            .await
        });
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut request = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), upstream.read_to_end(&mut request))
            .await
            .expect("the client's FIN reached the upstream while the copy still runs")
            .unwrap();
        assert_eq!(request, b"request");
        assert!(!relay.is_finished());

        upstream.write_all(b"response").await.unwrap();
        drop(upstream);
        let mut response = Vec::new();
        client.read_to_end(&mut response).await.unwrap();
        assert_eq!(response, b"response");
        let copied = relay.await.unwrap();
        assert_eq!((copied.sent, copied.received), (7, 8));
        assert_eq!(copied.close.to_string(), "client_fin");
    }

    /// A relay between two fresh pairs, with the preface `preface`: (client end,
    /// upstream end, the copy, its pipes).
    async fn relayed(
        mode: CopyMode,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<Copied>,
        &'static PipeBudget,
    ) {
        let (client, client_inner) = pair().await;
        let (upstream, upstream_inner) = pair().await;
        let pipes = budget(2);
        let relay = tokio::spawn(async move {
            bidirectional(
                &client_inner,
                &upstream_inner,
                b"preface".to_vec(),
                mode,
                pipes,
            )
            .await
        });
        (client, upstream, relay, pipes)
    }

    /// Splice mode moved the bulk through a pipe; user-space mode opened none.
    fn assert_pipes(mode: CopyMode, pipes: &PipeBudget) {
        assert_eq!(pipes.opened() > 0, mode == CopyMode::Splice, "{mode:?}");
    }

    /// Closes with a reset, once the peer has acknowledged everything written: what a
    /// process that aborts its connection after sending does.
    async fn abort(stream: TcpStream) {
        while Socket::unacknowledged(&stream).unwrap() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stream.set_zero_linger().unwrap();
        drop(stream);
    }

    /// Reads until the stream fails or ends: (bytes read, how it ended).
    async fn read_until_the_end(stream: &mut TcpStream) -> (Vec<u8>, io::Result<()>) {
        let mut received = Vec::new();
        let mut chunk = vec![0; 64 * 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
                .await
                .expect("the stream ended in time")
            {
                Ok(0) => return (received, Ok(())),
                Ok(read) => received.extend_from_slice(&chunk[..read]),
                Err(error) => return (received, Err(error)),
            }
        }
    }

    async fn upstream_reset_reaches_the_client_after_its_bytes(mode: CopyMode) {
        const RESPONSE: usize = 100 * 1024;
        let (mut client, mut upstream, relay, pipes) = relayed(mode).await;
        let reader = tokio::spawn(async move { read_until_the_end(&mut client).await });
        let response = pattern(RESPONSE, 0x33);
        upstream.write_all(&response).await.unwrap();
        abort(upstream).await;

        let (received, end) = reader.await.unwrap();
        assert!(
            received == response,
            "{} of {RESPONSE} bytes",
            received.len()
        );
        let error = end.expect_err("the client got a clean EOF");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
        let copied = relay.await.unwrap();
        assert_eq!(copied.close.to_string(), "upstream_reset");
        assert_eq!(copied.received, RESPONSE as u64);
        assert!(copied.error.is_some());
        assert_pipes(mode, pipes);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn userspace_copy_passes_an_upstream_reset_on_after_the_bytes() {
        upstream_reset_reaches_the_client_after_its_bytes(CopyMode::Userspace).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn splice_copy_passes_an_upstream_reset_on_after_the_bytes() {
        upstream_reset_reaches_the_client_after_its_bytes(CopyMode::Splice).await;
    }

    async fn client_reset_reaches_the_upstream(mode: CopyMode) {
        const UPLOAD: usize = 300 * 1024;
        let (mut client, mut upstream, relay, pipes) = relayed(mode).await;
        let reader = tokio::spawn(async move { read_until_the_end(&mut upstream).await });
        let upload = pattern(UPLOAD, 0x44);
        client.write_all(&upload).await.unwrap();
        abort(client).await;

        let (received, end) = reader.await.unwrap();
        assert!(
            received[..7] == *b"preface" && received[7..] == upload,
            "{} of {UPLOAD} bytes after the preface",
            received.len().saturating_sub(7)
        );
        let error = end.expect_err("the upstream got a clean EOF");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
        let copied = relay.await.unwrap();
        assert_eq!(copied.close.to_string(), "client_reset");
        assert_eq!(copied.sent, 7 + UPLOAD as u64);
        assert_pipes(mode, pipes);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn userspace_copy_passes_a_client_reset_on() {
        client_reset_reaches_the_upstream(CopyMode::Userspace).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn splice_copy_passes_a_client_reset_on() {
        client_reset_reaches_the_upstream(CopyMode::Splice).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_reset_after_a_half_close_is_passed_on() {
        let (mut client, mut upstream, relay, _) = relayed(CopyMode::default()).await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let (request, end) = read_until_the_end(&mut upstream).await;
        assert_eq!(request, b"prefacerequest");
        end.expect("the client's half-close reached the upstream as a FIN");
        upstream.write_all(b"partial answer").await.unwrap();
        abort(upstream).await;

        let (answer, end) = read_until_the_end(&mut client).await;
        assert_eq!(answer, b"partial answer");
        let error = end.expect_err("the client got a clean EOF");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
        assert_eq!(relay.await.unwrap().close.to_string(), "upstream_reset");
    }

    /// A reset the proxy meets writing (the client aborts while the upstream streams
    /// to it) is passed on like one it meets reading.
    #[tokio::test(flavor = "current_thread")]
    async fn a_reset_met_while_writing_is_passed_on() {
        let (mut client, mut upstream, relay, _) = relayed(CopyMode::default()).await;
        let streaming = tokio::spawn(async move {
            let chunk = pattern(64 * 1024, 0x55);
            loop {
                if let Err(error) = upstream.write_all(&chunk).await {
                    return error;
                }
            }
        });
        let mut first = vec![0; 1024];
        client.read_exact(&mut first).await.unwrap();
        client.set_zero_linger().unwrap();
        drop(client);

        let error = tokio::time::timeout(Duration::from_secs(5), streaming)
            .await
            .expect("the upstream's writes failed in time")
            .unwrap();
        assert!(
            matches!(
                error.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{error}"
        );
        assert_eq!(relay.await.unwrap().close.to_string(), "client_reset");
    }

    /// The upstream answers and closes cleanly: the client gets the answer and a
    /// clean EOF, and nobody is reset.
    #[tokio::test(flavor = "current_thread")]
    async fn a_clean_close_stays_clean() {
        let (mut client, mut upstream, relay, _) = relayed(CopyMode::default()).await;
        upstream.write_all(b"answer").await.unwrap();
        upstream.shutdown().await.unwrap();
        let (answer, end) = read_until_the_end(&mut client).await;
        assert_eq!(answer, b"answer");
        end.expect("a clean EOF");
        client.write_all(b"late request").await.unwrap();
        drop(client);
        let (request, end) = read_until_the_end(&mut upstream).await;
        assert_eq!(request, b"prefacelate request");
        end.expect("a clean EOF");
        let copied = relay.await.unwrap();
        assert_eq!(copied.close.to_string(), "upstream_fin");
        assert!(copied.error.is_none());
    }

    #[test]
    fn errors_are_told_apart_as_resets_or_other_failures() {
        for (kind, how) in [
            (io::ErrorKind::ConnectionReset, How::Reset),
            (io::ErrorKind::BrokenPipe, How::Reset),
            (io::ErrorKind::ConnectionAborted, How::Reset),
            (io::ErrorKind::TimedOut, How::Error),
            (io::ErrorKind::HostUnreachable, How::Error),
        ] {
            assert_eq!(How::of(&io::Error::from(kind)), how, "{kind:?}");
        }
        assert_eq!(
            How::of(&io::Error::from_raw_os_error(libc::ECONNRESET)),
            How::Reset
        );
        assert_eq!(
            How::of(&io::Error::from_raw_os_error(libc::EPIPE)),
            How::Reset
        );
    }
}
