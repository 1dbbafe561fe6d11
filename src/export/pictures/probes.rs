//! The stills drawn from a probe: attention matrices and maps, hidden-state features,
//! and how an image becomes patches (with the position embeddings' similarities).

use super::draw::{check_image, colour_bar, draw_image, png, signed, token_label};
use crate::config::IMAGE_SIZE;
use crate::export::canvas::{Canvas, BLACK, GREY, WHITE};
use crate::export::request::{Choice, ExportError, Picture, Source};
use crate::inspect::features::{pca, position_similarity, row_norms, scores_to_rgb};
use crate::palette::{heat_rgb, image_pixel};

/// Pixels per matrix cell: about 520 pixels for the whole matrix, at least 4 a cell.
pub fn attention_cell(tokens: usize) -> i64 {
    (520 / tokens.max(1)).max(4) as i64
}

/// Where the attention matrix starts in its picture.
pub const MATRIX_ORIGIN: (i64, i64) = (60, 60);

pub fn attention(source: &Source, choice: &Choice) -> Result<Vec<Picture>, ExportError> {
    let probe = source.probe(choice.step)?;
    let m = &probe.meta;
    let image = check_image(&probe, choice)?;
    if choice.layer >= m.depth || choice.head >= m.heads {
        return Err(ExportError::Request(format!(
            "--layer {} --head {}: the model has {} blocks and {} heads",
            choice.layer, choice.head, m.depth, m.heads
        )));
    }
    let (t, grid, first) = (m.tokens, m.grid(), m.first_patch());
    let matrix = probe.attention_matrix(image, choice.layer, choice.head);
    let max = matrix
        .iter()
        .copied()
        .fold(0.0f32, f32::max)
        .max(f32::MIN_POSITIVE);
    let cell = attention_cell(t);
    let (ox, oy) = MATRIX_ORIGIN;
    let side = cell * t as i64;
    let mut c = Canvas::new((ox + side + 120) as usize, (oy + side + 30) as usize, WHITE);
    c.text(
        ox,
        10,
        &format!(
            "layer {} head {}: softmax(QK^T/sqrt(d_k))",
            choice.layer, choice.head
        ),
        2,
        BLACK,
    );
    c.text(
        ox,
        32,
        &format!(
            "step {}, epoch {}, image {image}; rows: query, columns: key",
            m.step, m.epoch
        ),
        1,
        GREY,
    );
    for q in 0..t {
        for k in 0..t {
            let level = f64::from(matrix[q * t + k] / max);
            c.fill(
                ox + k as i64 * cell,
                oy + q as i64 * cell,
                cell,
                cell,
                heat_rgb(level),
            );
        }
    }
    // Labels: CLS (if any) and the first patch of every other grid row.
    let cls = m.cls.then_some(0);
    for token in cls
        .into_iter()
        .chain((0..grid).step_by(2).map(|r| first + r * grid))
    {
        let at = token as i64 * cell;
        let label = token_label(m, token);
        c.text(
            ox - 8 - crate::export::canvas::text_width(&label, 1),
            oy + at,
            &label,
            1,
            BLACK,
        );
        c.text(ox + at, oy - 12, &label, 1, BLACK);
    }
    colour_bar(
        &mut c,
        (ox + side + 20, oy, 24, side),
        heat_rgb,
        ("0", &format!("{max:.3}")),
    );
    let mut pictures = vec![png(
        format!("attention-L{}-H{}.png", choice.layer, choice.head),
        format!(
            "Attention weights of layer {} head {} for probe image {image} at step {}: row i is where query token i ({}the {} patches row by row) puts its weight; colour relative to the largest weight, {max:.3}",
            choice.layer, choice.head, m.step, if m.cls { "CLS first, then " } else { "" }, t - first
        ),
        &c,
    )?];

    // Every layer and head, each matrix at 2 pixels a cell.
    let thumb = 2 * t as i64;
    let (gx, gy) = (50, 50);
    let mut g = Canvas::new(
        (gx + m.heads as i64 * (thumb + 10) + 10) as usize,
        (gy + m.depth as i64 * (thumb + 10) + 10) as usize,
        WHITE,
    );
    g.text(
        gx,
        10,
        &format!("all layers (rows) x heads (columns), step {}", m.step),
        2,
        BLACK,
    );
    for l in 0..m.depth {
        g.text(
            8,
            gy + l as i64 * (thumb + 10) + thumb / 2 - 4,
            &format!("L{l}"),
            1,
            BLACK,
        );
        for h in 0..m.heads {
            let w = probe.attention_matrix(image, l, h);
            let top = w
                .iter()
                .copied()
                .fold(0.0f32, f32::max)
                .max(f32::MIN_POSITIVE);
            let (x0, y0) = (gx + h as i64 * (thumb + 10), gy + l as i64 * (thumb + 10));
            if l == 0 {
                g.text(x0 + thumb / 2 - 8, gy - 14, &format!("H{h}"), 1, BLACK);
            }
            for q in 0..t {
                for k in 0..t {
                    let level = f64::from(w[q * t + k] / top);
                    g.fill(x0 + 2 * k as i64, y0 + 2 * q as i64, 2, 2, heat_rgb(level));
                }
            }
        }
    }
    pictures.push(png(
        "attention-grid.png".into(),
        format!("Every layer's and head's attention for probe image {image} at step {}, each relative to its own largest weight", m.step),
        &g,
    )?);

    // The image with what the head reads laid over it: CLS's weights on the patches, or
    // (mean pooling) the mean of every query's weights.
    let (reader, row): (&str, Vec<f32>) = match m.cls {
        true => ("CLS's weights", matrix[1..t].to_vec()),
        false => (
            "the mean query's weights",
            (0..t)
                .map(|k| (0..t).map(|q| matrix[q * t + k]).sum::<f32>() / t as f32)
                .collect(),
        ),
    };
    if let Some(pixels) = source.test_image(image) {
        let scale = 8;
        let size = IMAGE_SIZE as i64 * scale;
        let patch_px = size / grid as i64;
        let mut o = Canvas::new((3 * size + 80) as usize, (size + 60) as usize, WHITE);
        o.text(
            20,
            10,
            &format!(
                "{reader} on the patches, layer {} head {}",
                choice.layer, choice.head
            ),
            2,
            BLACK,
        );
        draw_image(&mut o, pixels, (20, 40), scale);
        let top = row
            .iter()
            .copied()
            .fold(0.0f32, f32::max)
            .max(f32::MIN_POSITIVE);
        for y in 0..size {
            for x in 0..size {
                let p = (y / patch_px) as usize * grid + (x / patch_px) as usize;
                let heat = heat_rgb(f64::from(row[p.min(row.len() - 1)] / top));
                let base = image_pixel(pixels, (x / scale) as usize, (y / scale) as usize);
                let mix = |a: u8, b: u8| ((f64::from(a) * 0.45) + (f64::from(b) * 0.55)) as u8;
                o.set(
                    40 + size + x,
                    40 + y,
                    (
                        mix(base.0, heat.0),
                        mix(base.1, heat.1),
                        mix(base.2, heat.2),
                    ),
                );
                o.set(60 + 2 * size + x, 40 + y, heat);
            }
        }
        pictures.push(png(
            "attention-overlay.png".into(),
            format!("Probe image {image}, {reader} over its patches in layer {} head {} laid over it, and alone (relative to the largest patch weight)", choice.layer, choice.head),
            &o,
        )?);
    }
    Ok(pictures)
}

pub fn features(source: &Source, choice: &Choice) -> Result<Vec<Picture>, ExportError> {
    let probe = source.probe(choice.step)?;
    let m = &probe.meta;
    let image = check_image(&probe, choice)?;
    let layer = choice.layer.min(m.depth);
    let (t, d, grid, first) = (m.tokens, m.dim, m.grid(), m.first_patch());
    let hidden = probe.hidden_state(image, layer);
    // Token x channel, signed, full colour at the 99th percentile of |x|.
    let mut magnitudes: Vec<f32> = hidden.iter().map(|v| v.abs()).collect();
    magnitudes.sort_by(f32::total_cmp);
    let scale =
        f64::from(magnitudes[(magnitudes.len() * 99 / 100).min(magnitudes.len() - 1)]).max(1e-12);
    let cell = 4i64;
    let mut c = Canvas::new(
        (60 + d as i64 * cell + 120) as usize,
        (60 + t as i64 * cell + 20) as usize,
        WHITE,
    );
    let where_ = if layer == 0 {
        "the embeddings".to_string()
    } else {
        format!("block {}", layer - 1)
    };
    c.text(
        60,
        10,
        &format!("hidden state after {where_}: tokens x channels"),
        2,
        BLACK,
    );
    c.text(
        60,
        32,
        &format!(
            "step {}, image {image}; red > 0 > blue, full at |x| = {scale:.2}",
            m.step
        ),
        1,
        GREY,
    );
    for tok in 0..t {
        for ch in 0..d {
            let v = f64::from(hidden[tok * d + ch]) / scale;
            c.fill(
                60 + ch as i64 * cell,
                50 + tok as i64 * cell,
                cell,
                cell,
                signed(v),
            );
        }
    }
    if m.cls {
        c.text(20, 50, "CLS", 1, BLACK);
    }
    colour_bar(
        &mut c,
        (60 + d as i64 * cell + 20, 50, 20, t as i64 * cell),
        |l| signed(l * 2.0 - 1.0),
        (&format!("{:.1}", -scale), &format!("{scale:.1}")),
    );
    let mut pictures = vec![png(
        format!("features-L{layer}.png"),
        format!("Probe image {image}'s residual stream after {where_} at step {}: one row per token{}, one column per channel", m.step, if m.cls { " (CLS first)" } else { "" }),
        &c,
    )?];

    // Patch-token norms after each block, and the patches' first 3 principal components as RGB.
    let map = 8 * grid as i64;
    let mut n = Canvas::new(
        (20 + (m.depth as i64 + 2) * (map + 16) + 20) as usize,
        (map + 70) as usize,
        WHITE,
    );
    n.text(
        20,
        8,
        &format!("patch-token norms after each block (own scale), and PCA of layer {layer} as RGB"),
        1,
        BLACK,
    );
    for l in 0..=m.depth {
        let norms = row_norms(&probe.hidden_state(image, l)[first * d..], d);
        let (lo, hi) = norms
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |a, &v| {
                (a.0.min(v), a.1.max(v))
            });
        let x0 = 20 + l as i64 * (map + 16);
        for (p, v) in norms.iter().enumerate() {
            let level = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
            n.fill(
                x0 + (p % grid) as i64 * 8,
                30 + (p / grid) as i64 * 8,
                8,
                8,
                heat_rgb(level),
            );
        }
        n.text(
            x0,
            36 + map,
            &if l == 0 {
                "emb".to_string()
            } else {
                format!("B{}", l - 1)
            },
            1,
            BLACK,
        );
    }
    let rows = &hidden[first * d..];
    let colours = scores_to_rgb(&pca(rows, t - first, d, 3));
    let x0 = 20 + (m.depth as i64 + 1) * (map + 16) + 10;
    for (p, &rgb) in colours.iter().enumerate() {
        n.fill(
            x0 + (p % grid) as i64 * 8,
            30 + (p / grid) as i64 * 8,
            8,
            8,
            rgb,
        );
    }
    n.text(x0, 36 + map, &format!("PCA L{layer}"), 1, BLACK);
    pictures.push(png(
        "features-norms-pca.png".into(),
        format!("Norms of the patch tokens of probe image {image} after the embeddings and each block (each map on its own scale), and layer {layer}'s patch tokens projected on their first three principal components as RGB (same colour, similar representation)"),
        &n,
    )?);
    Ok(pictures)
}

pub fn patches(source: &Source, choice: &Choice) -> Result<Vec<Picture>, ExportError> {
    let probe = source.probe(choice.step)?;
    let m = &probe.meta;
    let image = check_image(&probe, choice)?;
    let grid = m.grid();
    let mut pictures = Vec::new();
    if let Some(pixels) = source.test_image(image) {
        let scale = 12;
        let size = IMAGE_SIZE as i64 * scale;
        let step = size / grid as i64;
        let mut c = Canvas::new((size + 40) as usize, (size + 70) as usize, WHITE);
        c.text(
            20,
            10,
            &format!(
                "{grid} x {grid} patches of {} x {} pixels, in sequence order",
                IMAGE_SIZE / grid,
                IMAGE_SIZE / grid
            ),
            1,
            BLACK,
        );
        draw_image(&mut c, pixels, (20, 30), scale);
        for i in 0..=grid as i64 {
            c.fill(20 + i * step, 30, 2, size, WHITE);
            c.fill(20, 30 + i * step, size, 2, WHITE);
        }
        for p in 0..grid * grid {
            let (x, y) = (
                20 + (p % grid) as i64 * step + 4,
                30 + (p / grid) as i64 * step + 4,
            );
            let label = p.to_string();
            c.fill(
                x - 1,
                y - 1,
                crate::export::canvas::text_width(&label, 1) + 2,
                10,
                BLACK,
            );
            c.text(x, y, &label, 1, WHITE);
        }
        c.text(
            20,
            size + 40,
            match m.cls {
                true => "patch n is token n + 1; CLS is token 0",
                false => "patch n is token n (no CLS: the head reads their mean)",
            },
            1,
            GREY,
        );
        pictures.push(png(
            "patches-grid.png".into(),
            format!("Probe image {image} cut into {} patches, numbered in the order they enter the transformer (token = number{})", grid * grid, if m.cls { " + 1" } else { "" }),
            &c,
        )?);
    }
    let pos = &probe.position_embedding;
    if !pos.is_empty() {
        let cell = 4i64;
        let mini = grid as i64 * cell;
        let mut c = Canvas::new(
            (30 + grid as i64 * (mini + 6) + 100) as usize,
            (50 + grid as i64 * (mini + 6)) as usize,
            WHITE,
        );
        c.text(
            20,
            10,
            "cosine similarity of each patch's position embedding to all others",
            1,
            BLACK,
        );
        for (p, sims) in position_similarity(&probe).iter().enumerate() {
            let (x0, y0) = (
                20 + (p % grid) as i64 * (mini + 6),
                30 + (p / grid) as i64 * (mini + 6),
            );
            for (q, s) in sims.iter().enumerate() {
                c.fill(
                    x0 + (q % grid) as i64 * cell,
                    y0 + (q / grid) as i64 * cell,
                    cell,
                    cell,
                    signed(*s),
                );
            }
        }
        colour_bar(
            &mut c,
            (
                30 + grid as i64 * (mini + 6),
                30,
                16,
                grid as i64 * (mini + 6) - 6,
            ),
            |l| signed(l * 2.0 - 1.0),
            ("-1", "1"),
        );
        pictures.push(png(
            "patches-position-similarity.png".into(),
            format!("Learned position embeddings at step {}: tile (r, c) shows how similar patch (r, c)'s embedding is to every other patch's (red similar, blue opposite)", m.step),
            &c,
        )?);
    }
    if pictures.is_empty() {
        return Err(ExportError::Missing(
            "the run recorded neither test images nor position embeddings".into(),
        ));
    }
    Ok(pictures)
}
