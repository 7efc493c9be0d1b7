//! `spate dev`: files dropped into the inbox burst into pods on the simulated virtual node,
//! and the count falls back to zero when they are done.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[test]
fn dropped_files_burst_into_pods_and_fall_back_to_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(["dev", "--pod-run-time", "300ms", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stdout = dev.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |deadline: Instant| {
        lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("spate dev went quiet"))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !next(deadline).contains("drop files into") {}
    let inbox = dir.path().join("inbox");
    // Written aside and renamed in, as a producer should: a folder shows half-written files.
    for i in 0..50 {
        let partial = inbox.join(format!("photo-{i}.png.part"));
        std::fs::write(&partial, b"png").unwrap();
        std::fs::rename(&partial, inbox.join(format!("photo-{i}.png"))).unwrap();
    }
    std::fs::write(inbox.join("notes.txt"), b"not an image").unwrap();

    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let line = next(deadline);
        let numbers: Vec<u64> = line
            .split_whitespace()
            .filter_map(|word| word.trim_end_matches(')').parse().ok())
            .collect();
        if let [received, pods, _peak, succeeded, failed, dead] = numbers[..] {
            peak = peak.max(pods);
            assert!(received <= 50, "the text file is not an image: {line}");
            assert_eq!((failed, dead), (0, 0), "{line}");
            if succeeded == 50 && pods == 0 {
                break;
            }
        }
    }
    assert!(peak > 1, "no burst: at most {peak} pods at once");
    assert!(peak <= 50);
    let _ = dev.kill();
    let _ = dev.wait();
}
