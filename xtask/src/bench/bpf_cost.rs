//! What connect4 costs per connect, from the kernel's own accounting
//! (`kernel.bpf_stats_enabled`: each program's run time and run count), with no
//! `interceptor trace` attached and with one attached. Tracing is off unless someone
//! traces, so the first figure is what every node pays.

use std::{
    collections::HashSet,
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// The program whose cost is measured, for the run's address family: it runs on
/// every connect of that family in the cgroup. (An IPv6 run's connects go through
/// connect6 only.)
pub fn connect_program() -> &'static str {
    match super::proto::family() {
        super::proto::Family::Ipv4 => "egress_connect4",
        super::proto::Family::Ipv6 => "egress_connect6",
    }
}
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns the kernel's BPF run-time accounting on, and back to what it was on drop.
pub struct BpfStats {
    before: String,
}

impl BpfStats {
    pub fn enable() -> Result<Self> {
        let before =
            std::fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?;
        std::fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS}"))?;
        Ok(Self { before })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, self.before.trim());
    }
}

/// The [`connect_program`]'s total run time and run count, of the daemon `pid`'s copy
/// (other daemons on the machine have their own).
pub fn connect_stats(pid: u32) -> Result<(Duration, u64)> {
    let own = program_ids(pid)?;
    let wanted = connect_program();
    for program in aya::programs::loaded_programs() {
        let program = program.context("listing loaded BPF programs")?;
        if own.contains(&program.id()) && program.name_as_str() == Some(wanted) {
            return Ok((program.run_time(), program.run_count()));
        }
    }
    bail!("daemon {pid} holds no {wanted} program")
}

/// The ids of the BPF programs `pid` holds descriptors of, from their fdinfo.
fn program_ids(pid: u32) -> Result<HashSet<u32>> {
    let mut ids = HashSet::new();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        if let Some(id) = info
            .lines()
            .find_map(|line| line.strip_prefix("prog_id:"))
            .and_then(|id| id.trim().parse().ok())
        {
            ids.insert(id);
        }
    }
    Ok(ids)
}

/// An open `/trace` stream of every decision, read and thrown away on a thread of its
/// own, as a terminal running `interceptor trace` would; dropping it closes it.
pub struct Tracing {
    stream: TcpStream,
}

impl Tracing {
    pub fn attach(admin: &str) -> Result<Self> {
        let mut stream =
            TcpStream::connect(admin).with_context(|| format!("connecting to {admin}"))?;
        write!(stream, "GET /trace HTTP/1.1\r\nHost: {admin}\r\n\r\n")?;
        // The first line arrives once the programs trace.
        let mut first = [0; 256];
        let read = stream.read(&mut first)?;
        let head = String::from_utf8_lossy(&first[..read]);
        if !head.starts_with("HTTP/1.1 200") {
            bail!("GET /trace answered {head:?}");
        }
        let mut reader = stream.try_clone()?;
        std::thread::spawn(move || {
            let mut sink = [0; 64 * 1024];
            while matches!(reader.read(&mut sink), Ok(read) if read > 0) {}
        });
        Ok(Self { stream })
    }
}

impl Drop for Tracing {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}
