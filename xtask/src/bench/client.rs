//! `xtask bench-client`: the load generator. The harness starts it inside the bench
//! cgroup (so connect4 sees its connects) and the bench network namespace, writes one
//! [`Spec`] as a JSON line on stdin, and reads [`Outcome`] JSON lines from stdout.

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc, Barrier,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::proto::{Job, Outcome, PERIOD, Percentiles, Spec, Target, reference};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const BULK_IO_TIMEOUT: Duration = Duration::from_secs(120);

pub fn main() -> Result<()> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the job from stdin")?;
    let spec: Spec = serde_json::from_str(&line).context("parsing the job")?;
    let outcome = check_cgroup(&spec.cgroup).and_then(|()| run(&spec.job));
    let outcome = outcome.unwrap_or_else(|error| Outcome {
        error: Some(format!("{error:#}")),
        ..Outcome::default()
    });
    emit(&outcome)?;
    if outcome.error.is_some() {
        std::process::exit(1);
    }
    Ok(())
}

fn emit(outcome: &Outcome) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, outcome)?;
    stdout.write_all(b"\n")?;
    stdout.flush()?;
    Ok(())
}

/// Refuses to generate load from anywhere but the bench cgroup: the numbers for the
/// interceptor path would silently be direct ones.
fn check_cgroup(expected: &str) -> Result<()> {
    let membership = std::fs::read_to_string("/proc/self/cgroup")?;
    let actual = membership
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .context("no cgroup v2 line in /proc/self/cgroup")?;
    ensure!(
        actual.trim() == expected,
        "the client runs in cgroup {actual:?}, not {expected:?}"
    );
    Ok(())
}

fn run(job: &Job) -> Result<Outcome> {
    match job {
        Job::Bulk {
            target,
            streams,
            bytes,
        } => bulk(target, *streams, *bytes),
        Job::Latency {
            target,
            warmup,
            round_trips,
            size,
        } => latency(target, *warmup, *round_trips, *size),
        Job::ConnRate {
            target,
            concurrency,
            millis,
            size,
        } => conn_rate(target, *concurrency, Duration::from_millis(*millis), *size),
        Job::ConnectLatency {
            target,
            connections,
            millis,
            size,
        } => connect_latency(target, *connections, Duration::from_millis(*millis), *size),
        Job::Hold {
            target,
            connections,
        } => hold(target, *connections),
    }
}

/// Connects and checks that the socket reports the address it connected to, as it
/// must on every path (getpeername shows intercepted sockets their VIP). That a VIP
/// connection works at all proves the redirect: the bench namespace has no route to
/// 240.240.0.0/16.
fn connect(target: &Target, index: u64) -> Result<TcpStream> {
    let addr = target.addr_for(index);
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    check_peer(addr, stream.peer_addr()?)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

fn check_peer(addr: SocketAddr, peer: SocketAddr) -> Result<()> {
    ensure!(
        peer == addr,
        "a connect to {addr} reports its peer as {peer}"
    );
    Ok(())
}

fn bulk(target: &Target, streams: usize, bytes: u64) -> Result<Outcome> {
    ensure!(streams > 0 && bytes > 0, "nothing to send");
    let start_line = Arc::new(Barrier::new(streams + 1));
    let workers: Vec<_> = (0..streams)
        .map(|index| {
            let target = *target;
            let start_line = Arc::clone(&start_line);
            thread::spawn(move || -> Result<Instant> {
                let connected = connect(&target, index as u64).and_then(|stream| {
                    stream.set_read_timeout(Some(BULK_IO_TIMEOUT))?;
                    stream.set_write_timeout(Some(BULK_IO_TIMEOUT))?;
                    Ok(stream)
                });
                // Everyone reaches the barrier, also on error, so no thread waits forever.
                start_line.wait();
                let mut stream = connected?;
                let pattern = &reference()[..PERIOD];
                let mut left = bytes;
                while left > 0 {
                    let size = left.min(PERIOD as u64) as usize;
                    stream
                        .write_all(&pattern[..size])
                        .context("sending the bulk stream")?;
                    left -= size as u64;
                }
                stream.shutdown(Shutdown::Write)?;
                let mut answer = String::new();
                stream
                    .read_to_string(&mut answer)
                    .context("reading the sink's answer")?;
                let finished = Instant::now();
                let expected = format!("OK {bytes}");
                ensure!(
                    answer.trim() == expected,
                    "the sink answered {:?}, expected {expected:?}",
                    answer.trim()
                );
                Ok(finished)
            })
        })
        .collect();
    start_line.wait();
    let started = Instant::now();
    let mut outcome = Outcome::default();
    let mut last = started;
    for worker in workers {
        match worker.join() {
            Ok(Ok(finished)) => {
                outcome.ok += 1;
                outcome.bytes += bytes;
                last = last.max(finished);
            }
            Ok(Err(error)) => record_error(&mut outcome, &error),
            Err(_) => bail!("a bulk stream thread panicked"),
        }
    }
    outcome.seconds = last.duration_since(started).as_secs_f64();
    Ok(outcome)
}

fn record_error(outcome: &mut Outcome, error: &anyhow::Error) {
    outcome.errors += 1;
    if outcome.first_error.is_none() {
        outcome.first_error = Some(format!("{error:#}"));
    }
}

fn latency(target: &Target, warmup: u64, round_trips: u64, size: usize) -> Result<Outcome> {
    ensure!(size >= 8, "messages carry an 8-byte sequence number");
    let mut stream = connect(target, 0)?;
    stream.set_nodelay(true)?;
    let mut request: Vec<u8> = reference()[..size].to_vec();
    let mut response = vec![0u8; size];
    let mut samples = Vec::with_capacity(round_trips as usize);
    let started = Instant::now();
    for sequence in 0..warmup + round_trips {
        request[..8].copy_from_slice(&sequence.to_le_bytes());
        let sent = Instant::now();
        stream.write_all(&request).context("sending a request")?;
        stream
            .read_exact(&mut response)
            .context("reading a response")?;
        let elapsed = sent.elapsed();
        ensure!(
            response == request,
            "round trip {sequence}: the echo differs from the request"
        );
        if sequence >= warmup {
            samples.push(elapsed.as_nanos() as u64);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    stream.shutdown(Shutdown::Write)?;
    Ok(Outcome {
        ok: samples.len() as u64,
        bytes: samples.len() as u64 * size as u64,
        seconds,
        latency: Percentiles::from_nanos(samples),
        ..Outcome::default()
    })
}

/// One connection: connect, one request, its echo, close. Returns the time it took.
fn one_exchange(target: &Target, index: u64, request: &mut [u8]) -> Result<Duration> {
    let started = Instant::now();
    let mut stream = connect(target, index)?;
    stream.set_nodelay(true)?;
    request[..8].copy_from_slice(&index.to_le_bytes());
    stream.write_all(request)?;
    let mut response = vec![0u8; request.len()];
    stream.read_exact(&mut response)?;
    ensure!(response == request, "the echo differs from the request");
    drop(stream);
    Ok(started.elapsed())
}

fn connect_latency(
    target: &Target,
    connections: u64,
    limit: Duration,
    size: usize,
) -> Result<Outcome> {
    let mut request = reference()[..size.max(8)].to_vec();
    let mut samples = Vec::with_capacity(connections as usize);
    let mut outcome = Outcome::default();
    let started = Instant::now();
    for index in 0..connections {
        if started.elapsed() > limit {
            break;
        }
        match one_exchange(target, index, &mut request) {
            Ok(elapsed) => samples.push(elapsed.as_nanos() as u64),
            Err(error) => record_error(&mut outcome, &error),
        }
    }
    outcome.seconds = started.elapsed().as_secs_f64();
    outcome.ok = samples.len() as u64;
    outcome.latency = Percentiles::from_nanos(samples);
    Ok(outcome)
}

fn conn_rate(target: &Target, concurrency: usize, limit: Duration, size: usize) -> Result<Outcome> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ok = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let failures = runtime.block_on(async {
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                let (target, ok, next) = (*target, Arc::clone(&ok), Arc::clone(&next));
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    let mut request = reference()[..size.max(8)].to_vec();
                    let mut response = vec![0u8; request.len()];
                    while tokio::time::Instant::now() < deadline {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let exchange = exchange_async(&target, index, &mut request, &mut response);
                        match tokio::time::timeout(IO_TIMEOUT, exchange).await {
                            Ok(Ok(())) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Err(error)) => failures.push(format!("{error:#}")),
                            Err(_) => failures.push("an exchange timed out".to_owned()),
                        }
                        // Bounded: one worker that fails fast cannot spin on errors.
                        if failures.len() >= 100 {
                            break;
                        }
                    }
                    failures
                })
            })
            .collect();
        let mut failures = Vec::new();
        for worker in workers {
            failures.extend(
                worker
                    .await
                    .unwrap_or_else(|_| vec!["worker panicked".into()]),
            );
        }
        failures
    });
    Ok(Outcome {
        ok: ok.load(Ordering::Relaxed),
        errors: failures.len() as u64,
        first_error: failures.into_iter().next(),
        seconds: started.elapsed().as_secs_f64(),
        ..Outcome::default()
    })
}

async fn exchange_async(
    target: &Target,
    index: u64,
    request: &mut [u8],
    response: &mut [u8],
) -> Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = target.addr_for(index);
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    check_peer(addr, stream.peer_addr()?)?;
    stream.set_nodelay(true)?;
    request[..8].copy_from_slice(&index.to_le_bytes());
    stream.write_all(request).await?;
    stream.read_exact(response).await?;
    ensure!(response == request, "the echo differs from the request");
    Ok(())
}

fn hold(target: &Target, connections: u64) -> Result<Outcome> {
    let mut request = reference()[..16].to_vec();
    let mut response = [0u8; 16];
    let mut held = Vec::with_capacity(connections as usize);
    let started = Instant::now();
    for index in 0..connections {
        let mut stream = connect(target, index)?;
        request[..8].copy_from_slice(&index.to_le_bytes());
        stream.write_all(&request)?;
        stream
            .read_exact(&mut response)
            .with_context(|| format!("round trip on connection {index}"))?;
        ensure!(
            response[..] == request[..],
            "the echo differs from the request"
        );
        held.push(stream);
    }
    emit(&Outcome {
        ok: held.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
        ..Outcome::default()
    })?;
    // Hold until the harness has measured: it writes a line or closes stdin.
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let count = held.len() as u64;
    drop(held);
    Ok(Outcome {
        ok: count,
        ..Outcome::default()
    })
}
