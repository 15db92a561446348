//! goim logic: auth, online state, node selection and the HTTP push API.

pub mod api_keys;
pub mod auth;
pub mod chat;

pub mod etcd;
pub mod events;
pub mod forward;
pub mod hook;
pub mod http;
pub mod jwt;
pub mod logic;
pub mod nodes;
pub mod online;
pub mod serve;
pub mod webhook;

pub use api_keys::ApiKeys;
pub use goim_config::LogicConfig;
pub use logic::{Logic, LogicMetrics, Targeted};
