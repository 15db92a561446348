//! Certificates for tests, made by openssl at test time: a CA, and leaf certificates it
//! signs, written as cert-manager lays out a TLS Secret (`tls.crt`, `tls.key`, `ca.crt`).

use std::path::{Path, PathBuf};

use crate::openssl;

pub struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    /// A fresh CA (EC P-256, valid two days) named `name`.
    pub fn new(name: &str) -> TestCa {
        let ca = TestCa {
            dir: tempfile::tempdir().unwrap(),
        };
        let d = ca.dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        ca
    }

    /// The CA's certificate file.
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// Issues a certificate for `sans` (`DNS:x` or `IP:y`), usable by servers and clients,
    /// into `out` (created): `tls.crt`, `tls.key` and this CA's `ca.crt`.
    pub fn issue(&self, out: &Path, cn: &str, sans: &[&str]) {
        std::fs::create_dir_all(out).unwrap();
        let d = self.dir.path();
        let id = format!("leaf{}", fastid());
        let mut ext =
            String::from("basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n");
        if !sans.is_empty() {
            ext.push_str(&format!("subjectAltName={}\n", sans.join(",")));
        }
        std::fs::write(d.join(format!("{id}.ext")), ext).unwrap();
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{id}.key"),
                "-out",
                &format!("{id}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{id}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{id}.crt"),
                "-days",
                "2",
                "-extfile",
                &format!("{id}.ext"),
            ],
        );
        // Written beside and renamed over: a reader never sees half a file.
        for (from, to) in [
            (format!("{id}.crt"), "tls.crt"),
            (format!("{id}.key"), "tls.key"),
            ("ca.crt".to_string(), "ca.crt"),
        ] {
            let tmp = out.join(format!(".{to}.tmp"));
            std::fs::copy(d.join(from), &tmp).unwrap();
            std::fs::rename(&tmp, out.join(to)).unwrap();
        }
    }
}

fn fastid() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
