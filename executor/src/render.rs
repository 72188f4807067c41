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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_engine::{BuildEvent, EventSink, OutputStream};
use serde_json::{json, Value};

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

/// How often the live status area is redrawn at most when only progress changed.
const REDRAW_INTERVAL: Duration = Duration::from_millis(100);
/// At most this many transfer bars are shown; the rest are summarised in one line.
const MAX_BARS: usize = 6;

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
            format!("#{stage}.{step} {instruction} (line {line})"),
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
        let is_output = matches!(event, BuildEvent::RunOutput { .. });
        match self.style {
            Style::Json => {
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
            Style::Plain { color } | Style::Live { color } => {
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
                    (_, BuildEvent::StepStarted { .. } | BuildEvent::StageStarted { .. }) => {
                        BOLD_CYAN
                    }
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

    /// Live style: clears the status area, prints `lines` where it was, and draws it again
    /// below them.
    fn redraw(&mut self, lines: &[String]) {
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

fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        ((done.min(total) as u128 * width as u128) / total as u128) as usize
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

const DIM: &str = "\x1b[2m";
const YELLOW: &str = "\x1b[33m";
const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const BOLD_CYAN: &str = "\x1b[1;36m";

fn paint(color: bool, code: &str, text: &str) -> String {
    if color && !code.is_empty() {
        format!("{code}{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

fn event_name(event: &BuildEvent) -> &'static str {
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
        BuildEvent::BuildFinished { .. } => "build_finished",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}

/// The event's fields as a JSON object (without time, level and event name).
fn event_json(event: &BuildEvent) -> Value {
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
        BuildEvent::Warning { message } => json!({ "message": message }),
        BuildEvent::BuildFinished { digest, duration } => json!({
            "digest": digest.to_string(),
            "duration_ms": duration_ms(*duration),
        }),
        #[allow(unreachable_patterns)]
        other => json!({ "debug": format!("{other:?}") }),
    }
}

fn duration_ms(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

fn seconds(duration: Duration) -> String {
    format!("{:.3}s", duration.as_secs_f64())
}

/// `sha256:0123456789ab` (12 hex digits, as Docker shows them).
fn short_digest(digest: &str) -> String {
    match digest.split_once(':') {
        Some((algorithm, hex)) => format!("{algorithm}:{}", &hex[..hex.len().min(12)]),
        None => digest.to_owned(),
    }
}

/// Sizes in decimal units, as registries and Docker print them.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// UTC time as RFC 3339 with milliseconds: `2026-11-22T04:50:56.123Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (days are grouped in 400-year
/// eras of 146,097 days, each era starting on a 1 March so leap days fall at the end).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Replaces the user-info part of every URL in `text` (`https://user:token@host` →
/// `https://***@host`), so a git context with a token never reaches a log.
pub fn redact_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(index) = rest.find("://") {
        let (before, after) = rest.split_at(index + 3);
        out.push_str(before);
        let authority_end = after
            .find(|c: char| c == '/' || c == '#' || c == '?' || c.is_whitespace())
            .unwrap_or(after.len());
        let authority = &after[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &after[authority_end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
