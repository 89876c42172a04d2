//! One NVMe/TCP connection = one NVMe-oF queue. Reads PDUs, moves data (in-capsule, R2T +
//! H2CData, C2HData) and sends responses; the command's meaning is the core's business.

use std::net::SocketAddr;
use std::sync::Arc;

use p2pnvmf_nvmf::buffers::{P2pBuf, QueueBuffers};
use p2pnvmf_nvmf::ctrl::{CtrlWatch, Watched};
use p2pnvmf_nvmf::wire::{Sqe, sgl};
use p2pnvmf_nvmf::{Direction, Exec, Port, Queue, Response, Status, Target};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tracing::{debug, info, warn};
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

/// Socket halves and what was negotiated at ICReq.
struct Wire {
    rd: BufReader<OwnedReadHalf>,
    wr: BufWriter<OwnedWriteHalf>,
    lim: Limits,
    /// The last header read, for a termination request.
    hdr: [u8; 132],
}

impl Wire {
    /// Writes a PDU header, with its digest when header digests were negotiated.
    async fn write_pdu(&mut self, header: &[u8]) -> std::io::Result<()> {
        self.wr.write_all(header).await?;
        if self.lim.hdgst {
            self.wr.write_all(&crc32c(header).to_le_bytes()).await?;
        }
        Ok(())
    }

    /// Flushes unless more input is already buffered: pipelined commands share one send.
    async fn maybe_flush(&mut self) -> std::io::Result<()> {
        if self.rd.buffer().is_empty() { self.wr.flush().await } else { Ok(()) }
    }

    async fn send_response(&mut self, queue: &mut Queue, cid: u16, r: &Response) -> std::io::Result<()> {
        let resp = pdu::capsule_resp(queue.cqe(cid, r), self.lim.hdgst);
        self.write_pdu(resp.as_bytes()).await
    }

    /// Sends `data` as C2HData; with `success`, no response capsule follows.
    async fn send_c2h(&mut self, cid: u16, data: &[u8], success: bool) -> std::io::Result<()> {
        let h = pdu::c2h_data(cid, 0, data.len(), true, success, &self.lim);
        self.write_pdu(h.as_bytes()).await?;
        self.wr.write_all(data).await?;
        if self.lim.ddgst {
            self.wr.write_all(&crc32c(data).to_le_bytes()).await?;
        }
        Ok(())
    }

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

    /// Reads `dst.len()` data bytes and the data digest; false when the digest is wrong.
    async fn read_data(&mut self, l: &Layout, dst: &mut [u8]) -> Result<bool, ConnError> {
        self.rd.read_exact(dst).await?;
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

/// A command waiting for its data by R2T; its index is the transfer tag.
#[derive(Debug, Default)]
struct Slot {
    sqe: Option<Sqe>,
    len: usize,
    received: usize,
    digest_error: bool,
    buf: DataBuf,
    /// The command's p2p chunk, when its namespace's buffers are p2p memory.
    p2p: Option<P2pBuf>,
}

/// Page alignment lets O_DIRECT backends use the buffer as it is.
const ALIGN: usize = 4096;

/// A reusable data buffer: grows to the largest transfer seen, then serves every command
/// without allocating; its window starts page-aligned.
#[derive(Debug, Default)]
struct DataBuf(Vec<u8>);

impl DataBuf {
    fn window(&mut self, len: usize) -> &mut [u8] {
        if self.0.len() < len + ALIGN {
            self.0.resize(len + ALIGN, 0);
        }
        let off = self.0.as_ptr().align_offset(ALIGN);
        &mut self.0[off..off + len]
    }
}

struct Conn {
    wire: Wire,
    queue: Queue,
    params: TcpParams,
    scratch: DataBuf,
    slots: Vec<Slot>,
    bufs: QueueBuffers,
}

/// Serves one accepted connection until the host leaves, the controller dies, a protocol
/// error occurs, or the target shuts down.
pub async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    target: Arc<Target>,
    port: Port,
    params: TcpParams,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let lim = Limits { hdgst: false, ddgst: false, max_icd: params.max_icd, maxh2cdata: params.maxh2cdata };
    let mut conn = Conn {
        wire: Wire {
            rd: BufReader::with_capacity(64 << 10, rd),
            wr: BufWriter::with_capacity(64 << 10, wr),
            lim,
            hdr: [0; 132],
        },
        queue: Queue::new(target, port),
        params,
        scratch: DataBuf::default(),
        slots: Vec::new(),
        bufs: QueueBuffers::default(),
    };
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
            let _ = conn.wire.wr.write_all(&term).await;
            let _ = conn.wire.wr.flush().await;
        }
        Err(ConnError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            debug!(%peer, ?who, qid = conn.queue.qid(), "host closed the connection")
        }
        Err(e) => info!(%peer, ?who, qid = conn.queue.qid(), "connection ended: {e}"),
    }
    let _ = conn.wire.wr.shutdown().await;
}

impl Conn {
    async fn serve(&mut self) -> Result<(), ConnError> {
        self.handshake().await?;
        let mut ctrl = CtrlWatch::default();
        loop {
            if ctrl.follow(&self.queue) {
                self.bufs = QueueBuffers::for_queue(&self.queue);
            }
            // Wait for input without consuming it (cancel-safe), for a dead controller, or for
            // an async event; only then read the PDU.
            tokio::select! {
                r = self.wire.rd.fill_buf() => {
                    if r?.is_empty() {
                        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                    }
                }
                w = ctrl.changed() => match w {
                    Watched::TornDown(reason) => {
                        info!(qid = self.queue.qid(), reason, "controller gone: closing its queue");
                        return Ok(());
                    }
                    Watched::Events(c) => {
                        for (cid, dw0) in c.take_async_completions() {
                            info!(cntlid = c.cntlid, cid, dw0 = format_args!("{dw0:#x}"), "async event completed");
                            self.wire.send_response(&mut self.queue, cid, &Response::result(dw0.into())).await?;
                        }
                        self.wire.wr.flush().await?;
                        continue;
                    }
                },
            }
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
                    return Ok(());
                }
                _ => return Err(Fatal::sequence("ICReq after connection set-up").into()),
            }
            self.wire.maybe_flush().await?;
        }
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
        self.wire.wr.write_all(resp.as_bytes()).await?;
        self.wire.wr.flush().await?;
        self.wire.lim.hdgst = hdgst;
        self.wire.lim.ddgst = ddgst;
        debug!(hdgst, ddgst, maxr2t = req.maxr2t.get(), "ICReq accepted");
        Ok(())
    }

    async fn on_capsule(&mut self, l: &Layout) -> Result<(), ConnError> {
        let cmd = CapsuleCmd::read_from_bytes(&self.wire.hdr[..72]).expect("72 bytes");
        let sqe = cmd.sqe;
        let cid = sqe.cid.get();
        let mut icd = std::mem::take(&mut self.scratch);
        let digest_ok = self.wire.read_data(l, icd.window(l.data_len)).await;
        let plan = self.queue.admit(&sqe).and_then(|()| self.plan(&sqe, l.data_len));
        let result = match (digest_ok, plan) {
            (Err(e), _) => Err(e),
            (Ok(false), _) => {
                self.wire.send_response(&mut self.queue, cid, &Response::status(Status::DATA_TRANSFER_ERROR)).await?;
                Ok(())
            }
            (Ok(true), Err(status)) => {
                debug!(cid, opcode = sqe.opcode, %status, "command refused at transport level");
                self.wire.send_response(&mut self.queue, cid, &Response::status(status)).await?;
                Ok(())
            }
            // In-capsule data stays where it arrived; data for the host may go through p2p.
            (Ok(true), Ok(Plan::Now(len))) => {
                let to_host = Direction::of(&sqe) == Direction::ControllerToHost;
                match to_host.then(|| self.bufs.get(&sqe, len)).flatten() {
                    Some(b) => self.execute_p2p(&sqe, len, b).await,
                    None => self.execute(&sqe, icd.window(len)).await,
                }
            }
            (Ok(true), Ok(Plan::R2t(len))) => self.request_data(sqe, len).await,
        };
        self.scratch = icd;
        result
    }

    /// Decides where a command's data comes from, or refuses it with a status.
    fn plan(&self, sqe: &Sqe, icd_len: usize) -> Result<Plan, Status> {
        let dir = Direction::of(sqe);
        let d = sqe.dptr;
        let len = d.length.get() as usize;
        match dir {
            Direction::None => return Ok(Plan::Now(0)),
            Direction::Bidirectional => return Err(Status::INVALID_FIELD.dnr()),
            _ => {}
        }
        if len > self.params.max_xfer as usize {
            return Err(Status::DATA_SGL_LENGTH_INVALID.dnr());
        }
        match d.id {
            sgl::DATA_BLOCK_OFFSET if dir == Direction::HostToController => {
                if d.addr.get() != 0 {
                    Err(Status::SGL_OFFSET_INVALID.dnr())
                } else if len > icd_len {
                    Err(Status::DATA_SGL_LENGTH_INVALID.dnr())
                } else {
                    Ok(Plan::Now(len))
                }
            }
            sgl::TRANSPORT_DATA_BLOCK if icd_len == 0 => {
                if dir == Direction::HostToController && len > 0 {
                    Ok(Plan::R2t(len))
                } else {
                    Ok(Plan::Now(len))
                }
            }
            _ => Err(Status::SGL_TYPE_INVALID.dnr()),
        }
    }

    /// Executes and answers: C2HData (with SUCCESS where allowed) and/or a response capsule.
    async fn execute(&mut self, sqe: &Sqe, buf: &mut [u8]) -> Result<(), ConnError> {
        let cid = sqe.cid.get();
        let r = match self.queue.execute(sqe, buf) {
            Exec::Deferred => return Ok(()),
            Exec::Done(r) => r,
        };
        if Direction::of(sqe) == Direction::ControllerToHost && r.data_len > 0 && r.status.is_success() {
            // SUCCESS only when the host disabled SQ flow control: else it needs SQHD.
            let success = self.queue.sq_flow_disabled();
            self.wire.send_c2h(cid, &buf[..r.data_len as usize], success).await?;
            if success {
                return Ok(());
            }
        }
        self.wire.send_response(&mut self.queue, cid, &r).await?;
        Ok(())
    }

    /// Executes with the command's data in a p2p chunk, then returns the chunk.
    async fn execute_p2p(&mut self, sqe: &Sqe, len: usize, b: P2pBuf) -> Result<(), ConnError> {
        let mut bufs = std::mem::take(&mut self.bufs);
        let r = self.execute(sqe, bufs.bytes(&b, len)).await;
        bufs.put(b);
        self.bufs = bufs;
        r
    }

    async fn request_data(&mut self, sqe: Sqe, len: usize) -> Result<(), ConnError> {
        let max = usize::from(self.queue.entries()).max(1);
        let ttag = match self.slots.iter().position(|s| s.sqe.is_none()) {
            Some(i) => i,
            None if self.slots.len() < max => {
                self.slots.push(Slot::default());
                self.slots.len() - 1
            }
            None => {
                return Err(Fatal::sequence("more commands outstanding than the queue holds").into());
            }
        };
        let slot = &mut self.slots[ttag];
        slot.p2p = self.bufs.get(&sqe, len);
        if slot.p2p.is_none() {
            slot.buf.window(len);
        }
        (slot.sqe, slot.len, slot.received, slot.digest_error) = (Some(sqe), len, 0, false);
        let r2t = pdu::r2t(sqe.cid.get(), ttag as u16, 0, len as u32, self.wire.lim.hdgst);
        self.wire.write_pdu(r2t.as_bytes()).await?;
        self.wire.wr.flush().await?;
        Ok(())
    }

    async fn on_h2c_data(&mut self, l: &Layout) -> Result<(), ConnError> {
        let h = DataHeader::read_from_bytes(&self.wire.hdr[..24]).expect("24 bytes");
        let ttag = usize::from(h.ttag.get());
        let (off, n) = (h.datao.get() as usize, h.datal.get() as usize);
        let out_of_range = |why| Fatal { fes: pdu::fes::DATA_OUT_OF_RANGE, fei: 0, why };
        let Some(slot) = self.slots.get_mut(ttag).filter(|s| s.sqe.is_some_and(|q| q.cid == h.cccid)) else {
            return Err(Fatal::header(10, "H2CData for an unknown transfer tag").into());
        };
        if n != l.data_len {
            return Err(Fatal::header(16, "DATAL does not match PLEN").into());
        }
        if off != slot.received || off + n > slot.len {
            return Err(out_of_range("H2CData outside the R2T").into());
        }
        let len = slot.len;
        let p2p = slot.p2p.take();
        let mut buf = std::mem::take(&mut slot.buf);
        let ok = match &p2p {
            Some(b) => self.wire.read_data(l, &mut self.bufs.bytes(b, len)[off..off + n]).await?,
            None => self.wire.read_data(l, &mut buf.window(len)[off..off + n]).await?,
        };
        let slot = &mut self.slots[ttag];
        slot.digest_error |= !ok;
        slot.received += n;
        if slot.received < len {
            (slot.buf, slot.p2p) = (buf, p2p);
            return Ok(());
        }
        let sqe = slot.sqe.take().expect("slot in use");
        let r = if slot.digest_error {
            if let Some(b) = p2p {
                self.bufs.put(b);
            }
            self.wire
                .send_response(&mut self.queue, sqe.cid.get(), &Response::status(Status::DATA_TRANSFER_ERROR))
                .await
                .map_err(ConnError::from)
        } else {
            match p2p {
                Some(b) => self.execute_p2p(&sqe, len, b).await,
                None => self.execute(&sqe, buf.window(len)).await,
            }
        };
        self.slots[ttag].buf = buf;
        r
    }
}

enum Plan {
    /// Data (if any) is at hand: in the capsule, or to be produced for the host.
    Now(usize),
    /// Host-to-controller data to fetch with an R2T.
    R2t(usize),
}
