//! Small linear algebra on probe data for the Features and Patches tabs: principal
//! components, cosine-similarity maps, token norms. The matrices are tiny (at most a
//! few hundred rows of ~100 values), so plain loops in f64 are fast and exact enough;
//! a linear-algebra crate would cost far more build time than these few functions.

/// Eigenvalues (falling) and unit eigenvectors (`vectors[i]` goes with `values[i]`)
/// of the symmetric `n x n` matrix `a` (row-major), by cyclic Jacobi rotations.
pub fn symmetric_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<Vec<f64>>) {
    let mut a = a.to_vec();
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let scale: f64 = a.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum();
        if off <= 1e-24 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[j * n + j].total_cmp(&a[i * n + i]));
    let values = order.iter().map(|&i| a[i * n + i]).collect();
    let vectors = order
        .iter()
        .map(|&i| (0..n).map(|k| v[k * n + i]).collect())
        .collect();
    (values, vectors)
}

/// Principal components of a set of row vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct Pca {
    /// Unit directions in the input space, by falling variance.
    pub components: Vec<Vec<f64>>,
    /// Each row's coordinates along the components (`scores[row][k]`).
    pub scores: Vec<Vec<f64>>,
    /// Share of the total variance along each component.
    pub explained: Vec<f64>,
}

/// The first `k` principal components of `rows` x `cols` data (row-major), centred per
/// column. Works on the smaller of the covariance and the Gram matrix. Each
/// component's sign is fixed so its largest entry is positive, so pictures do not flip
/// between probes for no reason.
pub fn pca(data: &[f32], rows: usize, cols: usize, k: usize) -> Pca {
    let mut x: Vec<f64> = data[..rows * cols].iter().map(|&v| f64::from(v)).collect();
    for c in 0..cols {
        let mean = (0..rows).map(|r| x[r * cols + c]).sum::<f64>() / rows.max(1) as f64;
        for r in 0..rows {
            x[r * cols + c] -= mean;
        }
    }
    let total: f64 = x.iter().map(|v| v * v).sum();
    let k = k.min(rows).min(cols);
    let mut components: Vec<Vec<f64>> = Vec::with_capacity(k);
    let mut variances = Vec::with_capacity(k);
    if cols <= rows {
        let mut cov = vec![0.0; cols * cols];
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            for i in 0..cols {
                for j in 0..cols {
                    cov[i * cols + j] += row[i] * row[j];
                }
            }
        }
        let (values, vectors) = symmetric_eigen(&cov, cols);
        for (value, vector) in values.into_iter().zip(vectors).take(k) {
            variances.push(value.max(0.0));
            components.push(vector);
        }
    } else {
        // Gram matrix: u (rows) eigenvector -> component = Xᵀu / |Xᵀu|.
        let mut gram = vec![0.0; rows * rows];
        for i in 0..rows {
            for j in 0..rows {
                gram[i * rows + j] = (0..cols).map(|c| x[i * cols + c] * x[j * cols + c]).sum();
            }
        }
        let (values, vectors) = symmetric_eigen(&gram, rows);
        for (value, u) in values.into_iter().zip(vectors).take(k) {
            let mut v: Vec<f64> = (0..cols)
                .map(|c| (0..rows).map(|r| x[r * cols + c] * u[r]).sum())
                .collect();
            let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm > 0.0 {
                v.iter_mut().for_each(|a| *a /= norm);
            }
            variances.push(value.max(0.0));
            components.push(v);
        }
    }
    for v in &mut components {
        let largest = v
            .iter()
            .copied()
            .fold(0.0, |m: f64, a| if a.abs() > m.abs() { a } else { m });
        if largest < 0.0 {
            v.iter_mut().for_each(|a| *a = -*a);
        }
    }
    let scores = (0..rows)
        .map(|r| {
            let row = &x[r * cols..(r + 1) * cols];
            components
                .iter()
                .map(|v| row.iter().zip(v).map(|(a, b)| a * b).sum())
                .collect()
        })
        .collect();
    let explained = variances
        .iter()
        .map(|v| if total > 0.0 { v / total } else { 0.0 })
        .collect();
    Pca {
        components,
        scores,
        explained,
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

/// Cosine similarity of row `query` to each of `targets` (row indices) of a
/// `dim`-column matrix.
pub fn cosine_map(
    rows: &[f32],
    dim: usize,
    query: usize,
    targets: std::ops::Range<usize>,
) -> Vec<f64> {
    let row = |i: usize| &rows[i * dim..(i + 1) * dim];
    targets.map(|t| cosine(row(query), row(t))).collect()
}

/// What the head reads from a (tokens x dim) hidden state, before the final norm:
/// CLS's row when the model has one (`first_patch` = 1), else the mean of the patch
/// rows (mean pooling).
pub fn read_token(rows: &[f32], dim: usize, first_patch: usize) -> Vec<f32> {
    if first_patch > 0 {
        return rows[..dim].to_vec();
    }
    let n = (rows.len() / dim).max(1) as f32;
    let mut mean = vec![0f32; dim];
    for row in rows.chunks_exact(dim) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v / n;
        }
    }
    mean
}

/// Cosine similarity of `reference` to each row of a `dim`-column matrix.
pub fn cosines_to(reference: &[f32], rows: &[f32], dim: usize) -> Vec<f64> {
    rows.chunks_exact(dim)
        .map(|r| cosine(reference, r))
        .collect()
}

/// Euclidean norm of each row of a `dim`-column matrix.
pub fn row_norms(rows: &[f32], dim: usize) -> Vec<f64> {
    rows.chunks_exact(dim)
        .map(|r| r.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt())
        .collect()
}

/// Values scaled to [0, 1] by their own minimum and maximum (all 0.5 when constant).
pub fn min_max_scaled(values: &[f64]) -> Vec<f64> {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    values
        .iter()
        .map(|&v| if hi > lo { (v - lo) / (hi - lo) } else { 0.5 })
        .collect()
}

/// The first three PCA scores of each row as an RGB colour: each component scaled by
/// its own range over the rows, like the usual feature-PCA pictures.
pub fn scores_to_rgb(p: &Pca) -> Vec<(u8, u8, u8)> {
    let channel = |k: usize| -> Vec<f64> {
        if k < p.components.len() {
            min_max_scaled(&p.scores.iter().map(|s| s[k]).collect::<Vec<_>>())
        } else {
            vec![0.0; p.scores.len()]
        }
    };
    let (r, g, b) = (channel(0), channel(1), channel(2));
    let byte = |v: f64| (v * 255.0).round().clamp(0.0, 255.0) as u8;
    (0..p.scores.len())
        .map(|i| (byte(r[i]), byte(g[i]), byte(b[i])))
        .collect()
}

/// The cosine similarity of each patch position's embedding to every other one's
/// (CLS excluded): `maps[i][j]` for patches i, j.
pub fn position_similarity(probe: &crate::inspect::probe::ProbeSnapshot) -> Vec<Vec<f64>> {
    let m = &probe.meta;
    let pos = &probe.position_embedding;
    let patches = m.first_patch()..m.tokens;
    patches
        .clone()
        .map(|i| cosine_map(pos, m.dim, i, patches.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_finds_the_eigenpairs_of_a_known_matrix() {
        // [[2,1],[1,2]]: 3 along (1,1)/√2, 1 along (1,-1)/√2.
        let (values, vectors) = symmetric_eigen(&[2.0, 1.0, 1.0, 2.0], 2);
        assert!((values[0] - 3.0).abs() < 1e-12 && (values[1] - 1.0).abs() < 1e-12);
        let s = std::f64::consts::FRAC_1_SQRT_2;
        assert!((vectors[0][0].abs() - s).abs() < 1e-12);
        assert!((vectors[0][0] - vectors[0][1]).abs() < 1e-12);
        assert!((vectors[1][0] + vectors[1][1]).abs() < 1e-12);
    }

    /// Data built from known orthogonal directions with known spreads: PCA must return
    /// those directions in order of spread, the scores that built the data, and the
    /// variance shares.
    fn known_data(rows: usize) -> (Vec<f32>, [Vec<f64>; 2], Vec<[f64; 2]>) {
        let s = std::f64::consts::FRAC_1_SQRT_2;
        let u = vec![s, s, 0.0, 0.0];
        let v = vec![0.0, 0.0, 0.6, 0.8];
        let mut data = Vec::new();
        let mut coords = Vec::new();
        for r in 0..rows {
            // Zero-mean coordinates: big spread along u, smaller along v, uncorrelated.
            let a = if r % 2 == 0 { 3.0 } else { -3.0 } * if r % 4 < 2 { 1.0 } else { 2.0 };
            let b = if (r / 2) % 2 == 0 { 1.0 } else { -1.0 };
            coords.push([a, b]);
            for c in 0..4 {
                data.push((a * u[c] + b * v[c] + 5.0) as f32); // + a constant offset
            }
        }
        (data, [u, v], coords)
    }

    #[test]
    fn pca_recovers_known_components_both_ways() {
        // 8 rows x 4 columns uses the covariance; 3 rows x 4 columns the Gram matrix.
        let (data, [u, v], coords) = known_data(8);
        let p = pca(&data, 8, 4, 3);
        for (got, want) in p.components[0].iter().zip(&u) {
            assert!((got - want).abs() < 1e-6, "{:?}", p.components[0]);
        }
        for (got, want) in p.components[1].iter().zip(&v) {
            assert!((got - want).abs() < 1e-6, "{:?}", p.components[1]);
        }
        for (score, c) in p.scores.iter().zip(&coords) {
            assert!((score[0] - c[0]).abs() < 1e-5 && (score[1] - c[1]).abs() < 1e-5);
            assert!(score[2].abs() < 1e-5);
        }
        let (var_a, var_b) = (22.5 * 8.0, 8.0); // sums of squares along u and v
        assert!((p.explained[0] - var_a / (var_a + var_b)).abs() < 1e-6);
        assert!((p.explained[1] - var_b / (var_a + var_b)).abs() < 1e-6);

        let rows: Vec<f32> = [
            [1.0, 0.0, 0.0, 0.0],
            [-1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.5, 0.0],
        ]
        .iter()
        .flatten()
        .copied()
        .collect();
        let g = pca(&rows, 3, 4, 2);
        assert!((g.components[0][0].abs() - 1.0).abs() < 1e-9);
        assert!((g.components[1][2] - 1.0).abs() < 1e-9);
        assert!((g.scores[0][0] - 1.0).abs() < 1e-9 || (g.scores[0][0] + 1.0).abs() < 1e-9);
    }

    #[test]
    fn cosine_maps_norms_and_colours_by_hand() {
        let rows = [1.0f32, 0.0, 0.0, 2.0, 3.0, 3.0, -1.0, 0.0];
        assert_eq!(
            cosine_map(&rows, 2, 0, 0..4),
            vec![1.0, 0.0, std::f64::consts::FRAC_1_SQRT_2, -1.0]
        );
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 2.0]), 0.0);
        assert_eq!(row_norms(&[3.0, 4.0, 0.0, 1.0], 2), vec![5.0, 1.0]);
        assert_eq!(min_max_scaled(&[2.0, 4.0, 3.0]), vec![0.0, 1.0, 0.5]);
        assert_eq!(min_max_scaled(&[7.0, 7.0]), vec![0.5, 0.5]);
        let p = Pca {
            components: vec![vec![1.0], vec![1.0], vec![1.0]],
            scores: vec![vec![-1.0, 0.0, 5.0], vec![1.0, 2.0, 5.0]],
            explained: vec![],
        };
        assert_eq!(scores_to_rgb(&p), vec![(0, 0, 128), (255, 255, 128)]);
    }
}
