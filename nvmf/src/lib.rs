//! The transport-agnostic NVMe-oF target core: subsystems, namespaces, controllers, the
//! discovery subsystem, and fabrics, admin and I/O command execution.
//!
//! Transports turn wire capsules into an [`wire::Sqe`] plus a data window, call
//! [`Queue::execute`] — which finishes the command or submits it to the backend, whose
//! completions come out of [`Queue::reap`] in any order — and send back the data and the
//! [`wire::Cqe`] from [`Queue::cqe`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod buffers;
pub mod ctrl;
pub mod data;
pub mod discovery;
mod fabrics;
pub mod io;
pub mod ns;
pub mod queue;
pub mod response;
mod status;
pub mod subsystem;
pub mod target;
pub mod wire;

pub use auth::Host;
pub use ctrl::{Controller, Limits};
pub use data::DataPlan;
pub use io::Completion;
pub use ns::{Backend, BackendQueue, DeviceFacts, IoDone, IoError, IoRequest, Namespace, NsIds, Op};
pub use queue::Queue;
pub use response::{Exec, Response};
pub use status::{Status, sct};
pub use subsystem::{DISCOVERY_NQN, IoStats, Port, Subsystem, TrType, TransportParams};
pub use target::Target;
pub use wire::Direction;
