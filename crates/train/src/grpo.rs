//! The GRPO objective and its optimiser.
//!
//! - Advantages are normalised within a group: `(r − mean) / std`; a group whose rewards are all
//!   equal contributes nothing (advantage 0) and is counted.
//! - The loss per policy token is the PPO-clipped surrogate
//!   `−min(ρ·A, clip(ρ, 1−ε, 1+ε)·A)` with `ρ = exp(logp − logp_old)`, plus, optionally,
//!   `β · KL` with the low-variance estimator `exp(ref − logp) − (ref − logp) − 1`; the mean is
//!   over every policy token of the batch (token-mean). Tokens the controller wrote or a tool
//!   returned have mask 0 and contribute nothing.
//! - AdamW (decoupled weight decay) with gradient clipping by global norm; its state is saved
//!   and restored with the adapter, so a resumed run takes exactly the step it would have taken.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// Group-normalised advantages of one group's rewards; `None` when they are all equal (the
/// group carries no signal).
pub fn group_advantages(rewards: &[f64]) -> Option<Vec<f64>> {
    let n = rewards.len();
    if n < 2 {
        return None;
    }
    let mean = rewards.iter().sum::<f64>() / n as f64;
    let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let std = var.sqrt();
    if std < 1e-9 {
        return None;
    }
    Some(rewards.iter().map(|r| (r - mean) / std).collect())
}

/// Settings of the objective.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GrpoParams {
    /// Clip range ε.
    pub clip: f64,
    /// KL coefficient β (0: no reference term).
    pub kl: f64,
}

impl Default for GrpoParams {
    fn default() -> Self {
        GrpoParams {
            clip: 0.2,
            kl: 0.001,
        }
    }
}

/// One trajectory's tokens as the loss sees them (all vectors the same length).
#[derive(Debug, Clone, Default)]
pub struct TokenBatch {
    /// Log-probabilities when sampled (or recomputed by the training model before the update).
    pub old: Vec<f32>,
    /// Log-probabilities under the reference policy (adapter off), when β > 0.
    pub reference: Option<Vec<f32>>,
    /// 1 for tokens the policy sampled, 0 for controller and tool tokens.
    pub mask: Vec<f32>,
    /// The trajectory's advantage.
    pub advantage: f32,
}

/// The GRPO loss over several trajectories: `new[i]` are the current log-probabilities of
/// trajectory `i` (differentiable). Returns (loss, number of policy tokens).
pub fn grpo_loss(new: &[Tensor], batch: &[TokenBatch], p: &GrpoParams) -> Result<(Tensor, usize)> {
    if new.len() != batch.len() || new.is_empty() {
        return Err(TrainError::Shape(format!(
            "{} log-probability tensors for {} trajectories",
            new.len(),
            batch.len()
        )));
    }
    let dev = Device::Cpu;
    let tokens: f32 = batch.iter().map(|b| b.mask.iter().sum::<f32>()).sum();
    let mut total: Option<Tensor> = None;
    for (lp, b) in new.iter().zip(batch) {
        let n = lp.dim(0)?;
        if b.old.len() != n
            || b.mask.len() != n
            || b.reference.as_ref().is_some_and(|r| r.len() != n)
        {
            return Err(TrainError::Shape(format!(
                "trajectory of {n} tokens with {} old log-probs and {} mask entries",
                b.old.len(),
                b.mask.len()
            )));
        }
        let dt = lp.dtype();
        let old = Tensor::new(b.old.as_slice(), &dev)?.to_dtype(dt)?;
        let mask = Tensor::new(b.mask.as_slice(), &dev)?.to_dtype(dt)?;
        let ratio = (lp - &old)?.exp()?;
        let a = b.advantage as f64;
        let s1 = (&ratio * a)?;
        let s2 = (ratio.clamp(1.0 - p.clip, 1.0 + p.clip)? * a)?;
        let mut per = s1.minimum(&s2)?.neg()?;
        if p.kl > 0.0 {
            if let Some(r) = &b.reference {
                let r = Tensor::new(r.as_slice(), &dev)?.to_dtype(dt)?;
                let d = (r - lp)?;
                let kl = ((d.exp()? - &d)? - 1.0)?;
                per = (per + (kl * p.kl)?)?;
            }
        }
        let s = (per * mask)?.sum_all()?;
        total = Some(match total {
            Some(t) => (t + s)?,
            None => s,
        });
    }
    let total = total.ok_or_else(|| TrainError::Shape("no trajectories".into()))?;
    Ok(((total / tokens.max(1.0) as f64)?, tokens as usize))
}

/// The loss of one soft-labelled answer token (a distilled judge): `lp` holds the current
/// log-probability q of the learnt token within its allowed pair (shape `(1,)`,
/// differentiable), `p` the label's probability of it; the loss is the two-way cross-entropy
/// `−p·log q − (1 − p)·log(1 − q)` (minimal, with zero gradient, at q = p), plus `kl ·` the same
/// low-variance KL estimator as GRPO's when a reference log-probability is given.
pub fn soft_label_loss(lp: &Tensor, p: f32, reference: Option<&[f32]>, kl: f64) -> Result<Tensor> {
    if lp.dims() != [1] || !(0.0..=1.0).contains(&p) {
        return Err(TrainError::Shape(format!(
            "a soft label is one token's probability in [0, 1]: {p} for {:?} log-probabilities",
            lp.dims()
        )));
    }
    let p = p as f64;
    // log(1 − q), in f64 and exact where q is near 1 (the loss keeps its gradient there).
    let lp64 = lp.to_dtype(DType::F64)?;
    let rest = crate::policy::log1m_exp(lp)?;
    let mut per = ((lp64 * -p)? + (rest * -(1.0 - p))?)?.to_dtype(lp.dtype())?;
    if kl > 0.0 {
        if let Some(r) = reference {
            let r = Tensor::new(r, lp.device())?.to_dtype(lp.dtype())?;
            let d = (r - lp)?;
            per = (per + (((d.exp()? - &d)? - 1.0)? * kl)?)?;
        }
    }
    Ok(per.sum_all()?)
}

/// The listwise loss of one query's soft-labelled judge answers: `lps[i]` holds the current
/// log-probability q_i of item i's `Yes` within its pair (shape `(1,)`, differentiable), `p[i]` its
/// label. The student's score of an item is its log-odds s_i = log q_i − log(1 − q_i) (the score the
/// re-ranking stage orders by), the label's t_i = log p_i − log(1 − p_i) (p clamped to
/// [1e-6, 1 − 1e-6]: a hard label is a near-one-hot list); the loss is KL(softmax(t) ‖ softmax(s))
/// over the items — zero, with zero gradient, when the student orders and spaces the items as the
/// labels do, whatever its level, so only the order within the query is learnt — plus `kl ·` GRPO's
/// KL estimator per item when reference log-probabilities are given.
pub fn listwise_soft_loss(
    lps: &[Tensor],
    p: &[f32],
    references: Option<&[Vec<f32>]>,
    kl: f64,
) -> Result<Tensor> {
    listwise_mixed_loss(lps, p, None, references, kl)
}

/// [`listwise_soft_loss`] with the query's own answer mixed into the labels: with
/// `target = Some((k, α))` the labels' list is `(1 − α)·softmax(t) + α·e_k` — the teacher's order
/// with weight 1 − α and the item the shopper took (item `k`) with weight α — so the loss is
/// `(1 − α)·KL(teacher ‖ judge) + α·(−log softmax(s)_k)` up to a constant (zero, with zero
/// gradient, when the judge's softmax equals the mixture). Hinton et al.'s distillation with the
/// true label beside the soft one: a student can then rank the target above where its teacher
/// does. `α = 0` is [`listwise_soft_loss`].
pub fn listwise_mixed_loss(
    lps: &[Tensor],
    p: &[f32],
    target: Option<(usize, f64)>,
    references: Option<&[Vec<f32>]>,
    kl: f64,
) -> Result<Tensor> {
    if let Some((k, a)) = target {
        if k >= p.len() || !(0.0..=1.0).contains(&a) {
            return Err(TrainError::Shape(format!(
                "the target's weight is in [0, 1] and its item one of the list's {}: item {k}, weight {a}",
                p.len()
            )));
        }
    }
    if lps.len() != p.len() || lps.len() < 2 {
        return Err(TrainError::Shape(format!(
            "a listwise loss needs two or more items with a label each: {} items, {} labels",
            lps.len(),
            p.len()
        )));
    }
    if let Some(bad) = lps.iter().find(|lp| lp.dims() != [1]) {
        return Err(TrainError::Shape(format!(
            "a listwise item is one token's log-probability, not {:?}",
            bad.dims()
        )));
    }
    if let Some(bad) = p.iter().find(|x| !(0.0..=1.0).contains(*x)) {
        return Err(TrainError::Shape(format!(
            "a soft label is a probability in [0, 1], not {bad}"
        )));
    }
    let lp = Tensor::cat(lps, 0)?; // (n,)

    // The log-odds log q − log(1 − q), in f64 and exact where q is near 1: a list whose items
    // the judge all but surely accepts is still ordered (the loss keeps its gradient there).
    let s = (lp.to_dtype(DType::F64)? - crate::policy::log1m_exp(&lp)?)?;
    let log_q = s.broadcast_sub(&crate::policy::logsumexp(&s.unsqueeze(0)?)?)?;
    let t: Vec<f64> = p
        .iter()
        .map(|&x| {
            let x = (x as f64).clamp(1e-6, 1.0 - 1e-6);
            (x / (1.0 - x)).ln()
        })
        .collect();
    let mx = t.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z = t.iter().map(|x| (x - mx).exp()).sum::<f64>().ln() + mx;
    let mut pi: Vec<f64> = t.iter().map(|x| (x - z).exp()).collect();
    if let Some((k, a)) = target {
        for (i, x) in pi.iter_mut().enumerate() {
            *x = (1.0 - a) * *x + if i == k { a } else { 0.0 };
        }
    }
    // Σ π log π (0 · log 0 = 0): the constant that makes the loss a KL, zero at the optimum.
    let entropy_term: f64 = pi.iter().filter(|&&x| x > 0.0).map(|&x| x * x.ln()).sum();
    let w = Tensor::new(pi, lp.device())?;
    let mut loss = ((log_q * w)?.sum_all()? * -1.0)?
        .affine(1.0, entropy_term)?
        .to_dtype(lp.dtype())?;
    if kl > 0.0 {
        if let Some(r) = references {
            let r: Vec<f32> = r
                .iter()
                .map(|v| v.first().copied().unwrap_or(0.0))
                .collect();
            if r.len() != lps.len() {
                return Err(TrainError::Shape(format!(
                    "{} reference log-probabilities for {} items",
                    r.len(),
                    lps.len()
                )));
            }
            let r = Tensor::new(r, lp.device())?.to_dtype(lp.dtype())?;
            let d = (r - &lp)?;
            loss = (loss + ((((d.exp()? - &d)? - 1.0)? * kl)?.sum_all()?))?;
        }
    }
    Ok(loss)
}

/// AdamW settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    /// Learning rate.
    pub lr: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        AdamWParams {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
        }
    }
}

/// AdamW over named variables, with its state saveable.
pub struct AdamW {
    /// Settings.
    pub params: AdamWParams,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken.
    pub step: u64,
}

impl AdamW {
    /// An optimiser for `vars` (name, var).
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let m = vars
            .iter()
            .map(|(_, v)| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(AdamW {
            params,
            vars,
            m,
            v,
            step: 0,
        })
    }

    /// Gradients of `loss` for every variable (zeros where it does not depend on one).
    pub fn grads(&self, loss: &Tensor) -> Result<Vec<Tensor>> {
        let g = loss.backward()?;
        self.vars
            .iter()
            .map(|(_, v)| match g.get(v.as_tensor()) {
                Some(t) => Ok(t.clone()),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect()
    }

    /// `g` summed into `acc` (accumulating micro-batches' gradients, in the order they are
    /// added: the same sum whatever thread computed each).
    pub fn add_grads(acc: Option<Vec<Tensor>>, g: Vec<Tensor>) -> Result<Vec<Tensor>> {
        match acc {
            None => Ok(g),
            Some(a) => Ok(a
                .iter()
                .zip(&g)
                .map(|(a, g)| a + g)
                .collect::<candle_core::Result<Vec<_>>>()?),
        }
    }

    /// One update with `grads` (as from [`AdamW::grads`]); returns the gradient norm before
    /// clipping.
    pub fn step(&mut self, grads: &[Tensor]) -> Result<f64> {
        if grads.len() != self.vars.len() {
            return Err(TrainError::Shape(format!(
                "{} gradients for {} variables",
                grads.len(),
                self.vars.len()
            )));
        }
        let mut sq = 0f64;
        for g in grads {
            sq += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        let norm = sq.sqrt();
        let scale = if self.params.max_grad_norm > 0.0 && norm > self.params.max_grad_norm {
            self.params.max_grad_norm / norm
        } else {
            1.0
        };
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - p.beta1.powi(t), 1.0 - p.beta2.powi(t));
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let g = (&grads[i] * scale)?;
            self.m[i] = ((&self.m[i] * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            self.v[i] = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let mhat = (&self.m[i] / bc1)?;
            let vhat = (&self.v[i] / bc2)?;
            let upd = (mhat / (vhat.sqrt()? + p.eps)?)?;
            let w = var.as_tensor();
            let decayed = (w * (1.0 - p.lr * p.weight_decay))?;
            var.set(&(decayed - (upd * p.lr)?)?)?;
        }
        Ok(norm)
    }

    /// Writes the moments, the step and the settings (safetensors + JSON beside it).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            map.insert(format!("{name}.m"), self.m[i].clone());
            map.insert(format!("{name}.v"), self.v[i].clone());
        }
        candle_core::safetensors::save(&map, path)?;
        let meta = serde_json::json!({"step": self.step, "params": self.params});
        std::fs::write(path.with_extension("json"), meta.to_string())
            .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        Ok(())
    }

    /// Restores what [`AdamW::save`] wrote (the variables themselves come from the adapter).
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let map = candle_core::safetensors::load(path, &Device::Cpu)?;
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let get = |k: String| -> Result<Tensor> {
                let t = map
                    .get(&k)
                    .ok_or_else(|| TrainError::Io(format!("{}: no {k}", path.display())))?;
                if t.dims() != var.as_tensor().dims() {
                    return Err(TrainError::Io(format!(
                        "{}: {k} has the wrong shape",
                        path.display()
                    )));
                }
                Ok(t.to_dtype(var.as_tensor().dtype())?)
            };
            self.m[i] = get(format!("{name}.m"))?;
            self.v[i] = get(format!("{name}.v"))?;
        }
        let meta = std::fs::read_to_string(path.with_extension("json"))
            .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        let meta: serde_json::Value = serde_json::from_str(&meta)
            .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        self.step = meta["step"].as_u64().unwrap_or(0);
        Ok(())
    }
}
