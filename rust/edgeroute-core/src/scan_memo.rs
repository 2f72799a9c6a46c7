//! What scans of a request found, for requests seen lately, by their exact bytes.
//!
//! A cache hit is a body sent before, and it is checked and its rules evaluated again (a
//! hit is served only where they allow): on the bench's 7 kB chat the keyword walk and the
//! PII scan were ~59k of a hit's ~535k instructions on the event loop, and the body's depth
//! and repeated-key scans ~10k. Each is a pure function of the bytes it reads (and of the
//! rule set, whose memo goes with it), so bytes seen before take what was found then; the
//! conditions that depend on the caller (tags, team, time, tokens) are checked afresh.
//! Bytes are looked for by their lengths and a few of them (the first part's end and
//! middle), then compared whole, so two requests never share findings. A spot holds at
//! most [`SHARED`] of them (crafted ones that share it are scanned afresh, never searched
//! longer), and the memo is bounded by entries and bytes, the oldest going first.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use crate::content::Hits;
use crate::pii::PiiSet;

/// Entries remembered at most.
const MAX_ENTRIES: usize = 1024;
/// Bytes remembered at most.
const MAX_BYTES: usize = 4 << 20;
/// Larger ones are scanned afresh every time (they would crowd out many small ones).
const MAX_PROMPT: usize = 256 << 10;
/// Entries remembered under one spot.
const SHARED: usize = 8;
/// Bytes of the first part's end and middle that, with the lengths, make a spot.
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
struct Seen<V> {
    text: Box<[u8]>,
    body: Option<Box<[u8]>>,
    findings: V,
}

impl<V> Seen<V> {
    fn is(&self, text: &[u8], body: Option<&[u8]>) -> bool {
        &*self.text == text && self.body.as_deref() == body
    }

    fn bytes(&self) -> usize {
        self.text.len() + self.body.as_ref().map_or(0, |b| b.len())
    }
}

#[derive(Debug)]
struct Inner<V> {
    spots: HashMap<u64, Vec<Arc<Seen<V>>>>,
    /// Oldest first, with their spots.
    order: VecDeque<(u64, Arc<Seen<V>>)>,
    bytes: usize,
}

impl<V> Default for Inner<V> {
    fn default() -> Self {
        Self {
            spots: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
        }
    }
}

/// See the module's doc: what was found (`V`) in a `text` and, read with it, a `body`.
#[derive(Debug)]
pub(crate) struct ScanMemo<V> {
    inner: Mutex<Inner<V>>,
}

impl<V> Default for ScanMemo<V> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
        }
    }
}

fn spot(t: &[u8], body: Option<&[u8]>) -> u64 {
    let half = t.len() / 2;
    let mut h = DefaultHasher::new();
    (t.len(), body.map(<[u8]>::len)).hash(&mut h);
    t[t.len().saturating_sub(TAIL)..].hash(&mut h);
    t[half..(half + MIDDLE).min(t.len())].hash(&mut h);
    h.finish()
}

impl<V: Clone + Default + PartialEq> ScanMemo<V> {
    /// What was found in these bytes before (the default: not seen lately, or too large).
    pub fn get(&self, text: &[u8], body: Option<&[u8]>) -> V {
        if text.len() + body.map_or(0, <[u8]>::len) > MAX_PROMPT {
            return V::default();
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

    /// Remembers what was found in these bytes (`known`: what `get` gave; nothing is
    /// written when no more was found).
    pub fn put(&self, text: &[u8], body: Option<&[u8]>, known: &V, found: V) {
        if found == *known || text.len() + body.map_or(0, <[u8]>::len) > MAX_PROMPT {
            return;
        }
        let key = spot(text, body);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *inner;
        let shared = inner.spots.entry(key).or_default();
        if let Some(old) = shared.iter_mut().find(|s| s.is(text, body)) {
            // Found more in bytes remembered (a rule reached only by another caller).
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

    /// Entries remembered now, and their bytes (for tests).
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
        let (text, braces) = (text.as_bytes(), Some(&b"{}"[..]));
        memo.put(text, braces, &Findings::default(), found(1));
        assert_eq!(memo.get(text, braces), found(1));
        // One byte apart where the spot does not look (early in the text): compared whole.
        let mut other = text.to_vec();
        other[3] = b'y';
        assert_eq!(memo.get(&other, braces), Findings::default());
        assert_eq!(memo.get(text, Some(b"[]")), Findings::default());
        assert_eq!(memo.get(text, None), Findings::default());
        // More found later replaces what was remembered; nothing new writes nothing.
        memo.put(text, braces, &found(1), found(0));
        assert_eq!(memo.get(text, braces), found(0));
        assert_eq!(memo.size(), (1, 302));
    }

    #[test]
    fn bounded_by_prompts_bytes_and_spot() {
        let memo = ScanMemo::default();
        let put =
            |memo: &ScanMemo<Findings>, text: &str| memo.put(text.as_bytes(), None, &Findings::default(), found(1));
        for i in 0..MAX_ENTRIES + 10 {
            put(&memo, &format!("prompt {i}"));
        }
        assert_eq!(memo.size().0, MAX_ENTRIES);
        assert_eq!(memo.get(b"prompt 0", None), Findings::default()); // the oldest went first
        assert_eq!(
            memo.get(format!("prompt {}", MAX_ENTRIES + 9).as_bytes(), None),
            found(1)
        );
        let big = "y".repeat(MAX_PROMPT + 1);
        put(&memo, &big);
        assert_eq!(memo.get(big.as_bytes(), None), Findings::default());
        let memo = ScanMemo::default();
        for i in 0..20 {
            let (a, b) = ((b'a' + i) as char, "z".repeat(200)); // same lengths, end and middle
            put(&memo, &format!("{a}{b}"));
        }
        assert_eq!(memo.size().0, SHARED);
        let chunk = "w".repeat(200 << 10);
        for i in 0..40 {
            put(&memo, &format!("{i:03}{chunk}"));
        }
        assert!(memo.size().1 <= MAX_BYTES, "{:?}", memo.size());
    }
}
