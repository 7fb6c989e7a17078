//! The sd_notify protocol, for `Type=notify` units: one datagram of `KEY=value`
//! lines to the unix socket named by `$NOTIFY_SOCKET`. Without that variable (not
//! under systemd) every call does nothing.
//!
//! Hand-written: the `sd-notify` crate connects to `$NOTIFY_SOCKET` as a path only,
//! so the abstract sockets (`@name`) systemd may hand out would fail.

use std::{
    ffi::{OsStr, OsString},
    io,
    os::unix::{
        ffi::OsStrExt as _,
        net::{SocketAddr, UnixDatagram},
    },
};

use nix::time::{ClockId, clock_gettime};
use tracing::{debug, warn};

use crate::report::Chain;

const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("bad NOTIFY_SOCKET {0:?}")]
    Address(OsString, #[source] io::Error),
    #[error("cannot notify systemd at {0:?}")]
    Send(OsString, #[source] io::Error),
}

/// Tells the service manager the daemon is serving: systemd then considers the
/// unit started and `systemctl start` returns.
pub fn ready() {
    notify("READY=1\nSTATUS=intercepting\n");
}

/// Tells the service manager shutdown began, so it does not mistake the drain for a hang.
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=draining connections\n");
}

/// Tells the service manager a reload is being applied (`Type=notify-reload` and
/// `systemctl reload` wait for the `READY=1` that follows).
pub fn reloading() {
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading\n",
        monotonic_usec()
    ));
}

/// CLOCK_MONOTONIC, which the reload message must carry, in microseconds.
fn monotonic_usec() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |now| {
        now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1_000
    })
}

fn notify(state: &str) {
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    match notify_to(&socket, state) {
        Ok(()) => debug!(state = state.trim_end(), "notified systemd"),
        // systemd will time the unit out; logging is all that is left to do.
        Err(error) => warn!(error = %Chain(&error), "sd_notify failed"),
    }
}

/// Sends `state` to the notify socket `socket`: a path, or an abstract name after `@`.
pub fn notify_to(socket: &OsStr, state: &str) -> Result<(), NotifyError> {
    let bytes = socket.as_bytes();
    let address = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(name)
        }
        None => SocketAddr::from_pathname(socket),
    }
    .map_err(|error| NotifyError::Address(socket.to_owned(), error))?;
    let sender =
        UnixDatagram::unbound().map_err(|error| NotifyError::Send(socket.to_owned(), error))?;
    sender
        .send_to_addr(state.as_bytes(), &address)
        .map_err(|error| NotifyError::Send(socket.to_owned(), error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::linux::net::SocketAddrExt as _;

    use super::*;

    #[test]
    fn notifies_an_abstract_socket() {
        let name = format!("interceptor-notify-test-{}", std::process::id());
        let receiver =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        notify_to(OsStr::new(&format!("@{name}")), "READY=1\n").unwrap();
        let mut buffer = [0u8; 64];
        let received = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..received], b"READY=1\n");
    }

    #[test]
    fn notifies_a_path_socket() {
        let path = std::env::temp_dir().join(format!(
            "interceptor-notify-test-{}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "STOPPING=1\n").unwrap();
        let mut buffer = [0u8; 64];
        let received = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..received], b"STOPPING=1\n");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        assert!(notify_to(OsStr::new("/nonexistent/notify.sock"), "READY=1\n").is_err());
    }
}
