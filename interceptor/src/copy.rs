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

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
};

use tokio::{
    io::Interest,
    net::{TcpStream, UnixStream},
};

/// How bytes are moved; both are correct, and the benchmark compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// read(2)/write(2) through adaptive user-space buffers.
    Userspace,
    /// Like `Userspace`, but bulk directions switch to splice(2): the default, as it
    /// measured 15-40% less proxy CPU per GiB than `Userspace` (`cargo xtask bench
    /// --scenario bulk`, with and without `--daemon-arg=--copy-mode=userspace`).
    #[default]
    Splice,
}

const INITIAL_BUFFER: usize = 16 * 1024;
const MAX_BUFFER: usize = 256 * 1024;

/// A socket tokio can wait on and use through a shared reference, so both directions
/// of one connection can run at once.
pub trait Socket: AsRawFd {
    fn readable(&self) -> impl Future<Output = io::Result<()>>;
    fn writable(&self) -> impl Future<Output = io::Result<()>>;
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize>;
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
}

macro_rules! socket {
    ($type:ty) => {
        impl Socket for $type {
            fn readable(&self) -> impl Future<Output = io::Result<()>> {
                <$type>::readable(self)
            }
            fn writable(&self) -> impl Future<Output = io::Result<()>> {
                <$type>::writable(self)
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
        }
    };
}
socket!(TcpStream);
socket!(UnixStream);

/// Copies `client` ↔ `upstream` until both directions reached EOF, or either failed.
/// Returns (bytes client → upstream, bytes upstream → client).
///
/// The caller must close both sockets when this returns: the direction that ends
/// last leaves its FIN to that close, which sends it anyway, saving a shutdown(2) per
/// connection.
pub async fn bidirectional(
    client: &impl Socket,
    upstream: &impl Socket,
    mode: CopyMode,
) -> io::Result<(u64, u64)> {
    let one_finished = AtomicBool::new(false);
    tokio::try_join!(
        one_way(client, upstream, mode, &one_finished),
        one_way(upstream, client, mode, &one_finished)
    )
}

/// Passes an EOF from one socket on to the other.
fn pass_eof(to: &impl Socket, one_finished: &AtomicBool) -> io::Result<()> {
    if one_finished.swap(true, Ordering::Relaxed) {
        // Both directions are done and the caller closes both sockets next; nothing
        // is left unread on `to`, so its close sends the FIN.
        Ok(())
    } else {
        shutdown_write(to)
    }
}

async fn one_way(
    from: &impl Socket,
    to: &impl Socket,
    mode: CopyMode,
    one_finished: &AtomicBool,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut size = INITIAL_BUFFER;
    let mut pipe: Option<Pipe> = None;
    loop {
        from.readable().await?;
        if let Some(pipe) = &pipe {
            if splice_while_ready(from, to, pipe, &mut total).await? {
                pass_eof(to, one_finished)?;
                return Ok(total);
            }
            continue;
        }
        loop {
            let (read, unsent) = read_and_forward(from, to, size);
            let bytes = match read? {
                Read::Eof => {
                    pass_eof(to, one_finished)?;
                    return Ok(total);
                }
                Read::WouldBlock => break,
                Read::Data { bytes, drained } => {
                    if let Some(unsent) = unsent {
                        write_all(to, &unsent).await?;
                    }
                    total += bytes as u64;
                    if drained {
                        break;
                    }
                    bytes
                }
            };
            if bytes == size {
                if mode == CopyMode::Splice {
                    // Bulk: from here on this direction moves bytes in the kernel.
                    // Without a pipe (descriptor limit), it stays in user space.
                    pipe = Pipe::new().ok();
                    if pipe.is_some() {
                        break;
                    }
                }
                size = (size * 4).min(MAX_BUFFER);
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
) -> (io::Result<Read>, Option<Vec<u8>>) {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch.clear();
        scratch.reserve(size);
        let read = match read_some(from, &mut scratch, size) {
            Ok(read @ Read::Data { .. }) => read,
            other => return (other, None),
        };
        let mut sent = 0;
        while sent < scratch.len() {
            match to.try_write(&scratch[sent..]) {
                Ok(written) => sent += written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return (Err(error), None),
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
        // SAFETY: recv writes at most `room` bytes into the spare capacity we own.
        let received = unsafe { libc::recv(from.as_raw_fd(), spare.as_mut_ptr().cast(), room, 0) };
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

pub async fn write_all(to: &impl Socket, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(written) => bytes = &bytes[written..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Passes the EOF on: the peer sees the half-close, and the other direction goes on.
fn shutdown_write(socket: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: shutdown on a descriptor the socket owns for as long as it is borrowed.
    if unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_WR) } == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    // The peer may already be gone; the other direction reports that.
    if error.raw_os_error() == Some(libc::ENOTCONN) {
        Ok(())
    } else {
        Err(error)
    }
}

const PIPE_CAPACITY: usize = 256 * 1024;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let pipe = unsafe {
            Self {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // A larger pipe means fewer splice calls; the default (64 KiB) still works.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            libc::fcntl(
                pipe.write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_CAPACITY as libc::c_int,
            )
        };
        Ok(pipe)
    }
}

fn splice(from: libc::c_int, to: libc::c_int, length: usize) -> io::Result<usize> {
    // SAFETY: splice between two descriptors we hold, with no offsets.
    let moved = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            length,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if moved < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(moved as usize)
    }
}

/// Moves bytes socket → pipe → socket until the source would block (returns false)
/// or reaches EOF (returns true). The pipe is always
/// drained before the next read, so EAGAIN on the read side can only mean that the
/// socket has nothing more, never that the pipe is full.
async fn splice_while_ready(
    from: &impl Socket,
    to: &impl Socket,
    pipe: &Pipe,
    total: &mut u64,
) -> io::Result<bool> {
    loop {
        let read = match from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_CAPACITY)
        }) {
            Ok(0) => return Ok(true),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(error) => return Err(error),
        };
        let mut pending = read;
        while pending > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), pending)
            }) {
                Ok(written) => pending -= written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        }
        *total += read as u64;
    }
}
