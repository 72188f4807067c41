//! The per-phase timing report behind `--benchmark-file` (kaniko's `BENCHMARK_FILE`): a JSON
//! document that says where a build's time went, read by the benchmark runner and by people
//! profiling a slow build.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::BuildError;
use crate::events::{BuildEvent, Phase};

/// Timings gathered from a build's event stream.
#[derive(Debug, Default)]
pub struct TimingReport {
    totals: BTreeMap<Phase, Duration>,
    steps: BTreeMap<(usize, usize), StepTimes>,
    stages: BTreeMap<usize, BTreeMap<Phase, Duration>>,
    total: Option<Duration>,
}

#[derive(Debug, Default)]
struct StepTimes {
    line: usize,
    instruction: String,
    wall: Option<Duration>,
    phases: BTreeMap<Phase, Duration>,
}

impl TimingReport {
    /// Takes in one event; events that carry no timing are ignored.
    pub fn record(&mut self, event: &BuildEvent) {
        match event {
            BuildEvent::PhaseFinished {
                stage,
                step,
                phase,
                duration,
            } => {
                *self.totals.entry(*phase).or_default() += *duration;
                match (stage, step) {
                    (Some(stage), Some(step)) => {
                        *self
                            .steps
                            .entry((*stage, *step))
                            .or_default()
                            .phases
                            .entry(*phase)
                            .or_default() += *duration;
                    }
                    (Some(stage), None) => {
                        *self
                            .stages
                            .entry(*stage)
                            .or_default()
                            .entry(*phase)
                            .or_default() += *duration;
                    }
                    _ => {}
                }
            }
            BuildEvent::StepStarted {
                stage,
                step,
                line,
                instruction,
            } => {
                let times = self.steps.entry((*stage, *step)).or_default();
                times.line = *line;
                times.instruction.clone_from(instruction);
            }
            BuildEvent::StepFinished {
                stage,
                step,
                duration,
                ..
            } => {
                self.steps.entry((*stage, *step)).or_default().wall = Some(*duration);
            }
            BuildEvent::BuildFinished { duration, .. } => self.total = Some(*duration),
            _ => {}
        }
    }

    /// Total time spent in `phase` over the whole build (stages running at the same time add
    /// up, so the sum of phases can exceed the wall time).
    pub fn phase_total(&self, phase: Phase) -> Duration {
        self.totals.get(&phase).copied().unwrap_or_default()
    }

    /// The report as JSON: `total_seconds` (wall time, or `null` for a failed build),
    /// `succeeded`, `phases` (seconds per phase name), `stages` (per-stage base phases) and
    /// `steps` (each with stage, step, line, instruction, wall `seconds` and its `phases`).
    pub fn to_json(&self, wall: Duration, succeeded: bool) -> Value {
        let phases = |map: &BTreeMap<Phase, Duration>| -> Value {
            map.iter()
                .map(|(phase, d)| (phase.name().to_owned(), json!(d.as_secs_f64())))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        json!({
            "succeeded": succeeded,
            "total_seconds": self.total.unwrap_or(wall).as_secs_f64(),
            "phases": phases(&self.totals),
            "stages": self.stages.iter().map(|(stage, map)| json!({
                "stage": stage,
                "phases": phases(map),
            })).collect::<Vec<_>>(),
            "steps": self.steps.iter().map(|((stage, step), t)| json!({
                "stage": stage,
                "step": step,
                "line": t.line,
                "instruction": t.instruction,
                "seconds": t.wall.map(|d| d.as_secs_f64()),
                "phases": phases(&t.phases),
            })).collect::<Vec<_>>(),
        })
    }

    /// Writes the report to `path` (whole file replaced atomically).
    pub fn write(&self, path: &Path, wall: Duration, succeeded: bool) -> Result<(), BuildError> {
        let mut text = serde_json::to_string_pretty(&self.to_json(wall, succeeded))
            .map_err(|e| BuildError::image("timing report", e))?;
        text.push('\n');
        crate::output::write_file_atomically(path, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up_per_step_stage_and_build() {
        let mut report = TimingReport::default();
        let ms = Duration::from_millis;
        report.record(&BuildEvent::PhaseFinished {
            stage: Some(0),
            step: None,
            phase: Phase::Pull,
            duration: ms(300),
        });
        report.record(&BuildEvent::StepStarted {
            stage: 0,
            step: 0,
            line: 2,
            instruction: "RUN true".into(),
        });
        for d in [ms(10), ms(15)] {
            report.record(&BuildEvent::PhaseFinished {
                stage: Some(0),
                step: Some(0),
                phase: Phase::Snapshot,
                duration: d,
            });
        }
        report.record(&BuildEvent::StepFinished {
            stage: 0,
            step: 0,
            duration: ms(40),
            cached: false,
        });
        report.record(&BuildEvent::PhaseFinished {
            stage: None,
            step: None,
            phase: Phase::Push,
            duration: ms(100),
        });
        assert_eq!(report.phase_total(Phase::Snapshot), ms(25));
        let value = report.to_json(ms(500), true);
        assert_eq!(value["total_seconds"], json!(0.5));
        assert_eq!(value["phases"]["pull"], json!(0.3));
        assert_eq!(value["phases"]["push"], json!(0.1));
        assert_eq!(value["stages"][0]["phases"]["pull"], json!(0.3));
        assert_eq!(value["steps"][0]["line"], json!(2));
        assert_eq!(value["steps"][0]["instruction"], json!("RUN true"));
        assert_eq!(value["steps"][0]["seconds"], json!(0.04));
        assert_eq!(value["steps"][0]["phases"]["snapshot"], json!(0.025));
    }
}
