//! Certificates for tests, made with rcgen: a CA, leaves signed by it, files for them.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair, SanType};

pub struct Ca {
    pub cert: Certificate,
    pub key: KeyPair,
}

pub fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    Ca { cert: p.self_signed(&key).unwrap(), key }
}

/// A certificate signed by `ca` for `cn`: a server one (127.0.0.1, localhost) or a client
/// one; `expired` puts its validity in the past. Returns (certificate PEM, key PEM).
pub fn leaf(ca: &Ca, cn: &str, server: bool, expired: bool) -> (String, String) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    if server {
        p.subject_alt_names =
            vec![SanType::IpAddress("127.0.0.1".parse().unwrap()), SanType::DnsName("localhost".try_into().unwrap())];
    }
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A server certificate from `ca` for 127.0.0.1, written into `dir`, as rdaxd flags that
/// also require client certificates signed by `ca` (mTLS).
pub fn mtls_flags(dir: &Path, ca: &Ca) -> Vec<String> {
    let (cert, key) = leaf(ca, "rdaxd", true, false);
    let path = |name: &str, text: &str| write(dir, name, text).display().to_string();
    vec![
        "--tls-cert".into(),
        path("server.pem", &cert),
        "--tls-key".into(),
        path("server.key", &key),
        "--tls-client-ca".into(),
        path("clients.pem", &ca.cert.pem()),
    ]
}
