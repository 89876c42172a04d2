//! The verbs and RDMA CM subset we use, declared by hand and loaded at run time from
//! libibverbs.so.1 and librdmacm.so.1, so the binary builds and starts anywhere. Layouts follow
//! rdma-core's headers (checked against the installed ones by `tests/rdma_layout.rs`); every
//! unsafe call lives here behind a small safe-ish wrapper.

use std::ffi::{c_int, c_uint, c_void};
use std::io;
use std::sync::OnceLock;

use libloading::Library;

/// Opaque handles.
#[repr(C)]
#[derive(Debug)]
pub struct IbvPd {
    _p: [u8; 0],
}

#[repr(C)]
#[derive(Debug)]
pub struct IbvCq {
    _p: [u8; 0],
}

#[repr(C)]
#[derive(Debug)]
pub struct IbvSrq {
    _p: [u8; 0],
}

#[repr(C)]
#[derive(Debug)]
pub struct RdmaEventChannel {
    pub fd: c_int,
}

/// `struct ibv_comp_channel`.
#[repr(C)]
#[derive(Debug)]
pub struct IbvCompChannel {
    pub context: *mut IbvContext,
    pub fd: c_int,
    pub refcnt: c_int,
}

pub type PollCq = unsafe extern "C" fn(*mut IbvCq, c_int, *mut IbvWc) -> c_int;
type ReqNotifyCq = unsafe extern "C" fn(*mut IbvCq, c_int) -> c_int;
type PostSend = unsafe extern "C" fn(*mut IbvQp, *mut IbvSendWr, *mut *mut IbvSendWr) -> c_int;
type PostRecv = unsafe extern "C" fn(*mut IbvQp, *mut IbvRecvWr, *mut *mut IbvRecvWr) -> c_int;
type PostSrqRecv = unsafe extern "C" fn(*mut IbvSrq, *mut IbvRecvWr, *mut *mut IbvRecvWr) -> c_int;

/// The head of `struct ibv_context` through the data-path entries of `ops` (which verbs.h
/// calls through as static inlines: poll_cq at 96, req_notify_cq 104, post_srq_recv 168,
/// post_send 208, post_recv 216).
#[repr(C)]
#[derive(Debug)]
pub struct IbvContext {
    pub device: *mut c_void,
    pub ops_head: [*mut c_void; 11],
    pub poll_cq: Option<PollCq>,
    pub req_notify_cq: Option<ReqNotifyCq>,
    pub ops_mid1: [*mut c_void; 7],
    pub post_srq_recv: Option<PostSrqRecv>,
    pub ops_mid2: [*mut c_void; 4],
    pub post_send: Option<PostSend>,
    pub post_recv: Option<PostRecv>,
}

/// The head of `struct ibv_qp`.
#[repr(C)]
#[derive(Debug)]
pub struct IbvQp {
    pub context: *mut IbvContext,
    pub qp_context: *mut c_void,
    pub pd: *mut IbvPd,
    pub send_cq: *mut IbvCq,
    pub recv_cq: *mut IbvCq,
    pub srq: *mut IbvSrq,
    pub handle: u32,
    pub qp_num: u32,
}

/// `struct ibv_mr`.
#[repr(C)]
#[derive(Debug)]
pub struct IbvMr {
    pub context: *mut IbvContext,
    pub pd: *mut IbvPd,
    pub addr: *mut c_void,
    pub length: usize,
    pub handle: u32,
    pub lkey: u32,
    pub rkey: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IbvSge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

/// `struct ibv_send_wr` (128 bytes); `rdma_*` is the `wr.rdma` member of the union.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvSendWr {
    pub wr_id: u64,
    pub next: *mut IbvSendWr,
    pub sg_list: *mut IbvSge,
    pub num_sge: c_int,
    pub opcode: c_uint,
    pub send_flags: c_uint,
    pub invalidate_rkey: u32,
    pub rdma_remote_addr: u64,
    pub rdma_rkey: u32,
    pub rest: [u8; 76],
}

/// `struct ibv_recv_wr`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvRecvWr {
    pub wr_id: u64,
    pub next: *mut IbvRecvWr,
    pub sg_list: *mut IbvSge,
    pub num_sge: c_int,
}

/// `struct ibv_wc` (48 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IbvWc {
    pub wr_id: u64,
    pub status: c_uint,
    pub opcode: c_uint,
    pub vendor_err: u32,
    pub byte_len: u32,
    pub imm_or_inv: u32,
    pub qp_num: u32,
    pub src_qp: u32,
    pub wc_flags: c_uint,
    pub pkey_index: u16,
    pub slid: u16,
    pub sl: u8,
    pub dlid_path_bits: u8,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IbvQpCap {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

/// `struct ibv_srq_init_attr` (24 bytes): context, then `struct ibv_srq_attr`.
#[repr(C)]
#[derive(Debug)]
pub struct IbvSrqInitAttr {
    pub srq_context: *mut c_void,
    pub max_wr: u32,
    pub max_sge: u32,
    pub srq_limit: u32,
}

/// `struct ibv_qp_init_attr` (64 bytes).
#[repr(C)]
#[derive(Debug)]
pub struct IbvQpInitAttr {
    pub qp_context: *mut c_void,
    pub send_cq: *mut IbvCq,
    pub recv_cq: *mut IbvCq,
    pub srq: *mut IbvSrq,
    pub cap: IbvQpCap,
    pub qp_type: c_uint,
    pub sq_sig_all: c_int,
}

/// `struct ibv_device_attr` (232 bytes): only the limits we negotiate against are named.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IbvDeviceAttr {
    pub head: [u8; 112],
    pub max_qp_wr: c_int,
    pub _r0: c_int,
    pub max_sge: c_int,
    pub _r1: [c_int; 2],
    pub max_cqe: c_int,
    pub _r2: [c_int; 2],
    pub max_qp_rd_atom: c_int,
    pub _r3: [c_int; 2],
    pub max_qp_init_rd_atom: c_int,
    pub tail: [u8; 72],
}

/// `struct rdma_conn_param` (24 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RdmaConnParam {
    pub private_data: *const c_void,
    pub private_data_len: u8,
    pub responder_resources: u8,
    pub initiator_depth: u8,
    pub flow_control: u8,
    pub retry_count: u8,
    pub rnr_retry_count: u8,
    pub srq: u8,
    pub qp_num: u32,
}

/// The head of `struct rdma_cm_id`, through its route's addresses (`route.addr`'s source and
/// destination unions, each as large as a `sockaddr_storage`).
#[repr(C)]
pub struct RdmaCmId {
    pub verbs: *mut IbvContext,
    pub channel: *mut RdmaEventChannel,
    pub context: *mut c_void,
    pub qp: *mut IbvQp,
    pub src_addr: libc::sockaddr_storage,
    pub dst_addr: libc::sockaddr_storage,
}

/// The IPv4 or IPv6 address in `ss`, if it holds one.
pub fn socket_addr(ss: &libc::sockaddr_storage) -> Option<std::net::SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says a sockaddr_in is stored; sockaddr_storage is larger and
            // at least as aligned.
            let sin = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()), u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for a sockaddr_in6.
            let sin6 = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::from((Ipv6Addr::from(sin6.sin6_addr.s6_addr), u16::from_be(sin6.sin6_port))))
        }
        _ => None,
    }
}

impl std::fmt::Debug for RdmaCmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaCmId").field("verbs", &self.verbs).field("qp", &self.qp).finish_non_exhaustive()
    }
}

/// The head of `struct rdma_cm_event` (the `ud` arm of `param` is never read).
#[repr(C)]
#[derive(Debug)]
pub struct RdmaCmEvent {
    pub id: *mut RdmaCmId,
    pub listen_id: *mut RdmaCmId,
    pub event: c_uint,
    pub status: c_int,
    pub conn: RdmaConnParam,
}

pub mod cm_event {
    pub const ADDR_RESOLVED: u32 = 0;
    pub const ROUTE_RESOLVED: u32 = 2;
    pub const CONNECT_REQUEST: u32 = 4;
    pub const REJECTED: u32 = 8;
    pub const CONNECT_ERROR: u32 = 6;
    pub const ESTABLISHED: u32 = 9;
    pub const DISCONNECTED: u32 = 10;
    pub const DEVICE_REMOVAL: u32 = 11;
    pub const TIMEWAIT_EXIT: u32 = 15;
}

pub const RDMA_PS_TCP: c_int = 0x0106;
pub const IBV_QPT_RC: c_uint = 2;
pub mod wr_opcode {
    pub const RDMA_WRITE: u32 = 0;
    pub const SEND: u32 = 2;
    pub const RDMA_READ: u32 = 4;
    pub const SEND_WITH_INV: u32 = 9;
}
pub const IBV_SEND_SIGNALED: u32 = 1 << 1;
pub const IBV_WC_SUCCESS: u32 = 0;
pub const IBV_WC_WR_FLUSH_ERR: u32 = 5;
pub const IBV_WC_RECV: u32 = 1 << 7;
pub const IBV_ACCESS_LOCAL_WRITE: c_int = 1;
pub const IBV_ACCESS_REMOTE_WRITE: c_int = 1 << 1;
pub const IBV_ACCESS_REMOTE_READ: c_int = 1 << 2;

/// `ibv_reg_dmabuf_mr(pd, offset, length, iova, fd, access)`.
pub type RegDmabufMr = unsafe extern "C" fn(*mut IbvPd, u64, usize, u64, c_int, c_int) -> *mut IbvMr;

macro_rules! api {
    ($($lib:ident { $($name:ident: fn($($arg:ty),*) -> $ret:ty;)* })*) => {
        /// Entry points resolved from the two libraries.
        #[derive(Debug)]
        pub struct Api {
            _libs: Vec<Library>,
            $($(pub $name: unsafe extern "C" fn($($arg),*) -> $ret,)*)*
            /// rdma-core 34 and later: registers a dma-buf (`None` before).
            pub ibv_reg_dmabuf_mr: Option<RegDmabufMr>,
        }

        impl Api {
            /// Loads the libraries; `rename` maps each default file name (for tests).
            pub fn load_with(rename: impl Fn(&'static str) -> String) -> Result<Api, String> {
                let mut libs = Vec::new();
                $(
                    let name = rename(concat!(stringify!($lib), ".so.1"));
                    let name = name.as_str();
                    // SAFETY: loading rdma-core runs its constructors, which only register
                    // providers; we resolve plain C functions from it below.
                    let lib = unsafe { Library::new(name) }.map_err(|e| {
                        format!("{name} could not be loaded ({e}); install rdma-core and ibverbs-providers")
                    })?;
                    $(
                        // SAFETY: the signature is the one rdma-core declares for this symbol.
                        let $name = *unsafe { lib.get::<unsafe extern "C" fn($($arg),*) -> $ret>(concat!(stringify!($name), "\0").as_bytes()) }
                            .map_err(|e| format!("{name}: {}: {e}", stringify!($name)))?;
                    )*
                    libs.push(lib);
                )*
                // SAFETY: the signature rdma-core declares; absent from older libraries.
                let ibv_reg_dmabuf_mr = unsafe { libs[0].get::<RegDmabufMr>(b"ibv_reg_dmabuf_mr\0") }.ok().map(|f| *f);
                Ok(Api { _libs: libs, $($($name,)*)* ibv_reg_dmabuf_mr })
            }
        }
    };
}

api! {
    libibverbs {
        ibv_alloc_pd: fn(*mut IbvContext) -> *mut IbvPd;
        ibv_dealloc_pd: fn(*mut IbvPd) -> c_int;
        ibv_reg_mr: fn(*mut IbvPd, *mut c_void, usize, c_int) -> *mut IbvMr;
        ibv_dereg_mr: fn(*mut IbvMr) -> c_int;
        ibv_create_comp_channel: fn(*mut IbvContext) -> *mut IbvCompChannel;
        ibv_destroy_comp_channel: fn(*mut IbvCompChannel) -> c_int;
        ibv_create_cq: fn(*mut IbvContext, c_int, *mut c_void, *mut IbvCompChannel, c_int) -> *mut IbvCq;
        ibv_destroy_cq: fn(*mut IbvCq) -> c_int;
        ibv_get_cq_event: fn(*mut IbvCompChannel, *mut *mut IbvCq, *mut *mut c_void) -> c_int;
        ibv_ack_cq_events: fn(*mut IbvCq, c_uint) -> ();
        ibv_query_device: fn(*mut IbvContext, *mut IbvDeviceAttr) -> c_int;
        ibv_get_device_name: fn(*mut c_void) -> *const libc::c_char;
        ibv_create_srq: fn(*mut IbvPd, *mut IbvSrqInitAttr) -> *mut IbvSrq;
        ibv_destroy_srq: fn(*mut IbvSrq) -> c_int;
    }
    librdmacm {
        rdma_create_event_channel: fn() -> *mut RdmaEventChannel;
        rdma_destroy_event_channel: fn(*mut RdmaEventChannel) -> ();
        rdma_create_id: fn(*mut RdmaEventChannel, *mut *mut RdmaCmId, *mut c_void, c_int) -> c_int;
        rdma_destroy_id: fn(*mut RdmaCmId) -> c_int;
        rdma_bind_addr: fn(*mut RdmaCmId, *const libc::sockaddr) -> c_int;
        rdma_listen: fn(*mut RdmaCmId, c_int) -> c_int;
        rdma_get_cm_event: fn(*mut RdmaEventChannel, *mut *mut RdmaCmEvent) -> c_int;
        rdma_ack_cm_event: fn(*mut RdmaCmEvent) -> c_int;
        rdma_accept: fn(*mut RdmaCmId, *mut RdmaConnParam) -> c_int;
        rdma_reject: fn(*mut RdmaCmId, *const c_void, u8) -> c_int;
        rdma_disconnect: fn(*mut RdmaCmId) -> c_int;
        rdma_create_qp: fn(*mut RdmaCmId, *mut IbvPd, *mut IbvQpInitAttr) -> c_int;
        rdma_destroy_qp: fn(*mut RdmaCmId) -> ();
        rdma_resolve_addr: fn(*mut RdmaCmId, *const libc::sockaddr, *const libc::sockaddr, c_int) -> c_int;
        rdma_resolve_route: fn(*mut RdmaCmId, c_int) -> c_int;
        rdma_connect: fn(*mut RdmaCmId, *mut RdmaConnParam) -> c_int;
    }
}

/// Whether the verbs library can register a dma-buf at all, else why not.
pub fn dmabuf_support(api: &Api) -> Result<(), String> {
    api.ibv_reg_dmabuf_mr
        .map(drop)
        .ok_or_else(|| "libibverbs has no ibv_reg_dmabuf_mr (rdma-core 34 or later registers dma-bufs)".into())
}

/// The loaded libraries, once per process; the error names the library that is missing.
pub fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| Api::load_with(String::from)).as_ref().map_err(Clone::clone)
}

/// Maps a C return value (-1/errno or non-zero) to an io::Error naming the call.
pub fn check(what: &str, rc: c_int) -> io::Result<()> {
    if rc == 0 {
        return Ok(());
    }
    let e = if rc < 0 { io::Error::last_os_error() } else { io::Error::from_raw_os_error(rc) };
    Err(io::Error::new(e.kind(), format!("{what}: {e}")))
}

/// Same for calls returning a pointer (NULL + errno on failure).
pub fn check_ptr<T>(what: &str, p: *mut T) -> io::Result<*mut T> {
    if p.is_null() {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(p)
    }
}

/// Puts an fd in non-blocking mode (event channels and completion channels are polled with
/// tokio).
pub fn set_nonblocking(fd: c_int) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, with flags we read first.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
