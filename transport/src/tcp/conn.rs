//! One NVMe/TCP connection = one NVMe-oF queue, with every command of the queue in progress
//! at once: capsules are read as they come, writes get their R2T at once, commands are
//! submitted without waiting for earlier ones, and responses (C2HData, CapsuleResp) go out in
//! completion order, gathered per batch into one vectored socket write. The command's meaning
//! is the core's business.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use p2pnvmf_nvmf::buffers::QueueBuffers;
use p2pnvmf_nvmf::queue::CtrlWatch;
use p2pnvmf_nvmf::{Completion, DataPlan, Direction, Exec, Port, Queue, Request, Response, Status, Target};
use p2pnvmf_p2p::mem::Window;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use tracing::{debug, info, trace, warn};
use zerocopy::{FromBytes, IntoBytes};

use super::TcpParams;
use super::pdu::{self, CapsuleCmd, CommonHeader, DataHeader, Fatal, IcReq, Layout, Limits, pdu_type};
use crate::crc32c::crc32c;

/// Why a connection ended, for the log.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("protocol error (FES {}): {}", .0.fes, .0.why)]
    Protocol(Fatal),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

impl From<Fatal> for ConnError {
    fn from(f: Fatal) -> Self {
        ConnError::Protocol(f)
    }
}

/// The read half and what was negotiated at ICReq.
struct Wire<R> {
    rd: BufReader<R>,
    lim: Limits,
    /// The last header read, for a termination request.
    hdr: [u8; 132],
}

impl<R: AsyncRead + Unpin> Wire<R> {
    /// Reads the rest of a header (after the common header) and checks its digest.
    async fn read_header(&mut self, l: &Layout) -> Result<(), ConnError> {
        let end = l.hlen + if l.hdgst { 4 } else { 0 };
        self.rd.read_exact(&mut self.hdr[8..end]).await?;
        if l.hdgst {
            let want = u32::from_le_bytes(self.hdr[l.hlen..end].try_into().expect("4 bytes"));
            if crc32c(&self.hdr[..l.hlen]) != want {
                return Err(Fatal { fes: pdu::fes::HEADER_DIGEST_ERROR, fei: 0, why: "header digest mismatch" }.into());
            }
        }
        let mut pad = [0u8; 256];
        self.rd.read_exact(&mut pad[..l.pad]).await?;
        Ok(())
    }

    /// Reads `dst.len()` data bytes and the data digest; false when the digest is wrong. The
    /// data goes from the socket straight into `dst` (the command's buffer, a p2p chunk where
    /// it has one), past the header buffer: only what that buffer holds already is copied.
    async fn read_data(&mut self, l: &Layout, dst: &mut [u8]) -> Result<bool, ConnError> {
        let held = self.rd.buffer();
        let n = held.len().min(dst.len());
        dst[..n].copy_from_slice(&held[..n]);
        self.rd.consume(n);
        self.rd.get_mut().read_exact(&mut dst[n..]).await?;
        if !l.ddgst {
            return Ok(true);
        }
        let mut d = [0u8; 4];
        self.rd.read_exact(&mut d).await?;
        Ok(crc32c(dst) == u32::from_le_bytes(d))
    }

    async fn discard(&mut self, n: usize) -> std::io::Result<()> {
        let mut sink = [0u8; 512];
        let mut left = n;
        while left > 0 {
            let k = left.min(sink.len());
            self.rd.read_exact(&mut sink[..k]).await?;
            left -= k;
        }
        Ok(())
    }
}

/// Where a command is (NVMe/TCP's view; the core tracks the execution itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    /// A write waiting for its R2T: the connection has asked for `limits.r2t_data` already.
    AwaitingR2t,
    /// R2T sent: H2CData fills the buffer up to `len`.
    AwaitingData {
        received: usize,
        digest_error: bool,
    },
    /// Submitted to the backend.
    Executing,
    /// Its response is in the output batch (which may point at its buffer).
    Sending,
}

/// A command slot; its index is the command's tag (and its R2T transfer tag).
#[derive(Debug)]
struct Slot {
    state: State,
    /// The command (away with the core while it executes), its buffer lent from `own` or a
    /// p2p chunk.
    req: Request,
    /// The slot's own host buffer, when the request does not hold it: grows to the largest
    /// transfer seen, then serves every command without allocating; page-aligned for O_DIRECT.
    own: Option<Window>,
    /// The request's buffer is a p2p chunk (back to its pool when done), not `own`.
    on_chunk: bool,
}

impl Slot {
    fn new() -> Self {
        Slot { state: State::Free, req: Request::default(), own: None, on_chunk: false }
    }

    /// The data that goes to the host with the response.
    fn data(&self) -> &[u8] {
        self.req.buf.as_ref().map_or(&[][..], |w| &w.bytes()[..self.req.data_out()])
    }

    /// Gives the request the p2p `chunk`, or the own buffer (of at least `len` bytes) without
    /// one; the buffer it held goes back first.
    fn lend(&mut self, bufs: &mut QueueBuffers, chunk: Option<Window>, len: usize) -> std::io::Result<()> {
        self.take_back(bufs);
        match chunk {
            Some(c) => (self.req.buf, self.on_chunk) = (Some(c), true),
            None => {
                self.ensure_own(len)?;
                self.req.buf = self.own.take();
            }
        }
        Ok(())
    }

    /// Takes the request's buffer back: a chunk to its pool, the own buffer home.
    fn take_back(&mut self, bufs: &mut QueueBuffers) {
        match (self.req.buf.take(), self.on_chunk) {
            (Some(c), true) => bufs.put(c),
            (Some(own), false) => self.own = Some(own),
            (None, _) => {}
        }
        self.on_chunk = false;
    }

    /// Makes the own buffer hold at least `len` bytes.
    fn ensure_own(&mut self, len: usize) -> std::io::Result<()> {
        if self.own.as_ref().is_none_or(|w| w.len() < len) {
            self.own = Some(Window::host(len.next_power_of_two().max(4096))?);
        }
        Ok(())
    }
}

/// Pieces of the next socket write, in order.
#[derive(Debug)]
enum Seg {
    /// Bytes of `Out::bytes` (headers, digests).
    Bytes(Range<usize>),
    /// The data of a slot's buffer.
    Data(u16),
}

/// The output batch: everything to send before the next flush.
#[derive(Debug, Default)]
struct Out {
    bytes: Vec<u8>,
    segs: Vec<Seg>,
}

impl Out {
    fn push(&mut self, b: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(b);
        match self.segs.last_mut() {
            Some(Seg::Bytes(r)) if r.end == start => r.end = self.bytes.len(),
            _ => self.segs.push(Seg::Bytes(start..self.bytes.len())),
        }
    }

    fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }
}

struct Conn<R, W> {
    wire: Wire<R>,
    wr: W,
    queue: Queue,
    params: TcpParams,
    slots: Vec<Slot>,
    free: Vec<u16>,
    bufs: QueueBuffers,
    out: Out,
    /// Slots whose answers are in `out` (freed once it is written).
    sending: Vec<u16>,
    /// Completions reaped from the core, reused.
    reaped: Vec<Completion>,
    /// Bytes asked for with R2Ts and not received yet, and the writes waiting for theirs.
    r2t_out: usize,
    r2t_waiting: std::collections::VecDeque<u16>,
}

/// Serves one accepted connection (its two halves: a socket's, or any byte stream's, as the
/// fuzzer's) until the host leaves, the controller dies, a protocol error occurs, or the
/// target shuts down.
pub async fn run(
    (rd, wr): (impl AsyncRead + Unpin, impl AsyncWrite + Unpin),
    peer: SocketAddr,
    target: Arc<Target>,
    port: Port,
    params: TcpParams,
    mut shutdown: watch::Receiver<bool>,
) {
    let lim = Limits { hdgst: false, ddgst: false, max_icd: params.max_icd, maxh2cdata: params.maxh2cdata };
    let mut conn = Conn {
        wire: Wire { rd: BufReader::with_capacity(64 << 10, rd), lim, hdr: [0; 132] },
        wr,
        queue: Queue::new(target, port),
        params,
        slots: Vec::new(),
        free: Vec::new(),
        bufs: QueueBuffers::default(),
        out: Out::default(),
        sending: Vec::new(),
        reaped: Vec::new(),
        r2t_out: 0,
        r2t_waiting: std::collections::VecDeque::new(),
    };
    conn.queue.set_peer(peer.to_string());
    let result = tokio::select! {
        r = conn.serve() => r,
        _ = super::stopped(&mut shutdown) => Ok(()),
    };
    let who = conn.queue.controller().map(|c| (c.cntlid, c.subnqn().to_string()));
    match result {
        Ok(()) => debug!(%peer, ?who, qid = conn.queue.qid(), "connection closed"),
        Err(ConnError::Protocol(f)) => {
            warn!(%peer, ?who, qid = conn.queue.qid(), fes = f.fes, fei = f.fei, "protocol error: {}; sending C2HTermReq", f.why);
            let term = pdu::c2h_term_req(&f, &conn.wire.hdr[..72]);
            let _ = conn.wr.write_all(&term).await;
        }
        Err(ConnError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            debug!(%peer, ?who, qid = conn.queue.qid(), "host closed the connection")
        }
        Err(e) => info!(%peer, ?who, qid = conn.queue.qid(), "connection ended: {e}"),
    }
    let _ = conn.wr.shutdown().await;
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Conn<R, W> {
    async fn serve(&mut self) -> Result<(), ConnError> {
        self.handshake().await?;
        let mut ctrl = CtrlWatch::default();
        loop {
            if ctrl.follow(&self.queue) {
                self.bufs = self.queue.buffers();
            }
            // Wait for input without consuming it (cancel-safe), for finished commands, for a
            // dead controller or an async event.
            tokio::select! {
                r = self.wire.rd.fill_buf() => {
                    if r?.is_empty() {
                        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                    }
                }
                () = self.queue.io_ready() => {}
                reason = ctrl.torn_down() => {
                    info!(qid = self.queue.qid(), reason, "controller gone: closing its queue");
                    return Ok(());
                }
            }
            crate::poll::did_work();
            // Every PDU already here, then every finished command, then one write.
            while !self.wire.rd.buffer().is_empty() {
                if self.read_pdu().await? {
                    return Ok(());
                }
            }
            self.reap();
            self.flush().await?;
        }
    }

    /// Reads and handles one PDU; true when the host terminated the connection.
    async fn read_pdu(&mut self) -> Result<bool, ConnError> {
        let mut ch = [0u8; 8];
        self.wire.rd.read_exact(&mut ch).await?;
        self.wire.hdr[..8].copy_from_slice(&ch);
        let ch = CommonHeader::read_from_bytes(&ch).expect("8 bytes");
        let layout = pdu::check(&ch, &self.wire.lim)?;
        self.wire.read_header(&layout).await?;
        match layout.pdu_type {
            pdu_type::CAPSULE_CMD => self.on_capsule(&layout).await?,
            pdu_type::H2C_DATA => self.on_h2c_data(&layout).await?,
            pdu_type::H2C_TERM_REQ => {
                self.wire.discard(layout.data_len).await?;
                let fes = u16::from_le_bytes([self.wire.hdr[8], self.wire.hdr[9]]);
                info!(qid = self.queue.qid(), fes, "host terminated the connection (H2CTermReq)");
                return Ok(true);
            }
            _ => return Err(Fatal::sequence("ICReq after connection set-up").into()),
        }
        Ok(false)
    }

    /// ICReq → ICResp (NVMe/TCP 1.0, 3.3): digests as the host asks, CPDA 0, our MAXH2CDATA.
    async fn handshake(&mut self) -> Result<(), ConnError> {
        let mut raw = [0u8; 128];
        self.wire.rd.read_exact(&mut raw[..8]).await?;
        self.wire.hdr[..8].copy_from_slice(&raw[..8]);
        let ch = CommonHeader::read_from_bytes(&raw[..8]).expect("8 bytes");
        if ch.pdu_type != pdu_type::IC_REQ {
            return Err(Fatal::sequence("first PDU is not an ICReq").into());
        }
        pdu::check(&ch, &self.wire.lim)?;
        self.wire.rd.read_exact(&mut raw[8..]).await?;
        let req = IcReq::read_from_bytes(&raw).expect("128 bytes");
        let (hdgst, ddgst) = pdu::check_icreq(&req)?;
        let resp = pdu::ic_resp(hdgst, ddgst, self.params.maxh2cdata);
        self.wr.write_all(resp.as_bytes()).await?;
        self.wire.lim.hdgst = hdgst;
        self.wire.lim.ddgst = ddgst;
        debug!(hdgst, ddgst, maxr2t = req.maxr2t.get(), "ICReq accepted");
        Ok(())
    }

    /// A free slot for a new command; a host with more commands outstanding than its queue
    /// holds breaks the protocol.
    fn take_slot(&mut self) -> Result<u16, ConnError> {
        if let Some(t) = self.free.pop() {
            return Ok(t);
        }
        if self.slots.len() < usize::from(self.queue.entries()).max(1) {
            self.slots.push(Slot::new());
            return Ok((self.slots.len() - 1) as u16);
        }
        Err(Fatal::sequence("more commands outstanding than the queue holds").into())
    }

    fn release(&mut self, tag: u16) {
        let slot = &mut self.slots[usize::from(tag)];
        slot.state = State::Free;
        slot.take_back(&mut self.bufs);
        self.free.push(tag);
    }

    async fn on_capsule(&mut self, l: &Layout) -> Result<(), ConnError> {
        let cmd = CapsuleCmd::read_from_bytes(&self.wire.hdr[..72]).expect("72 bytes");
        let sqe = cmd.sqe;
        let tag = self.take_slot()?;
        // In-capsule data of a write to a p2p namespace lands in the chunk the device reads.
        let chunk = if l.data_len > 0 { self.bufs.get(&sqe, l.data_len) } else { None };
        let slot = &mut self.slots[usize::from(tag)];
        slot.req.sqe = sqe;
        slot.lend(&mut self.bufs, chunk, l.data_len)?;
        let icd = &mut slot.req.buf.as_mut().expect("lent").bytes_mut()[..l.data_len];
        let digest_ok = self.wire.read_data(l, icd).await?;
        let accepted = self.queue.accept(&sqe, l.data_len);
        trace!(tag, cid = sqe.cid.get(), opcode = sqe.opcode, "capsule");
        let req = match (digest_ok, accepted) {
            (true, Ok(req)) => req,
            (false, _) => {
                self.answer(tag, Status::DATA_TRANSFER_ERROR);
                return Ok(());
            }
            (true, Err(status)) => {
                debug!(cid = sqe.cid.get(), opcode = sqe.opcode, %status, "command refused");
                self.answer(tag, status);
                return Ok(());
            }
        };
        let slot = &mut self.slots[usize::from(tag)];
        slot.req = Request { buf: slot.req.buf.take(), ..req };
        match slot.req.plan {
            DataPlan::Transport { len } if len > 0 && Direction::of(&sqe) == Direction::HostToController => {
                return self.request_data(tag);
            }
            // In-capsule data stays where it arrived (moved to the buffer's start when the
            // host placed it further in); data for the host may go through p2p.
            DataPlan::InCapsule { offset, len } if offset > 0 => {
                slot.req.buf.as_mut().expect("lent").bytes_mut().copy_within(offset..offset + len, 0);
            }
            DataPlan::Transport { len } if Direction::of(&sqe) == Direction::ControllerToHost => {
                let chunk = self.bufs.get(&sqe, len);
                slot.lend(&mut self.bufs, chunk, len)?;
            }
            _ => {}
        }
        self.execute(tag);
        Ok(())
    }

    /// Hands the request in `tag` to the core; answers it if it finished at once.
    fn execute(&mut self, tag: u16) {
        let slot = &mut self.slots[usize::from(tag)];
        match self.queue.execute(tag, std::mem::take(&mut slot.req)) {
            Exec::Done(req) => {
                slot.req = req;
                self.finish(tag);
            }
            Exec::Submitted => slot.state = State::Executing,
        }
    }

    /// Answers the command in `tag` with `status`, without executing it.
    fn answer(&mut self, tag: u16, status: Status) {
        self.slots[usize::from(tag)].req.response = Response::status(status);
        self.finish(tag);
    }

    /// Collects every request the backends finished and answers it.
    fn reap(&mut self) {
        let mut done = std::mem::take(&mut self.reaped);
        self.queue.reap(&mut |c: Completion| done.push(c));
        for c in done.drain(..) {
            self.slots[usize::from(c.tag)].req = c.req;
            self.finish(c.tag);
        }
        self.reaped = done;
    }

    /// Queues a finished request's answer: C2HData (with SUCCESS where allowed) and/or a
    /// response capsule. The slot is free once the batch is written.
    fn finish(&mut self, tag: u16) {
        let slot = &mut self.slots[usize::from(tag)];
        let (cid, r) = (slot.req.cid(), slot.req.response);
        trace!(tag, cid, status = %r.status, "answer queued");
        slot.state = State::Sending;
        self.sending.push(tag);
        if Direction::of(&slot.req.sqe) == Direction::ControllerToHost && r.data_len > 0 && r.status.is_success() {
            // SUCCESS only when the host disabled SQ flow control: else it needs SQHD.
            let success = self.queue.sq_flow_disabled();
            let h = pdu::c2h_data(cid, 0, slot.req.data_out(), true, success, &self.wire.lim);
            push_pdu(&mut self.out, h.as_bytes(), self.wire.lim.hdgst);
            self.out.segs.push(Seg::Data(tag));
            if self.wire.lim.ddgst {
                self.out.push(&crc32c(self.slots[usize::from(tag)].data()).to_le_bytes());
            }
            if success {
                return;
            }
        }
        let resp = pdu::capsule_resp(self.queue.complete(&self.slots[usize::from(tag)].req), self.wire.lim.hdgst);
        push_pdu(&mut self.out, resp.as_bytes(), self.wire.lim.hdgst);
    }

    /// Writes the batch with vectored writes (one call unless the socket takes less), then
    /// frees the slots it carried.
    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            write_segs(&mut self.wr, &self.out, &self.slots).await?;
            trace!(segs = self.out.segs.len(), answers = self.sending.len(), "batch written");
            self.out.bytes.clear();
            self.out.segs.clear();
        }
        while let Some(tag) = self.sending.pop() {
            self.release(tag);
        }
        Ok(())
    }

    /// Sends an R2T for the command's whole transfer (at most MAXH2CDATA, which covers the
    /// largest transfer): several commands may be waiting for data at once, as many bytes as
    /// `r2t_data` allows (one at least); the others wait their turn, holding no buffer.
    fn request_data(&mut self, tag: u16) -> Result<(), ConnError> {
        let len = self.slots[usize::from(tag)].req.len();
        if self.r2t_out > 0 && (!self.r2t_waiting.is_empty() || !self.r2t_fits(len)) {
            self.slots[usize::from(tag)].state = State::AwaitingR2t;
            self.r2t_waiting.push_back(tag);
            return Ok(());
        }
        self.send_r2t(tag)
    }

    /// Whether an R2T for `len` more bytes fits the connection's budget (one always does when
    /// none is outstanding, however large).
    fn r2t_fits(&self, len: usize) -> bool {
        self.r2t_out == 0 || self.r2t_out + len <= self.params.r2t_data
    }

    /// Lends the command its buffer and asks the host for its data.
    fn send_r2t(&mut self, tag: u16) -> Result<(), ConnError> {
        let slot = &mut self.slots[usize::from(tag)];
        let len = slot.req.len();
        self.r2t_out += len;
        let chunk = self.bufs.get(&slot.req.sqe, len);
        slot.lend(&mut self.bufs, chunk, len)?;
        slot.state = State::AwaitingData { received: 0, digest_error: false };
        let r2t = pdu::r2t(slot.req.cid(), tag, 0, len as u32, self.wire.lim.hdgst);
        push_pdu(&mut self.out, r2t.as_bytes(), self.wire.lim.hdgst);
        Ok(())
    }

    async fn on_h2c_data(&mut self, l: &Layout) -> Result<(), ConnError> {
        let h = DataHeader::read_from_bytes(&self.wire.hdr[..24]).expect("24 bytes");
        let tag = h.ttag.get();
        let (off, n) = (h.datao.get() as usize, h.datal.get() as usize);
        let out_of_range = |why| Fatal { fes: pdu::fes::DATA_OUT_OF_RANGE, fei: 0, why };
        let Some(slot) = self
            .slots
            .get_mut(usize::from(tag))
            .filter(|s| matches!(s.state, State::AwaitingData { .. }) && s.req.sqe.cid == h.cccid)
        else {
            return Err(Fatal::header(10, "H2CData for an unknown transfer tag").into());
        };
        let State::AwaitingData { received, digest_error } = slot.state else { unreachable!("filtered above") };
        if n != l.data_len {
            return Err(Fatal::header(16, "DATAL does not match PLEN").into());
        }
        if off != received || off + n > slot.req.len() {
            return Err(out_of_range("H2CData outside the R2T").into());
        }
        let dst = &mut slot.req.buf.as_mut().expect("buffer set at R2T").bytes_mut()[off..off + n];
        let ok = self.wire.read_data(l, dst).await?;
        let slot = &mut self.slots[usize::from(tag)];
        let (received, digest_error) = (received + n, digest_error || !ok);
        slot.state = State::AwaitingData { received, digest_error };
        if received < slot.req.len() {
            return Ok(());
        }
        // The transfer is in: writes waiting for their R2T go as far as the limit lets them.
        self.r2t_out -= slot.req.len();
        while let Some(&next) = self.r2t_waiting.front() {
            if !self.r2t_fits(self.slots[usize::from(next)].req.len()) {
                break;
            }
            self.r2t_waiting.pop_front();
            self.send_r2t(next)?;
        }
        if digest_error {
            self.answer(tag, Status::DATA_TRANSFER_ERROR);
        } else {
            self.execute(tag);
        }
        Ok(())
    }
}

/// Appends a PDU header, with its digest when header digests were negotiated.
fn push_pdu(out: &mut Out, header: &[u8], hdgst: bool) {
    out.push(header);
    if hdgst {
        out.push(&crc32c(header).to_le_bytes());
    }
}

/// Writes every segment of `out` (headers from its bytes, data from the slots' buffers).
async fn write_segs(wr: &mut (impl AsyncWrite + Unpin), out: &Out, slots: &[Slot]) -> std::io::Result<()> {
    let bytes_of = |s: &Seg| -> &[u8] {
        match s {
            Seg::Bytes(r) => &out.bytes[r.clone()],
            Seg::Data(tag) => slots[usize::from(*tag)].data(),
        }
    };
    let (mut seg, mut off) = (0, 0);
    while seg < out.segs.len() {
        let mut iov = [IoSlice::new(&[]); 64];
        let mut n = 0;
        for (i, s) in out.segs[seg..].iter().take(iov.len()).enumerate() {
            let b = bytes_of(s);
            iov[n] = IoSlice::new(if i == 0 { &b[off..] } else { b });
            n += 1;
        }
        let mut written = wr.write_vectored(&iov[..n]).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        // Advance past what the socket took.
        while written > 0 {
            let left = bytes_of(&out.segs[seg]).len() - off;
            if written >= left {
                written -= left;
                (seg, off) = (seg + 1, 0);
            } else {
                off += written;
                written = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use p2pnvmf_nvmf::wire::{ConnectData, Sqe, put_str, sgl};
    use p2pnvmf_nvmf::{Backend, BackendQueue, IoDone, IoRequest, Namespace, Subsystem, TrType};
    use p2pnvmf_p2p::pool::ChunkPool;
    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
    use zerocopy::FromZeros;

    use super::pdu::{R2t, flags};
    use super::*;

    const NQN: &str = "nqn.2026-11.io.p2pnvmf:conn";
    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:0c0c0c0c-0000-0000-0000-000000000002";

    /// A namespace that completes every command at once.
    #[derive(Debug)]
    struct Sink;

    impl Backend for Sink {
        fn size_bytes(&self) -> u64 {
            64 << 20
        }
        fn volatile_write_cache(&self) -> bool {
            false
        }
        fn flush(&self) -> Result<(), p2pnvmf_nvmf::IoError> {
            Ok(())
        }
        fn open_queue(
            self: Arc<Self>,
            _: usize,
            _: p2pnvmf_nvmf::Reaping,
        ) -> Result<Box<dyn BackendQueue>, p2pnvmf_nvmf::IoError> {
            Ok(Box::new(SinkQueue(Vec::new())))
        }
    }

    #[derive(Debug)]
    struct SinkQueue(Vec<IoDone>);

    impl BackendQueue for SinkQueue {
        fn submit(&mut self, req: IoRequest) -> Option<IoDone> {
            Some(req.done(Ok(())))
        }
        fn reap(&mut self, done: &mut dyn FnMut(IoDone)) {
            self.0.drain(..).for_each(done);
        }
        fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<()> {
            std::task::Poll::Pending
        }
        fn in_flight(&self) -> usize {
            0
        }
    }

    /// A host speaking NVMe/TCP over an in-memory stream to a connection of the target.
    struct Host {
        rd: ReadHalf<DuplexStream>,
        wr: WriteHalf<DuplexStream>,
    }

    impl Host {
        async fn connect(t: &Arc<Target>, port: &Port, params: TcpParams, qid: u16, cntlid: u16) -> (Host, u16) {
            let mut h = Host::open(t, port, params).await;
            let mut c = Sqe::new_zeroed();
            (c.opcode, c.flags, c.nsid) = (0x7f, 1 << 6, 1.into());
            (c.cdw10, c.cdw11) = ((u32::from(qid) << 16).into(), 31.into());
            (c.dptr.id, c.dptr.length) = (sgl::DATA_BLOCK_OFFSET, 1024.into());
            let mut d = ConnectData::new_zeroed();
            d.cntlid = cntlid.into();
            put_str(&mut d.subnqn, NQN, 0);
            put_str(&mut d.hostnqn, HOST, 0);
            let cqe = h.command(&c, d.as_bytes()).await;
            assert_eq!(cqe.status.get() >> 1, 0, "Connect qid {qid}");
            (h, cqe.result.get() as u16)
        }

        /// A connection of the target after the IC handshake.
        async fn open(t: &Arc<Target>, port: &Port, params: TcpParams) -> Host {
            let (host, target) = tokio::io::duplex(1 << 20);
            let (_keep, shutdown) = watch::channel(false);
            let (t, port) = (t.clone(), port.clone());
            tokio::spawn(async move {
                let _keep = _keep;
                run(tokio::io::split(target), "127.0.0.1:1".parse().unwrap(), t, port, params, shutdown).await
            });
            let (rd, wr) = tokio::io::split(host);
            let mut h = Host { rd, wr };
            let mut ic = IcReq::new_zeroed();
            ic.ch = pdu::common(pdu_type::IC_REQ, 0, 128, 0, 128);
            h.wr.write_all(ic.as_bytes()).await.unwrap();
            assert_eq!(h.pdu().await.0.pdu_type, pdu_type::IC_RESP);
            h
        }

        /// Sends a capsule with `icd` in it.
        async fn send(&mut self, sqe: &Sqe, icd: &[u8]) {
            let pdo = if icd.is_empty() { 0 } else { 72 };
            let mut cap = CapsuleCmd::new_zeroed();
            cap.ch = pdu::common(pdu_type::CAPSULE_CMD, 0, 72, pdo, 72 + icd.len());
            cap.sqe = *sqe;
            self.wr.write_all(cap.as_bytes()).await.unwrap();
            self.wr.write_all(icd).await.unwrap();
        }

        /// Sends a capsule and reads its response.
        async fn command(&mut self, sqe: &Sqe, icd: &[u8]) -> p2pnvmf_nvmf::wire::Cqe {
            self.send(sqe, icd).await;
            let (ch, rest) = self.pdu().await;
            assert_eq!(ch.pdu_type, pdu_type::CAPSULE_RESP);
            p2pnvmf_nvmf::wire::Cqe::read_from_bytes(&rest[..16]).unwrap()
        }

        /// The next PDU: its common header and the rest.
        async fn pdu(&mut self) -> (CommonHeader, Vec<u8>) {
            let mut ch = [0u8; 8];
            self.rd.read_exact(&mut ch).await.unwrap();
            let ch = CommonHeader::read_from_bytes(&ch).unwrap();
            let mut rest = vec![0u8; ch.plen.get() as usize - 8];
            self.rd.read_exact(&mut rest).await.unwrap();
            (ch, rest)
        }

        /// The next PDU if one comes within 200 ms.
        async fn maybe_pdu(&mut self) -> Option<(CommonHeader, Vec<u8>)> {
            tokio::time::timeout(Duration::from_millis(200), self.pdu()).await.ok()
        }
    }

    /// A target with one namespace that discards what it gets, on an NVMe/TCP port with `params`.
    fn sink_target(params: TcpParams) -> (Arc<Target>, Port) {
        let port = Port {
            id: 1,
            trtype: TrType::Tcp,
            traddr: "127.0.0.1".into(),
            trsvcid: "4420".into(),
            params: crate::Transport::params(&params),
        };
        let ns = Namespace::new(NQN, 1, Arc::new(Sink));
        (Target::new(vec![Arc::new(Subsystem::open(NQN, vec![ns]))], vec![port.clone()]), port)
    }

    #[tokio::test]
    async fn writes_beyond_the_r2t_data_limit_wait_for_their_r2t() {
        let params = TcpParams { r2t_data: 256 << 10, ..TcpParams::default() };
        let (t, port) = sink_target(params);
        let (mut admin, cntlid) = Host::connect(&t, &port, params, 0, 0xffff).await;
        let mut cc = Sqe::new_zeroed();
        (cc.opcode, cc.cdw11, cc.cdw12) = (0x7f, 0x14.into(), (1 | 6 << 16 | 4 << 20).into());
        assert_eq!(admin.command(&cc, &[]).await.status.get() >> 1, 0, "CC.EN");
        let (mut io, _) = Host::connect(&t, &port, params, 1, cntlid).await;
        // Three 128 KiB writes: two fit in 256 KiB of outstanding R2Ts, the third waits.
        for cid in 0..3u16 {
            let mut w = Sqe::new_zeroed();
            (w.opcode, w.flags, w.cid, w.nsid) = (0x01, 1 << 6, cid.into(), 1.into());
            (w.cdw10, w.cdw12) = ((u32::from(cid) * 256).into(), 255.into());
            (w.dptr.id, w.dptr.length) = (sgl::TRANSPORT_DATA_BLOCK, (128 << 10).into());
            io.send(&w, &[]).await;
        }
        let mut r2ts = Vec::new();
        while let Some((ch, rest)) = io.maybe_pdu().await {
            assert_eq!(ch.pdu_type, pdu_type::R2T);
            r2ts.push(R2t::read_from_bytes(&[ch.as_bytes(), &rest].concat()).unwrap());
        }
        assert_eq!(r2ts.iter().map(|r| r.cccid.get()).collect::<Vec<_>>(), [0, 1], "the third write waits");
        // The first write's data comes in: it completes, and the third gets its R2T.
        let mut h2c = DataHeader::new_zeroed();
        h2c.ch = pdu::common(pdu_type::H2C_DATA, flags::DATA_LAST, 24, 24, 24 + (128 << 10));
        (h2c.cccid, h2c.ttag, h2c.datal) = (0.into(), r2ts[0].ttag, (128 << 10).into());
        io.wr.write_all(h2c.as_bytes()).await.unwrap();
        io.wr.write_all(&vec![0x5a; 128 << 10]).await.unwrap();
        let mut seen = Vec::new();
        while let Some((ch, rest)) = io.maybe_pdu().await {
            seen.push((ch.pdu_type, u16::from_le_bytes([rest[0], rest[1]])));
        }
        assert!(seen.contains(&(pdu_type::R2T, 2)), "{seen:?}");
        assert!(seen.iter().any(|&(t, _)| t == pdu_type::CAPSULE_RESP), "{seen:?}");
    }

    #[tokio::test]
    async fn in_capsule_data_at_an_offset_is_taken_from_there() {
        let params = TcpParams::default();
        let (t, port) = sink_target(params);
        // Connect's 1024 bytes 512 bytes into 1536 of in-capsule data: it connects only if the
        // data was taken from the offset; an offset past the data is refused.
        let mut c = Sqe::new_zeroed();
        (c.opcode, c.flags, c.nsid, c.cdw11) = (0x7f, 1 << 6, 1.into(), 31.into());
        (c.dptr.id, c.dptr.addr, c.dptr.length) = (sgl::DATA_BLOCK_OFFSET, 512.into(), 1024.into());
        let mut d = ConnectData::new_zeroed();
        d.cntlid = 0xffff.into();
        put_str(&mut d.subnqn, NQN, 0);
        put_str(&mut d.hostnqn, HOST, 0);
        let icd = [vec![0xee; 512], d.as_bytes().to_vec()].concat();
        let mut h = Host::open(&t, &port, params).await;
        assert_eq!(h.command(&c, &icd).await.status.get() >> 1, 0, "Connect with its data at offset 512");
        let mut h = Host::open(&t, &port, params).await;
        c.dptr.addr = 1537.into();
        assert_eq!(h.command(&c, &icd).await.status.get() >> 1, 0x16 | 1 << 14, "SGL Offset Invalid");
    }

    #[test]
    fn a_chunk_back_from_the_core_returns_to_its_slot_and_then_its_pool() {
        let pool = ChunkPool::host(8192, 1).unwrap();
        let mut bufs = QueueBuffers::default();
        let mut slab = pool.take(1);
        let mut slot = Slot::new();
        slot.ensure_own(4096).unwrap();
        let own = slot.own.as_ref().unwrap().as_ptr();
        slot.req.plan = DataPlan::Transport { len: 4096 };
        slot.req.response = Response::data(4096);
        slot.lend(&mut bufs, slab.get(4096), 4096).unwrap();
        slot.req.buf.as_mut().unwrap().bytes_mut()[..3].copy_from_slice(b"p2p");
        // The core takes the request while it executes and gives it back after.
        let away = std::mem::take(&mut slot.req);
        slot.req = away;
        assert_eq!(&slot.data()[..3], b"p2p");
        assert_eq!(slot.own.as_ref().unwrap().as_ptr(), own, "the own buffer stays the slot's");
        // Without a chunk the command uses the own buffer; the chunk goes back first.
        let chunk = slot.req.buf.take().unwrap();
        slot.req.buf = Some(chunk);
        slot.on_chunk = false;
        let chunk = slot.req.buf.take().unwrap();
        assert!(slab.put(chunk) && slab.get(4096).is_some(), "the chunk went home");
        slot.lend(&mut bufs, None, 4096).unwrap();
        assert_eq!(slot.req.buf.as_ref().unwrap().as_ptr(), own);
        slot.take_back(&mut bufs);
        assert_eq!(slot.own.as_ref().unwrap().as_ptr(), own, "the own buffer is home again");
    }
}
