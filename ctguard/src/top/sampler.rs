//! The sampling side of `top`: owns the sensors, reads the maps and every
//! namespace's table once per tick. Runs on its own thread in the TUI.
use std::time::Instant;

use super::model::{Sample, TableGauge};
use crate::{
    conntrack,
    error::CtguardError,
    netns::{self, Netns},
    sensors::{SensorOptions, Sensors},
};

/// Namespaces are rediscovered this often (listing /proc is not free).
const NETNS_REFRESH_S: f64 = 10.0;

pub struct Sampler {
    sensors: Sensors,
    started: Instant,
    namespaces: Vec<Netns>,
    listed_at_s: f64,
    /// Only this namespace's table is read, when the user asked for one.
    only: Option<u32>,
}

impl Sampler {
    pub fn start(opts: &SensorOptions, only: Option<u32>) -> Result<Self, CtguardError> {
        let sensors = Sensors::start(opts)?;
        Ok(Self { sensors, started: Instant::now(), namespaces: Vec::new(), listed_at_s: f64::NEG_INFINITY, only })
    }

    /// The sensors, e.g. to take their ring buffer (`capture`).
    pub fn sensors_mut(&mut self) -> &mut Sensors {
        &mut self.sensors
    }

    /// The backend the sensors use (for the header).
    pub fn backend(&self) -> crate::sensors::backend::Backend {
        self.sensors.backend
    }

    pub fn sample(&mut self) -> Result<Sample, CtguardError> {
        let at_s = self.started.elapsed().as_secs_f64();
        if at_s - self.listed_at_s >= NETNS_REFRESH_S {
            self.namespaces =
                netns::list_all()?.into_iter().filter(|ns| self.only.is_none_or(|o| o == ns.inode)).collect();
            self.listed_at_s = at_s;
        }
        let snapshot = self.sensors.snapshot()?;
        let mut tables = Vec::new();
        for ns in &self.namespaces {
            // A namespace may vanish between listing and reading: skip it.
            let Ok(view) = conntrack::read_netns(ns) else { continue };
            if let Some(t) = view.active() {
                let early_drop = t.stats.summed().get("early_drop").unwrap_or(0);
                tables.push(TableGauge {
                    netns: ns.inode,
                    label: ns.label(),
                    entries: t.entries,
                    max: t.max,
                    buckets: t.buckets,
                    early_drop,
                });
            }
        }
        Ok(Sample { at_s, snapshot, tables, programs: self.sensors.program_stats() })
    }
}
