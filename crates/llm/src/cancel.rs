//! Cancellation of model calls: a [`Cancel`] token travels with a [`ChatRequest`]; every backend
//! checks it while it works (the local model before each decoding step, `echo` while it waits,
//! the OpenAI client before each attempt and after each streamed chunk, closing the connection so
//! that the server stops too) and gives up with [`LlmError::Cancelled`]. [`Cancellable`] puts one
//! token on every call of a whole agent loop: the service cancels an answer whose client has
//! gone or whose time is up, so that its LLM slot is free for the next request at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::{ChatModel, ChatRequest, ChatResponse, LlmError, Result};

/// A shared flag: once cancelled, it stays cancelled. Clones share it. Not part of a request's
/// identity: never serialised (cache keys are the serialised request), and two tokens compare
/// equal whatever their state.
#[derive(Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A token not cancelled yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels every call holding this token (or a clone of it).
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// `Err(Cancelled)` once cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(LlmError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// A guard that cancels this token when dropped (a handler's future dropped because its
    /// client went away, or returning early on a timeout). [`CancelOnDrop::disarm`] keeps it.
    pub fn on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(Some(self.clone()))
    }
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cancel({})", self.is_cancelled())
    }
}

impl PartialEq for Cancel {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// `Err(Cancelled)` when `c` is a cancelled token.
pub fn check(c: Option<&Cancel>) -> Result<()> {
    c.map_or(Ok(()), Cancel::check)
}

/// Cancels its token when dropped, unless disarmed.
#[derive(Debug)]
pub struct CancelOnDrop(Option<Cancel>);

impl CancelOnDrop {
    /// The work finished: dropping the guard no longer cancels.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.cancel();
        }
    }
}

/// A model whose every call carries `cancel` (refused at once when it is already cancelled).
pub struct Cancellable<'m> {
    inner: &'m dyn ChatModel,
    cancel: Cancel,
}

impl<'m> Cancellable<'m> {
    /// Wraps `inner`.
    pub fn new(inner: &'m dyn ChatModel, cancel: Cancel) -> Self {
        Cancellable { inner, cancel }
    }

    fn with(&self, req: &ChatRequest) -> ChatRequest {
        let mut r = req.clone();
        r.cancel = Some(self.cancel.clone());
        r
    }
}

impl ChatModel for Cancellable<'_> {
    fn id(&self) -> &str {
        self.inner.id()
    }

    fn score_choices(
        &self,
        reqs: &[ChatRequest],
        choices: &[&str],
    ) -> Vec<Result<crate::ChoiceScores>> {
        if self.cancel.is_cancelled() {
            return reqs.iter().map(|_| Err(LlmError::Cancelled)).collect();
        }
        // The token travels with each request, so that the backend stops mid-way too (a local
        // model between prefill passes, a server before each request).
        let reqs: Vec<ChatRequest> = reqs.iter().map(|r| self.with(r)).collect();
        self.inner.score_choices(&reqs, choices)
    }

    fn ready(&self) -> Result<()> {
        self.inner.ready()
    }

    fn chat_stream(
        &self,
        req: &ChatRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<ChatResponse> {
        self.cancel.check()?;
        self.inner.chat_stream(&self.with(req), on_text)
    }

    fn chat(&self, req: &ChatRequest) -> Result<ChatResponse> {
        self.cancel.check()?;
        self.inner.chat(&self.with(req))
    }

    fn chat_batch(&self, reqs: &[ChatRequest]) -> Vec<Result<ChatResponse>> {
        if self.cancel.is_cancelled() {
            return reqs.iter().map(|_| Err(LlmError::Cancelled)).collect();
        }
        let reqs: Vec<ChatRequest> = reqs.iter().map(|r| self.with(r)).collect();
        self.inner.chat_batch(&reqs)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::{Duration, Instant};

    use super::*;
    use crate::{EchoModel, Message};

    fn req() -> ChatRequest {
        ChatRequest {
            messages: vec![Message::user("Request: a red kite")],
            ..Default::default()
        }
    }

    #[test]
    fn a_slow_call_gives_up_soon_after_it_is_cancelled() {
        let m = EchoModel::from_id("echo@5000").unwrap();
        let cancel = Cancel::new();
        let c = cancel.clone();
        let t = Instant::now();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            c.cancel();
        });
        let r = Cancellable::new(&m, cancel.clone()).chat(&req());
        h.join().unwrap();
        assert!(matches!(r, Err(LlmError::Cancelled)), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        // Every later call of the same loop is refused at once, batches included.
        let r = Cancellable::new(&m, cancel.clone()).chat_batch(&[req(), req()]);
        assert!(r.iter().all(|r| matches!(r, Err(LlmError::Cancelled))));
        // Another token is untouched.
        let ok = Cancellable::new(&EchoModel::from_id("echo").unwrap(), Cancel::new()).chat(&req());
        assert!(ok.unwrap().text.contains("a red kite"));
    }

    /// Scores requests one by one, checking each one's token as a server client does; the
    /// client goes away (`leave` is cancelled) once the first request is answered.
    struct OneByOne {
        leave: Cancel,
    }

    impl ChatModel for OneByOne {
        fn id(&self) -> &str {
            "one-by-one"
        }
        fn chat_stream(&self, _: &ChatRequest, _: &mut dyn FnMut(&str)) -> Result<ChatResponse> {
            Err(LlmError::Unsupported("chat".into()))
        }
        fn score_choices(
            &self,
            reqs: &[ChatRequest],
            choices: &[&str],
        ) -> Vec<Result<crate::ChoiceScores>> {
            reqs.iter()
                .map(|r| {
                    crate::check_cancel(r.cancel.as_ref())?;
                    self.leave.cancel();
                    Ok(crate::ChoiceScores {
                        logprobs: vec![-1.0; choices.len()],
                        usage: Default::default(),
                    })
                })
                .collect()
        }
    }

    #[test]
    fn a_judgement_stops_mid_way_once_cancelled() {
        let cancel = Cancel::new();
        let m = OneByOne {
            leave: cancel.clone(),
        };
        let r = Cancellable::new(&m, cancel).score_choices(&[req(), req(), req()], &["Yes", "No"]);
        assert!(r[0].is_ok(), "{:?}", r[0]);
        assert!(
            r[1..].iter().all(|r| matches!(r, Err(LlmError::Cancelled))),
            "{r:?}"
        );
        // Without the wrapper nothing carries a token: every request is scored.
        let m = OneByOne {
            leave: Cancel::new(),
        };
        assert!(m
            .score_choices(&[req(), req()], &["Yes", "No"])
            .iter()
            .all(Result::is_ok));
    }

    #[test]
    fn a_guard_cancels_when_dropped_unless_disarmed() {
        let c = Cancel::new();
        c.on_drop().disarm();
        assert!(!c.is_cancelled());
        drop(c.on_drop());
        assert!(c.is_cancelled());
        assert!(matches!(c.check(), Err(LlmError::Cancelled)));
    }

    #[test]
    fn the_token_is_not_part_of_the_request() {
        let mut a = req();
        a.cancel = Some(Cancel::new());
        a.cancel.as_ref().unwrap().cancel();
        let mut b = req();
        b.cancel = Some(Cancel::new());
        assert_eq!(a, b);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&req()).unwrap()
        );
    }
}
