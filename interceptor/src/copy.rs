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
    os::fd::{AsFd, AsRawFd as _, OwnedFd},
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
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
};

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
pub trait Socket: AsFd {
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
    pipes: &PipeBudget,
) -> io::Result<(u64, u64)> {
    let one_finished = AtomicBool::new(false);
    tokio::try_join!(
        one_way(client, upstream, mode, pipes, &one_finished),
        one_way(upstream, client, mode, pipes, &one_finished)
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
    pipes: &PipeBudget,
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
) -> io::Result<bool> {
    loop {
        let read = match from.try_io(Interest::READABLE, || {
            splice(from.as_fd(), &pipe.write, PIPE_CAPACITY)
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
                splice(&pipe.read, to.as_fd(), pending)
            }) {
                Ok(written) => pending -= written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
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
            bidirectional(&client_inner, &upstream_inner, mode, pipes).await
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

        let counts = relay.await.unwrap().unwrap();
        assert_eq!(counts, (UPLOAD as u64, DOWNLOAD as u64));
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
        assert_eq!(relay.await.unwrap().unwrap(), (7, 8));
    }
}
