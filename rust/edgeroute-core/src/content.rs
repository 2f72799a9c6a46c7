//! Keyword and pattern matching over a prompt's text, in one pass.
//!
//! A `RegexSet` over a long prompt costs tens of microseconds: its overlapping
//! search must keep every pattern alive at every position, and with many
//! patterns its literal prefilter degrades to a byte-at-a-time automaton. Most
//! rule patterns start with a literal (`TICKET-`, `(?i)order`), and a match can
//! only begin where one of those literals occurs. So the literal prefixes of all
//! patterns join the rules' keywords in one ASCII case-insensitive Aho-Corasick
//! DFA (keywords are case-insensitive; for a pattern's literal that only widens
//! the gate), walked once over the text; each literal hit is then confirmed by an
//! anchored search of its pattern at that offset, which reads only as far as the
//! match needs. Patterns without a usable literal prefix (`.*x`, `\d+`) keep the
//! `RegexSet`, run only when a rule needing one of them is reached.

use std::collections::HashMap;

use regex::RegexSet;
use regex_automata::{meta, Anchored, Input};
use regex_syntax::hir::literal::Extractor;

use crate::error::{CoreError, Result};
use crate::needles::Needles;

/// Shorter literals would hit too often in ordinary prose to be worth gating on.
const MIN_LITERAL: usize = 3;
/// Beyond this many distinct lowercased prefixes, the pattern stays in the set.
const MAX_LITERALS: usize = 64;
/// Classes up to this size (case pairs such as `[Kk\u{212A}]`) expand into
/// literals; larger ones (`\d`) end the prefix, so `TICKET-\d+` gates on
/// `TICKET-` once rather than on ten literals.
const MAX_CLASS: usize = 4;

/// Compiled keywords and patterns of a rule set.
#[derive(Debug)]
pub struct ContentMatcher {
    /// Lowercased needles: every keyword and every gated pattern's literal prefixes.
    needles: Option<Needles>,
    /// Per needle, the keywords it is.
    needle_keywords: Vec<Vec<usize>>,
    /// Per needle, the gated patterns that may start with it.
    needle_patterns: Vec<Vec<usize>>,
    /// Per pattern, its anchored confirmer if gated by literals.
    gated: Vec<Option<meta::Regex>>,
    /// The patterns without literal prefixes, and their ids.
    ungated: Option<(RegexSet, Vec<usize>)>,
    keywords: usize,
}

/// Which keywords and gated patterns occur in a text.
#[derive(Debug, Clone, PartialEq)]
pub struct Hits {
    /// By keyword id.
    pub keywords: Vec<bool>,
    /// By pattern id; always false for ungated patterns (see [`ContentMatcher::ungated`]).
    pub patterns: Vec<bool>,
}

impl ContentMatcher {
    /// Compiles `keywords` (ASCII case-insensitive) and `patterns` (regular expressions).
    pub fn new(keywords: &[String], patterns: &[String]) -> Result<Self> {
        let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut needles: Vec<Vec<u8>> = Vec::new();
        let mut needle_keywords: Vec<Vec<usize>> = Vec::new();
        let mut needle_patterns: Vec<Vec<usize>> = Vec::new();
        let mut needle = |bytes: Vec<u8>| -> usize {
            *index.entry(bytes.to_ascii_lowercase()).or_insert_with_key(|k| {
                needles.push(k.clone());
                needle_keywords.push(Vec::new());
                needle_patterns.push(Vec::new());
                needles.len() - 1
            })
        };
        let mut kw_needles = Vec::with_capacity(keywords.len());
        for k in keywords {
            kw_needles.push(needle(k.as_bytes().to_vec()));
        }
        let mut gated = Vec::with_capacity(patterns.len());
        let mut pat_needles = Vec::new();
        let mut ungated_text = Vec::new();
        let mut ungated_ids = Vec::new();
        for (id, p) in patterns.iter().enumerate() {
            match gate(p) {
                Some((prefixes, confirm)) => {
                    for lit in prefixes {
                        pat_needles.push((needle(lit), id));
                    }
                    gated.push(Some(confirm));
                }
                None => {
                    ungated_text.push(p.as_str());
                    ungated_ids.push(id);
                    gated.push(None);
                }
            }
        }
        for (k, n) in kw_needles.into_iter().enumerate() {
            needle_keywords[n].push(k);
        }
        for (n, id) in pat_needles {
            if !needle_patterns[n].contains(&id) {
                needle_patterns[n].push(id);
            }
        }
        let automaton = if needles.is_empty() {
            None
        } else {
            Some(Needles::new(&needles)?)
        };
        let ungated = if ungated_text.is_empty() {
            None
        } else {
            let set = RegexSet::new(&ungated_text).map_err(|e| CoreError::Config(format!("patterns: {e}")))?;
            Some((set, ungated_ids))
        };
        Ok(Self {
            needles: automaton,
            needle_keywords,
            needle_patterns,
            gated,
            ungated,
            keywords: keywords.len(),
        })
    }

    /// Keywords and gated patterns found in `text`.
    pub fn scan(&self, text: &str) -> Hits {
        let mut hits = Hits {
            keywords: vec![false; self.keywords],
            patterns: vec![false; self.gated.len()],
        };
        let Some(needles) = &self.needles else { return hits };
        needles.find(text.as_bytes(), |n, start| self.hit(n, text, start, &mut hits));
        hits
    }

    fn hit(&self, needle: usize, text: &str, start: usize, hits: &mut Hits) {
        for &k in &self.needle_keywords[needle] {
            hits.keywords[k] = true;
        }
        for &p in &self.needle_patterns[needle] {
            if !hits.patterns[p] {
                let re = self.gated[p].as_ref().expect("needle of a gated pattern");
                hits.patterns[p] = re.is_match(Input::new(text).range(start..).anchored(Anchored::Yes));
            }
        }
    }

    /// Whether pattern `id` is decided by [`scan`](Self::scan) (else by [`ungated`](Self::ungated)).
    pub fn is_gated(&self, id: usize) -> bool {
        self.gated[id].is_some()
    }

    /// By pattern id, which ungated patterns match `text` (gated ones read false).
    pub fn ungated(&self, text: &str) -> Vec<bool> {
        let mut hits = vec![false; self.gated.len()];
        if let Some((set, ids)) = &self.ungated {
            for i in set.matches(text).iter() {
                hits[ids[i]] = true;
            }
        }
        hits
    }
}

/// The literal prefixes every match of `pattern` starts with, and an anchored
/// matcher to confirm a hit; `None` when the prefixes are unknown, too short or
/// too many to be a useful gate.
fn gate(pattern: &str) -> Option<(Vec<Vec<u8>>, meta::Regex)> {
    let hir = regex_syntax::parse(pattern).ok()?;
    let seq = Extractor::new().limit_class(MAX_CLASS).extract(&hir);
    let mut lits: Vec<Vec<u8>> = seq
        .literals()?
        .iter()
        .map(|l| l.as_bytes().to_ascii_lowercase())
        .collect();
    lits.sort_unstable();
    lits.dedup();
    if lits.len() > MAX_LITERALS || lits.iter().any(|l| l.len() < MIN_LITERAL) {
        return None;
    }
    let confirm = meta::Regex::new(pattern).ok()?;
    Some((lits, confirm))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn gated_and_ungated_patterns_agree_with_a_regex_set() {
        let patterns = strings(&[
            r"\bTICKET-\d+\b",
            r"(?i)order\s+#\d{3}",
            r"\d{4}-\d{2}",
            r".*needle",
            r"(?m)^INV-\d+",
            r"\bcat\b",
            r"ünï\w+",
            r"[a&&b]",
        ]);
        let m = ContentMatcher::new(&[], &patterns).unwrap();
        assert!(m.is_gated(0) && m.is_gated(1) && !m.is_gated(2) && !m.is_gated(3));
        let set = RegexSet::new(&patterns).unwrap();
        for text in [
            "see TICKET-42 and ORDER   #123x",
            "TICKET-x; xTICKET-1; TICKET-7a; TICKET-8",
            "1999-12 a needle",
            "line\nINV-7 ünïcode",
            "concatenate cat",
            "scatter",
            "",
        ] {
            let hits = m.scan(text);
            let ungated = m.ungated(text);
            let got: Vec<bool> = (0..patterns.len())
                .map(|p| if m.is_gated(p) { hits.patterns[p] } else { ungated[p] })
                .collect();
            let want: Vec<bool> = (0..patterns.len()).map(|p| set.matches(text).matched(p)).collect();
            assert_eq!(got, want, "{text:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Gating never changes what matches: every pattern and keyword agrees with a plain
        /// `RegexSet` and a case-insensitive substring search, on texts dense in near-misses.
        #[test]
        fn agrees_with_regex_set_and_substring_search(
            pieces in proptest::collection::vec(proptest::string::string_regex("[Tt]icket-[0-9x]{1,3} |ORDER #[0-9]{3}x?|order|ß|K|\u{212A}|é|[a-z ]{1,4}|\n|[0-9-]{1,5}").unwrap(), 0..400)
        ) {
            // Up to a few kB, so that long texts are walked in several slices.
            let text = pieces.concat();
            let keywords = strings(&["ticket", "Order #1", "kelvin", "ß"]);
            let patterns = strings(&[
                r"\bTICKET-\d+\b", r"(?i)order\s+#\d{3}x", r"(?i)ticket-[0-9]{2}\b", r"\d{3}-\d", r"(?m)^order",
                r"(?i)k", r"ticket-x+$",
            ]);
            let m = ContentMatcher::new(&keywords, &patterns).unwrap();
            let set = RegexSet::new(&patterns).unwrap();
            let hits = m.scan(&text);
            let ungated = m.ungated(&text);
            for p in 0..patterns.len() {
                let got = if m.is_gated(p) { hits.patterns[p] } else { ungated[p] };
                proptest::prop_assert_eq!(got, set.matches(&text).matched(p), "pattern {}", &patterns[p]);
            }
            let lower = text.to_ascii_lowercase();
            for (k, kw) in keywords.iter().enumerate() {
                proptest::prop_assert_eq!(hits.keywords[k], lower.contains(&kw.to_ascii_lowercase()), "keyword {}", kw);
            }
        }
    }

    #[test]
    fn needles_across_slice_boundaries_are_found() {
        let m = ContentMatcher::new(&strings(&["zanzibar"]), &strings(&[r"(?i)order\s+#\d{3}x"])).unwrap();
        // 2,000 bytes are walked in four slices of 500: put the needles across each boundary.
        for at in (490..510).chain(990..1010).chain(1490..1510).chain([0, 1989]) {
            let mut text = "a".repeat(2000);
            text.replace_range(at..at + 8, "zanzibar");
            assert_eq!(m.scan(&text).keywords, [true], "keyword at {at}");
            let mut text = "a".repeat(2000);
            text.replace_range(at..at + 11, "ORDER #123x");
            assert_eq!(m.scan(&text).patterns, [true], "pattern at {at}");
        }
        assert_eq!(m.scan(&"a".repeat(2000)).keywords, [false]);
    }

    #[test]
    fn keywords_are_case_insensitive_and_share_needles_with_patterns() {
        let m = ContentMatcher::new(&strings(&["Order", "refund", "order"]), &strings(&[r"(?i)order #\d"])).unwrap();
        let hits = m.scan("ORDER #5, no RefUnd");
        assert_eq!(hits.keywords, [true, true, true]);
        assert_eq!(hits.patterns, [true]);
        let hits = m.scan("order #x");
        assert_eq!((hits.keywords[0], hits.patterns[0]), (true, false));
    }
}
