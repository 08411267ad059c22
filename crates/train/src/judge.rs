//! Training data for the re-ranking stage's judge (`mrrec train --judge`): per `train` query, the
//! judge's question about its target and about `negatives` other items of the request's hybrid
//! top `depth` (a seeded choice), asked exactly as the stage asks at answer time
//! ([`mrrec_agent::rerank::judge_request`], the same memory), each answer learnt as one token
//! renormalised over the two answers — the binary cross-entropy of the judge's score
//! log P(`Yes`) − log P(`No`). The labels are the query's own (target `Yes`, the others `No`), or —
//! distillation — a teacher judge's: each item's label is the teacher's P(`Yes`) over the two
//! answers (a soft label, [`SftExample::soft`]).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::trainer::{Sft, SftExample};
use crate::{Result, TrainError};
use mrrec_agent::rerank::{judge, judge_request, RerankParams};
use mrrec_data::LabeledQuery;

/// What the judge learns from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JudgeData {
    /// The stage the judge serves: the depth its negatives come from and the memory it reads.
    pub stage: RerankParams,
    /// Negatives per query (items of the request's top `depth` that are not its target).
    pub negatives: usize,
    /// Seed of the negatives' choice.
    pub seed: u64,
    /// What seeds each query's choice besides [`JudgeData::seed`]. Always written, so a run
    /// begun before it existed (seeded by the query's id) is not resumed on other lists.
    #[serde(default)]
    pub negatives_by: NegativesSeed,
    /// The teacher judge whose scores are the labels (its model id), `None`: the query's own.
    /// [`judge_examples`] sets it from the teacher it is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<String>,
    /// Learn each query's items as one list ([`crate::grpo::listwise_soft_loss`]: the order of
    /// the labels' scores within the query) instead of each item's label on its own. The labels
    /// are the teacher's P(`Yes`), or without a teacher 1 for the target and 0 for the others.
    /// Written only when set, so earlier runs keep their identity.
    #[serde(default, skip_serializing_if = "crate::trajectories::is_false")]
    pub listwise: bool,
    /// With a teacher and [`JudgeData::listwise`]: the weight α of the query's own answer (its
    /// target) mixed into each list's labels ([`crate::grpo::listwise_mixed_loss`]: the teacher's
    /// order with 1 − α, the target with α). 0: the teacher's alone. Written only when set.
    #[serde(default, skip_serializing_if = "crate::trajectories::is_zero")]
    pub target_weight: f64,
    /// Each list of the data's own requests — not written by `derive-queries` from a purchase
    /// (its user is not a snapshot, [`mrrec_data::derive::snapshot_of`]) — is learnt this many
    /// times per epoch, the derived ones once: a judge's gain shows on real requests, whose
    /// words are further from the catalogue's than a model's (BENCHMARKS, session 38). 1 (or 0):
    /// every list once. Written only when above 1.
    #[serde(default, skip_serializing_if = "at_most_once")]
    pub own_repeat: usize,
}

/// [`JudgeData::own_repeat`] learns every list once.
fn at_most_once(n: &usize) -> bool {
    *n <= 1
}

/// The examples in order, each of an own request (`true`) `repeat` times in a row, the others
/// once. The trainer's seeded shuffle spreads the copies over the epoch.
fn with_own_repeated(examples: Vec<(SftExample, bool)>, repeat: usize) -> Vec<SftExample> {
    let mut out = Vec::with_capacity(examples.len());
    for (e, own) in examples {
        for _ in 1..if own { repeat } else { 1 } {
            out.push(e.clone());
        }
        out.push(e);
    }
    out
}

/// What seeds a query's choice of negatives, with [`JudgeData::seed`]. It matters only when
/// the request's top `depth` holds more non-targets than `negatives` (its target outside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NegativesSeed {
    /// The query's id (runs written before the question was used): a data set written again
    /// numbers its requests anew, so the same request drew other negatives under another id,
    /// and its teacher scores were asked again.
    #[default]
    QueryId,
    /// The question asked ([`question_key`]: request, category, memory): the same request draws
    /// the same negatives under any id — in a data set derived again, or in a cross-validation
    /// fold's data set — so its teacher scores are reused and its list is the same list.
    Question,
}

/// A judge whose scores become the labels.
pub struct Teacher<'a> {
    /// The teacher (any model that scores answers: a local model, an adapter, a server with
    /// log-probabilities).
    pub model: &'a dyn mrrec_llm::ChatModel,
    /// Where its scores are kept (a line per query, appended as they are computed), so that a
    /// resumed run or a second student reuses them instead of asking again.
    pub scores: Option<PathBuf>,
    /// Other runs' kept scores, read only (each must exist): a list found there is not asked
    /// again, and is copied into `scores`, so this run's own file holds every list it learnt.
    pub also: Vec<PathBuf>,
}

/// One query's teacher scores as kept on disk.
#[derive(serde::Serialize, serde::Deserialize)]
struct TeacherLine {
    teacher: String,
    qid: String,
    /// [`question_key`] of what the teacher read besides the items (absent in lines written
    /// before it was recorded: those are found by `qid` alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    question: Option<String>,
    items: Vec<String>,
    scores: Vec<f32>,
}

/// What a teacher's score of an item depends on besides the item — the request, its category
/// and the memory the judge reads — as a sha256 hex digest. Kept scores are found by it, not by
/// the query's id: a derived data set written again numbers its requests anew (`d-45` may name
/// another request), and the same request under another id is the same question.
fn question_key(request: &str, category: Option<&str>, memory: Option<&str>) -> String {
    use sha2::Digest;
    // The parts as one JSON array: where each ends and which are absent is unambiguous.
    let parts = serde_json::json!([request, category, memory]).to_string();
    hex::encode(sha2::Sha256::digest(parts.as_bytes()))
}

/// Kept scores per question (`q:` + [`question_key`]; `id:` + query id for lines without one)
/// and item.
type Kept = HashMap<String, HashMap<String, f32>>;

/// The kept scores of every item of `items` for this question (or, from lines without a
/// question, this query id), or `None` when one is missing.
fn kept_for(kept: &Kept, question: &str, qid: &str, items: &[String]) -> Option<Vec<f32>> {
    let all = |k: &HashMap<String, f32>| items.iter().map(|i| k.get(i).copied()).collect();
    kept.get(&format!("q:{question}"))
        .and_then(all)
        .or_else(|| kept.get(&format!("id:{qid}")).and_then(all))
}

/// The scores kept at `path` by `teacher`, per question and item (other teachers' lines are
/// ignored; a line that does not parse is an error naming it). An item's score does not depend
/// on the other items judged with it, so a run with other negatives reuses what it can.
fn kept_scores(path: &std::path::Path, teacher: &str) -> Result<Kept> {
    let mut out: Kept = HashMap::new();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(TrainError::Invalid(format!(
                "reading {}: {e}",
                path.display()
            )))
        }
    };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: TeacherLine = serde_json::from_str(line)
            .map_err(|e| TrainError::Invalid(format!("{} line {}: {e}", path.display(), i + 1)))?;
        if l.items.len() != l.scores.len() {
            return Err(TrainError::Invalid(format!(
                "{} line {}: {} items, {} scores",
                path.display(),
                i + 1,
                l.items.len(),
                l.scores.len()
            )));
        }
        if l.teacher == teacher {
            let key = match l.question {
                Some(q) => format!("q:{q}"),
                None => format!("id:{}", l.qid),
            };
            out.entry(key)
                .or_default()
                .extend(l.items.into_iter().zip(l.scores));
        }
    }
    Ok(out)
}

/// The logistic function: a score log P(`Yes`) − log P(`No`) as P(`Yes`) over the two answers.
pub fn yes_probability(score: f32) -> f32 {
    1.0 / (1.0 + (-score).exp())
}

/// The judge's examples for `queries` (`train` rows: their targets are the labels, unless a
/// `teacher` gives them), one [`SftExample`] per query — its target's question first, then the
/// negatives'. A query whose target is not in the catalogue is skipped and counted in the
/// source's `skipped`.
pub fn judge_examples(
    ws: &mrrec_agent::Workspace,
    store: &dyn mrrec_memory::MemoryRead,
    tenant: &str,
    local: &mrrec_llm_local::LocalModel,
    queries: &[&LabeledQuery],
    data: &JudgeData,
    teacher: Option<&Teacher<'_>>,
) -> Result<Sft> {
    let shop = ws.shop();
    let answer = |s: &str| -> Result<u32> {
        local.info().encode(s)?.first().copied().ok_or_else(|| {
            TrainError::Invalid(format!("the answer {s:?} has no token in this model"))
        })
    };
    let (yes, no) = (answer("Yes")?, answer("No")?);
    let n_vocab = local.transformer().n_vocab;
    let two = mrrec_llm_local::TokenSet::from_fn(n_vocab, |t| t == yes || t == no);
    let teacher_id = teacher.map(|t| t.model.id().to_string());
    // The teacher is named by the model given (recorded with the data, so a resume with
    // another teacher is refused).
    let data = &JudgeData {
        teacher: teacher_id.clone(),
        ..data.clone()
    };
    let kept = match (teacher, &teacher_id) {
        (
            Some(Teacher {
                scores: Some(p), ..
            }),
            Some(id),
        ) => kept_scores(p, id)?,
        _ => HashMap::new(),
    };
    // Another run's file is named on purpose: one that is not there is an error, not nothing.
    let mut elsewhere: Kept = HashMap::new();
    if let (Some(t), Some(id)) = (teacher, &teacher_id) {
        for p in &t.also {
            if !p.is_file() {
                return Err(TrainError::Invalid(format!(
                    "the teacher's kept scores {}: no such file",
                    p.display()
                )));
            }
            // Lines without a question are found by query id, which names the same request only
            // within its own run's data: those are not read from another run.
            for (question, items) in kept_scores(p, id)? {
                if question.starts_with("q:") {
                    elsewhere.entry(question).or_default().extend(items);
                }
            }
        }
    }
    let mut examples = Vec::with_capacity(queries.len());
    let (mut skipped, mut in_top, mut calls, mut reused) = (0usize, 0usize, 0usize, 0usize);
    let mut usage = mrrec_llm::Usage::default();
    let t0 = std::time::Instant::now();
    for (qi, q) in queries.iter().enumerate() {
        let query = q.query();
        let Some(target) = ws.catalogue().position(q.target()) else {
            skipped += 1;
            continue;
        };
        let request = query.simple_query.as_deref().unwrap_or(&query.query);
        let top: Vec<u32> = shop
            .search_hybrid(request, data.stage.depth)?
            .into_iter()
            .map(|h| h.item)
            .collect();
        in_top += usize::from(top.contains(&target));
        let mut others: Vec<u32> = top.into_iter().filter(|&i| i != target).collect();
        let memory = data.stage.memory.read(&shop, store, tenant, query)?;
        let question = question_key(request, query.category.as_deref(), memory.as_deref());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(crate::trajectories::query_seed(
            data.seed,
            match data.negatives_by {
                NegativesSeed::QueryId => &query.qid,
                NegativesSeed::Question => &question,
            },
        ));
        others.shuffle(&mut rng);
        others.truncate(data.negatives);
        let items: Vec<u32> = std::iter::once(target).chain(others).collect();
        let text = |i: u32| ws.catalogue().get(i).map_or("", |it| it.text.as_str());
        // Soft labels: the teacher's P(`Yes`) of each item, asked as the stage asks.
        let soft = match (teacher, &teacher_id) {
            (Some(t), Some(id)) => {
                let ids: Vec<String> = items
                    .iter()
                    .map(|&i| {
                        ws.catalogue()
                            .get(i)
                            .map_or(String::new(), |it| it.id.clone())
                    })
                    .collect();
                let keep = |scores: &[f32]| -> Result<()> {
                    let Some(p) = &t.scores else { return Ok(()) };
                    let line = serde_json::to_string(&TeacherLine {
                        teacher: id.clone(),
                        qid: query.qid.clone(),
                        question: Some(question.clone()),
                        items: ids.clone(),
                        scores: scores.to_vec(),
                    })?;
                    let mut f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .map_err(|e| {
                            TrainError::Invalid(format!("writing {}: {e}", p.display()))
                        })?;
                    writeln!(f, "{line}")?;
                    Ok(())
                };
                let scores = if let Some(s) = kept_for(&kept, &question, &query.qid, &ids) {
                    reused += 1;
                    s
                } else if let Some(s) = kept_for(&elsewhere, &question, &query.qid, &ids) {
                    reused += 1;
                    keep(&s)?;
                    s
                } else {
                    let texts: Vec<&str> = items.iter().map(|&i| text(i)).collect();
                    let (scores, u) = judge(
                        t.model,
                        request,
                        query.category.as_deref(),
                        memory.as_deref(),
                        &texts,
                    )
                    .map_err(|e| {
                        TrainError::Invalid(format!("the teacher {id} on query {}: {e}", query.qid))
                    })?;
                    usage.add(&u);
                    keep(&scores)?;
                    scores
                };
                if (qi + 1) % 10 == 0 || qi + 1 == queries.len() {
                    eprintln!(
                        "teacher {id}: {}/{} queries ({reused} kept from before), {} tokens in, {:.0}s",
                        qi + 1,
                        queries.len(),
                        usage.prompt_tokens,
                        t0.elapsed().as_secs_f64()
                    );
                }
                Some(
                    scores
                        .into_iter()
                        .map(yes_probability)
                        .collect::<Vec<f32>>(),
                )
            }
            // A list without a teacher: the target is the one the shopper took.
            _ if data.listwise => Some(
                (0..items.len())
                    .map(|k| if k == 0 { 1.0 } else { 0.0 })
                    .collect(),
            ),
            _ => None,
        };
        let mut segments = Vec::with_capacity(items.len());
        for (k, &item) in items.iter().enumerate() {
            let req = judge_request(
                request,
                query.category.as_deref(),
                memory.as_deref(),
                text(item),
            );
            let prompt = local.info().encode(&local.prompt(&req)?)?;
            // With soft labels every item's learnt token is `Yes`: the loss weighs its
            // log-probability by the label and the other answer's by one minus it.
            let label = if soft.is_some() || k == 0 { yes } else { no };
            segments.push(mrrec_llm_local::Segment {
                prompt,
                ids: vec![label],
                logprobs: vec![0.0],
                masks: vec![Some(two.clone())],
                constraint: None,
            });
        }
        calls += segments.len();
        let own = mrrec_data::derive::snapshot_of(&query.user_id).is_none();
        examples.push((
            SftExample {
                qid: query.qid.clone(),
                segments,
                rewards: Default::default(),
                soft,
            },
            own,
        ));
    }
    let mut source = serde_json::json!({
        "judge": data,
        "prompt": mrrec_agent::rerank::RERANK_PROMPT_VERSION,
        "queries": examples.len(),
        "skipped": skipped,
        "target_in_top": in_top,
        "calls": calls,
    });
    if teacher.is_some() {
        let labels: Vec<f32> = examples
            .iter()
            .flat_map(|(e, _)| e.soft.iter().flatten().copied())
            .collect();
        let mean = labels.iter().sum::<f32>() / labels.len().max(1) as f32;
        let targets: Vec<f32> = examples
            .iter()
            .filter_map(|(e, _)| e.soft.as_ref()?.first().copied())
            .collect();
        source["teacher_mean_yes"] = serde_json::json!(mean);
        source["teacher_mean_yes_target"] =
            serde_json::json!(targets.iter().sum::<f32>() / targets.len().max(1) as f32);
        eprintln!(
            "teacher: {} queries scored ({reused} kept from before), {} tokens in, {:.0}s; mean P(Yes) {mean:.3}, of targets {:.3}",
            examples.len(),
            usage.prompt_tokens,
            t0.elapsed().as_secs_f64(),
            source["teacher_mean_yes_target"].as_f64().unwrap_or(0.0)
        );
    }
    // Repeated lists are learnt more often: `queries` counts each once, `kept` is what an
    // epoch holds.
    if data.own_repeat > 1 {
        let own = examples.iter().filter(|(_, own)| *own).count();
        source["own_lists"] = serde_json::json!(own);
        eprintln!(
            "{own} of {} lists are the data's own requests, each learnt {} times an epoch",
            examples.len(),
            data.own_repeat
        );
    }
    let examples = with_own_repeated(examples, data.own_repeat);
    source["kept"] = serde_json::json!(examples.len());
    Ok(Sft {
        examples,
        source,
        listwise: data.listwise,
        // The target is each list's first item (its question comes first, above); without a
        // teacher the labels are the target already, and mixing it in changes nothing.
        target_weight: data.target_weight,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn line(qid: &str, question: Option<&str>, items: &[&str], scores: &[f32]) -> String {
        serde_json::to_string(&TeacherLine {
            teacher: "t".into(),
            qid: qid.into(),
            question: question.map(String::from),
            items: items.iter().map(|s| s.to_string()).collect(),
            scores: scores.to_vec(),
        })
        .unwrap()
    }

    /// Own requests' lists are repeated in place, derived ones kept once; 0 and 1 repeat nothing.
    #[test]
    fn own_lists_are_repeated_and_derived_ones_kept_once() {
        let ex = |qid: &str| SftExample {
            qid: qid.into(),
            segments: Vec::new(),
            rewards: Default::default(),
            soft: None,
        };
        let all = || vec![(ex("a"), true), (ex("d-1"), false), (ex("b"), true)];
        let qids = |v: Vec<SftExample>| v.into_iter().map(|e| e.qid).collect::<Vec<_>>();
        assert_eq!(
            qids(with_own_repeated(all(), 3)),
            ["a", "a", "a", "d-1", "b", "b", "b"]
        );
        for once in [0, 1] {
            assert_eq!(qids(with_own_repeated(all(), once)), ["a", "d-1", "b"]);
        }
        // Not written when it repeats nothing: earlier runs' recipes stay what they were.
        let mut d = JudgeData {
            stage: RerankParams::default(),
            negatives: 3,
            seed: 1,
            negatives_by: NegativesSeed::Question,
            teacher: None,
            listwise: true,
            target_weight: 0.0,
            own_repeat: 1,
        };
        assert!(serde_json::to_value(&d)
            .unwrap()
            .get("own_repeat")
            .is_none());
        d.own_repeat = 2;
        assert_eq!(serde_json::to_value(&d).unwrap()["own_repeat"], 2);
    }

    /// Kept teacher scores are found by the question the teacher read, whatever the query's id
    /// is now (a derived data set written again renumbers its requests), never by an id that now
    /// names another question; lines from before questions were recorded are found by id.
    #[test]
    fn kept_scores_are_found_by_question_not_by_query_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("judge-teacher.jsonl");
        let asked = question_key("a kettle for tea", Some("Home"), None);
        let other = question_key("a kettle for soup", Some("Home"), None);
        assert_eq!(asked.len(), 64);
        assert_ne!(asked, other);
        // Every part counts, and where one part ends.
        assert_ne!(asked, question_key("a kettle for tea", None, None));
        assert_ne!(
            question_key("a", Some("bc"), None),
            question_key("ab", Some("c"), None)
        );
        assert_ne!(
            asked,
            question_key("a kettle for tea", Some("Home"), Some(""))
        );
        let text = [
            line("d-1", Some(&asked), &["A", "B"], &[0.5, -1.0]),
            // Another teacher's line for the same question: ignored.
            serde_json::to_string(&TeacherLine {
                teacher: "u".into(),
                qid: "d-1".into(),
                question: Some(asked.clone()),
                items: vec!["C".into()],
                scores: vec![9.0],
            })
            .unwrap(),
            line("d-2", None, &["A", "B"], &[2.0, 3.0]),
        ]
        .join("\n");
        std::fs::write(&path, text).unwrap();
        let kept = kept_scores(&path, "t").unwrap();
        let ab = ["A".to_string(), "B".to_string()];
        // The same question under a new id (renumbered): found.
        assert_eq!(kept_for(&kept, &asked, "d-7", &ab), Some(vec![0.5, -1.0]));
        // The old id now naming another question: not found, though every item is there.
        assert_eq!(kept_for(&kept, &other, "d-1", &ab), None);
        // A line without a question: found by its id.
        assert_eq!(kept_for(&kept, &other, "d-2", &ab), Some(vec![2.0, 3.0]));
        // An item never scored: the question is asked again.
        let abc = ["A".to_string(), "B".to_string(), "C".to_string()];
        assert_eq!(kept_for(&kept, &asked, "d-1", &abc), None);
        // A line that does not parse is an error naming the file and line.
        std::fs::write(
            &path,
            format!("{}\nnot json\n", line("d-1", None, &["A"], &[1.0])),
        )
        .unwrap();
        let e = kept_scores(&path, "t").unwrap_err().to_string();
        assert!(e.contains("judge-teacher.jsonl line 2"), "{e}");
    }
}
