//! Which daemon owns a proxy address.
//!
//! Two daemons must never share a proxy port: each keeps the original destinations of
//! the connections its own programs redirect, so a connection accepted by the other
//! would have no record. SO_REUSEPORT, which the workers need, lets a second root
//! process join a port the first has bound, so "is anything listening there?" followed
//! by a bind leaves a window in which two daemons starting at the same instant both
//! see the port free and both take it. A claim closes that window: an abstract unix
//! socket named after the address. Binding one is atomic (the second bind fails with
//! EADDRINUSE), the name lives in the network namespace the port lives in, and the
//! kernel drops it with the last descriptor, even when the daemon is killed.

use std::{
    io,
    net::SocketAddr,
    os::{linux::net::SocketAddrExt as _, unix::net::UnixDatagram},
};

/// Holds a proxy address for this daemon until dropped.
#[derive(Debug)]
pub struct PortClaim {
    _socket: UnixDatagram,
}

impl PortClaim {
    /// Claims `addr`; `Ok(None)` if another process holds its claim.
    pub fn take(addr: SocketAddr) -> io::Result<Option<Self>> {
        let name = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name(addr))?;
        match UnixDatagram::bind_addr(&name) {
            Ok(socket) => Ok(Some(Self { _socket: socket })),
            Err(error) if error.kind() == io::ErrorKind::AddrInUse => Ok(None),
            Err(error) => Err(error),
        }
    }
}

fn abstract_name(addr: SocketAddr) -> String {
    format!("interceptor/proxy/{addr}")
}

#[cfg(test)]
mod tests {
    use super::PortClaim;

    #[test]
    fn an_address_has_one_claim_at_a_time_and_is_free_again_once_it_is_dropped() {
        // A port nobody else's test claims: the claim is only a name, nothing binds it.
        let addr = "127.0.0.1:1".parse().unwrap();
        let other = "127.0.0.1:2".parse().unwrap();
        let first = PortClaim::take(addr).unwrap().expect("a free address");
        assert!(PortClaim::take(addr).unwrap().is_none());
        let _other = PortClaim::take(other).unwrap().expect("another address");
        drop(first);
        assert!(PortClaim::take(addr).unwrap().is_some());
    }
}
