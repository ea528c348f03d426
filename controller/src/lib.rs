//! The Proctor controller: parses suites, places them on agents where their
//! models fit, dispatches them over gRPC, waits for models instead of
//! skipping tests, shows progress and writes reports. It talks to agents only
//! through `proto` (see `client`).

pub mod agents;
pub mod certs;
pub mod client;
pub mod history;
pub mod inventory;
pub mod otel;
pub mod progress;
pub mod report;
pub mod reporter;
pub mod run;
pub mod scheduler;
pub mod store;
pub mod suite;

pub use run::{Exit, Interrupt, RunOptions, RunResult, run};

#[cfg(test)]
mod tidy {
    //! `client` is the only module that sees the wire (prost types, tonic);
    //! everything else works on domain types. Shared non-wire rules from
    //! `proto` (admission, load limits, the stage enum, duration, time and rate formats) are
    //! allowed.

    const ALLOWED: [&str; 7] =
        ["admission", "load_limits", "Stage", "parse_duration", "format_unix_ms", "format_latency_us", "format_rate"];

    /// `tonic::x` or `proto::x` as a path of its own (not `opentelemetry_proto::`
    /// nor `a::tonic::`), with what follows it.
    fn wire_paths(line: &str) -> Vec<(String, String)> {
        let mut found = Vec::new();
        for root in ["tonic::", "proto::"] {
            for (at, _) in line.match_indices(root) {
                let before = line[..at].chars().last();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                let rest: String =
                    line[at + root.len()..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                found.push((root.trim_end_matches(':').to_owned(), rest));
            }
        }
        found
    }

    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn only_the_client_sees_prost_or_tonic_types() {
        assert_eq!(
            wire_paths("x: proto::AgentInfo, y: tonic::Code"),
            [("tonic".into(), "Code".into()), ("proto".into(), "AgentInfo".into())]
        );
        assert!(wire_paths("opentelemetry_proto::tonic::collector").is_empty());
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut leaks = Vec::new();
        for file in files.iter().filter(|f| !f.ends_with("client.rs") && !f.ends_with("lib.rs")) {
            for (n, line) in std::fs::read_to_string(file).unwrap().lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for (root, item) in wire_paths(code) {
                    if root == "tonic" || !ALLOWED.contains(&item.as_str()) {
                        leaks.push(format!("{}:{}: {root}::{item}", file.display(), n + 1));
                    }
                }
            }
        }
        assert!(leaks.is_empty(), "wire types outside controller/src/client.rs:\n{}", leaks.join("\n"));
    }
}
