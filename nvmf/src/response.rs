//! What executing a command produces, as every executor (fabrics, admin, I/O) answers it.

use crate::Status;

/// A finished command: status, DW0/DW1, and how many bytes of the buffer go back to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Response {
    pub status: Status,
    pub result: u64,
    pub data_len: u32,
}

impl Response {
    pub fn status(status: Status) -> Self {
        Response { status, ..Default::default() }
    }

    pub fn ok() -> Self {
        Response::default()
    }

    pub fn data(len: usize) -> Self {
        Response { data_len: len as u32, ..Default::default() }
    }

    pub fn result(result: u64) -> Self {
        Response { result, ..Default::default() }
    }
}
