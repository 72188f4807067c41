//! The json style: one object per event per line, with the event's own fields.

use kiln_engine::{BuildEvent, OutputStream};
use serde_json::{json, Value};

use super::text::duration_ms;
use super::{redact_credentials, Level, State};

pub(super) fn event_name(event: &BuildEvent) -> &'static str {
    match event {
        BuildEvent::BuildStarted { .. } => "build_started",
        BuildEvent::StageStarted { .. } => "stage_started",
        BuildEvent::PullProgress { .. } => "pull_progress",
        BuildEvent::StepStarted { .. } => "step_started",
        BuildEvent::RunOutput { .. } => "run_output",
        BuildEvent::LayerCreated { .. } => "layer_created",
        BuildEvent::StepFinished { .. } => "step_finished",
        BuildEvent::PushProgress { .. } => "push_progress",
        BuildEvent::Pushed { .. } => "pushed",
        BuildEvent::PhaseFinished { .. } => "phase_finished",
        BuildEvent::Warning { .. } => "warning",
        BuildEvent::Note { .. } => "note",
        BuildEvent::BuildFinished { .. } => "build_finished",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}

/// The event's fields as a JSON object (without time, level and event name).
pub(super) fn event_json(event: &BuildEvent) -> Value {
    match event {
        BuildEvent::BuildStarted { stages } => json!({ "stages": stages }),
        BuildEvent::StageStarted { stage, base } => json!({ "stage": stage, "base": base }),
        BuildEvent::PullProgress {
            image,
            digest,
            done,
            total,
        } => json!({ "image": image, "digest": digest.to_string(), "done": done, "total": total }),
        BuildEvent::StepStarted {
            stage,
            step,
            line,
            instruction,
        } => json!({ "stage": stage, "step": step, "line": line, "instruction": instruction }),
        BuildEvent::RunOutput {
            stage,
            step,
            stream,
            line,
        } => json!({
            "stage": stage,
            "step": step,
            "stream": match stream { OutputStream::Stdout => "stdout", OutputStream::Stderr => "stderr" },
            "line": line,
        }),
        BuildEvent::LayerCreated {
            stage,
            step,
            digest,
            diff_id,
            size,
        } => json!({
            "stage": stage,
            "step": step,
            "digest": digest.to_string(),
            "diff_id": diff_id.to_string(),
            "size": size,
        }),
        BuildEvent::StepFinished {
            stage,
            step,
            duration,
            cached,
        } => json!({
            "stage": stage,
            "step": step,
            "duration_ms": duration_ms(*duration),
            "cached": cached,
        }),
        BuildEvent::PushProgress {
            destination,
            digest,
            done,
            total,
        } => json!({
            "destination": destination,
            "digest": digest.to_string(),
            "done": done,
            "total": total,
        }),
        BuildEvent::Pushed {
            destination,
            digest,
        } => json!({ "destination": destination, "digest": digest.to_string() }),
        BuildEvent::PhaseFinished {
            stage,
            step,
            phase,
            duration,
        } => json!({
            "stage": stage,
            "step": step,
            "phase": phase.name(),
            "duration_ms": duration_ms(*duration),
        }),
        BuildEvent::Warning { message } | BuildEvent::Note { message } => {
            json!({ "message": message })
        }
        BuildEvent::BuildFinished { digest, duration } => json!({
            "digest": digest.to_string(),
            "duration_ms": duration_ms(*duration),
        }),
        #[allow(unreachable_patterns)]
        other => json!({ "debug": format!("{other:?}") }),
    }
}

impl State {
    /// One event as a JSON line: time, level and event name, then the event's fields (URL
    /// credentials redacted, except in a step's own output).
    pub(super) fn json_line(&self, level: Level, event: &BuildEvent, body: Value) -> String {
        let is_output = matches!(event, BuildEvent::RunOutput { .. });
        let name = event_name(event);
        let mut object = self.json_header(level, name);
        if let Value::Object(fields) = body {
            for (key, value) in fields {
                let value = match value {
                    Value::String(s) if !is_output => Value::String(redact_credentials(&s)),
                    other => other,
                };
                object.insert(key, value);
            }
        }
        Value::Object(object).to_string()
    }
}
