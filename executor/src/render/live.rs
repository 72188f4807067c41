//! The live style: finished lines scroll above a status area redrawn in place with ANSI
//! escapes (running steps with their elapsed time, a bar per layer pulled or pushed), and the
//! colours the plain style shares.

use std::fmt::Write as _;
use std::io::Write;
use std::time::{Duration, SystemTime};

use super::text::short_digest;
use super::{human_size, redact_credentials, State, Style};

/// How often the live status area is redrawn at most when only progress changed.
pub(super) const REDRAW_INTERVAL: Duration = Duration::from_millis(100);
/// At most this many transfer bars are shown; the rest are summarised in one line.
pub(super) const MAX_BARS: usize = 6;

impl State {
    /// Live style: clears the status area, prints `lines` where it was, and draws it again
    /// below them.
    pub(super) fn redraw(&mut self, lines: &[String]) {
        let Style::Live { color } = self.style else {
            self.write_lines(lines);
            return;
        };
        let now = self.now();
        self.last_draw = Some(now);
        let mut buffer = String::new();
        if self.drawn > 0 {
            let _ = write!(buffer, "\r\x1b[{}A\x1b[J", self.drawn);
        }
        for line in lines {
            buffer.push_str(line);
            buffer.push('\n');
        }
        let status = self.status_lines(now, color);
        for line in &status {
            buffer.push_str(line);
            buffer.push('\n');
        }
        self.drawn = status.len();
        let _ = self.out.write_all(buffer.as_bytes());
        let _ = self.out.flush();
    }

    fn status_lines(&self, now: SystemTime, color: bool) -> Vec<String> {
        const SPINNER: [char; 4] = ['|', '/', '-', '\\'];
        let mut status = Vec::new();
        for ((stage, step), (instruction, started)) in &self.running {
            let elapsed = now.duration_since(*started).unwrap_or(Duration::ZERO);
            let head = format!(
                "{} #{stage}.{step} {}",
                SPINNER[self.spinner % SPINNER.len()],
                redact_credentials(instruction)
            );
            let tail = format!(" {:.1}s", elapsed.as_secs_f64());
            status.push(fit(&head, &tail, self.width, color));
        }
        for (shown, ((kind, place, digest), (done, total))) in self.transfers.iter().enumerate() {
            if shown == MAX_BARS {
                status.push(format!(
                    "  ... and {} more",
                    self.transfers.len() - MAX_BARS
                ));
                break;
            }
            let head = format!("  {} {} {}", kind.verb(), short_digest(digest), place);
            let tail = format!(
                " {} {:>9} / {:<9}",
                bar(*done, *total, 20),
                human_size(*done),
                human_size(*total)
            );
            status.push(fit(&head, &tail, self.width, color));
        }
        status
    }
}

/// `head` cut so that `head + tail` fits in `width` columns (status lines must never wrap, or
/// the cursor arithmetic of the redraw breaks).
fn fit(head: &str, tail: &str, width: usize, color: bool) -> String {
    let tail_len = tail.chars().count();
    let room = width.saturating_sub(tail_len + 1);
    let mut cut: String = head.chars().take(room).collect();
    if head.chars().count() > room && room > 0 {
        cut.pop();
        cut.push('~');
    }
    format!("{cut}{}", paint(color, DIM, tail))
}

pub(super) fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        ((done.min(total) as u128 * width as u128) / total as u128) as usize
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

pub(super) const DIM: &str = "\x1b[2m";
pub(super) const YELLOW: &str = "\x1b[33m";
pub(super) const RED: &str = "\x1b[31m";
pub(super) const GREEN: &str = "\x1b[32m";
pub(super) const BOLD_CYAN: &str = "\x1b[1;36m";

pub(super) fn paint(color: bool, code: &str, text: &str) -> String {
    if color && !code.is_empty() {
        format!("{code}{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}
