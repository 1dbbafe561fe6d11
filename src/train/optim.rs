//! AdamW with its state in plain view (so a checkpoint can hold it), Muon for the
//! blocks' weight matrices when `train.optimizer = "muon"` (its momentum kept where
//! AdamW keeps its first moment, so checkpoints hold the same tensors), and the
//! learning rate schedule: linear warm-up, then cosine decay to `min_lr`.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use super::state_error::StateError;
use crate::config::{Optimizer, Replan, TrainConfig};

/// The gradients of `vars` from a backward pass, detached, in order.
pub fn gradients_of(vars: &[Var], grads: &GradStore) -> Vec<Option<Tensor>> {
    vars.iter()
        .map(|v| grads.get(v.as_tensor()).map(Tensor::detach))
        .collect()
}

/// Learning rate after `step` completed steps of `total` (warm-up counts from 1), with
/// the run's re-plans (`cfg.replans`) applied.
pub fn learning_rate(cfg: &TrainConfig, step: u64, total: u64) -> f64 {
    let step = step + 1;
    let warmup = cfg.warmup_steps as u64;
    if step <= warmup {
        return cfg.lr * step as f64 / warmup as f64;
    }
    let progress = cosine_progress(step, warmup, total, &cfg.replans);
    cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// How far (0 to 1) the cosine is at 1-based step `step`: linear from the warm-up's end
/// to `total`; after each re-plan's `at`, what was left of it is spread over the steps to
/// its `final_step`, so the rate stays continuous and ends at min_lr there. Without
/// re-plans this is exactly (step - warmup) / (total - warmup).
fn cosine_progress(step: u64, warmup: u64, total: u64, replans: &[Replan]) -> f64 {
    let (mut from, mut done, mut end) = (warmup, 0.0, total.max(warmup + 1));
    let along = |at: u64, from: u64, done: f64, end: u64| {
        let span = end.saturating_sub(from).max(1) as f64;
        done + (1.0 - done) * (at.saturating_sub(from) as f64 / span).min(1.0)
    };
    for r in replans.iter().filter(|r| (r.at as u64) < step) {
        let at = (r.at as u64).max(from);
        done = along(at, from, done, end);
        from = at;
        end = (r.final_step as u64).max(at + 1);
    }
    along(step, from, done, end)
}

/// How a parameter is updated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// AdamW, with or without weight decay.
    Adam { decay: bool },
    /// Muon (a block's weight matrix under `train.optimizer = "muon"`).
    Muon,
}

/// The quintic Newton-Schulz coefficients of Muon (Jordan et al., 2024): five
/// iterations take every singular value of a normalised matrix into about [0.7, 1.2].
const NEWTON_SCHULZ: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);
const NEWTON_SCHULZ_STEPS: usize = 5;

/// `g` (rows x cols) orthogonalised: U Vᵀ of its singular value decomposition,
/// approximately, by Newton-Schulz iterations on g / ‖g‖_F (on the wide side, so the
/// products are small), in f32 (or f64) products.
pub fn orthogonalised(g: &Tensor) -> Result<Tensor> {
    orthogonalised_stack(&g.unsqueeze(0)?, false)?.squeeze(0)
}

/// Several matrices of one shape, stacked (n x rows x cols), each orthogonalised as
/// [`orthogonalised`] says, all in one op ([`crate::ops::newton_schulz`]: a task per
/// matrix); the six blocks' matrices of each kind go together. `bf16`: its products
/// multiply bf16 factors, as the model's do.
pub fn orthogonalised_stack(g: &Tensor, bf16: bool) -> Result<Tensor> {
    g.dims3()?; // a stack of matrices
    let norm = g.sqr()?.sum_keepdim(2)?.sum_keepdim(1)?.sqrt()?;
    let x = g.broadcast_div(&norm.affine(1.0, 1e-7)?)?;
    // A tall stack is iterated on its transposes by the op itself, in its own layout.
    crate::ops::newton_schulz(&x, NEWTON_SCHULZ_STEPS, NEWTON_SCHULZ, bf16)
}

pub struct AdamW {
    /// (name, variable, how it is updated).
    params: Vec<(String, Var, Rule)>,
    first_moment: Vec<Tensor>,
    second_moment: Vec<Tensor>,
    /// Updates applied so far (for bias correction).
    pub steps: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    /// Muon's peak rate (its rate follows lr's schedule) and momentum.
    muon_lr: f64,
    muon_momentum: f64,
    /// The peak learning rate, to scale Muon's by the schedule.
    peak_lr: f64,
    /// Muon's Newton-Schulz products multiply bf16 factors (where the model's do).
    bf16_products: bool,
}

impl AdamW {
    /// Decay applies to weight matrices only: not to biases, LayerNorm, the CLS token
    /// or the position embedding. With Muon, the blocks' weight matrices take its rule.
    pub fn new(named_vars: Vec<(String, Var)>, cfg: &TrainConfig) -> Result<Self> {
        let mut params = Vec::new();
        let mut first_moment = Vec::new();
        let mut second_moment = Vec::new();
        for (name, var) in named_vars {
            let decay = name.ends_with(".weight") && !name.contains("norm") && var.rank() == 2;
            let rule = match cfg.optimizer {
                Optimizer::Muon if decay && name.starts_with("blocks.") => Rule::Muon,
                _ => Rule::Adam { decay },
            };
            first_moment.push(var.zeros_like()?);
            second_moment.push(var.zeros_like()?);
            params.push((name, var, rule));
        }
        Ok(Self {
            params,
            first_moment,
            second_moment,
            steps: 0,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
            muon_lr: cfg.muon_lr,
            muon_momentum: cfg.muon_momentum,
            peak_lr: cfg.lr,
            bf16_products: false,
        })
    }

    /// Muon's Newton-Schulz products in bf16 factors (`model.matmul` resolved to bf16:
    /// Muon's own recipe runs them in bf16), or f32 (the default).
    pub fn with_bf16_products(mut self, on: bool) -> Self {
        self.bf16_products = on;
        self
    }

    /// One update; `grads[i]` belongs to the i-th variable given to [`AdamW::new`]
    /// (`None` = no gradient, left unchanged). Weights and moments change in place, each
    /// by one op per parameter ([`crate::ops::update`]). AdamW's many small tensors and
    /// Muon's matrices touch disjoint weights and moments, so the two run side by side
    /// (the small ops were a serial tail beside the Newton-Schulz tasks); each weight
    /// sees the same ops in the same order as one after the other, so the same bits.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.steps += 1;
        let this = &*self;
        let (adam, muon) = rayon::join(|| this.adam_part(grads, lr), || this.muon_part(grads, lr));
        adam.and(muon)
    }

    /// The gradient of the i-th variable, if any, contiguous.
    fn gradient(grads: &[Option<Tensor>], i: usize) -> Result<Option<Tensor>> {
        grads
            .get(i)
            .and_then(Option::as_ref)
            .map(|g| g.detach().contiguous())
            .transpose()
    }

    /// AdamW's update of every variable under its rule.
    fn adam_part(&self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        use crate::ops::update;
        let t = self.steps as i32;
        let correction1 = 1.0 - self.beta1.powi(t);
        let correction2 = 1.0 - self.beta2.powi(t);
        for (i, (_, var, rule)) in self.params.iter().enumerate() {
            let Rule::Adam { decay } = *rule else {
                continue;
            };
            let Some(grad) = Self::gradient(grads, i)? else {
                continue;
            };
            let (m, v) = (&self.first_moment[i], &self.second_moment[i]);
            update::moving_average(m, &grad, self.beta1)?;
            update::second_moment(v, &grad, self.beta2)?;
            let step = update::AdamStep {
                correction1,
                correction2,
                eps: self.eps,
                lr,
                keep: decay.then_some(1.0 - lr * self.weight_decay),
            };
            update::adam_step_in_place(var.as_tensor(), m, v, step)?;
        }
        Ok(())
    }

    /// Muon's update of the blocks' matrices: Nesterov momentum, then one
    /// orthogonalisation per shape (the six blocks' matrices of a kind together). The
    /// shapes go side by side, each on a task of its own: they touch disjoint weights
    /// and moments, and one shape's serial ops (momentum, stacking, the norm, the
    /// transposes, the descent) then overlap another's Newton-Schulz products instead of
    /// leaving a core idle. Each weight sees the same ops in the same order: the same bits.
    fn muon_part(&self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        use rayon::prelude::*;
        let mut muon: std::collections::BTreeMap<(usize, usize), Vec<(usize, Tensor)>> =
            Default::default();
        for (i, (_, var, rule)) in self.params.iter().enumerate() {
            if !matches!(rule, Rule::Muon) {
                continue;
            }
            let Some(grad) = Self::gradient(grads, i)? else {
                continue;
            };
            muon.entry(var.dims2()?).or_default().push((i, grad));
        }
        muon.into_par_iter()
            .try_for_each(|(shape, members)| self.muon_shape(shape, &members, lr))
    }

    /// [`AdamW::muon_part`] for the matrices of one shape: `members` are (variable,
    /// gradient).
    fn muon_shape(
        &self,
        (rows, cols): (usize, usize),
        members: &[(usize, Tensor)],
        lr: f64,
    ) -> Result<()> {
        use crate::ops::update;
        let mu = self.muon_momentum;
        let mut directions = Vec::with_capacity(members.len());
        for (i, grad) in members {
            let m = &self.first_moment[*i];
            update::momentum(m, grad, mu)?;
            directions.push((grad + m.affine(mu, 0.0)?)?);
        }
        let orthogonal = orthogonalised_stack(&Tensor::stack(&directions, 0)?, self.bf16_products)?;
        // Scaled for the matrix's shape, at lr's point in its schedule.
        let scale = (rows as f64 / cols as f64).max(1.0).sqrt();
        let rate = self.muon_lr * lr / self.peak_lr.max(1e-30) * scale;
        let keep = 1.0 - lr * self.weight_decay;
        for (k, (i, _)) in members.iter().enumerate() {
            let var = &self.params[*i].1;
            update::decay_and_descend(var.as_tensor(), &orthogonal.get(k)?, keep, rate)?;
        }
        Ok(())
    }

    /// Moments by parameter name, for checkpoints: ("m.<name>", m), ("v.<name>", v).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (name, _, _)) in self.params.iter().enumerate() {
            // Muon's momentum sits in `m.`; its `v.` stays zeros.
            out.push((format!("m.{name}"), self.first_moment[i].clone()));
            out.push((format!("v.{name}"), self.second_moment[i].clone()));
        }
        out
    }

    /// Restores the moments saved by [`AdamW::state_tensors`]; `get` looks one up by name.
    pub fn load_state(
        &mut self,
        steps: u64,
        mut get: impl FnMut(&str) -> Option<Tensor>,
    ) -> std::result::Result<(), StateError> {
        for (i, (name, var, _)) in self.params.iter().enumerate() {
            for (prefix, slot) in [
                ("m", &mut self.first_moment[i]),
                ("v", &mut self.second_moment[i]),
            ] {
                let key = format!("{prefix}.{name}");
                let Some(t) = get(&key) else {
                    return Err(StateError::OptimizerMissing { key });
                };
                if t.dims() != var.dims() {
                    return Err(StateError::OptimizerShape {
                        key,
                        got: t.dims().to_vec(),
                        expected: var.dims().to_vec(),
                    });
                }
                *slot = t;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use candle_core::{DType, Device};

    /// The step as candle's ops compose it, term by term (and before the in-place
    /// ops, how it ran): the reference `step` is held to bit for bit.
    fn step_composed(opt: &mut AdamW, grads: &[Option<Tensor>], lr: f64) {
        opt.steps += 1;
        let t = opt.steps as i32;
        let correction1 = 1.0 - opt.beta1.powi(t);
        let correction2 = 1.0 - opt.beta2.powi(t);
        let mut muon: std::collections::BTreeMap<(usize, usize), Vec<(usize, Tensor)>> =
            Default::default();
        for (i, (_, var, rule)) in opt.params.iter().enumerate() {
            let Some(grad) = grads.get(i).and_then(Option::as_ref) else {
                continue;
            };
            let grad = grad.detach();
            let decay = match *rule {
                Rule::Adam { decay } => decay,
                Rule::Muon => {
                    let mu = opt.muon_momentum;
                    let buffer = (opt.first_moment[i].affine(mu, 0.0).unwrap() + &grad).unwrap();
                    let direction = (&grad + buffer.affine(mu, 0.0).unwrap()).unwrap();
                    muon.entry(direction.dims2().unwrap())
                        .or_default()
                        .push((i, direction));
                    opt.first_moment[i] = buffer;
                    continue;
                }
            };
            let m = (opt.first_moment[i].affine(opt.beta1, 0.0).unwrap()
                + grad.affine(1.0 - opt.beta1, 0.0).unwrap())
            .unwrap();
            let v = (opt.second_moment[i].affine(opt.beta2, 0.0).unwrap()
                + grad.sqr().unwrap().affine(1.0 - opt.beta2, 0.0).unwrap())
            .unwrap();
            let denom = v
                .affine(1.0 / correction2, 0.0)
                .unwrap()
                .sqrt()
                .unwrap()
                .affine(1.0, opt.eps)
                .unwrap();
            let update = m
                .affine(1.0 / correction1, 0.0)
                .unwrap()
                .div(&denom)
                .unwrap();
            let theta = var.as_tensor().detach();
            let theta = if decay {
                theta.affine(1.0 - lr * opt.weight_decay, 0.0).unwrap()
            } else {
                theta
            };
            var.set(&(theta - update.affine(lr, 0.0).unwrap()).unwrap())
                .unwrap();
            opt.first_moment[i] = m;
            opt.second_moment[i] = v;
        }
        for ((rows, cols), members) in muon {
            let directions: Vec<&Tensor> = members.iter().map(|(_, d)| d).collect();
            let orthogonal =
                orthogonalised_stack(&Tensor::stack(&directions, 0).unwrap(), opt.bf16_products)
                    .unwrap();
            let scale = (rows as f64 / cols as f64).max(1.0).sqrt();
            let rate = opt.muon_lr * lr / opt.peak_lr.max(1e-30) * scale;
            for (k, (i, _)) in members.iter().enumerate() {
                let var = &opt.params[*i].1;
                let theta = var
                    .as_tensor()
                    .detach()
                    .affine(1.0 - lr * opt.weight_decay, 0.0)
                    .unwrap();
                let o = orthogonal.get(k).unwrap().affine(rate, 0.0).unwrap();
                var.set(&(theta - o).unwrap()).unwrap();
            }
        }
    }

    #[test]
    fn the_in_place_step_is_the_composed_one_bit_for_bit() {
        use rand::{Rng, SeedableRng};
        for dtype in [DType::F32, DType::F64] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            let mut tensor = |shape: &[usize]| {
                let n: usize = shape.iter().product();
                let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                Tensor::from_vec(v, shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            // Two Muon matrices of one shape, one of another, a decayed AdamW weight and
            // an undecayed bias; each optimizer on its own copies of the same weights.
            let shapes: [(&str, &[usize]); 5] = [
                ("blocks.0.attn.qkv.weight", &[12, 4]),
                ("blocks.1.attn.qkv.weight", &[12, 4]),
                ("blocks.0.mlp.fc1.weight", &[8, 4]),
                ("head.weight", &[3, 4]),
                ("head.bias", &[3]),
            ];
            let start: Vec<Tensor> = shapes.iter().map(|(_, s)| tensor(s)).collect();
            let named = |copy: bool| -> Vec<(String, Var)> {
                shapes
                    .iter()
                    .zip(&start)
                    .map(|((name, _), t)| {
                        let t = if copy { t.copy().unwrap() } else { t.clone() };
                        (name.to_string(), Var::from_tensor(&t).unwrap())
                    })
                    .collect()
            };
            let mut cfg = Config::default().train;
            cfg.optimizer = Optimizer::Muon;
            let (a, b) = (named(true), named(true));
            let mut fused = AdamW::new(a.clone(), &cfg).unwrap();
            let mut composed = AdamW::new(b.clone(), &cfg).unwrap();
            for step in 0..4 {
                let grads: Vec<Option<Tensor>> = shapes
                    .iter()
                    .enumerate()
                    // The bias has no gradient in one step: it is left as it is.
                    .map(|(i, (_, s))| (i != 4 || step != 2).then(|| tensor(s)))
                    .collect();
                let lr = 1e-3 * (step + 1) as f64;
                fused.step(&grads, lr).unwrap();
                step_composed(&mut composed, &grads, lr);
            }
            let bits = |t: &Tensor| -> Vec<u64> {
                let v: Vec<f64> = t
                    .flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            };
            for ((name, x), (_, y)) in a.iter().zip(&b) {
                assert_eq!(bits(x.as_tensor()), bits(y.as_tensor()), "{dtype:?} {name}");
            }
            for ((kx, x), (_, y)) in fused.state_tensors().iter().zip(&composed.state_tensors()) {
                assert_eq!(bits(x), bits(y), "{dtype:?} {kx}");
            }
        }
    }

    #[test]
    fn schedule_warms_up_linearly_then_decays_by_cosine() {
        let mut cfg = Config::default().train;
        cfg.lr = 1e-3;
        cfg.min_lr = 1e-5;
        cfg.warmup_steps = 10;
        assert!((learning_rate(&cfg, 0, 110) - 1e-4).abs() < 1e-15);
        assert!((learning_rate(&cfg, 9, 110) - 1e-3).abs() < 1e-15);
        // Half way through the decay: the mean of lr and min_lr.
        assert!((learning_rate(&cfg, 59, 110) - (1e-3 + 1e-5) / 2.0).abs() < 1e-12);
        assert!((learning_rate(&cfg, 109, 110) - 1e-5).abs() < 1e-15);
        assert!((learning_rate(&cfg, 500, 110) - 1e-5).abs() < 1e-15);
    }

    #[test]
    fn a_replan_compresses_the_rest_of_the_cosine_continuously() {
        let mut cfg = Config::default().train;
        (cfg.lr, cfg.min_lr, cfg.warmup_steps) = (1e-3, 1e-5, 10);
        let planned: Vec<f64> = (0..200).map(|s| learning_rate(&cfg, s, 110)).collect();
        cfg.replans = vec![Replan {
            at: 40,
            final_step: 70,
        }];
        let replanned: Vec<f64> = (0..200).map(|s| learning_rate(&cfg, s, 110)).collect();
        // Steps 1..=40 (indices 0..40) are the plan's, bit for bit.
        assert_eq!(planned[..40], replanned[..40]);
        // Then the 70 steps left of the cosine's 100 run in 30: each step advances it by
        // 70/30 of a planned one, and step 70 is the end.
        let at = 0.3;
        for s in 41..=70u64 {
            let progress = at + 0.7 * (s - 40) as f64 / 30.0;
            let expected =
                1e-5 + 0.5 * (1e-3 - 1e-5) * (1.0 + (std::f64::consts::PI * progress).cos());
            assert!(
                (replanned[s as usize - 1] - expected).abs() < 1e-15,
                "step {s}"
            );
        }
        assert!((replanned[69] - 1e-5).abs() < 1e-15);
        // A second re-plan chains onto the first from where it stands.
        cfg.replans.push(Replan {
            at: 50,
            final_step: 60,
        });
        let twice: Vec<f64> = (0..200).map(|s| learning_rate(&cfg, s, 110)).collect();
        assert_eq!(twice[..50], replanned[..50]);
        let at50 = at + 0.7 * 10.0 / 30.0;
        let step55 = at50 + (1.0 - at50) * 5.0 / 10.0;
        let expected = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1.0 + (std::f64::consts::PI * step55).cos());
        assert!((twice[54] - expected).abs() < 1e-15);
        assert!((twice[59] - 1e-5).abs() < 1e-15);
    }

    #[test]
    fn adamw_first_steps_match_the_formula() {
        let mut cfg = Config::default().train;
        cfg.weight_decay = 0.1;
        let w = Var::from_tensor(&Tensor::new(&[[1.0f64, -2.0]], &Device::Cpu).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[0.5f64], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(
            vec![
                ("fc.weight".into(), w.clone()),
                ("fc.bias".into(), b.clone()),
            ],
            &cfg,
        )
        .unwrap();
        // loss = sum(w * [3, 4]) + 2b: constant gradients [3, 4] and 2.
        let coef = Tensor::new(&[[3.0f64, 4.0]], &Device::Cpu).unwrap();
        let lr = 0.01;
        let mut expected_w = [1.0f64, -2.0];
        let mut expected_b = 0.5f64;
        for _ in 0..2 {
            let loss = ((w.as_tensor() * &coef).unwrap().sum_all().unwrap()
                + b.as_tensor().affine(2.0, 0.0).unwrap().sum_all().unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&gradients_of(&[w.clone(), b.clone()], &grads), lr)
                .unwrap();
            // With a constant gradient g, m_hat = g and v_hat = g^2, so the step is g / (|g| + eps).
            for (wv, g) in expected_w.iter_mut().zip([3.0, 4.0]) {
                *wv = *wv * (1.0 - lr * 0.1) - lr * g / (g + cfg.adam_eps);
            }
            expected_b -= lr * 2.0 / (2.0 + cfg.adam_eps);
        }
        let got_w: Vec<f64> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let got_b: Vec<f64> = b.as_tensor().to_vec1().unwrap();
        for (g, e) in got_w.iter().zip(expected_w) {
            assert!((g - e).abs() < 1e-12, "{g} vs {e}");
        }
        assert!((got_b[0] - expected_b).abs() < 1e-12);
        assert_eq!(opt.steps, 2);
        assert_eq!(opt.state_tensors().len(), 4);
        assert_eq!(opt.state_tensors()[0].1.dtype(), DType::F64);
    }

    /// Singular values of a small matrix, from the eigenvalues of its Gram matrix by Jacobi
    /// rotations (f64): a reference independent of Newton-Schulz.
    #[allow(clippy::needless_range_loop)] // two rows rotated together
    fn singular_values(g: &Tensor) -> Vec<f64> {
        // The smaller Gram matrix: its eigenvalues are the squared singular values.
        let (rows, cols) = g.dims2().unwrap();
        let gtg = match rows < cols {
            true => g.matmul(&g.t().unwrap()).unwrap(),
            false => g.t().unwrap().matmul(g).unwrap(),
        };
        let n = gtg.dim(0).unwrap();
        let mut a: Vec<Vec<f64>> = gtg.to_dtype(DType::F64).unwrap().to_vec2().unwrap();
        for _ in 0..100 {
            for p in 0..n {
                for q in p + 1..n {
                    if a[p][q].abs() < 1e-15 {
                        continue;
                    }
                    let theta = 0.5 * (2.0 * a[p][q]).atan2(a[q][q] - a[p][p]);
                    let (c, s) = (theta.cos(), theta.sin());
                    for row in a.iter_mut() {
                        let (x, y) = (row[p], row[q]);
                        (row[p], row[q]) = (c * x - s * y, s * x + c * y);
                    }
                    for k in 0..n {
                        let (x, y) = (a[p][k], a[q][k]);
                        (a[p][k], a[q][k]) = (c * x - s * y, s * x + c * y);
                    }
                }
            }
        }
        (0..n).map(|i| a[i][i].max(0.0).sqrt()).collect()
    }

    #[test]
    fn newton_schulz_takes_every_singular_value_near_one_and_keeps_the_direction() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (rows, cols) in [(12, 4), (4, 12), (6, 6)] {
            // Singular values spread over two decades.
            let values: Vec<f64> = (0..rows * cols)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let g = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
            let scale: Vec<f64> = (0..cols)
                .map(|j| 10f64.powf(-2.0 * j as f64 / cols as f64))
                .collect();
            let g = g
                .broadcast_mul(&Tensor::from_vec(scale, (1, cols), &Device::Cpu).unwrap())
                .unwrap();
            let o = orthogonalised(&g).unwrap();
            assert_eq!(o.dims(), g.dims());
            for s in singular_values(&o) {
                assert!(
                    (0.55..1.25).contains(&s),
                    "{rows}x{cols}: singular value {s}"
                );
            }
            let along: f64 = (&o * &g).unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(along > 0.0);
        }
        // Diagonal by hand: stays diagonal with the signs kept.
        let d = Tensor::new(&[[3.0f64, 0.0], [0.0, -0.5]], &Device::Cpu).unwrap();
        let o: Vec<Vec<f64>> = orthogonalised(&d).unwrap().to_vec2().unwrap();
        assert!(o[0][1].abs() < 1e-12 && o[1][0].abs() < 1e-12);
        assert!(o[0][0] > 0.55 && o[1][1] < -0.55, "{o:?}");
    }

    #[test]
    fn a_stack_is_orthogonalised_as_each_of_its_matrices_alone() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (rows, cols) in [(12, 4), (4, 12), (6, 6)] {
            let matrices: Vec<Tensor> = (0..3)
                .map(|_| {
                    let v: Vec<f64> = (0..rows * cols)
                        .map(|_| rng.random_range(-1.0..1.0))
                        .collect();
                    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
                })
                .collect();
            let stacked =
                orthogonalised_stack(&Tensor::stack(&matrices, 0).unwrap(), false).unwrap();
            for (k, g) in matrices.iter().enumerate() {
                // Alone, by the 2-D path of the first implementation: g / ‖g‖ by a
                // scalar, then the same iterations.
                let norm: f64 = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                let mut x = g.affine(1.0 / (norm + 1e-7), 0.0).unwrap();
                if rows > cols {
                    x = x.t().unwrap();
                }
                let (a, b, c) = NEWTON_SCHULZ;
                for _ in 0..NEWTON_SCHULZ_STEPS {
                    let xx = x.matmul(&x.t().unwrap()).unwrap();
                    let poly = (xx.affine(b, 0.0).unwrap()
                        + xx.matmul(&xx).unwrap().affine(c, 0.0).unwrap())
                    .unwrap();
                    x = (x.affine(a, 0.0).unwrap() + poly.matmul(&x).unwrap()).unwrap();
                }
                if rows > cols {
                    x = x.t().unwrap();
                }
                let alone: Vec<Vec<f64>> = x.to_vec2().unwrap();
                let together: Vec<Vec<f64>> = stacked.get(k).unwrap().to_vec2().unwrap();
                for (p, q) in alone.iter().flatten().zip(together.iter().flatten()) {
                    assert!((p - q).abs() < 1e-12, "{rows}x{cols} #{k}: {p} vs {q}");
                }
            }
        }
    }

    #[test]
    fn muon_steps_the_blocks_matrices_and_adamw_the_rest() {
        let mut cfg = Config::default().train;
        cfg.optimizer = Optimizer::Muon;
        cfg.weight_decay = 0.1;
        let (lr, mu) = (0.01, cfg.muon_momentum);
        let start = [[1.0f64, -2.0], [0.5, 0.25], [0.0, 1.0]];
        let w = Var::from_tensor(&Tensor::new(&start, &Device::Cpu).unwrap()).unwrap();
        let h = Var::from_tensor(&Tensor::new(&[[1.0f64, -2.0]], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(
            vec![
                ("blocks.0.mlp.fc1.weight".into(), w.clone()),
                ("head.weight".into(), h.clone()),
            ],
            &cfg,
        )
        .unwrap();
        let g = Tensor::new(&[[3.0f64, 4.0], [1.0, 0.0], [0.0, 2.0]], &Device::Cpu).unwrap();
        let gh = Tensor::new(&[[3.0f64, 4.0]], &Device::Cpu).unwrap();
        let mut buffer = g.zeros_like().unwrap();
        let mut expected = Tensor::new(&start, &Device::Cpu).unwrap();
        for _ in 0..2 {
            opt.step(&[Some(g.clone()), Some(gh.clone())], lr).unwrap();
            // By the rule: b = mu b + g; o = NS(g + mu b); w = w (1 - lr wd) - muon_lr
            // (lr / peak lr) sqrt(3 / 2) o.
            buffer = (buffer.affine(mu, 0.0).unwrap() + &g).unwrap();
            let o = orthogonalised(&(&g + buffer.affine(mu, 0.0).unwrap()).unwrap()).unwrap();
            let rate = cfg.muon_lr * lr / cfg.lr * 1.5f64.sqrt();
            expected = (expected.affine(1.0 - lr * 0.1, 0.0).unwrap()
                - o.affine(rate, 0.0).unwrap())
            .unwrap();
        }
        let got: Vec<Vec<f64>> = w.as_tensor().to_vec2().unwrap();
        let want: Vec<Vec<f64>> = expected.to_vec2().unwrap();
        for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        // The head stays on AdamW: a constant gradient's step is lr per element.
        let head: Vec<Vec<f64>> = h.as_tensor().to_vec2().unwrap();
        let adam = |w0: f64| {
            let w1 = w0 * (1.0 - lr * 0.1) - lr;
            w1 * (1.0 - lr * 0.1) - lr
        };
        assert!((head[0][0] - adam(1.0)).abs() < 1e-9, "{head:?}");
        // Muon's momentum is checkpointed as its first moment.
        let state = opt.state_tensors();
        let m: Vec<Vec<f64>> = state[0].1.to_vec2().unwrap();
        assert_eq!(m, buffer.to_vec2::<f64>().unwrap());
    }
}
