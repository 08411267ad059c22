//! The chat template stored in a GGUF file, rendered with a real Jinja engine (minijinja with
//! Python-compatible string methods), so every model formats conversations its own way.

use minijinja::{Environment, Value};
use serde_json::json;

use crate::Result;
use mrrec_llm::{LlmError, Message, Role, ToolSpec};

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// Python's `json.dumps(x, ensure_ascii=False)`: ", " and ": " separators, keys in order.
fn python_json(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(m) => {
            out.push('{');
            for (i, (k, v)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                python_json(v, out);
            }
            out.push('}');
        }
        serde_json::Value::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_json(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

/// Serialises a value the way the reference (Python) templates' `tojson` does.
pub fn to_python_json(v: &serde_json::Value) -> String {
    let mut s = String::new();
    python_json(v, &mut s);
    s
}

fn tojson(v: Value) -> std::result::Result<Value, minijinja::Error> {
    let j: serde_json::Value = serde_json::to_value(&v).map_err(|e| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    })?;
    Ok(Value::from_safe_string(to_python_json(&j)))
}

fn raise(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        msg,
    ))
}

impl ChatTemplate {
    /// Compiles `source`.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| crate::LocalError::Llm(LlmError::Template(e.to_string())))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.unwrap_or("").to_string(),
            eos_token: eos_token.unwrap_or("").to_string(),
        })
    }

    /// Renders a conversation (with tools, if any); `add_generation_prompt` opens the assistant's turn.
    pub fn render(
        &self,
        messages: &[Message],
        tools: &[ToolSpec],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let msgs: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| {
                let role = match m.role {
                    Role::System => "system",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                    Role::Tool => "tool",
                };
                let mut o = json!({"role": role, "content": m.content});
                if !m.tool_calls.is_empty() {
                    o["tool_calls"] = m
                        .tool_calls
                        .iter()
                        .map(|c| json!({"type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                        .collect();
                }
                o
            })
            .collect();
        let tools: Vec<serde_json::Value> = tools.iter().map(ToolSpec::to_openai).collect();
        let ctx = json!({
            "messages": msgs,
            "tools": if tools.is_empty() { serde_json::Value::Null } else { json!(tools) },
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        });
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| crate::LocalError::Llm(LlmError::Template(e.to_string())))?;
        tmpl.render(Value::from(minijinja::value::Serde(ctx)))
            .map_err(|e| crate::LocalError::Llm(LlmError::Template(format!("{e:#}"))))
    }
}
