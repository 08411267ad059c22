//! Trajectories as data (`mrrec rollouts`): each sampled trajectory of a `train` query written as
//! one JSON line — the query, the model and seed that wrote it, its rewards (the same as
//! training's), and every model call's exact prompt ids, sampled ids, their log-probabilities,
//! which of them a constraint restricted, and the decoded text — so that fine-tuning, selection
//! and distillation read what the model did without re-tokenising.
//!
//! A file is appended a whole group at a time and synced; [`RolloutsFile::open`] reads back the
//! complete groups, drops a torn last line or an incomplete group (a killed run), and reports
//! what it dropped, so rerunning the same command continues where it stopped.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::rollout::Trajectory;
use crate::{Context, Result, TrainError};
use mrrec_agent::rewards::Rewards;

/// One model call of a trajectory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    /// Prompt token ids (controller text and tool results: never trained on).
    pub prompt: Vec<u32>,
    /// The sampled ids (the only tokens the model wrote).
    pub ids: Vec<u32>,
    /// Their log-probabilities when sampled (renormalised under a constraint).
    pub logprobs: Vec<f32>,
    /// Per sampled id, whether a constraint restricted the choice (the allowed sets are a
    /// function of the request's constraint and the ids before, so they are not stored).
    pub constrained: Vec<bool>,
    /// The constraint the call was decoded under (not written when none): fine-tuning replays
    /// it over `ids` for the allowed sets ([`segments_of`]). Files written before it was
    /// recorded (session 25) lack it; their calls are learnt under the whole vocabulary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<mrrec_llm::Constraint>,
    /// The sampled ids decoded.
    pub text: String,
}

/// One trajectory: a line of a rollouts file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrajectoryRecord {
    /// The `train` query.
    pub qid: String,
    /// Its user.
    pub user: String,
    /// The request the assistant answered.
    pub request: String,
    /// Its category.
    pub category: Option<String>,
    /// Position in its group, and the group's size.
    pub index: usize,
    /// Trajectories per group.
    pub group: usize,
    /// The seed its model calls sampled from (call `i`: `seed + i`).
    pub seed: u64,
    /// The model that wrote it (registry id or `gguf-sha256:…`, adapter included).
    pub model: String,
    /// Its tokenizer's fingerprint ([`mrrec_llm_local::GgufInfo::tokenizer_fingerprint`]): the
    /// ids train only a model with the same one.
    pub tokenizer: String,
    /// The sampling temperature.
    pub temperature: f64,
    /// The loop's mode (`guided` or `free`).
    pub mode: String,
    /// Its rewards, as training computes them.
    pub rewards: Rewards,
    /// The ranking R_rec scored ([`mrrec_agent::assistant::Ranking::name`]); written only when
    /// it is not the paper's, so earlier files read as the paper's.
    #[serde(default = "paper_ranking", skip_serializing_if = "is_paper_ranking")]
    pub ranking: String,
    /// How many leading calls were decoded greedily, as the assistant answers (`rollouts
    /// --sample answer`: the reasoning and the memory calls), the rest sampled; 0 (not written)
    /// when every call was sampled. Fine-tuning learns the sampled calls only (learnt as a free
    /// form, `--sft-as-free`, the whole conversation).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub greedy_calls: usize,
    /// The loop fell back to the request (no parsed profile).
    pub fallback: bool,
    /// Memory-tool calls that returned memories.
    pub memory_calls_ok: usize,
    /// The model calls, in order.
    pub calls: Vec<CallRecord>,
    /// A guided trajectory written as the paper's free loop (the controller's openings as the
    /// model's own text; [`mrrec_agent::assistant::free_conversation`]): what distilling the
    /// controller into the model learns (`mrrec train --sft F --sft-as-free`). Empty for free
    /// trajectories and for answers with nothing to learn from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub free_form: Vec<mrrec_llm::Message>,
    /// Prompt and generated tokens as the model reported them, for calls recorded as text only
    /// (a server's: no ids); absent when the calls carry their ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_tokens: Option<[u64; 2]>,
}

fn paper_ranking() -> String {
    mrrec_agent::assistant::PAPER_RANKING.into()
}

/// A number at zero (serde's `skip_serializing_if`: a setting written only when set).
pub(crate) fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

fn is_paper_ranking(r: &String) -> bool {
    r == mrrec_agent::assistant::PAPER_RANKING
}

impl TrajectoryRecord {
    /// The record of trajectory `index` of a group; `decode` turns sampled ids into text.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        t: &Trajectory,
        qid: &str,
        user: &str,
        request: &str,
        category: Option<&str>,
        (index, group): (usize, usize),
        seed: u64,
        (model, tokenizer): (&str, &str),
        (temperature, ranking): (f64, &str),
        decode: &dyn Fn(&[u32]) -> String,
    ) -> Self {
        TrajectoryRecord {
            qid: qid.into(),
            user: user.into(),
            request: request.into(),
            category: category.map(str::to_string),
            index,
            group,
            seed,
            model: model.into(),
            tokenizer: tokenizer.into(),
            temperature,
            mode: t
                .answer
                .trace
                .mode
                .map_or("none", mrrec_agent::assistant::Mode::name)
                .into(),
            rewards: t.rewards.clone(),
            ranking: ranking.into(),
            greedy_calls: t.greedy_calls,
            fallback: t.answer.trace.fallback,
            memory_calls_ok: t.answer.trace.memory_calls_ok(),
            // A server's calls are text only: each output of the trace, without ids.
            calls: if t.segments.is_empty() {
                t.answer
                    .trace
                    .outputs
                    .iter()
                    .map(|o| CallRecord {
                        prompt: Vec::new(),
                        ids: Vec::new(),
                        logprobs: Vec::new(),
                        constrained: Vec::new(),
                        constraint: None,
                        text: o.clone(),
                    })
                    .collect()
            } else {
                t.segments
                    .iter()
                    .map(|s| CallRecord {
                        prompt: s.prompt.clone(),
                        ids: s.ids.clone(),
                        logprobs: s.logprobs.clone(),
                        constrained: s.masks.iter().map(Option::is_some).collect(),
                        constraint: s.constraint.clone(),
                        text: decode(&s.ids),
                    })
                    .collect()
            },
            reported_tokens: t.segments.is_empty().then(|| {
                let u = &t.answer.trace.usage;
                [u.prompt_tokens, u.completion_tokens]
            }),
            free_form: match t.answer.trace.mode {
                Some(mrrec_agent::assistant::Mode::Guided) => {
                    mrrec_agent::assistant::free_conversation(&t.answer.trace).unwrap_or_default()
                }
                _ => Vec::new(),
            },
        }
    }

    /// Prompt tokens and sampled tokens over its calls.
    pub fn tokens(&self) -> (usize, usize) {
        if let Some([i, o]) = self.reported_tokens {
            return (i as usize, o as usize);
        }
        self.calls
            .iter()
            .fold((0, 0), |(i, o), c| (i + c.prompt.len(), o + c.ids.len()))
    }
}

/// What a rollouts file held when opened.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reopened {
    /// Complete groups, by query id: their records in index order.
    pub groups: BTreeMap<String, Vec<TrajectoryRecord>>,
    /// Lines dropped (a torn last line, an incomplete group's lines).
    pub dropped_lines: usize,
}

/// A rollouts file (JSONL), appended a group at a time.
pub struct RolloutsFile {
    path: PathBuf,
}

impl RolloutsFile {
    /// Opens (or creates) `path` for trajectories of groups of `group`: reads back its complete
    /// groups and rewrites it without what a killed run left half-written. A line that is not a
    /// record anywhere but at the end, or a record of another group size, is an error naming the
    /// line (the file is not ours to rewrite).
    pub fn open(path: &Path, group: usize) -> Result<(Self, Reopened)> {
        let mut out = Reopened::default();
        // A new file's folder is made now, before any sampling (not at the first append).
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let lines: Vec<&str> = text.lines().collect();
        let torn_end = !text.is_empty() && !text.ends_with('\n');
        let mut by_qid: BTreeMap<String, Vec<TrajectoryRecord>> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let last = i + 1 == lines.len();
            match serde_json::from_str::<TrajectoryRecord>(line) {
                Ok(r) if !(last && torn_end) => {
                    if r.group != group {
                        return Err(TrainError::Invalid(format!(
                            "{}:{}: a trajectory of a group of {}, not {group}: use another --out or --group {}",
                            path.display(),
                            i + 1,
                            r.group,
                            r.group
                        )));
                    }
                    if !by_qid.contains_key(&r.qid) {
                        order.push(r.qid.clone());
                    }
                    by_qid.entry(r.qid.clone()).or_default().push(r);
                }
                _ if last => out.dropped_lines += 1,
                Err(e) => {
                    return Err(TrainError::Invalid(format!(
                        "{}:{}: not a trajectory record: {e}",
                        path.display(),
                        i + 1
                    )))
                }
                Ok(_) => unreachable!("a parsed non-last line"),
            }
        }
        let mut kept = String::new();
        for qid in order {
            let mut rs = by_qid.remove(&qid).unwrap_or_default();
            rs.sort_by_key(|r| r.index);
            let complete = rs.len() == group && rs.iter().enumerate().all(|(i, r)| r.index == i);
            if !complete {
                out.dropped_lines += rs.len();
                continue;
            }
            for r in &rs {
                kept.push_str(&serde_json::to_string(r)?);
                kept.push('\n');
            }
            out.groups.insert(qid, rs);
        }
        if out.dropped_lines > 0 {
            let tmp = path.with_extension("jsonl.tmp");
            std::fs::write(&tmp, kept).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
        }
        Ok((
            RolloutsFile {
                path: path.to_path_buf(),
            },
            out,
        ))
    }

    /// Appends a group's records and syncs the file.
    pub fn append(&self, records: &[TrajectoryRecord]) -> Result<()> {
        let mut text = String::new();
        for r in records {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_data())
            .with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }
}

/// A stable per-query seed: FNV-1a of the query id, mixed with the run's seed, so a query samples
/// the same trajectories whatever subset or order it is drawn in.
pub fn query_seed(seed: u64, qid: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in qid.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Summary of a set of groups: what selection and training can expect from them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RolloutsSummary {
    /// Groups.
    pub groups: usize,
    /// Trajectories.
    pub trajectories: usize,
    /// Mean total reward.
    pub mean_reward: f64,
    /// Share of trajectories with a parsed profile (R_format = 1).
    pub parsed: f64,
    /// Share of trajectories whose target ranked within the reward's depth (R_rec > 0).
    pub rec_nonzero: f64,
    /// Share of groups where no trajectory earned R_rec > 0 (no ranking signal at all).
    pub groups_rec_zero: f64,
    /// Share of groups whose totals are all equal (GRPO learns nothing from them).
    pub groups_flat: f64,
    /// Prompt tokens and sampled tokens.
    pub tokens_in: usize,
    /// Sampled tokens.
    pub tokens_out: usize,
}

/// The summary of `groups`.
pub fn summarise<'a>(groups: impl IntoIterator<Item = &'a [TrajectoryRecord]>) -> RolloutsSummary {
    let mut s = RolloutsSummary::default();
    let (mut reward, mut parsed, mut rec) = (0.0, 0usize, 0usize);
    let (mut zero, mut flat) = (0usize, 0usize);
    for g in groups {
        s.groups += 1;
        for r in g {
            s.trajectories += 1;
            reward += r.rewards.total;
            parsed += usize::from(r.rewards.format > 0.0);
            rec += usize::from(r.rewards.rec > 0.0);
            let (i, o) = r.tokens();
            s.tokens_in += i;
            s.tokens_out += o;
        }
        zero += usize::from(g.iter().all(|r| r.rewards.rec <= 0.0));
        flat += usize::from(
            g.windows(2)
                .all(|w| w[0].rewards.total == w[1].rewards.total),
        );
    }
    let n = s.trajectories.max(1) as f64;
    let gn = s.groups.max(1) as f64;
    s.mean_reward = reward / n;
    s.parsed = parsed as f64 / n;
    s.rec_nonzero = rec as f64 / n;
    s.groups_rec_zero = zero as f64 / gn;
    s.groups_flat = flat as f64 / gn;
    s
}

/// The letters of `text` from a Unicode block (128 code points beyond Latin) that `context`
/// never uses: the tail tokens a small model samples at temperature 1 (measured on the 0.5B's
/// `train` rollouts: 12% of sampled profiles of English requests carry Chinese or Korean
/// characters, e.g. "White fountain pen 표정 ink"). Language-neutral: a request in Chinese
/// makes Chinese letters its own.
pub fn foreign_letters(text: &str, context: &str) -> usize {
    let block = |c: char| c as u32 >> 7;
    let beyond_latin = |c: &char| c.is_alphabetic() && (*c as u32) > 0x24F;
    let known: std::collections::HashSet<u32> =
        context.chars().filter(beyond_latin).map(block).collect();
    text.chars()
        .filter(beyond_latin)
        .filter(|c| !known.contains(&block(*c)))
        .count()
}

/// A sampled answer not worth imitating whatever its reward: its profile writes letters from a
/// script that neither the request nor anything the model was shown (the free form's turns:
/// memories, aspects) uses ([`foreign_letters`]).
pub fn degenerate(r: &TrajectoryRecord) -> bool {
    let Some(profile) = r.rewards.profile.as_deref() else {
        return false;
    };
    let mut context = r.request.clone();
    for m in &r.free_form {
        if m.role != mrrec_llm::Role::Assistant {
            context.push('\n');
            context.push_str(&m.content);
        }
    }
    foreign_letters(profile, &context) > 0
}

/// Rejection sampling: per group (in query-id order) the trajectory with the highest total reward
/// — the lowest index among ties — among those not [`degenerate`], kept when it has a parsed
/// profile and beats `baseline` of its query (the greedy answer's reward; a query without one
/// keeps its best when it earned any R_rec). Deterministic: the same file and baselines select
/// the same trajectories.
pub fn select_best<'a>(
    groups: &'a BTreeMap<String, Vec<TrajectoryRecord>>,
    baseline: &dyn Fn(&str) -> Option<f64>,
) -> Vec<&'a TrajectoryRecord> {
    groups
        .iter()
        .filter_map(|(qid, g)| {
            let best = g.iter().filter(|r| !degenerate(r)).reduce(|a, b| {
                if b.rewards.total > a.rewards.total {
                    b
                } else {
                    a
                }
            })?;
            let beats = match baseline(qid) {
                Some(b) => best.rewards.total > b,
                None => best.rewards.rec > 0.0,
            };
            (best.rewards.format > 0.0 && beats).then_some(best)
        })
        .collect()
}

/// The allowed sets of a call's ids under its constraint, replayed
/// ([`mrrec_llm_local::LocalModel::constraint_masks`]).
pub type Replay<'a> =
    dyn Fn(&mrrec_llm::Constraint, &[u32]) -> Result<Vec<mrrec_llm_local::TokenSet>> + 'a;

/// The model-written part of a record's sampled calls as [`mrrec_llm_local::Segment`]s for the
/// loss ([`learnable`]): prompt ids (never trained on), sampled ids, their recorded
/// log-probabilities, and — for a call recorded with its constraint — the allowed set of each
/// id, replayed by `replay`, so that the loss renormalises over what the constraint allowed,
/// as sampling did (a call recorded without one is learnt under the whole vocabulary). Also
/// returns how many learnt calls had no constraint recorded although a constraint restricted
/// them (files written before constraints were recorded).
pub fn segments_of(
    r: &TrajectoryRecord,
    replay: &Replay<'_>,
) -> Result<(Vec<mrrec_llm_local::Segment>, usize)> {
    let mut unreplayed = 0;
    let segments = learnt(r.calls.iter().enumerate(), r.greedy_calls, |(_, c)| &c.ids)
        .map(|(i, c)| {
            let masks = match &c.constraint {
                Some(k) => replay(k, &c.ids)
                    .map_err(|e| {
                        TrainError::Invalid(format!(
                            "query {} trajectory {} call {}: its ids under its recorded constraint: {e}",
                            r.qid, r.index, i + 1
                        ))
                    })?
                    .into_iter()
                    .map(Some)
                    .collect(),
                None => {
                    unreplayed += usize::from(c.constrained.iter().any(|&b| b));
                    vec![None; c.ids.len()]
                }
            };
            Ok(mrrec_llm_local::Segment {
                prompt: c.prompt.clone(),
                ids: c.ids.clone(),
                logprobs: c.logprobs.clone(),
                masks,
                constraint: c.constraint.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((segments, unreplayed))
}

/// What supervised fine-tuning learns of a trajectory's calls: those after its `greedy_calls`
/// leading ones (the model's own greedy answer, which the selection did not choose among:
/// context only) that wrote anything, each with its masks (a constrained call's tokens are
/// learnt renormalised over the allowed sets, as they were sampled).
pub fn learnable(
    calls: impl IntoIterator<Item = mrrec_llm_local::Segment>,
    greedy_calls: usize,
) -> Vec<mrrec_llm_local::Segment> {
    learnt(calls, greedy_calls, |s| &s.ids).collect()
}

/// The one rule of [`learnable`] over any form of a call (`ids`: what it wrote); GRPO's loss
/// reads the same calls of a rollout.
pub(crate) fn learnt<T>(
    calls: impl IntoIterator<Item = T>,
    greedy_calls: usize,
    ids: impl Fn(&T) -> &[u32],
) -> impl Iterator<Item = T> {
    calls
        .into_iter()
        .skip(greedy_calls)
        .filter(move |c| !ids(c).is_empty())
}

/// A record's [`TrajectoryRecord::free_form`] turns as [`mrrec_llm_local::Segment`]s for the
/// loss, re-tokenised from text with `model`'s own template and tokenizer (so a teacher with
/// another tokenizer can train it): per assistant turn, the prompt is the turns before it
/// rendered as the free loop renders them (generation prompt included) — system, user and tool
/// turns are never trained on — and the ids are the turn's text, followed on the last turn by the
/// template's end of turn (the free loop stops the others at `</tool_call>`). Empty when the
/// record has no free form. The segments' `logprobs` are zeros (re-tokenised text was never
/// sampled): supervised fine-tuning recomputes them from the policy and never reads these; they
/// are not for GRPO, whose ratio needs the sampling log-probabilities.
pub fn free_segments(
    r: &TrajectoryRecord,
    model: &mrrec_llm_local::LocalModel,
) -> Result<Vec<mrrec_llm_local::Segment>> {
    let info = model.info();
    let end = ["<|im_end|>", "<|eot_id|>", "<|end|>"]
        .iter()
        .filter_map(|t| info.tokenizer.token_to_id(t))
        .find(|id| info.stop_ids.contains(id))
        .or_else(|| info.stop_ids.first().copied());
    let last = r
        .free_form
        .iter()
        .rposition(|m| m.role == mrrec_llm::Role::Assistant);
    let mut out = Vec::new();
    for (i, m) in r.free_form.iter().enumerate() {
        if m.role != mrrec_llm::Role::Assistant {
            continue;
        }
        let req = mrrec_llm::ChatRequest {
            messages: r.free_form[..i].to_vec(),
            ..Default::default()
        };
        let prompt = model
            .prompt(&req)
            .and_then(|p| info.encode(&p))
            .map_err(|e| TrainError::Invalid(format!("query {}: {e}", r.qid)))?;
        let mut ids = encode_plain(info, &m.content)
            .map_err(|e| TrainError::Invalid(format!("query {}: {e}", r.qid)))?;
        if Some(i) == last {
            ids.extend(end);
        }
        out.push(mrrec_llm_local::Segment {
            prompt,
            logprobs: vec![0.0; ids.len()],
            masks: vec![None; ids.len()],
            constraint: None,
            ids,
        });
    }
    Ok(out)
}

/// `text` as ids, with every added token of the tokenizer that appears in it (Qwen's
/// `<tool_call>` and `</tool_call>`, or a chat-template token inside a model's text) spelled with
/// ordinary tokens — its first character, then the rest — so that the same text decodes back
/// but a model learns to write the tags with tokens it knows. Measured: the 0.5B distilled with
/// `<tool_call>` as Qwen's added token wrote `<|im_start|>` or `cbd` in its place on every `val`
/// query (its rarely trained row of the tied embedding loses to neighbours), so no call parsed.
pub fn encode_plain(
    info: &mrrec_llm_local::GgufInfo,
    text: &str,
) -> std::result::Result<Vec<u32>, mrrec_llm_local::LocalError> {
    let added: Vec<String> = info
        .tokenizer
        .get_added_tokens_decoder()
        .into_values()
        .map(|t| t.content)
        .filter(|c| c.chars().count() > 1 && text.contains(c.as_str()))
        .collect();
    let mut ids = Vec::new();
    let mut rest = text;
    loop {
        // The earliest added token in what is left (the longest where two start together).
        let next = added
            .iter()
            .filter_map(|a| rest.find(a.as_str()).map(|p| (p, a)))
            .min_by_key(|(p, a)| (*p, std::cmp::Reverse(a.len())));
        let Some((p, a)) = next else {
            ids.extend(info.encode(rest)?);
            return Ok(ids);
        };
        let cut = a.chars().next().map_or(0, char::len_utf8);
        for piece in [&rest[..p], &a[..cut], &a[cut..]] {
            ids.extend(info.encode(piece)?);
        }
        rest = &rest[p + a.len()..];
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(qid: &str, index: usize, group: usize, total: f64) -> TrajectoryRecord {
        TrajectoryRecord {
            qid: qid.into(),
            user: "u1".into(),
            request: "a warm scarf".into(),
            category: None,
            index,
            group,
            seed: 7,
            model: "m".into(),
            tokenizer: "t".into(),
            temperature: 1.0,
            mode: "guided".into(),
            rewards: Rewards {
                format: 1.0,
                rec: total,
                mem: 0.0,
                total,
                target_rank: None,
                profile: Some("a scarf".into()),
            },
            ranking: paper_ranking(),
            greedy_calls: 0,
            fallback: false,
            memory_calls_ok: 1,
            calls: vec![CallRecord {
                prompt: vec![1, 2, 3],
                ids: vec![4, 5],
                logprobs: vec![-0.5, -1.0],
                constrained: vec![true, false],
                constraint: None,
                text: "hi".into(),
            }],
            free_form: Vec::new(),
            reported_tokens: None,
        }
    }

    #[test]
    fn a_reopened_file_keeps_complete_groups_and_drops_what_a_kill_left() {
        let dir = tempfile::tempdir().unwrap();
        // The folder of a new file is made on opening.
        let path = dir.path().join("runs/r.jsonl");
        let (f, first) = RolloutsFile::open(&path, 2).unwrap();
        assert!(path.parent().unwrap().is_dir());
        assert_eq!(first, Reopened::default());
        let a = [record("q1", 0, 2, 0.0), record("q1", 1, 2, 1.0)];
        f.append(&a).unwrap();
        // A killed run: one line of the next group, and half of a third line.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&serde_json::to_string(&record("q2", 0, 2, 0.5)).unwrap());
        text.push('\n');
        let torn = serde_json::to_string(&record("q2", 1, 2, 0.5)).unwrap();
        text.push_str(&torn[..torn.len() / 2]);
        std::fs::write(&path, text).unwrap();
        let (f, again) = RolloutsFile::open(&path, 2).unwrap();
        assert_eq!(again.dropped_lines, 2);
        assert_eq!(again.groups.len(), 1);
        assert_eq!(again.groups["q1"], a.to_vec());
        // The file now holds exactly the complete group; appending continues it.
        f.append(&[record("q2", 0, 2, 0.5), record("q2", 1, 2, 0.5)])
            .unwrap();
        let (_, last) = RolloutsFile::open(&path, 2).unwrap();
        assert_eq!((last.groups.len(), last.dropped_lines), (2, 0));
        // Another group size, or a broken line in the middle, is an error naming the line.
        let e = RolloutsFile::open(&path, 3).err().unwrap().to_string();
        assert!(e.contains("r.jsonl:1") && e.contains("group of 2"), "{e}");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.insert_str(0, "{not json}\n");
        std::fs::write(&path, text).unwrap();
        let e = RolloutsFile::open(&path, 2).err().unwrap().to_string();
        assert!(e.contains("r.jsonl:1: not a trajectory record"), "{e}");
    }

    #[test]
    fn the_summary_counts_groups_without_signal() {
        let g1 = vec![record("q1", 0, 2, 0.0), record("q1", 1, 2, 0.0)];
        let g2 = vec![record("q2", 0, 2, 0.0), record("q2", 1, 2, 2.0)];
        let s = summarise([g1.as_slice(), g2.as_slice()]);
        assert_eq!((s.groups, s.trajectories), (2, 4));
        assert_eq!((s.groups_rec_zero, s.groups_flat), (0.5, 0.5));
        assert_eq!((s.rec_nonzero, s.mean_reward), (0.25, 0.5));
        assert_eq!((s.tokens_in, s.tokens_out), (12, 8));
    }

    #[test]
    fn selection_keeps_the_best_of_a_group_when_it_beats_the_greedy_answer() {
        let mut groups = BTreeMap::new();
        groups.insert(
            "q1".to_string(),
            vec![
                record("q1", 0, 3, 0.5),
                record("q1", 1, 3, 2.0),
                record("q1", 2, 3, 2.0),
            ],
        );
        groups.insert("q2".to_string(), vec![record("q2", 0, 1, 0.3)]);
        groups.insert("q3".to_string(), vec![record("q3", 0, 1, 0.0)]);
        let greedy = |q: &str| match q {
            "q1" => Some(1.0),
            "q2" => Some(0.3),
            _ => None,
        };
        let kept = select_best(&groups, &greedy);
        // q1: the first of the two best; q2 ties the greedy answer; q3 earned no R_rec.
        assert_eq!(kept.len(), 1);
        assert_eq!((kept[0].qid.as_str(), kept[0].index), ("q1", 1));
        assert_eq!(select_best(&groups, &greedy), kept);
        let never = |_: &mrrec_llm::Constraint, _: &[u32]| -> Result<Vec<_>> {
            panic!("no call of these records carries its constraint")
        };
        // The call was constrained but its constraint was not recorded (an older file): learnt
        // under the whole vocabulary, and counted.
        let (segs, unreplayed) = segments_of(kept[0], &never).unwrap();
        assert_eq!(segs.len(), 1);
        assert_eq!(unreplayed, 1);
        assert_eq!((segs[0].prompt.len(), segs[0].ids.len()), (3, 2));
        assert!(segs[0].masks.iter().all(Option::is_none));
        // A record whose first call was decoded greedily learns only the calls after it; an
        // older line without the field reads as all sampled.
        let mut two = kept[0].clone();
        two.calls.push(CallRecord {
            prompt: vec![1, 2, 3, 4, 5],
            ids: vec![6, 7, 8],
            logprobs: vec![-0.1; 3],
            constrained: vec![true; 3],
            constraint: Some(mrrec_llm::Constraint::Regex("yes".into())),
            text: "yes".into(),
        });
        // A call with its constraint recorded learns each id over the set replayed for it.
        let replay = |c: &mrrec_llm::Constraint, ids: &[u32]| -> Result<Vec<_>> {
            assert_eq!(c, &mrrec_llm::Constraint::Regex("yes".into()));
            Ok(ids
                .iter()
                .map(|&id| mrrec_llm_local::TokenSet::from_fn(10, |t| t == id || t == 9))
                .collect())
        };
        let (segs, unreplayed) = segments_of(&two, &replay).unwrap();
        assert_eq!((segs.len(), unreplayed), (2, 1));
        assert!(segs[1]
            .masks
            .iter()
            .all(|m| m.as_ref().is_some_and(|m| m.count() == 2)));
        assert!(segs[1].masks[0].as_ref().unwrap().contains(6));
        // A replay that fails names the query, trajectory and call.
        let refuse = |_: &mrrec_llm::Constraint, _: &[u32]| -> Result<Vec<_>> {
            Err(TrainError::Invalid("token 0 is not allowed".into()))
        };
        let e = segments_of(&two, &refuse).err().unwrap().to_string();
        assert!(
            e.contains("query q1 trajectory 1 call 2") && e.contains("not allowed"),
            "{e}"
        );
        two.greedy_calls = 1;
        // The greedy call is context only: neither learnt nor replayed.
        let (segs, unreplayed) = segments_of(&two, &replay).unwrap();
        assert_eq!((segs.len(), unreplayed), (1, 0));
        assert_eq!(segs[0].ids, vec![6, 7, 8]);
        assert!(segments_of(&two, &refuse).is_err());
        let line = serde_json::to_value(&two).unwrap();
        assert_eq!(line["greedy_calls"], 1);
        assert!(line["calls"][0].get("constraint").is_none());
        assert_eq!(line["calls"][1]["constraint"]["regex"], "yes");
        let back: TrajectoryRecord = serde_json::from_value(line).unwrap();
        assert_eq!(back, two);
        let mut old = serde_json::to_value(kept[0]).unwrap();
        assert!(old.get("greedy_calls").is_none());
        old.as_object_mut().unwrap().remove("greedy_calls");
        let old: TrajectoryRecord = serde_json::from_value(old).unwrap();
        assert_eq!(old.greedy_calls, 0);
    }

    #[test]
    fn samples_in_a_script_nobody_used_are_never_chosen() {
        assert_eq!(
            foreign_letters("White fountain pen 표정 ink", "a fountain pen"),
            2
        );
        assert_eq!(foreign_letters("Café crème, naïve", "coffee"), 0, "Latin");
        assert_eq!(
            foreign_letters("一个保温杯", "推荐一个保温杯"),
            0,
            "the request's script"
        );
        assert_eq!(
            foreign_letters("Kids' kit — 10 × 12 cm", ""),
            0,
            "no letters"
        );
        let mut groups = BTreeMap::new();
        let mut bad = record("q1", 1, 2, 3.0);
        bad.rewards.profile = Some("Scarf 刺绣 pattern".into());
        groups.insert("q1".to_string(), vec![record("q1", 0, 2, 2.0), bad.clone()]);
        let kept = select_best(&groups, &|_| Some(1.0));
        assert_eq!(kept.len(), 1);
        assert_eq!(
            kept[0].index, 0,
            "the best clean sample, not the degenerate one"
        );
        // A memory in that script, shown to the model, makes it the model's to use.
        bad.free_form = vec![mrrec_llm::Message::user("<memory>刺绣 scarf</memory>")];
        assert!(!degenerate(&bad));
        groups.insert("q1".to_string(), vec![record("q1", 0, 2, 2.0), bad]);
        assert_eq!(select_best(&groups, &|_| Some(1.0))[0].index, 1);
    }

    #[test]
    fn query_seeds_are_stable_and_differ_by_query_and_run() {
        assert_eq!(query_seed(42, "q1"), query_seed(42, "q1"));
        assert_ne!(query_seed(42, "q1"), query_seed(42, "q2"));
        assert_ne!(query_seed(42, "q1"), query_seed(43, "q1"));
    }
}
