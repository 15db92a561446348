//! goim's client wire codec and the gRPC types shared by every role.

mod batcher;
pub mod grpc;
pub mod op;
pub mod packet;
pub mod service;

/// `goim.protocol`: the packet in protobuf form, used inside gRPC.
pub mod protocol {
    tonic::include_proto!("goim.protocol");
}

/// `goim.comet`: job -> comet.
pub mod comet {
    tonic::include_proto!("goim.comet");
}

/// `goim.logic`: comet -> logic, and the `PushMsg` logic hands to job.
pub mod logic {
    tonic::include_proto!("goim.logic");
}

/// `goim.chat`: conversations for backends (logic's gRPC port).
pub mod chat {
    tonic::include_proto!("goim.chat");
}

/// `goim.job`: logic -> job (our replacement for goim's Kafka topic).
pub mod job {
    tonic::include_proto!("goim.job");
}

pub use packet::{DecodeError, Header, Packet};

/// Longest key or room id on every path (tokens, room changes, the HTTP API, job): they
/// become etcd keys and records, and job state.
pub const MAX_ID: usize = 256;
