//! The plain style (CI logs): one line per event, each prefixed with the time since the
//! build started and, with `--log-timestamp`, the wall-clock time; the live style shares its
//! lines.

use std::time::Duration;

use kiln_engine::{BuildEvent, OutputStream};

use super::live::{paint, BOLD_CYAN, DIM, GREEN, RED, YELLOW};
use super::{redact_credentials, rfc3339, Level, State, Style};

impl State {
    /// One event as a plain (or live) line.
    pub(super) fn plain_line(
        &self,
        level: Level,
        text: &str,
        event: &BuildEvent,
        color: bool,
    ) -> String {
        let is_output = matches!(event, BuildEvent::RunOutput { .. });
        let text = if is_output {
            text.to_owned()
        } else {
            redact_credentials(text)
        };
        let now = self.now();
        let elapsed = now.duration_since(self.start).unwrap_or(Duration::ZERO);
        let mut line = String::new();
        if self.log_timestamp {
            line.push_str(&paint(color, DIM, &rfc3339(now)));
            line.push(' ');
        }
        if matches!(self.style, Style::Plain { .. }) {
            let stamp = format!("[{:>8.3}s]", elapsed.as_secs_f64());
            line.push_str(&paint(color, DIM, &stamp));
            line.push(' ');
        }
        let code = match (level, event) {
            (Level::Warn, _) => YELLOW,
            (Level::Error, _) => RED,
            (_, BuildEvent::StepStarted { .. } | BuildEvent::StageStarted { .. }) => BOLD_CYAN,
            (
                _,
                BuildEvent::RunOutput {
                    stream: OutputStream::Stderr,
                    ..
                },
            ) => "",
            (_, BuildEvent::BuildFinished { .. } | BuildEvent::Pushed { .. }) => GREEN,
            _ => "",
        };
        line.push_str(&paint(color, code, &text));
        line
    }
}
