//! The OpenAI vocabularies (`o200k_base`, `cl100k_base`) and the count of a text's tokens.
//!
//! The vocabularies are static data written by `build.rs`: a few MB, read-only, shared
//! by every process that maps the library and loaded by the kernel page by page. (The
//! `bpe-openai` tokenizer they come from builds three Aho-Corasick automata over the
//! vocabulary on first use: ~73 MB resident per process for `o200k_base`.)
//!
//! A text is split into the pieces of the encoding's pre-tokenisation regex (by
//! [`crate::pretokenize`]); a piece that is itself a token (most words of prose) is one
//! token, as in `tiktoken`; any other piece is counted by `tiktoken`'s byte-pair merge
//! (the adjacent pair whose concatenation has the lowest rank is merged first, the
//! leftmost on ties, until no pair is a token). Counts are identical to `tiktoken`'s
//! `encode_ordinary` (checked here against `bpe-openai`, and in `tests/test_tokens.py`
//! against `tiktoken` itself).
//!
//! Hostile input: a piece can be as long as the body (a megabyte of letters without a
//! space). Short pieces are merged in place (quadratic in the piece, bounded by
//! [`SMALL`]); longer ones with a heap, in `O(n log n)`. A piece over [`CHUNK`] bytes
//! (no word of any language is one) is merged a chunk at a time: merged whole, a
//! megabyte of random letters took a second of CPU, its heap and the rank table far out
//! of the cache; in chunks it takes a tenth of that, and each cut can differ from
//! `tiktoken` by a token or two. Past [`LONG_BUDGET`] bytes of such pieces in one text,
//! each further byte counts as a token, the most a byte can be: a count's CPU is bounded
//! (tens of milliseconds) whatever a client sends, and it never under-counts what it skips.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::LazyLock;

use crate::pretokenize;

/// `o200k_base` (GPT-4o, GPT-4.1, o-series): the tokens' bytes and where each starts.
static O200K_TOKENS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/o200k_base.tokens"));
static O200K_OFFSETS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/o200k_base.offsets"));
/// `cl100k_base` (GPT-4, GPT-3.5-turbo; Claude's estimate).
static CL100K_TOKENS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cl100k_base.tokens"));
static CL100K_OFFSETS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cl100k_base.offsets"));

pub(crate) static O200K: LazyLock<Vocab> = LazyLock::new(|| Vocab::new(O200K_TOKENS, O200K_OFFSETS, true));
pub(crate) static CL100K: LazyLock<Vocab> = LazyLock::new(|| Vocab::new(CL100K_TOKENS, CL100K_OFFSETS, false));

/// Pieces up to this many bytes are merged in place; longer ones with a heap.
const SMALL: usize = 64;
/// Pieces longer than this are merged in chunks of this many bytes.
const CHUNK: usize = 4096;
/// Bytes of pieces over [`CHUNK`] merged in one count; the rest count a token a byte.
const LONG_BUDGET: usize = 256 * 1024;
/// Entries of the per-thread memo of merged pieces (a power of two).
const MEMO_SLOTS: usize = 4096;
/// No rank: the bytes are not a token.
const NONE: u32 = u32::MAX;

/// One vocabulary: its tokens by rank, a table from bytes to rank, and the set of its
/// short tokens for the one-token shortcut.
pub(crate) struct Vocab {
    tokens: &'static [u8],
    offsets: &'static [u8],
    /// `o200k_base`'s pattern rather than `cl100k_base`'s.
    o200k: bool,
    /// Open addressing (linear probing, at most half full) of token ids by their bytes' hash.
    ranks: Vec<u32>,
    short: TokenMap,
}

impl Vocab {
    fn new(tokens: &'static [u8], offsets: &'static [u8], o200k: bool) -> Self {
        let n = offsets.len() / 4 - 1;
        let token = |id: u32| token_bytes(tokens, offsets, id);
        let mut ranks = vec![NONE; (2 * n).next_power_of_two()];
        let mask = ranks.len() - 1;
        for id in 0..n as u32 {
            let mut i = bytes_slot(token(id), ranks.len());
            while ranks[i] != NONE {
                i = (i + 1) & mask;
            }
            ranks[i] = id;
        }
        Self {
            tokens,
            offsets,
            o200k,
            ranks,
            short: TokenMap::new((0..n as u32).map(|id| (id, token(id)))),
        }
    }

    /// The number of tokens in the vocabulary.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.offsets.len() / 4 - 1
    }

    /// The bytes of token `id`.
    fn token(&self, id: u32) -> &'static [u8] {
        token_bytes(self.tokens, self.offsets, id)
    }

    /// The rank (token id) of `bytes`, or [`NONE`].
    #[inline]
    fn rank(&self, bytes: &[u8]) -> u32 {
        if bytes.len() <= 16 {
            self.short.rank(bytes)
        } else {
            self.long_rank(bytes)
        }
    }

    /// The rank of `bytes` (of any length) from the table of all tokens. A lookup probes
    /// at most the longest run of occupied slots, fixed by the vocabulary whatever the input.
    fn long_rank(&self, bytes: &[u8]) -> u32 {
        let mask = self.ranks.len() - 1;
        let mut i = bytes_slot(bytes, self.ranks.len());
        loop {
            let id = self.ranks[i];
            if id == NONE || self.token(id) == bytes {
                return id;
            }
            i = (i + 1) & mask;
        }
    }

    /// Tokens in `text`.
    pub(crate) fn count(&self, text: &str) -> usize {
        if self.o200k {
            self.count_pieces(text, pretokenize::o200k_base(text))
        } else {
            self.count_pieces(text, pretokenize::cl100k_base(text))
        }
    }

    /// Tokens of `pieces`, which tile `text`.
    fn count_pieces<'a>(&self, text: &str, pieces: impl Iterator<Item = &'a str>) -> usize {
        let text = text.as_bytes();
        let mut start = 0;
        let mut total = 0;
        let mut long_budget = LONG_BUDGET;
        for piece in pieces {
            total += if piece.len() > CHUNK {
                self.count_long(piece.as_bytes(), &mut long_budget)
            } else {
                self.count_piece(text, start, piece.as_bytes())
            };
            start += piece.len();
        }
        total
    }

    /// Tokens of a piece over [`CHUNK`] bytes (no token is that long): merged a chunk at a
    /// time while `budget` lasts, then a token a byte.
    fn count_long(&self, piece: &[u8], budget: &mut usize) -> usize {
        let mut total = 0;
        let mut rest = piece;
        while !rest.is_empty() {
            if *budget == 0 {
                return total + rest.len();
            }
            let mut cut = rest.len().min(CHUNK);
            while cut < rest.len() && rest[cut] & 0xC0 == 0x80 {
                cut -= 1; // not inside a character (a UTF-8 continuation byte)
            }
            let (chunk, tail) = rest.split_at(cut);
            total += if chunk.len() <= SMALL {
                self.merge_small(chunk)
            } else {
                self.merge_large(chunk)
            };
            *budget = budget.saturating_sub(chunk.len());
            rest = tail;
        }
        total
    }

    /// Tokens of `piece`, which starts at byte `start` of `text`.
    #[inline]
    fn count_piece(&self, text: &[u8], start: usize, piece: &[u8]) -> usize {
        let whole = if piece.len() <= 16 {
            self.short.contains_at(text, start, piece)
        } else {
            self.long_rank(piece) != NONE
        };
        if whole {
            1
        } else if piece.len() < 16 {
            self.merge_memo(piece)
        } else if piece.len() <= SMALL {
            self.merge_small(piece)
        } else {
            self.merge_large(piece)
        }
    }

    /// [`Self::merge_small`] through a small per-thread memo: prose repeats its words,
    /// and a merge costs tens of lookups where the memo costs one. Direct-mapped and fixed
    /// in size (an entry displaces another), keyed by the padded bytes and the vocabulary.
    fn merge_memo(&self, piece: &[u8]) -> usize {
        thread_local! {
            static MEMO: RefCell<Vec<(u128, u32)>> = RefCell::new(vec![(u128::MAX, 0); MEMO_SLOTS]);
        }
        // The vocabulary in the key's last byte, which is padding (pieces here are under 16
        // bytes): `0xFF` or `0xFE`, neither of which UTF-8 contains.
        let key = u128::from_le_bytes(padded(piece)) ^ (u128::from(!self.o200k) << 120);
        let at = slot(key, MEMO_SLOTS);
        let known = MEMO.with_borrow(|memo| memo[at]);
        if known.0 == key {
            return known.1 as usize;
        }
        let n = self.merge_small(piece);
        MEMO.with_borrow_mut(|memo| memo[at] = (key, n as u32));
        n
    }

    /// `tiktoken`'s merge, in place: `start[i]` is where part `i` begins and `rank[i]`
    /// the rank of part `i` joined with part `i + 1`; the last entry marks the end.
    fn merge_small(&self, piece: &[u8]) -> usize {
        let n = piece.len();
        debug_assert!(n <= SMALL);
        if n < 2 {
            return n;
        }
        let mut start = [0u32; SMALL + 1];
        let mut rank = [NONE; SMALL + 1];
        for (i, s) in start.iter_mut().enumerate().take(n + 1) {
            *s = i as u32;
        }
        for i in 0..n - 1 {
            rank[i] = self.rank(&piece[i..i + 2]);
        }
        let mut len = n + 1;
        loop {
            let (mut best, mut at) = (NONE, 0);
            for (i, &r) in rank[..len - 1].iter().enumerate() {
                if r < best {
                    (best, at) = (r, i);
                }
            }
            if best == NONE {
                return len - 1;
            }
            // Part `at` absorbs part `at + 1`; its pairs with both neighbours change.
            let joined = |i: usize| {
                if i + 3 < len {
                    self.rank(&piece[start[i] as usize..start[i + 3] as usize])
                } else {
                    NONE
                }
            };
            if at > 0 {
                rank[at - 1] = joined(at - 1);
            }
            rank[at] = joined(at);
            start.copy_within(at + 2..len, at + 1);
            rank.copy_within(at + 2..len, at + 1);
            len -= 1;
        }
    }

    /// The same merge for a long piece: parts as a linked list, candidate pairs in a heap
    /// ordered by (rank, start) — the pair `tiktoken` would pick — and checked when
    /// popped (a pair some earlier merge took apart is skipped).
    fn merge_large(&self, piece: &[u8]) -> usize {
        let n = piece.len();
        // `end[i]`: where the part starting at `i` ends; `before[i]`: where the part before it starts.
        let mut end: Vec<u32> = (1..=n as u32).collect();
        let mut before: Vec<u32> = (0..n as u32).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            let r = self.rank(&piece[i..i + 2]);
            if r != NONE {
                heap.push(Reverse((r, i as u32, i as u32 + 2)));
            }
        }
        let mut parts = n;
        while let Some(Reverse((_, i, stop))) = heap.pop() {
            let i = i as usize;
            let mid = end[i] as usize;
            if !alive[i] || mid >= n || end[mid] != stop {
                continue; // no longer two adjacent parts
            }
            alive[mid] = false;
            parts -= 1;
            let next = stop as usize;
            end[i] = stop;
            if next < n {
                before[next] = i as u32;
                let r = self.rank(&piece[i..end[next] as usize]);
                if r != NONE {
                    heap.push(Reverse((r, i as u32, end[next])));
                }
            }
            if i > 0 {
                let prev = before[i] as usize;
                let r = self.rank(&piece[prev..next]);
                if r != NONE {
                    heap.push(Reverse((r, prev as u32, next as u32)));
                }
            }
        }
        parts
    }
}

/// The bytes of token `id` in a vocabulary's static data.
fn token_bytes(tokens: &'static [u8], offsets: &'static [u8], id: u32) -> &'static [u8] {
    let at = |i: usize| u32::from_le_bytes(offsets[4 * i..4 * i + 4].try_into().expect("4 bytes")) as usize;
    &tokens[at(id as usize)..at(id as usize + 1)]
}

/// The first slot for `bytes` in a table of `len` (a power of two) slots.
#[inline]
fn bytes_slot(bytes: &[u8], len: usize) -> usize {
    let mut h = bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        h = (h.rotate_left(23) ^ u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = (h.rotate_left(23) ^ u64::from_le_bytes(w)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    (h >> (64 - len.trailing_zeros())) as usize
}

/// The ranks of the tokens of up to 16 bytes, as open-addressing tables of integer
/// keys: a lookup is one multiply and (almost always) one probe, with no pointer to
/// follow and no byte comparison, where a hash table of slices costs a byte-wise hash
/// and dependent loads (slot, offsets, token bytes). Both the one-token shortcut and the
/// merge's pair lookups go through it; longer spans use [`Vocab::rank`]. The tables are
/// fixed and at most half full, so no input can make a lookup probe further than the
/// longest cluster (a test bounds it).
///
/// A key is the token's bytes, little-endian, padded with `0xFF`. Text is UTF-8, which
/// never contains `0xFF` (nor does any slice of it), so padding cannot make spans of
/// different lengths equal, and tokens containing `0xFF` (which no span can equal) are
/// left out. All-`0xFF` marks an empty slot.
struct TokenMap {
    /// Tokens of 1 to 8 bytes, and their ranks (same index).
    short: Vec<u64>,
    short_ranks: Vec<u32>,
    /// Tokens of 9 to 16 bytes.
    long: Vec<u128>,
    long_ranks: Vec<u32>,
}

trait Key: Copy + PartialEq {
    const EMPTY: Self;
    fn hash(self) -> u64;
}

impl Key for u64 {
    const EMPTY: Self = u64::MAX;
    fn hash(self) -> u64 {
        self
    }
}

impl Key for u128 {
    const EMPTY: Self = u128::MAX;
    fn hash(self) -> u64 {
        (self as u64) ^ ((self >> 64) as u64).rotate_left(29)
    }
}

/// The first slot to probe in a table of `len` (a power of two) slots.
/// Fibonacci hashing: the top bits of the product depend on every key bit.
#[inline]
fn slot<K: Key>(key: K, len: usize) -> usize {
    (key.hash().wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - len.trailing_zeros())) as usize
}

/// `bytes` (at most `N` of them) padded with `0xFF` to `N`.
#[inline]
fn padded<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut key = [0xff; N];
    key[..bytes.len()].copy_from_slice(bytes);
    key
}

impl TokenMap {
    fn new<'a>(tokens: impl Iterator<Item = (u32, &'a [u8])>) -> Self {
        let tokens: Vec<(u32, &[u8])> = tokens.filter(|(_, t)| !t.is_empty() && !t.contains(&0xff)).collect();
        let short: Vec<(u64, u32)> = tokens
            .iter()
            .filter(|(_, t)| t.len() <= 8)
            .map(|&(id, t)| (u64::from_le_bytes(padded(t)), id))
            .collect();
        let long: Vec<(u128, u32)> = tokens
            .iter()
            .filter(|(_, t)| (9..=16).contains(&t.len()))
            .map(|&(id, t)| (u128::from_le_bytes(padded(t)), id))
            .collect();
        let (short, short_ranks) = table(&short);
        let (long, long_ranks) = table(&long);
        Self {
            short,
            short_ranks,
            long,
            long_ranks,
        }
    }

    /// Whether `piece` (of at most 16 bytes), which starts at byte `start` of `text`, is a
    /// token: the keys alone, without the second memory access a rank costs.
    #[inline]
    fn contains_at(&self, text: &[u8], start: usize, piece: &[u8]) -> bool {
        match key_at(text, start, piece) {
            Key16::Short(key) => find_slot(&self.short, key).is_some(),
            Key16::Long(key) => find_slot(&self.long, key).is_some(),
        }
    }

    /// The rank of `piece`, which starts at byte `start` of `text`, or [`NONE`] (also for
    /// pieces over 16 bytes).
    #[cfg(test)]
    fn rank_at(&self, text: &[u8], start: usize, piece: &[u8]) -> u32 {
        if piece.len() > 16 {
            return NONE;
        }
        match key_at(text, start, piece) {
            Key16::Short(key) => find(&self.short, &self.short_ranks, key),
            Key16::Long(key) => find(&self.long, &self.long_ranks, key),
        }
    }
}

/// The key of a piece of at most 16 bytes.
enum Key16 {
    Short(u64),
    Long(u128),
}

/// The key of `piece`, which starts at byte `start` of `text`.
#[inline]
fn key_at(text: &[u8], start: usize, piece: &[u8]) -> Key16 {
    // Keys are read from the text a whole word at a time and masked to the
    // piece, rather than copied byte by byte, except near the end of the text.
    debug_assert!(!piece.contains(&0xff) && piece.len() <= 16, "pieces are UTF-8");
    let n = piece.len();
    if n <= 8 {
        Key16::Short(match text.get(start..start + 8) {
            Some(w) => {
                let keep = u64::MAX >> (64 - 8 * n);
                (u64::from_le_bytes(w.try_into().expect("8 bytes")) & keep) | !keep
            }
            None => u64::from_le_bytes(padded(piece)),
        })
    } else {
        Key16::Long(match text.get(start..start + 16) {
            Some(w) => {
                let keep = u128::MAX >> (128 - 8 * n);
                (u128::from_le_bytes(w.try_into().expect("16 bytes")) & keep) | !keep
            }
            None => u128::from_le_bytes(padded(piece)),
        })
    }
}

impl TokenMap {
    /// The rank of a span of at most 16 bytes, or [`NONE`].
    #[inline]
    fn rank(&self, span: &[u8]) -> u32 {
        if span.len() <= 8 {
            find(&self.short, &self.short_ranks, u64::from_le_bytes(padded(span)))
        } else {
            find(&self.long, &self.long_ranks, u128::from_le_bytes(padded(span)))
        }
    }
}

/// An open-addressing table (linear probing, at most half full) of `entries`: the keys,
/// and the value of each key at the same index.
fn table<K: Key>(entries: &[(K, u32)]) -> (Vec<K>, Vec<u32>) {
    let len = (entries.len() * 2).next_power_of_two().max(2);
    let mut keys = vec![K::EMPTY; len];
    let mut values = vec![NONE; len];
    for &(k, v) in entries {
        let mut i = slot(k, len);
        while keys[i] != K::EMPTY && keys[i] != k {
            i = (i + 1) & (len - 1);
        }
        (keys[i], values[i]) = (k, v);
    }
    (keys, values)
}

/// The slot holding `key`, if any.
#[inline]
fn find_slot<K: Key>(keys: &[K], key: K) -> Option<usize> {
    let mut i = slot(key, keys.len());
    loop {
        let k = keys[i];
        if k == key {
            return Some(i);
        }
        if k == K::EMPTY {
            return None;
        }
        i = (i + 1) & (keys.len() - 1);
    }
}

/// The value of `key`, or [`NONE`].
#[inline]
fn find<K: Key>(keys: &[K], values: &[u32], key: K) -> u32 {
    find_slot(keys, key).map_or(NONE, |i| values[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(o200k: bool) -> &'static bpe_openai::Tokenizer {
        if o200k {
            bpe_openai::o200k_base()
        } else {
            bpe_openai::cl100k_base()
        }
    }

    /// The static data is the vocabulary `bpe-openai` ships, token for token.
    #[test]
    fn vocabulary_is_the_reference() {
        for vocab in [&*O200K, &*CL100K] {
            let bpe = &reference(vocab.o200k).bpe;
            assert_eq!(vocab.len(), bpe.num_tokens());
            for id in 0..vocab.len() as u32 {
                assert_eq!(vocab.token(id), bpe.token_bytes(id));
                assert_eq!(vocab.long_rank(bpe.token_bytes(id)), id);
            }
        }
    }

    /// Both merges count what the reference counts, on pieces short and long, including
    /// long runs built to be merged many times over.
    #[test]
    fn merges_agree_with_the_reference() {
        let long_runs = [
            "a".repeat(300),
            "ab".repeat(200),
            "=".repeat(500),
            "x".repeat(SMALL + 1),
            "抽象的な概念".repeat(40),
            "0123456789".repeat(50),
        ];
        for vocab in [&*O200K, &*CL100K] {
            let bpe = &reference(vocab.o200k).bpe;
            for piece in long_runs.iter().map(String::as_bytes) {
                assert_eq!(vocab.merge_large(piece), bpe.count(piece), "{}", piece.len());
            }
            for word in ["unbelievably", "Hello", "tokenization", "naïveté", "🚀🚀", "  \n\n"] {
                let b = word.as_bytes();
                assert_eq!(vocab.merge_small(b), bpe.count(b), "{word}");
                assert_eq!(vocab.merge_large(b), bpe.count(b), "{word}");
            }
        }
    }

    /// A piece over [`CHUNK`] bytes is counted within a token or two a chunk of the
    /// reference, and never under it once past the budget.
    #[test]
    fn long_pieces_are_counted_in_chunks_then_bounded() {
        let letters: String = (0..3 * CHUNK + 77)
            .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
            .collect();
        let cjk = "抽象的な概念を説明する".repeat(CHUNK / 10);
        for vocab in [&*O200K, &*CL100K] {
            let reference = reference(vocab.o200k);
            for text in [letters.as_str(), cjk.as_str(), &"a".repeat(2 * CHUNK + 5)] {
                let want = reference.count(text);
                let chunks = text.len().div_ceil(CHUNK);
                let got = vocab.count(text);
                assert!(got.abs_diff(want) <= 2 * chunks, "{got} vs {want} over {chunks} chunks");
            }
            let over = "qzx".repeat(LONG_BUDGET / 3 + CHUNK);
            assert!(vocab.count(&over) >= reference.count(&over));
            let mut budget = 0;
            assert_eq!(vocab.count_long(over.as_bytes(), &mut budget), over.len());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn merges_agree_on_any_bytes(s in "[a-z ]{0,8}[\\PC]{0,40}[a-c0-2=]{0,120}") {
            for vocab in [&*O200K, &*CL100K] {
                let bpe = &reference(vocab.o200k).bpe;
                let b = s.as_bytes();
                if b.len() >= 2 {
                    prop_assert_eq!(vocab.merge_large(b), bpe.count(b));
                    if b.len() <= SMALL {
                        prop_assert_eq!(vocab.merge_small(b), bpe.count(b));
                    }
                }
                prop_assert_eq!(vocab.count(&s), reference(vocab.o200k).count(&s));
            }
        }
    }

    /// The short-token map agrees with the vocabulary, whether a key is read from a
    /// longer text, copied at the text's end or taken from a span; every lookup table's
    /// longest run of occupied slots (which bounds any lookup) is short.
    #[test]
    fn token_map_is_the_vocabulary() {
        for vocab in [&*O200K, &*CL100K] {
            let bpe = &reference(vocab.o200k).bpe;
            let ids: std::collections::HashMap<&[u8], u32> = (0..bpe.num_tokens() as u32)
                .map(|id| (bpe.token_bytes(id), id))
                .collect();
            let mut in_map = 0;
            // Text is UTF-8: no lookup has `0xFF` in it.
            for (&t, &id) in ids.iter().filter(|(t, _)| !t.contains(&0xff)) {
                let mut padded = t.to_vec();
                padded.extend_from_slice(b"0123456789abcdefg");
                let want = if t.len() <= 16 { id } else { NONE };
                assert_eq!(vocab.short.rank_at(t, 0, t), want, "{t:?}");
                assert_eq!(vocab.short.rank_at(&padded, 0, t), want, "{t:?}");
                assert_eq!(vocab.rank(t), id, "{t:?}");
                in_map += usize::from(want != NONE);
            }
            assert!(in_map > ids.len() * 9 / 10, "{in_map} of {}", ids.len());
            let longest = |occupied: Vec<bool>| occupied.split(|&o| !o).map(<[bool]>::len).max().unwrap_or(0);
            let short = longest(vocab.short.short.iter().map(|&k| k != u64::EMPTY).collect());
            let long = longest(vocab.short.long.iter().map(|&k| k != u128::EMPTY).collect());
            let all = longest(vocab.ranks.iter().map(|&id| id != NONE).collect());
            assert!(short < 64 && long < 64 && all < 64, "{short} {long} {all}");
            // Non-tokens, including prefixes and extensions of tokens.
            let text = "The quick brown fox's 3 dogs — naïve café 東京 🚀!\n\n\tDON'T \u{a0} x1234 ///\0\0";
            for start in 0..text.len() {
                for end in start + 1..=text.len().min(start + 17) {
                    let piece = &text.as_bytes()[start..end];
                    let want = ids.get(piece).copied().unwrap_or(NONE);
                    assert_eq!(vocab.rank(piece), want, "{piece:?}");
                    let short = if piece.len() <= 16 { want } else { NONE };
                    assert_eq!(vocab.short.rank_at(text.as_bytes(), start, piece), short, "{piece:?}");
                }
            }
        }
    }
}
