//! The wire contract between controller and agent (`proctor.agent.v1`).
//!
//! The Rust code under `src/gen/` is generated from `proto/` by
//! `tests/codegen.rs` (protox + tonic-prost-build, no protoc) and committed, so
//! building Proctor never needs a protobuf compiler. That test fails when the
//! committed code differs from what the `.proto` files produce; run it with
//! `PROCTOR_BLESS=1` to rewrite the committed code.

pub mod admission;

/// Version of this contract, sent in `GetInfo`. Bumped on incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

#[expect(clippy::all, clippy::pedantic, reason = "generated code")]
#[rustfmt::skip]
pub mod agent {
    include!("gen/proctor.agent.v1.rs");
}

pub use agent::*;

impl Stage {
    /// Stages a model passes through while loading, in order.
    pub const LOADING: [Stage; 6] = [
        Stage::ProcessStarting,
        Stage::WaitingForHttp,
        Stage::Authenticating,
        Stage::Downloading,
        Stage::LoadingWeights,
        Stage::WarmingUp,
    ];

    /// True once the model is done loading, one way or the other.
    pub fn is_terminal(self) -> bool {
        matches!(self, Stage::Ready | Stage::Failed | Stage::Stopped)
    }

    /// The name people read: `LOADING_WEIGHTS`.
    pub fn label(self) -> &'static str {
        self.as_str_name()
    }
}

impl ExitKind {
    pub fn label(self) -> &'static str {
        self.as_str_name()
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = self.kind();
        match kind {
            ExitKind::Crashed => write!(f, "CRASHED({})", self.code),
            ExitKind::Signaled => write!(f, "SIGNALED({})", self.signal),
            other => f.write_str(other.label()),
        }
    }
}
