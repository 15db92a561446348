//! Distributed mode's backends for logic, on etcd: online state (every key on the owning
//! comet's lease, written and read in batched transactions), the comets offered to clients, and the
//! ring of jobs pushes are routed over.

mod compactor;
mod nodes;
mod online;
mod reader;
mod ring;
mod writer;

pub use compactor::compact_loop;
pub use nodes::EtcdNodes;
pub use online::{EtcdOnline, ADOPTED_TTL};
pub use ring::{ring_order, ring_pick, route_of, JobRing};
