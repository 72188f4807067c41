//! Rendering a synthetic build: plain lines with elapsed times and timestamps, JSON lines,
//! verbosity filtering and the live status area.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_engine::{BuildEvent, OutputStream};
use kiln_executor::render::{Clock, Renderer, Style};
use kiln_executor::{Level, OutputSettings, Progress};
use kiln_oci::Digest;

/// An output buffer the test can read while the renderer owns a writer to it.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buffer {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// A clock the test moves by hand; starts at 2026-11-22T04:50:56Z.
#[derive(Clone)]
struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    fn new() -> ManualClock {
        ManualClock(Arc::new(Mutex::new(
            UNIX_EPOCH + Duration::from_secs(1_795_323_056),
        )))
    }
    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
    fn clock(&self) -> Clock {
        let inner = self.0.clone();
        Arc::new(move || *inner.lock().unwrap())
    }
}

fn digest(content: &str) -> Digest {
    Digest::sha256_of(content.as_bytes())
}

/// A small build: one stage, a pull, a RUN with output on both streams, a cached COPY, a push.
fn synthetic_build(renderer: &Renderer, clock: &ManualClock) {
    let sink = renderer.sink();
    let tick = |ms| clock.advance(Duration::from_millis(ms));
    let layer = digest("base layer");
    sink(BuildEvent::BuildStarted {
        stages: vec!["builder".into()],
    });
    sink(BuildEvent::StageStarted {
        stage: 0,
        base: "127.0.0.1:5000/busybox:latest".into(),
    });
    for done in [0, 400_000, 1_000_000, 1_000_000] {
        tick(50);
        sink(BuildEvent::PullProgress {
            image: "127.0.0.1:5000/busybox:latest".into(),
            digest: layer.clone(),
            done,
            total: 1_000_000,
        });
    }
    tick(100);
    sink(BuildEvent::StepStarted {
        stage: 0,
        step: 1,
        line: 3,
        instruction: "RUN echo hello && echo oops >&2".into(),
    });
    tick(250);
    sink(BuildEvent::RunOutput {
        stage: 0,
        step: 1,
        stream: OutputStream::Stdout,
        line: "hello".into(),
    });
    sink(BuildEvent::RunOutput {
        stage: 0,
        step: 1,
        stream: OutputStream::Stderr,
        line: "oops".into(),
    });
    sink(BuildEvent::LayerCreated {
        stage: 0,
        step: 1,
        digest: digest("new layer"),
        diff_id: digest("new layer tar"),
        size: 2_500,
    });
    tick(10);
    sink(BuildEvent::StepFinished {
        stage: 0,
        step: 1,
        duration: Duration::from_millis(260),
        cached: false,
    });
    sink(BuildEvent::StepStarted {
        stage: 0,
        step: 2,
        line: 4,
        instruction: "COPY app /app".into(),
    });
    sink(BuildEvent::StepFinished {
        stage: 0,
        step: 2,
        duration: Duration::from_millis(1),
        cached: true,
    });
    sink(BuildEvent::Warning {
        message: "clone of https://user:tok3n@git.example/r.git was slow".into(),
    });
    for done in [0, 2_500] {
        tick(20);
        sink(BuildEvent::PushProgress {
            destination: "127.0.0.1:5000/app:1".into(),
            digest: digest("new layer"),
            done,
            total: 2_500,
        });
    }
    sink(BuildEvent::Pushed {
        destination: "127.0.0.1:5000/app:1".into(),
        digest: digest("manifest"),
    });
    tick(5);
    sink(BuildEvent::BuildFinished {
        digest: digest("manifest"),
        duration: Duration::from_millis(1_234),
    });
}

fn render(settings: OutputSettings, style: Style) -> String {
    let buffer = Buffer::default();
    let clock = ManualClock::new();
    let renderer = Renderer::new(
        &settings,
        style,
        100,
        Box::new(buffer.clone()),
        clock.clock(),
    );
    synthetic_build(&renderer, &clock);
    renderer.finish(None);
    buffer.text()
}

fn settings(verbosity: Level) -> OutputSettings {
    OutputSettings {
        verbosity,
        ..OutputSettings::default()
    }
}

#[test]
fn plain_lines_at_info() {
    let text = render(settings(Level::Info), Style::Plain { color: false });
    let short_layer = &digest("base layer").to_string()[..19];
    let short_new = &digest("new layer").to_string()[..19];
    let expected = format!(
        "[   0.000s] building stages: builder\n\
         [   0.000s] #0 FROM 127.0.0.1:5000/busybox:latest\n\
         [   0.150s] pulled {short_layer} 127.0.0.1:5000/busybox:latest (1.0 MB)\n\
         [   0.300s] #0.1 RUN echo hello && echo oops >&2 (line 3)\n\
         [   0.550s] #0.1 | hello\n\
         [   0.550s] #0.1 | oops\n\
         [   0.550s] #0.1 layer {short_new} (2.5 kB)\n\
         [   0.560s] #0.2 COPY app /app (line 4)\n\
         [   0.560s] #0.2 CACHED\n\
         [   0.560s] WARN clone of https://***@git.example/r.git was slow\n\
         [   0.600s] pushed {short_new} 127.0.0.1:5000/app:1 (2.5 kB)\n\
         [   0.600s] pushed 127.0.0.1:5000/app:1 ({})\n\
         [   0.605s] built {} in 1.234s\n",
        digest("manifest"),
        digest("manifest"),
    );
    assert_eq!(text, expected);
    assert!(!text.contains('\x1b'), "no escapes in text format");
}

#[test]
fn log_timestamps_and_colours() {
    let mut with_time = settings(Level::Info);
    with_time.log_timestamp = true;
    let text = render(with_time, Style::Plain { color: false });
    let first = text.lines().next().unwrap();
    assert_eq!(
        first,
        "2026-11-22T04:50:56.000Z [   0.000s] building stages: builder"
    );
    assert!(text.contains("2026-11-22T04:50:56.300Z [   0.300s] #0.1 RUN echo hello"));
    assert!(
        text.lines().all(|l| l.starts_with("2026-11-22T04:50:56.")),
        "{text}"
    );

    let coloured = render(settings(Level::Info), Style::Plain { color: true });
    assert!(
        coloured.contains("\x1b[33mWARN clone"),
        "warnings are yellow"
    );
    assert!(
        coloured.contains("\x1b[1;36m#0.1 RUN echo hello"),
        "steps stand out"
    );
    assert!(
        coloured.contains("#0.1 | hello\n"),
        "RUN output is left as it was printed"
    );
}

#[test]
fn verbosity_filters() {
    let lines = |level| {
        render(settings(level), Style::Plain { color: false })
            .lines()
            .count()
    };
    assert_eq!(lines(Level::Panic), 0);
    assert_eq!(lines(Level::Fatal), 0);
    assert_eq!(lines(Level::Error), 0);
    let warn = render(settings(Level::Warn), Style::Plain { color: false });
    assert_eq!(warn.lines().count(), 1);
    assert!(warn.contains("WARN clone"));
    assert_eq!(lines(Level::Info), 13);
    let debug = render(settings(Level::Debug), Style::Plain { color: false });
    // + start of the pull and of the push, + the uncached step's timing.
    assert_eq!(debug.lines().count(), 16, "{debug}");
    assert!(debug.contains("#0.1 done in 0.260s"));
    assert!(debug.contains("] pull sha256:"));
    let trace = render(settings(Level::Trace), Style::Plain { color: false });
    // + the one intermediate pull tick.
    assert_eq!(trace.lines().count(), 17, "{trace}");
    assert!(trace.contains("400.0 kB / 1.0 MB"));
}

#[test]
fn json_lines() {
    let text = render(settings(Level::Info), Style::Json);
    let objects: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let names: Vec<&str> = objects
        .iter()
        .map(|o| o["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "build_started",
            "stage_started",
            "pull_progress",
            "step_started",
            "run_output",
            "run_output",
            "layer_created",
            "step_started",
            "step_finished",
            "warning",
            "push_progress",
            "pushed",
            "build_finished",
        ]
    );
    assert!(objects.iter().all(|o| o["time"]
        .as_str()
        .unwrap()
        .starts_with("2026-11-22T04:50:56.")));
    let run = &objects[3];
    assert_eq!(run["level"], "info");
    assert_eq!(run["stage"], 0);
    assert_eq!(run["step"], 1);
    assert_eq!(run["line"], 3);
    assert_eq!(run["instruction"], "RUN echo hello && echo oops >&2");
    assert_eq!(objects[5]["stream"], "stderr");
    assert_eq!(objects[5]["line"], "oops");
    assert_eq!(objects[6]["size"], 2500);
    assert_eq!(objects[6]["digest"], digest("new layer").to_string());
    assert_eq!(objects[8]["cached"], true);
    assert_eq!(objects[9]["level"], "warn");
    assert_eq!(
        objects[9]["message"],
        "clone of https://***@git.example/r.git was slow"
    );
    assert_eq!(objects[12]["duration_ms"], 1234.0);
    assert_eq!(objects[12]["digest"], digest("manifest").to_string());

    let all = render(settings(Level::Trace), Style::Json);
    assert_eq!(all.lines().count(), 17);
}

#[test]
fn json_failure_is_the_last_object() {
    let buffer = Buffer::default();
    let clock = ManualClock::new();
    let renderer = Renderer::new(
        &settings(Level::Info),
        Style::Json,
        80,
        Box::new(buffer.clone()),
        clock.clock(),
    );
    renderer.finish(Some(("Dockerfile:3: RUN failed with exit code 7", 7)));
    let last: serde_json::Value =
        serde_json::from_str(buffer.text().lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "build_failed");
    assert_eq!(last["level"], "error");
    assert_eq!(last["exit_code"], 7);
    assert_eq!(last["message"], "Dockerfile:3: RUN failed with exit code 7");
}

#[test]
fn live_status_area_is_redrawn_in_place() {
    let text = render(settings(Level::Info), Style::Live { color: false });
    // Running steps and transfers are drawn, then erased by moving up and clearing.
    assert!(
        text.contains(" #0.1 RUN echo hello && echo oops >&2 0.0s"),
        "{text:?}"
    );
    assert!(
        text.contains("[########............]"),
        "a 40% bar: {text:?}"
    );
    assert!(text.contains("\x1b[1A\x1b[J"), "{text:?}");
    // Finished lines are printed once, without the plain style's elapsed column.
    assert_eq!(text.matches("#0.1 | hello\n").count(), 1);
    assert!(!text.contains("[   0."), "{text:?}");
    // After finish() nothing of the status area is left below the last line.
    let tail = text.rsplit("built ").next().unwrap();
    assert!(tail.ends_with('\n') && !tail.contains('|'), "{tail:?}");
    // Status lines never exceed the width (100 columns), or the redraw arithmetic breaks.
    let status_lines: Vec<&str> = text
        .split(['\n', '\r'])
        .map(|l| {
            l.trim_start_matches("\x1b[1A\x1b[J")
                .trim_start_matches("\x1b[2A\x1b[J")
        })
        .filter(|l| {
            l.starts_with(['|', '/', '-', '\\'])
                || l.starts_with("  pull")
                || l.starts_with("  push")
        })
        .collect();
    assert!(status_lines.len() >= 2, "{text:?}");
    for line in status_lines {
        assert!(line.chars().count() <= 100, "{line:?}");
    }
}

#[test]
fn progress_auto_picks_json_for_json_logs() {
    use kiln_executor::render::{choose_style, Terminal};
    let pipe = Terminal {
        is_terminal: false,
        no_color: false,
        width: 80,
    };
    let json = OutputSettings {
        log_format: Some(kiln_executor::LogFormat::Json),
        ..OutputSettings::default()
    };
    assert_eq!(choose_style(&json, &pipe), Style::Json);
    let plain = OutputSettings {
        progress: Progress::Plain,
        ..json
    };
    assert_eq!(choose_style(&plain, &pipe), Style::Plain { color: false });
}
