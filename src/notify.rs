//! systemd's readiness notifications (sd_notify(3)) for `Type=notify`: READY=1 once every
//! listener is up, RELOADING=1 then READY=1 around a SIGHUP reload, STOPPING=1 at shutdown,
//! each with a STATUS= line `systemctl status` shows. Without $NOTIFY_SOCKET, nothing is sent.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use tracing::{debug, warn};

#[derive(Debug)]
pub struct Notifier {
    to: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// The socket systemd named in $NOTIFY_SOCKET: a path, or `@name` in the abstract namespace.
    pub fn from_env() -> Notifier {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else { return Notifier { to: None } };
        let name = name.to_string_lossy().into_owned();
        let addr = match name.strip_prefix('@') {
            Some(abs) => SocketAddr::from_abstract_name(abs.as_bytes()),
            None => SocketAddr::from_pathname(&name),
        };
        match (UnixDatagram::unbound(), addr) {
            (Ok(sock), Ok(addr)) => Notifier { to: Some((sock, addr)) },
            (Err(e), _) | (_, Err(e)) => {
                warn!("NOTIFY_SOCKET={name}: {e}; systemd will not hear that the target is ready");
                Notifier { to: None }
            }
        }
    }

    /// Sends `state` (newline-separated assignments); a failure is logged, never fatal.
    pub fn send(&self, state: &str) {
        let Some((sock, addr)) = &self.to else { return };
        match sock.send_to_addr(state.as_bytes(), addr) {
            Ok(_) => debug!(state, "notified systemd"),
            Err(e) => warn!("notifying systemd ({state:?}): {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_the_named_socket_path() {
        let dir = std::env::temp_dir().join(format!("p2pnvmf-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier { to: Some((UnixDatagram::unbound().unwrap(), SocketAddr::from_pathname(&path).unwrap())) };
        n.send("READY=1\nSTATUS=serving");
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
