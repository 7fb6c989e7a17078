//! The backends, served from the harness process inside the namespace. Their accept
//! loops live as long as the harness process.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::proto::{BULK_PORT, CONN_PORT, ECHO_PORT, PERIOD, Verifier, backend_ip};

/// Socket reads time out after this long, so a stuck peer cannot pin a thread forever.
const IDLE_LIMIT: Duration = Duration::from_secs(120);

pub struct Backends {
    _runtime: tokio::runtime::Runtime,
}

pub fn start() -> Result<Backends> {
    spawn_threaded("bulk sink", BULK_PORT, serve_sink)?;
    spawn_threaded("echo", ECHO_PORT, serve_echo)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-backend")
        .enable_all()
        .build()
        .context("starting the backend runtime")?;
    let addr = SocketAddr::new(backend_ip(), CONN_PORT);
    let listener = runtime
        .block_on(async {
            let socket = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(4096)
        })
        .with_context(|| format!("binding the echo backend on {addr}"))?;
    runtime.spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve_echo_async(stream));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
    Ok(Backends { _runtime: runtime })
}

fn spawn_threaded(
    name: &str,
    port: u16,
    serve: fn(TcpStream) -> std::io::Result<()>,
) -> Result<()> {
    let addr = SocketAddr::new(backend_ip(), port);
    let listener =
        TcpListener::bind(addr).with_context(|| format!("binding the {name} backend on {addr}"))?;
    thread::Builder::new()
        .name(format!("bench-{port}"))
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = thread::Builder::new()
                    .name(format!("bench-{port}-conn"))
                    .spawn(move || serve(stream));
            }
        })?;
    Ok(())
}

/// Reads and verifies the pattern to EOF, then answers `OK <bytes>` or
/// `BAD <bytes> <offset>` and closes.
fn serve_sink(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IDLE_LIMIT))?;
    let mut buffer = vec![0u8; PERIOD];
    let mut verifier = Verifier::default();
    loop {
        let read = stream.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        verifier.update(&buffer[..read]);
    }
    let answer = match verifier.mismatch_at {
        None => format!("OK {}\n", verifier.bytes),
        Some(offset) => format!("BAD {} {offset}\n", verifier.bytes),
    };
    stream.write_all(answer.as_bytes())?;
    stream.shutdown(Shutdown::Write)
}

fn serve_echo(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IDLE_LIMIT))?;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = stream.read(&mut buffer)?;
        if read == 0 {
            return stream.shutdown(Shutdown::Write);
        }
        stream.write_all(&buffer[..read])?;
    }
}

async fn serve_echo_async(mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    // Small: this backend holds thousands of idle connections.
    let mut buffer = [0u8; 2048];
    loop {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buffer[..read]).await?;
    }
}
