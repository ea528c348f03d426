//! GPU telemetry through NVML, loaded at run time with `nvml-wrapper` (the
//! library path is configurable: `nvml_library`). Without it GPU sampling
//! is off, said once, and everything else works as before. Per device:
//! memory, utilisation, temperature, power, and GPU memory per process —
//! which `attribute` turns into a service's GPU memory.

use std::collections::HashSet;
use std::path::Path;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;

/// One device as sampled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Device {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub used_bytes: u64,
    pub total_bytes: u64,
    pub utilization_percent: u32,
    pub temperature_celsius: u32,
    pub power_milliwatts: u32,
    /// (pid, GPU memory) of every process with a context on it.
    pub processes: Vec<(u32, u64)>,
}

/// NVML, opened.
pub struct Gpus {
    nvml: Nvml,
}

impl std::fmt::Debug for Gpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gpus(NVML)")
    }
}

impl Gpus {
    /// Loads NVML (`library`, or the driver's usual name); `None`, with one
    /// log line, when there is none.
    pub fn open(library: Option<&Path>) -> Option<Gpus> {
        let mut builder = Nvml::builder();
        if let Some(path) = library {
            builder.lib_path(path.as_os_str());
        }
        match builder.init() {
            Ok(nvml) => {
                let count = nvml.device_count().unwrap_or(0);
                tracing::info!(devices = count, "GPU sampling on (NVML)");
                Some(Gpus { nvml })
            }
            Err(error) => {
                let library = library.map_or("libnvidia-ml.so".to_owned(), |p| p.display().to_string());
                tracing::info!(%library, %error, "GPU sampling off: no NVML here");
                None
            }
        }
    }

    /// Every device now; a device NVML cannot read is left out.
    pub fn sample(&self) -> Vec<Device> {
        let count = self.nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|i| self.device(i).inspect_err(|e| tracing::debug!(index = i, %e, "GPU unreadable")).ok())
            .collect()
    }

    fn device(&self, index: u32) -> Result<Device, nvml_wrapper::error::NvmlError> {
        let d = self.nvml.device_by_index(index)?;
        let memory = d.memory_info()?;
        let mut processes: Vec<(u32, u64)> = Vec::new();
        let compute = d.running_compute_processes().unwrap_or_default();
        let graphics = d.running_graphics_processes().unwrap_or_default();
        for p in compute.into_iter().chain(graphics) {
            let used = match p.used_gpu_memory {
                nvml_wrapper::enums::device::UsedGpuMemory::Used(bytes) => bytes,
                nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => 0,
            };
            // A process with both kinds of context is one process.
            match processes.iter_mut().find(|(pid, _)| *pid == p.pid) {
                Some(known) => known.1 = known.1.max(used),
                None => processes.push((p.pid, used)),
            }
        }
        Ok(Device {
            index,
            name: d.name().unwrap_or_default(),
            uuid: d.uuid().unwrap_or_default(),
            used_bytes: memory.used,
            total_bytes: memory.total,
            utilization_percent: d.utilization_rates().map_or(0, |u| u.gpu),
            temperature_celsius: d.temperature(TemperatureSensor::Gpu).unwrap_or(0),
            power_milliwatts: d.power_usage().unwrap_or(0),
            processes,
        })
    }
}

/// A service's GPU memory: what its processes (`pids`: its tree and its
/// cgroup) use, over every device. Pure.
pub fn attribute(devices: &[Device], pids: &HashSet<u32>) -> u64 {
    devices.iter().flat_map(|d| &d.processes).filter(|(pid, _)| pids.contains(pid)).map(|(_, bytes)| bytes).sum()
}

impl Device {
    /// Its memory as admission sees it (nothing reserved yet).
    pub fn room(&self) -> proto::admission::GpuRoom {
        proto::admission::GpuRoom { index: self.index, total: self.total_bytes, used: self.used_bytes, reserved: 0 }
    }

    /// The wire form, each process named by the service it belongs to.
    pub fn to_proto(&self, service_of: impl Fn(u32) -> Option<String>) -> proto::GpuDevice {
        proto::GpuDevice {
            index: self.index,
            name: self.name.clone(),
            uuid: self.uuid.clone(),
            memory_used_bytes: self.used_bytes,
            memory_total_bytes: self.total_bytes,
            utilization_percent: self.utilization_percent,
            temperature_celsius: self.temperature_celsius,
            power_milliwatts: self.power_milliwatts,
            processes: self
                .processes
                .iter()
                .map(|(pid, bytes)| proto::GpuProcess {
                    pid: *pid,
                    memory_bytes: *bytes,
                    service: service_of(*pid).unwrap_or_default(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_gets_the_gpu_memory_of_its_own_processes_on_every_device() {
        let device = |index, processes: Vec<(u32, u64)>| Device { index, processes, ..Device::default() };
        let devices = [device(0, vec![(10, 100), (20, 5000)]), device(1, vec![(11, 30), (99, 7)])];
        // (the service's pids, its GPU memory)
        let table: [(&[u32], u64); 4] = [(&[10, 11, 12], 130), (&[20], 5000), (&[], 0), (&[42], 0)];
        for (pids, want) in table {
            let pids: HashSet<u32> = pids.iter().copied().collect();
            assert_eq!(attribute(&devices, &pids), want, "{pids:?}");
        }
    }
}
