//! The transport-agnostic NVMe-oF target core: subsystems, namespaces, controllers, the
//! discovery subsystem, and fabrics, admin and I/O command execution.
//!
//! Transports turn a capsule into a [`Request`] once ([`Queue::accept`]: admitted, its data
//! located), move its data into the request's buffer, and hand it to [`Queue::execute`] —
//! which finishes it or submits it to the backend, whose completions come out of
//! [`Queue::reap`] in any order — then send back the data and the [`wire::Cqe`] that
//! [`Queue::complete`] builds.
#![forbid(unsafe_code)]

pub mod admin;
pub mod ana;
pub mod auth;
pub mod buffers;
pub mod ctrl;
pub mod data;
pub mod discovery;
mod fabrics;
pub mod io;
pub mod ns;
pub mod queue;
pub mod request;
pub mod reservations;
pub mod response;
pub mod resv;
mod status;
pub mod subsystem;
pub mod target;
pub mod wire;

pub use auth::Host;
pub use ctrl::{Controller, Limits};
pub use data::DataPlan;
pub use ns::{Backend, BackendQueue, DeviceFacts, IoDone, IoError, IoRequest, Namespace, NsIds, Null, Op, Reaping};
pub use queue::Queue;
pub use request::{Completion, Exec, Request};
pub use response::Response;
pub use status::{Status, sct};
pub use subsystem::{DISCOVERY_NQN, IoStats, Port, Subsystem, TrType, TransportParams};
pub use target::Target;
pub use wire::Direction;
