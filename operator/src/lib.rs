//! The goim-rs operator: reconciles `PushCluster` into comet, logic and job workloads and
//! keeps the comets registered in etcd.

pub mod builders;
pub mod controller;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod plan;
