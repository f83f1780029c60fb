//! Where qx-node's gRPC API listens, and who may reach it.
//!
//! Whoever drives the API is root on every VM of the node, so the listener is least
//! privilege by default: a unix socket (mode 0660, group configurable) whose peers' credentials
//! are checked on every connection. TCP needs TLS; anything beyond loopback needs mutual TLS
//! (a client CA). Otherwise the daemon refuses to start and says why, unless the operator
//! passes `--insecure-listen`, which is logged loudly. See docs/security.md.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};

/// Mode of the unix socket: owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;

/// HTTP/2 flow-control window of one gRPC stream: what a client may send ahead of what the
/// handler has taken.
pub const STREAM_WINDOW_BYTES: u32 = 1 << 20;
/// Window of a whole gRPC connection, shared by its streams. Larger than a stream's: an upload
/// whose handler waits (its agent is slow or stalled) fills its own window, and the rest of
/// the connection stays open to other calls. With equal windows, one stalled upload held every
/// other call on its connection until the upload ended.
pub const CONNECTION_WINDOW_BYTES: u32 = 8 * STREAM_WINDOW_BYTES;

/// The gRPC server every listener of qx-node is built from.
pub fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
}

/// A listen address: `unix:/path` (or an absolute path) or `IP:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            return if path.starts_with('/') {
                Ok(Endpoint::Unix(PathBuf::from(path)))
            } else {
                Err(format!(
                    "listen address {s:?}: a unix socket path must be absolute"
                ))
            };
        }
        if s.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        s.parse()
            .map(Endpoint::Tcp)
            .map_err(|_| format!("listen address {s:?} is neither unix:/PATH nor IP:PORT"))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// What protects a TCP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    None,
    /// Server TLS: the channel is private, any client is admitted.
    Tls,
    /// Mutual TLS: only clients with a certificate from the client CA are admitted.
    MutualTls,
}

/// The listen policy. `Ok(None)`: allowed; `Ok(Some(warning))`: allowed only because of
/// `insecure`, and the warning must be logged loudly; `Err(why)`: refused, in one sentence.
pub fn check(
    ep: &Endpoint,
    protection: Protection,
    insecure: bool,
) -> Result<Option<String>, String> {
    let Endpoint::Tcp(addr) = ep else {
        return Ok(None);
    };
    let why = if addr.ip().is_loopback() {
        (protection == Protection::None).then(|| {
            format!(
                "qx-node refuses to listen on {addr} without TLS: any local user could drive \
                 every VM as root; listen on a unix socket (the default), give --tls-cert and \
                 --tls-key, or pass --insecure-listen to accept the risk"
            )
        })
    } else {
        (protection != Protection::MutualTls).then(|| {
            format!(
                "qx-node refuses to listen on {addr} without mutual TLS: anyone who can reach \
                 it would drive every VM as root; give --tls-cert, --tls-key and \
                 --tls-client-ca, or pass --insecure-listen to accept the risk"
            )
        })
    };
    match why {
        None => Ok(None),
        Some(why) if insecure => Ok(Some(format!("INSECURE LISTEN (--insecure-listen): {why}"))),
        Some(why) => Err(why),
    }
}

/// Binds the unix socket at `path`: creates its directory, replaces a stale socket (never
/// another kind of file, never a socket someone still serves), sets mode 0660 and, when
/// given, the group.
pub async fn bind_unix(path: &Path, group: Option<u32>) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(format!(
                    "{} is served by another process (another qx-node?)",
                    path.display()
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
        }
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket; not replacing it",
                path.display()
            ))
        }
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| format!("cannot give {} to group {gid}: {e}", path.display()))?;
    }
    Ok(listener)
}

/// The group id of `name` (or of a numeric id).
pub fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot read /etc/group: {e}"))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let (n, _, gid) = (f.next()?, f.next()?, f.next()?);
            (n == name).then(|| gid.parse().ok()).flatten()
        })
        .next()
        .ok_or_else(|| format!("no group named {name:?}"))
}

/// Who connected: uid, gid and pid from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// The peer-credential check: root, the daemon's own user, or a member (primary or
/// supplementary, read from `/proc/<pid>/status`) of the socket's group.
pub fn peer_allowed(peer: Peer, own_uid: u32, group: Option<u32>) -> bool {
    if peer.uid == 0 || peer.uid == own_uid {
        return true;
    }
    let Some(gid) = group else { return false };
    peer.gid == gid
        || peer
            .pid
            .is_some_and(|pid| supplementary_groups(pid).contains(&gid))
}

fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// The accepted connections of `listener` whose peers pass [`peer_allowed`]; others are
/// logged and closed.
pub fn checked_incoming(
    listener: UnixListener,
    group: Option<u32>,
) -> impl Stream<Item = std::io::Result<UnixStream>> {
    let own_uid = effective_uid();
    UnixListenerStream::new(listener).filter(move |conn| {
        let Ok(stream) = conn else { return true };
        match stream.peer_cred() {
            Ok(c) => {
                let peer = Peer {
                    uid: c.uid(),
                    gid: c.gid(),
                    pid: c.pid(),
                };
                let ok = peer_allowed(peer, own_uid, group);
                if !ok {
                    log::warn!(
                        "refused a connection from uid {} gid {} pid {:?}: not root, not qx-node's user, not in the socket's group",
                        peer.uid,
                        peer.gid,
                        peer.pid
                    );
                }
                ok
            }
            Err(e) => {
                log::warn!("refused a connection whose credentials cannot be read: {e}");
                false
            }
        }
    })
}

#[allow(unsafe_code)]
fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tcp(s: &str) -> Endpoint {
        Endpoint::parse(s).unwrap()
    }

    #[test]
    fn addresses_parse_as_unix_or_tcp() {
        assert_eq!(
            tcp("unix:/run/x.sock"),
            Endpoint::Unix("/run/x.sock".into())
        );
        assert_eq!(tcp("/run/x.sock"), Endpoint::Unix("/run/x.sock".into()));
        assert_eq!(
            tcp("127.0.0.1:9090"),
            Endpoint::Tcp("127.0.0.1:9090".parse().unwrap())
        );
        assert!(Endpoint::parse("unix:rel.sock").is_err());
        assert!(Endpoint::parse("localhost:9090").is_err());
    }

    #[test]
    fn tcp_needs_tls_and_beyond_loopback_mutual_tls() {
        use Protection::*;
        let unix = tcp("unix:/run/x.sock");
        assert_eq!(check(&unix, None, false), Ok(Option::None));
        let lo = tcp("127.0.0.1:9090");
        let lo6 = tcp("[::1]:9090");
        let any = tcp("0.0.0.0:9090");
        let lan = tcp("192.168.1.10:9090");
        for ep in [&lo, &lo6] {
            assert!(check(ep, None, false).unwrap_err().contains("without TLS"));
            assert_eq!(check(ep, Tls, false), Ok(Option::None));
        }
        for ep in [&any, &lan] {
            assert!(check(ep, None, false).unwrap_err().contains("mutual TLS"));
            assert!(check(ep, Tls, false).unwrap_err().contains("mutual TLS"));
            assert_eq!(check(ep, MutualTls, false), Ok(Option::None));
            assert!(check(ep, Tls, true).unwrap().unwrap().contains("INSECURE"));
        }
    }

    #[test]
    fn peers_are_root_our_user_or_the_socket_group() {
        let p = |uid, gid| Peer {
            uid,
            gid,
            pid: Option::None,
        };
        assert!(peer_allowed(p(0, 0), 1000, None));
        assert!(peer_allowed(p(1000, 1000), 1000, None));
        assert!(!peer_allowed(p(1001, 1001), 1000, None));
        assert!(peer_allowed(p(1001, 50), 1000, Some(50)));
        assert!(!peer_allowed(p(1001, 51), 1000, Some(50)));
        // Supplementary groups come from /proc: this process's own.
        let me = Peer {
            uid: 4242,
            gid: 4242,
            pid: Some(std::process::id() as i32),
        };
        let mine = supplementary_groups(me.pid.unwrap());
        if let Some(g) = mine.first() {
            assert!(peer_allowed(me, 1000, Some(*g)));
        }
    }
}
