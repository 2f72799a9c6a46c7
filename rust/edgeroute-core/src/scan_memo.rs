//! What the rules found in prompts seen lately (keywords, patterns, PII), by their exact
//! text and body.
//!
//! A cache hit is a body sent before, and its rules are evaluated again (a hit is served
//! only where they allow): the keyword walk and the PII scan over the bench's 7 kB chat
//! were ~59k of a hit's ~535k instructions on the event loop. They are pure functions of
//! the text, the body and the rule set, so a body seen before takes what they found then;
//! the conditions that depend on the caller (tags, team, time, tokens) are checked afresh.
//! A prompt is looked for by its lengths and a few of its bytes (its text's end and middle),
//! then compared whole, so two prompts never share findings. A spot holds at most
//! [`SHARED`] prompts (crafted ones that share it are scanned afresh, never searched
//! longer), and the memo is bounded by prompts and bytes, the oldest going first.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use crate::content::Hits;
use crate::pii::PiiSet;

/// Prompts remembered at most.
const MAX_ENTRIES: usize = 1024;
/// Bytes of text and body remembered at most.
const MAX_BYTES: usize = 4 << 20;
/// A larger prompt is scanned afresh every time (it would crowd out many small ones).
const MAX_PROMPT: usize = 256 << 10;
/// Prompts remembered under one spot.
const SHARED: usize = 8;
/// Bytes of the text's end and middle that, with the lengths, make its spot.
const TAIL: usize = 64;
const MIDDLE: usize = 32;

/// What the rules computed of one prompt: each part once some rule needed it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Findings {
    pub hits: Option<Hits>,
    pub ungated: Option<Vec<bool>>,
    pub pii: Option<PiiSet>,
}

#[derive(Debug)]
struct Seen {
    text: Box<str>,
    body: Option<Box<str>>,
    findings: Findings,
}

impl Seen {
    fn is(&self, text: &str, body: Option<&str>) -> bool {
        &*self.text == text && self.body.as_deref() == body
    }

    fn bytes(&self) -> usize {
        self.text.len() + self.body.as_ref().map_or(0, |b| b.len())
    }
}

#[derive(Debug, Default)]
struct Inner {
    spots: HashMap<u64, Vec<Arc<Seen>>>,
    /// Oldest first, with their spots.
    order: VecDeque<(u64, Arc<Seen>)>,
    bytes: usize,
}

/// See the module's doc.
#[derive(Debug, Default)]
pub(crate) struct ScanMemo {
    inner: Mutex<Inner>,
}

fn spot(text: &str, body: Option<&str>) -> u64 {
    let t = text.as_bytes();
    let half = t.len() / 2;
    let mut h = DefaultHasher::new();
    (t.len(), body.map(str::len)).hash(&mut h);
    t[t.len().saturating_sub(TAIL)..].hash(&mut h);
    t[half..(half + MIDDLE).min(t.len())].hash(&mut h);
    h.finish()
}

impl ScanMemo {
    /// What was found in this prompt before (nothing: not seen lately, or too large).
    pub fn get(&self, text: &str, body: Option<&str>) -> Findings {
        if text.len() + body.map_or(0, str::len) > MAX_PROMPT {
            return Findings::default();
        }
        let key = spot(text, body);
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .spots
            .get(&key)
            .and_then(|shared| shared.iter().find(|s| s.is(text, body)))
            .map(|s| s.findings.clone())
            .unwrap_or_default()
    }

    /// Remembers what was found in this prompt (`known`: what `get` gave; nothing is
    /// written when no more was found).
    pub fn put(&self, text: &str, body: Option<&str>, known: &Findings, found: Findings) {
        if found == *known || text.len() + body.map_or(0, str::len) > MAX_PROMPT {
            return;
        }
        let key = spot(text, body);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *inner;
        let shared = inner.spots.entry(key).or_default();
        if let Some(old) = shared.iter_mut().find(|s| s.is(text, body)) {
            // Found more of a prompt remembered (a rule reached only by another caller).
            let seen = Arc::new(Seen {
                text: old.text.clone(),
                body: old.body.clone(),
                findings: found,
            });
            if let Some(at) = inner.order.iter_mut().find(|(_, s)| Arc::ptr_eq(s, old)) {
                at.1 = Arc::clone(&seen);
            }
            *old = seen;
            return;
        }
        if shared.len() >= SHARED {
            return;
        }
        let seen = Arc::new(Seen {
            text: text.into(),
            body: body.map(Into::into),
            findings: found,
        });
        inner.bytes += seen.bytes();
        shared.push(Arc::clone(&seen));
        inner.order.push_back((key, seen));
        while inner.order.len() > MAX_ENTRIES || inner.bytes > MAX_BYTES {
            let Some((key, gone)) = inner.order.pop_front() else {
                break;
            };
            inner.bytes -= gone.bytes();
            if let Some(shared) = inner.spots.get_mut(&key) {
                shared.retain(|s| !Arc::ptr_eq(s, &gone));
                if shared.is_empty() {
                    inner.spots.remove(&key);
                }
            }
        }
    }

    /// Prompts remembered now, and their bytes (for tests).
    #[cfg(test)]
    pub fn size(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (inner.order.len(), inner.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(pii: u8) -> Findings {
        Findings {
            hits: None,
            ungated: Some(vec![pii == 1]),
            pii: Some(PiiSet::default()),
        }
    }

    #[test]
    fn a_prompt_is_found_only_by_its_exact_text_and_body() {
        let memo = ScanMemo::default();
        let text = "x".repeat(300);
        memo.put(&text, Some("{}"), &Findings::default(), found(1));
        assert_eq!(memo.get(&text, Some("{}")), found(1));
        // One byte apart where the spot does not look (early in the text): compared whole.
        let mut other = text.clone();
        other.replace_range(3..4, "y");
        assert_eq!(memo.get(&other, Some("{}")), Findings::default());
        assert_eq!(memo.get(&text, Some("[]")), Findings::default());
        assert_eq!(memo.get(&text, None), Findings::default());
        // More found later replaces what was remembered; nothing new writes nothing.
        memo.put(&text, Some("{}"), &found(1), found(0));
        assert_eq!(memo.get(&text, Some("{}")), found(0));
        assert_eq!(memo.size(), (1, 302));
    }

    #[test]
    fn bounded_by_prompts_bytes_and_spot() {
        let memo = ScanMemo::default();
        for i in 0..MAX_ENTRIES + 10 {
            memo.put(&format!("prompt {i}"), None, &Findings::default(), found(1));
        }
        assert_eq!(memo.size().0, MAX_ENTRIES);
        assert_eq!(memo.get("prompt 0", None), Findings::default()); // the oldest went first
        assert_eq!(memo.get(&format!("prompt {}", MAX_ENTRIES + 9), None), found(1));
        let big = "y".repeat(MAX_PROMPT + 1);
        memo.put(&big, None, &Findings::default(), found(1));
        assert_eq!(memo.get(&big, None), Findings::default());
        let memo = ScanMemo::default();
        for i in 0..20 {
            let (a, b) = ((b'a' + i) as char, "z".repeat(200)); // same lengths, end and middle
            memo.put(&format!("{a}{b}"), None, &Findings::default(), found(1));
        }
        assert_eq!(memo.size().0, SHARED);
        let chunk = "w".repeat(200 << 10);
        for i in 0..40 {
            memo.put(&format!("{i:03}{chunk}"), None, &Findings::default(), found(1));
        }
        assert!(memo.size().1 <= MAX_BYTES, "{:?}", memo.size());
    }
}
