//! The inventory: which agents a controller may use, from a TOML file
//! (`--inventory`) and/or `--agent HOST:PORT` flags.
//!
//! ```toml
//! [[agent]]
//! name = "gpu-01"
//! address = "10.0.0.5:7700"
//! labels = ["a100", "team-nlp"]
//! ```

use std::path::Path;

use serde::Deserialize;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub address: String,
    pub labels: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    #[serde(default, rename = "agent")]
    agents: Vec<RawEntry>,
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

/// Reads the inventory file (if any) and adds `--agent` addresses.
pub fn load(file: Option<&Path>, flags: &[String]) -> Result<Vec<Entry>, InventoryError> {
    let mut entries = Vec::new();
    if let Some(path) = file {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| InventoryError::Read { path: shown.clone(), source })?;
        let raw: RawInventory =
            toml::from_str(&text).map_err(|e| InventoryError::Parse { path: shown.clone(), message: e.to_string() })?;
        for (i, a) in raw.agents.into_iter().enumerate() {
            if a.address.trim().is_empty() {
                return Err(InventoryError::Invalid { path: shown, message: format!("agent[{i}].address is empty") });
            }
            let name = a.name.unwrap_or_else(|| a.address.clone());
            if entries.iter().any(|e: &Entry| e.name == name) {
                return Err(InventoryError::Invalid {
                    path: shown,
                    message: format!("agent name {name:?} is used twice"),
                });
            }
            entries.push(Entry { name, address: a.address, labels: a.labels });
        }
    }
    for address in flags {
        if !entries.iter().any(|e| e.address == *address) {
            entries.push(Entry { name: address.clone(), address: address.clone(), labels: Vec::new() });
        }
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
        let got = load(Some(&file), &["10.0.0.5:7700".into(), "127.0.0.1:7701".into()]).unwrap();
        assert_eq!(got.len(), 2, "an address given twice is one agent");
        assert_eq!(
            got[0],
            Entry { name: "gpu-01".into(), address: "10.0.0.5:7700".into(), labels: vec!["a100".into()] }
        );
        assert_eq!(got[1].name, "127.0.0.1:7701");
        std::fs::write(&file, "[[agent]]\naddress = \"x:1\"\nlabel = [\"typo\"]\n").unwrap();
        let err = load(Some(&file), &[]).unwrap_err().to_string();
        assert!(err.contains("unknown field `label`"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
