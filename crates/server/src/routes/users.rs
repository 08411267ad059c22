//! `GET /v1/users`, `GET /v1/users/{user}/memory`, `POST /v1/users/{user}/interactions`,
//! `DELETE /v1/users/{user}`: the caller's tenant only.

use crate::*;

pub(crate) async fn users(
    State(svc): State<Arc<Service>>,
    Caller(c): Caller,
) -> Result<Response, ApiError> {
    let tenant = c.tenant.clone();
    let users = svc.cpu(move |s| Ok(s.store.users(&tenant)?)).await?;
    Ok(Json(json!({"tenant": c.tenant, "users": users})).into_response())
}

pub(crate) async fn memory_show(
    State(svc): State<Arc<Service>>,
    Caller(c): Caller,
    Path(user): Path<String>,
) -> Result<Response, ApiError> {
    check_user(&user)?;
    let (tenant, u) = (c.tenant.clone(), user.clone());
    let entries = svc
        .cpu(move |s| {
            Ok(s.store.entries(Owner {
                tenant: &tenant,
                user: &u,
            })?)
        })
        .await?;
    if entries.is_empty() {
        return Err(unknown_user(&user));
    }
    let entries: Vec<Value> = entries
        .iter()
        .map(|e| json!({"id": e.id, "level": e.level.as_str(), "category": e.category, "text": e.text, "provenance": e.provenance}))
        .collect();
    Ok(Json(json!({"user": user, "entries": entries})).into_response())
}

/// `POST /v1/users/{user}/interactions` body, read.
#[derive(Debug)]
pub struct Interactions {
    /// The rows as reviews of the user.
    pub reviews: Vec<mrrec_data::Review>,
    /// Rewrite the touched summaries with the LLM.
    pub rebuild: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InteractionsBody {
    pub(crate) interactions: Vec<Value>,
    #[serde(default)]
    pub(crate) rebuild: bool,
}

/// Parses and checks an interactions body for `user` (errors name `interactions[i]`).
pub fn parse_interactions(
    body: &[u8],
    user: &str,
    cfg: &ServiceConfig,
) -> Result<Interactions, ApiError> {
    check_user(user)?;
    let b: InteractionsBody = parse_json(body, "interactions body")?;
    if b.interactions.is_empty() {
        return Err(ApiError::bad("`interactions` is empty"));
    }
    if b.interactions.len() > cfg.max_interactions {
        return Err(ApiError::bad(format!(
            "{} interactions; at most {} per request",
            b.interactions.len(),
            cfg.max_interactions
        )));
    }
    let mut reviews = Vec::with_capacity(b.interactions.len());
    for (i, v) in b.interactions.into_iter().enumerate() {
        let r = mrrec_agent::memory::review_from_json(v, user, &format!("interactions[{i}]"))
            .map_err(|e| ApiError::bad(format!("{e:#}")))?;
        if r.text.chars().count() > 20 * cfg.max_text_chars
            || r.title.chars().count() > cfg.max_text_chars
        {
            return Err(ApiError::bad(format!("interactions[{i}]: text too long")));
        }
        check_id(&format!("interactions[{i}].parent_asin"), &r.parent_asin)
            .map_err(ApiError::bad)?;
        if let Some(j) = reviews.iter().position(|o: &mrrec_data::Review| {
            o.parent_asin == r.parent_asin && o.timestamp == r.timestamp
        }) {
            return Err(ApiError::bad(format!(
                "interactions[{i}] repeats the item and timestamp of interactions[{j}]"
            )));
        }
        reviews.push(r);
    }
    Ok(Interactions {
        reviews,
        rebuild: b.rebuild,
    })
}

pub(crate) async fn memory_add(
    State(svc): State<Arc<Service>>,
    Caller(c): Caller,
    Path(user): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Interactions { reviews, rebuild } =
        parse_interactions(&body_bytes(body)?, &user, &svc.cfg)?;
    let unknown: Vec<String> = reviews
        .iter()
        .filter(|r| svc.ws.catalogue().by_id(&r.parent_asin).is_none())
        .map(|r| r.parent_asin.clone())
        .collect();
    let (tenant, u) = (c.tenant.clone(), user.clone());
    let added = svc
        .cpu(move |s| s.builder(&tenant, false).add_reviews(&u, &reviews))
        .await?;
    let mut out = json!({"user": user, "added": added.added, "updated": added.updated,
        "items_not_in_catalogue": unknown});
    if rebuild && added.changed() > 0 {
        let permit = svc.llm_gate.enter(&svc.metrics).await?;
        let s = svc.clone();
        let (tenant, u) = (c.tenant.clone(), user.clone());
        let report = tokio::task::spawn_blocking(move || {
            let _p = permit;
            let b = s.builder(&tenant, true);
            let mut report = mrrec_agent::memory::BuildReport::default();
            b.build_patterns(&[u.as_str()], &mut report)?;
            b.build_profiles(&[u.as_str()], &mut report)?;
            s.metrics.llm(&report.usage, false);
            Ok::<_, AgentError>(report)
        })
        .await
        .map_err(ApiError::worker)?
        .map_err(ApiError::internal)?;
        out["patterns_written"] = json!(report.patterns_written);
        out["profiles_written"] = json!(report.profiles_written);
    }
    Ok(Json(out).into_response())
}

pub(crate) async fn memory_forget(
    State(svc): State<Arc<Service>>,
    Caller(c): Caller,
    Path(user): Path<String>,
) -> Result<Response, ApiError> {
    check_user(&user)?;
    let (tenant, u) = (c.tenant.clone(), user.clone());
    let r = svc
        .cpu(move |s| {
            if !has_memory(s, &tenant, &u)? {
                return Ok(None);
            }
            s.builder(&tenant, false)
                .forget(&u, s.llm_cache.as_deref())
                .map(Some)
        })
        .await?;
    let Some(r) = r else {
        return Err(unknown_user(&user));
    };
    Ok(Json(json!({
        "user": user,
        "entries": r.store.entries,
        "query_aspects": r.store.query_aspects,
        "global_aspects": r.store.global_aspects,
        "cached_embeddings": r.embeddings,
        "cached_llm_responses": r.llm_responses,
    }))
    .into_response())
}
