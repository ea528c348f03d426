//! GPU admission and placement: on which devices may a load's GPU memory go?
//! Pure, shared by the agent (before every load, and to choose the devices
//! it puts in `CUDA_VISIBLE_DEVICES`) and the controller's placement.
//!
//! A service either pins devices (`gpus = [0, 1]`: the need is split evenly
//! across them, as tensor parallelism does, and each must have its share
//! free) or takes `auto` (one device: the one with the most memory left
//! after reservations, if the whole need fits there).

use std::fmt;

use super::mib;

/// One GPU as admission sees it, bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuRoom {
    pub index: u32,
    pub total: u64,
    pub used: u64,
    /// Promised to loads admitted on it and still loading.
    pub reserved: u64,
}

impl GpuRoom {
    /// What is left for a new load.
    pub fn free(&self) -> u64 {
        self.total.saturating_sub(self.used).saturating_sub(self.reserved)
    }
}

/// Which devices a service may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuPin {
    /// One device, chosen at admission.
    Auto,
    /// These devices, the need split evenly across them.
    Devices(Vec<u32>),
}

impl fmt::Display for GpuPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuPin::Auto => f.write_str("auto"),
            GpuPin::Devices(d) => write!(f, "{}", d.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")),
        }
    }
}

/// A refused GPU load, with the numbers of every device considered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuRefusal {
    pub need: u64,
    pub headroom: u64,
    pub pin: GpuPin,
    /// The devices the decision looked at (the pinned ones, or all for auto).
    pub devices: Vec<GpuRoom>,
    /// Pinned devices the host does not have.
    pub missing: Vec<u32>,
}

impl fmt::Display for GpuRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let want = self.need + self.headroom;
        write!(
            f,
            "not enough GPU memory: needs {} ({} declared + {} headroom)",
            mib(want),
            mib(self.need),
            mib(self.headroom)
        )?;
        match &self.pin {
            GpuPin::Auto => f.write_str(" on one GPU")?,
            GpuPin::Devices(d) => {
                write!(f, ", {} on each of GPUs {}", mib(want.div_ceil(d.len().max(1) as u64)), self.pin)?
            }
        }
        if !self.missing.is_empty() {
            let missing: Vec<String> = self.missing.iter().map(u32::to_string).collect();
            return write!(f, ", but this host has no GPU {} (fix the service's `gpus`)", missing.join(", "));
        }
        if self.devices.is_empty() {
            return f.write_str(", but this host has no GPU that NVML can see");
        }
        let each: Vec<String> = self
            .devices
            .iter()
            .map(|d| {
                format!(
                    "GPU {}: {} free of {} ({} used, {} reserved)",
                    d.index,
                    mib(d.free()),
                    mib(d.total),
                    mib(d.used),
                    mib(d.reserved)
                )
            })
            .collect();
        write!(f, "; {}", each.join("; "))
    }
}

/// The devices a load of `need + headroom` GPU bytes goes to, or why none.
/// A load that needs no GPU memory still gets its devices (pinned, or for
/// auto the freest one) but is never refused; no devices (no NVML) then
/// means none to give.
pub fn place_gpu(need: u64, headroom: u64, pin: &GpuPin, devices: &[GpuRoom]) -> Result<Vec<u32>, GpuRefusal> {
    let want = need.saturating_add(headroom);
    let refuse = |looked: Vec<GpuRoom>, missing: Vec<u32>| GpuRefusal {
        need,
        headroom,
        pin: pin.clone(),
        devices: looked,
        missing,
    };
    match pin {
        GpuPin::Devices(pinned) => {
            let missing: Vec<u32> = pinned.iter().copied().filter(|i| !devices.iter().any(|d| d.index == *i)).collect();
            let looked: Vec<GpuRoom> = devices.iter().copied().filter(|d| pinned.contains(&d.index)).collect();
            if want == 0 {
                return Ok(pinned.clone());
            }
            if !missing.is_empty() {
                return Err(refuse(looked, missing));
            }
            let share = want.div_ceil(pinned.len().max(1) as u64);
            if looked.iter().all(|d| d.free() >= share) { Ok(pinned.clone()) } else { Err(refuse(looked, missing)) }
        }
        GpuPin::Auto => {
            // Most room first; the lower index among equals.
            let best = devices.iter().max_by(|a, b| a.free().cmp(&b.free()).then(b.index.cmp(&a.index)));
            match best {
                Some(d) if d.free() >= want => Ok(vec![d.index]),
                None if want == 0 => Ok(Vec::new()),
                _ => Err(refuse(devices.to_vec(), Vec::new())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn gpu(index: u32, total: u64, used: u64, reserved: u64) -> GpuRoom {
        GpuRoom { index, total: total * MIB, used: used * MIB, reserved: reserved * MIB }
    }

    /// (need MiB, headroom MiB, pin, devices) -> devices, or refused.
    type Row<'a> = (u64, u64, GpuPin, &'a [GpuRoom], Result<Vec<u32>, ()>);

    #[test]
    fn devices_are_chosen_by_room_left_after_reservations() {
        let two = [gpu(0, 81920, 60000, 0), gpu(1, 81920, 10000, 30000)];
        let even = [gpu(0, 40960, 0, 0), gpu(1, 40960, 0, 0)];
        // (need MiB, headroom MiB, pin, devices) -> devices or the refused.
        let table: [Row<'_>; 11] = [
            (20000, 0, GpuPin::Auto, &two, Ok(vec![1])),
            (41920, 0, GpuPin::Auto, &two, Ok(vec![1])),
            (41921, 0, GpuPin::Auto, &two, Err(())),
            (40000, 2000, GpuPin::Auto, &two, Err(())),
            (30000, 0, GpuPin::Auto, &even, Ok(vec![0])),
            (0, 0, GpuPin::Auto, &[], Ok(vec![])),
            (1, 0, GpuPin::Auto, &[], Err(())),
            (60000, 0, GpuPin::Devices(vec![0, 1]), &even, Ok(vec![0, 1])),
            (90000, 0, GpuPin::Devices(vec![0, 1]), &even, Err(())),
            (25000, 0, GpuPin::Devices(vec![0]), &two, Err(())),
            (0, 0, GpuPin::Devices(vec![7]), &two, Ok(vec![7])),
        ];
        for (need, headroom, pin, devices, want) in table {
            let got = place_gpu(need * MIB, headroom * MIB, &pin, devices).map_err(|_| ());
            assert_eq!(got, want, "{need} + {headroom} MiB, pin {pin}, on {devices:?}");
        }
    }

    #[test]
    fn a_refusal_names_every_device_with_its_numbers() {
        let two = [gpu(0, 81920, 60000, 0), gpu(1, 81920, 10000, 30000)];
        let r = place_gpu(70000 * MIB, 2048 * MIB, &GpuPin::Auto, &two).unwrap_err();
        assert_eq!(
            r.to_string(),
            "not enough GPU memory: needs 72048 MiB (70000 MiB declared + 2048 MiB headroom) on one GPU; GPU 0: 21920 \
             MiB free of 81920 MiB (60000 MiB used, 0 MiB reserved); GPU 1: 41920 MiB free of 81920 MiB (10000 MiB \
             used, 30000 MiB reserved)"
        );
        let r = place_gpu(50000 * MIB, 0, &GpuPin::Devices(vec![0, 1]), &two).unwrap_err();
        assert_eq!(
            r.to_string(),
            "not enough GPU memory: needs 50000 MiB (50000 MiB declared + 0 MiB headroom), 25000 MiB on each of GPUs \
             0, 1; GPU 0: 21920 MiB free of 81920 MiB (60000 MiB used, 0 MiB reserved); GPU 1: 41920 MiB free of \
             81920 MiB (10000 MiB used, 30000 MiB reserved)"
        );
        let r = place_gpu(MIB, 0, &GpuPin::Devices(vec![1, 3]), &two).unwrap_err();
        assert!(r.to_string().ends_with("but this host has no GPU 3 (fix the service's `gpus`)"), "{r}");
        let r = place_gpu(MIB, 0, &GpuPin::Auto, &[]).unwrap_err();
        assert!(r.to_string().ends_with("but this host has no GPU that NVML can see"), "{r}");
    }
}
