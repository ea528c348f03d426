//! The Proctor controller: parses suites, dispatches them to agents over gRPC,
//! waits for models instead of skipping tests, shows progress and writes
//! reports. It talks to agents only through `proto` (see `client`).

pub mod client;
pub mod progress;
pub mod report;
pub mod run;
pub mod suite;

pub use run::{Exit, RunOptions, RunResult, run};
