//! The fused ops against their composed references (forward and gradients, in f64)
//! and against finite differences, and the plumbing's own cases. Shared with the
//! model's tests (`weighted_grads`, `numeric_gradient`).

use super::attention::*;
use super::composed::{self, layer_norm_composed, softmax_last_dim};
use super::gelu::*;
use super::kernel::*;
use super::layer_norm::*;
use super::linear::*;
use super::softmax::*;
use candle_core::{DType, Device, Tensor, Var, D};

fn random(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub(crate) fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

#[test]
fn fused_softmax_matches_the_composed_one_forward_and_backward() {
    let x = Var::from_tensor(&random(&[2, 3, 5, 7], 1)).unwrap();
    let weights = random(&[2, 3, 5, 7], 2);
    let scale = 0.37;
    let fused = scaled_softmax(x.as_tensor(), scale).unwrap();
    let composed = softmax_last_dim(&x.as_tensor().affine(scale, 0.0).unwrap()).unwrap();
    assert_close(&values(&fused), &values(&composed), 1e-12, "forward");
    let g_fused = weighted_grads(fused, &weights);
    let g_comp = weighted_grads(composed, &weights);
    let (a, b) = (
        g_fused.get(x.as_tensor()).unwrap(),
        g_comp.get(x.as_tensor()).unwrap(),
    );
    assert_close(&values(a), &values(b), 1e-12, "gradient");
    // f32 works too.
    let y = scaled_softmax(&x.as_tensor().to_dtype(DType::F32).unwrap(), 1.0).unwrap();
    let sums: Vec<f32> = y
        .sum(D::Minus1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6));
}

#[test]
fn fused_layer_norm_matches_the_composed_one_forward_and_backward() {
    let x = Var::from_tensor(&random(&[3, 4, 6], 3)).unwrap();
    let gamma = Var::from_tensor(&random(&[6], 4)).unwrap();
    let beta = Var::from_tensor(&random(&[6], 5)).unwrap();
    let weights = random(&[3, 4, 6], 6);
    let eps = 1e-5;
    let fused = layer_norm(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), eps).unwrap();
    let composed =
        layer_norm_composed(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), eps).unwrap();
    assert_close(&values(&fused), &values(&composed), 1e-12, "forward");
    let g_fused = weighted_grads(fused, &weights);
    let g_comp = weighted_grads(composed, &weights);
    for (name, v) in [("x", &x), ("gamma", &gamma), ("beta", &beta)] {
        let (a, b) = (
            g_fused.get(v.as_tensor()).unwrap(),
            g_comp.get(v.as_tensor()).unwrap(),
        );
        assert_close(&values(a), &values(b), 1e-10, name);
    }
}

/// The moments LayerNorm's forward pass writes are the ones its backward pass would
/// compute again: the gradients from them are the same bits, f32 and f64, on this CPU's
/// kernels (`.ci/run` runs it again at every lower level).
#[test]
fn layer_norm_gradients_from_the_forward_moments_are_the_same_bits() {
    fn check<T: Real>(x: &[T], gamma: &[T], beta: &[T], g: &[T]) {
        let (dim, rows) = (gamma.len(), x.len() / gamma.len());
        let mut out = vec![T::zero(); x.len()];
        let mut moments = vec![T::nan(); 2 * rows];
        layer_norm_into(x, gamma, beta, 1e-5, &mut out, Some(&mut moments));
        assert!(
            moments.iter().all(|m| m.is_finite()),
            "a mean and a scale per row"
        );
        let mut plain = vec![T::zero(); x.len()];
        layer_norm_into(x, gamma, beta, 1e-5, &mut plain, None);
        assert!(out == plain, "the same output with the moments written");
        let grads = |moments: Option<&[T]>| {
            let (mut dx, mut params) = (vec![T::zero(); x.len()], vec![T::zero(); 2 * dim]);
            layer_norm_grads_into(x, gamma, g, 1e-5, (&mut dx, &mut params), moments);
            dx.into_iter().chain(params).collect::<Vec<T>>()
        };
        let (kept, again) = (grads(Some(&moments)), grads(None));
        assert!(kept.iter().any(|v| *v != T::zero()), "gradients computed");
        assert!(
            kept == again,
            "dim {dim}: the same bits from the kept moments"
        );
    }
    // Rows past one block of BLOCK_ROWS, so the moments are split as the rows are.
    for (rows, dim) in [(300, 96), (7, 5)] {
        let x = values(&random(&[rows, dim], 61));
        let gamma = values(&random(&[dim], 62));
        let beta = values(&random(&[dim], 63));
        let g = values(&random(&[rows, dim], 64));
        check(&x, &gamma, &beta, &g);
        let f32s = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<_>>();
        check(&f32s(&x), &f32s(&gamma), &f32s(&beta), &f32s(&g));
    }
}

#[test]
fn fused_layer_norm_gradient_matches_finite_differences() {
    let x0 = values(&random(&[2, 5], 7));
    let gamma = random(&[5], 8);
    let beta = random(&[5], 9);
    let weights = random(&[2, 5], 10);
    let loss = |x: &[f64]| -> f64 {
        let x = Tensor::from_vec(x.to_vec(), (2, 5), &Device::Cpu).unwrap();
        let y = layer_norm(&x, &gamma, &beta, 1e-5).unwrap();
        (y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let x = Var::from_tensor(&Tensor::from_vec(x0.clone(), (2, 5), &Device::Cpu).unwrap()).unwrap();
    let y = layer_norm(x.as_tensor(), &gamma, &beta, 1e-5).unwrap();
    let grads = weighted_grads(y, &weights);
    let analytic = values(grads.get(x.as_tensor()).unwrap());
    for i in 0..x0.len() {
        let h = 1e-6;
        let (mut up, mut down) = (x0.clone(), x0.clone());
        up[i] += h;
        down[i] -= h;
        let numeric = (loss(&up) - loss(&down)) / (2.0 * h);
        assert!(
            (numeric - analytic[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
            "{i}: {numeric} vs {}",
            analytic[i]
        );
    }
}

/// The gradients of sum(weights * y).
pub(crate) fn weighted_grads(y: Tensor, weights: &Tensor) -> candle_core::backprop::GradStore {
    (y * weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
}

/// d/dx of sum(weights * f(x)) by central differences, per element.
pub(crate) fn numeric_gradient(
    x0: &[f64],
    shape: &[usize],
    f: impl Fn(&Tensor) -> Tensor,
    weights: &Tensor,
) -> Vec<f64> {
    let loss = |x: &[f64]| -> f64 {
        let x = Tensor::from_vec(x.to_vec(), shape, &Device::Cpu).unwrap();
        (f(&x) * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    (0..x0.len())
        .map(|i| {
            let h = 1e-6;
            let (mut up, mut down) = (x0.to_vec(), x0.to_vec());
            up[i] += h;
            down[i] -= h;
            (loss(&up) - loss(&down)) / (2.0 * h)
        })
        .collect()
}

#[test]
fn fused_gelu_matches_candle_and_finite_differences() {
    // Long enough to use the parallel chunks and the tail.
    let shape = [3, 4100];
    let x = Var::from_tensor(&random(&shape, 11)).unwrap();
    let weights = random(&shape, 12);
    let fused = gelu(x.as_tensor()).unwrap();
    let reference = x.as_tensor().gelu_erf().unwrap();
    assert_close(&values(&fused), &values(&reference), 1e-12, "forward");
    let g_fused = weighted_grads(fused, &weights);
    let g_ref = weighted_grads(reference, &weights);
    let analytic = values(g_fused.get(x.as_tensor()).unwrap());
    // candle's own GELU gradient is computed differently: equal to ~1e-8.
    assert_close(
        &analytic,
        &values(g_ref.get(x.as_tensor()).unwrap()),
        1e-6,
        "gradient",
    );
    let small = random(&[2, 5], 13);
    let w = random(&[2, 5], 14);
    let v = Var::from_tensor(&small).unwrap();
    let grads = weighted_grads(gelu(v.as_tensor()).unwrap(), &w);
    let numeric = numeric_gradient(&values(&small), &[2, 5], |t| gelu(t).unwrap(), &w);
    assert_close(
        &values(grads.get(v.as_tensor()).unwrap()),
        &numeric,
        1e-6,
        "finite differences",
    );
    // f32 uses the same erf as candle.
    let x32 = x.as_tensor().to_dtype(DType::F32).unwrap();
    let a: Vec<f32> = gelu(&x32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = x32
        .gelu_erf()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(a
        .iter()
        .zip(&b)
        .all(|(a, b)| (a - b).abs() <= 1e-6 * (1.0 + b.abs())));
}

#[test]
fn column_sums_over_many_blocks_by_hand() {
    // 1000 rows of (r, r + 1, r + 2): more rows than one block, a partial last block.
    let rows: Vec<f64> = (0..1000)
        .flat_map(|r| [f64::from(r), f64::from(r) + 1.0, f64::from(r) + 2.0])
        .collect();
    // Added into what is there.
    let mut sums = vec![1.0, 2.0, 3.0];
    add_row_sums(1000, &mut sums, |range, partial| {
        add_rows_chunk(&rows[range.start * 3..range.end * 3], partial);
    });
    let expected: f64 = (0..1000).map(f64::from).sum();
    assert_eq!(
        sums,
        vec![expected + 1.0, expected + 1002.0, expected + 2003.0]
    );
}

#[test]
fn fused_softmax_gradient_matches_finite_differences() {
    let x0 = random(&[2, 6], 18);
    let w = random(&[2, 6], 19);
    let v = Var::from_tensor(&x0).unwrap();
    let grads = weighted_grads(scaled_softmax(v.as_tensor(), 0.7).unwrap(), &w);
    let numeric = numeric_gradient(
        &values(&x0),
        &[2, 6],
        |t| scaled_softmax(t, 0.7).unwrap(),
        &w,
    );
    assert_close(
        &values(grads.get(v.as_tensor()).unwrap()),
        &numeric,
        1e-6,
        "finite differences",
    );
}

/// Attention op by op, with candle's composed softmax: the reference.
fn attention_composed(qkv: &Tensor, heads: usize, scale: f64) -> Tensor {
    let (b, t, c3) = qkv.dims3().unwrap();
    let hd = c3 / 3 / heads;
    let qkv = qkv
        .reshape((b, t, 3, heads, hd))
        .unwrap()
        .permute((2, 0, 3, 1, 4))
        .unwrap();
    let part = |i: usize| qkv.get(i).unwrap().contiguous().unwrap();
    let (q, k, v) = (part(0), part(1), part(2));
    let scores = q
        .matmul(&k.t().unwrap())
        .unwrap()
        .affine(scale, 0.0)
        .unwrap();
    softmax_last_dim(&scores)
        .unwrap()
        .matmul(&v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, t, c3 / 3))
        .unwrap()
}

#[test]
fn fused_attention_matches_the_composed_one_forward_and_backward() {
    // 3 images, 7 tokens, 2 heads of 5: enough to exercise every stride.
    let qkv = Var::from_tensor(&random(&[3, 7, 30], 21)).unwrap();
    let weights = random(&[3, 7, 10], 22);
    let scale = 1.0 / 5f64.sqrt();
    let fused = attention(qkv.as_tensor(), 2, scale, false).unwrap();
    let composed = attention_composed(qkv.as_tensor(), 2, scale);
    assert_close(&values(&fused), &values(&composed), 1e-12, "forward");
    let g_fused = weighted_grads(fused, &weights);
    let g_comp = weighted_grads(composed, &weights);
    assert_close(
        &values(g_fused.get(qkv.as_tensor()).unwrap()),
        &values(g_comp.get(qkv.as_tensor()).unwrap()),
        1e-10,
        "gradient",
    );
    // Finite differences on a small case.
    let small = random(&[1, 3, 12], 23);
    let w = random(&[1, 3, 4], 24);
    let v = Var::from_tensor(&small).unwrap();
    let grads = weighted_grads(attention(v.as_tensor(), 2, 0.7, false).unwrap(), &w);
    let numeric = numeric_gradient(
        &values(&small),
        &[1, 3, 12],
        |t| attention(t, 2, 0.7, false).unwrap(),
        &w,
    );
    assert_close(
        &values(grads.get(v.as_tensor()).unwrap()),
        &numeric,
        1e-6,
        "finite differences",
    );
    // f32 agrees with f64 to f32 precision.
    let f32_out = attention(
        &qkv.as_tensor().to_dtype(DType::F32).unwrap(),
        2,
        scale,
        false,
    )
    .unwrap();
    assert_close(
        &values(&f32_out),
        &values(&attention_composed(qkv.as_tensor(), 2, scale)),
        1e-5,
        "f32",
    );
    assert!(
        attention(&random(&[2, 3, 10], 1), 2, 1.0, false).is_err(),
        "10 values do not split into 3 x 2 heads"
    );
    assert!(
        attention(&random(&[2, 0, 12], 1), 2, 1.0, false).is_err(),
        "no tokens"
    );
}

/// Where the forward pass packs the attention's factors (bf16 on a bf16 instruction),
/// its backward pass reads them and the weights only: without the projections it
/// gives the same bits as with them (the fused block then keeps no copy of q|k|v), and
/// as packing every factor from the projections in the backward pass, for every query
/// and for CLS alone (the last block's queries).
#[test]
fn the_attention_backward_from_its_kept_factors_reads_no_projections() {
    if !crate::ops::Bf16Kernel::current().is_native() {
        eprintln!(
            "no bf16 instruction here: the attention keeps no packed factors, and its \
             backward pass always reads the projections; not tested here"
        );
        return;
    }
    let f32s = |t: Tensor| -> Vec<f32> { values(&t).iter().map(|&v| v as f32).collect() };
    for (tokens, queries) in [(64, 64), (65, 1)] {
        let s = AttentionShape {
            batch: 2,
            tokens,
            queries,
            heads: 3,
            head_dim: 32,
            bf16: true,
            mask_diagonal: false,
        };
        let qkv = f32s(random(&[2, tokens, 3 * s.dim()], 41));
        let grad = f32s(random(&[s.out_len()], 42));
        let scales = vec![1.0 / 32f32.sqrt(); s.heads];
        let (mut out, mut weights) = (vec![0f32; s.out_len()], vec![0f32; s.weights_len()]);
        let mut kept = Vec::new();
        attention_forward_into(&qkv, s, &scales, (&mut out, &mut weights), Some(&mut kept));
        assert_eq!(kept.len(), s.batch * s.heads, "factors per image and head");
        let backward = |qkv: Option<&[f32]>, kept: Option<&[KeptFactors]>| {
            let mut dqkv = vec![f32::NAN; s.batch * tokens * 3 * s.dim()];
            let kept = (Some(&weights[..]), kept);
            attention_backward_into(qkv, &grad, s, &scales, kept, &mut dqkv, None);
            dqkv.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let with = backward(Some(&qkv), Some(&kept));
        assert!(
            with.iter().all(|&b| f32::from_bits(b).is_finite()),
            "every value written"
        );
        let without = backward(None, Some(&kept));
        assert_eq!(with, without, "{tokens} tokens, {queries} queries");
        let packed_then = backward(Some(&qkv), None);
        assert_eq!(
            with, packed_then,
            "{tokens} tokens, {queries} queries, packed in backward"
        );
    }
}

/// A layer whose input the forward pass packed (bf16 blocks) gets its gradients from
/// the packed copy alone: the same bits with the input's values, without them (what
/// the block passes when it kept only the packed copy), and with the input packed in
/// the backward pass, on whichever product kind this CPU runs.
#[test]
fn the_linear_gradients_from_a_packed_input_read_no_input_values() {
    use super::products::{pack_activation, pack_weight};
    let f32s = |t: Tensor| -> Vec<f32> { values(&t).iter().map(|&v| v as f32).collect() };
    let (rows, in_dim, out_dim) = (70, 96, 40);
    let x = f32s(random(&[rows, in_dim], 51));
    let w = f32s(random(&[out_dim, in_dim], 52));
    let g = f32s(random(&[rows, out_dim], 53));
    let wp = pack_weight(&w, (out_dim, in_dim), false).expect("f32 packs");
    let xp = pack_activation(&x, in_dim).expect("f32 packs");
    let grads = |x: &[f32], packed: Packed| {
        let mut dx = vec![f32::NAN; rows * in_dim];
        let (mut dw, mut db) = (vec![0f32; out_dim * in_dim], vec![0f32; out_dim]);
        linear_grads_into(x, &w, &g, Some(&mut dx), &mut dw, &mut db, packed);
        [dx, dw, db].map(|v| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
    };
    let both = Packed {
        w: Some(&wp),
        x: Some(&xp),
    };
    let with = grads(&x, both);
    assert!(
        with.iter()
            .flatten()
            .all(|&b| f32::from_bits(b).is_finite()),
        "every value written"
    );
    assert_eq!(with, grads(&[], both), "without the input's values");
    let packed_then = Packed {
        w: Some(&wp),
        x: None,
    };
    assert_eq!(with, grads(&x, packed_then), "packed in the backward pass");
}

#[test]
fn fused_linear_matches_product_plus_bias_forward_and_backward() {
    let x = Var::from_tensor(&random(&[3, 5, 7], 31)).unwrap();
    let w = Var::from_tensor(&random(&[4, 7], 32)).unwrap();
    let b = Var::from_tensor(&random(&[4], 33)).unwrap();
    let weights = random(&[3, 5, 4], 34);
    let fused = linear(x.as_tensor(), w.as_tensor(), b.as_tensor(), false).unwrap();
    let composed = composed::linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
    assert_close(&values(&fused), &values(&composed), 1e-12, "forward");
    let g_fused = weighted_grads(fused, &weights);
    let g_comp = weighted_grads(composed, &weights);
    for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
        assert_close(
            &values(g_fused.get(v.as_tensor()).unwrap()),
            &values(g_comp.get(v.as_tensor()).unwrap()),
            1e-12,
            name,
        );
    }
    // Finite differences for the weight.
    let w0 = random(&[4, 7], 32);
    let numeric = numeric_gradient(
        &values(&w0),
        &[4, 7],
        |t| linear(x.as_tensor(), t, b.as_tensor(), false).unwrap(),
        &weights,
    );
    assert_close(
        &values(g_fused.get(w.as_tensor()).unwrap()),
        &numeric,
        1e-6,
        "finite differences",
    );
    assert!(linear(x.as_tensor(), &random(&[4, 6], 1), b.as_tensor(), false).is_err());
}

#[test]
fn the_buffer_pool_hands_out_the_shortest_free_buffer_that_fits() {
    let pool = BufferPool::<f64>::new();
    for len in [30, 10, 20] {
        pool.give(vec![len as f64; len]);
    }
    // Handed out as they are (no zero fill), at their full length.
    assert_eq!(pool.take(15), vec![20.0; 20]);
    assert_eq!(pool.take(5), vec![10.0; 10]);
    assert_eq!(pool.take(31), vec![0.0; 31], "none fits: a new one");
    assert_eq!(pool.take(30).len(), 30);
    assert!(pool.free.lock().unwrap().is_empty());
    // Several of one length (a step's packed factors), and no more than the limit kept.
    let pool = BufferPool::<f64>::with_limit(3);
    for value in 0..4 {
        pool.give(vec![value as f64; 8]);
    }
    let mut taken: Vec<f64> = (0..3).map(|_| pool.take(8)[0]).collect();
    taken.sort_by(f64::total_cmp);
    assert_eq!(
        taken,
        [0.0, 1.0, 2.0],
        "the fourth was over the limit: dropped"
    );
    assert!(pool.free.lock().unwrap().is_empty());
    assert_eq!(pool.take(8), vec![0.0; 8], "empty again: a new one");
}

#[test]
fn mismatched_inputs_are_errors_not_panics() {
    let x = random(&[2, 5], 1);
    assert!(layer_norm(&x, &random(&[4], 2), &random(&[5], 3), 1e-5).is_err());
    let ints = Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap();
    assert!(scaled_softmax(&ints, 1.0).is_err());
}

/// Mean pooling's own sum over the tokens gives candle's `mean(1)` bit for bit, forward
/// and backward, in f32 and f64, at the model's shape and at small odd ones.
#[test]
fn the_token_mean_is_candles_mean_over_the_tokens_to_the_bit() {
    for dtype in [DType::F64, DType::F32] {
        for (i, &(b, t, d)) in [(2, 64, 96), (3, 5, 7), (2, 1, 4)].iter().enumerate() {
            let x = Var::from_tensor(&random(&[b, t, d], 50 + i as u64).to_dtype(dtype).unwrap())
                .unwrap();
            let w = random(&[b, d], 60 + i as u64).to_dtype(dtype).unwrap();
            let run = |mean: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| {
                let y = mean(x.as_tensor()).unwrap();
                let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let dx = grads.get(x.as_tensor()).unwrap().clone();
                let bits = |t: &Tensor| -> Vec<u64> {
                    let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                    t.to_vec1::<f64>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                };
                (y.dims().to_vec(), bits(&y), bits(&dx))
            };
            let ours = run(&|x| crate::ops::token_mean(x));
            let candle = run(&|x| x.mean(1));
            assert_eq!(ours.0, vec![b, d], "{dtype:?} ({b}, {t}, {d}): shape");
            assert_eq!(ours.1, candle.1, "{dtype:?} ({b}, {t}, {d}): forward");
            assert_eq!(ours.2, candle.2, "{dtype:?} ({b}, {t}, {d}): gradient");
        }
    }
}
