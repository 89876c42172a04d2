//! One command as the core carries it, from the capsule its transport received to its
//! completion (as nvmet's `struct nvmet_req` and SPDK's `spdk_nvmf_request`): the SQE, where
//! its data is, the buffer holding the data, and the response once it finished. A request
//! moves by value — the transport holds it while its data moves, the core while it executes —
//! so whoever holds it owns its buffer.

use p2pnvmf_p2p::mem::Window;

use crate::data::DataPlan;
use crate::response::Response;
use crate::wire::Sqe;

#[derive(Debug, Default)]
pub struct Request {
    pub sqe: Sqe,
    /// Where its data is, as [`Queue::accept`](crate::Queue::accept) located it.
    pub plan: DataPlan,
    /// The data: the host's for host-to-controller commands, the host's to receive otherwise.
    pub buf: Option<Window>,
    /// What the command answers, once executed.
    pub response: Response,
}

impl Request {
    /// A command answered without executing it (refused at acceptance, a data transfer that
    /// failed).
    pub fn answered(sqe: Sqe, response: Response) -> Request {
        Request { sqe, response, ..Request::default() }
    }

    pub fn cid(&self) -> u16 {
        self.sqe.cid.get()
    }

    /// Bytes of data the command moves.
    pub fn len(&self) -> usize {
        self.plan.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plan.is_empty()
    }

    /// The command's data, in its buffer (empty for a command that moves none); `None` when the
    /// buffer cannot hold it — the transport's mistake, not the host's.
    pub fn data_mut(&mut self) -> Option<&mut [u8]> {
        let len = self.len();
        match &mut self.buf {
            Some(b) if b.len() >= len => Some(&mut b.bytes_mut()[..len]),
            _ if len == 0 => Some(&mut []),
            _ => None,
        }
    }

    /// Bytes of its buffer that go back to the host with the response: the response's data
    /// length, never more than the command's.
    pub fn data_out(&self) -> usize {
        (self.response.data_len as usize).min(self.len())
    }
}

/// What executing a request gave.
#[derive(Debug)]
pub enum Exec {
    /// Finished: the request, its response set, with its buffer.
    Done(Request),
    /// In flight — at the backend, or an Async Event Request held for an event: it comes back
    /// out of [`Queue::reap`](crate::Queue::reap), its response set.
    Submitted,
}

/// A submitted request that finished, by the tag its transport gave it.
#[derive(Debug)]
pub struct Completion {
    pub tag: u16,
    pub req: Request,
}
