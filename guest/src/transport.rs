//! The byte pipe to the host: the virtio-serial port, or a unix socket (`--connect`).
//!
//! A port is opened once and kept open: whether a host is attached is read from the port
//! itself (read() returning 0 means no host; `EAGAIN` means a host is attached and quiet).
//! With edge-triggered epoll the host-less port reports IN|HUP once, not in a loop, and the
//! next wake-up is the host connecting (OUT). A port that does not exist yet is retried from
//! the loop's deadline queue, [`PORT_RETRY_MIN`] doubling to [`PORT_RETRY`]: no spin, no
//! giving up.
//!
//! A unix socket is a connection: EOF or an error closes it (host absent) and it is
//! reconnected with a capped exponential back-off.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::net::UnixStream;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

/// First and largest retry delays while the port does not exist or cannot be opened: the
/// port appears asynchronously after virtio_console loads, so the first retries are quick.
pub const PORT_RETRY_MIN: Duration = Duration::from_millis(10);
pub const PORT_RETRY: Duration = Duration::from_secs(1);
/// First and largest unix-socket reconnect delays.
pub const SOCKET_RETRY_MIN: Duration = Duration::from_millis(50);
pub const SOCKET_RETRY_MAX: Duration = Duration::from_secs(2);

/// Where the host is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A virtio-serial port; `explicit` when given by `--device` (then no discovery);
    /// otherwise a missing `path` is looked up as the `/dev/vportNpM` named `name`.
    Device {
        path: PathBuf,
        explicit: bool,
        name: &'static str,
    },
    /// A unix stream socket.
    Unix(PathBuf),
}

#[derive(Debug)]
enum Conn {
    Port(File),
    Sock(UnixStream),
}

impl Conn {
    fn fd(&self) -> i32 {
        match self {
            Conn::Port(f) => f.as_raw_fd(),
            Conn::Sock(s) => s.as_raw_fd(),
        }
    }
}

/// The transport and its reconnect schedule.
#[derive(Debug)]
pub struct Transport {
    endpoint: Endpoint,
    conn: Option<Conn>,
    interest: Option<Interest>,
    retry_at: Option<Instant>,
    backoff: Duration,
    open_failures: u64,
}

impl Transport {
    pub fn new(endpoint: Endpoint) -> Self {
        let backoff = first_retry(&endpoint);
        Transport {
            endpoint,
            conn: None,
            interest: None,
            retry_at: Some(Instant::now()),
            backoff,
            open_failures: 0,
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn is_open(&self) -> bool {
        self.conn.is_some()
    }

    pub fn is_socket(&self) -> bool {
        matches!(self.endpoint, Endpoint::Unix(_))
    }

    /// When the loop must call [`Transport::try_open`] again.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.conn.is_some() {
            None
        } else {
            self.retry_at
        }
    }

    /// Opens the port or connects the socket when due. `Ok(true)` when it just opened; for a
    /// socket that also means a host is attached.
    pub fn try_open(&mut self, registry: &Registry, token: Token, now: Instant) -> bool {
        if self.conn.is_some() || self.retry_at.is_some_and(|t| now < t) {
            return false;
        }
        let opened = match &self.endpoint {
            Endpoint::Device {
                path,
                explicit,
                name,
            } => open_port(path, *explicit, name).map(Conn::Port),
            // Non-blocking: a listener with a full backlog is a retry, never a stalled loop.
            Endpoint::Unix(path) => UnixStream::connect(path).map(Conn::Sock),
        };
        match opened {
            Ok(conn) => {
                let interest = Interest::READABLE | Interest::WRITABLE;
                if let Err(e) = registry.register(&mut SourceFd(&conn.fd()), token, interest) {
                    log::error!("cannot watch the transport: {e}");
                    self.schedule_retry(now);
                    return false;
                }
                if self.open_failures > 0 {
                    log::info!("transport open after {} attempts", self.open_failures + 1);
                }
                self.open_failures = 0;
                self.backoff = self.first_retry();
                self.interest = Some(interest);
                self.conn = Some(conn);
                self.retry_at = None;
                true
            }
            Err(e) => {
                // One line at the first failure, then one every 60 attempts.
                if self.open_failures.is_multiple_of(60) {
                    log::warn!("{}: {e}; retrying", self.describe());
                }
                self.open_failures += 1;
                self.schedule_retry(now);
                false
            }
        }
    }

    fn first_retry(&self) -> Duration {
        first_retry(&self.endpoint)
    }

    fn schedule_retry(&mut self, now: Instant) {
        let max = match self.endpoint {
            Endpoint::Device { .. } => PORT_RETRY,
            Endpoint::Unix(_) => SOCKET_RETRY_MAX,
        };
        let delay = self.backoff.min(max);
        self.backoff = (self.backoff * 2).min(max);
        self.retry_at = Some(now + delay);
    }

    /// Closes a socket after EOF/error and schedules the reconnect. A port stays open.
    pub fn host_gone(&mut self, registry: &Registry, now: Instant) {
        if let Some(Conn::Sock(s)) = &self.conn {
            let _ = registry.deregister(&mut SourceFd(&s.as_raw_fd()));
            self.conn = None;
            self.interest = None;
            self.schedule_retry(now);
        }
    }

    /// Closes the transport after an I/O error (a port that was hot-unplugged, a broken
    /// socket) and schedules a reopen.
    pub fn reset(&mut self, registry: &Registry, now: Instant) {
        if let Some(conn) = self.conn.take() {
            let _ = registry.deregister(&mut SourceFd(&conn.fd()));
            self.interest = None;
            self.schedule_retry(now);
        }
    }

    /// Re-arms the registration when the wanted interest changed.
    pub fn set_interest(&mut self, registry: &Registry, token: Token, want_write: bool) {
        let Some(conn) = &self.conn else { return };
        let want = if want_write {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        if self.interest != Some(want) {
            match registry.reregister(&mut SourceFd(&conn.fd()), token, want) {
                Ok(()) => self.interest = Some(want),
                Err(e) => log::error!("cannot re-arm the transport: {e}"),
            }
        }
    }

    /// One read() into `buf`.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.conn {
            Some(Conn::Port(f)) => f.read(buf),
            Some(Conn::Sock(s)) => s.read(buf),
            None => Ok(0),
        }
    }

    fn describe(&self) -> String {
        match &self.endpoint {
            Endpoint::Device { path, .. } => format!("port {}", path.display()),
            Endpoint::Unix(path) => format!("socket {}", path.display()),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.conn {
            Some(Conn::Port(f)) => f.write(buf),
            Some(Conn::Sock(s)) => s.write(buf),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn first_retry(endpoint: &Endpoint) -> Duration {
    match endpoint {
        Endpoint::Device { .. } => PORT_RETRY_MIN,
        Endpoint::Unix(_) => SOCKET_RETRY_MIN,
    }
}

/// Opens the port at `path`, or (unless `explicit`) the `/dev/vportNpM` whose sysfs name is
/// `name` (e.g. [`crate::config::PORT_NAME`]) when no udev made the symlink.
fn open_port(path: &Path, explicit: bool, name: &str) -> io::Result<File> {
    let open = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(p)
    };
    match open(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound && !explicit => match find_vport(name) {
            Some(dev) => open(&dev),
            None => Err(e),
        },
        other => other,
    }
}

/// The `/dev/vportNpM` named `port_name` in /sys/class/virtio-ports.
pub fn find_vport(port_name: &str) -> Option<PathBuf> {
    let dir = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for entry in dir.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == port_name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}
