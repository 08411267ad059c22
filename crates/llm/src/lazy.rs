//! A chat model loaded on its first request: its id is known before (it keys caches and names
//! kept results), its weights are read only when something is asked of it. A run whose every
//! answer is already kept (a resumed distillation whose teacher scored every list) never loads
//! the teacher.

use std::sync::{Arc, Mutex};

use crate::{ChatModel, ChatRequest, ChatResponse, ChoiceScores, LlmError, Result};

/// How a [`LazyChatModel`] loads its model.
pub type Loader = Box<dyn Fn() -> Result<Box<dyn ChatModel>> + Send + Sync>;

/// A chat model loaded by its first request (see the module docs). The model loaded must have the
/// id given: a loader whose model answers to another id is an error, never a silent change of
/// what the id names.
pub struct LazyChatModel {
    id: String,
    load: Loader,
    model: Mutex<Option<Arc<dyn ChatModel>>>,
}

impl LazyChatModel {
    /// A model named `id`, loaded by `load` when first asked.
    pub fn new(id: impl Into<String>, load: Loader) -> Self {
        LazyChatModel {
            id: id.into(),
            load,
            model: Mutex::new(None),
        }
    }

    /// Whether the model has been loaded.
    pub fn is_loaded(&self) -> bool {
        self.model.lock().map(|m| m.is_some()).unwrap_or(false)
    }

    /// The model, loaded now if it was not (once: concurrent first requests wait for one load).
    fn get(&self) -> Result<Arc<dyn ChatModel>> {
        let mut slot = self
            .model
            .lock()
            .map_err(|_| LlmError::Engine(format!("loading {}: a load panicked", self.id)))?;
        if let Some(m) = slot.as_ref() {
            return Ok(m.clone());
        }
        let m: Arc<dyn ChatModel> = Arc::from((self.load)()?);
        if m.id() != self.id {
            return Err(LlmError::Engine(format!(
                "the model loaded as {} answers to the id {}: its kept answers would be another model's",
                self.id,
                m.id()
            )));
        }
        *slot = Some(m.clone());
        Ok(m)
    }
}

impl ChatModel for LazyChatModel {
    fn id(&self) -> &str {
        &self.id
    }

    fn chat_stream(
        &self,
        req: &ChatRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<ChatResponse> {
        self.get()?.chat_stream(req, on_text)
    }

    fn chat(&self, req: &ChatRequest) -> Result<ChatResponse> {
        self.get()?.chat(req)
    }

    fn chat_batch(&self, reqs: &[ChatRequest]) -> Vec<Result<ChatResponse>> {
        // An empty batch (a cache in front answered everything) asks nothing: no load.
        if reqs.is_empty() {
            return Vec::new();
        }
        match self.get() {
            Ok(m) => m.chat_batch(reqs),
            Err(e) => reqs.iter().map(|_| Err(e.clone_message())).collect(),
        }
    }

    /// Ready when loaded (a model not loaded yet is ready: loading is what a request does).
    fn ready(&self) -> Result<()> {
        let loaded = self.model.lock().ok().and_then(|m| m.clone());
        loaded.map_or(Ok(()), |m| m.ready())
    }

    fn score_choices(&self, reqs: &[ChatRequest], choices: &[&str]) -> Vec<Result<ChoiceScores>> {
        if reqs.is_empty() {
            return Vec::new();
        }
        match self.get() {
            Ok(m) => m.score_choices(reqs, choices),
            Err(e) => reqs.iter().map(|_| Err(e.clone_message())).collect(),
        }
    }
}

impl LlmError {
    /// The error in words, for each request of a batch that failed as a whole.
    fn clone_message(&self) -> LlmError {
        LlmError::Engine(self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EchoModel;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn ask(text: &str) -> ChatRequest {
        ChatRequest {
            messages: vec![crate::Message::user(text)],
            ..Default::default()
        }
    }

    fn counted(id: &'static str, loads: Arc<AtomicUsize>) -> LazyChatModel {
        LazyChatModel::new(
            "echo",
            Box::new(move || {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok(Box::new(EchoModel::from_id(id).expect("an echo id")) as Box<dyn ChatModel>)
            }),
        )
    }

    #[test]
    fn the_model_is_loaded_by_its_first_request_and_only_once() {
        let loads = Arc::new(AtomicUsize::new(0));
        let m = counted("echo", loads.clone());
        assert_eq!(m.id(), "echo");
        m.ready().unwrap();
        assert!(m.chat_batch(&[]).is_empty() && m.score_choices(&[], &["Yes"]).is_empty());
        assert_eq!(
            loads.load(Ordering::SeqCst),
            0,
            "naming, probing and empty batches load nothing"
        );
        assert!(!m.is_loaded());
        let req = ask("hello");
        let a = m.chat(&req).unwrap();
        assert!(m.is_loaded());
        let b = m.chat_batch(&[req.clone(), req]);
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(b[0].as_ref().unwrap().text, a.text);
    }

    #[test]
    fn a_loader_whose_model_has_another_id_is_an_error_and_a_failed_load_is_tried_again() {
        let m = counted("echo@1", Arc::new(AtomicUsize::new(0)));
        let e = m.chat(&ask("x")).unwrap_err().to_string();
        assert!(e.contains("echo@1") && e.contains("loaded as echo"), "{e}");
        assert!(!m.is_loaded());

        let tries = Arc::new(AtomicUsize::new(0));
        let t = tries.clone();
        let failing = LazyChatModel::new(
            "m",
            Box::new(move || {
                t.fetch_add(1, Ordering::SeqCst);
                Err(LlmError::Engine("no weights".into()))
            }),
        );
        let errs = failing.score_choices(&[ask("a"), ask("b")], &["Yes"]);
        assert_eq!(errs.len(), 2);
        assert!(errs
            .iter()
            .all(|r| r.as_ref().unwrap_err().to_string().contains("no weights")));
        assert!(failing.chat(&ask("c")).is_err());
        assert_eq!(
            tries.load(Ordering::SeqCst),
            2,
            "a failed load is not remembered as loaded"
        );
    }
}
