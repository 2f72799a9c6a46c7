//! Hashed text features: the tokenizer and hashing of `edgeroute/learn/features.py`,
//! bit for bit (`tests/classify_parity.rs` checks the buckets against a
//! fixture written by the Python side). Word unigrams and bigrams and byte
//! n-grams of the lower-cased prompt, cut to its first and last bytes so that
//! cost is bounded whatever the prompt length, plus two length features.

use serde::Deserialize;

const FNV_OFFSET: u64 = 0xCBF2_9CE4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01B3;
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const SEED_UNI: u64 = 0x243F_6A88_85A3_08D3;
const SEED_BI: u64 = 0x1319_8A2E_0370_7344;
const SEED_CHAR: u64 = 0xA409_3822_299F_31D0;

/// MurmurHash3's 64-bit finaliser.
#[inline]
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    k ^= k >> 33;
    k = k.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    k ^= k >> 33;
    k
}

#[inline]
fn is_word_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b >= 0x80
}

/// A whole 3-byte UTF-8 character with lead byte E3..ED (U+3000..U+DFFF: kana,
/// CJK ideographs, Hangul) starts at `i`. A character cut by the head / tail
/// window is not whole and stays part of a word (as in `features.py`).
#[inline]
fn is_cjk_char(buf: &[u8], i: usize) -> bool {
    matches!(buf.get(i..i + 3), Some([0xE3..=0xED, 0x80..=0xBF, 0x80..=0xBF]))
}

#[inline]
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(FNV_OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

#[inline]
fn is_punct_byte(b: u8) -> bool {
    b.is_ascii_punctuation() && b != b'_'
}

/// What the featurizer emits; read from the model header.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FeaturizerConfig {
    /// Featurizer specification version: 1, or 2 where each CJK / kana / Hangul
    /// character is a word of its own (those scripts put no spaces between words).
    pub version: u32,
    /// The hash table has `2^log2_buckets` rows.
    pub log2_buckets: u32,
    /// Bytes kept from the start of a long prompt.
    pub head_bytes: usize,
    /// Bytes kept from the end of a long prompt.
    pub tail_bytes: usize,
    /// Emit word unigrams.
    pub word_unigrams: bool,
    /// Emit bigrams of consecutive tokens.
    pub word_bigrams: bool,
    /// Byte n-gram sizes to emit (each at most 7).
    pub char_ngrams: Vec<u8>,
}

/// The hashed features of one prompt, computed once and shared by every model
/// whose [`FeaturizerConfig`] is equal.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    buckets: Vec<u32>,
    length: [f64; 2],
}

impl Features {
    /// Hash `text` as `edgeroute/learn/features.py` does.
    pub fn extract(text: &str, cfg: &FeaturizerConfig) -> Self {
        let mut buckets = Vec::new();
        let length = visit_buckets(text, cfg, |b| buckets.push(b));
        Features { buckets, length }
    }

    /// The emitted bucket ids, in emission order (words, then byte n-grams).
    pub fn buckets(&self) -> &[u32] {
        &self.buckets
    }

    /// The two dense length features: `ln(1+bytes)/10`, `ln(1+lines)/5`.
    pub fn length(&self) -> [f64; 2] {
        self.length
    }
}

/// Longest head + tail window hashed without a heap allocation.
const STACK_WINDOW: usize = 4096;

/// Calls `visit` with every bucket of `text` in emission order (the spec of
/// `features.py`) and returns the two length features. No allocation when the
/// hashed window fits in [`STACK_WINDOW`] bytes: [`super::Classifier::classify`]
/// accumulates weights straight from here instead of collecting buckets.
pub(super) fn visit_buckets(text: &str, cfg: &FeaturizerConfig, mut visit: impl FnMut(u32)) -> [f64; 2] {
    let raw = text.as_bytes();
    let (head, tail): (&[u8], &[u8]) = if raw.len() > cfg.head_bytes + cfg.tail_bytes {
        (&raw[..cfg.head_bytes], &raw[raw.len() - cfg.tail_bytes..])
    } else {
        (raw, &[])
    };
    let n = head.len() + tail.len();
    let mut stack = [0u8; STACK_WINDOW];
    let mut heap = Vec::new();
    let buf: &mut [u8] = if n <= STACK_WINDOW {
        &mut stack[..n]
    } else {
        heap.resize(n, 0);
        &mut heap
    };
    buf[..head.len()].copy_from_slice(head);
    buf[head.len()..].copy_from_slice(tail);
    buf.make_ascii_lowercase();
    let mask = (1u64 << cfg.log2_buckets) - 1;
    word_buckets(buf, cfg, mask, &mut visit);
    for &g in &cfg.char_ngrams {
        char_buckets(buf, g, mask, &mut visit);
    }
    let lines = raw.iter().filter(|&&b| b == b'\n').count() + 1;
    [(raw.len() as f64).ln_1p() / 10.0, (lines as f64).ln_1p() / 5.0]
}

fn word_buckets(buf: &[u8], cfg: &FeaturizerConfig, mask: u64, visit: &mut impl FnMut(u32)) {
    let mut prev: Option<u64> = None;
    let mut emit = |h: u64| {
        if cfg.word_unigrams {
            visit((fmix64(h ^ SEED_UNI) & mask) as u32);
        }
        if cfg.word_bigrams {
            if let Some(p) = prev {
                let key = p.wrapping_mul(GOLDEN).wrapping_add(h) ^ SEED_BI;
                visit((fmix64(key) & mask) as u32);
            }
        }
        prev = Some(h);
    };
    let split_cjk = cfg.version >= 2;
    let mut i = 0;
    while i < buf.len() {
        let b = buf[i];
        if split_cjk && is_cjk_char(buf, i) {
            emit(fnv1a(&buf[i..i + 3]));
            i += 3;
        } else if is_word_byte(b) {
            let mut h = FNV_OFFSET;
            while i < buf.len() && is_word_byte(buf[i]) && !(split_cjk && is_cjk_char(buf, i)) {
                h = (h ^ u64::from(buf[i])).wrapping_mul(FNV_PRIME);
                i += 1;
            }
            emit(h);
        } else {
            if is_punct_byte(b) {
                emit((FNV_OFFSET ^ u64::from(b)).wrapping_mul(FNV_PRIME));
            }
            i += 1;
        }
    }
}

fn char_buckets(buf: &[u8], n: u8, mask: u64, visit: &mut impl FnMut(u32)) {
    let n = usize::from(n);
    if n == 0 || n > 7 || buf.len() < n {
        return;
    }
    let tag = (n as u64) << 56;
    let top = 8 * (n as u32 - 1);
    // little-endian window of the last n bytes
    let mut key: u64 = 0;
    for (j, &b) in buf[..n - 1].iter().enumerate() {
        key |= u64::from(b) << (8 * j);
    }
    for &b in &buf[n - 1..] {
        key |= u64::from(b) << top;
        visit((fmix64((key | tag) ^ SEED_CHAR) & mask) as u32);
        key >>= 8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(log2: u32, chars: Vec<u8>) -> FeaturizerConfig {
        FeaturizerConfig {
            version: 1,
            log2_buckets: log2,
            head_bytes: 16,
            tail_bytes: 8,
            word_unigrams: true,
            word_bigrams: true,
            char_ngrams: chars,
        }
    }

    #[test]
    fn fnv_and_fmix_match_reference_values() {
        // fnv1a64("a") and fmix64(1), well-known constants
        assert_eq!((FNV_OFFSET ^ 0x61).wrapping_mul(FNV_PRIME), 0xAF63_DC4C_8601_EC8C);
        assert_eq!(fmix64(0), 0);
        assert_ne!(fmix64(1), 1);
    }

    #[test]
    fn tokens_words_punctuation_and_bigrams() {
        let c = cfg(16, vec![]);
        // "Hi, x" -> tokens hi , x : 3 unigrams + 2 bigrams
        assert_eq!(Features::extract("Hi, x", &c).buckets().len(), 5);
        // case-insensitive
        assert_eq!(Features::extract("HELLO", &c), {
            let mut f = Features::extract("hello", &c);
            f.length = Features::extract("HELLO", &c).length;
            f
        });
        assert!(Features::extract("   \n\t ", &c).buckets().is_empty());
    }

    #[test]
    fn char_ngrams_count_and_truncation() {
        let c = cfg(16, vec![4]);
        let f = Features::extract("abcdef", &c);
        // 1 word + 3 four-grams
        assert_eq!(f.buckets().len(), 4);
        let long = "x".repeat(1000);
        let f = Features::extract(&long, &c);
        // truncated to 16 + 8 bytes: one word, 21 four-grams, all the same bucket
        assert_eq!(f.buckets().len(), 22);
        assert!(f.buckets()[1..].windows(2).all(|w| w[0] == w[1]));
        // the length features see the whole prompt
        assert!((f.length()[0] - 1001f64.ln() / 10.0).abs() < 1e-12);
    }

    #[test]
    fn rolling_window_matches_direct_key() {
        let buf = b"hello, world";
        let mut out = Vec::new();
        char_buckets(buf, 3, u64::MAX, &mut |b| out.push(b));
        for (i, &b) in out.iter().enumerate() {
            let key = u64::from(buf[i]) | u64::from(buf[i + 1]) << 8 | u64::from(buf[i + 2]) << 16 | 3 << 56;
            assert_eq!(b, fmix64(key ^ SEED_CHAR) as u32);
        }
    }
}
