//! A battery of bad inputs against the real binary: every one ends with exit status 1
//! or 2 and at most 3 lines on stderr, nothing panics, and nothing on disk changes (no
//! run directory is altered, none is left behind). `cargo test --test bad_inputs --
//! --nocapture` prints each case's message.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every file (with its bytes) and folder under `root`.
fn tree(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let key = path.strip_prefix(root).unwrap().to_path_buf();
            if path.is_dir() {
                stack.push(path);
                out.insert(key, None);
            } else {
                out.insert(key, Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

fn vitscope(cwd: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vitscope"))
        .args(args)
        .current_dir(cwd)
        .env("XDG_CACHE_HOME", cwd.join("no-cache"))
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run vitscope")
}

fn tiny(args: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = args.iter().map(|s| (*s).to_string()).collect();
    for set in common::tiny_sets() {
        all.push("--set".into());
        all.push(set);
    }
    all
}

/// The fixtures: a finished tiny run, a damaged copy, things that are not runs or
/// data, and config files that are not configs.
fn fixtures(root: &Path) {
    let done = root.join("runs/done");
    let args = tiny(&[
        "train",
        "--headless",
        "--max-steps",
        "3",
        "--run-dir",
        done.to_str().unwrap(),
    ]);
    let out = vitscope(root, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let damaged = root.join("runs/damaged");
    std::fs::create_dir_all(damaged.join("probes")).unwrap();
    for entry in std::fs::read_dir(&done).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, damaged.join(path.file_name().unwrap())).unwrap();
        }
    }
    let checkpoint = damaged.join("checkpoint.safetensors");
    let bytes = std::fs::read(&checkpoint).unwrap();
    std::fs::write(&checkpoint, &bytes[..bytes.len() / 2]).unwrap();
    // A run whose config.toml was edited to one block: its checkpoint holds two.
    let shrunk = root.join("runs/shrunk");
    std::fs::create_dir_all(shrunk.join("probes")).unwrap();
    for entry in std::fs::read_dir(&done).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, shrunk.join(path.file_name().unwrap())).unwrap();
        }
    }
    let config = std::fs::read_to_string(shrunk.join("config.toml")).unwrap();
    assert!(config.contains("depth = 2\n"), "{config}");
    std::fs::write(
        shrunk.join("config.toml"),
        config.replace("depth = 2\n", "depth = 1\n"),
    )
    .unwrap();

    std::fs::create_dir(root.join("foreign")).unwrap();
    std::fs::write(root.join("foreign/notes.txt"), "not a run").unwrap();
    std::fs::create_dir(root.join("garbage")).unwrap();
    std::fs::write(
        root.join("garbage/config.toml"),
        [0u8, 159, 146, 150, 255, 10],
    )
    .unwrap();
    std::fs::write(root.join("garbage/metrics.jsonl"), "{\"step\": oops\n").unwrap();
    std::fs::write(root.join("afile"), "a file, not a folder").unwrap();
    std::fs::create_dir(root.join("empty")).unwrap();
    let layout = root.join("truncated/cifar-10-batches-bin");
    std::fs::create_dir_all(&layout).unwrap();
    for name in [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ] {
        std::fs::write(layout.join(name), vec![3u8; 100]).unwrap();
    }
    std::fs::write(layout.join("batches.meta.txt"), "airplane\n").unwrap();
    std::fs::write(root.join("bad.toml"), "[model\ndim = ").unwrap();
    std::fs::write(root.join("binary.toml"), [0u8, 1, 2, 255, 254, 0, 7]).unwrap();
    std::fs::write(root.join("types.toml"), "[train]\nlr = \"fast\"\n").unwrap();
    std::fs::write(root.join("unknown.toml"), "[model]\nwidth = 3\n").unwrap();
}

#[test]
fn bad_inputs_fail_in_a_few_lines_and_touch_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    fixtures(root);
    let synthetic = ["--dataset", "synthetic"];
    let mut cases: Vec<Vec<String>> = [
        &["train", "--headless", "--set", "model.depth=four"][..],
        &["train", "--headless", "--set", "model.dept=4"],
        &["train", "--headless", "--config", "bad.toml"],
        &["train", "--headless", "--config", "binary.toml"],
        &["train", "--headless", "--config", "types.toml"],
        &["train", "--headless", "--config", "unknown.toml"],
        &["train", "--headless", "--config", "missing.toml"],
        &["train", "--headless", "--set", "model.depth"],
        &["train", "--headless", "--set", "=4"],
        &["train", "--headless", "--set", "model.depth=100000"],
        &["train", "--headless", "--set", "model.dim=999999999"],
        &[
            "train",
            "--headless",
            "--set",
            "train.batch_size=9223372036854775807",
        ],
        &["train", "--headless", "--set", "model.patch_size=0"],
        &["train", "--headless", "--set", "train.lr=-1"],
        &["train", "--headless", "--set", "train.lr=nan"],
        &["train", "--headless", "--set", "train.weight_decay=-inf"],
        &["train", "--headless", "--budget", "soon"],
        &["train", "--headless", "--threads", "999"],
        &["train", "--headless", "--epochs", "abc"],
        &["train", "--headless", "--data-dir", "missing"],
        &["train", "--headless", "--data-dir", "empty"],
        &["train", "--headless", "--data-dir", "truncated"],
        &["train", "--headless", "--data-dir", "afile"],
        &["train", "--headless", "--resume", "missing"],
        &["train", "--headless", "--resume", "foreign"],
        &["train", "--headless", "--resume", "afile"],
        &["train", "--headless", "--resume", "runs/damaged"],
        &[
            "train",
            "--headless",
            "--resume",
            "runs/done",
            "--set",
            "model.dim=48",
        ],
        &[
            "train",
            "--headless",
            "--resume",
            "runs/done",
            "--set",
            "model.depth=1",
        ],
        &["train", "--headless", "--resume", "runs/shrunk"],
        &[
            "train",
            "--headless",
            "--resume",
            "runs/done",
            "--config",
            "types.toml",
        ],
        &["view", "garbage"],
        &["view", "afile"],
        &["view", "missing"],
        &["view", "foreign"],
        &["bench", "--steps", "0"],
        &["bench", "--set", "model.depth=100000"],
        &["frobnicate"],
    ]
    .iter()
    .map(|c| c.iter().map(|s| (*s).to_string()).collect())
    .collect();
    // Failures found only once training starts: the new run is removed again.
    let mut small = tiny(&["train", "--headless"]);
    small.extend(["--set".into(), "data.synthetic_train_size=10".into()]);
    cases.push(small);
    cases.push(tiny(&["train", "--headless", "--run-dir", "afile"]));
    cases.push(tiny(&["train", "--headless", "--run-dir", "afile/run"]));
    for case in &mut cases {
        if case.iter().any(|a| a == "--run-dir") && !case.iter().any(|a| a == "--dataset") {
            case.extend(synthetic.iter().map(|s| (*s).to_string()));
        }
    }
    // A run folder that cannot be written, unless this user can write anywhere (root).
    let locked = root.join("locked");
    std::fs::create_dir(&locked).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
        if std::fs::write(locked.join("probe"), "x").is_ok() {
            std::fs::remove_file(locked.join("probe")).unwrap();
            println!(
                "(running as a user who can write anywhere: the unwritable folder case is skipped)"
            );
        } else {
            cases.push(tiny(&["train", "--headless", "--run-dir", "locked/run"]));
        }
    }

    let before = tree(root);
    let mut failures = Vec::new();
    for case in &cases {
        let args: Vec<&str> = case.iter().map(String::as_str).collect();
        let out = vitscope(root, &args);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        // Printed without the tiny model's settings.
        let tiny_sets = common::tiny_sets();
        let mut shown = Vec::new();
        for (i, a) in args.iter().enumerate() {
            let next_is_tiny = args
                .get(i + 1)
                .is_some_and(|n| tiny_sets.iter().any(|s| s == n));
            if !(tiny_sets.iter().any(|s| s == a) || (*a == "--set" && next_is_tiny)) {
                shown.push(*a);
            }
        }
        println!(
            "$ vitscope {}\n  exit {:?}: {}",
            shown.join(" "),
            out.status.code(),
            stderr.trim_end().replace('\n', "\n  ")
        );
        let lines = stderr.lines().count();
        if !matches!(out.status.code(), Some(1 | 2)) {
            failures.push(format!("{args:?}: exit status {:?}", out.status.code()));
        }
        if lines == 0 || lines > 3 {
            failures.push(format!("{args:?}: {lines} lines on stderr"));
        }
        if stderr.contains("panicked")
            || stderr.contains("Backtrace")
            || stderr.contains("Location:")
        {
            failures.push(format!("{args:?}: a panic report"));
        }
        let after = tree(root);
        if after != before {
            let changed: Vec<_> = after
                .keys()
                .chain(before.keys())
                .filter(|k| after.get(*k) != before.get(*k))
                .collect();
            failures.push(format!("{args:?}: changed {changed:?}"));
            break;
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // Viewing a good run and a damaged one only reads them.
    for run in ["runs/done", "runs/damaged"] {
        let out = vitscope(root, &["view", run]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("step"));
        assert!(tree(root) == before, "view {run} changed files");
    }
    assert!(cases.len() >= 40, "{}", cases.len());
}

/// A resume cannot change what the model is: a `model.*` key (the products' kind aside)
/// is refused naming the key and both values, and a checkpoint whose tensors are not
/// exactly the model's is refused naming them; either leaves the run as it was.
#[test]
fn a_resume_that_changes_the_model_is_refused_naming_why() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    fixtures(root);
    let before = tree(root);
    let stderr = |args: &[&str]| {
        let out = vitscope(root, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        String::from_utf8_lossy(&out.stderr).trim_end().to_string()
    };
    let depth = stderr(&[
        "train",
        "--headless",
        "--resume",
        "runs/done",
        "--set",
        "model.depth=1",
    ]);
    assert_eq!(depth.lines().count(), 1, "{depth}");
    assert!(
        depth.contains("model.depth = 1") && depth.contains("model.depth = 2"),
        "{depth}"
    );
    let shrunk = stderr(&["train", "--headless", "--resume", "runs/shrunk"]);
    assert_eq!(shrunk.lines().count(), 1, "{shrunk}");
    assert!(
        shrunk.contains("checkpoint.safetensors")
            && shrunk.contains("`model.blocks.1.")
            && shrunk.contains("that the model has not"),
        "{shrunk}"
    );
    assert!(tree(root) == before, "a refused resume changed files");
    // The products' kind may change (it says so in run.log; tests/training.rs).
    let out = vitscope(
        root,
        &[
            "train",
            "--headless",
            "--resume",
            "runs/done",
            "--max-steps",
            "4",
            "--set",
            "model.matmul=f32",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `VITSCOPE_CPU` that names no instruction level is refused in one line that names
/// the variable and the levels it takes, before any work starts.
#[test]
fn an_unknown_cpu_level_is_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vitscope"))
        .args(["bench", "--steps", "1"])
        .current_dir(tmp.path())
        .env("VITSCOPE_CPU", "avx1024")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("VITSCOPE_CPU=avx1024") && stderr.contains("avx512bf16"),
        "{stderr}"
    );
    assert!(tree(tmp.path()).is_empty());
}
