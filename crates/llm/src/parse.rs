//! Tolerant parsers for what models emit: `<tool_call>` JSON and `\boxed{...}` answers, with code
//! fences, trailing commas, single quotes and truncation repaired where possible, and a report of
//! what could not be parsed.

use serde_json::Value;

use crate::ToolCall;

/// Tool calls found in a text, and the fragments that could not be parsed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedToolCalls {
    /// Well-formed calls, in order.
    pub calls: Vec<ToolCall>,
    /// Fragments that looked like calls but did not parse, with the reason.
    pub errors: Vec<String>,
}

/// Finds every `<tool_call>…</tool_call>` (the closing tag may be missing at the end) and parses
/// `{"name": ..., "arguments": {...}}` inside.
pub fn tool_calls(text: &str) -> ParsedToolCalls {
    let mut out = ParsedToolCalls::default();
    let mut rest = text;
    while let Some(start) = rest.find("<tool_call>") {
        let after = &rest[start + "<tool_call>".len()..];
        let (body, next) = match after.find("</tool_call>") {
            Some(end) => (&after[..end], &after[end + "</tool_call>".len()..]),
            None => (after, ""),
        };
        match parse_json_lenient(body) {
            Some(v) => match call_from(&v) {
                Some(c) => out.calls.push(c),
                None => out.errors.push(format!(
                    "tool call without a string `name`: {}",
                    body.trim()
                )),
            },
            None => out
                .errors
                .push(format!("tool call is not JSON: {}", body.trim())),
        }
        rest = next;
    }
    out
}

fn call_from(v: &Value) -> Option<ToolCall> {
    let v = v.get("function").unwrap_or(v);
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments") {
        Some(Value::String(s)) => parse_json_lenient(s).unwrap_or(Value::String(s.clone())),
        Some(a) => a.clone(),
        None => Value::Object(Default::default()),
    };
    Some(ToolCall { name, arguments })
}

/// The JSON object inside the last `\boxed{...}` of `text` (braces balanced, strings respected;
/// a truncated object is closed), or `None`.
pub fn boxed_json(text: &str) -> Option<Value> {
    let start = text.rfind("\\boxed{")? + "\\boxed".len();
    let body = &text[start..];
    // `\boxed{` opens the object itself: `\boxed{"a": 1}`; or wraps one: `\boxed{{"a": 1}}`.
    let inner = extract_balanced(body).unwrap_or(body).trim();
    let core = inner
        .strip_prefix('{')
        .map(|c| c.strip_suffix('}').unwrap_or(c).trim())
        .unwrap_or(inner);
    let candidate = if core.starts_with('{') || core.starts_with("```") {
        core.to_string()
    } else {
        inner.to_string()
    };
    parse_json_lenient(&candidate).filter(Value::is_object)
}

/// The first balanced `{...}` at the start of `s` (quotes respected).
fn extract_balanced(s: &str) -> Option<&str> {
    let mut depth = 0i32;
    let mut q = Quotes::default();
    for (i, c) in s.char_indices() {
        if !q.outside(c) {
            continue;
        }
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&s[..=i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// Tracks whether a scan over JSON text is inside a string literal.
#[derive(Default)]
struct Quotes {
    in_str: bool,
    esc: bool,
}

impl Quotes {
    /// Feeds one character; true when it stands outside every string (quotes count as inside).
    fn outside(&mut self, c: char) -> bool {
        if self.in_str {
            match (self.esc, c) {
                (true, _) => self.esc = false,
                (false, '\\') => self.esc = true,
                (false, '"') => self.in_str = false,
                _ => {}
            }
            return false;
        }
        if c == '"' {
            self.in_str = true;
            return false;
        }
        true
    }
}

/// Parses JSON as models write it: strips code fences, finds the first object, removes trailing
/// commas, turns single-quoted strings into double-quoted ones, and closes a truncated object.
pub fn parse_json_lenient(s: &str) -> Option<Value> {
    let s = s.trim();
    let s = s
        .strip_prefix("```json")
        .or_else(|| s.strip_prefix("```"))
        .unwrap_or(s);
    let s = s.strip_suffix("```").unwrap_or(s).trim();
    if let Ok(v) = serde_json::from_str::<Value>(s) {
        return Some(v);
    }
    let start = s.find('{')?;
    let s = &s[start..];
    let candidate = extract_balanced(s)
        .map(str::to_string)
        .unwrap_or_else(|| close_truncated(s));
    for attempt in [
        candidate.clone(),
        remove_trailing_commas(&candidate),
        remove_trailing_commas(&single_to_double(&candidate)),
    ] {
        if let Ok(v) = serde_json::from_str::<Value>(&attempt) {
            return Some(v);
        }
    }
    None
}

fn remove_trailing_commas(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let chars: Vec<char> = s.chars().collect();
    let mut q = Quotes::default();
    for (i, &c) in chars.iter().enumerate() {
        if q.outside(c) && c == ',' {
            let next = chars[i + 1..].iter().find(|c| !c.is_whitespace());
            if matches!(next, Some('}') | Some(']')) {
                continue;
            }
        }
        out.push(c);
    }
    out
}

fn single_to_double(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_double = false;
    let mut in_single = false;
    let mut esc = false;
    for c in s.chars() {
        if esc {
            out.push(c);
            esc = false;
            continue;
        }
        match c {
            '\\' => {
                esc = true;
                out.push(c);
            }
            '"' if in_single => out.push_str("\\\""),
            '"' => {
                in_double = !in_double;
                out.push(c);
            }
            '\'' if !in_double => {
                in_single = !in_single;
                out.push('"');
            }
            _ => out.push(c),
        }
    }
    out
}

/// Closes an object cut off mid-way: ends an open string and closes open brackets.
fn close_truncated(s: &str) -> String {
    let mut stack = Vec::new();
    let mut q = Quotes::default();
    for c in s.chars() {
        if !q.outside(c) {
            continue;
        }
        match c {
            '{' => stack.push('}'),
            '[' => stack.push(']'),
            '}' | ']' => {
                stack.pop();
            }
            _ => {}
        }
    }
    let in_str = q.in_str;
    let mut out = s.trim_end().to_string();
    if in_str {
        out.push('"');
    }
    let t = out.trim_end().to_string();
    if t.ends_with(',') || t.ends_with(':') {
        out = t[..t.len() - 1].to_string();
        if t.ends_with(':') {
            out.push_str(": null");
        }
    }
    while let Some(c) = stack.pop() {
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tool_call_corpus() {
        let good = "<tool_call>\n{\"name\": \"memory_retrieval_tool\", \"arguments\": {\"query\": \"fit\"}}\n</tool_call>";
        assert_eq!(
            tool_calls(good).calls,
            vec![ToolCall {
                name: "memory_retrieval_tool".into(),
                arguments: json!({"query": "fit"})
            }]
        );
        let two = format!("think first {good} and {good}");
        assert_eq!(tool_calls(&two).calls.len(), 2);
        let truncated = "<tool_call>\n{\"name\": \"memory_retrieval_tool\", \"arguments\": {\"query\": \"size and fi";
        assert_eq!(
            tool_calls(truncated).calls[0].arguments,
            json!({"query": "size and fi"})
        );
        let single = "<tool_call>{'name': 'memory_retrieval_tool', 'arguments': {'query': 'budget',},}</tool_call>";
        assert_eq!(
            tool_calls(single).calls[0].arguments,
            json!({"query": "budget"})
        );
        let fenced = "<tool_call>```json\n{\"name\": \"t\", \"arguments\": \"{\\\"q\\\": 1}\"}\n```</tool_call>";
        assert_eq!(tool_calls(fenced).calls[0].arguments, json!({"q": 1}));
        let garbage = "<tool_call>call the tool please</tool_call>";
        let p = tool_calls(garbage);
        assert!(p.calls.is_empty());
        assert_eq!(
            p.errors,
            vec!["tool call is not JSON: call the tool please".to_string()]
        );
        let nameless = "<tool_call>{\"arguments\": {}}</tool_call>";
        assert!(tool_calls(nameless).errors[0].starts_with("tool call without a string `name`"));
        assert!(tool_calls("no calls here").calls.is_empty());
    }

    #[test]
    fn boxed_corpus() {
        let want = json!({"ideal_item_profile": "soft, BPA-free", "useful_memory_ids": ["u1-p-3"]});
        assert_eq!(boxed_json("\\boxed{\"ideal_item_profile\": \"soft, BPA-free\", \"useful_memory_ids\": [\"u1-p-3\"]}"), Some(want.clone()));
        assert_eq!(boxed_json("so \\boxed{{\"ideal_item_profile\": \"soft, BPA-free\", \"useful_memory_ids\": [\"u1-p-3\"]}}"), Some(want.clone()));
        assert_eq!(boxed_json("\\boxed{ {\"ideal_item_profile\": \"soft, BPA-free\", \"useful_memory_ids\": [\"u1-p-3\",],} }"), Some(want.clone()));
        assert_eq!(boxed_json("\\boxed{```json\n{\"ideal_item_profile\": \"soft, BPA-free\", \"useful_memory_ids\": [\"u1-p-3\"]}\n```}"), Some(want.clone()));
        let cut = boxed_json("\\boxed{{\"ideal_item_profile\": \"soft, BPA-fr").unwrap();
        assert_eq!(cut["ideal_item_profile"], "soft, BPA-fr");
        assert_eq!(boxed_json("\\boxed{not json at all}"), None);
        assert_eq!(boxed_json("no box"), None);
    }
}
