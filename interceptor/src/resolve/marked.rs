//! The resolver's sockets carry the bypass mark, like the proxy's upstream sockets:
//! with DNS capture on, an unmarked query to port 53 would be taken to the daemon's
//! own DNS server, which answers a ServiceEntry host with its VIP, and a connection
//! to that host would be sent back to the proxy.

use std::{future::Future, io, net::SocketAddr, os::fd::AsFd, pin::Pin, time::Duration};

use hickory_resolver::net::runtime::{
    RuntimeProvider, TokioHandle, TokioRuntimeProvider, TokioTime, iocompat::AsyncIoTokioAsStd,
};
use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpStream, UdpSocket};

use crate::socket::connect_bypassing;

/// hickory's own default, for a connect without a timeout of its own.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Default)]
pub struct MarkedRuntime {
    inner: TokioRuntimeProvider,
    mark: u32,
}

impl MarkedRuntime {
    pub fn new(mark: u32) -> Self {
        MarkedRuntime {
            inner: TokioRuntimeProvider::default(),
            mark,
        }
    }
}

impl RuntimeProvider for MarkedRuntime {
    type Handle = TokioHandle;
    type Timer = TokioTime;
    type Udp = UdpSocket;
    type Tcp = AsyncIoTokioAsStd<TcpStream>;

    fn create_handle(&self) -> Self::Handle {
        self.inner.create_handle()
    }

    fn connect_tcp(
        &self,
        server_addr: SocketAddr,
        bind_addr: Option<SocketAddr>,
        timeout: Option<Duration>,
    ) -> Pin<Box<dyn Send + Future<Output = Result<Self::Tcp, io::Error>>>> {
        if bind_addr.is_some() || self.mark == 0 {
            return self.inner.connect_tcp(server_addr, bind_addr, timeout);
        }
        let mark = self.mark;
        Box::pin(async move {
            let stream =
                connect_bypassing(server_addr, mark, timeout.unwrap_or(CONNECT_TIMEOUT)).await?;
            Ok(AsyncIoTokioAsStd(stream))
        })
    }

    fn bind_udp(
        &self,
        local_addr: SocketAddr,
        server_addr: SocketAddr,
    ) -> Pin<Box<dyn Send + Future<Output = Result<Self::Udp, io::Error>>>> {
        let bound = self.inner.bind_udp(local_addr, server_addr);
        let mark = self.mark;
        Box::pin(async move {
            let socket = bound.await?;
            // Before the first send, which is where sendmsg4/6 look at it.
            if mark != 0 {
                setsockopt(&socket.as_fd(), sockopt::Mark, &mark)?;
            }
            Ok(socket)
        })
    }
}
