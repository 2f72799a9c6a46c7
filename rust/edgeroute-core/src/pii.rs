//! Detection of personal data in prompts, for PII-aware routing (send such
//! prompts only to deployments tagged for it) and for redacted logs.
//!
//! Candidates are found by regular expressions and then validated where a
//! checksum exists (Luhn for payment cards, ISO 7064 mod 97 for IBANs), which
//! keeps order numbers and timestamps from being taken for cards.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::{Regex, RegexSet};
use serde::Deserialize;

/// Kinds of personal data the core recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiKind {
    /// An e-mail address.
    Email,
    /// A phone number in international or North American form.
    Phone,
    /// A payment card number that passes the Luhn check.
    PaymentCard,
    /// An IBAN that passes the mod-97 check.
    Iban,
    /// A national identification number (US SSN form).
    NationalId,
}

impl PiiKind {
    /// All kinds, in a fixed order.
    pub const ALL: [PiiKind; 5] = [
        Self::Email,
        Self::Phone,
        Self::PaymentCard,
        Self::Iban,
        Self::NationalId,
    ];

    /// The snake_case name used in config and explanations.
    pub fn name(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::Phone => "phone",
            Self::PaymentCard => "payment_card",
            Self::Iban => "iban",
            Self::NationalId => "national_id",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of detected kinds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PiiSet(u8);

impl PiiSet {
    /// Whether `kind` was found.
    pub fn contains(self, kind: PiiKind) -> bool {
        self.0 & kind.bit() != 0
    }
    /// Whether nothing was found.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The kinds found, in [`PiiKind::ALL`] order.
    pub fn kinds(self) -> impl Iterator<Item = PiiKind> {
        PiiKind::ALL.into_iter().filter(move |k| self.contains(*k))
    }
    /// Both sets together.
    pub fn union(self, other: PiiSet) -> PiiSet {
        PiiSet(self.0 | other.0)
    }
    /// Whether the sets share a kind.
    pub fn intersects(self, other: PiiSet) -> bool {
        self.0 & other.0 != 0
    }
    fn insert(&mut self, kind: PiiKind) {
        self.0 |= kind.bit();
    }
}

// The patterns are ASCII by nature, and so are their digits and word
// boundaries (`[0-9]`, `(?-u:\b)`): a Unicode `\b` makes the regex crate's DFAs
// give up on any non-ASCII haystack and fall back to a far slower engine
// (measured: 40× on a 2,000-token prompt with a few emoji), and the checksums
// read ASCII digits only anyway. A number glued to a non-ASCII letter
// ("東京4111...") is still seen.
// An e-mail's domain may be internationalised (`bücher.de`, `例え.jp`, Punycode `xn--…`): its
// labels take any letter, mark or digit, its top level letters (ASCII first, so that
// `jane@example.com谢谢` ends at `com`) or Punycode. Its dots may be the ideographic and
// half-width full stops an input method types (`jane@example。com`; the full-width `．` is
// folded). The local part may be non-ASCII too (EAI: `josé@`, `用户@`): see [`email_re`].
// Phones: grouped (`+1 415 555 0132`, `(030) 1234 5678`), E.164 written whole (`+14155550132`),
// and a country code before a digit and four pairs (`+33 1 23 45 67 89`).
const PHONE_RE: &str = r"(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{2,4}\)[ .-]?|(?-u:\b)[0-9]{2,4}[ .-])[0-9]{3,4}[ .-][0-9]{3,4}(?-u:\b)|\+[1-9][0-9]{7,14}(?-u:\b)|\+[0-9]{1,3}[ .-]?[0-9](?:[ .-][0-9]{2}){4}(?-u:\b)";
const CARD_RE: &str = r"(?-u:\b)(?:[0-9][ -]?){12,18}[0-9](?-u:\b)";
const IBAN_RE: &str = r"(?-u:\b)[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?-u:\b)";
const SSN_RE: &str = r"(?-u:\b)[0-9]{3}(?:-[0-9]{2}-| [0-9]{2} )[0-9]{4}(?-u:\b)";
// What a card split otherwise than by single spaces or hyphens holds (see [`card_join`]).
const SPLIT_CARD_RE: &str = r"[0-9]{4}(?:[./\t\r\n]|[ \t\r\n]{2,4})[0-9]";
// A national phone number: 9 to 12 digits, single separators allowed; a phone only after a
// word that says so (see `phone_words`), and not when written as an SSN is.
// A number split as a card is (see [`cards`]); a phone pattern's match inside one is no phone.
const SPLIT_SHAPE_RE: &str = r"(?-u:\b)(?:(?:[0-9]{4}(?:[ ./\t\r\n-]|[ \t\r\n]{2,4})){3}[0-9]{1,4}|[0-9]{4}(?:[ ./\t\r\n-]|[ \t\r\n]{2,4})[0-9]{6}(?:[ ./\t\r\n-]|[ \t\r\n]{2,4})[0-9]{4,5})(?-u:\b)";
const NATIONAL_RE: &str = r"(?-u:\b)[0-9](?:[ ./-]?[0-9]){8,11}(?-u:\b)";

static EMAIL: LazyLock<Regex> = LazyLock::new(|| Regex::new(&email_re()).expect("valid pattern"));

/// Internationalised top-level domains (IANA's root zone, the ones in use), longest first so
/// that a pattern's alternation takes the whole of one.
#[rustfmt::skip]
const IDN_TLDS: &[&str] = &[
    "组织机构", "ファッション", "السعودية", "சிங்கப்பூர்", "இந்தியா", "இலங்கை", "москва", "католик", "онлайн",
    "امارات", "الجزائر", "المغرب", "الاردن", "ポイント", "クラウド", "グーグル", "テスト", "新加坡", "我爱你", "中文网",
    "みんな", "ストア", "セール", "испытание", "δοκιμή", "परीक्षा", "संगठन", "भारत", "ভারত", "ভাৰত", "ਭਾਰਤ",
    "ભારત", "ଭାରତ", "భారత్", "ಭಾರತ", "ഭാരതം", "ලංකා", "ไทย", "कॉम", "नेट", "дети", "сайт", "қаз",
    "срб", "мкд", "мон", "рус", "бел", "укр", "орг", "ком", "рф", "бг", "ελ", "ευ", "გე", "հայ",
    "مصر", "عرب", "شبكة", "موقع", "قطر", "تونس", "سورية", "عمان", "ایران", "中国", "中國", "公司", "网络",
    "网址", "网店", "网站", "商城", "商店", "商标", "广告", "在线", "集团", "手机", "移动", "联通", "时尚", "微博", "游戏", "娱乐",
    "企业", "信息", "健康", "八卦", "政务", "购物", "餐厅", "香港", "台湾", "台灣", "澳門", "澳门", "世界", "书籍", "机构", "佛山",
    "广东", "测试", "コム", "通販", "家電", "食品", "한국", "닷컴", "닷넷", "삼성", "테스트",
];

/// The e-mail pattern: a local part that ends in ASCII (`jane@`, `jöran@`) takes any top level
/// after an ASCII dot, an ASCII one or a known internationalised one ([`IDN_TLDS`]) after an
/// ideographic full stop. One that ends in another script (`josé@`, `用户@`) takes an ASCII
/// top level after an ASCII dot, or a known internationalised one: an @-mention in Chinese or
/// Japanese prose (`谢谢@小明。明天见`) is no address.
fn email_re() -> String {
    let mut idn: Vec<&str> = IDN_TLDS.to_vec();
    idn.sort_by_key(|t| std::cmp::Reverse(t.chars().count()));
    let idn = idn.join("|");
    let local = r"[\p{L}\p{M}\p{N}._%+-]*";
    let domain = r"[-\p{L}\p{M}\p{N}]+(?:[.\x{3002}\x{FF61}][-\p{L}\p{M}\p{N}]+)*";
    let ascii = r"(?:[A-Za-z]{2,}|xn--[A-Za-z0-9-]{2,})";
    format!(
        r"{local}[A-Za-z0-9._%+-]@{domain}(?:\.(?:{ascii}|[\p{{L}}\p{{M}}--\p{{ASCII}}]{{2,}})|[\x{{3002}}\x{{FF61}}](?:{ascii}|{idn}))|{local}[\p{{L}}\p{{M}}\p{{N}}--\p{{ASCII}}]@{domain}(?:\.{ascii}|[.\x{{3002}}\x{{FF61}}](?:{idn}))"
    )
}

/// The number-shaped patterns in one automaton, in [`PiiKind::ALL`] order
/// (the e-mail slot never matches here): one pass says which kinds may be
/// present, and only those are searched again for positions and checksums.
static NUMBERS: LazyLock<RegexSet> = LazyLock::new(|| {
    RegexSet::new([
        r"[^\s\S]",
        PHONE_RE,
        CARD_RE,
        IBAN_RE,
        SSN_RE,
        SPLIT_CARD_RE,
        NATIONAL_RE,
    ])
    .expect("valid PII patterns")
});
/// Not in [`NUMBERS`] (a sixth pattern there slowed every run of prose dense with numbers):
/// tried on runs with the 13 digits a card has.
static SPLIT_CARD: LazyLock<Regex> = LazyLock::new(|| Regex::new(SPLIT_CARD_RE).expect("valid pattern"));
static SPLIT_SHAPE: LazyLock<Regex> = LazyLock::new(|| Regex::new(SPLIT_SHAPE_RE).expect("valid pattern"));
static NATIONAL_PHONE: LazyLock<Regex> = LazyLock::new(|| Regex::new(NATIONAL_RE).expect("valid pattern"));
static PHONE: LazyLock<Regex> = LazyLock::new(|| Regex::new(PHONE_RE).expect("valid pattern"));
static CARD: LazyLock<Regex> = LazyLock::new(|| Regex::new(CARD_RE).expect("valid pattern"));
static IBAN: LazyLock<Regex> = LazyLock::new(|| Regex::new(IBAN_RE).expect("valid pattern"));
static SSN: LazyLock<Regex> = LazyLock::new(|| Regex::new(SSN_RE).expect("valid pattern"));

/// Bytes a phone, card, IBAN or SSN match can consist of: `[0-9A-Z +().-]`, and the tabs,
/// line breaks and slashes a card's groups may be split by.
fn numeric_byte(b: u8) -> bool {
    b.is_ascii_digit()
        || b.is_ascii_uppercase()
        || matches!(
            b,
            b' ' | b'+' | b'(' | b')' | b'.' | b'-' | b'/' | b'\t' | b'\n' | b'\r'
        )
}

/// Bytes an e-mail match can consist of.
fn email_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-' | b'@')
}

/// How far before an `@` a non-ASCII local part is looked for, in bytes (an address's local
/// part has at most 64).
const LOCAL_REACH: usize = 256;

/// The run of e-mail characters around the `@` at `at`: ASCII e-mail characters before it,
/// then non-ASCII ones too (an EAI local part, `josé@`, `用户@`), and any non-ASCII after it
/// (an internationalised domain). An ASCII local part right after a character of a script
/// written without spaces (`请发邮件到jane@…`) starts at the ASCII: the prose is no part of it.
fn email_run(text: &str, at: usize) -> (usize, usize) {
    let bytes = text.as_bytes();
    let mut start = at;
    while start > 0 && email_byte(bytes[start - 1]) {
        start -= 1;
    }
    let ascii_tail = bytes[start..at].iter().any(u8::is_ascii_alphanumeric);
    let limit = start.saturating_sub(LOCAL_REACH);
    while start > limit {
        let Some(c) = text[..start].chars().next_back() else {
            break;
        };
        let more = if c.is_ascii() {
            email_byte(c as u8)
        } else {
            !(ascii_tail && unspaced_script(c))
        };
        if !more {
            break;
        }
        start -= c.len_utf8();
    }
    let mut end = at + 1;
    while end < bytes.len() && (email_byte(bytes[end]) || bytes[end] >= 0x80) {
        end += 1;
    }
    (start, end)
}

/// Whether `c` is of a script written without spaces between words (Han, kana, Hangul).
fn unspaced_script(c: char) -> bool {
    matches!(c as u32, 0x1100..=0x11FF | 0x2E80..=0x9FFF | 0xAC00..=0xD7AF | 0xF900..=0xFAFF | 0xFF66..=0xFF9F | 0x20000..=0x3FFFF)
}

/// Calls `f` with each maximal run of [`numeric_byte`]s that holds at least
/// `min_digits` digits, widened by one character on each side.
///
/// Every match of the number-shaped patterns lies inside such a run, and the
/// widening gives their `(?-u:\b)` the real neighbouring character, so searching
/// the runs finds exactly what searching the whole text would. Prose has few
/// digits: 64-byte blocks without any are skipped with a branch-free test, which
/// keeps a digit-free prompt at a few hundred nanoseconds per 10 kB.
fn numeric_runs(text: &str, min_digits: usize, mut f: impl FnMut(&str) -> bool) {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let block = &bytes[i..bytes.len().min(i + 64)];
        // A whole block as an array: its test is four vector compares, without the loop and
        // remainder a slice of unknown length takes (1.1 instructions a byte; now 0.4).
        let digit = match block.first_chunk::<64>() {
            Some(whole) => whole.iter().fold(false, |acc, b| acc | b.is_ascii_digit()),
            None => block.iter().any(u8::is_ascii_digit),
        };
        if !digit {
            i += block.len();
            continue;
        }
        let Some(d) = block.iter().position(u8::is_ascii_digit) else {
            unreachable!("the block has a digit")
        };
        let mut start = i + d;
        while start > 0 && numeric_byte(bytes[start - 1]) {
            start -= 1;
        }
        let mut end = i + d;
        let mut digits = 0;
        while end < bytes.len() && numeric_byte(bytes[end]) {
            digits += usize::from(bytes[end].is_ascii_digit());
            end += 1;
        }
        if digits >= min_digits {
            let mut from = start.saturating_sub(1);
            while !text.is_char_boundary(from) {
                from -= 1;
            }
            let mut to = (end + 1).min(bytes.len());
            while !text.is_char_boundary(to) {
                to += 1;
            }
            if f(&text[from..to]) {
                return;
            }
        }
        i = end;
    }
}

/// Whether an e-mail address occurs: the pattern is run only on the runs of
/// e-mail characters around each `@`.
fn has_email(text: &str) -> bool {
    let mut searched_to = 0;
    for at in memchr::memchr_iter(b'@', text.as_bytes()) {
        if at < searched_to {
            continue;
        }
        let (start, end) = email_run(text, at);
        if EMAIL.is_match(&text[start..end]) {
            return true;
        }
        searched_to = end;
    }
    false
}

/// Luhn checksum over the digits of `s` (other characters ignored).
pub fn luhn_valid(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                if d * 2 > 9 {
                    d * 2 - 9
                } else {
                    d * 2
                }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

/// How two digit groups of a card number are joined: `Some(false)` by the usual single space
/// or hyphen, `Some(true)` by a separator a card is split by otherwise (a dot, a slash, a
/// tab, a line break, a few spaces), `None` not at all.
fn card_join(gap: &[u8]) -> Option<bool> {
    match gap {
        b" " | b"-" => Some(false),
        b"." | b"/" => Some(true),
        _ if (1..=4).contains(&gap.len()) && gap.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n')) => {
            Some(true)
        }
        _ => None,
    }
}

/// Whether digit groups of these lengths are written as a card is: 4-4-4-1..4, 4-4-4-4-1..3,
/// or 4-6-4..5 (American Express, Diners Club).
fn card_shaped(lengths: &[usize]) -> bool {
    match lengths {
        [4, 6, 4 | 5] => true,
        [4, 4, 4, last] | [4, 4, 4, 4, last] => (1..=4).contains(last) && lengths.len() * 4 - 4 + last <= 19,
        _ => false,
    }
}

/// Byte ranges of payment card numbers in `text`: runs of 13 to 19 digits,
/// optionally grouped by single spaces or hyphens, between word boundaries, that
/// pass the Luhn check. Groups split otherwise ([`card_join`]: dots, slashes, tabs, line
/// breaks) count when they are written as a card is, which a column of numbers seldom is:
/// [`card_shaped`], starting with a card network's digit (2 to 6), and no group of four
/// digits joined before or after.
///
/// Every window of whole digit groups is tried, not only the leftmost-longest
/// match of [`CARD_RE`]: a year or an order number written just before a card
/// ("in 2024 4111 1111 1111 1111") would otherwise hide it.
fn cards(text: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    let bytes = text.as_bytes();
    let word = |i: usize| bytes.get(i).is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
    // Groups of digits: (start, end), in order.
    let mut groups: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            groups.push((start, i));
        } else {
            i += 1;
        }
    }
    // How each group is joined to the one before it.
    let joins: Vec<Option<bool>> = (0..groups.len())
        .map(|g| {
            (g > 0)
                .then(|| card_join(&bytes[groups[g - 1].1..groups[g].0]))
                .flatten()
        })
        .collect();
    let four = |g: usize| groups[g].1 - groups[g].0 == 4;
    let mut found = Vec::new();
    let mut chain_start = 0;
    for g in 0..groups.len() {
        if joins[g].is_none() {
            chain_start = g;
        }
        let (_, end) = groups[g];
        // Windows ending at group g: the end needs a boundary after it.
        if word(end) {
            continue;
        }
        let four_after = joins.get(g + 1).copied().flatten().is_some() && four(g + 1);
        let mut digits = 0;
        let mut split = false;
        for first in (chain_start..=g).rev() {
            let (start, stop) = groups[first];
            digits += stop - start;
            if digits > 19 {
                break;
            }
            let bounded = start == 0 || !word(start - 1);
            let as_written = || {
                let lengths: Vec<usize> = groups[first..=g].iter().map(|(a, b)| b - a).collect();
                let four_before = first > chain_start && four(first - 1);
                card_shaped(&lengths) && (b'2'..=b'6').contains(&bytes[start]) && !four_before && !four_after
            };
            if digits >= 13 && bounded && (!split || as_written()) && luhn_valid(&text[start..end]) {
                found.push((start, end));
            }
            split |= joins[first] == Some(true);
        }
    }
    found.into_iter()
}

/// ISO 13616 IBAN check (mod 97 of the rearranged number equals 1).
pub fn iban_valid(s: &str) -> bool {
    let compact: Vec<char> = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let rearranged = compact[4..].iter().chain(compact[..4].iter());
    let mut rem: u64 = 0;
    for c in rearranged {
        let v = match c.to_digit(36) {
            Some(v) => v as u64,
            None => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// Compiles the detectors and fills their search caches, so that the first
/// request does not pay for it (about half a millisecond).
pub fn warm_up() {
    detect(
        "mail a@b.io or +1 415 555 0100, card 4111 1111 1111 1111, DE89370400440532013000, 078-05-1120",
        PiiSet::default(),
    );
}

/// What a character typed or pasted inside personal data reads as to the ASCII patterns:
/// `Some(Some(c))` a replacement, `Some(None)` nothing (an invisible character), `None` itself.
///
/// Full-width forms (an input method's `４１１１`, `＠`), the small `﹫`, the digits of every
/// script of planes 0 and 1 (Unicode's decimal digits: Arabic-Indic, Devanagari, Bengali, Thai,
/// Osmanya, Brahmi, Adlam, …), the mathematical bold, double-struck, sans-serif and monospace
/// `𝟒𝟏𝟏𝟏`, the segmented digits, the mathematical alphanumeric letters (`𝐣𝐚𝐧𝐞`), no-break, thin and ideographic
/// spaces, Unicode hyphens and dashes, and the characters Unicode says draw nothing (`Default_Ignorable_Code_Point`: a
/// ZWSP or a soft hyphen inside an address, bidi marks copied from a right-to-left page,
/// variation selectors, invisible operators, tag characters) hide nothing from the model that
/// reads them.
fn fold_char(c: char) -> Option<Option<char>> {
    let u = c as u32;
    Some(match u {
        0xFF01..=0xFF5E => char::from_u32(u - 0xFEE0),
        0xFE6B => Some('@'),
        0xFE52 => Some('.'),
        0x00A0 | 0x2000..=0x200A | 0x202F | 0x205F | 0x3000 => Some(' '),
        0x2010..=0x2013 | 0x2212 | 0xFE63 => Some('-'),
        // Mathematical alphanumerics: 13 alphabets of `A-Za-z` (reserved holes included).
        0x1D400..=0x1D6A3 => {
            let i = ((u - 0x1D400) % 52) as u8;
            Some(char::from(if i < 26 { b'A' + i } else { b'a' + i - 26 }))
        }
        0x00AD
        | 0x034F
        | 0x061C
        | 0x115F..=0x1160
        | 0x17B4..=0x17B5
        | 0x180B..=0x180F
        | 0x200B..=0x200F
        | 0x202A..=0x202E
        | 0x2060..=0x206F
        | 0x3164
        | 0xFE00..=0xFE0F
        | 0xFEFF
        | 0xFFA0
        | 0xFFF0..=0xFFF8
        | 0x1D173..=0x1D17A
        | 0xE0000..=0xE0FFF => None,
        _ => return decimal_digit(u).map(Some),
    })
}

/// The first code point of each run of ten decimal digits beyond ASCII (Unicode 17's `Nd`, as
/// `char::is_numeric` knows them; a test checks each run): every set of planes 0 and 1, the
/// historic scripts' (Osmanya, Brahmi, Adlam, …) as well as the mathematical and segmented digits.
const DIGIT_ZEROS: [u32; 76] = [
    0x660, 0x6F0, 0x7C0, 0x966, 0x9E6, 0xA66, 0xAE6, 0xB66, 0xBE6, 0xC66, 0xCE6, 0xD66, 0xDE6, 0xE50, 0xED0, 0xF20,
    0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80, 0x1A90, 0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0,
    0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0, 0xFF10, 0x104A0, 0x10D30, 0x10D40, 0x11066, 0x110F0, 0x11136, 0x111D0,
    0x112F0, 0x11450, 0x114D0, 0x11650, 0x116C0, 0x116D0, 0x116DA, 0x11730, 0x118E0, 0x11950, 0x11BF0, 0x11C50,
    0x11D50, 0x11DA0, 0x11DE0, 0x11F50, 0x16130, 0x16A60, 0x16AC0, 0x16B50, 0x16D70, 0x1CCF0, 0x1D7CE, 0x1D7D8,
    0x1D7E2, 0x1D7EC, 0x1D7F6, 0x1E140, 0x1E2F0, 0x1E4F0, 0x1E5F1, 0x1E950, 0x1FBF0,
];

/// The ASCII digit a decimal digit of another script stands for.
fn decimal_digit(u: u32) -> Option<char> {
    let zero = DIGIT_ZEROS[DIGIT_ZEROS.partition_point(|&z| z <= u).checked_sub(1)?];
    (u - zero < 10).then(|| char::from(b'0' + (u - zero) as u8))
}

/// Whether `b` is the UTF-8 lead byte of a character [`fold_char`] may map, other than those
/// [`wide_lead`] tests with the bytes after (0xC2, 0xCD, 0xD8, 0xD9, 0xDB, 0xDF, 0xE1..=0xE3,
/// 0xEF, 0xF3).
#[inline]
fn fold_lead(b: u8) -> bool {
    matches!(b, 0xC2 | 0xCD | 0xD8 | 0xD9 | 0xDB | 0xDF | 0xE1..=0xE3 | 0xEF | 0xF3)
}

/// Whether the character whose first three bytes are `a`, `b`, `c` may be one [`fold_char`]
/// maps, of those whose lead byte alone would stop at every character of a whole script:
/// 0xE0 (the Indic scripts, Thai, Lao, Tibetan: only their digits), 0xEA (Hangul syllables
/// from U+AC00 on have none), and 0xF0 (of plane 1 only the mathematical alphanumerics,
/// 0xF0 0x9D, and the digits; every emoji starts 0xF0 0x9F).
#[inline]
fn wide_lead(a: u8, b: u8, c: u8) -> bool {
    ((a == 0xE0) & indic_digit(b, c)) | ((a == 0xEA) & (b < 0xB0)) | ((a == 0xF0) & plane_1(b, c))
}

/// The second and third bytes of a digit of the Indic scripts, Thai, Lao or Tibetan.
#[inline]
fn indic_digit(b: u8, c: u8) -> bool {
    let indic = (0xA5..=0xB7).contains(&b) & (b & 1 == 1) & (0xA6..=0xAF).contains(&c);
    let thai_lao = ((b == 0xB9) | (b == 0xBB)) & (0x90..=0x99).contains(&c);
    let tibetan = (b == 0xBC) & (0xA0..=0xA9).contains(&c);
    indic | thai_lao | tibetan
}

/// The second and third bytes of a plane-1 character other than an emoji (`F0 9F …`): the
/// mathematical alphanumerics (`F0 9D`), the historic scripts' digits (`F0 90`…`F0 9E`; their
/// letters too, which [`fold_char`] then leaves), and the segmented digits (`F0 9F AF`).
/// Compares only, so that a 64-byte block is tested in a few vector instructions.
#[inline]
fn plane_1(b: u8, c: u8) -> bool {
    ((b & 0xF0 == 0x90) & (b != 0x9F)) | ((b == 0x9F) & (c == 0xAF))
}

/// Each offset of a character [`fold_char`] may map ([`fold_lead`] or [`wide_lead`]).
///
/// Whole 64-byte blocks (with the two bytes after) are tested branch-free (vectorised), as
/// `numeric_runs` does for digits, and only a block with a candidate is looked into: decoding
/// every character after the first candidate (a `✅`, a `’`) cost 14 instructions a byte.
fn fold_leads(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let at = |i: usize| bytes.get(i).copied().unwrap_or(0);
    let lead = |a: u8, b: u8, c: u8| fold_lead(a) | wide_lead(a, b, c);
    (0..bytes.len()).step_by(64).flat_map(move |block| {
        let end = (block + 64).min(bytes.len());
        let candidate = match bytes[block..].first_chunk::<66>() {
            Some(w) => (0..64).fold(false, |acc, j| acc | lead(w[j], w[j + 1], w[j + 2])),
            None => true,
        };
        let range = if candidate { block..end } else { end..end };
        range.filter(move |&i| lead(at(i), at(i + 1), at(i + 2)))
    })
}

/// Each offset of a [`wide_lead`] of 0xE0 or 0xEA: memchr finds the next such byte (none in
/// most prompts, a quarter of an instruction a byte), and the 64 bytes from there are tested
/// branch-free and looked into only when they hold a candidate. Hindi or Korean text thus costs
/// a memchr call and a vector test per 64 bytes, not a decoding per character.
fn indic_or_hangul_leads(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let at = |i: usize| bytes.get(i).copied().unwrap_or(0);
    let mut pos = 0;
    std::iter::from_fn(move || {
        let start = pos + memchr::memchr2(0xE0, 0xEA, bytes.get(pos..)?)?;
        let end = (start + 64).min(bytes.len());
        pos = end;
        let candidate = match bytes[start..].first_chunk::<66>() {
            Some(w) => (0..64).fold(false, |acc, j| acc | wide_lead(w[j], w[j + 1], w[j + 2])),
            None => true,
        };
        Some(if candidate { start..end } else { end..end })
    })
    .flatten()
    .filter(move |&i| wide_lead(at(i), at(i + 1), at(i + 2)))
}

/// Each offset of a plane-1 character [`plane_1`] lets through: memchr finds each 0xF0 (an
/// emoji's too, then two byte tests), which costs a tenth of what testing every 64-byte block
/// did on a prompt with a few emoji (1.6 instructions a byte).
fn plane_1_leads(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let at = |i: usize| bytes.get(i).copied().unwrap_or(0);
    memchr::memchr_iter(0xF0, bytes).filter(move |&i| plane_1(at(i + 1), at(i + 2)))
}

/// Whether `text` has a character [`fold_char`] maps: its [`fold_lead`] bytes are searched for
/// with memchr (SIMD, about a quarter of an instruction a byte for each search), the others
/// by [`indic_or_hangul_leads`] and [`plane_1_leads`], and each one found is decoded. Testing each 64-byte block for any of
/// the lead bytes cost 1.7 instructions a byte on a prompt of prose, CJK and emoji that has
/// none to map.
fn has_foldable(text: &str) -> bool {
    let maps = |i: usize| text[i..].chars().next().and_then(fold_char).is_some();
    let bytes = text.as_bytes();
    memchr::memchr3_iter(0xE1, 0xE2, 0xE3, bytes).any(maps)
        || memchr::memchr3_iter(0xC2, 0xD9, 0xDB, bytes).any(maps)
        || memchr::memchr3_iter(0xEF, 0xCD, 0xD8, bytes).any(maps)
        || memchr::memchr2_iter(0xDF, 0xF3, bytes).any(maps)
        || indic_or_hangul_leads(bytes).any(maps)
        || plane_1_leads(bytes).any(maps)
}

/// `text` with each character [`fold_char`] maps replaced; `None` when there is none, which
/// an ASCII text (most prompts) is found to be at memchr speed.
pub fn fold(text: &str) -> Option<String> {
    if !has_foldable(text) {
        return None;
    }
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    // A lead byte is never a continuation byte, so each candidate starts a character.
    for i in fold_leads(bytes) {
        let c = text[i..].chars().next().expect("a lead byte starts a character");
        let at = i + c.len_utf8();
        if let Some(to) = fold_char(c) {
            let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
            o.push_str(&text[copied..i]);
            o.extend(to);
            copied = at;
        }
    }
    let mut o = out?;
    o.push_str(&text[copied..]);
    Some(o)
}

/// Finds the kinds of personal data in `text`; `wanted` limits the work to what rules ask for
/// (an empty set means every kind). Text that [`fold`] changes is searched as folded too.
pub fn detect(text: &str, wanted: PiiSet) -> PiiSet {
    let found = detect_ascii(text, wanted);
    if text.is_ascii() {
        return found;
    }
    match fold(text) {
        Some(folded) => found.union(detect_ascii(&folded, wanted)),
        None => found,
    }
}

fn detect_ascii(text: &str, wanted: PiiSet) -> PiiSet {
    let mut found = PiiSet::default();
    let want = |k: PiiKind| wanted.is_empty() || wanted.contains(k);
    if want(PiiKind::Email) && has_email(text) {
        found.insert(PiiKind::Email);
    }
    let numeric = [PiiKind::Phone, PiiKind::PaymentCard, PiiKind::Iban, PiiKind::NationalId];
    if !numeric.iter().any(|&k| want(k)) {
        return found;
    }
    // Fewest digits a match can hold: 2 for an IBAN, 8 for a phone, more for the rest.
    let min_digits = if want(PiiKind::Iban) { 2 } else { 8 };
    numeric_runs(text, min_digits, |run| {
        let base = offset(text, run);
        let run = Run::new(text, base, run);
        // Most runs of prose with numbers (a year, a price, a version) hold no candidate.
        if run.barren() {
            return false;
        }
        if want(PiiKind::NationalId) && run.maybe.matched(PiiKind::NationalId as usize) {
            found.insert(PiiKind::NationalId);
        }
        if want(PiiKind::Iban) && run.ibans().next().is_some() {
            found.insert(PiiKind::Iban);
        }
        if want(PiiKind::PaymentCard) && run.cards().next().is_some() {
            found.insert(PiiKind::PaymentCard);
        }
        if want(PiiKind::Phone) && run.phones().next().is_some() {
            found.insert(PiiKind::Phone);
        }
        // Stop once every wanted kind is found.
        numeric.iter().all(|&k| !want(k) || found.contains(k))
    });
    found
}

/// Where `part`, a slice of `text`, starts in it.
fn offset(text: &str, part: &str) -> usize {
    part.as_ptr() as usize - text.as_ptr() as usize
}

/// A run of [`numeric_runs`] and what the number patterns may find in it: each finder
/// yields byte ranges of `text` (`base` is the run's offset in it).
struct Run<'t> {
    text: &'t str,
    base: usize,
    run: &'t str,
    maybe: regex::SetMatches,
    /// Whether a card split otherwise than by spaces or hyphens may be in the run.
    split_card: bool,
    /// Whether the run has the nine digits a national phone number has.
    nine_digits: bool,
}

impl<'t> Run<'t> {
    fn new(text: &'t str, base: usize, run: &'t str) -> Self {
        let maybe = NUMBERS.matches(run);
        let digits = run.bytes().filter(u8::is_ascii_digit).count();
        let split_card = digits >= 13 && SPLIT_CARD.is_match(run);
        Run {
            text,
            base,
            run,
            maybe,
            split_card,
            nine_digits: digits >= 9,
        }
    }

    /// Whether no finder can find anything in the run.
    fn barren(&self) -> bool {
        !self.maybe.matched_any() && !self.split_card && !self.nine_digits && self.any_case_ibans().next().is_none()
    }

    /// IBANs in any case that start in the run (see [`crate::iban_case`]).
    fn any_case_ibans(&self) -> impl Iterator<Item = (usize, usize)> + 't {
        crate::iban_case::in_window(self.text, self.base, self.base + self.run.len())
    }

    /// The matches of `re` in the run when `maybe` (a searcher costs a cache from its pool).
    fn search(&self, re: &'static Regex, maybe: bool) -> impl Iterator<Item = regex::Match<'t>> + use<'t> {
        let run = self.run;
        maybe.then(|| re.find_iter(run)).into_iter().flatten()
    }

    fn ssns(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let maybe = self.maybe.matched(PiiKind::NationalId as usize);
        self.search(&SSN, maybe).map(|m| self.at(&m))
    }

    /// IBANs in upper case, and in any case at a word's start (see [`crate::iban_case`]).
    fn ibans(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let maybe = self.maybe.matched(PiiKind::Iban as usize);
        let upper = self.search(&IBAN, maybe);
        upper
            .filter(|m| iban_valid(m.as_str()))
            .map(|m| self.at(&m))
            .chain(self.any_case_ibans())
    }

    fn cards(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let maybe = self.maybe.matched(PiiKind::PaymentCard as usize) || self.split_card;
        let run = if maybe { self.run } else { "" };
        self::cards(run).map(|(start, end)| (self.base + start, self.base + end))
    }

    /// A match's range in `text`.
    fn at(&self, m: &regex::Match<'_>) -> (usize, usize) {
        (self.base + m.start(), self.base + m.end())
    }

    /// Phones, and national numbers a phone word announces; a match inside a card-shaped
    /// number (a long digit run) is not a phone.
    fn phones(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let mut card_shaped: Vec<regex::Match<'_>> = Vec::new();
        if self.maybe.matched(PiiKind::PaymentCard as usize) {
            card_shaped.extend(CARD.find_iter(self.run));
        }
        if self.maybe.matched(PiiKind::PaymentCard as usize) || self.split_card {
            card_shaped.extend(SPLIT_SHAPE.find_iter(self.run));
        }
        let outside =
            move |m: &regex::Match<'_>| !card_shaped.iter().any(|c| m.start() < c.end() && c.start() < m.end());
        let phone = self.maybe.matched(PiiKind::Phone as usize);
        let national = self.nine_digits;
        let phones = self.search(&PHONE, phone);
        let announced = self
            .search(&NATIONAL_PHONE, national)
            .filter(|m| !SSN.is_match(m.as_str()) && crate::phone_words::announced(self.text, self.base + m.start()));
        phones.chain(announced).filter(move |m| outside(m)).map(|m| self.at(&m))
    }
}

/// One occurrence of personal data: a byte range of the text and its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PiiSpan {
    /// Byte offset of the first byte.
    pub start: usize,
    /// Byte offset just past the last byte.
    pub end: usize,
    /// What was found.
    pub kind: PiiKind,
}

/// Every occurrence of personal data in `text`, by the same detectors and
/// checksums as [`detect`], ordered by start (longer first on a tie). Matches of
/// different kinds may overlap (`1111%@x.io` right after a card number).
pub fn find(text: &str) -> Vec<PiiSpan> {
    let mut spans = Vec::new();
    let mut searched_to = 0;
    for at in memchr::memchr_iter(b'@', text.as_bytes()) {
        if at < searched_to {
            continue;
        }
        let (start, end) = email_run(text, at);
        spans.extend(EMAIL.find_iter(&text[start..end]).map(|m| PiiSpan {
            start: start + m.start(),
            end: start + m.end(),
            kind: PiiKind::Email,
        }));
        searched_to = end;
    }
    numeric_runs(text, 2, |run| {
        let base = offset(text, run);
        let run = Run::new(text, base, run);
        let at = |kind: PiiKind| move |(start, end): (usize, usize)| PiiSpan { start, end, kind };
        spans.extend(run.ssns().map(at(PiiKind::NationalId)));
        spans.extend(run.ibans().map(at(PiiKind::Iban)));
        spans.extend(run.cards().map(at(PiiKind::PaymentCard)));
        spans.extend(run.phones().map(at(PiiKind::Phone)));
        false
    });
    spans.sort_unstable_by_key(|s| (s.start, std::cmp::Reverse(s.end)));
    spans
}

/// `text` with every occurrence of personal data replaced by a typed marker
/// (`[PII:email]`, `[PII:payment_card]`, ...); borrowed when there is none.
/// Overlapping occurrences become one marker, of the kind that starts first.
///
/// Personal data that only the [`fold`]ed text shows (full-width digits, a zero-width
/// character inside an address) is redacted too: the text is then returned folded.
pub fn redact(text: &str) -> Cow<'_, str> {
    let once = mask(text);
    if once.is_ascii() {
        return once;
    }
    let Some(folded) = fold(&once) else { return once };
    match mask(&folded) {
        Cow::Borrowed(_) => once,
        Cow::Owned(masked) => Cow::Owned(masked),
    }
}

/// `text` with the occurrences [`find`] sees replaced by markers.
fn mask(text: &str) -> Cow<'_, str> {
    let spans = merged(find(text));
    if spans.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for s in spans {
        out.push_str(&text[at..s.start]);
        out.push_str("[PII:");
        out.push_str(s.kind.name());
        out.push(']');
        at = s.end;
    }
    out.push_str(&text[at..]);
    Cow::Owned(out)
}

/// Spans sorted by start, with overlapping ones joined into the first.
fn merged(spans: Vec<PiiSpan>) -> Vec<PiiSpan> {
    let mut out: Vec<PiiSpan> = Vec::with_capacity(spans.len());
    for s in spans {
        match out.last_mut() {
            Some(last) if s.start < last.end => last.end = last.end.max(s.end),
            _ => out.push(s),
        }
    }
    out
}

/// Finds the kinds of personal data in any string of the JSON document `json`
/// (every value and key, JSON inside strings unpacked; see [`crate::json_text`]);
/// `wanted` as in [`detect`].
pub fn detect_json(json: &str, wanted: PiiSet) -> PiiSet {
    // One detection over all the strings joined by newlines (which no pattern
    // crosses): most strings are short keys and names, and each call has a fixed cost.
    let mut text = String::with_capacity(json.len() + 256);
    crate::json_text::collect(json, &mut text);
    detect(&text, wanted)
}

/// Builds a set from kinds.
pub fn set_of(kinds: &[PiiKind]) -> PiiSet {
    let mut s = PiiSet::default();
    for k in kinds {
        s.insert(*k);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    fn kinds(t: &str) -> Vec<&'static str> {
        detect(t, PiiSet::default()).kinds().map(PiiKind::name).collect()
    }

    /// `text` holds personal data of `kind` alone, and its redaction marks it.
    fn assert_found(text: &str, kind: &str) {
        assert_eq!(kinds(text), [kind], "{text:?}");
        let red = redact(text);
        assert!(red.contains(&format!("[PII:{kind}]")), "{text:?} -> {red:?}");
    }

    #[test]
    fn typed_or_pasted_unicode_hides_nothing() {
        // An input method's full-width digits and at sign, Arabic-Indic digits, a card
        // pasted with no-break or thin spaces, invisible characters inside an address.
        for (text, kind) in [
            ("カード ４１１１ １１１１ １１１１ １１１１", "payment_card"),
            ("card 4111\u{a0}1111\u{a0}1111\u{a0}1111", "payment_card"),
            ("card 4111\u{202f}1111\u{2009}1111\u{2009}1111", "payment_card"),
            ("card 4111\u{2011}1111\u{2011}1111\u{2011}1111", "payment_card"),
            ("ssn ٠٧٨-٠٥-١١٢٠", "national_id"),
            ("mail jane.doe＠example.com", "email"),
            ("mail jane@\u{200b}example.com", "email"),
            ("mail jane\u{ad}@exam\u{200d}ple.com", "email"),
            ("ssn 078\u{2060}-05-1120", "national_id"),
            // What Unicode draws as nothing (red team, session 35): bidi marks and controls a
            // right-to-left page's copy carries, invisible operators, a combining grapheme
            // joiner, variation selectors, tag characters, Hangul fillers.
            ("card 4111\u{200e}1111\u{200f}1111\u{61c}1111", "payment_card"),
            ("card 4111 \u{202a}1111\u{202c} 1111 1111", "payment_card"),
            ("mail jane@exa\u{2062}mple.com", "email"),
            ("mail jane@exa\u{34f}mple.com", "email"),
            ("mail jane@exa\u{fe0f}mple.com", "email"),
            ("mail jane@exa\u{e0020}mple.com", "email"),
            ("mail jane@exa\u{3164}mple.com", "email"),
        ] {
            assert_found(text, kind);
        }
        // Data found in the text as it is stays found when something else needs folding.
        assert_eq!(kinds("4111 1111 1111 1111 a＠b.io"), ["email", "payment_card"]);
        assert_eq!(redact("a@b.io \u{ff14}\u{ff11}\u{ff11}\u{ff11}\u{ff11}\u{ff11}\u{ff11}\u{ff11}\u{ff11}\u{ff11}\u{ff11}\u{ff11}\u{ff11}\u{ff11}\u{ff11}\u{ff11}"), "[PII:email] [PII:payment_card]");
        // Text without personal data is returned as it is, unfolded.
        assert!(matches!(redact("東京\u{a0}ｒａｍｅｎ"), Cow::Borrowed(_)));
        assert_eq!(fold("plain ascii"), None);
        assert_eq!(fold("x\u{ff10}\u{200b}y\u{3000}").as_deref(), Some("x0y "));
    }

    #[test]
    fn forms_people_write_hide_nothing() {
        // Session 36: card groups split by line breaks (a JSON `\n`), tabs, dots, slashes or
        // a few spaces; digits of other scripts; internationalised e-mail domains and the
        // small at sign; IBANs in lower case; national phones after a phone word.
        for (text, kind) in [
            ("card\n4111\n1111\n1111\n1111", "payment_card"),
            ("card 4111\r\n1111\r\n1111\r\n1111", "payment_card"),
            ("card 4111\t1111\t1111\t1111", "payment_card"),
            ("card 4111.1111.1111.1111.", "payment_card"),
            ("card 4111/1111/1111/1111", "payment_card"),
            ("card 4111  1111  1111  1111", "payment_card"),
            ("amex 3782\n822463\n10005", "payment_card"),
            ("card 𝟒𝟏𝟏𝟏 𝟏𝟏𝟏𝟏 𝟏𝟏𝟏𝟏 𝟏𝟏𝟏𝟏", "payment_card"),
            ("card 𝟜𝟙𝟙𝟙 𝟙𝟙𝟙𝟙 𝟙𝟙𝟙𝟙 𝟙𝟙𝟙𝟙", "payment_card"),
            ("card 𝟦𝟣𝟣𝟣 𝟣𝟣𝟣𝟣 𝟣𝟣𝟣𝟣 𝟣𝟣𝟣𝟣", "payment_card"),
            ("card ٤١١١ ١١١١ ١١١١ ١١١١", "payment_card"),
            ("card ۴۱۱۱ ۱۱۱۱ ۱۱۱۱ ۱۱۱۱", "payment_card"),
            ("कार्ड ४१११ ११११ ११११ ११११", "payment_card"),
            ("কার্ড ৪১১১ ১১১১ ১১১১ ১১১১", "payment_card"),
            ("บัตร ๔๑๑๑ ๑๑๑๑ ๑๑๑๑ ๑๑๑๑", "payment_card"),
            ("ssn ०७८-०५-११२०", "national_id"),
            ("mail jane@bücher.de", "email"),
            ("mail jane@例え.jp", "email"),
            ("mail jane@пример.рф", "email"),
            ("mail jane@xn--bcher-kva.xn--p1ai", "email"),
            ("mail jane﹫example.com", "email"),
            ("mail 𝐣𝐚𝐧𝐞@𝐞𝐱𝐚𝐦𝐩𝐥𝐞.𝐜𝐨𝐦", "email"),
            ("iban de89 3704 0044 0532 0130 00", "iban"),
            ("iban de89370400440532013000", "iban"),
            ("IBAN: gb82 west 1234 5698 7654 32", "iban"),
            ("iban De89 3704 0044 0532 0130 00", "iban"),
            ("call me at 03012345678", "phone"),
            ("My mobile number is 4155550132.", "phone"),
            ("Tel.: 030 12345678", "phone"),
            ("WhatsApp 612345678", "phone"),
            ("電話番号は09012345678です", "phone"),
        ] {
            assert_found(text, kind);
        }
        assert_eq!(redact("iban: de89 3704 0044 0532 0130 00."), "iban: [PII:iban].");
        assert_eq!(redact("mail jane@例え.jp。"), "mail [PII:email]。");
        assert_eq!(redact("请发邮件到jane@example.com谢谢"), "请发邮件到[PII:email]谢谢");
    }

    /// `text` with its ASCII digits written in the script whose zero is `zero`.
    fn digits_of(zero: u32, text: &str) -> String {
        text.chars()
            .map(|c| match c.to_digit(10) {
                Some(d) => char::from_u32(zero + d).expect("a digit"),
                None => c,
            })
            .collect()
    }

    #[test]
    fn plane_1_digits_ideographic_dots_eai_and_mixed_case_ibans_hide_nothing() {
        // Session 37: the digits of plane 1's scripts (Adlam, Osmanya, Brahmi, Nyiakeng Puachue
        // Hmong, …, Unicode 17's too), the ideographic and half-width full stops as an e-mail
        // domain's dot, e-mail addresses with a non-ASCII local part (EAI), IBANs whose
        // country code is in upper case and the rest in lower or mixed case.
        let mut cases: Vec<(String, &str)> = Vec::new();
        for zero in [
            0x1E950, 0x104A0, 0x11066, 0x1E140, 0x1D7F6, 0x1D7E2, 0x16A60, 0x11DE0, 0x1CCF0, 0x1E5F1, 0x116DA,
        ] {
            cases.push((digits_of(zero, "card 4111 1111 1111 1111"), "payment_card"));
        }
        cases.push((digits_of(0x1E950, "call +1 415 555 0132"), "phone"));
        cases.push((digits_of(0x104A0, "ssn 078-05-1120"), "national_id"));
        cases.push((digits_of(0x11066, "IBAN GB82 WEST 1234 5698 7654 32"), "iban"));
        for (text, kind) in [
            ("mail jane@example\u{3002}com", "email"),
            ("mail jane@example\u{ff0e}com", "email"),
            ("mail jane@example\u{ff61}com", "email"),
            ("mail jane\u{ff20}example\u{3002}com", "email"),
            ("mail jane@例え。jp", "email"),
            ("mail josé@example.com", "email"),
            ("mail jöran@example.com", "email"),
            ("mail 用户@例子.广告", "email"),
            ("请发邮件到用户@例子.广告谢谢", "email"),
            ("mail δοκιμή@παράδειγμα.com", "email"),
            ("mail müller@bücher.de", "email"),
            ("IBAN GB82 west 1234 5698 7654 32", "iban"),
            ("IBAN GB82 West 1234 5698 7654 32", "iban"),
            ("IBAN gB82 WEST 1234 5698 7654 32", "iban"),
            (
                "IBAN: DE89 3704 0044 0532 0130 00 and GB82 wEsT 1234 5698 7654 32",
                "iban",
            ),
            ("iban GB82west12345698765432", "iban"),
        ] {
            cases.push((text.to_string(), kind));
        }
        for (text, kind) in &cases {
            assert_found(text, kind);
        }
        // The whole address is masked, and no more.
        assert_eq!(redact("mail josé@example.com."), "mail [PII:email].");
        assert_eq!(redact("mail jane@example。com。"), "mail [PII:email]。");
        // Without spaces between words the local part may take the words before it: more is
        // masked, never less. The known top-level domain ends the address.
        assert_eq!(redact("请发邮件到用户@例子.广告谢谢"), "[PII:email]谢谢");
        assert_eq!(redact("IBAN GB82 west 1234 5698 7654 32."), "IBAN [PII:iban].");
    }

    #[test]
    fn ordinary_numbers_code_and_emoji_are_not_personal_data() {
        for text in [
            // A column of numbers, versions, dates, amounts, line-broken ids.
            "totals:\n1200\n3400\n5600\n7800\n9100",
            "1234\n5678\n9012\n3456\n7890\n1234\n5678",
            "v1.2.3 released 2024.05.01, build 4521.8832.1093.2211",
            "paths /usr/lib/4111/1112 and 12/29/2024",
            "the order 4155550132 shipped; ticket 03012345678",
            "timestamp 1700000000 and id 612345678",
            "call stack depth was high",
            "tel: see below",
            "mp3 h264 utf8 x86_64 ab12 cd34 de12 in 2024",
            "de89 is a code; de12 3456",
            "npm i lodash@4.17.21 and user@localhost",
            "🚀😀✅👍🏽🎉🇩🇪 2024 ١٢٣ 𝟏𝟐𝟑 ४५६ 🚀",
            "for i in range(1000000000): x = i * 1234567890",
            "#include <stdio.h>\nint main() { return 0; }\n",
            "価格は1234円、電話はしないで",
            // Session 37: an @-mention in Chinese or Japanese prose ends a sentence with an
            // ideographic full stop, not an address's dot; plane-1 digits of no card, phone or
            // IBAN; mixed-case words before a number, an unknown country, a failed checksum.
            "谢谢@小明。明天见！",
            "感谢@小明．明天见",
            "@张三。你好",
            "問い合わせは@サポート。よろしく",
            "抄送@李四.下午开会",
            "Спасибо@Иван.привет",
            "Adlam 𞥑𞥒𞥓 and Osmanya 𐒡𐒢 in 2024",
            "𞥑𞥒𞥓𞥔 𞥕𞥖𞥗𞥘 𞥙𞥐𞥑𞥒 𞥓𞥔𞥕𞥖",
            "GB82 west side, 1234 people",
            "MP34 plays 1234 5698 7654 32",
            "GB82 west 1234 5698 7654 33",
            "de89 is a code; De12 3456",
        ] {
            assert!(kinds(text).is_empty(), "{text:?}: {:?}", kinds(text));
            assert_eq!(redact(text), text);
        }
    }

    #[test]
    fn finds_each_kind() {
        assert_eq!(kinds("mail me at jane.doe@example.co.uk please"), ["email"]);
        assert_eq!(kinds("card 4111 1111 1111 1111 exp 12/29"), ["payment_card"]);
        assert_eq!(kinds("IBAN GB82 WEST 1234 5698 7654 32"), ["iban"]);
        assert_eq!(kinds("my ssn is 123-45-6789"), ["national_id"]);
        assert_eq!(kinds("call +1 415-555-0132 today"), ["phone"]);
        // Written whole (E.164), or as France's pairs; an SSN spaced.
        assert_eq!(kinds("call +14155550132 today"), ["phone"]);
        assert_eq!(kinds("call +33 1 23 45 67 89 today"), ["phone"]);
        assert_eq!(kinds("my ssn is 078 05 1120"), ["national_id"]);
        assert!(kinds("up +12 percent, +1234 votes").is_empty());
    }

    #[test]
    fn redacts_each_kind_with_a_typed_marker() {
        let text = "mail jane.doe@example.co.uk or call +1 415-555-0132; card 4111 1111 1111 1111, \
                    IBAN GB82 WEST 1234 5698 7654 32, ssn 123-45-6789. Order 4111 1111 1111 1112.";
        assert_eq!(
            redact(text),
            "mail [PII:email] or call [PII:phone]; card [PII:payment_card], \
             IBAN [PII:iban], ssn [PII:national_id]. Order 4111 1111 1111 1112."
        );
        assert!(matches!(redact("nothing here, 2024"), Cow::Borrowed(_)));
        assert_eq!(redact("東京4111111111111111é"), "東京[PII:payment_card]é");
        assert_eq!(redact("a@b.io,c@d.io"), "[PII:email],[PII:email]");
    }

    #[test]
    fn checksums_reject_lookalikes() {
        assert!(kinds("order 4111 1111 1111 1112").iter().all(|k| *k != "payment_card"));
        assert!(kinds("GB82 WEST 1234 5698 7654 33").iter().all(|k| *k != "iban"));
        assert!(kinds("The year 2024 had 365 days").is_empty());
    }

    #[test]
    fn a_number_just_before_a_card_does_not_hide_it() {
        assert_eq!(kinds("in 2024 4111 1111 1111 1111"), ["payment_card"]);
        assert_eq!(kinds("ref 32 4111-1111-1111-1111."), ["payment_card"]);
        assert_eq!(redact("2024 4111 1111 1111 1111 9"), "2024 [PII:payment_card] 9");
        assert!(
            !kinds("x4111 1111 1111 1111").contains(&"payment_card"),
            "glued to a letter"
        );
    }

    /// The plain definition: every pattern over the whole text.
    fn reference(text: &str) -> PiiSet {
        let mut found = PiiSet::default();
        if EMAIL.is_match(text) {
            found.insert(PiiKind::Email);
        }
        let cards: Vec<regex::Match<'_>> = CARD.find_iter(text).chain(SPLIT_SHAPE.find_iter(text)).collect();
        // Any substring that is a whole card-shaped number between word boundaries.
        let whole = Regex::new(&format!("^(?:{CARD_RE})$")).unwrap();
        let b = text.as_bytes();
        let word = |i: usize| b.get(i).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_');
        let starts = (0..b.len()).filter(|&s| b[s].is_ascii_digit() && (s == 0 || !word(s - 1)));
        // Or one whose groups are split by a dot, slash, tab, line break or a few spaces, written as a card is:
        // its shape, a network's first digit, no group of four joined before or after.
        let sep = r"(?:[ ./\t\r\n-]|[ \t\r\n]{2,4})";
        let shape = Regex::new(&format!(
            "^[2-6](?:[0-9]{{3}}{sep}(?:[0-9]{{4}}{sep}){{2}}[0-9]{{1,4}}|[0-9]{{3}}{sep}(?:[0-9]{{4}}{sep}){{3}}[0-9]{{1,3}}|[0-9]{{3}}{sep}[0-9]{{6}}{sep}[0-9]{{4,5}})$"
        ))
        .unwrap();
        let four_before = Regex::new(&format!("(?:^|[^0-9])[0-9]{{4}}{sep}$")).unwrap();
        let four_after = Regex::new(&format!("^{sep}[0-9]{{4}}(?:[^0-9]|$)")).unwrap();
        let split = |s: usize, e: usize| {
            shape.is_match(&text[s..e]) && !four_before.is_match(&text[..s]) && !four_after.is_match(&text[e..])
        };
        if starts
            .flat_map(|s| (s + 1..=b.len()).map(move |e| (s, e)))
            .any(|(s, e)| {
                let t = || &text[s..e];
                b[e - 1].is_ascii_digit() && !word(e) && (whole.is_match(t()) || split(s, e)) && luhn_valid(t())
            })
        {
            found.insert(PiiKind::PaymentCard);
        }
        // An IBAN in upper case, or one in any case at a word's start.
        let lower = (0..b.len().saturating_sub(3)).any(|i| {
            (i == 0 || !word(i - 1))
                && b[i].is_ascii_alphabetic()
                && b[i + 1].is_ascii_alphabetic()
                && b[i + 2].is_ascii_digit()
                && b[i + 3].is_ascii_digit()
                && crate::iban_case::iban_at(text, i).is_some()
        });
        if lower || IBAN.find_iter(text).any(|m| iban_valid(m.as_str())) {
            found.insert(PiiKind::Iban);
        }
        if SSN.is_match(text) {
            found.insert(PiiKind::NationalId);
        }
        let in_card = |p: &regex::Match<'_>| cards.iter().any(|c| p.start() < c.end() && c.start() < p.end());
        let announced =
            |m: &regex::Match<'_>| !SSN.is_match(m.as_str()) && crate::phone_words::announced(text, m.start());
        if PHONE.find_iter(text).any(|m| !in_card(&m))
            || NATIONAL_PHONE.find_iter(text).any(|m| !in_card(&m) && announced(&m))
        {
            found.insert(PiiKind::Phone);
        }
        found
    }

    /// The plain definition of [`fold`]: every character mapped, `None` if none is.
    fn fold_reference(text: &str) -> Option<String> {
        text.chars()
            .any(|c| fold_char(c).is_some())
            .then(|| text.chars().flat_map(|c| fold_char(c).unwrap_or(Some(c))).collect())
    }

    /// Characters at and around the edges of what [`fold_char`] maps (the same lead bytes,
    /// neighbouring code points), and others a prompt holds: accents, CJK, emoji, typographic
    /// punctuation.
    const TRICKY: &[&str] = &[
        "\u{9f}",
        "\u{a0}",
        "\u{a1}",
        "\u{ac}",
        "\u{ad}",
        "\u{ae}",
        "\u{bf}",
        "é",
        "ß",
        "ï",
        "\u{65f}",
        "\u{660}",
        "\u{669}",
        "\u{66a}",
        "\u{6ef}",
        "\u{6f0}",
        "\u{6f9}",
        "\u{6fa}",
        "\u{180d}",
        "\u{180e}",
        "\u{180f}",
        "\u{1fff}",
        "\u{2000}",
        "\u{200a}",
        "\u{200b}",
        "\u{200d}",
        "\u{200e}",
        "\u{200f}",
        "\u{2010}",
        "\u{2011}",
        "\u{2013}",
        "\u{2014}",
        "\u{2019}",
        "\u{201c}",
        "\u{2026}",
        "\u{202e}",
        "\u{202f}",
        "\u{2030}",
        "\u{205e}",
        "\u{205f}",
        "\u{2060}",
        "\u{2061}",
        "\u{2211}",
        "\u{2212}",
        "\u{2213}",
        "✅",
        "\u{2fff}",
        "\u{3000}",
        "\u{3001}",
        "東京",
        "\u{fe62}",
        "\u{fe63}",
        "\u{fe64}",
        "\u{fefe}",
        "\u{feff}",
        "\u{ff00}",
        "\u{ff01}",
        "\u{ff10}",
        "\u{ff19}",
        "\u{ff20}",
        "\u{ff5e}",
        "\u{ff5f}",
        "\u{ffff}",
        "🚀",
        "😀",
        "4111",
        " ",
        "-",
        "@",
        "078",
        "05",
        "1120",
        "jane.doe",
        "example.com",
        "\n",
        "\u{7bf}",
        "\u{7c0}",
        "\u{965}",
        "\u{966}",
        "\u{96f}",
        "\u{970}",
        "क",
        "\u{e50}",
        "\u{f29}",
        "\u{a620}",
        "\u{abf9}",
        "\u{fe52}",
        "\u{fe6b}",
        "\u{10000}",
        "\u{104a0}",
        "\u{1bca0}",
        "\u{1d173}",
        "\u{1d3ff}",
        "\u{1d400}",
        "\u{1d6a3}",
        "\u{1d6a4}",
        "\u{1d7cd}",
        "\u{1d7ce}",
        "\u{1d7ff}",
        "\u{1fbef}",
        "\u{1fbf0}",
        "\u{1fbf9}",
        "\u{1fbfa}",
        "🇩🇪",
        "👍🏽",
    ];

    #[test]
    fn each_digit_zero_starts_ten_numeric_characters() {
        // Every run of `DIGIT_ZEROS` is ten numeric characters, sorted and apart; and each run
        // of numeric characters of planes 0 and 1 as long as decimal digits come (ten, or a
        // multiple) holds one of them, but for the numbers Unicode gives no decimal value
        // (Ethiopic, subscripts, circled and parenthesised numbers, Kaktovik, Mayan, …).
        assert!(DIGIT_ZEROS.windows(2).all(|w| w[0] + 10 <= w[1]));
        for zero in DIGIT_ZEROS {
            assert!(
                (zero..zero + 10).all(|u| char::from_u32(u).is_some_and(char::is_numeric)),
                "{zero:x}"
            );
        }
        let other_numbers = [
            0x1369, 0x17F0, 0x2080, 0x2460, 0x2776, 0x3220, 0x3280, 0xA6E6, 0x10F1D, 0x11052, 0x111E1, 0x1D2C0, 0x1D2E0,
        ];
        let numeric = |u: u32| char::from_u32(u).is_some_and(char::is_numeric);
        let mut missing = Vec::new();
        let mut u = 0x80;
        while u < 0x20000 {
            if numeric(u) && !numeric(u - 1) {
                let len = (u..).take_while(|&v| numeric(v)).count() as u32;
                let digits = DIGIT_ZEROS.iter().any(|z| (u..u + len).contains(z));
                if len % 10 == 0 && !digits && !other_numbers.contains(&u) {
                    missing.push(format!("{u:x}+{len}"));
                }
                u += len;
            } else {
                u += 1;
            }
        }
        assert!(
            missing.is_empty(),
            "runs of ten numerics without a decimal value: {missing:?}"
        );
    }

    #[test]
    fn the_search_for_characters_to_fold_misses_none() {
        // Every character of planes 0 and 1 and the tags (and the last), alone and amid text that has lead
        // bytes of characters that do not fold (`✅`, `é`, CJK).
        for c in (0x80..0x20000u32)
            .chain(0xE0000..0xE1000)
            .chain([0x10FFFF])
            .filter_map(char::from_u32)
        {
            for text in [c.to_string(), format!("✅é数{c}a")] {
                assert_eq!(has_foldable(&text), fold_char(c).is_some(), "{c:?}");
            }
        }
    }

    #[test]
    fn fold_maps_each_tricky_character_as_the_reference_does() {
        for t in TRICKY {
            for text in [
                t.to_string(),
                format!("{}{t}", "a".repeat(63)),
                format!("{}{t}x", "é".repeat(40)),
            ] {
                assert_eq!(fold(&text), fold_reference(&text), "{text:?}");
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 1000, ..Default::default() })]

        /// Searching only the candidate runs finds exactly what the patterns find in the whole text.
        #[test]
        fn runs_find_what_the_whole_text_has(
            parts in proptest::collection::vec(proptest::prop_oneof![
                proptest::string::string_regex("[0-9 .()+-]{1,20}").unwrap(),
                proptest::string::string_regex("[A-Z0-9 ]{1,24}").unwrap(),
                proptest::string::string_regex("[a-z._%+-]{1,8}@[a-z-]{1,6}(\\.[a-z]{1,4}){0,2}").unwrap(),
                proptest::sample::select(vec![
                    "4111 1111 1111 1111", "GB82 WEST 1234 5698 7654 32", "123-45-6789", "+1 415-555-0132",
                    "(020) 7946 0958", "東京", "é", "_", "x", "@", "\n", "🚀", "a.b@c.io",
                    "4111\n1111", "1111.1111", "\t", "  ", "de89 3704 0044 0532 0130 00", "gb82 west", " call ",
                    "4155550132", "a@bücher.de", "ü",
                ]).prop_map(String::from),
            ], 0..12),
            wanted in 0u8..32,
        ) {
            let text: String = parts.concat();
            let wanted = PiiSet(wanted);
            let mut expected = reference(&text);
            if !wanted.is_empty() {
                expected = PiiSet(expected.0 & wanted.0);
            }
            proptest::prop_assert_eq!(detect(&text, wanted), expected, "{:?}", text);
        }

        /// Folding finds every character to map wherever it lies (candidates are found
        /// a 64-byte block at a time), and detection on a text with such characters
        /// finds what the text as it is and its folded form (its ASCII equivalent) hold.
        #[test]
        fn fold_and_detection_agree_with_their_plain_definitions(
            parts in proptest::collection::vec(proptest::prop_oneof![
                proptest::sample::select(TRICKY.to_vec()).prop_map(String::from),
                (0usize..70).prop_map(|n| "a".repeat(n)),
                proptest::sample::select(vec![
                    "4111 1111 1111 1111", "\u{ff14}\u{ff11}\u{ff11}\u{ff11}", "123-45-6789", "+1 415-555-0132",
                    "a.b@c.io", "٠٧٨-٠٥-١١٢٠", "jane\u{ad}@exam\u{200d}ple.com", "1111\u{a0}1111",
                ]).prop_map(String::from),
            ], 0..24),
            wanted in 0u8..32,
        ) {
            let text: String = parts.concat();
            let reference = fold_reference(&text);
            proptest::prop_assert_eq!(fold(&text), reference.clone(), "{:?}", text);
            let wanted = PiiSet(wanted);
            let plain = detect_ascii(&text, wanted);
            let expected = reference.map_or(plain, |f| plain.union(detect_ascii(&f, wanted)));
            proptest::prop_assert_eq!(detect(&text, wanted), expected, "{:?}", text);
        }

        /// Redaction marks exactly what detection sees: the kinds found are the kinds
        /// marked, one marker per occurrence.
        #[test]
        fn redaction_marks_what_detection_finds(
            parts in proptest::collection::vec(proptest::prop_oneof![
                proptest::string::string_regex("[0-9 .()+-]{1,20}").unwrap(),
                proptest::string::string_regex("[A-Z0-9 ]{1,24}").unwrap(),
                proptest::string::string_regex("[a-z._%+-]{1,8}@[a-z-]{1,6}(\\.[a-z]{1,4}){0,2}").unwrap(),
                proptest::sample::select(vec![
                    "4111 1111 1111 1111", "GB82 WEST 1234 5698 7654 32", "123-45-6789", "+1 415-555-0132",
                    "(020) 7946 0958", "東京", "é", "_", "x", "@", "\n", "🚀", "a.b@c.io", " ",
                    "4111\n1111", "1111.1111", "de89 3704 0044 0532 0130 00", " call ", "4155550132", "a@bücher.de",
                ]).prop_map(String::from),
            ], 0..12),
        ) {
            let text: String = parts.concat();
            let spans = find(&text);
            let marked = spans.iter().fold(PiiSet::default(), |mut s, p| { s.insert(p.kind); s });
            proptest::prop_assert_eq!(marked, detect(&text, PiiSet::default()), "{:?}", text);
            let redacted = redact(&text);
            proptest::prop_assert_eq!(redacted.matches("[PII:").count(), merged(spans).len());
            // A marker is never itself taken for personal data.
            for again in find(&redacted) {
                proptest::prop_assert!(!redacted[again.start..again.end].contains("[PII:"), "{:?}", redacted);
            }
        }
    }
}
