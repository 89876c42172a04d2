//! The RDMA CM listener: its id and event channel, and connect events copied out of
//! librdmacm.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;

use tokio::io::unix::AsyncFd;

use super::sockaddr;
use super::sys::{self, Api};

/// A raw fd to register with tokio (owned elsewhere).
pub(super) struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The listening CM id and its event channel.
pub struct Listener {
    pub(super) api: &'static Api,
    channel: *mut sys::RdmaEventChannel,
    pub(super) id: *mut sys::RdmaCmId,
}

// SAFETY: the handles are only used from the task that owns the Listener.
unsafe impl Send for Listener {}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").field("id", &self.id).finish()
    }
}

impl Listener {
    /// Binds and listens on `addr` (an address of an RDMA-capable interface).
    pub fn bind(addr: SocketAddr) -> io::Result<Listener> {
        let api = sys::api().map_err(io::Error::other)?;
        // SAFETY: plain constructor; NULL is checked.
        let channel = sys::check_ptr("rdma_create_event_channel", unsafe { (api.rdma_create_event_channel)() })?;
        let mut l = Listener { api, channel, id: ptr::null_mut() };
        // SAFETY: `channel` is valid; `l.id` receives the new id.
        sys::check("rdma_create_id", unsafe {
            (api.rdma_create_id)(channel, &mut l.id, ptr::null_mut(), sys::RDMA_PS_TCP)
        })?;
        let sin = sockaddr(addr)?;
        // SAFETY: `sin` is a valid sockaddr_in for the duration of the call.
        sys::check(&format!("rdma_bind_addr {addr}"), unsafe {
            (api.rdma_bind_addr)(l.id, (&sin as *const libc::sockaddr_in).cast())
        })?;
        // SAFETY: bound id.
        sys::check("rdma_listen", unsafe { (api.rdma_listen)(l.id, 128) })?;
        // SAFETY: `channel` stays valid while the Listener lives.
        sys::set_nonblocking(unsafe { (*channel).fd })?;
        Ok(l)
    }

    pub(super) fn fd(&self) -> RawFd {
        // SAFETY: the channel lives as long as self.
        unsafe { (*self.channel).fd }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // SAFETY: every child id was destroyed by its connection before this runs.
        unsafe {
            if !self.id.is_null() {
                (self.api.rdma_destroy_id)(self.id);
            }
            (self.api.rdma_destroy_event_channel)(self.channel);
        }
    }
}

/// A CM event copied out of librdmacm (and acknowledged).
pub(super) struct Event {
    pub kind: u32,
    pub status: i32,
    pub id: *mut sys::RdmaCmId,
    pub private: Vec<u8>,
    /// The host's address (connect requests).
    pub peer: Option<SocketAddr>,
    pub initiator_depth: u8,
    pub responder_resources: u8,
}

pub(super) fn next_event(l: &Listener) -> Option<Event> {
    let mut ev: *mut sys::RdmaCmEvent = ptr::null_mut();
    // SAFETY: non-blocking channel; on success `ev` points to an event we must ack.
    if unsafe { (l.api.rdma_get_cm_event)(l.channel, &mut ev) } != 0 {
        return None;
    }
    // SAFETY: `ev` is valid until acked; private data and the id's route address (the id
    // lives on: a connect request's id is the new connection's) are copied before the ack.
    let e = unsafe {
        let r = &*ev;
        let private = if r.conn.private_data.is_null() {
            Vec::new()
        } else {
            std::slice::from_raw_parts(r.conn.private_data.cast::<u8>(), usize::from(r.conn.private_data_len)).to_vec()
        };
        let e = Event {
            kind: r.event,
            status: r.status,
            id: r.id,
            // A connect request's id routes to the host: its destination is the host's address.
            peer: if r.id.is_null() { None } else { sys::socket_addr(&(*r.id).dst_addr) },
            private,
            initiator_depth: r.conn.initiator_depth,
            responder_resources: r.conn.responder_resources,
        };
        (l.api.rdma_ack_cm_event)(ev);
        e
    };
    Some(e)
}

/// Registers a descriptor owned by a live object with tokio.
///
/// # Safety
/// The descriptor must stay open until the returned `AsyncFd` is dropped.
pub(super) unsafe fn watch(fd: RawFd) -> io::Result<AsyncFd<Fd>> {
    // SAFETY: the caller keeps the descriptor open for the registration's lifetime.
    unsafe { AsyncFd::register(Fd(fd)) }.map_err(|e| e.into_parts().1)
}
