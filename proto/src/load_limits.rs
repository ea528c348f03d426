//! The limits a load case is held to, one copy for both sides: the
//! controller refuses a suite past them when it reads it, the agent refuses a
//! `RunCases` call past them (a raw client's) before anything runs.

use std::time::Duration;

/// Connections one load case may open.
pub const MAX_CONNECTIONS: u32 = 1024;
/// Connections when the case does not say.
pub const DEFAULT_CONNECTIONS: u32 = 16;
/// The highest open-loop rate, requests per second.
pub const MAX_RATE: f64 = 1_000_000.0;
/// The lowest open-loop rate (one request per 100 s).
pub const MIN_RATE: f64 = 0.01;
/// The longest a load case runs, warm-up included; also the longest a
/// request of it may take.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
