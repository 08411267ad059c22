//! What a generated text must match ([`Constraint`]: a JSON schema, a Lark grammar or a regex),
//! and the check of a JSON answer against the schema subset mrrec uses ([`validate`]), for
//! servers that cannot constrain their output. Local models enforce constraints while decoding
//! (`mrrec-llm-local`).

use serde::{Deserialize, Serialize};

/// What the generated text must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Constraint {
    /// A JSON schema (the output is one JSON value that validates).
    JsonSchema(serde_json::Value),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
    /// A regular expression over the whole output.
    Regex(String),
}

/// Checks `v` against the JSON-schema subset mrrec's constraints use (`type`, `properties`,
/// `required`, `additionalProperties: false`, `items`, `enum`, `const`, `minLength`, `maxLength`,
/// `minItems`, `maxItems`). Used where a server cannot constrain its output.
pub fn validate(
    schema: &serde_json::Value,
    v: &serde_json::Value,
    at: &str,
) -> std::result::Result<(), String> {
    use serde_json::Value;
    let here = if at.is_empty() { "$" } else { at };
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!(
                "{here}: {v} is not one of {}",
                Value::Array(e.clone())
            ));
        }
    }
    if let Some(c) = schema.get("const") {
        if c != v {
            return Err(format!("{here}: {v} is not {c}"));
        }
    }
    let ty = schema.get("type").and_then(Value::as_str);
    let ok = match ty {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("number") => v.is_number(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("boolean") => v.is_boolean(),
        Some("null") => v.is_null(),
        _ => true,
    };
    if !ok {
        return Err(format!("{here}: expected {}, got {v}", ty.unwrap_or("?")));
    }
    let num = |k: &str| schema.get(k).and_then(Value::as_u64).map(|n| n as usize);
    if let Some(s) = v.as_str() {
        let n = s.chars().count();
        if num("minLength").is_some_and(|m| n < m) || num("maxLength").is_some_and(|m| n > m) {
            return Err(format!("{here}: string length {n} out of bounds"));
        }
    }
    if let Some(a) = v.as_array() {
        if num("minItems").is_some_and(|m| a.len() < m)
            || num("maxItems").is_some_and(|m| a.len() > m)
        {
            return Err(format!("{here}: {} items out of bounds", a.len()));
        }
        if let Some(items) = schema.get("items") {
            for (i, x) in a.iter().enumerate() {
                validate(items, x, &format!("{here}[{i}]"))?;
            }
        }
    }
    if let Some(o) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(k) = r.as_str() {
                if !o.contains_key(k) {
                    return Err(format!("{here}: missing required `{k}`"));
                }
            }
        }
        for (k, x) in o {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(s, x, &format!("{here}.{k}"))?,
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("{here}: unexpected property `{k}`"))
                }
                None => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;
    use serde_json::json;

    #[test]
    fn validates_the_subset() {
        let s = json!({"type": "object", "properties": {
            "p": {"type": "string", "minLength": 1},
            "ids": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 2}},
            "required": ["p", "ids"], "additionalProperties": false});
        assert!(validate(&s, &json!({"p": "x", "ids": ["a"]}), "").is_ok());
        assert_eq!(
            validate(&s, &json!({"p": "x"}), "").unwrap_err(),
            "$: missing required `ids`"
        );
        assert_eq!(
            validate(&s, &json!({"p": "", "ids": []}), "").unwrap_err(),
            "$.p: string length 0 out of bounds"
        );
        assert!(validate(&s, &json!({"p": "x", "ids": ["c"]}), "")
            .unwrap_err()
            .starts_with("$.ids[0]: \"c\" is not one of"));
        assert_eq!(
            validate(&s, &json!({"p": "x", "ids": [], "z": 1}), "").unwrap_err(),
            "$: unexpected property `z`"
        );
        assert_eq!(
            validate(&s, &json!([1]), "").unwrap_err(),
            "$: expected object, got [1]"
        );
    }
}
