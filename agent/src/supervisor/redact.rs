//! Secrets never leave the agent in a service's words: the values of the
//! service's secrets are replaced in every line it prints and every answer
//! quoted, before anything is journaled, sent to watchers or put into a
//! failure message. A careless service that logs its token at start-up
//! still cannot leak it into reports.

use std::borrow::Cow;

use crate::config::ServiceConfig;

/// Values shorter than this are not redacted: they would match everywhere
/// and protect nothing.
const MIN_SECRET_LEN: usize = 6;

#[derive(Debug, Default)]
pub(super) struct Secrets(Vec<(String, String)>);

impl Secrets {
    /// The service's secrets as they are in their files now.
    pub(super) fn read(cfg: &ServiceConfig) -> Secrets {
        let values = cfg
            .secrets
            .iter()
            .filter_map(|(name, path)| std::fs::read_to_string(path).ok().map(|v| (name.clone(), v.trim().to_owned())))
            .filter(|(_, v)| v.len() >= MIN_SECRET_LEN)
            .collect();
        Secrets(values)
    }

    pub(super) fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for (name, value) in &self.0 {
            if out.contains(value.as_str()) {
                out = Cow::Owned(out.replace(value.as_str(), &format!("[REDACTED: {name}]")));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_value_never_survives_in_a_line() {
        let s = Secrets(vec![("HF_TOKEN".into(), "hf_abcdef123".into()), ("DB".into(), "pa55word!".into())]);
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
}
