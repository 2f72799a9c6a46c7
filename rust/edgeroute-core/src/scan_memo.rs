//! What scans of a request found, for requests seen lately, by their exact bytes.
//!
//! A cache hit is a body sent before, and it is checked and its rules evaluated again (a
//! hit is served only where they allow): on the bench's 7 kB chat the keyword walk and the
//! PII scan were ~59k of a hit's ~535k instructions on the event loop, and the body's depth
//! and repeated-key scans ~10k. Each is a pure function of the bytes it reads (and of the
//! rule set, whose memo goes with it), so bytes seen before take what was found then; the
//! conditions that depend on the caller (tags, team, time, tokens) are checked afresh.
//! Bytes are looked for by a hash of all of them (xxh3, seeded at random for each memo, so
//! that bodies cannot be crafted to share a spot), then compared whole, so two requests
//! never share findings. Bytes are kept only when seen a second time (most prompts are
//! seen once: only their hash is kept, in a bounded ring, and nothing is copied). A spot
//! holds at most [`SHARED`] entries, and the memo is bounded by entries and bytes, the
//! oldest going first.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::content::Hits;
use crate::pii::PiiSet;

/// Entries remembered at most.
const MAX_ENTRIES: usize = 1024;
/// Bytes remembered at most.
const MAX_BYTES: usize = 4 << 20;
/// Larger ones are scanned afresh every time (they would crowd out many small ones).
const MAX_PROMPT: usize = 256 << 10;
/// Entries remembered under one spot (bytes of one hash: a collision, or none).
const SHARED: usize = 8;
/// Hashes of bytes seen once, remembered at most (their bytes are kept at a second sight).
const ONCE: usize = 4096;

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
    /// Spots of bytes seen once lately, and their order (oldest first).
    once: HashSet<u64>,
    once_order: VecDeque<u64>,
}

impl<V> Default for Inner<V> {
    fn default() -> Self {
        Self {
            spots: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            once: HashSet::new(),
            once_order: VecDeque::new(),
        }
    }
}

/// See the module's doc: what was found (`V`) in a `text` and, read with it, a `body`.
#[derive(Debug)]
pub(crate) struct ScanMemo<V> {
    inner: Mutex<Inner<V>>,
    seed: u64,
}

impl<V> Default for ScanMemo<V> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            seed: RandomState::new().hash_one(0u8),
        }
    }
}

impl<V> ScanMemo<V> {
    fn spot(&self, text: &[u8], body: Option<&[u8]>) -> u64 {
        match body {
            // The text is read from the body (the rules' prompt is its messages' texts): the
            // body alone finds it, and the whole comparison checks both.
            Some(b) => xxh3_64_with_seed(b, self.seed ^ (text.len() as u64).rotate_left(32)),
            None => xxh3_64_with_seed(text, self.seed),
        }
    }
}

impl<V: Clone + Default + PartialEq> ScanMemo<V> {
    /// What was found in these bytes before (the default: not seen lately, or too large),
    /// and their spot, for `put` (hashed once a request).
    pub fn get(&self, text: &[u8], body: Option<&[u8]>) -> (V, u64) {
        if text.len() + body.map_or(0, <[u8]>::len) > MAX_PROMPT {
            return (V::default(), 0);
        }
        let key = self.spot(text, body);
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let found = inner
            .spots
            .get(&key)
            .and_then(|shared| shared.iter().find(|s| s.is(text, body)))
            .map(|s| s.findings.clone())
            .unwrap_or_default();
        (found, key)
    }

    /// Remembers what was found in these bytes (`key` and `known`: what `get` gave for them;
    /// nothing is written when no more was found).
    pub fn put(&self, key: u64, text: &[u8], body: Option<&[u8]>, known: &V, found: V) {
        if found == *known || text.len() + body.map_or(0, <[u8]>::len) > MAX_PROMPT {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *inner;
        if !inner.spots.contains_key(&key) && inner.once.insert(key) {
            // Seen once: its hash kept, not its bytes (most prompts never come again).
            inner.once_order.push_back(key);
            if inner.once_order.len() > ONCE {
                if let Some(gone) = inner.once_order.pop_front() {
                    inner.once.remove(&gone);
                }
            }
            return;
        }
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

    /// `put` with the spot found afresh (for tests).
    #[cfg(test)]
    pub fn put_new(&self, text: &[u8], body: Option<&[u8]>, known: &V, found: V) {
        self.put(self.spot(text, body), text, body, known, found);
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
        memo.put_new(text, braces, &Findings::default(), found(1));
        // Seen once: only its hash kept, nothing copied.
        assert_eq!((memo.get(text, braces).0, memo.size()), (Findings::default(), (0, 0)));
        memo.put_new(text, braces, &Findings::default(), found(1));
        assert_eq!(memo.get(text, braces).0, found(1));
        // One byte apart: its own.
        let mut other = text.to_vec();
        other[3] = b'y';
        assert_eq!(memo.get(&other, braces).0, Findings::default());
        assert_eq!(memo.get(text, Some(b"[]")).0, Findings::default());
        assert_eq!(memo.get(text, None).0, Findings::default());
        // More found later replaces what was remembered; nothing new writes nothing.
        memo.put_new(text, braces, &found(1), found(0));
        assert_eq!(memo.get(text, braces).0, found(0));
        assert_eq!(memo.size(), (1, 302));
    }

    #[test]
    fn bounded_by_prompts_bytes_and_spot() {
        let memo = ScanMemo::default();
        let put = |memo: &ScanMemo<Findings>, text: &str| {
            for _ in 0..2 {
                memo.put_new(text.as_bytes(), None, &Findings::default(), found(1));
            }
        };
        for i in 0..MAX_ENTRIES + 10 {
            put(&memo, &format!("prompt {i}"));
        }
        assert_eq!(memo.size().0, MAX_ENTRIES);
        assert_eq!(memo.get(b"prompt 0", None).0, Findings::default()); // the oldest went first
        assert_eq!(
            memo.get(format!("prompt {}", MAX_ENTRIES + 9).as_bytes(), None).0,
            found(1)
        );
        let big = "y".repeat(MAX_PROMPT + 1);
        put(&memo, &big);
        assert_eq!(memo.get(big.as_bytes(), None).0, Findings::default());
        let memo = ScanMemo::default();
        for i in 0..20 {
            let (a, b) = ((b'a' + i) as char, "z".repeat(200)); // same length, end and middle
            put(&memo, &format!("{a}{b}"));
        }
        assert_eq!(memo.size().0, 20); // each by its own hash: none crowds another out
                                       // A prompt's hash is forgotten after `ONCE` others seen once: a second sight is a first.
        let memo = ScanMemo::default();
        memo.put_new(b"first", None, &Findings::default(), found(1));
        for i in 0..ONCE {
            memo.put_new(format!("other {i}").as_bytes(), None, &Findings::default(), found(1));
        }
        memo.put_new(b"first", None, &Findings::default(), found(1));
        assert_eq!(memo.size().0, 0);
        let memo = ScanMemo::default();
        let chunk = "w".repeat(200 << 10);
        for i in 0..40 {
            put(&memo, &format!("{i:03}{chunk}"));
        }
        assert!(memo.size().1 <= MAX_BYTES, "{:?}", memo.size());
    }
}
