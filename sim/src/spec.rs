//! Model specifications given on the command line: `NAME[:key=value,...]`.

use std::str::FromStr;

use proto::parse_duration;
use std::time::Duration;

/// A model stage at which a fault can be injected. Names match `/health`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimStage {
    Authenticating,
    Downloading,
    Loading,
    WarmingUp,
}

impl SimStage {
    pub fn as_str(self) -> &'static str {
        match self {
            SimStage::Authenticating => "authenticating",
            SimStage::Downloading => "downloading",
            SimStage::Loading => "loading",
            SimStage::WarmingUp => "warming_up",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "authenticating" => SimStage::Authenticating,
            "downloading" => SimStage::Downloading,
            "loading" => SimStage::Loading,
            "warming_up" => SimStage::WarmingUp,
            _ => return None,
        })
    }
}

/// One simulated model: how big it is, how long each stage takes, faults.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    /// Memory allocated and touched while loading, in MiB.
    pub size_mb: u64,
    pub auth: Duration,
    pub download: Duration,
    pub load: Duration,
    pub warmup: Duration,
    /// Gated: loading needs a non-empty `HF_TOKEN` in the environment.
    pub gated: bool,
    /// Exit the whole process with code 3 on entering this stage.
    pub crash_at: Option<SimStage>,
    /// Stop making progress on entering this stage.
    pub hang_at: Option<SimStage>,
    /// Report progress in `/health` (off: always 0, as many real services do).
    pub report_progress: bool,
    /// Write the "downloaded" bytes to a scratch file while downloading, as a
    /// real download does (off: a download that only waits).
    pub download_io: bool,
}

impl ModelSpec {
    pub fn new(name: &str) -> Self {
        ModelSpec {
            name: name.to_owned(),
            size_mb: 64,
            auth: Duration::from_millis(300),
            download: Duration::from_secs(1),
            load: Duration::from_secs(2),
            warmup: Duration::from_millis(300),
            gated: false,
            crash_at: None,
            hang_at: None,
            report_progress: true,
            download_io: true,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("model spec {spec:?}: the name before ':' is empty (expected e.g. `nllb:mb=300,load=3s`)")]
    EmptyName { spec: String },
    #[error(
        "model spec {spec:?}: unknown key {key:?} (known: mb, auth, download, load, warmup, gated, crash, hang, progress, io)"
    )]
    UnknownKey { spec: String, key: String },
    #[error("model spec {spec:?}: bad value {value:?} for {key}: {reason}")]
    BadValue { spec: String, key: String, value: String, reason: String },
}

impl FromStr for ModelSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let (name, rest) = spec.split_once(':').unwrap_or((spec, ""));
        let name = name.trim();
        if name.is_empty() {
            return Err(SpecError::EmptyName { spec: spec.to_owned() });
        }
        let mut model = ModelSpec::new(name);
        for item in rest.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            let bad = |reason: &str| SpecError::BadValue {
                spec: spec.to_owned(),
                key: key.to_owned(),
                value: value.to_owned(),
                reason: reason.to_owned(),
            };
            let stage = || {
                SimStage::parse(value).ok_or_else(|| bad("expected authenticating, downloading, loading or warming_up"))
            };
            match key {
                "mb" => model.size_mb = value.parse().map_err(|_| bad("expected a whole number of MiB"))?,
                "auth" => {
                    model.auth = parse_duration(value).ok_or_else(|| bad("expected a duration like 500ms or 2s"))?
                }
                "download" => {
                    model.download = parse_duration(value).ok_or_else(|| bad("expected a duration like 500ms or 2s"))?
                }
                "load" => {
                    model.load = parse_duration(value).ok_or_else(|| bad("expected a duration like 500ms or 2s"))?
                }
                "warmup" => {
                    model.warmup = parse_duration(value).ok_or_else(|| bad("expected a duration like 500ms or 2s"))?
                }
                "gated" => model.gated = true,
                "crash" => model.crash_at = Some(stage()?),
                "hang" => model.hang_at = Some(stage()?),
                "progress" => model.report_progress = on_off(value).ok_or_else(|| bad("expected on or off"))?,
                "io" => model.download_io = on_off(value).ok_or_else(|| bad("expected on or off"))?,
                _ => {
                    return Err(SpecError::UnknownKey { spec: spec.to_owned(), key: key.to_owned() });
                }
            }
        }
        Ok(model)
    }
}

fn on_off(value: &str) -> Option<bool> {
    match value {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_spec() {
        let m: ModelSpec =
            "aya:mb=400,auth=1s,download=2s,load=1.5s,warmup=250ms,gated,hang=loading,progress=off,io=off"
                .parse()
                .unwrap();
        assert_eq!(m.name, "aya");
        assert_eq!(m.size_mb, 400);
        assert_eq!(m.auth, Duration::from_secs(1));
        assert_eq!(m.load, Duration::from_millis(1500));
        assert_eq!(m.warmup, Duration::from_millis(250));
        assert!(m.gated);
        assert_eq!(m.hang_at, Some(SimStage::Loading));
        assert_eq!(m.crash_at, None);
        assert!(!m.report_progress && !m.download_io);
    }

    #[test]
    fn a_bare_name_takes_defaults() {
        assert_eq!("nllb".parse::<ModelSpec>().unwrap(), ModelSpec::new("nllb"));
    }

    #[test]
    fn errors_name_the_spec_and_the_fix() {
        let err = "nllb:size=3".parse::<ModelSpec>().unwrap_err();
        assert!(err.to_string().contains("unknown key \"size\""), "{err}");
        let err = "nllb:load=soon".parse::<ModelSpec>().unwrap_err();
        assert!(err.to_string().contains("expected a duration"), "{err}");
        assert!(matches!(":mb=1".parse::<ModelSpec>(), Err(SpecError::EmptyName { .. })));
    }
}
