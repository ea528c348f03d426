//! The inventory: which agents a controller may use, from a TOML file
//! (`--inventory`) and/or `--agent HOST:PORT` flags.
//!
//! ```toml
//! [[agent]]
//! name = "gpu-01"
//! address = "10.0.0.5:7700"
//! labels = ["a100", "team-nlp"]
//! ```
//!
//! and how to reach them (docs/security.md): an `[access]` table with the
//! lab CA, this controller's certificate and key, or a token file — each
//! also given by `--ca`, `--cert`, `--key`, `--token-file`, which win.
//! With a CA, every agent must present a certificate naming it: its `name`,
//! or the host part of its address when it has none.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::client::Security;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub address: String,
    pub labels: Vec<String>,
    /// The name the agent's certificate must carry.
    pub tls_name: String,
    pub security: Arc<Security>,
}

impl Entry {
    /// An agent known only by its address, reached in plaintext.
    pub fn plain(address: &str) -> Entry {
        Entry {
            name: address.to_owned(),
            address: address.to_owned(),
            labels: Vec::new(),
            tls_name: host_of(address),
            security: Arc::default(),
        }
    }
}

/// The host part of `HOST:PORT` (or `[V6]:PORT`).
fn host_of(address: &str) -> String {
    let bare = address.rsplit_once("://").map_or(address, |(_, rest)| rest);
    let host = bare.rsplit_once(':').map_or(bare, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']').to_owned()
}

/// How to reach agents: files named by flags (or the inventory's `[access]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// The lab CA: agents are reached over TLS and must chain to it.
    pub ca: Option<PathBuf>,
    /// This controller's certificate and key (mTLS).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// A file holding the bearer token (token mode).
    pub token_file: Option<PathBuf>,
}

impl Access {
    /// Flags win over the file's values (which are relative to the file).
    fn over(&self, file: Access, base: &Path) -> Access {
        let pick =
            |flag: &Option<PathBuf>, from_file: Option<PathBuf>| flag.clone().or(from_file.map(|p| base.join(p)));
        Access {
            ca: pick(&self.ca, file.ca),
            cert: pick(&self.cert, file.cert),
            key: pick(&self.key, file.key),
            token_file: pick(&self.token_file, file.token_file),
        }
    }

    /// Reads the files: what every connection will present and trust.
    pub fn read(&self) -> Result<Security, String> {
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).map_err(|e| format!("cannot read the {what} {}: {e}", p.display()))
        };
        if self.ca.is_none() && (self.cert.is_some() || self.key.is_some()) {
            return Err("--cert/--key need --ca, the lab CA that signed the agents' certificates".into());
        }
        let identity = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some((read(c, "certificate")?, read(k, "key")?)),
            (None, None) => None,
            _ => return Err("--cert and --key go together".into()),
        };
        let token = match &self.token_file {
            Some(p) => {
                let text =
                    String::from_utf8(read(p, "token file")?).map_err(|_| format!("{} is not text", p.display()))?;
                let token = text.trim().to_owned();
                if token.is_empty() || token.contains(char::is_whitespace) {
                    return Err(format!("token file {} must hold one token and nothing else", p.display()));
                }
                Some(token)
            }
            None => None,
        };
        let ca_pem = self.ca.as_ref().map(|p| read(p, "lab CA certificate")).transpose()?;
        Ok(Security { ca_pem, identity, token })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    #[serde(default, rename = "agent")]
    agents: Vec<RawEntry>,
    #[serde(default)]
    access: Access,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: Option<String>,
    address: String,
    #[serde(default)]
    labels: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read inventory {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("inventory {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("inventory {path}: {message}")]
    Invalid { path: String, message: String },
}

/// Reads the inventory file (if any), adds `--agent` addresses, and reads
/// the access files (`access` from flags beats the file's `[access]`).
pub fn load(file: Option<&Path>, flags: &[String], access: &Access) -> Result<Vec<Entry>, InventoryError> {
    let mut entries = Vec::new();
    let mut from_file = Access::default();
    let mut base = PathBuf::new();
    if let Some(path) = file {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| InventoryError::Read { path: shown.clone(), source })?;
        let raw: RawInventory =
            toml::from_str(&text).map_err(|e| InventoryError::Parse { path: shown.clone(), message: e.to_string() })?;
        from_file = raw.access;
        base = path.parent().map(Path::to_owned).unwrap_or_default();
        for (i, a) in raw.agents.into_iter().enumerate() {
            if a.address.trim().is_empty() {
                return Err(InventoryError::Invalid { path: shown, message: format!("agent[{i}].address is empty") });
            }
            let tls_name = a.name.clone().unwrap_or_else(|| host_of(&a.address));
            let name = a.name.unwrap_or_else(|| a.address.clone());
            if entries.iter().any(|e: &Entry| e.name == name) {
                return Err(InventoryError::Invalid {
                    path: shown,
                    message: format!("agent name {name:?} is used twice"),
                });
            }
            entries.push(Entry { name, address: a.address, labels: a.labels, tls_name, security: Arc::default() });
        }
    }
    for address in flags {
        if !entries.iter().any(|e| e.address == *address) {
            entries.push(Entry::plain(address));
        }
    }
    let shown = file.map_or("(flags)".to_owned(), |p| p.display().to_string());
    let security = Arc::new(
        access.over(from_file, &base).read().map_err(|message| InventoryError::Invalid { path: shown, message })?,
    );
    for e in &mut entries {
        e.security = security.clone();
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_flags_merge() {
        let dir = std::env::temp_dir().join(format!("proctor-inventory-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("inventory.toml");
        std::fs::write(&file, "[[agent]]\nname = \"gpu-01\"\naddress = \"10.0.0.5:7700\"\nlabels = [\"a100\"]\n")
            .unwrap();
        let got = load(Some(&file), &["10.0.0.5:7700".into(), "127.0.0.1:7701".into()], &Access::default()).unwrap();
        assert_eq!(got.len(), 2, "an address given twice is one agent");
        assert_eq!(
            got[0],
            Entry {
                name: "gpu-01".into(),
                address: "10.0.0.5:7700".into(),
                labels: vec!["a100".into()],
                tls_name: "gpu-01".into(),
                security: Arc::default()
            }
        );
        assert_eq!(got[1].name, "127.0.0.1:7701");
        assert_eq!(got[1].tls_name, "127.0.0.1", "without a name, the certificate must name the host");
        std::fs::write(&file, "[[agent]]\naddress = \"x:1\"\nlabel = [\"typo\"]\n").unwrap();
        let err = load(Some(&file), &[], &Access::default()).unwrap_err().to_string();
        assert!(err.contains("unknown field `label`"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
