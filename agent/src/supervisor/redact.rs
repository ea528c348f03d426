//! Secrets never leave the agent in a service's words: the values of the
//! service's secrets are replaced in every line it prints and every answer
//! quoted, before anything is journaled, sent to watchers or put into a
//! failure message. A careless service that logs its token at start-up
//! still cannot leak it into reports.

use std::borrow::Cow;
use std::sync::{Arc, RwLock};

use crate::config::ServiceConfig;

/// Values shorter than this are not redacted: they would match everywhere
/// and protect nothing.
const MIN_SECRET_LEN: usize = 6;

/// One service's secret values, shared by its supervisor (which reloads
/// them at every start) and whoever reports for it (case results).
#[derive(Clone, Default)]
pub struct Secrets(Arc<RwLock<Vec<(String, String)>>>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(..)")
    }
}

impl Secrets {
    /// Secrets with these (name, value) pairs, e.g. a test command's own.
    pub fn of(mut values: Vec<(String, String)>) -> Secrets {
        values.retain(|(_, v)| v.len() >= MIN_SECRET_LEN);
        Secrets(Arc::new(RwLock::new(values)))
    }

    /// Takes the service's secrets as they are in their files now.
    pub(super) fn reload(&self, cfg: &ServiceConfig) {
        let mut values: Vec<(String, String)> = cfg
            .secrets
            .iter()
            .filter_map(|(name, path)| std::fs::read_to_string(path).ok().map(|v| (name.clone(), v.trim().to_owned())))
            .collect();
        // Credentials in the service's URL are secrets too.
        if let Some(password) =
            reqwest::Url::parse(&cfg.base_url.replace("{port}", "1")).ok().and_then(|u| u.password().map(str::to_owned))
        {
            values.push(("base_url password".to_owned(), password));
        }
        values.retain(|(_, v)| v.len() >= MIN_SECRET_LEN);
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = values;
    }

    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let values = self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = Cow::Borrowed(text);
        for (name, value) in values.iter() {
            if out.contains(value.as_str()) {
                out = Cow::Owned(out.replace(value.as_str(), &marker(name, &values)));
            }
        }
        out
    }
}

/// What a value is replaced by: `[REDACTED: NAME]`, unless that would spell
/// a secret value itself (a value `REDACTED`, or a name holding a value):
/// then `[***]`, shorter than any value redacted.
fn marker(name: &str, values: &[(String, String)]) -> String {
    let named = format!("[REDACTED: {name}]");
    if values.iter().any(|(_, v)| named.contains(v.as_str())) { "[***]".to_owned() } else { named }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_value_never_survives_in_a_line() {
        let s = Secrets::of(vec![("HF_TOKEN".into(), "hf_abcdef123".into()), ("DB".into(), "pa55word!".into())]);
        // (line, redacted)
        let table = [
            ("using token hf_abcdef123 for the hub", "using token [REDACTED: HF_TOKEN] for the hub"),
            ("hf_abcdef123hf_abcdef123", "[REDACTED: HF_TOKEN][REDACTED: HF_TOKEN]"),
            ("db=pa55word! token=hf_abcdef123", "db=[REDACTED: DB] token=[REDACTED: HF_TOKEN]"),
            ("nothing secret here", "nothing secret here"),
        ];
        for (line, want) in table {
            assert_eq!(s.redact(line), want);
        }
    }

    use proptest::prelude::*;

    proptest! {
        /// Wherever the values are put in whatever text, none survives.
        #[test]
        fn redaction_is_complete(
            values in proptest::collection::vec("[A-Za-z0-9_]{6,16}", 1..4),
            pieces in proptest::collection::vec(".{0,20}", 1..6),
            names in proptest::collection::vec("[A-Z_]{1,12}", 4),
        ) {
            let secrets: Vec<(String, String)> = values.iter().zip(&names).map(|(v, n)| (n.clone(), v.clone())).collect();
            let s = Secrets::of(secrets);
            // The values interleaved with arbitrary text, each once or more.
            let mut text = String::new();
            for (i, piece) in pieces.iter().enumerate() {
                text.push_str(piece);
                text.push_str(&values[i % values.len()]);
            }
            let out = s.redact(&text);
            for v in &values {
                prop_assert!(!out.contains(v.as_str()), "{v:?} survived in {out:?}");
            }
        }
    }

    #[test]
    fn a_password_in_the_services_url_is_a_secret_too() {
        let text =
            "[[service]]\nname = \"t\"\ncommand = [\"sim\"]\nbase_url = \"http://lab:s3cretpass@127.0.0.1:{port}\"\n";
        let cfg = crate::config::Config::parse(text, std::path::Path::new("/tmp/agent.toml")).unwrap();
        let s = Secrets::default();
        s.reload(&cfg.services[0]);
        assert_eq!(
            s.redact("GET http://lab:s3cretpass@127.0.0.1:4100/x"),
            "GET http://lab:[REDACTED: base_url password]@127.0.0.1:4100/x"
        );
    }

    #[test]
    fn a_value_that_spells_the_marker_is_still_redacted() {
        let s = Secrets::of(vec![("TOKEN".into(), "REDACTED".into())]);
        assert_eq!(s.redact("key REDACTED"), "key [***]");
        let s = Secrets::of(vec![("HF_TOKEN".into(), "HF_TOKEN".into())]);
        assert!(!s.redact("HF_TOKEN=HF_TOKEN").contains("HF_TOKEN"));
    }
}
