//! `proctor certs`: a lab CA and the certificates agents and controllers
//! present to each other (mTLS, docs/security.md). The subject says who and
//! which role: `CN=<name>, OU=agent | controller | observer`; an agent's
//! certificate also names every address controllers reach it by (SANs).
//!
//! Files, in one folder: `ca.pem` + `ca.key`, then `<role>-<name>.pem` +
//! `<role>-<name>.key`. Keys are written readable by their owner only, and
//! nothing is ever overwritten.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// What a certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Agent,
    Controller,
    Observer,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Agent => "agent",
            Kind::Controller => "controller",
            Kind::Observer => "observer",
        }
    }
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From an hour ago (clocks drift) for `days` days.
    pub fn days(days: u32) -> Validity {
        let days = days.max(1);
        let now = SystemTime::now();
        Validity {
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(u64::from(days) * 24 * 3600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path} already exists; certificates are never overwritten (move it away, or use another --dir)")]
    Exists { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read the lab CA at {path}: {reason} (create one with `proctor certs init --dir {dir}`)")]
    NoCa { path: PathBuf, dir: String, reason: String },
    #[error("{0:?} is not a valid name for a certificate: use letters, digits, '.', '-' and '_'")]
    BadName(String),
    #[error("cannot make the certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// The paths of one certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `<dir>/<stem>.pem` and `<dir>/<stem>.key`.
pub fn pair(dir: &Path, stem: &str) -> Pair {
    Pair { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}.key")) }
}

/// Where `issue` puts a certificate of this kind and name.
pub fn issued(dir: &Path, kind: Kind, name: &str) -> Pair {
    pair(dir, &format!("{}-{name}", kind.as_str()))
}

fn subject(name: &str, unit: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationalUnitName, unit);
    dn
}

fn params(validity: Validity) -> Result<CertificateParams, CertError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.not_before = validity.not_before.into();
    p.not_after = validity.not_after.into();
    Ok(p)
}

/// Creates the lab CA in `dir`: `ca.pem` (hand it to every agent and
/// controller) and `ca.key` (keep it safe; it signs everything).
pub fn init(dir: &Path, validity: Validity) -> Result<Pair, CertError> {
    let out = pair(dir, "ca");
    refuse_existing(&out)?;
    let mut p = params(validity)?;
    // Each CA its own name, so two labs' (or an old and a new one during
    // rotation) are told apart in every error that names an issuer.
    let id = uuid::Uuid::new_v4().simple().to_string();
    p.distinguished_name = subject(&format!("Proctor lab CA {}", &id[..8]), "ca");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    write(&out, &cert.pem(), &key.serialize_pem())?;
    Ok(out)
}

/// Issues a certificate signed by the CA in `dir`. An agent's names every
/// `san` (host name or IP address) besides its name.
pub fn issue(dir: &Path, kind: Kind, name: &str, sans: &[String], validity: Validity) -> Result<Pair, CertError> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')) {
        return Err(CertError::BadName(name.to_owned()));
    }
    let out = issued(dir, kind, name);
    refuse_existing(&out)?;
    let ca = pair(dir, "ca");
    let no_ca = |reason: String| CertError::NoCa { path: ca.cert.clone(), dir: dir.display().to_string(), reason };
    let ca_cert = std::fs::read_to_string(&ca.cert).map_err(|e| no_ca(e.to_string()))?;
    let ca_key = std::fs::read_to_string(&ca.key).map_err(|e| no_ca(e.to_string()))?;
    let ca_key = KeyPair::from_pem(&ca_key).map_err(|e| no_ca(e.to_string()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key).map_err(|e| no_ca(e.to_string()))?;
    // Nothing outlives the CA that vouches for it.
    let validity =
        Validity { not_after: validity.not_after.min(ca_end(&ca_cert).unwrap_or(validity.not_after)), ..validity };
    let mut p = params(validity)?;
    p.distinguished_name = subject(name, kind.as_str());
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = match kind {
        Kind::Agent => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Kind::Controller | Kind::Observer => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    if kind == Kind::Agent {
        p.subject_alt_names =
            std::iter::once(name).chain(sans.iter().map(String::as_str)).map(san).collect::<Result<_, _>>()?;
    }
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    write(&out, &cert.pem(), &key.serialize_pem())?;
    Ok(out)
}

/// When the CA certificate (PEM) stops being valid.
fn ca_end(pem: &str) -> Option<SystemTime> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let end = cert.validity().not_after.timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(end).ok()?))
}

fn san(name: &str) -> Result<SanType, CertError> {
    Ok(match name.parse::<std::net::IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(name.try_into()?),
    })
}

fn refuse_existing(out: &Pair) -> Result<(), CertError> {
    for path in [&out.cert, &out.key] {
        if path.exists() {
            return Err(CertError::Exists { path: path.clone() });
        }
    }
    Ok(())
}

fn write(out: &Pair, cert: &str, key: &str) -> Result<(), CertError> {
    if let Some(dir) = out.cert.parent() {
        std::fs::create_dir_all(dir).map_err(|source| CertError::Write { path: dir.to_owned(), source })?;
    }
    std::fs::write(&out.cert, cert).map_err(|source| CertError::Write { path: out.cert.clone(), source })?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_owner_only()
        .open(&out.key)
        .map_err(|source| CertError::Write { path: out.key.clone(), source })?;
    file.write_all(key.as_bytes()).map_err(|source| CertError::Write { path: out.key.clone(), source })
}

trait OwnerOnly {
    fn mode_owner_only(&mut self) -> &mut Self;
}

impl OwnerOnly for std::fs::OpenOptions {
    fn mode_owner_only(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("proctor-certs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_ca_then_certificates_for_each_role_and_never_an_overwrite() {
        let dir = scratch("roles");
        let ca = init(&dir, Validity::days(30)).unwrap();
        assert!(std::fs::read_to_string(&ca.cert).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
        let agent = issue(&dir, Kind::Agent, "gpu-01", &["10.0.0.5".into(), "gpu-01.lab".into()], Validity::days(30));
        assert_eq!(agent.unwrap(), issued(&dir, Kind::Agent, "gpu-01"));
        issue(&dir, Kind::Controller, "ci", &[], Validity::days(30)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(issued(&dir, Kind::Controller, "ci").key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "keys are the owner's only");
        let again = issue(&dir, Kind::Controller, "ci", &[], Validity::days(30)).unwrap_err();
        assert!(again.to_string().contains("never overwritten"), "{again}");
        let again = init(&dir, Validity::days(30)).unwrap_err();
        assert!(again.to_string().contains("ca.pem already exists"), "{again}");
        let bad = issue(&dir, Kind::Agent, "gpu 01/..", &[], Validity::days(30)).unwrap_err();
        assert!(bad.to_string().contains("not a valid name"), "{bad}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_certificate_never_outlives_its_ca_and_cas_have_names_of_their_own() {
        let dir = scratch("clamp");
        init(&dir, Validity::days(10)).unwrap();
        let leaf = issue(&dir, Kind::Controller, "ci", &[], Validity::days(3650)).unwrap();
        let end = ca_end(&std::fs::read_to_string(&leaf.cert).unwrap()).unwrap();
        let ca = ca_end(&std::fs::read_to_string(dir.join("ca.pem")).unwrap()).unwrap();
        assert!(end <= ca, "clamped to the CA's end");
        let other = scratch("clamp-other");
        init(&other, Validity::days(10)).unwrap();
        let subject = |d: &Path| {
            let pem = std::fs::read_to_string(d.join("ca.pem")).unwrap();
            let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
            pem.parse_x509().unwrap().subject().to_string()
        };
        assert_ne!(subject(&dir), subject(&other));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&other);
    }

    #[test]
    fn issuing_without_a_ca_says_how_to_make_one() {
        let dir = scratch("no-ca");
        let e = issue(&dir, Kind::Agent, "gpu-01", &[], Validity::days(30)).unwrap_err();
        assert!(e.to_string().contains("proctor certs init --dir"), "{e}");
    }
}
