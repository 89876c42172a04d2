//! Bytes a backend's device moved, by the memory it moved them through.

use metrics::Counter;
use p2pnvmf_nvmf::Op;

/// Bytes the device moved, by the memory it moved them through (`p2pnvmf_backend_bytes_total`,
/// labels `memory` = "host" or the provider's PCI address, `op` = "read" or "write"). Handles
/// are made once per queue and memory, so counting allocates nothing per I/O.
#[derive(Debug, Default)]
pub(crate) struct Moved {
    by_memory: Vec<(Option<Box<str>>, Counter, Counter)>,
}

impl Moved {
    /// Counts a finished read or write through `memory` (a provider's PCI address; `None`:
    /// host memory).
    pub(crate) fn count(&mut self, op: &Op, memory: Option<&str>) {
        let (Op::Read { len, .. } | Op::Write { len, .. }) = *op else { return };
        let i = match self.by_memory.iter().position(|(m, ..)| m.as_deref() == memory) {
            Some(i) => i,
            None => {
                let label = memory.unwrap_or("host").to_owned();
                let read = metrics::counter!("p2pnvmf_backend_bytes_total", "memory" => label.clone(), "op" => "read");
                let write = metrics::counter!("p2pnvmf_backend_bytes_total", "memory" => label, "op" => "write");
                self.by_memory.push((memory.map(Into::into), read, write));
                self.by_memory.len() - 1
            }
        };
        let (_, read, write) = &self.by_memory[i];
        if matches!(op, Op::Read { .. }) { read } else { write }.increment(len as u64);
    }
}
