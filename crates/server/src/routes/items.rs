//! `GET /v1/items/search`.

use crate::*;

/// `GET /v1/items/search` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchParams {
    /// The text.
    pub q: String,
    /// Items (default 10).
    #[serde(default)]
    pub k: Option<usize>,
    /// `dense` (default), `hybrid` or `bm25`.
    #[serde(default)]
    pub mode: Option<String>,
}

pub(crate) async fn search(
    State(svc): State<Arc<Service>>,
    Caller(_): Caller,
    params: Result<Query<SearchParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad(e.body_text()))?;
    check_text("q", &p.q, svc.cfg.max_text_chars)?;
    let k = p.k.unwrap_or(10);
    if k == 0 || k > svc.cfg.max_k {
        return Err(ApiError::bad(format!("`k` must be 1–{}", svc.cfg.max_k)));
    }
    let mode = p.mode.unwrap_or_else(|| "dense".into());
    if !["dense", "hybrid", "bm25"].contains(&mode.as_str()) {
        return Err(ApiError::bad(format!(
            "unknown mode {mode:?} (dense, hybrid, bm25)"
        )));
    }
    let q = p.q.clone();
    let hits = svc
        .cpu(move |s| {
            let v = if mode == "bm25" {
                None
            } else {
                Some(s.ws.embedder.embed(&[q.as_str()])?.remove(0))
            };
            let sq = SearchQuery {
                text: &q,
                vector: v.as_deref(),
            };
            Ok(match mode.as_str() {
                "bm25" => s.ws.lexical.search(&sq, k)?,
                "hybrid" => s.ws.hybrid().search(&sq, k)?,
                _ => s.ws.dense.search(&sq, k)?,
            })
        })
        .await?;
    let items: Vec<(u32, f32)> = hits.iter().map(|h| (h.item, h.score)).collect();
    Ok(Json(json!({"q": p.q, "items": items_json(&svc.ws, &items)})).into_response())
}
