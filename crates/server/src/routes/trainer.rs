//! `POST /tools/memory_retrieve` and `POST /reward`: the memory tool and the rewards for an
//! external GRPO trainer.

use crate::*;

/// `POST /tools/memory_retrieve` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolBody {
    /// Whose memory.
    pub user: String,
    /// What to look up.
    #[serde(default)]
    pub query: String,
    /// Aspects to focus on.
    #[serde(default)]
    pub aspects: Vec<String>,
    /// Entries (default: the assistant's k).
    #[serde(default)]
    pub k: Option<usize>,
    /// Levels searched (default: all).
    #[serde(default)]
    pub levels: Option<Vec<String>>,
}

/// Parses and checks a memory-tool body into the body and the assistant settings it implies.
pub fn parse_tool(
    body: &[u8],
    cfg: &ServiceConfig,
) -> Result<(ToolBody, AssistantConfig), ApiError> {
    let b: ToolBody = parse_json(body, "tool body")?;
    check_user(&b.user)?;
    if b.query.chars().count() > cfg.max_text_chars
        || b.aspects.len() > 16
        || b.aspects.iter().any(|a| a.chars().count() > 200)
    {
        return Err(ApiError::bad("query or aspects too long"));
    }
    if !auth::has_visible(&b.query) && !b.aspects.iter().any(|a| auth::has_visible(a)) {
        return Err(ApiError::bad(
            "give a `query` or `aspects` with a visible character",
        ));
    }
    let mut a = cfg.assistant.clone();
    if let Some(k) = b.k {
        if k == 0 || k > 50 {
            return Err(ApiError::bad("`k` must be 1–50"));
        }
        a.k = k;
    }
    if let Some(ls) = &b.levels {
        a.levels = ls
            .iter()
            .map(|l| Level::parse(l).ok_or_else(|| ApiError::bad(format!("unknown level {l:?}"))))
            .collect::<Result<_, _>>()?;
    }
    Ok((b, a))
}

pub(crate) async fn tool_memory(
    State(svc): State<Arc<Service>>,
    Caller(c): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (b, cfg) = parse_tool(&body_bytes(body)?, &svc.cfg)?;
    let tenant = c.tenant.clone();
    let user = b.user.clone();
    let found = svc
        .cpu(move |s| {
            if !has_memory(s, &tenant, &b.user)? {
                return Ok(None);
            }
            s.assistant(&tenant, cfg, None)
                .memory_tool(&b.user, &json!({"query": b.query, "aspects": b.aspects}))
                .map(Some)
        })
        .await?;
    let Some((call, text)) = found else {
        return Err(unknown_user(&user));
    };
    Ok(Json(json!({"ok": call.ok, "error": call.error,
        "results": call.results.iter().map(|(id, l, sc, t)| json!({"id": id, "level": l.as_str(), "score": sc, "text": t})).collect::<Vec<_>>(),
        "tool_response": text}))
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RewardBody {
    pub(crate) target: String,
    #[serde(default)]
    pub(crate) response: Option<String>,
    #[serde(default)]
    pub(crate) profile: Option<String>,
    #[serde(default)]
    pub(crate) memory_calls_ok: Option<usize>,
    #[serde(default)]
    pub(crate) weights: Option<mrrec_agent::rewards::RewardWeights>,
    /// The request the trajectory answered: ranked beside the profile with `rank_request`.
    #[serde(default)]
    pub(crate) request: Option<String>,
    #[serde(default)]
    pub(crate) rank_request: mrrec_agent::assistant::RequestInRanking,
    #[serde(default)]
    pub(crate) hybrid: bool,
    /// With `rank_request: fuse`, the profile ranking's weight in the fusion (`--profile-weight`).
    #[serde(default)]
    pub(crate) profile_weight: Option<f32>,
}

/// A reward request, read: the target id, the profile (None when none parses), successful
/// memory calls, and the weights.
#[derive(Debug)]
pub struct RewardRequest {
    /// Catalogue id of the target.
    pub target: String,
    /// The profile to rank.
    pub profile: Option<String>,
    /// Successful memory calls.
    pub memory_calls_ok: usize,
    /// Weights.
    pub weights: mrrec_agent::rewards::RewardWeights,
    /// How the target is ranked: the assistant's `hybrid` and `rank_request` (the paper's
    /// profile alone, dense, by default).
    pub ranking: mrrec_agent::assistant::AssistantConfig,
    /// The request beside the profile (empty when the ranking does not read it).
    pub request: String,
}

/// Parses and checks a reward body.
pub fn parse_reward(body: &[u8], cfg: &ServiceConfig) -> Result<RewardRequest, ApiError> {
    let b: RewardBody = parse_json(body, "reward body")?;
    check_id("target", &b.target).map_err(ApiError::bad)?;
    let limit = 64 * cfg.max_text_chars;
    let (profile, calls) = match (&b.response, &b.profile) {
        (Some(r), None) => {
            if r.len() > limit {
                return Err(ApiError::bad("`response` is too long"));
            }
            (
                mrrec_agent::rewards::final_of_response(r).map(|(p, _)| p),
                mrrec_agent::rewards::successful_calls_in(r),
            )
        }
        (None, Some(p)) => {
            if p.len() > limit {
                return Err(ApiError::bad("`profile` is too long"));
            }
            (Some(p.trim().to_string()).filter(|p| !p.is_empty()), 0)
        }
        _ => {
            return Err(ApiError::bad(
                "give exactly one of `response` and `profile`",
            ))
        }
    };
    let weights = b.weights.unwrap_or_default();
    weights.check().map_err(ApiError::bad)?;
    let request = match (b.rank_request.is_profile_alone(), b.request) {
        (_, Some(r)) if r.len() > cfg.max_text_chars => {
            return Err(ApiError::bad("`request` is too long"))
        }
        (true, r) => r.unwrap_or_default(),
        (false, Some(r)) if !r.trim().is_empty() => r,
        (false, _) => {
            return Err(ApiError::bad(
                "`rank_request` ranks the request beside the profile: give `request`",
            ))
        }
    };
    let ranking = mrrec_agent::assistant::AssistantConfig {
        hybrid: b.hybrid,
        rank_request: b.rank_request,
        profile_weight: b.profile_weight.unwrap_or(1.0),
        ..Default::default()
    };
    ranking
        .check_ranking()
        .map_err(|e| ApiError::bad(format!("`profile_weight`: {e}")))?;
    Ok(RewardRequest {
        target: b.target,
        profile,
        memory_calls_ok: b.memory_calls_ok.unwrap_or(calls),
        weights,
        ranking,
        request,
    })
}

pub(crate) async fn reward(
    State(svc): State<Arc<Service>>,
    Caller(_): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let RewardRequest {
        target,
        profile,
        memory_calls_ok: calls,
        weights: w,
        ranking,
        request,
    } = parse_reward(&body_bytes(body)?, &svc.cfg)?;
    let target = svc
        .ws
        .catalogue()
        .position(&target)
        .ok_or_else(|| ApiError::bad(format!("target {target:?} is not in the catalogue")))?;
    let (r, name) = svc
        .cpu(move |s| {
            let ranking = mrrec_agent::assistant::Ranking::of(s.ws.shop(), &ranking);
            let rank = match &profile {
                Some(p) => {
                    ranking.target_rank(p, &request, target, w.depth(), &Default::default())?
                }
                None => None,
            };
            Ok((
                mrrec_agent::rewards::combine(&w, profile, rank, calls),
                ranking.name(),
            ))
        })
        .await?;
    let mut v = json!(r);
    v["ranking"] = json!(name);
    Ok(Json(v).into_response())
}
