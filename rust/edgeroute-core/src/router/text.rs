//! The prompt's text, as the classifier and the rules' text conditions read it.

use crate::request::ChatRequest;

/// The text of the user's messages: what the classifier was trained on.
pub(super) fn user_text(req: &ChatRequest<'_>) -> String {
    let mut text = String::new();
    for m in req.messages.iter().filter(|m| m.role == "user") {
        m.for_each_text(|t| {
            text.push_str(t);
            text.push('\n');
        });
    }
    text
}

pub(super) fn prompt_text(req: &ChatRequest<'_>) -> String {
    let mut len = 0;
    for m in &req.messages {
        m.for_each_text(|t| len += t.len() + 1);
    }
    let mut text = String::with_capacity(len);
    for m in &req.messages {
        m.for_each_text(|t| {
            text.push_str(t);
            text.push('\n');
        });
    }
    text
}
