//! The needles of a [`ContentMatcher`](crate::content::ContentMatcher) (keywords and
//! literal prefixes of patterns, ASCII case-insensitive) as a dense DFA, walked over a
//! text in interleaved slices.
//!
//! aho-corasick builds the automaton; its transitions are copied here into one flat
//! table of a power-of-two length, indexed by a state plus a byte's class, masked to
//! that length: an index that is always in range needs no bounds check. Each entry
//! also carries a match flag in its top bit (which the mask drops), so the slices'
//! states are tested for a match with one OR each. A step is then six instructions a
//! slice; the crate's `next_state` and `is_special` took about ten (a class lookup, a
//! bounds check, a compare for a special state), and the walk spilled its slices'
//! pointers to the stack.
//!
//! When the needles share few distinct three-byte prefixes (`order`, `ticket-…`, a
//! keyword family), a SIMD search for those prefixes (Teddy) skips the text where no
//! needle can start, and the table is walked only from each such place until it is back
//! in its start state: on the bench's prompt, a few hundred bytes walked instead of 10 kB.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::dfa::DFA;
use aho_corasick::packed;
use aho_corasick::{Anchored, MatchKind, Span};

use crate::error::{CoreError, Result};

/// Set in a table entry whose state ends at least one needle.
const MATCH: u32 = 1 << 31;
/// Texts shorter than this are walked in one slice (see [`Needles::walk`]).
const SHORT_TEXT: usize = 512;
/// Slices of a longer text walked at once.
const LANES: usize = 4;
/// Tables up to this many entries (1 MiB) have a column per byte rather than per class
/// of bytes, which saves a lookup a byte (a tenth of a step).
const RAW_ENTRIES: usize = 1 << 18;
/// The length of the prefixes searched for to skip text (see [`Needles::skip_walk`]).
const PREFIX: usize = 3;
/// Teddy's limit on patterns (each prefix counts once per ASCII case spelling).
const MAX_PREFIXES: usize = 64;
/// After this many places found by the prefix search, the walk goes on without it if
/// they are on average fewer than [`DENSE_GAP`] bytes apart: each search has a fixed cost
/// that a text dense in prefixes (`from from …` for a needle `frobnicate`) would pay
/// per few bytes, where the table walk costs six instructions a byte.
const DENSE_AFTER: usize = 16;
/// See [`DENSE_AFTER`].
const DENSE_GAP: usize = 32;

/// A dense DFA over a set of needles.
#[derive(Debug)]
pub struct Needles {
    /// Per byte, its column in a row of [`table`](Self::table) (the byte itself when `raw`).
    classes: [u8; 256],
    /// Whether a row has a column per byte.
    raw: bool,
    /// Row by row (a row per state, `1 << shift` entries), the next state: the offset of
    /// its row, with [`MATCH`] set when it ends a needle. The length is a power of two.
    table: Box<[u32]>,
    /// The start state's entry.
    start: u32,
    /// A row's length is `1 << shift`.
    shift: u32,
    /// Per state, where its needles start in `ends` (one more entry closes the last state).
    ends_at: Vec<u32>,
    /// The needles each state ends, by state.
    ends: Vec<u32>,
    /// Per needle, its length in bytes.
    lens: Vec<u32>,
    /// The longest needle's length less one: how far walked slices overlap.
    overlap: usize,
    /// A search for every spelling of the needles' first [`PREFIX`] bytes, when there
    /// are few enough of them (and the CPU has the vector instructions Teddy needs).
    starts: Option<packed::Searcher>,
}

/// Hashes a state id (one `u32`) with a multiplication; SipHash made numbering the states
/// most of the time a keyword list takes to compile.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // The product's high bits depend on all of the id's: ids are multiples of a row's
        // length, so its low bits are zeros.
        self.0.rotate_left(26)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u32(u32::from(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

impl Needles {
    /// Compiles `needles` (matched ASCII case-insensitively).
    pub fn new(needles: &[Vec<u8>]) -> Result<Self> {
        let err = |e: &dyn std::fmt::Display| CoreError::Config(format!("keywords: {e}"));
        // Every occurrence of every needle is wanted: the crate's own prefilters skip only
        // to a next match, and ours (`prefix_search`) is applied in `skip_walk`.
        let dfa = DFA::builder()
            .match_kind(MatchKind::Standard)
            .prefilter(false)
            .ascii_case_insensitive(true)
            .build(needles)
            .map_err(|e| err(&e))?;
        let start = dfa.start_state(Anchored::No).map_err(|e| err(&e))?;
        // Bytes that match the same needle bytes (an ASCII letter and its other case; any
        // two bytes in no needle) lead every state to the same state: a class each, whose
        // transitions are read from one byte of it.
        let mut present = [false; 256];
        for &b in needles.iter().flatten() {
            present[usize::from(b.to_ascii_lowercase())] = true;
        }
        let (mut classes, mut reps) = ([0u8; 256], Vec::new());
        let (mut by_folded, mut absent) = ([None::<u8>; 256], None);
        for byte in 0..=255u8 {
            let folded = usize::from(byte.to_ascii_lowercase());
            let class = if present[folded] {
                &mut by_folded[folded]
            } else {
                &mut absent
            };
            classes[usize::from(byte)] = *class.get_or_insert_with(|| {
                reps.push(byte);
                (reps.len() - 1) as u8 // at most 256 classes, numbered 0..=255
            });
        }
        // The states reachable from the start, numbered in the order they are found, and
        // their transitions on each class.
        let mut states = vec![start];
        let mut number: HashMap<StateID, u32, BuildHasherDefault<IdHasher>> = HashMap::default();
        number.insert(start, 0);
        let mut next: Vec<u32> = Vec::new();
        let mut i = 0;
        while let Some(&sid) = states.get(i) {
            for &byte in &reps {
                let to = dfa.next_state(Anchored::No, sid, byte);
                let fresh = states.len() as u32;
                next.push(*number.entry(to).or_insert_with(|| {
                    states.push(to);
                    fresh
                }));
            }
            i += 1;
        }
        let raw = (states.len() << 8).next_power_of_two() <= RAW_ENTRIES;
        let shift = if raw {
            8
        } else {
            reps.len().next_power_of_two().trailing_zeros()
        };
        let len = (states.len() << shift).next_power_of_two();
        if len > MATCH as usize {
            return Err(err(&"too many keywords and patterns for one automaton"));
        }
        let entry = |s: u32| (s << shift) | if dfa.is_match(states[s as usize]) { MATCH } else { 0 };
        let mut table = vec![0u32; len].into_boxed_slice();
        for (s, row) in next.chunks_exact(reps.len()).enumerate() {
            let at = s << shift;
            if raw {
                for (byte, &class) in classes.iter().enumerate() {
                    table[at + byte] = entry(row[usize::from(class)]);
                }
            } else {
                for (class, &to) in row.iter().enumerate() {
                    table[at + class] = entry(to);
                }
            }
        }
        if raw {
            classes = std::array::from_fn(|byte| byte as u8);
        }
        let (mut ends_at, mut ends) = (Vec::with_capacity(states.len() + 1), Vec::new());
        for &sid in &states {
            ends_at.push(ends.len() as u32);
            if dfa.is_match(sid) {
                ends.extend((0..dfa.match_len(sid)).map(|m| dfa.match_pattern(sid, m).as_u32()));
            }
        }
        ends_at.push(ends.len() as u32);
        let lens: Vec<u32> = needles.iter().map(|n| n.len() as u32).collect();
        let starts = prefix_search(needles);
        Ok(Self {
            classes,
            raw,
            table,
            start: entry(0),
            shift,
            ends_at,
            ends,
            overlap: needles.iter().map(Vec::len).max().unwrap_or(1).saturating_sub(1),
            lens,
            starts,
        })
    }

    /// Calls `found` with each needle that occurs in `bytes` and the offset it starts at
    /// (a needle may be reported more than once at the same offset).
    pub fn find(&self, bytes: &[u8], mut found: impl FnMut(usize, usize)) {
        let mut ended = |state: u32, end: usize| {
            let s = ((state & !MATCH) >> self.shift) as usize;
            for &n in &self.ends[self.ends_at[s] as usize..self.ends_at[s + 1] as usize] {
                found(n as usize, end - self.lens[n as usize] as usize);
            }
        };
        match &self.starts {
            Some(starts) if bytes.len() >= starts.minimum_len() => self.skip_walk(starts, bytes, &mut ended),
            _ => self.walk_all(bytes, &mut ended),
        }
    }

    /// [`walk`](Self::walk)s all of `bytes` with as many slices as their length is worth.
    fn walk_all(&self, bytes: &[u8], ended: &mut impl FnMut(u32, usize)) {
        match (bytes.len() < SHORT_TEXT, self.raw) {
            (true, true) => self.walk::<1, true>(bytes, ended),
            (true, false) => self.walk::<1, false>(bytes, ended),
            (false, true) => self.walk::<LANES, true>(bytes, ended),
            (false, false) => self.walk::<LANES, false>(bytes, ended),
        }
    }

    /// Walks the table only from each place where a needle's prefix occurs (found by
    /// `starts`), until it is back in its start state.
    ///
    /// In the start state no part of a needle has been read, so every needle that ends
    /// later starts later too, at a place the prefix search finds first; and the state
    /// is the start state again only once no needle can start at or before the byte just
    /// read. Each byte is walked at most once, so a text full of prefixes costs a walk
    /// and a search per prefix; past [`DENSE_AFTER`] of them, if that is dense, the rest
    /// of the text is [`walk_all`](Self::walk_all)ed, from a start state too.
    fn skip_walk(&self, starts: &packed::Searcher, bytes: &[u8], ended: &mut impl FnMut(u32, usize)) {
        let table = &*self.table;
        assert!(table.len().is_power_of_two()); // as in `lockstep`
        let mask = table.len() - 1;
        let (mut at, mut found) = (0, 0);
        while let Some(m) = starts.find_in(bytes, Span::from(at..bytes.len())) {
            found += 1;
            if found >= DENSE_AFTER && found * DENSE_GAP > m.start() {
                let rest = &bytes[m.start()..];
                self.walk_all(rest, &mut |state, end| ended(state, m.start() + end));
                return;
            }
            let mut s = self.start as usize;
            at = m.start();
            while let Some(&byte) = bytes.get(at) {
                let class = usize::from(self.classes[usize::from(byte)]);
                s = table[(s + class) & mask] as usize;
                at += 1;
                if s & MATCH as usize != 0 {
                    ended(s as u32, at);
                }
                if s == self.start as usize {
                    break;
                }
            }
        }
    }

    /// Walks `bytes` in `L` slices at once, calling `ended` with each match state and the
    /// offset just past it.
    ///
    /// One walk is a chain of dependent table loads, bound by load latency (about five
    /// cycles a byte) rather than by instructions; independent walks over `L` slices,
    /// interleaved step by step, overlap in the CPU (on the bench's 10 kB prompt the
    /// whole decision went from 20.9 to 13.7 µs with four; two give most of it, eight
    /// spill registers). The slices' steps are taken over their common length as one
    /// unit, with one test for a match in any of them. Each slice starts `overlap` bytes
    /// (the longest needle less one) before the previous one ends, so a needle that
    /// crosses a boundary lies whole in the next slice; a needle seen by two slices is
    /// reported twice, which marking hits makes harmless.
    fn walk<const L: usize, const RAW: bool>(&self, bytes: &[u8], ended: &mut impl FnMut(u32, usize)) {
        let n = bytes.len();
        let width = n.div_ceil(L);
        let from: [usize; L] = std::array::from_fn(|j| (j * width).saturating_sub(self.overlap));
        let to: [usize; L] = std::array::from_fn(|j| ((j + 1) * width).min(n));
        let common = (0..L).map(|j| to[j].saturating_sub(from[j])).min().unwrap_or(0);
        let mut sid = [self.start; L];
        // The slices' first `common` bytes, in lockstep, until any slice ends a needle.
        let lanes: [&[u8]; L] = std::array::from_fn(|j| &bytes[from[j]..from[j] + common]);
        let mut k = 0;
        while k < common {
            k = self.lockstep::<L, RAW>(&lanes, &mut sid, k);
            for (&s, start) in sid.iter().zip(from) {
                if s & MATCH != 0 {
                    ended(s, start + k);
                }
            }
        }
        let mut one = [0u32; 1];
        for (j, (start, end)) in from.iter().zip(to).enumerate() {
            let rest = bytes.get(start + common..end).unwrap_or_default();
            one[0] = sid[j];
            let mut k = 0;
            while k < rest.len() {
                k = self.lockstep::<1, RAW>(&[rest], &mut one, k);
                if one[0] & MATCH != 0 {
                    ended(one[0], start + common + k);
                }
            }
        }
    }

    /// Steps the states `sid` over their `lanes` (all as long) from offset `k` until
    /// one of them ends a needle, or the lanes end; returns the offset after the last
    /// byte stepped. Not inlined, and no call in its loop: all the loop's values stay in
    /// registers (inlined into the walk, the slices' pointers were read from the stack).
    #[inline(never)]
    fn lockstep<const L: usize, const RAW: bool>(&self, lanes: &[&[u8]; L], sid: &mut [u32; L], mut k: usize) -> usize {
        let table = &*self.table;
        // A power of two (see `new`): masked, every index is in range, and LLVM sees it.
        assert!(table.len().is_power_of_two());
        let mask = table.len() - 1;
        let end = lanes[0].len();
        let lanes: [&[u8]; L] = lanes.map(|lane| &lane[..end]);
        let mut s = sid.map(|s| s as usize);
        while k < end {
            let mut any = 0;
            for j in 0..L {
                let byte = usize::from(lanes[j][k]);
                let class = if RAW { byte } else { usize::from(self.classes[byte]) };
                s[j] = table[(s[j] + class) & mask] as usize;
                any |= s[j];
            }
            k += 1;
            if any & MATCH as usize != 0 {
                break;
            }
        }
        *sid = s.map(|s| s as u32);
        k
    }
}

/// A search for every ASCII case spelling of the needles' first [`PREFIX`] bytes; `None`
/// when a needle is shorter or there are too many spellings for Teddy.
fn prefix_search(needles: &[Vec<u8>]) -> Option<packed::Searcher> {
    let mut prefixes: Vec<Vec<u8>> = Vec::new();
    for n in needles {
        let first = n.get(..PREFIX)?.to_ascii_lowercase();
        if !prefixes.contains(&first) {
            prefixes.push(first);
        }
    }
    let mut spellings: Vec<Vec<u8>> = Vec::new();
    for p in &prefixes {
        let mut these = vec![Vec::with_capacity(PREFIX)];
        for &b in p {
            let cases = if b.is_ascii_alphabetic() {
                vec![b, b.to_ascii_uppercase()]
            } else {
                vec![b]
            };
            these = these
                .iter()
                .flat_map(|s| {
                    cases.iter().map(move |&c| {
                        let mut s = s.clone();
                        s.push(c);
                        s
                    })
                })
                .collect();
        }
        spellings.extend(these);
        if spellings.len() > MAX_PREFIXES {
            return None;
        }
    }
    packed::Config::new()
        .match_kind(packed::MatchKind::LeftmostFirst)
        .builder()
        .extend(&spellings)
        .build()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use aho_corasick::AhoCorasick;
    use proptest::prelude::*;

    use super::*;

    /// Occurrences: (needle, start).
    type Found = BTreeSet<(usize, usize)>;

    /// Every occurrence the dense walk reports, and every one aho-corasick's own
    /// overlapping search finds.
    fn both(needles: &[Vec<u8>], text: &[u8]) -> (Found, Found) {
        let mut got = BTreeSet::new();
        Needles::new(needles).unwrap().find(text, |n, start| {
            got.insert((n, start));
        });
        let ac = AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(needles)
            .unwrap();
        let want = ac
            .find_overlapping_iter(text)
            .map(|m| (m.pattern().as_usize(), m.start()))
            .collect();
        (got, want)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// The dense table finds what the automaton it was copied from finds: every
        /// occurrence of every needle, on short texts (one slice) and long ones (four
        /// slices and their tails), with needles inside needles, case and non-ASCII bytes.
        #[test]
        fn finds_what_aho_corasick_finds(
            needles in proptest::collection::vec("[abAB\u{e9}\u{212a}k-]{1,6}", 1..12),
            text in "[abABkK\u{e9}\u{212a} -]{0,1200}",
        ) {
            let needles: Vec<Vec<u8>> = needles.into_iter().map(String::into_bytes).collect();
            prop_assert!(Needles::new(&needles).unwrap().raw, "a column per byte");
            let (got, want) = both(&needles, text.as_bytes());
            prop_assert_eq!(got, want);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Needles of three bytes or more with few prefixes are found by skipping to their
        /// prefixes: the same occurrences, over filler (skipped) and over runs dense in
        /// prefixes (where the walk goes on without the search).
        #[test]
        fn skipping_to_prefixes_finds_what_aho_corasick_finds(
            needles in proptest::collection::vec("[abAB\u{e9}k-]{3,7}", 1..8),
            pieces in proptest::collection::vec(("[abABkK\u{e9}\u{212a}-]{1,6}|[xyz ]{1,30}", 0..40usize), 0..120),
        ) {
            let needles: Vec<Vec<u8>> = needles.into_iter().map(String::into_bytes).collect();
            prop_assert!(Needles::new(&needles).unwrap().starts.is_some(), "a prefix search");
            // A third of the pieces are needles (some uppercased), so that some texts are dense
            // in prefixes from some point on.
            let mut text = Vec::new();
            for (piece, pick) in pieces {
                match pick % 6 {
                    0 => text.extend_from_slice(&needles[pick % needles.len()]),
                    1 => text.extend(needles[pick % needles.len()].to_ascii_uppercase()),
                    _ => text.extend_from_slice(piece.as_bytes()),
                }
            }
            let (got, want) = both(&needles, &text);
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn a_text_dense_in_prefixes_is_walked_whole_past_them() {
        let needles = [b"frobnicate".to_vec(), b"kw-7".to_vec()];
        let quiet = "x".repeat(600);
        for text in [
            format!("{quiet}frobnicate{quiet}KW-7"),
            format!("{quiet}{}frobnicate and kw-7", "from ".repeat(40)),
            format!("{}fRoBnIcAtE{quiet}", "fro".repeat(20)),
        ] {
            let (got, want) = both(&needles, text.as_bytes());
            assert_eq!(want.len(), 2 - usize::from(text.starts_with("fro")), "{text}");
            assert_eq!(got, want, "{text}");
        }
        // Needles shorter than the prefixes, or too many spellings of them: no prefix search.
        assert!(Needles::new(&[b"ab".to_vec()]).unwrap().starts.is_none());
        let many: Vec<Vec<u8>> = (b'a'..=b'i').map(|c| vec![c, b'x', b'y']).collect();
        assert!(Needles::new(&many).unwrap().starts.is_none());
    }

    #[test]
    fn a_large_automaton_walks_the_same() {
        // Thousands of states and every byte value in the needles: many classes, a long table.
        let needles: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| format!("w{}{}", i * 7919 % 10007, char::from_u32(0xe0 + i % 31).unwrap()).into_bytes())
            .chain((0..=255u8).map(|b| vec![b'#', b, b]))
            .collect();
        let mut text: Vec<u8> = (0..20_000u32)
            .flat_map(|i| format!("w{} ", i * 31 % 10007).into_bytes())
            .collect();
        text.extend((0..=255u8).flat_map(|b| [b'#', b, b, b]));
        assert!(!Needles::new(&needles).unwrap().raw, "a column per class of bytes");
        let (got, want) = both(&needles, &text);
        assert!(want.len() > 100, "{}", want.len());
        assert_eq!(got, want);
    }
}
