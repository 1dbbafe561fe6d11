//! The binary as a user runs it: errors are one clear line, headless output is plain.

mod common;

use std::process::{Command, Output};

fn vitscope(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vitscope"))
        .args(args)
        .env(
            "XDG_CACHE_HOME",
            std::env::temp_dir().join("vitscope-cli-test-cache"),
        )
        .output()
        .expect("run vitscope")
}

fn tiny_args() -> Vec<String> {
    common::tiny_sets()
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
}

/// Starts a long headless run of the tiny model in `run` with one extra `--set`, its
/// stdout piped.
#[cfg(unix)]
fn spawn_long_headless_run(run: &std::path::Path, set: &str) -> std::process::Child {
    let mut args: Vec<String> = [
        "train",
        "--headless",
        "--epochs",
        "1000",
        "--set",
        set,
        "--run-dir",
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect();
    args.push(run.display().to_string());
    args.extend(tiny_args());
    Command::new(env!("CARGO_BIN_EXE_vitscope"))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn stderr_line(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(text.lines().count(), 1, "expected one line, got: {text}");
    text.trim_end().to_string()
}

#[test]
fn config_errors_are_one_line_naming_the_key() {
    let out = vitscope(&["train", "--set", "model.dept=4"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr_line(&out),
        "error: --set model.dept=4: unknown key `model.dept`"
    );

    let out = vitscope(&["--set", "model.heads=5"]);
    assert_eq!(
        stderr_line(&out),
        "error: `model.heads` = 5: model.dim = 96 is not divisible by it"
    );

    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("bad.toml");
    std::fs::write(&file, "[train]\nbatch_size = \"big\"\n").unwrap();
    let out = vitscope(&["train", "--config", file.to_str().unwrap()]);
    assert_eq!(
        stderr_line(&out),
        format!(
            "error: {}: `train.batch_size` expects an integer, got \"big\"",
            file.display()
        )
    );
    let out = vitscope(&["train", "--config", "/nonexistent/x.toml"]);
    assert!(stderr_line(&out).starts_with("error: /nonexistent/x.toml: cannot read config file"));

    // More threads than CPUs is refused before anything is written.
    let too_many = std::thread::available_parallelism().map_or(1, usize::from) + 1;
    for command in ["train", "bench"] {
        let out = vitscope(&[
            command,
            "--threads",
            &too_many.to_string(),
            "--set",
            "run.dir=\"/nonexistent/runs\"",
        ]);
        assert_eq!(out.status.code(), Some(1));
        let line = stderr_line(&out);
        assert!(
            line.starts_with(&format!(
                "error: `train.threads` = {too_many} is more than the"
            )),
            "{line}"
        );
    }
}

#[test]
fn missing_data_is_one_line_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let out = vitscope(&[
        "train",
        "--headless",
        "--data-dir",
        tmp.path().to_str().unwrap(),
        "--set",
        &format!("run.dir=\"{}\"", runs.display()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let line = stderr_line(&out);
    assert!(
        line.starts_with(&format!(
            "error: {}: no CIFAR-10 binary files here",
            tmp.path().display()
        )),
        "{line}"
    );
}

#[test]
fn headless_training_writes_a_run_and_prints_plain_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut args = vec![
        "train",
        "--headless",
        "--max-steps",
        "12",
        "--run-dir",
        run.to_str().unwrap(),
    ];
    let tiny = tiny_args();
    args.extend(tiny.iter().map(String::as_str));
    let out = vitscope(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout {stdout}\nstderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains('\u{1b}'), "escape codes in {stdout}");
    assert!(stdout.contains("step     12/12"), "{stdout}");
    assert!(stdout.contains("eval  epoch 1 (step 12): loss"), "{stdout}");
    assert!(
        stdout.contains("finished at step 12 (reached train.max_steps = 12)"),
        "{stdout}"
    );
    for file in [
        "config.toml",
        "metrics.jsonl",
        "checkpoint.safetensors",
        "run.log",
        "probes/images.safetensors",
    ] {
        assert!(run.join(file).exists(), "{file} missing");
    }

    // Viewing reads the run back (plain lines when not on a terminal) and writes nothing.
    let listing = |dir: &std::path::Path| -> Vec<(String, u64, std::time::SystemTime)> {
        let mut files: Vec<_> = common::walk(dir)
            .into_iter()
            .map(|p| {
                let m = std::fs::metadata(&p).unwrap();
                (p.display().to_string(), m.len(), m.modified().unwrap())
            })
            .collect();
        files.sort();
        files
    };
    let before = listing(&run);
    let out = vitscope(&["view", run.to_str().unwrap()]);
    let viewed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{viewed}");
    assert!(viewed.contains("step     12/12"), "{viewed}");
    assert!(viewed.contains("eval  epoch 1 (step 12)"), "{viewed}");
    assert!(viewed.contains("finished at step 12"), "{viewed}");
    assert_eq!(listing(&run), before, "view changed the run directory");

    // Resuming with --config is refused; resuming with more steps continues.
    let out = vitscope(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--config",
        "x.toml",
    ]);
    assert!(stderr_line(&out).contains("--config cannot be combined with --resume"));
    // A resume that changes the model's shape is refused naming the key, and the run is
    // left byte for byte as it was (its config.toml is not rewritten).
    let contents = |dir: &std::path::Path| -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = common::walk(dir)
            .into_iter()
            .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
            .collect();
        files.sort();
        files
    };
    let before = contents(&run);
    let out = vitscope(&[
        "train",
        "--headless",
        "--resume",
        run.to_str().unwrap(),
        "--set",
        "model.dim=48",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_line(&out).contains("model.dim = 48 cannot apply")
            && stderr_line(&out).contains("it trained with model.dim = 32"),
        "{}",
        stderr_line(&out)
    );
    assert!(
        contents(&run) == before,
        "a refused resume changed the run directory"
    );
    let out = vitscope(&[
        "train",
        "--headless",
        "--resume",
        run.to_str().unwrap(),
        "--max-steps",
        "15",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("resumed from"), "{stdout}");
    assert!(stdout.contains("finished at step 15"), "{stdout}");
    // The summary covers the whole run: the evaluation at step 12 came before the resume.
    assert!(
        stdout.contains("before the checkpoint: 1 evaluation, best"),
        "{stdout}"
    );
}

#[test]
fn bench_reports_json_numbers() {
    let mut args = vec!["bench", "--json", "--warmup", "1", "--steps", "2"];
    let tiny = tiny_args();
    args.extend(tiny.iter().map(String::as_str));
    let out = vitscope(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "train_images_per_sec",
        "eval_images_per_sec",
        "matmul_gflops",
        "train_gflops",
    ] {
        assert!(
            report[key].as_f64().unwrap() > 0.0,
            "{key}: {}",
            report[key]
        );
    }
    assert_eq!(report["batch_size"], 32);
    assert_eq!(report["timed_steps"], 2);
}

#[cfg(unix)]
#[test]
fn an_interrupt_a_term_or_a_hangup_stops_headless_training_with_a_checkpoint() {
    use std::io::{BufRead, BufReader};
    // Ctrl-C, `kill`, and the terminal closing under a run left in tmux or over SSH.
    for (signal, said) in [
        (libc::SIGINT, "interrupted: stopping"),
        (libc::SIGTERM, "terminated: stopping"),
        (libc::SIGHUP, "terminated: stopping"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let mut child = spawn_long_headless_run(&run, "run.print_every_secs=0.1");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Wait until it trains, then send the signal.
        for line in lines.by_ref() {
            if line.unwrap().starts_with("step ") {
                break;
            }
        }
        // SAFETY: kill sends a signal to our own child process.
        unsafe {
            libc::kill(child.id() as libc::pid_t, signal);
        }
        let rest: Vec<String> = lines.map(Result::unwrap).collect();
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "{signal}: exit status {status}; output {rest:?}"
        );
        assert!(rest.iter().any(|l| l.contains(said)), "{signal}: {rest:?}");
        assert!(
            rest.iter().any(|l| l.contains("stopped on request")),
            "{signal}: {rest:?}"
        );
        assert!(run.join("checkpoint.safetensors").exists(), "{signal}");
    }
}

#[cfg(unix)]
#[test]
fn a_run_killed_with_sigkill_resumes_from_its_last_checkpoint() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut child = spawn_long_headless_run(&run, "train.checkpoint_every_steps=5");
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        if line.unwrap().starts_with("checkpoint at step 10:") {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();

    let out = vitscope(&[
        "train",
        "--headless",
        "--resume",
        run.to_str().unwrap(),
        "--max-steps",
        "30",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let resumed_at: u64 = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("resumed from ")?
                .rsplit_once("at step ")?
                .1
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no resume line in {stdout}"));
    assert!(
        resumed_at >= 10 && resumed_at.is_multiple_of(5),
        "resumed at {resumed_at}"
    );
    // The metrics hold each step once, in order, whatever the kill cut off.
    let steps: Vec<u64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"kind\":\"train\""))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=30).collect::<Vec<_>>());
}

#[test]
fn a_sweep_trains_each_combination_once_into_its_own_run() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("sweep");
    let mut args: Vec<String> = ["sweep", "--max-steps", "4", "--run-dir"]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
    args.push(folder.display().to_string());
    args.extend(tiny_args());
    args.extend(["--set".into(), "model.norm=pre,none".into()]);
    args.extend(["--set".into(), "model.pos_embed=learned,sincos".into()]);
    let run = |args: &[String]| vitscope(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let out = run(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "norm=none,pos_embed=learned",
            "norm=none,pos_embed=sincos",
            "norm=pre,pos_embed=learned",
            "norm=pre,pos_embed=sincos"
        ]
    );
    let config =
        std::fs::read_to_string(folder.join("norm=none,pos_embed=sincos/config.toml")).unwrap();
    assert!(
        config.contains("norm = \"none\"") && config.contains("pos_embed = \"sincos\""),
        "{config}"
    );
    // The runs screen's compare mode: two of them side by side at their last common probe.
    let comparison =
        vitscope::run::compare::Comparison::open(std::slice::from_ref(&folder)).unwrap();
    let pair = vitscope::ui::tabs::runs::load_pair(&comparison, [0, 1]).unwrap();
    assert!(pair.common && pair.probes.iter().all(Option::is_some));
    let mut view = vitscope::ui::tabs::runs::RunsView::new(vitscope::ui::theme::Theme::new(
        vitscope::ui::theme::ColorMode::NoColor,
        vitscope::config::Markers::Braille,
    ));
    view.on_action(vitscope::ui::keys::Action::ToggleCompare, &comparison);
    let mut terminal = ratatui::Terminal::new(ratatui::backend::TestBackend::new(200, 60)).unwrap();
    terminal
        .draw(|f| {
            vitscope::ui::tabs::runs::render(
                &comparison,
                &view,
                Some(&pair),
                f.area(),
                f.buffer_mut(),
            )
        })
        .unwrap();
    let buf = terminal.backend().buffer();
    let screen: String = (0..60)
        .map(|y| {
            (0..200)
                .map(|x| buf[(x, y)].symbol().to_string())
                .collect::<String>()
                + "\n"
        })
        .collect();
    assert!(
        screen.contains(&format!("side by side at step {}", pair.step)),
        "{screen}"
    );
    assert!(
        screen.contains("b0 norm1") && screen.contains("final") && screen.contains("out σ"),
        "{screen}"
    );
    assert!(
        screen.contains("norm=none,pos_embed=learned")
            && screen.contains("norm=none,pos_embed=sincos"),
        "{screen}"
    );
    // And their per-layer quantities at that step, side by side.
    assert!(
        screen.contains(&format!("by depth at step {}", pair.step))
            && screen.contains("‖g‖")
            && screen.contains("block 1"),
        "{screen}"
    );
    // Again: everything is skipped.
    let out = run(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("finished before, skipped").count(),
        4,
        "{stdout}"
    );
    // A bad value in any combination is refused before anything trains.
    let mut bad = args.clone();
    bad.extend(["--set".into(), "model.norm_kind=layernorm,batchnorm".into()]);
    let other = tmp.path().join("other");
    let at = bad
        .iter()
        .position(|a| *a == folder.display().to_string())
        .unwrap();
    bad[at] = other.display().to_string();
    let out = run(&bad);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("model.norm_kind"));
    assert!(!other.exists());
}
