//! The Proctor controller: parses suites, places them on agents where their
//! models fit, dispatches them over gRPC, waits for models instead of
//! skipping tests, shows progress and writes reports. It talks to agents only
//! through `proto` (see `client`).

pub mod agents;
pub mod client;
pub mod inventory;
pub mod otel;
pub mod progress;
pub mod report;
pub mod run;
pub mod scheduler;
pub mod suite;

pub use run::{Exit, Interrupt, RunOptions, RunResult, run};
