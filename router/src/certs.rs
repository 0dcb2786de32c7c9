//! Development certificates for the gateway ⇄ router link (mutual TLS).
//!
//! `router certs --out DIR` writes a fresh CA and, signed by it, a gateway
//! (client) certificate, the development router certificate `router.pem` for
//! [`DEV_NAME`] (`localhost`, `127.0.0.1`, `::1`), and with `--names A,B,…`
//! one certificate per router, `router-A.pem`, valid for that name only.
//! Gateways verify a router's certificate against the name they list it by
//! (`A@ADDR`), so one router cannot pass for another; routers verify their
//! peers' certificates the same way. Router certificates serve as server and
//! as client (routers call each other). Production deployments bring their
//! own PKI and point the same config keys at it.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use proto::peer::{DEV_NAME, valid_name};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Where [`generate`] wrote the files.
#[derive(Debug, Clone)]
pub struct CertPaths {
    /// The CA certificate (both sides trust it).
    pub ca_cert: PathBuf,
    /// The router's certificate chain.
    pub router_cert: PathBuf,
    /// The router's private key.
    pub router_key: PathBuf,
    /// The gateway's client certificate.
    pub gateway_cert: PathBuf,
    /// The gateway's private key.
    pub gateway_key: PathBuf,
}

impl CertPaths {
    /// The certificate and key of the router named `name` inside `dir`.
    pub fn router_in_dir(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        if name == DEV_NAME {
            (dir.join("router.pem"), dir.join("router.key"))
        } else {
            (dir.join(format!("router-{name}.pem")), dir.join(format!("router-{name}.key")))
        }
    }

    /// The file names [`generate`] uses inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        CertPaths {
            ca_cert: dir.join("ca.pem"),
            router_cert: dir.join("router.pem"),
            router_key: dir.join("router.key"),
            gateway_cert: dir.join("gateway.pem"),
            gateway_key: dir.join("gateway.key"),
        }
    }
}

/// Writes a development CA, a gateway certificate, the development router
/// certificate and one certificate for each router of `names` into `dir`.
pub fn generate(dir: &Path, names: &[String]) -> anyhow::Result<CertPaths> {
    for n in names {
        valid_name(n).map_err(anyhow::Error::msg)?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let paths = CertPaths::in_dir(dir);

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "Switchyard development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let leaf = |name: &str,
                sans: Vec<String>,
                usage: &[ExtendedKeyUsagePurpose]|
     -> anyhow::Result<(String, String)> {
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = usage.to_vec();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let router = [ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let (router_pem, router_key) =
        leaf("switchyard-router", vec![DEV_NAME.into(), "127.0.0.1".into(), "::1".into()], &router)?;
    for name in names.iter().filter(|n| *n != DEV_NAME) {
        let (pem, key) = leaf(&format!("switchyard-router {name}"), vec![name.clone()], &router)?;
        let (cert_path, key_path) = CertPaths::router_in_dir(dir, name);
        fs::write(cert_path, pem)?;
        write_private(&key_path, &key)?;
    }
    let (gateway_pem, gateway_key) = leaf(
        "switchyard-gateway",
        vec!["gateway.switchyard.local".into()],
        &[ExtendedKeyUsagePurpose::ClientAuth],
    )?;

    fs::write(&paths.ca_cert, ca.pem())?;
    fs::write(&paths.router_cert, router_pem)?;
    write_private(&paths.router_key, &router_key)?;
    fs::write(&paths.gateway_cert, gateway_pem)?;
    write_private(&paths.gateway_key, &gateway_key)?;
    Ok(paths)
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    std::io::Write::write_all(&mut f, contents.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_usable_set() {
        let dir = std::env::temp_dir().join(format!("switchyard-certs-{}", std::process::id()));
        let p = generate(&dir, &["r1".into(), "r2.example".into()]).unwrap();
        let (r1, r1_key) = CertPaths::router_in_dir(&dir, "r1");
        let (r2, r2_key) = CertPaths::router_in_dir(&dir, "r2.example");
        for f in [
            &p.ca_cert,
            &p.router_cert,
            &p.router_key,
            &p.gateway_cert,
            &p.gateway_key,
            &r1,
            &r1_key,
            &r2,
            &r2_key,
        ] {
            let text = fs::read_to_string(f).unwrap();
            assert!(text.starts_with("-----BEGIN"), "{}", f.display());
        }
        assert!(generate(&dir, &["not a name".into()]).is_err());
        fs::remove_dir_all(dir).unwrap();
    }
}
