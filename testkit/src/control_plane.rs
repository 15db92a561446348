//! A real kube-apiserver (built by tools/build.sh) on a real etcd, with the chart installed by
//! a real helm. There is no kubelet or controller-manager: tests play their part.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{free_port, wait_until, Etcd};

/// The bearer token of the `system:masters` user.
pub const ADMIN_TOKEN: &str = "goim-test-admin-token";

pub struct ControlPlane {
    pub etcd: Etcd,
    apiserver: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub helm: PathBuf,
    pub kubectl: PathBuf,
}

/// Where tools/build.sh puts kube-apiserver, kubectl and helm (`GOIM_TOOLS_BIN` overrides).
pub fn tools_bin() -> PathBuf {
    std::env::var_os("GOIM_TOOLS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                });
            cache.join("goim-rs/go/bin")
        })
}

/// A kubeconfig for `name` with a bearer token.
pub fn kubeconfig_text(port: u16, token: &str, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    insecure-skip-tls-verify: true\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context: {{cluster: test, user: {name}}}\ncurrent-context: test\n"
    )
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver and installs `chart` into `goim-system` with helm.
    pub fn start(chart: &Path) -> ControlPlane {
        ControlPlane::start_with(chart, &[], &[])
    }

    /// As [`ControlPlane::start`], with `namespaces` created first (the chart's Roles go into
    /// the ones it is told of) and extra `helm install` arguments (`--set ...`).
    pub fn start_with(chart: &Path, namespaces: &[&str], helm_args: &[&str]) -> ControlPlane {
        let bin = tools_bin();
        let apiserver = bin.join("kube-apiserver");
        let helm = bin.join("helm");
        let kubectl = bin.join("kubectl");
        assert!(
            apiserver.exists() && helm.exists() && kubectl.exists(),
            "kube-apiserver, kubectl and helm are built by tools/build.sh into {} (scripts/test.sh runs it)",
            bin.display()
        );
        let etcd = Etcd::start();
        let dir = tempfile::tempdir().unwrap();
        let sa_key = dir.path().join("sa.key");
        let ok = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&sa_key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "openssl genrsa");
        std::fs::write(
            dir.path().join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin,system:masters\n"),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("apiserver.log")).unwrap();
        let child = Command::new(&apiserver)
            .arg(format!("--etcd-servers=http://{}", etcd.endpoint()))
            .arg(format!("--secure-port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--cert-dir={}", dir.path().join("certs").display()))
            .arg(format!(
                "--token-auth-file={}",
                dir.path().join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-account-key-file={}", sa_key.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa_key.display()
            ))
            .arg("--service-cluster-ip-range=10.96.0.0/24")
            // No controller-manager creates default service accounts here.
            .arg("--disable-admission-plugins=ServiceAccount")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        crate::reap_at_exit(child.id());
        let cp = ControlPlane {
            etcd,
            apiserver: child,
            dir,
            port,
            helm,
            kubectl,
        };
        let admin = cp.kubeconfig(ADMIN_TOKEN, "admin");
        wait_until("kube-apiserver ready", || {
            Command::new(&cp.helm)
                .args(["--kubeconfig"])
                .arg(&admin)
                .args(["list", "-A"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        for ns in namespaces {
            let (ok, _, err) = cp.kubectl(&["create", "namespace", ns], "");
            assert!(ok, "creating namespace {ns}: {err}");
        }
        let out = Command::new(&cp.helm)
            .arg("--kubeconfig")
            .arg(&admin)
            .args(["install", "goim"])
            .arg(chart)
            .args(["--namespace", "goim-system", "--create-namespace"])
            .args(helm_args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "helm install: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cp
    }

    /// Writes a kubeconfig file for `name` (helm and kubectl read files).
    pub fn kubeconfig(&self, token: &str, name: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        std::fs::write(&path, kubeconfig_text(self.port, token, name)).unwrap();
        path
    }

    /// Runs kubectl as the admin with `stdin` piped in; returns success, stdout and stderr.
    pub fn kubectl(&self, args: &[&str], stdin: &str) -> (bool, String, String) {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig")
            .arg(self.dir.path().join("admin.kubeconfig"))
            .args(args);
        crate::run_with_stdin(cmd, stdin)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.apiserver.kill();
        let _ = self.apiserver.wait();
        crate::forget(self.apiserver.id());
    }
}
