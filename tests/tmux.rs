//! End to end in a real terminal: the binary runs in tmux, trains on the synthetic
//! data, and is driven by keys as a user would over SSH.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

struct Session(String);

impl Drop for Session {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux is needed for this test (apt-get install tmux)");
    assert!(
        out.status.success(),
        "tmux {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn capture(session: &str) -> String {
    tmux(&["capture-pane", "-p", "-t", session])
}

fn wait_for(session: &str, what: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let screen = capture(session);
        if screen.contains(what) {
            return screen;
        }
        assert!(
            start.elapsed() < timeout,
            "waited {timeout:?} for {what:?}; the screen:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_for_file(path: &Path, timeout: Duration) -> String {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.ends_with('\n') {
                return text;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{} did not appear in {timeout:?}", path.display());
}

#[test]
fn train_pause_resume_and_quit_in_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let exit_file = tmp.path().join("exit");
    let sets: String = common::tiny_sets()
        .iter()
        .map(|s| format!(" --set {s}"))
        .collect();
    let command = format!(
        "{} train --epochs 1000 --run-dir {} {sets} --set ui.data_refresh_secs=0.2; echo $? > {}",
        env!("CARGO_BIN_EXE_vitscope"),
        run.display(),
        exit_file.display()
    );
    let name = format!("vitscope-test-{}", std::process::id());
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &name,
        "-x",
        "100",
        "-y",
        "30",
        &command,
    ]);
    let session = Session(name.clone());
    let long = Duration::from_secs(60);

    let screen = wait_for(&session.0, "training", long);
    assert!(screen.contains("1 Training"), "{screen}");
    wait_for(&session.0, "smoothed", long);

    tmux(&["send-keys", "-t", &name, "Tab"]);
    tmux(&["send-keys", "-t", &name, "?"]);
    wait_for(&session.0, "pause / resume training", long);
    tmux(&["send-keys", "-t", &name, "Escape"]);

    tmux(&["send-keys", "-t", &name, "Space"]);
    wait_for(&session.0, "paused", long);
    let paused_at = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    std::thread::sleep(Duration::from_millis(800));
    let still = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert!(
        still <= paused_at + 1,
        "training went on while paused: {paused_at} -> {still}"
    );
    tmux(&["send-keys", "-t", &name, "Space"]);
    wait_for(&session.0, "● training", long);

    tmux(&["send-keys", "-t", &name, "q"]);
    wait_for(&session.0, "Stop training and quit?", long);
    tmux(&["send-keys", "-t", &name, "y"]);
    let code = wait_for_file(&exit_file, long);
    assert_eq!(code.trim(), "0", "exit status");
    assert!(run.join("checkpoint.safetensors").exists());
    let log = std::fs::read_to_string(run.join("run.log")).unwrap();
    assert!(
        log.contains("paused at step") && log.contains("finished at step"),
        "{log}"
    );
    assert!(log.contains("stopped on request"), "{log}");
}
