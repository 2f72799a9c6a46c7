//! Hand-written pre-tokenisers for `o200k_base` and `cl100k_base`: the same
//! piece boundaries as `tiktoken`'s regexes, without a regex engine.
//!
//! `tiktoken` splits text with these patterns (leftmost-first alternation, as
//! in `fancy-regex`; `\s` is Unicode `White_Space`):
//!
//! ```text
//! o200k_base:  [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?
//!            | [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?
//!            | \p{N}{1,3} | ?[^\s\p{L}\p{N}]+[\r\n/]* | \s*[\r\n]+ | \s+(?!\S) | \s+
//! cl100k_base: (?i:'s|'t|'re|'ve|'m|'ll|'d) | [^\r\n\p{L}\p{N}]?\p{L}+ | \p{N}{1,3}
//!            | ?[^\s\p{L}\p{N}]+[\r\n]* | \s*[\r\n]+ | \s+(?!\S) | \s+
//! ```
//!
//! (`tiktoken` 0.14 spells cl100k's with possessive quantifiers and an extra
//! `\s++$`, which give the same pieces.)
//!
//! Every character starts a match of some alternative, so the pieces tile the
//! text and each piece is the first alternative, in pattern order, that matches
//! at the current position, resolved the way a backtracking engine would (greedy
//! quantifiers give back only as much as the rest of the alternative needs).
//! The functions below spell that out per alternative; `bpe-openai`'s regex
//! split is the reference (`tests/pretokenize_parity.rs` compares the two).
//! One table lookup per character and no automaton or look-ahead emulation:
//! on the benchmark chat (9.4k characters) it splits in 190-240k instructions
//! where the regex takes 1.16M.
//!
//! # Character tables
//!
//! The character classes come from `regex-syntax`, on first use, by parsing
//! the very class expressions above (`\p{L}`, `\s`, ...) and reading their
//! ranges. That is the crate that compiles `bpe-openai`'s regexes (and, through
//! `fancy-regex` and `regex`, `tiktoken`'s), so the Unicode version and class
//! contents match the reference split by construction, and a `cargo update`
//! moves both together. It is already in the dependency tree (through `regex`), so it adds
//! no crate. A general-category crate such as `unicode-general-category` would
//! be a second copy of the tables on its own Unicode release cadence, and would
//! still need `White_Space` from elsewhere. The ranges are flattened once into
//! a two-level table (47 kB, built in about 1.5 ms on first use) for an O(1)
//! lookup per character.

use std::collections::HashMap;
use std::sync::LazyLock;

use regex_syntax::hir::{Class, HirKind};

/// `\p{L}`.
const L: u8 = 1;
/// `\p{N}`.
const N: u8 = 1 << 1;
/// `\s` (Unicode `White_Space`).
const WS: u8 = 1 << 2;
/// `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]`, o200k's "upper" run.
const UP: u8 = 1 << 3;
/// `[\p{Ll}\p{Lm}\p{Lo}\p{M}]`, o200k's "lower" run.
const LO: u8 = 1 << 4;
/// `[\r\n]`.
const NL: u8 = 1 << 5;
/// `[^\r\n\p{L}\p{N}]`, the optional prefix of a word.
const PRE: u8 = 1 << 6;
/// `[^\s\p{L}\p{N}]`, punctuation and symbols (marks included).
const OTHER: u8 = 1 << 7;

/// Code points per leaf of the two-level table.
const BLOCK: usize = 128;

/// Class bits of every code point: `leaves[index[c / BLOCK] * BLOCK + c % BLOCK]`.
/// Identical blocks share one leaf (most of the code space is unassigned).
struct Tables {
    ascii: [u8; 128],
    index: Vec<u16>,
    leaves: Vec<u8>,
}

static TABLES: LazyLock<Tables> = LazyLock::new(Tables::build);

/// The ranges of a class expression, as `regex-syntax` compiles it.
fn class_ranges(pattern: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::parse(pattern).expect("valid class");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect(),
        other => panic!("{pattern} is not a Unicode class: {other:?}"),
    }
}

impl Tables {
    fn build() -> Self {
        const CHARS: usize = 0x11_0000;
        let mut flat = vec![0u8; CHARS];
        for (pattern, bit) in [
            (r"\p{L}", L),
            (r"\p{N}", N),
            (r"\s", WS),
            (r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", UP),
            (r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]", LO),
            (r"[\r\n]", NL),
        ] {
            for (a, b) in class_ranges(pattern) {
                for c in &mut flat[a as usize..=b as usize] {
                    *c |= bit;
                }
            }
        }
        for c in &mut flat {
            if *c & (NL | L | N) == 0 {
                *c |= PRE;
            }
            if *c & (WS | L | N) == 0 {
                *c |= OTHER;
            }
        }
        let mut index = Vec::with_capacity(CHARS / BLOCK);
        let mut leaves = Vec::new();
        let mut seen: HashMap<&[u8], u16> = HashMap::new();
        for block in flat.chunks(BLOCK) {
            let id = *seen.entry(block).or_insert_with(|| {
                leaves.extend_from_slice(block);
                u16::try_from(leaves.len() / BLOCK - 1).expect("fewer than 65536 distinct blocks")
            });
            index.push(id);
        }
        let mut ascii = [0u8; 128];
        ascii.copy_from_slice(&flat[..128]);
        Self { ascii, index, leaves }
    }

    #[inline]
    fn class(&self, c: u32) -> u8 {
        let leaf = usize::from(self.index[c as usize / BLOCK]);
        self.leaves[leaf * BLOCK + c as usize % BLOCK]
    }
}

/// The pieces `tiktoken`'s `o200k_base` regex splits `text` into.
pub fn o200k_base(text: &str) -> Pieces<'_, true> {
    Pieces::new(text)
}

/// The pieces `tiktoken`'s `cl100k_base` regex splits `text` into.
pub fn cl100k_base(text: &str) -> Pieces<'_, false> {
    Pieces::new(text)
}

/// Iterator over the pre-tokenisation pieces of a text (`O200K`: which
/// encoding's pattern). The pieces are non-empty and concatenate to the text.
pub struct Pieces<'a, const O200K: bool> {
    text: &'a str,
    pos: usize,
    t: &'static Tables,
}

/// What o200k's two word alternatives match at a position.
enum Word {
    /// The first ("lower") alternative matches, ending here.
    Lower(usize),
    /// Only the second ("upper") one does.
    Upper(usize),
    /// Neither: no letter or mark at the position.
    Neither,
}

impl<'a, const O200K: bool> Pieces<'a, O200K> {
    fn new(text: &'a str) -> Self {
        Self {
            text,
            pos: 0,
            t: &TABLES,
        }
    }

    /// Class bits and UTF-8 length of the character at byte `i`; `(0, 0)` at
    /// the end of the text, which no class contains, so runs stop there.
    #[inline(always)]
    fn at(&self, i: usize) -> (u8, usize) {
        let s = self.text.as_bytes();
        match s.get(i) {
            None => (0, 0),
            Some(&b) if b < 0x80 => (self.t.ascii[usize::from(b)], 1),
            Some(&b) => self.wide(s, i, b),
        }
    }

    /// [`Self::at`] for a non-ASCII character (`i` is on a char boundary of valid UTF-8).
    #[inline]
    fn wide(&self, s: &[u8], i: usize, b: u8) -> (u8, usize) {
        let cont = |k: usize| u32::from(s[i + k] & 0x3f);
        let (c, n) = if b < 0xe0 {
            ((u32::from(b & 0x1f) << 6) | cont(1), 2)
        } else if b < 0xf0 {
            ((u32::from(b & 0x0f) << 12) | (cont(1) << 6) | cont(2), 3)
        } else {
            (
                (u32::from(b & 0x07) << 18) | (cont(1) << 12) | (cont(2) << 6) | cont(3),
                4,
            )
        };
        (self.t.class(c), n)
    }

    /// End of the run of characters with any of `bits`, from `i`.
    #[inline(always)]
    fn run(&self, mut i: usize, bits: u8) -> usize {
        loop {
            let (c, n) = self.at(i);
            if c & bits == 0 {
                return i;
            }
            i += n;
        }
    }

    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)` at `i`: its end, or `i` when it does not match.
    /// Under Unicode case folding `s` also matches U+017F 'ſ' (a unit test checks
    /// these folds against `regex-syntax`); the other letters fold only to ASCII.
    #[inline]
    fn contraction(&self, i: usize) -> usize {
        let s = self.text.as_bytes();
        if s.get(i) != Some(&b'\'') {
            return i;
        }
        let lower = |k: usize| s.get(i + k).map(u8::to_ascii_lowercase);
        match (lower(1), lower(2)) {
            (Some(b's' | b't' | b'm' | b'd'), _) => i + 2,
            (Some(b'r' | b'v'), Some(b'e')) | (Some(b'l'), Some(b'l')) => i + 3,
            (Some(0xc5), Some(0xbf)) => i + 3, // 'ſ' is C5 BF, and 0xbf is no ASCII letter
            _ => i,
        }
    }

    /// o200k's two word alternatives, without their optional prefix, at `j`:
    /// `U*L+c?` (first) and `U+L*c?` (second), where `U` and `L` are the
    /// "upper" and "lower" classes (they share `Lm`, `Lo` and `M`) and `c` the
    /// contraction.
    fn word(&self, j: usize) -> Word {
        // Greedy `U*`, remembering the last character that is also in `L`.
        let mut k = j;
        let mut last_lower = None;
        let (mut c, mut n) = self.at(k);
        while c & UP != 0 {
            if c & LO != 0 {
                last_lower = Some(k + n);
            }
            k += n;
            (c, n) = self.at(k);
        }
        if c & LO != 0 {
            // `U*` keeps its whole run and `L+` continues from there.
            Word::Lower(self.contraction(self.run(k + n, LO)))
        } else if let Some(e) = last_lower {
            // `U*` gives back down to its last "lower" character, which is then
            // all of `L+`: the characters after it in the run are `Lu`/`Lt`.
            Word::Lower(self.contraction(e))
        } else if k > j {
            // `U+` and an empty `L*` (nothing after the run is "lower").
            Word::Upper(self.contraction(k))
        } else {
            Word::Neither
        }
    }

    /// ` ?[^\s\p{L}\p{N}]+[\r\n]*` (`[\r\n/]*` for o200k) at `i`, where the
    /// character at `i` has class bits `c0`.
    #[inline]
    fn punctuation(&self, i: usize, c0: u8) -> Option<usize> {
        let s = self.text.as_bytes();
        let start = if c0 & OTHER != 0 {
            i
        } else if s[i] == b' ' && self.at(i + 1).0 & OTHER != 0 {
            i + 1
        } else {
            return None;
        };
        let mut k = self.run(start, OTHER);
        while let Some(&b) = s.get(k) {
            if !(b == b'\r' || b == b'\n' || (O200K && b == b'/')) {
                break;
            }
            k += 1;
        }
        Some(k)
    }

    /// `\s*[\r\n]+|\s+(?!\S)|\s+` at `i`, a whitespace character.
    fn whitespace(&self, i: usize) -> usize {
        let mut k = i;
        let mut last = i;
        let mut after_newline = None;
        loop {
            let (c, n) = self.at(k);
            if c & WS == 0 {
                break;
            }
            if c & NL != 0 {
                after_newline = Some(k + n);
            }
            last = k;
            k += n;
        }
        match after_newline {
            // `\s*[\r\n]+`: through the last newline of the run.
            Some(e) => e,
            // `\s+(?!\S)`: the run at the end of the text, or all of it but the
            // last character, which then starts the next piece; `\s+` for a
            // single space before a non-space.
            None if k == self.text.len() || last == i => k,
            None => last,
        }
    }

    /// `\p{N}{1,3}` at `i`, a digit of length `n0`.
    #[inline]
    fn digits(&self, i: usize, n0: usize) -> usize {
        let mut k = i + n0;
        for _ in 0..2 {
            let (c, n) = self.at(k);
            if c & N == 0 {
                break;
            }
            k += n;
        }
        k
    }

    fn o200k_end(&self, i: usize) -> usize {
        let (c0, n0) = self.at(i);
        if c0 & PRE != 0 {
            // The word alternatives with the prefix taken. A mark is also a
            // word character: when the first alternative fails with the mark
            // as prefix, it matches with the mark as its first character
            // (below), before the second alternative is tried.
            match self.word(i + n0) {
                Word::Lower(e) => return e,
                Word::Upper(e) if c0 & (UP | LO) == 0 => return e,
                _ => {}
            }
        }
        if c0 & (UP | LO) != 0 {
            match self.word(i) {
                Word::Lower(e) | Word::Upper(e) => return e,
                Word::Neither => unreachable!("a word character starts a word"),
            }
        }
        if c0 & N != 0 {
            return self.digits(i, n0);
        }
        self.punctuation(i, c0).unwrap_or_else(|| self.whitespace(i))
    }

    fn cl100k_end(&self, i: usize) -> usize {
        let e = self.contraction(i);
        if e > i {
            return e;
        }
        let (c0, n0) = self.at(i);
        if c0 & L != 0 {
            return self.run(i + n0, L);
        }
        if c0 & PRE != 0 {
            let (c1, n1) = self.at(i + n0);
            if c1 & L != 0 {
                return self.run(i + n0 + n1, L);
            }
        }
        if c0 & N != 0 {
            return self.digits(i, n0);
        }
        self.punctuation(i, c0).unwrap_or_else(|| self.whitespace(i))
    }
}

impl<'a, const O200K: bool> Iterator for Pieces<'a, O200K> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        let start = self.pos;
        if start >= self.text.len() {
            return None;
        }
        let end = if O200K {
            self.o200k_end(start)
        } else {
            self.cl100k_end(start)
        };
        self.pos = end;
        Some(&self.text[start..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split<const O200K: bool>(p: Pieces<'_, O200K>) -> Vec<&str> {
        p.collect()
    }

    #[test]
    fn examples() {
        assert_eq!(split(o200k_base("Hello world's")), ["Hello", " world's"]);
        assert_eq!(split(o200k_base("HTTPServer")), ["HTTPServer"]);
        assert_eq!(split(o200k_base("  \n  x")), ["  \n", " ", " x"]);
        assert_eq!(split(o200k_base("12345")), ["123", "45"]);
        assert_eq!(split(o200k_base("a!\n/b")), ["a", "!\n/", "b"]);
        assert_eq!(split(cl100k_base("I'LL go")), ["I", "'LL", " go"]);
        assert_eq!(split(cl100k_base("a  ")), ["a", "  "]);
        assert_eq!(split(cl100k_base("")), Vec::<&str>::new());
    }

    /// The contraction matcher assumes these case folds; check them against
    /// the engine the regexes use.
    #[test]
    fn contraction_folds() {
        for (letter, folds) in [("s", "sSſ"), ("t", "tT"), ("r", "rR"), ("e", "eE"), ("v", "vV")] {
            let want: Vec<(u32, u32)> = {
                let mut v: Vec<u32> = folds.chars().map(u32::from).collect();
                v.sort_unstable();
                v.into_iter().map(|c| (c, c)).collect()
            };
            assert_eq!(class_ranges(&format!("(?i:[{letter}])")), want, "{letter}");
        }
        for letter in ["m", "l", "d"] {
            let upper = letter.to_ascii_uppercase();
            let (a, b) = (u32::from(upper.as_bytes()[0]), u32::from(letter.as_bytes()[0]));
            assert_eq!(class_ranges(&format!("(?i:[{letter}])")), [(a, a), (b, b)], "{letter}");
        }
    }
}
