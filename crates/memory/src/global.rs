//! Cross-user global memory, per category (MR.Rec §global memory).
//!
//! Step A: for one training query, the purchased item and 3–5 hard negatives (similar items of the
//! same category that were not chosen), a chat model names the aspects that decided the choice, as
//! JSON constrained to a schema (the agent's `prompts::aspects`) (validated again afterwards; one retry, then the failure is
//! counted). Step B: the aspects of all queries of a category are merged into canonical aspects
//! by clustering their names' embeddings (deterministic, no LLM): each cluster keeps its most
//! frequent name, the description nearest the cluster's centre, and the provenance (query ids and
//! users) of every member.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{dot, GlobalAspect, QueryAspects};

/// An aspect name: words of letters (no digits, so no model numbers or sizes).
pub const NAME_PATTERN: &str = "^[A-Za-z][A-Za-z '&/-]*$";
/// The longest aspect name.
pub const NAME_MAX_CHARS: usize = 32;

/// Whether an aspect name is a general quality as [`NAME_PATTERN`] asks (checked again after
/// parsing, for servers that cannot constrain their output): letters, spaces and `'&/-` only,
/// at most 4 words.
pub fn general_name(name: &str) -> bool {
    let n = name.trim();
    n.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && n.chars()
            .all(|c| c.is_ascii_alphabetic() || " '&/-".contains(c))
        && n.chars().count() <= NAME_MAX_CHARS
        && n.split_whitespace().count() <= 4
}

/// One aspect as the model wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aspect {
    /// Short name.
    pub name: String,
    /// One sentence.
    pub description: String,
}

/// A validated step-A answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AspectSet {
    /// The chosen product's subcategory, in the model's words.
    pub subcategory: String,
    /// Aspects of the whole category.
    pub category_aspects: Vec<Aspect>,
    /// Aspects of the subcategory.
    pub subcategory_aspects: Vec<Aspect>,
    /// The step-A prompt version that produced it (the agent's `GLOBAL_PROMPT_VERSION`; empty for rows
    /// written before versions were recorded). Step B merges only the current version's rows
    /// and a build redoes the others.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
}

fn norm(s: &str) -> String {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn slug(s: &str) -> String {
    let n = norm(s).replace(' ', "-");
    if n.is_empty() {
        "aspect".into()
    } else {
        n.chars().take(48).collect()
    }
}

/// Settings of step B.
#[derive(Debug, Clone, Copy)]
pub struct MergeOptions {
    /// Two aspect names closer than this (cosine of their embeddings) are the same aspect.
    pub threshold: f32,
    /// Keep at most this many canonical aspects per category (most supported first).
    pub max_aspects: usize,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            threshold: 0.8,
            max_aspects: 40,
        }
    }
}

struct Member<'a> {
    name: &'a str,
    description: &'a str,
    subcategory: Option<&'a str>,
    qid: &'a str,
    user: &'a str,
}

/// Step B for one category: merges the step-A results into canonical aspects. `embed` returns
/// unit vectors for texts; the aspects' `embedding` is that of [`GlobalAspect::text`].
pub fn merge<E>(
    category: &str,
    rows: &[(QueryAspects, AspectSet)],
    opts: MergeOptions,
    mut embed: E,
) -> Result<Vec<GlobalAspect>, String>
where
    E: FnMut(&[&str]) -> Result<Vec<Vec<f32>>, String>,
{
    let mut members: Vec<Member<'_>> = Vec::new();
    for (q, set) in rows {
        for a in &set.category_aspects {
            members.push(Member {
                name: &a.name,
                description: &a.description,
                subcategory: None,
                qid: &q.qid,
                user: &q.user,
            });
        }
        for a in &set.subcategory_aspects {
            members.push(Member {
                name: &a.name,
                description: &a.description,
                subcategory: Some(&set.subcategory),
                qid: &q.qid,
                user: &q.user,
            });
        }
    }
    if members.is_empty() {
        return Ok(Vec::new());
    }
    // Most frequent names seed clusters first; ties by name, so the result is deterministic.
    let mut freq: BTreeMap<String, usize> = BTreeMap::new();
    for m in &members {
        *freq.entry(norm(m.name)).or_default() += 1;
    }
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by(|&a, &b| {
        let (na, nb) = (norm(members[a].name), norm(members[b].name));
        freq[&nb]
            .cmp(&freq[&na])
            .then_with(|| na.cmp(&nb))
            .then_with(|| members[a].qid.cmp(members[b].qid))
    });
    let names: Vec<&str> = members.iter().map(|m| m.name).collect();
    let vecs = embed(&names)?;
    if vecs.len() != members.len() {
        return Err(format!(
            "embedder returned {} vectors for {} names",
            vecs.len(),
            members.len()
        ));
    }
    // Greedy clustering against each cluster's seed.
    let mut clusters: Vec<Vec<usize>> = Vec::new();
    for &i in &order {
        let home = clusters
            .iter()
            .position(|c| dot(&vecs[c[0]], &vecs[i]) >= opts.threshold);
        match home {
            Some(c) => clusters[c].push(i),
            None => clusters.push(vec![i]),
        }
    }
    // Most supported (distinct queries) first.
    let support = |c: &Vec<usize>| {
        let mut q: Vec<&str> = c.iter().map(|&i| members[i].qid).collect();
        q.sort();
        q.dedup();
        q.len()
    };
    clusters.sort_by(|a, b| support(b).cmp(&support(a)).then_with(|| a[0].cmp(&b[0])));
    clusters.truncate(opts.max_aspects);
    let mut out: Vec<GlobalAspect> = Vec::new();
    let mut ids: BTreeMap<String, usize> = BTreeMap::new();
    for c in &clusters {
        let seed = &members[c[0]];
        // The description nearest the cluster's mean name vector.
        let dim = vecs[c[0]].len();
        let mut mean = vec![0f32; dim];
        for &i in c {
            for (m, v) in mean.iter_mut().zip(&vecs[i]) {
                *m += v;
            }
        }
        let best = c
            .iter()
            .copied()
            .max_by(|&a, &b| {
                dot(&vecs[a], &mean)
                    .total_cmp(&dot(&vecs[b], &mean))
                    .then_with(|| b.cmp(&a))
            })
            .unwrap_or(c[0]);
        let sub_members: Vec<&str> = c.iter().filter_map(|&i| members[i].subcategory).collect();
        let subcategory = if sub_members.len() * 2 > c.len() {
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for s in &sub_members {
                *counts.entry(s).or_default() += 1;
            }
            counts
                .into_iter()
                .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(a.0)))
                .map(|(s, _)| s.to_string())
        } else {
            None
        };
        let mut queries: Vec<String> = c.iter().map(|&i| members[i].qid.to_string()).collect();
        queries.sort();
        queries.dedup();
        let mut users: Vec<String> = c.iter().map(|&i| members[i].user.to_string()).collect();
        users.sort();
        users.dedup();
        let base = format!("g-{}", slug(seed.name));
        let n = ids.entry(base.clone()).or_default();
        *n += 1;
        let id = if *n == 1 { base } else { format!("{base}-{n}") };
        out.push(GlobalAspect {
            id,
            category: category.to_string(),
            subcategory,
            name: seed.name.to_string(),
            description: members[best].description.to_string(),
            queries,
            users,
            embedding: Vec::new(),
        });
    }
    let texts: Vec<String> = out.iter().map(GlobalAspect::text).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let vecs = embed(&refs)?;
    for (a, v) in out.iter_mut().zip(vecs) {
        a.embedding = v;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_clusters_near_duplicate_names_and_keeps_provenance() {
        let row = |qid: &str, user: &str, names: &[&str]| {
            (
                QueryAspects {
                    qid: qid.into(),
                    user: user.into(),
                    category: "Books".into(),
                    json: String::new(),
                    writer: None,
                },
                AspectSet {
                    subcategory: "novels".into(),
                    category_aspects: names
                        .iter()
                        .map(|n| Aspect {
                            name: n.to_string(),
                            description: format!("about {n}"),
                        })
                        .collect(),
                    subcategory_aspects: vec![],
                    version: "v".into(),
                },
            )
        };
        let rows = vec![
            row("q1", "alice", &["Price", "Story pacing"]),
            row("q2", "bob", &["price", "Cover art"]),
            row("q3", "carol", &["PRICE!", "pacing of the story"]),
        ];
        // A toy embedder: names that share their first word are the same aspect.
        let embed = |texts: &[&str]| -> Result<Vec<Vec<f32>>, String> {
            Ok(texts
                .iter()
                .map(|t| {
                    let w = norm(t);
                    let key = if w.contains("pacing") {
                        "pacing".to_string()
                    } else {
                        w.split(' ').next().unwrap_or("").to_string()
                    };
                    let mut v = vec![0f32; 8];
                    v[key.bytes().map(|b| b as usize).sum::<usize>() % 8] = 1.0;
                    v
                })
                .collect())
        };
        let out = merge("Books", &rows, MergeOptions::default(), embed).unwrap();
        let price = out.iter().find(|a| a.id == "g-price").unwrap();
        assert_eq!(price.queries, ["q1", "q2", "q3"]);
        assert_eq!(price.users, ["alice", "bob", "carol"]);
        // Most supported first; every aspect embedded; ids unique.
        assert_eq!(out[0].id, "g-price");
        assert!(out.iter().all(|a| a.embedding.len() == 8));
        let mut ids: Vec<&str> = out.iter().map(|a| a.id.as_str()).collect();
        ids.dedup();
        assert_eq!(ids.len(), out.len());
        // Deterministic.
        assert_eq!(
            merge("Books", &rows, MergeOptions::default(), embed).unwrap(),
            out
        );
    }
}
