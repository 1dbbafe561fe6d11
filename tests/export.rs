//! `vitscope export` on a real (tiny) run: every file decodes with the size it states,
//! the pixels follow the recorded data, and the run directory is left as it was.

mod common;

use std::path::Path;
use std::process::Command;

use vitscope::export::pictures::{attention_cell, tile_origin, MATRIX_ORIGIN, TILE_SCALE};
use vitscope::palette::{heat_rgb, image_pixel};
use vitscope::run::RunDir;

fn vitscope(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vitscope"))
        .args(args)
        .output()
        .expect("run vitscope")
}

fn files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out: Vec<_> = common::walk(dir)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

/// Width, height and RGB bytes of a PNG file.
fn decode_png(path: &Path) -> (usize, usize, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}

fn at(png: &(usize, usize, Vec<u8>), x: i64, y: i64) -> (u8, u8, u8) {
    let i = (y as usize * png.0 + x as usize) * 3;
    (png.2[i], png.2[i + 1], png.2[i + 2])
}

/// Runs the binary with `args` and asserts it succeeded.
fn vitscope_ok(args: &[&str]) -> std::process::Output {
    let out = vitscope(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Trains the tiny model on synthetic data for `steps` steps into `run`, with `extra`
/// settings after the tiny ones.
fn train_tiny(run: &Path, steps: &str, extra: &[&str]) {
    let mut args: Vec<String> = ["train", "--headless", "--max-steps", steps, "--run-dir"]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
    args.push(run.display().to_string());
    let sets = common::tiny_sets()
        .into_iter()
        .chain(extra.iter().map(|s| (*s).to_string()));
    for set in sets {
        args.push("--set".into());
        args.push(set);
    }
    vitscope_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// Everything `vitscope export` makes of `run`, into `dir`.
fn export_all(run: &Path, dir: &Path) -> std::process::Output {
    vitscope_ok(&[
        "export",
        run.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
    ])
}

#[test]
fn export_renders_the_run_into_valid_pictures_and_leaves_the_run_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    train_tiny(&run, "30", &["probe.grad_every_steps=10"]);
    let before = files(&run);

    let dir = tmp.path().join("pictures");
    let out = export_all(&run, &dir);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(files(&run), before, "export wrote into the run directory");

    // Every listed file decodes with the stated size.
    let mut listed = 0;
    for line in stdout.lines().filter(|l| l.contains(" bytes  ")) {
        let path = line
            .split_once(" bytes  ")
            .unwrap()
            .1
            .rsplit_once("  (")
            .unwrap()
            .0;
        let what = line.rsplit_once('(').unwrap().1.trim_end_matches(')');
        let path = Path::new(path);
        assert_eq!(
            std::fs::metadata(path).unwrap().len().to_string(),
            line.split_whitespace().next().unwrap()
        );
        if let Some((size, _)) = what.split_once(' ') {
            let (w, h) = size.split_once('x').unwrap();
            let (w, h): (usize, usize) = (w.parse().unwrap(), h.parse().unwrap());
            if what.contains("GIF") {
                let mut options = gif::DecodeOptions::new();
                options.set_color_output(gif::ColorOutput::RGBA);
                let mut d = options
                    .read_info(std::fs::File::open(path).unwrap())
                    .unwrap();
                assert_eq!((d.width() as usize, d.height() as usize), (w, h));
                let mut frames = 0;
                while d.read_next_frame().unwrap().is_some() {
                    frames += 1;
                }
                let stated: usize = what
                    .split(", ")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(frames, stated);
                // One frame per recorded probe.
                assert_eq!(frames, RunDir::open(&run).unwrap().probe_files().len());
            } else {
                let png = decode_png(path);
                assert_eq!((png.0, png.1), (w, h), "{}", path.display());
            }
        }
        listed += 1;
    }
    assert_eq!(listed, 18, "{stdout}");
    let index = std::fs::read_to_string(dir.join("index.html")).unwrap();
    for f in [
        "layernorm-0.gif",
        "attention-L0-H0.png",
        "curves.png",
        "predictions-grid.png",
        "patches-grid.png",
        "features-L0.png",
        "layers-grad-norm.png",
        "layers-update-ratio.png",
        "layers-residual-rms.png",
        "layers-probe-accuracy.png",
        "layers-lens-accuracy.png",
        "layers-cka.png",
    ] {
        assert!(index.contains(f), "{f} not in index.html");
    }
    // The layer maps follow the records: the CKA cell of layers 0 and 1 is the ramp's
    // colour of its value, and the probe map's cell of the last layer at the one
    // record that of its accuracy.
    let history =
        vitscope::events::LayerHistory::from_records(&RunDir::open(&run).unwrap().read_metrics());
    let k = history.knowledge.last().unwrap();
    let cka = decode_png(&dir.join("layers-cka.png"));
    assert_eq!(at(&cka, 100 + 56 + 5, 70 + 5), heat_rgb(k.cka[0][1]));
    let probe_map = decode_png(&dir.join("layers-probe-accuracy.png"));
    let last = k.probe_accuracy.len() as i64 - 1;
    let map = vitscope::inspect::layers::Quantity::ProbeAccuracy.map(&history);
    assert_eq!(
        at(&probe_map, 110 + 5, 50 + last * 28 + 5),
        heat_rgb(map.level(k.probe_accuracy[last as usize]))
    );

    // The attention matrix: the brightest cell sits at the largest weight, the
    // darkest at the smallest, each the ramp's colour of its weight.
    let run_dir = RunDir::open(&run).unwrap();
    let step = run_dir.probe_files().last().unwrap().0;
    let probe = run_dir.read_probe(step).unwrap();
    let t = probe.meta.tokens;
    let m = probe.attention_matrix(0, 0, 0);
    let max = m.iter().copied().fold(0.0f32, f32::max);
    let png = decode_png(&dir.join("attention-L0-H0.png"));
    let cell = attention_cell(t);
    let centre = |i: usize| {
        let (q, k) = ((i / t) as i64, (i % t) as i64);
        at(
            &png,
            MATRIX_ORIGIN.0 + k * cell + cell / 2,
            MATRIX_ORIGIN.1 + q * cell + cell / 2,
        )
    };
    let argmax = (0..t * t).max_by(|&a, &b| m[a].total_cmp(&m[b])).unwrap();
    let argmin = (0..t * t).min_by(|&a, &b| m[a].total_cmp(&m[b])).unwrap();
    assert_eq!(centre(argmax), heat_rgb(1.0));
    assert_eq!(centre(argmin), heat_rgb(f64::from(m[argmin] / max)));
    for (i, &w) in m.iter().enumerate() {
        if w < max * 0.99 {
            assert_ne!(centre(i), heat_rgb(1.0), "cell {i}");
        }
    }

    // A predictions tile is the test image, each pixel 4 x 4.
    let (pixels, _) = run_dir.read_test_images().unwrap();
    let grid = decode_png(&dir.join("predictions-grid.png"));
    for tile in 0..3 {
        let image = &pixels[tile * 3072..(tile + 1) * 3072];
        let (ox, oy) = tile_origin(tile);
        for y in 0..32 {
            for x in 0..32 {
                for (dx, dy) in [(0, 0), (TILE_SCALE - 1, TILE_SCALE - 1)] {
                    let got = at(
                        &grid,
                        ox + x as i64 * TILE_SCALE + dx,
                        oy + y as i64 * TILE_SCALE + dy,
                    );
                    assert_eq!(
                        got,
                        image_pixel(image, x, y),
                        "tile {tile} pixel ({x}, {y})"
                    );
                }
            }
        }
    }

    // One kind, a chosen layer and head; bad choices are one line.
    let one = tmp.path().join("one");
    vitscope_ok(&[
        "export",
        run.to_str().unwrap(),
        "attention",
        "--layer",
        "1",
        "--head",
        "1",
        "--out",
        one.to_str().unwrap(),
    ]);
    assert!(one.join("attention-L1-H1.png").exists() && !one.join("index.html").exists());
    for bad in [&["--step", "7"][..], &["--layer", "9"], &["--image", "5"]] {
        let mut a = vec![
            "export",
            run.to_str().unwrap(),
            "attention",
            "--out",
            one.to_str().unwrap(),
        ];
        a.extend(bad);
        let out = vitscope(&a);
        assert_eq!(out.status.code(), Some(1), "{bad:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).lines().count(),
            1,
            "{bad:?}"
        );
    }
    let out = vitscope(&["export", run.to_str().unwrap(), "movies"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_mean_pooled_run_has_no_cls_in_its_probes_tabs_or_pictures() {
    use vitscope::ui::app::{App, Mode, Tab};
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    train_tiny(&run, "10", &["model.pool=mean"]);
    let run_dir = RunDir::open(&run).unwrap();
    let step = run_dir.probe_files().last().unwrap().0;
    let probe = run_dir.read_probe(step).unwrap();
    // Patch 8 on 32 x 32: a 4 x 4 grid, and no CLS token in front of it.
    assert!(!probe.meta.cls);
    assert_eq!((probe.meta.tokens, probe.meta.grid()), (16, 4));
    assert_eq!(probe.meta.token_name(5), "patch 5 (row 1, col 1)");

    // The tabs that speak of CLS speak of the mean instead.
    let mut follower = vitscope::run::follow::Follower::new(RunDir::open(&run).unwrap());
    let mut app = App::new(
        Mode::Live,
        vitscope::ui::theme::Theme::new(
            vitscope::ui::theme::ColorMode::NoColor,
            vitscope::config::Markers::Braille,
        ),
        "run".into(),
        &run_dir.read_config().unwrap(),
    );
    for event in follower.start().unwrap().into_iter().chain(follower.poll()) {
        app.on_event(event);
    }
    for (tab, says) in [
        (
            Tab::Attention,
            "mean over queries (the head reads the mean)",
        ),
        (Tab::Features, "cos(mean token, patch)"),
        (Tab::Patches, "no CLS: the head reads"),
    ] {
        app.tab = tab;
        let s = common::screen(&app, 200, 60);
        assert!(s.contains(says), "{tab:?}: {s}");
        assert!(!s.contains("CLS ") && !s.contains("CLS's"), "{tab:?}: {s}");
    }
    // The first patch is the first token.
    assert!(common::screen(&app, 200, 60).contains("patch 0 (row 0, col 0) = token 0"));

    // The pictures say what they show, and none names a CLS token.
    let dir = tmp.path().join("pictures");
    export_all(&run, &dir);
    let captions = std::fs::read_to_string(dir.join("index.html")).unwrap();
    assert!(captions.contains("the mean query's weights"), "{captions}");
    assert!(!captions.contains("CLS"), "{captions}");
}

#[test]
fn a_run_recorded_before_the_layer_records_still_exports_and_says_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    train_tiny(&run, "10", &[]);
    // As an older vitscope wrote it: training and evaluation records only.
    let metrics = run.join("metrics.jsonl");
    let old: String = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"kind\":\"train\"") || l.contains("\"kind\":\"eval\""))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&metrics, old).unwrap();
    let dir = tmp.path().join("pictures");
    export_all(&run, &dir);
    assert!(dir.join("curves.png").exists());
    assert!(!common::walk(&dir)
        .iter()
        .any(|p| p.to_string_lossy().contains("layers-")));
    let out = vitscope(&["export", run.to_str().unwrap(), "layers"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no per-layer records"), "{err}");
}
