//! The full-screen view: counts, a chart of pods in flight, placement, Jobs, failures, and a
//! Job's pods with the selected pod's logs followed live.
//!
//! Keys are read on a thread of their own (crossterm's blocking reader) and handed over a
//! channel; the screen is redrawn on each key and every 250ms. The terminal is restored when
//! the view ends, on error, and on panic (ratatui's panic hook).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams};
use parking_lot::Mutex;
use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Axis, Block, Borders, Chart, Dataset, GraphType, Paragraph, Row, Table, TableState, Wrap,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::model::{Counts, JobState, Model, Phase, PipelineView, Rates};
use super::{WatchEnd, WatchOptions};

/// Redraw period.
const FRAME: Duration = Duration::from_millis(250);
/// The chart shows this much history.
const CHART_WINDOW: f64 = 120.0;
/// Log lines kept for the selected pod.
const LOG_LINES: usize = 1000;

/// What a key asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Up,
    Down,
    Open,
    Back,
    Quit,
}

fn action(key: event::KeyEvent) -> Option<Action> {
    if key.kind == KeyEventKind::Release {
        return None;
    }
    match key.code {
        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => Some(Action::Quit),
        KeyCode::Char('q') => Some(Action::Quit),
        KeyCode::Up | KeyCode::Char('k') => Some(Action::Up),
        KeyCode::Down | KeyCode::Char('j') => Some(Action::Down),
        KeyCode::Enter => Some(Action::Open),
        KeyCode::Esc | KeyCode::Backspace | KeyCode::Left => Some(Action::Back),
        _ => None,
    }
}

/// The log of the pod being followed.
#[derive(Debug, Default)]
struct LogBuffer {
    lines: std::collections::VecDeque<String>,
    /// `following`, `waiting for the container…`, `ended`…
    status: String,
}

impl LogBuffer {
    fn push(&mut self, line: String) {
        self.lines.push_back(line);
        while self.lines.len() > LOG_LINES {
            self.lines.pop_front();
        }
    }
}

struct LogTail {
    pod: String,
    buffer: Arc<Mutex<LogBuffer>>,
    task: JoinHandle<()>,
}

impl Drop for LogTail {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Follows `pod`'s logs (`follow=true`) into `buffer`, waiting while the container has not
/// started.
async fn tail(
    api: Api<Pod>,
    pod: String,
    container: Option<String>,
    buffer: Arc<Mutex<LogBuffer>>,
) {
    loop {
        let params = LogParams {
            container: container.clone(),
            follow: true,
            tail_lines: Some(LOG_LINES as i64),
            ..LogParams::default()
        };
        match api.log_stream(&pod, &params).await {
            Ok(stream) => {
                {
                    let mut buffer = buffer.lock();
                    buffer.lines.clear();
                    buffer.status = "following".to_string();
                }
                let mut lines = Box::pin(stream).lines();
                while let Some(line) = lines.next().await {
                    match line {
                        Ok(line) => buffer.lock().push(line),
                        Err(error) => {
                            buffer.lock().status = format!("log stream broke: {error}");
                            return;
                        }
                    }
                }
                buffer.lock().status = "container ended".to_string();
                return;
            }
            // A 404 is also what a node answers while it has not started the container yet:
            // the pod itself says whether it is gone.
            Err(kube::Error::Api(status))
                if status.is_not_found() && matches!(api.get_opt(&pod).await, Ok(None)) =>
            {
                buffer.lock().status = "pod deleted".to_string();
                return;
            }
            Err(error) => {
                let text = match &error {
                    kube::Error::Api(status) => status.message.clone(),
                    other => other.to_string(),
                };
                buffer.lock().status = format!("waiting: {text}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Which screen is shown.
#[derive(Debug, Clone, PartialEq, Eq)]
enum View {
    Overview,
    /// A Job's pods and the selected pod's logs.
    Job(String),
}

/// The view's state besides the model.
struct App {
    pods: Api<Pod>,
    view: View,
    /// The selected Job, by name, so it stays selected as the list moves.
    job: Option<String>,
    /// The selected pod in the Job view, by index.
    pod: usize,
    log: Option<LogTail>,
    /// Shown in the footer while nothing else is: see [`WatchOptions::hint`].
    hint: Option<String>,
}

impl App {
    fn new(pods: Api<Pod>, hint: Option<String>) -> App {
        App {
            pods,
            view: View::Overview,
            job: None,
            pod: 0,
            log: None,
            hint,
        }
    }

    /// Applies a key; `false` to quit.
    fn act(&mut self, action: Action, model: &Model) -> bool {
        match (action, &self.view) {
            (Action::Quit, _) => return false,
            (Action::Up | Action::Down, View::Overview) => {
                let jobs = model.jobs();
                if jobs.is_empty() {
                    return true;
                }
                let at = self
                    .job
                    .as_ref()
                    .and_then(|name| jobs.iter().position(|j| &j.name == name));
                let next = match (at, action) {
                    (None, _) => 0,
                    (Some(i), Action::Up) => i.saturating_sub(1),
                    (Some(i), _) => (i + 1).min(jobs.len() - 1),
                };
                self.job = Some(jobs[next].name.clone());
            }
            (Action::Up, View::Job(_)) => self.pod = self.pod.saturating_sub(1),
            (Action::Down, View::Job(job)) => {
                let count = model.pods_of(job).len();
                self.pod = (self.pod + 1).min(count.saturating_sub(1));
            }
            (Action::Open, View::Overview) => {
                if self.job.is_none() {
                    self.job = model.jobs().first().map(|j| j.name.clone());
                }
                if let Some(job) = &self.job {
                    self.view = View::Job(job.clone());
                    self.pod = 0;
                }
            }
            (Action::Open, View::Job(_)) => {}
            (Action::Back, _) => {
                self.view = View::Overview;
                self.log = None;
            }
        }
        true
    }

    /// Starts following the selected pod's logs when the selection changed.
    fn follow_logs(&mut self, model: &Model) {
        let View::Job(job) = &self.view else {
            self.log = None;
            return;
        };
        let pods = model.pods_of(job);
        let Some(pod) = pods.get(self.pod.min(pods.len().saturating_sub(1))) else {
            return;
        };
        if self.log.as_ref().is_some_and(|log| log.pod == pod.name) {
            return;
        }
        let buffer = Arc::new(Mutex::new(LogBuffer {
            status: "connecting".to_string(),
            ..LogBuffer::default()
        }));
        let task = tokio::spawn(tail(
            self.pods.clone(),
            pod.name.clone(),
            pod.container.clone(),
            buffer.clone(),
        ));
        self.log = Some(LogTail {
            pod: pod.name.clone(),
            buffer,
            task,
        });
    }

    fn draw(&self, frame: &mut Frame, model: &Model, now: Instant) {
        let counts = model.counts();
        let rates = model.rates(now);
        let [header, middle, bottom, footer] = Layout::vertical([
            Constraint::Length(5),
            Constraint::Percentage(35),
            Constraint::Min(6),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        draw_header(frame, header, model, &counts, &rates, now);
        let [chart, placement] =
            Layout::horizontal([Constraint::Percentage(65), Constraint::Percentage(35)])
                .areas(middle);
        draw_chart(frame, chart, model, &counts, now);
        draw_placement(frame, placement, model, &counts);
        match &self.view {
            View::Overview => {
                let [jobs, failures] =
                    Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
                        .areas(bottom);
                self.draw_jobs(frame, jobs, model, &counts);
                draw_failures(frame, failures, model);
            }
            View::Job(job) => {
                let [pods, logs] =
                    Layout::horizontal([Constraint::Percentage(45), Constraint::Percentage(55)])
                        .areas(bottom);
                self.draw_pods(frame, pods, model, job);
                self.draw_logs(frame, logs);
            }
        }
        let keys = match self.view {
            View::Overview => " q quit · ↑↓/j k select a Job · Enter its pods and logs ",
            View::Job(_) => " q quit · ↑↓/j k select a pod · Esc back to the Jobs ",
        };
        let mut spans = vec![Span::styled(keys, Style::new().reversed())];
        if let Some(note) = model.last_note() {
            spans.push(Span::raw(" "));
            spans.push(Span::styled(note.to_string(), Style::new().yellow()));
        } else if let Some(hint) = &self.hint {
            spans.push(Span::raw(" "));
            spans.push(Span::raw(hint.clone()));
        }
        frame.render_widget(Paragraph::new(Line::from(spans)), footer);
    }

    fn draw_jobs(&self, frame: &mut Frame, area: Rect, model: &Model, counts: &Counts) {
        let jobs = model.jobs();
        let rows = jobs.iter().map(|job| {
            let (state, color) = match job.state {
                JobState::Active => ("active", Color::Cyan),
                JobState::Succeeded => ("succeeded", Color::Green),
                JobState::Failed => ("failed", Color::Red),
            };
            Row::new(vec![
                Span::raw(job.name.clone()),
                Span::styled(state, Style::new().fg(color)),
                Span::raw(format!("{}/{}/{}", job.active, job.succeeded, job.failed)),
                Span::raw(age(job.created)),
            ])
        });
        let mut state = TableState::default().with_selected(
            self.job
                .as_ref()
                .and_then(|name| jobs.iter().position(|j| &j.name == name)),
        );
        let title = format!(
            " jobs: {} shown, {} active · ↑↓ select, Enter pods & logs ",
            jobs.len(),
            counts.jobs_active
        );
        let table = Table::new(
            rows,
            [
                Constraint::Min(20),
                Constraint::Length(9),
                Constraint::Length(8),
                Constraint::Length(6),
            ],
        )
        .header(Row::new(["job", "status", "pods a/s/f", "age"]).bold())
        .block(Block::new().borders(Borders::ALL).title(title))
        .row_highlight_style(Style::new().reversed())
        .highlight_symbol("> ");
        frame.render_stateful_widget(table, area, &mut state);
    }

    fn draw_pods(&self, frame: &mut Frame, area: Rect, model: &Model, job: &str) {
        let pods = model.pods_of(job);
        let rows = pods.iter().map(|pod| {
            let color = match pod.phase {
                Phase::Pending => Color::Yellow,
                Phase::Running => Color::Cyan,
                Phase::Succeeded => Color::Green,
                Phase::Failed | Phase::Unknown => Color::Red,
            };
            Row::new(vec![
                Span::raw(pod.name.clone()),
                Span::styled(pod.phase.as_str(), Style::new().fg(color)),
                Span::raw(pod.node.clone().unwrap_or_else(|| "-".to_string())),
                Span::raw(pod.reason.clone().unwrap_or_default()),
            ])
        });
        let selected = (!pods.is_empty()).then(|| self.pod.min(pods.len() - 1));
        let mut state = TableState::default().with_selected(selected);
        let gone = if model.job(job).is_none() {
            " (deleted)"
        } else {
            ""
        };
        let table = Table::new(
            rows,
            [
                Constraint::Min(16),
                Constraint::Length(9),
                Constraint::Length(16),
                Constraint::Min(8),
            ],
        )
        .header(Row::new(["pod", "phase", "node", "reason"]).bold())
        .block(
            Block::new()
                .borders(Borders::ALL)
                .title(format!(" pods of job {job}{gone} · Esc back ")),
        )
        .row_highlight_style(Style::new().reversed())
        .highlight_symbol("> ");
        frame.render_stateful_widget(table, area, &mut state);
    }

    fn draw_logs(&self, frame: &mut Frame, area: Rect) {
        let (title, lines) = match &self.log {
            None => (" logs ".to_string(), vec![Line::raw("no pod yet")]),
            Some(log) => {
                let buffer = log.buffer.lock();
                let visible = usize::from(area.height.saturating_sub(2));
                let skip = buffer.lines.len().saturating_sub(visible);
                (
                    format!(" logs of {} ({}) ", log.pod, buffer.status),
                    buffer
                        .lines
                        .iter()
                        .skip(skip)
                        .map(|l| Line::raw(l.clone()))
                        .collect(),
                )
            }
        };
        frame.render_widget(
            Paragraph::new(lines).block(Block::new().borders(Borders::ALL).title(title)),
            area,
        );
    }
}

fn age(created: Option<jiff::Timestamp>) -> String {
    let Some(created) = created else {
        return "-".to_string();
    };
    let seconds = jiff::Timestamp::now()
        .duration_since(created)
        .as_secs()
        .max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

/// `1234567` as `1,234,567`: a broker's backlog can run to millions.
fn grouped(value: i64) -> String {
    let digits = value.unsigned_abs().to_string();
    let mut text = String::with_capacity(digits.len() * 4 / 3 + 1);
    if value < 0 {
        text.push('-');
    }
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            text.push(',');
        }
        text.push(digit);
    }
    text
}

fn number(label: &'static str, value: impl std::fmt::Display, color: Color) -> Vec<Span<'static>> {
    vec![
        Span::raw(format!("{label} ")),
        Span::styled(value.to_string(), Style::new().fg(color).bold()),
        Span::raw("   "),
    ]
}

fn draw_header(
    frame: &mut Frame,
    area: Rect,
    model: &Model,
    counts: &Counts,
    rates: &Rates,
    now: Instant,
) {
    let mut events = vec![Span::raw("events: ")];
    match &model.pipeline {
        PipelineView::Found(info) => {
            events.extend(number("received", info.status.received, Color::White));
            events.extend(number("queued", info.status.pending, Color::Yellow));
            if let Some(lag) = info.status.source_lag {
                events.extend(number("lag", grouped(lag), Color::Yellow));
            }
            events.extend(number(
                "dead-lettered",
                info.status.dead_lettered,
                if info.status.dead_lettered > 0 {
                    Color::Red
                } else {
                    Color::White
                },
            ));
            events.extend(number(
                "rate",
                format!("{:.1}/s", rates.events_per_second),
                Color::White,
            ));
            let color = match info.state {
                super::model::PipelineState::Ready => Color::Green,
                super::model::PipelineState::Paused => Color::Yellow,
                super::model::PipelineState::Invalid => Color::Red,
                super::model::PipelineState::Failing => Color::Red,
                super::model::PipelineState::Unknown => Color::Gray,
            };
            events.extend(number("pipeline", info.state.as_str(), color));
        }
        PipelineView::Missing => {
            events.push(Span::styled(
                "no Pipeline resource (run from a file?): Jobs and pods only   ",
                Style::new().yellow(),
            ));
            events.extend(number(
                "rate",
                format!("{:.1}/s", rates.events_per_second),
                Color::White,
            ));
        }
        PipelineView::Unknown => events.push(Span::raw("reading the Pipeline resource…")),
    }
    let mut jobs = vec![Span::raw("jobs:   ")];
    jobs.extend(number("active", counts.jobs_active, Color::Cyan));
    jobs.extend(number("succeeded", counts.jobs_succeeded, Color::Green));
    jobs.extend(number(
        "failed",
        counts.jobs_failed,
        if counts.jobs_failed > 0 {
            Color::Red
        } else {
            Color::White
        },
    ));
    jobs.extend(number(
        "created",
        format!("{:.1}/s", rates.jobs_per_second),
        Color::White,
    ));
    let mut pods = vec![Span::raw("pods:   ")];
    pods.extend(number("pending", counts.pods_pending, Color::Yellow));
    pods.extend(number("running", counts.pods_running, Color::Cyan));
    pods.extend(number("succeeded", counts.pods_succeeded, Color::Green));
    pods.extend(number(
        "failed",
        counts.pods_failed,
        if counts.pods_failed > 0 {
            Color::Red
        } else {
            Color::White
        },
    ));
    pods.extend(number(
        "in flight",
        format!("{} (peak {})", counts.in_flight(), model.peak),
        Color::White,
    ));
    let synced = if model.synced() { "" } else { " · listing…" };
    let title = format!(
        " spate watch {} · namespace {} · {}s{synced} ",
        model.pipeline_name,
        model.namespace,
        model.elapsed(now).as_secs()
    );
    frame.render_widget(
        Paragraph::new(vec![Line::from(events), Line::from(jobs), Line::from(pods)]).block(
            Block::new().borders(Borders::ALL).title(Span::styled(
                title,
                Style::new().add_modifier(Modifier::BOLD),
            )),
        ),
        area,
    );
}

fn draw_chart(frame: &mut Frame, area: Rect, model: &Model, counts: &Counts, now: Instant) {
    let end = model.elapsed(now).as_secs_f64().max(1.0);
    let start = (end - CHART_WINDOW).max(0.0);
    let mut points: Vec<(f64, f64)> = model
        .history()
        .filter(|(t, _)| *t >= start)
        .map(|(t, v)| (t, v as f64))
        .collect();
    points.push((end, counts.in_flight() as f64));
    let top = points
        .iter()
        .map(|(_, v)| *v)
        .fold(1.0_f64, f64::max)
        .ceil();
    let dataset = Dataset::default()
        .marker(Marker::Braille)
        .graph_type(GraphType::Line)
        .style(Style::new().cyan())
        .data(&points);
    let chart = Chart::new(vec![dataset])
        .block(Block::new().borders(Borders::ALL).title(format!(
            " pods pending+running over time: now {}, peak {} ",
            counts.in_flight(),
            model.peak
        )))
        .x_axis(
            Axis::default()
                .bounds([start, end])
                .labels([format!("-{:.0}s", end - start), "now".to_string()]),
        )
        .y_axis(
            Axis::default()
                .bounds([0.0, top * 1.1])
                .labels(["0".to_string(), format!("{top:.0}")]),
        );
    frame.render_widget(chart, area);
}

fn draw_placement(frame: &mut Frame, area: Rect, model: &Model, counts: &Counts) {
    let mut lines = vec![
        Line::from(
            [
                number("virtual", counts.virtual_, Color::Magenta),
                number("regular", counts.regular, Color::Blue),
                number("unscheduled", counts.unscheduled, Color::Yellow),
            ]
            .concat(),
        ),
        Line::raw(""),
    ];
    let widest = counts.nodes.values().copied().max().unwrap_or(0).max(1);
    let bar_room = usize::from(area.width.saturating_sub(36)).max(4);
    for (node, pods) in &counts.nodes {
        let is_virtual = model.nodes().get(node).copied();
        let kind = match is_virtual {
            Some(true) => "virtual",
            Some(false) => "regular",
            None => "?",
        };
        let bar = "█".repeat(((*pods as usize) * bar_room).div_ceil(widest as usize));
        lines.push(Line::from(vec![
            Span::raw(format!("{node:<18.18} {kind:<7} {pods:>5} ")),
            Span::styled(
                bar,
                Style::new().fg(if is_virtual == Some(false) {
                    Color::Blue
                } else {
                    Color::Magenta
                }),
            ),
        ]));
    }
    if counts.nodes.is_empty() {
        lines.push(Line::raw("no pod on a node"));
    }
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::new()
                .borders(Borders::ALL)
                .title(" placement: pods pending+running per node "),
        ),
        area,
    );
}

fn draw_failures(frame: &mut Frame, area: Rect, model: &Model) {
    let tz = jiff::tz::TimeZone::system();
    let lines: Vec<Line> = model
        .failures()
        .rev()
        .take(usize::from(area.height))
        .map(|failure| {
            Line::from(vec![
                Span::raw(
                    failure
                        .time
                        .to_zoned(tz.clone())
                        .strftime("%H:%M:%S ")
                        .to_string(),
                ),
                Span::styled(failure.object.clone(), Style::new().red()),
                Span::raw(format!(" {}", failure.message)),
            ])
        })
        .collect();
    let count = model.failures().count();
    let lines = if lines.is_empty() {
        vec![Line::raw("none")]
    } else {
        lines
    };
    frame.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: true }).block(
            Block::new()
                .borders(Borders::ALL)
                .title(format!(" recent failures ({count}), newest first ")),
        ),
        area,
    );
}

/// Restores the terminal when dropped, whatever the way out.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Runs the view until `stop`, a quit key, or (with `until_idle`) the pipeline stays idle.
pub(super) async fn run(
    client: kube::Client,
    namespace: &str,
    model: &Arc<Mutex<Model>>,
    options: &WatchOptions,
    stop: &CancellationToken,
) -> anyhow::Result<WatchEnd> {
    // Before the terminal is set up: a set-up that fails half-way is undone too.
    let _restore = Restore;
    let mut terminal = ratatui::try_init()
        .context("the terminal UI needs a terminal (use --output plain or json)")?;
    let (keys_tx, mut keys) = tokio::sync::mpsc::unbounded_channel();
    let reading = Arc::new(AtomicBool::new(true));
    let input = reading.clone();
    std::thread::spawn(move || {
        while input.load(Ordering::Relaxed) {
            match event::poll(Duration::from_millis(100)) {
                Ok(true) => match event::read() {
                    Ok(event) => {
                        if keys_tx.send(event).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                },
                Ok(false) => {}
                Err(_) => return,
            }
        }
    });
    // Whatever way the loop ends, the key reader stops.
    struct StopReading(Arc<AtomicBool>);
    impl Drop for StopReading {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Relaxed);
        }
    }
    let _reader = StopReading(reading);

    let mut app = App::new(Api::namespaced(client, namespace), options.hint.clone());
    let mut ticker = tokio::time::interval(FRAME);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut idle_since: Option<Instant> = None;
    let mut keys_open = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(WatchEnd::Cancelled),
            _ = ticker.tick() => {}
            key = keys.recv(), if keys_open => match key {
                Some(Event::Key(key)) => {
                    if let Some(action) = action(key)
                        && !app.act(action, &model.lock())
                    {
                        return Ok(WatchEnd::Quit);
                    }
                }
                Some(_) => {}
                // The terminal stopped giving keys: keep showing, until stopped or idle.
                None => keys_open = false,
            },
        }
        let now = Instant::now();
        let idle = {
            let mut model = model.lock();
            model.sample(now);
            app.follow_logs(&model);
            terminal.draw(|frame| app.draw(frame, &model, now))?;
            model.idle()
        };
        if options.until_idle {
            if idle {
                let since = *idle_since.get_or_insert(now);
                if now.duration_since(since) >= options.idle_for {
                    return Ok(WatchEnd::Idle);
                }
            } else {
                idle_since = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::watch::model::PipelineInfo;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use serde_json::json;

    fn screen(app: &App, model: &Model, now: Instant) -> String {
        let mut terminal = Terminal::new(TestBackend::new(140, 40)).unwrap();
        terminal.draw(|frame| app.draw(frame, model, now)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        (0..buffer.area.height)
            .map(|y| {
                (0..buffer.area.width)
                    .map(|x| buffer[(x, y)].symbol().to_string())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn job(name: &str) -> k8s_openapi::api::batch::v1::Job {
        serde_json::from_value(json!({
            "metadata": {"name": name, "creationTimestamp": "2025-01-01T00:00:00Z"},
            "status": {"active": 1}
        }))
        .unwrap()
    }

    fn pod(name: &str, job: &str, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"batch.kubernetes.io/job-name": job}},
            "spec": {"nodeName": "spate-virtual-0", "containers": [{"name": "work"}]},
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn draws_counts_jobs_and_a_jobs_pods() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let now = Instant::now();
        let mut model = Model::new("default", "thumbs", now);
        model.relist_jobs(&[job("thumbs-a"), job("thumbs-b")], now);
        model.relist_pods(&[
            pod("thumbs-a-1", "thumbs-a", "Running"),
            pod("thumbs-b-1", "thumbs-b", "Pending"),
        ]);
        model.set_pipeline(PipelineView::Missing, now);
        model.sample(now);
        // A client that is never called: the log tail only starts in the Job view.
        let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let mut app = App::new(Api::namespaced(client, "default"), None);
        let text = screen(&app, &model, now);
        assert!(text.contains("spate watch thumbs"), "{text}");
        assert!(text.contains("running 1"), "{text}");
        assert!(text.contains("pending 1"), "{text}");
        assert!(text.contains("active 2"), "{text}");
        assert!(text.contains("no Pipeline resource"), "{text}");
        assert!(text.contains("spate-virtual-0"), "{text}");

        // Newest first: thumbs-b was seen last.
        assert!(app.act(Action::Down, &model));
        assert_eq!(app.job.as_deref(), Some("thumbs-b"));
        assert!(app.act(Action::Down, &model));
        assert_eq!(app.job.as_deref(), Some("thumbs-a"));
        assert!(app.act(Action::Down, &model), "stays on the last Job");
        assert_eq!(app.job.as_deref(), Some("thumbs-a"));
        assert!(app.act(Action::Up, &model));
        assert!(app.act(Action::Up, &model), "stays on the first Job");
        assert!(app.act(Action::Down, &model));
        assert!(app.act(Action::Open, &model));
        assert_eq!(app.view, View::Job("thumbs-a".to_string()));
        let text = screen(&app, &model, now);
        assert!(text.contains("pods of job thumbs-a"), "{text}");
        assert!(text.contains("thumbs-a-1"), "{text}");
        assert!(text.contains("Running"), "{text}");
        assert!(app.act(Action::Back, &model));
        assert_eq!(app.view, View::Overview);
        assert!(!app.act(Action::Quit, &model));
    }

    #[tokio::test]
    async fn the_header_shows_the_sources_lag_when_it_is_known() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let now = Instant::now();
        let mut model = Model::new("default", "thumbs", now);
        model.relist_jobs(&[], now);
        model.relist_pods(&[]);
        let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let app = App::new(Api::namespaced(client, "default"), None);
        let status = |status: serde_json::Value| {
            PipelineView::Found(PipelineInfo::from_parts(Some(&status), false))
        };
        model.set_pipeline(
            status(json!({"received": 42, "pending": 31, "sourceLag": 1234567})),
            now,
        );
        let text = screen(&app, &model, now);
        assert!(
            text.contains("received 42   queued 31   lag 1,234,567   dead-lettered 0"),
            "{text}"
        );
        // A source that cannot tell shows no lag rather than a made-up zero.
        model.set_pipeline(status(json!({"received": 42, "pending": 31})), now);
        let text = screen(&app, &model, now);
        assert!(
            text.contains("received 42   queued 31   dead-lettered 0"),
            "{text}"
        );
        assert!(!text.contains("lag"), "{text}");
    }

    #[test]
    fn large_numbers_are_grouped_by_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(1234567), "1,234,567");
        assert_eq!(grouped(-12345), "-12,345");
        assert_eq!(grouped(i64::MAX), "9,223,372,036,854,775,807");
    }

    #[test]
    fn keys_map_to_actions() {
        let key = |code| event::KeyEvent::new(code, KeyModifiers::NONE);
        assert_eq!(action(key(KeyCode::Char('j'))), Some(Action::Down));
        assert_eq!(action(key(KeyCode::Up)), Some(Action::Up));
        assert_eq!(action(key(KeyCode::Enter)), Some(Action::Open));
        assert_eq!(action(key(KeyCode::Esc)), Some(Action::Back));
        assert_eq!(action(key(KeyCode::Char('q'))), Some(Action::Quit));
        assert_eq!(
            action(event::KeyEvent::new(
                KeyCode::Char('c'),
                KeyModifiers::CONTROL
            )),
            Some(Action::Quit)
        );
        assert_eq!(action(key(KeyCode::Char('x'))), None);
    }
}
