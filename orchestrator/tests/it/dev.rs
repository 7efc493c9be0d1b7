//! `spate dev` end to end: 200 images dropped into the inbox become 200 pods on the
//! simulated virtual node, each running the real example worker (spate-thumbnailer), and 200
//! thumbnails of the requested size; the watch shows the burst and the fall back to zero.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::KillOnDrop;
use image::{ImageFormat, Rgb, RgbImage};

const IMAGES: usize = 200;
/// The thumbnails example asks for 128x128.
const BOX: u32 = 128;

/// The worker cargo builds beside `spate`; built here when only this package was built.
fn thumbnailer() -> PathBuf {
    let spate = PathBuf::from(env!("CARGO_BIN_EXE_spate"));
    let worker = spate.with_file_name("spate-thumbnailer");
    if !worker.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = Command::new(cargo)
            .args(["build", "-p", "spate-thumbnailer"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo build -p spate-thumbnailer failed");
    }
    assert!(worker.is_file(), "no {}", worker.display());
    worker
}

/// A picture with some structure, so the encoders have real work.
fn picture(width: u32, height: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        Rgb([
            ((x * 7 + seed) % 256) as u8,
            ((y * 5 + seed * 3) % 256) as u8,
            ((x ^ y) % 256) as u8,
        ])
    })
}

/// Written aside and renamed in, as a producer should: a folder shows half-written files.
fn drop_image(inbox: &Path, index: usize) -> (String, (u32, u32)) {
    let (name, format, size, expected) = if index.is_multiple_of(2) {
        (
            format!("photo-{index}.png"),
            ImageFormat::Png,
            (320, 240),
            (BOX, 96),
        )
    } else {
        (
            format!("portrait/photo-{index}.jpg"),
            ImageFormat::Jpeg,
            (200, 400),
            (64, BOX),
        )
    };
    let target = inbox.join(&name);
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let partial = target.with_extension("part");
    picture(size.0, size.1, index as u32)
        .save_with_format(&partial, format)
        .unwrap();
    std::fs::rename(&partial, &target).unwrap();
    (name, expected)
}

#[test]
fn two_hundred_images_become_two_hundred_thumbnails_in_a_burst() {
    let worker = thumbnailer();
    let dir = tempfile::tempdir().unwrap();
    let mut dev = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_spate"))
            .args(["dev", "--output", "json", "--worker"])
            .arg(&worker)
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (lines_tx, lines) = mpsc::channel();
    let stdout = dev.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("spate dev prints where to drop files");
        if line.contains("drop files into") {
            break;
        }
    }

    let inbox = dir.path().join("inbox");
    let expected: Vec<(String, (u32, u32))> = (0..IMAGES).map(|i| drop_image(&inbox, i)).collect();
    std::fs::write(inbox.join("notes.txt"), b"not an image").unwrap();

    // The watch's JSON lines: the burst rises and falls back to zero with every Job done.
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut last = String::new();
    loop {
        let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        else {
            panic!("no end of the burst before the deadline; last line: {last}");
        };
        let Ok(state) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let field = |name: &str| state[name].as_u64().unwrap_or(0);
        let active = field(WATCH_PODS_PENDING) + field(WATCH_PODS_RUNNING);
        peak = peak.max(active);
        assert_eq!(field(WATCH_JOBS_FAILED), 0, "{line}");
        last = line;
        if field(WATCH_JOBS_SUCCEEDED) == IMAGES as u64 && active == 0 {
            break;
        }
    }
    assert!(peak > 1, "no burst: at most {peak} pods at once");
    assert!(peak <= 50, "maxParallelism is 50, saw {peak} pods");

    let thumbnails = dir.path().join("thumbnails");
    for (name, (width, height)) in &expected {
        let path = thumbnails.join(name);
        let thumbnail = image::open(&path)
            .unwrap_or_else(|error| panic!("thumbnail {}: {error}", path.display()));
        assert_eq!(
            (thumbnail.width(), thumbnail.height()),
            (*width, *height),
            "{name}"
        );
    }
    assert!(!thumbnails.join("notes.txt").exists());
}

// Field names of `spate watch --output json` (docs/watch.md).
const WATCH_PODS_PENDING: &str = "pods_pending";
const WATCH_PODS_RUNNING: &str = "pods_running";
const WATCH_JOBS_SUCCEEDED: &str = "jobs_succeeded";
const WATCH_JOBS_FAILED: &str = "jobs_failed";
