//! Turns [`BuildEvent`]s into what a person or a log collector reads.
//!
//! Three styles, picked by `--progress` (and `--log-format`):
//! - **live** (a terminal): finished lines scroll above a status area that is redrawn in place
//!   with ANSI escapes: running steps with their elapsed time, and a bar per layer being
//!   pulled or pushed;
//! - **plain** (CI logs): one line per event, each prefixed with the time since the build
//!   started (`[  1.234s]`), and with `--log-timestamp` also the wall-clock time in RFC 3339;
//! - **json**: one JSON object per event per line.
//!
//! Steps are written `#STAGE.STEP` (both counted from 0, as in the events), and every RUN output
//! line is printed as it arrives behind its step's prefix: `#1.3 | compiling...`.
//! `-v/--verbosity` filters by level: warnings are `warn`, build progress and RUN output `info`,
//! per-step timings of uncached steps and the start of each transfer `debug`, every transfer
//! progress tick `trace`.

mod json;
mod live;
mod plain;
mod text;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use kiln_engine::{BuildEvent, EventSink};
use serde_json::{json, Value};

use self::json::event_json;
use self::live::REDRAW_INTERVAL;
pub use self::text::{human_size, redact_credentials, rfc3339};
use self::text::{seconds, short_digest};

/// kaniko's log levels, least verbose first; an event is shown when its level is at most the
/// configured one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Level {
    /// Nothing but the final error.
    Panic,
    /// Nothing but the final error.
    Fatal,
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Build progress and RUN output (the default).
    Info,
    /// Also step timings and transfer starts.
    Debug,
    /// Also every transfer progress tick.
    Trace,
}

impl Level {
    /// The lowercase name used in flags and JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Level::Panic => "panic",
            Level::Fatal => "fatal",
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }
}

/// `--log-format`: how text lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Plain text, no escape sequences.
    Text,
    /// Text with ANSI colours.
    Color,
    /// One JSON object per line.
    Json,
}

/// `--progress`: which renderer is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Progress {
    /// Live progress when standard error is a terminal, plain lines otherwise; JSON when
    /// `--log-format=json`.
    #[default]
    Auto,
    /// One line per event.
    Plain,
    /// Live progress redrawn in place.
    Tty,
    /// One JSON object per event per line, on standard output.
    Json,
}

/// Logging and progress settings from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSettings {
    /// `-v/--verbosity`.
    pub verbosity: Level,
    /// `--log-format`; `None` means colour on a terminal (unless `NO_COLOR` is set), plain text
    /// otherwise.
    pub log_format: Option<LogFormat>,
    /// `--log-timestamp`: prefix text lines with the wall-clock time.
    pub log_timestamp: bool,
    /// `--progress`.
    pub progress: Progress,
}

impl Default for OutputSettings {
    fn default() -> Self {
        OutputSettings {
            verbosity: Level::Info,
            log_format: None,
            log_timestamp: false,
            progress: Progress::Auto,
        }
    }
}

/// The renderer actually chosen for a given output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Lines, optionally coloured.
    Plain {
        /// Use ANSI colours.
        color: bool,
    },
    /// Lines above a status area redrawn in place.
    Live {
        /// Use ANSI colours.
        color: bool,
    },
    /// JSON lines.
    Json,
}

/// What is known about the terminal the output goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terminal {
    /// Standard error is a terminal.
    pub is_terminal: bool,
    /// `NO_COLOR` is set to a non-empty value.
    pub no_color: bool,
    /// Columns, for truncating status lines so they never wrap.
    pub width: usize,
}

impl Terminal {
    /// Probes standard error and the environment of this process.
    pub fn detect() -> Terminal {
        let is_terminal = std::io::stderr().is_terminal();
        Terminal {
            is_terminal,
            no_color: std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
            width: if is_terminal { stderr_width() } else { 80 },
        }
    }
}

/// Columns of the terminal on standard error, or from `COLUMNS`, or 80.
fn stderr_width() -> usize {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the pointer we pass; it lives on our stack.
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    if ok && size.ws_col > 0 {
        return usize::from(size.ws_col);
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .filter(|&c: &usize| c > 0)
        .unwrap_or(80)
}

/// Chooses the renderer from the settings and the terminal.
pub fn choose_style(settings: &OutputSettings, terminal: &Terminal) -> Style {
    let color = match settings.log_format {
        Some(LogFormat::Color) => true,
        Some(LogFormat::Text) => false,
        Some(LogFormat::Json) | None => terminal.is_terminal && !terminal.no_color,
    };
    match settings.progress {
        Progress::Json => Style::Json,
        Progress::Plain => Style::Plain { color },
        Progress::Tty => Style::Live { color },
        Progress::Auto if settings.log_format == Some(LogFormat::Json) => Style::Json,
        Progress::Auto if terminal.is_terminal => Style::Live { color },
        Progress::Auto => Style::Plain { color },
    }
}

/// Where the renderer reads the time; tests pass a fixed clock.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(SystemTime::now)
}

/// Renders events; cheap to clone, shared by every thread that reports events.
#[derive(Clone)]
pub struct Renderer {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    stopped: AtomicBool,
}

struct State {
    out: Box<dyn Write + Send>,
    style: Style,
    verbosity: Level,
    log_timestamp: bool,
    width: usize,
    clock: Clock,
    start: SystemTime,
    /// Running steps, by (stage, step): instruction and start time.
    running: BTreeMap<(usize, usize), (String, SystemTime)>,
    /// Transfers in flight, by (kind, where, digest): done and total bytes.
    transfers: BTreeMap<(TransferKind, String, String), (u64, u64)>,
    /// Transfers already reported finished, so repeated final ticks print once.
    finished_transfers: BTreeSet<(TransferKind, String, String)>,
    /// Status lines currently on screen below the scrolled lines (live style).
    drawn: usize,
    last_draw: Option<SystemTime>,
    spinner: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TransferKind {
    Pull,
    Push,
}

impl TransferKind {
    fn verb(self) -> &'static str {
        match self {
            TransferKind::Pull => "pull",
            TransferKind::Push => "push",
        }
    }
}

impl Renderer {
    /// A renderer writing to `out` in `style`.
    pub fn new(
        settings: &OutputSettings,
        style: Style,
        width: usize,
        out: Box<dyn Write + Send>,
        clock: Clock,
    ) -> Renderer {
        let start = clock();
        let renderer = Renderer {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    out,
                    style,
                    verbosity: settings.verbosity,
                    log_timestamp: settings.log_timestamp,
                    width: width.max(20),
                    clock,
                    start,
                    running: BTreeMap::new(),
                    transfers: BTreeMap::new(),
                    finished_transfers: BTreeSet::new(),
                    drawn: 0,
                    last_draw: None,
                    spinner: 0,
                }),
                stopped: AtomicBool::new(false),
            }),
        };
        if matches!(style, Style::Live { .. }) {
            renderer.start_ticker();
        }
        renderer
    }

    /// The renderer for this process: JSON on standard output, text on standard error, live
    /// when standard error is a terminal (or `--progress=tty`).
    pub fn for_process(settings: &OutputSettings) -> Renderer {
        let terminal = Terminal::detect();
        let style = choose_style(settings, &terminal);
        let out: Box<dyn Write + Send> = match style {
            Style::Json => Box::new(std::io::stdout()),
            _ => Box::new(std::io::stderr()),
        };
        Renderer::new(settings, style, terminal.width, out, system_clock())
    }

    /// The style in use.
    pub fn style(&self) -> Style {
        self.lock().style
    }

    /// An [`EventSink`] feeding this renderer, for [`kiln_engine::BuildOptions`] users.
    pub fn sink(&self) -> EventSink {
        let renderer = self.clone();
        Arc::new(move |event| renderer.handle(&event))
    }

    /// Renders one event.
    pub fn handle(&self, event: &BuildEvent) {
        let mut state = self.lock();
        state.update(event);
        state.emit(event);
    }

    /// Reports a warning that did not come from the engine (for example an ignored flag).
    pub fn warn(&self, message: &str) {
        self.handle(&BuildEvent::Warning {
            message: message.to_owned(),
        });
    }

    /// Stops live redrawing and removes the status area. In JSON style, a failure is also
    /// reported as a final `build_failed` object (the `error:` line itself goes to standard
    /// error from `main`).
    pub fn finish(&self, failure: Option<(&str, i32)>) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        let mut state = self.lock();
        state.running.clear();
        state.transfers.clear();
        if matches!(state.style, Style::Live { .. }) {
            state.redraw(&[]);
        }
        if let (Style::Json, Some((message, code))) = (state.style, failure) {
            let mut object = state.json_header(Level::Error, "build_failed");
            object.insert("message".into(), json!(redact_credentials(message)));
            object.insert("exit_code".into(), json!(code));
            let line = Value::Object(object).to_string();
            state.write_lines(&[line]);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while rendering must not silence the rest of the build's output.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start_ticker(&self) {
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        // The ticker keeps elapsed times and spinners moving while a step prints nothing.
        let _ = std::thread::Builder::new()
            .name("kiln-progress".into())
            .spawn(move || loop {
                std::thread::sleep(REDRAW_INTERVAL);
                let Some(shared) = weak.upgrade() else { return };
                if shared.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
                if !state.running.is_empty() || !state.transfers.is_empty() {
                    state.spinner = state.spinner.wrapping_add(1);
                    state.redraw(&[]);
                }
            });
        // Should the thread not start, the status area still updates on every event.
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
    }
}

/// Level and text of an event in the line styles.
fn describe(event: &BuildEvent) -> (Level, String) {
    match event {
        BuildEvent::BuildStarted { stages } => (
            Level::Info,
            format!("building stages: {}", stages.join(", ")),
        ),
        BuildEvent::StageStarted { stage, base } => (Level::Info, format!("#{stage} FROM {base}")),
        BuildEvent::PullProgress {
            image,
            digest,
            done,
            total,
        } => (
            Level::Trace,
            format!(
                "pull {image}: {} {} / {}",
                short_digest(&digest.to_string()),
                human_size(*done),
                human_size(*total)
            ),
        ),
        BuildEvent::StepStarted {
            stage,
            step,
            line,
            instruction,
        } => (
            Level::Info,
            // Steps a front end made without a file (buildpacks) have no line to show.
            match line {
                0 => format!("#{stage}.{step} {instruction}"),
                line => format!("#{stage}.{step} {instruction} (line {line})"),
            },
        ),
        BuildEvent::RunOutput {
            stage, step, line, ..
        } => (Level::Info, format!("#{stage}.{step} | {line}")),
        BuildEvent::LayerCreated {
            stage,
            step,
            digest,
            size,
            ..
        } => (
            Level::Info,
            format!(
                "#{stage}.{step} layer {} ({})",
                short_digest(&digest.to_string()),
                human_size(*size)
            ),
        ),
        BuildEvent::StepFinished {
            stage,
            step,
            duration,
            cached,
        } => {
            if *cached {
                (Level::Info, format!("#{stage}.{step} CACHED"))
            } else {
                (
                    Level::Debug,
                    format!("#{stage}.{step} done in {}", seconds(*duration)),
                )
            }
        }
        BuildEvent::PushProgress {
            destination,
            digest,
            done,
            total,
        } => (
            Level::Trace,
            format!(
                "push {destination}: {} {} / {}",
                short_digest(&digest.to_string()),
                human_size(*done),
                human_size(*total)
            ),
        ),
        BuildEvent::Pushed {
            destination,
            digest,
        } => (Level::Info, format!("pushed {destination} ({digest})")),
        BuildEvent::PhaseFinished {
            stage,
            step,
            phase,
            duration,
        } => {
            let place = match (stage, step) {
                (Some(stage), Some(step)) => format!("#{stage}.{step} "),
                (Some(stage), None) => format!("#{stage} "),
                _ => String::new(),
            };
            (
                Level::Debug,
                format!("{place}{} took {}", phase.name(), seconds(*duration)),
            )
        }
        BuildEvent::Warning { message } => (Level::Warn, format!("WARN {message}")),
        BuildEvent::Note { message } => (Level::Info, message.clone()),
        BuildEvent::BuildFinished { digest, duration } => (
            Level::Info,
            format!("built {digest} in {}", seconds(*duration)),
        ),
        // `BuildEvent` may grow; a new event is still shown, in its debug form.
        #[allow(unreachable_patterns)]
        other => (Level::Debug, format!("{other:?}")),
    }
}

impl State {
    fn now(&self) -> SystemTime {
        (self.clock)()
    }

    /// Tracks running steps and transfers for the live status area, and turns a transfer's
    /// first and last tick into their own lines.
    fn update(&mut self, event: &BuildEvent) {
        let now = self.now();
        match event {
            BuildEvent::StepStarted {
                stage,
                step,
                instruction,
                ..
            } => {
                self.running
                    .insert((*stage, *step), (instruction.clone(), now));
            }
            BuildEvent::StepFinished { stage, step, .. } => {
                self.running.remove(&(*stage, *step));
            }
            _ => {}
        }
    }

    fn emit(&mut self, event: &BuildEvent) {
        let transfer = match event {
            BuildEvent::PullProgress {
                image,
                digest,
                done,
                total,
            } => Some((
                TransferKind::Pull,
                image.clone(),
                digest.to_string(),
                *done,
                *total,
            )),
            BuildEvent::PushProgress {
                destination,
                digest,
                done,
                total,
            } => Some((
                TransferKind::Push,
                destination.clone(),
                digest.to_string(),
                *done,
                *total,
            )),
            _ => None,
        };
        let mut lines: Vec<(Level, String, Value)> = Vec::new();
        match transfer {
            Some((kind, place, digest, done, total)) => {
                let key = (kind, place.clone(), digest.clone());
                if self.finished_transfers.contains(&key) {
                    return;
                }
                let first = !self.transfers.contains_key(&key);
                let complete = total > 0 && done >= total;
                if complete {
                    self.transfers.remove(&key);
                    self.finished_transfers.insert(key);
                    let verb = match kind {
                        TransferKind::Pull => "pulled",
                        TransferKind::Push => "pushed",
                    };
                    let text = format!(
                        "{verb} {} {} ({})",
                        short_digest(&digest),
                        place,
                        human_size(total)
                    );
                    lines.push((Level::Info, text, event_json(event)));
                } else {
                    self.transfers.insert(key, (done, total));
                    if first {
                        let text = format!(
                            "{} {} {} ({})",
                            kind.verb(),
                            short_digest(&digest),
                            place,
                            human_size(total)
                        );
                        lines.push((Level::Debug, text, event_json(event)));
                    } else {
                        let (level, text) = describe(event);
                        lines.push((level, text, event_json(event)));
                    }
                }
            }
            None => {
                let (level, text) = describe(event);
                lines.push((level, text, event_json(event)));
            }
        }
        let rendered: Vec<String> = lines
            .into_iter()
            .filter(|(level, _, _)| *level <= self.verbosity)
            .map(|(level, text, json)| self.format_line(level, &text, event, json))
            .collect();
        match self.style {
            Style::Live { .. } => {
                let now = self.now();
                let due = self.last_draw.is_none_or(|last| {
                    now.duration_since(last).unwrap_or(Duration::ZERO) >= REDRAW_INTERVAL
                });
                // Structural changes redraw at once; progress ticks are rate-limited.
                let structural = !matches!(
                    event,
                    BuildEvent::PullProgress { .. } | BuildEvent::PushProgress { .. }
                );
                if !rendered.is_empty() || structural || due {
                    self.redraw(&rendered);
                }
            }
            _ => self.write_lines(&rendered),
        }
    }

    fn json_header(&self, level: Level, event: &str) -> serde_json::Map<String, Value> {
        let mut object = serde_json::Map::new();
        object.insert("time".into(), json!(rfc3339(self.now())));
        object.insert("level".into(), json!(level.name()));
        object.insert("event".into(), json!(event));
        object
    }

    fn format_line(&self, level: Level, text: &str, event: &BuildEvent, body: Value) -> String {
        match self.style {
            Style::Json => self.json_line(level, event, body),
            Style::Plain { color } | Style::Live { color } => {
                self.plain_line(level, text, event, color)
            }
        }
    }

    fn write_lines(&mut self, lines: &[String]) {
        if lines.is_empty() {
            return;
        }
        let mut buffer = String::new();
        for line in lines {
            buffer.push_str(line);
            buffer.push('\n');
        }
        // Output errors (a closed pipe) must not fail the build; there is nowhere to report them.
        let _ = self.out.write_all(buffer.as_bytes());
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::live::bar;
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn dates_are_gregorian() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_000 + 5); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.005Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_323_056); // 2026-11-22T04:50:56Z
        assert_eq!(rfc3339(t), "2026-11-22T04:50:56.000Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_107_542_399); // 2100-02-28T23:59:59Z
        assert_eq!(rfc3339(t), "2100-02-28T23:59:59.000Z");
    }

    #[test]
    fn sizes_and_digests() {
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1_500), "1.5 kB");
        assert_eq!(human_size(42_000_000), "42.0 MB");
        assert_eq!(
            short_digest("sha256:0123456789abcdef"),
            "sha256:0123456789ab"
        );
        assert_eq!(bar(5, 10, 4), "[##..]");
        assert_eq!(bar(20, 10, 4), "[####]");
        assert_eq!(bar(0, 0, 2), "[..]");
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact_credentials("clone git://user:tok@github.com/a.git#main failed"),
            "clone git://***@github.com/a.git#main failed"
        );
        assert_eq!(
            redact_credentials("https://TOKEN@h/x and http://plain/y"),
            "https://***@h/x and http://plain/y"
        );
        assert_eq!(redact_credentials("no urls here"), "no urls here");
    }

    #[test]
    fn style_choice() {
        let tty = Terminal {
            is_terminal: true,
            no_color: false,
            width: 80,
        };
        let pipe = Terminal {
            is_terminal: false,
            ..tty
        };
        let mut settings = OutputSettings::default();
        assert_eq!(choose_style(&settings, &tty), Style::Live { color: true });
        assert_eq!(
            choose_style(&settings, &pipe),
            Style::Plain { color: false }
        );
        let no_color = Terminal {
            no_color: true,
            ..tty
        };
        assert_eq!(
            choose_style(&settings, &no_color),
            Style::Live { color: false }
        );
        settings.log_format = Some(LogFormat::Color);
        assert_eq!(choose_style(&settings, &pipe), Style::Plain { color: true });
        settings.log_format = Some(LogFormat::Json);
        assert_eq!(choose_style(&settings, &tty), Style::Json);
        settings.progress = Progress::Plain;
        assert_eq!(choose_style(&settings, &tty), Style::Plain { color: true });
        settings.progress = Progress::Tty;
        settings.log_format = Some(LogFormat::Text);
        assert_eq!(choose_style(&settings, &pipe), Style::Live { color: false });
    }
}
