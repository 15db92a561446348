//! The configuration types live in `goim-config` (the operator writes them too); this adds
//! what needs the roles' crates: the etcd client.

use std::path::Path;

use anyhow::Context;
pub use goim_config::*;

/// An etcd client for `cluster`, over TLS when `etcd_tls_dir` is set.
pub async fn etcd(cluster: &ClusterConfig) -> anyhow::Result<goim_discovery::Client> {
    let tls = if cluster.etcd_tls_dir.is_empty() {
        None
    } else {
        let dir = Path::new(&cluster.etcd_tls_dir);
        Some(
            goim_discovery::Tls::from_dir(dir)
                .with_context(|| format!("reading etcd TLS files in {}", dir.display()))?,
        )
    };
    goim_discovery::connect_tls(&cluster.etcd, tls.as_ref())
        .await
        .context("etcd client")
}
