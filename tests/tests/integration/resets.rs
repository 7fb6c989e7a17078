//! Failure transparency: a reset on one side of a proxied connection is a reset on
//! the other, and a clean close stays clean, in both copy modes.

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::mpsc,
    time::Duration,
};

use integration_tests::{
    Daemon, Sandbox,
    admin::{ADMIN, scrape_until},
    server::{connect, write_pattern},
    vip_entry,
};

const BACKEND: &str = "198.18.20.1:7000";
const VIP: &str = "240.240.20.1:7000";
/// More than one read of the proxy's, so splice mode moves it through a pipe.
const BYTES: usize = 100 * 1024;

/// What the backend saw of the client: the bytes after the command line, and how the
/// stream ended.
type Seen = (Vec<u8>, Result<(), ErrorKind>);

/// A backend that serves one connection at a time. The client's first line says what
/// to do:
/// - `RESET <n>`: send `n` bytes, then reset;
/// - `READ`: read to the end and report what came and how it ended;
/// - `CLOSE <n>`: send `n` bytes, then close cleanly;
/// - `REPLY <n>`: read to EOF and report it, then send `n` bytes and close cleanly.
fn start_backend() -> mpsc::Receiver<Seen> {
    let listener = TcpListener::bind(BACKEND).unwrap_or_else(|e| panic!("bind {BACKEND}: {e}"));
    let (report, seen) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let stream = stream.expect("accept");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            serve(stream, &report);
        }
    });
    seen
}

fn serve(stream: TcpStream, report: &mpsc::Sender<Seen>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut command = String::new();
    reader.read_line(&mut command).expect("the command line");
    let mut writer = stream;
    match command.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["RESET", bytes] => {
            write_pattern(&mut writer, bytes.parse().unwrap()).unwrap();
            abort(writer);
        }
        ["READ"] => report.send(read_until_the_end(&mut reader)).unwrap(),
        ["CLOSE", bytes] => {
            write_pattern(&mut writer, bytes.parse().unwrap()).unwrap();
            writer.shutdown(Shutdown::Write).unwrap();
            // Nothing more comes; waiting for the client's FIN keeps unread data from
            // turning this close into a reset.
            let _ = read_until_the_end(&mut reader);
        }
        ["REPLY", bytes] => {
            report.send(read_until_the_end(&mut reader)).unwrap();
            write_pattern(&mut writer, bytes.parse().unwrap()).unwrap();
        }
        other => panic!("unknown command {other:?}"),
    }
}

/// Reads until the stream ends: what came, and how it ended.
fn read_until_the_end(stream: &mut impl std::io::Read) -> Seen {
    let mut received = Vec::new();
    let mut chunk = vec![0; 64 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return (received, Ok(())),
            Ok(read) => received.extend_from_slice(&chunk[..read]),
            Err(error) => return (received, Err(error.kind())),
        }
    }
}

/// Closes with a reset once the peer has acknowledged everything written, as a
/// process that aborts its connection after sending does: connected directly, the
/// peer would read every byte and then get ECONNRESET.
fn abort(stream: TcpStream) {
    let fd = stream.as_raw_fd();
    for _ in 0..1000 {
        let mut unacknowledged: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ's number) writes one int.
        let result = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut unacknowledged) };
        assert_eq!(result, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
        if unacknowledged == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: SO_LINGER reads one linger struct.
    let result = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(result, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(stream);
}

fn assert_pattern(received: &[u8], what: &str) {
    let mut expected = Vec::new();
    write_pattern(&mut expected, BYTES).unwrap();
    assert!(
        received == expected,
        "{what}: {} of {BYTES} bytes, or damaged",
        received.len()
    );
}

/// A backend behind a VIP, and a daemon in `copy_mode` in front of it.
struct Setup {
    daemon: Daemon,
    /// What the backend saw of `READ` and `REPLY` clients.
    seen: mpsc::Receiver<Seen>,
    // Last: the daemon stops before its sandbox goes.
    _sandbox: Sandbox,
}

fn setup(scenario: &str, copy_mode: &str) -> Setup {
    let sandbox = Sandbox::new(&format!("{scenario}-{copy_mode}"));
    sandbox.add_hosts(&["198.18.20.1"]);
    let seen = start_backend();
    let daemon = sandbox.start_daemon(
        &vip_entry("resets", "backend", "240.240.20.1", "198.18.20.1"),
        &["--copy-mode", copy_mode, "--admin-addr", ADMIN],
    );
    Setup {
        daemon,
        seen,
        _sandbox: sandbox,
    }
}

impl Setup {
    /// What the backend saw of the one client that asked it to report.
    fn seen(&self) -> Seen {
        self.seen
            .recv_timeout(Duration::from_secs(15))
            .expect("the backend's report")
    }

    /// The one connection so far closed as `close` (`<side>_<how>`): the metrics
    /// count it under its side and kind, and its closing line names it.
    fn assert_closed_as(&self, side: &str, how: &str) {
        let metrics = scrape_until(Duration::from_secs(10), |scrape| {
            scrape.value("interceptor_connections_closed_total", &[]) == Some(1.0)
        });
        assert_eq!(
            metrics.value(
                "interceptor_connections_closed_total",
                &[("side", side), ("how", how)]
            ),
            Some(1.0),
            "{:#?}",
            metrics.samples
        );
        let logs = self.daemon.wait_for_log("connection closed", 1);
        let close = format!("close={side}_{how}");
        assert!(
            logs.lines()
                .any(|line| line.contains("connection closed") && line.contains(&close)),
            "no closing line with {close}:\n{logs}"
        );
    }
}

/// The backend sends and then resets: the client reads every byte, then the reset.
fn upstream_reset_after_bytes(copy_mode: &str) {
    let setup = setup("upstream-reset", copy_mode);
    let mut client = connect(VIP).unwrap();
    writeln!(client, "RESET {BYTES}").unwrap();
    let (received, end) = read_until_the_end(&mut client);
    assert_pattern(&received, "the response before the backend's reset");
    assert_eq!(
        end,
        Err(ErrorKind::ConnectionReset),
        "the backend's reset reached the client as"
    );
    setup.assert_closed_as("upstream", "reset");
}

/// The client sends and then resets: the backend reads every byte, then the reset.
fn client_reset_after_bytes(copy_mode: &str) {
    let setup = setup("client-reset", copy_mode);
    let mut client = connect(VIP).unwrap();
    writeln!(client, "READ").unwrap();
    write_pattern(&mut client, BYTES).unwrap();
    abort(client);
    let (received, end) = setup.seen();
    assert_pattern(&received, "the upload before the client's reset");
    assert_eq!(
        end,
        Err(ErrorKind::ConnectionReset),
        "the client's reset reached the backend as"
    );
    setup.assert_closed_as("client", "reset");
}

/// The backend sends and closes cleanly: the client reads every byte and a clean EOF.
fn upstream_fin_after_bytes(copy_mode: &str) {
    let setup = setup("upstream-fin", copy_mode);
    let mut client = connect(VIP).unwrap();
    writeln!(client, "CLOSE {BYTES}").unwrap();
    let (received, end) = read_until_the_end(&mut client);
    assert_pattern(&received, "the response before the backend's FIN");
    assert_eq!(end, Ok(()), "the backend's FIN reached the client as");
    drop(client);
    setup.assert_closed_as("upstream", "fin");
}

/// The client half-closes, then the backend replies: the reply arrives in full and
/// ends with a clean EOF.
fn reply_after_client_half_close(copy_mode: &str) {
    let setup = setup("half-close", copy_mode);
    let mut client = connect(VIP).unwrap();
    writeln!(client, "REPLY {BYTES}").unwrap();
    client.write_all(b"request").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (request, end) = setup.seen();
    assert_eq!((request.as_slice(), end), (&b"request"[..], Ok(())));
    let (received, end) = read_until_the_end(&mut client);
    assert_pattern(&received, "the reply after the client's half-close");
    assert_eq!(end, Ok(()), "the reply ended as");
    drop(client);
    setup.assert_closed_as("client", "fin");
}

/// A test per copy mode for each scenario: `resets::<scenario>::<mode>`.
macro_rules! in_both_copy_modes {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[test]
                fn splice() {
                    super::$scenario("splice");
                }

                #[test]
                fn userspace() {
                    super::$scenario("userspace");
                }
            }
        )*
    };
}

in_both_copy_modes!(
    upstream_reset_after_bytes,
    client_reset_after_bytes,
    upstream_fin_after_bytes,
    reply_after_client_half_close,
);
