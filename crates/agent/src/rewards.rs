//! MR.Rec's rewards, exactly as the paper defines them (one implementation for the Rust GRPO
//! trainer and the `/reward` endpoint a Python trainer calls):
//!
//! r = w_format·R_format + w_rec·R_rec + w_mem·R_mem, weights 0.1 / 5 / 0.1 by default, where
//! - R_format ∈ {0, 1}: the final `\boxed{...}` object (or, in guided mode, the constrained
//!   final object) parses with a non-empty `ideal_item_profile` and a `useful_memory_ids` list;
//! - R_rec = NDCG@1000 + NDCG@100 of the target item in the ranking the profile produces, and 0
//!   when no profile can be extracted (no fallback to the request inside rewards). The ranking is
//!   the one the assistant serves ([`crate::assistant::Ranking`]): the profile alone by dense
//!   retrieval by default (the paper's); with `hybrid` or `rank_request` set, that ranking, so
//!   training scores what a user would be shown;
//! - R_mem ∈ {0, 1}: at least one successful memory call.

use crate::error::Result;
use mrrec_eval::metrics::ndcg_at;
use serde::{Deserialize, Serialize};

/// The paper's R_rec cutoffs: NDCG@100 + NDCG@1000.
pub const PAPER_CUTOFFS: [usize; 2] = [100, 1000];

/// The deepest cutoff a caller may ask for (the target is searched that deep per trajectory).
pub const MAX_CUTOFF: usize = 10_000;

fn paper_cutoffs() -> [usize; 2] {
    PAPER_CUTOFFS
}

/// Weights of the three components.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RewardWeights {
    /// Weight of R_format.
    pub format: f64,
    /// Weight of R_rec.
    pub rec: f64,
    /// Weight of R_mem.
    pub mem: f64,
    /// R_rec = NDCG@a + NDCG@b: the paper's 100 and 1000 by default; a deeper cut (Rec-R1
    /// trains with NDCG at 3,000) gives a profile that ranks the target at 2,000 a signal.
    #[serde(default = "paper_cutoffs")]
    pub rec_cutoffs: [usize; 2],
}

impl Default for RewardWeights {
    fn default() -> Self {
        RewardWeights {
            format: 0.1,
            rec: 5.0,
            mem: 0.1,
            rec_cutoffs: PAPER_CUTOFFS,
        }
    }
}

impl RewardWeights {
    /// Checks the weights are finite and the cutoffs within 1..=[`MAX_CUTOFF`].
    pub fn check(&self) -> std::result::Result<(), String> {
        if ![self.format, self.rec, self.mem]
            .iter()
            .all(|w| w.is_finite())
        {
            return Err("weights must be finite".into());
        }
        if !self
            .rec_cutoffs
            .iter()
            .all(|&c| (1..=MAX_CUTOFF).contains(&c))
        {
            return Err(format!(
                "R_rec cutoffs {:?} must be within 1..={MAX_CUTOFF}",
                self.rec_cutoffs
            ));
        }
        Ok(())
    }

    /// How deep the target is searched: the deeper cutoff.
    pub fn depth(&self) -> usize {
        self.rec_cutoffs[0].max(self.rec_cutoffs[1])
    }
}

/// The components of one trajectory's reward.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rewards {
    /// R_format.
    pub format: f64,
    /// R_rec.
    pub rec: f64,
    /// R_mem.
    pub mem: f64,
    /// The weighted sum.
    pub total: f64,
    /// 1-based rank of the target in the profile's ranking (None: below the depth, or no
    /// profile).
    pub target_rank: Option<usize>,
    /// The profile that was ranked.
    pub profile: Option<String>,
}

/// R_rec of a target at `rank`: NDCG@1000 + NDCG@100 with one relevant item.
pub fn r_rec(rank: Option<usize>) -> f64 {
    r_rec_at(rank, PAPER_CUTOFFS)
}

/// R_rec with other cutoffs: NDCG@a + NDCG@b.
pub fn r_rec_at(rank: Option<usize>, cutoffs: [usize; 2]) -> f64 {
    ndcg_at(rank, cutoffs[1]) + ndcg_at(rank, cutoffs[0])
}

/// The final object of a free-mode response: the last `\boxed{...}` that parses with a
/// non-empty profile, as (profile, cited ids).
pub fn final_of_response(response: &str) -> Option<(String, Vec<String>)> {
    mrrec_llm::parse::boxed_json(response)
        .as_ref()
        .and_then(crate::assistant::read_final)
}

/// Successful memory calls in a free-mode transcript: tool responses that carry no error.
pub fn successful_calls_in(transcript: &str) -> usize {
    transcript
        .split("<tool_response>")
        .skip(1)
        .filter(|r| {
            let body = r.split("</tool_response>").next().unwrap_or("");
            !body.trim_start().starts_with("error:")
        })
        .count()
}

/// Combines the components.
pub fn combine(
    w: &RewardWeights,
    profile: Option<String>,
    target_rank: Option<usize>,
    memory_calls_ok: usize,
) -> Rewards {
    let format = if profile.is_some() { 1.0 } else { 0.0 };
    let rec = if profile.is_some() {
        r_rec_at(target_rank, w.rec_cutoffs)
    } else {
        0.0
    };
    let mem = if memory_calls_ok > 0 { 1.0 } else { 0.0 };
    Rewards {
        format,
        rec,
        mem,
        total: w.format * format + w.rec * rec + w.mem * mem,
        target_rank: if profile.is_some() { target_rank } else { None },
        profile,
    }
}

/// The rewards of an answer's trace for a target (what rollouts, the SFT selection and its greedy
/// bar all score with), the target ranked as `ranking` ranks: the assistant's own
/// ([`crate::assistant::Assistant::ranking`]).
pub fn reward_of(
    ranking: &crate::assistant::Ranking,
    w: &RewardWeights,
    trace: &crate::assistant::Trace,
    target: u32,
) -> Result<Rewards> {
    let profile = trace.rewarded_profile();
    let rank = match &profile {
        Some(p) => ranking.target_rank(p, &trace.request, target, w.depth(), trace)?,
        None => None,
    };
    Ok(combine(w, profile, rank, trace.memory_calls_ok()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_answer_is_rewarded_for_its_own_profile_and_its_good_memory_calls() {
        use crate::assistant::{ToolCallTrace, Trace};
        let call = |ok: bool, error: Option<&str>| ToolCallTrace {
            ok,
            error: error.map(str::to_string),
            ..Default::default()
        };
        let mut t = Trace::default();
        t.profile = Some("a red kite".into());
        t.tool_calls = vec![
            call(true, None),
            call(false, None),
            call(true, Some("timeout")),
        ];
        assert_eq!(t.rewarded_profile().as_deref(), Some("a red kite"));
        assert_eq!(t.memory_calls_ok(), 1);
        // A fallback to the request is not the model's profile: nothing to score.
        t.fallback = true;
        assert_eq!(t.rewarded_profile(), None);
    }

    #[test]
    fn components_follow_the_paper() {
        let w = RewardWeights::default();
        // Target first: NDCG@1000 = NDCG@100 = 1.
        let r = combine(&w, Some("a red kite".into()), Some(1), 1);
        assert_eq!((r.format, r.rec, r.mem), (1.0, 2.0, 1.0));
        assert!((r.total - (0.1 + 10.0 + 0.1)).abs() < 1e-12);
        // Rank 3: 1/log2(4) twice.
        let r = combine(&w, Some("x".into()), Some(3), 0);
        assert!((r.rec - 1.0).abs() < 1e-12);
        assert_eq!(r.mem, 0.0);
        // Rank 500: only NDCG@1000 counts.
        let r = combine(&w, Some("x".into()), Some(500), 2);
        assert!((r.rec - 1.0 / 501f64.log2()).abs() < 1e-12);
        // Not found, or no profile: R_rec = 0 (no fallback to the request).
        assert_eq!(combine(&w, Some("x".into()), None, 0).rec, 0.0);
        // A deeper cut: a target at 2,000 scores zero with the paper's, not with 100 + 3,000.
        assert_eq!(combine(&w, Some("x".into()), Some(2000), 0).rec, 0.0);
        let deep = RewardWeights {
            rec_cutoffs: [100, 3000],
            ..w
        };
        let r = combine(&deep, Some("x".into()), Some(2000), 0);
        assert!((r.rec - 1.0 / (2001f64).log2()).abs() < 1e-12, "{}", r.rec);
        assert_eq!(deep.depth(), 3000);
        assert!(deep.check().is_ok());
        assert!(RewardWeights {
            rec_cutoffs: [100, 1_000_000],
            ..w
        }
        .check()
        .is_err());
        assert!(RewardWeights { rec: f64::NAN, ..w }.check().is_err());
        // Old settings files (without cutoffs) read as the paper's.
        let old: RewardWeights =
            serde_json::from_str(r#"{"format": 0.1, "rec": 5, "mem": 0.1}"#).unwrap();
        assert_eq!(old, w);
        let r = combine(&w, None, Some(1), 1);
        assert_eq!(
            (r.format, r.rec, r.mem, r.target_rank),
            (0.0, 0.0, 1.0, None)
        );
        assert!((r.total - 0.1).abs() < 1e-12);
    }

    #[test]
    fn responses_are_read_like_the_assistant_reads_them() {
        let ok = "thinking… \\boxed{\"ideal_item_profile\": \"A soft plush bunny for toddlers\", \"useful_memory_ids\": [\"r-1\"]}";
        let (p, ids) = final_of_response(ok).unwrap();
        assert_eq!(p, "A soft plush bunny for toddlers");
        assert_eq!(ids, vec!["r-1".to_string()]);
        assert!(final_of_response("no box here").is_none());
        assert!(final_of_response(
            "\\boxed{\"ideal_item_profile\": \"\", \"useful_memory_ids\": []}"
        )
        .is_none());
        let t = "<tool_response>\n<memory id=\"r-1\">x</memory>\n</tool_response> … <tool_response>\nerror: unknown tool\n</tool_response>";
        assert_eq!(successful_calls_in(t), 1);
        assert_eq!(successful_calls_in("nothing"), 0);
    }
}
