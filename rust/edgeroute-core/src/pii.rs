//! Detection of personal data in prompts, for PII-aware routing (send such
//! prompts only to deployments tagged for it) and for redacted logs.
//!
//! Candidates are found by regular expressions and then validated where a
//! checksum exists (Luhn for payment cards, ISO 7064 mod 97 for IBANs), which
//! keeps order numbers and timestamps from being taken for cards.

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
    fn insert(&mut self, kind: PiiKind) {
        self.0 |= kind.bit();
    }
}

// The patterns are ASCII by nature, so their word boundaries are ASCII too
// (`(?-u:\b)`): a Unicode `\b` makes the regex crate's DFAs give up on any
// non-ASCII haystack and fall back to a far slower engine (measured: 40× on a
// 2,000-token prompt with a few emoji). Besides speed, it also means a number
// glued to a non-ASCII letter ("東京4111...") is still seen.
const EMAIL_RE: &str = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}";
const PHONE_RE: &str = r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|(?-u:\b)\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?-u:\b)";
const CARD_RE: &str = r"(?-u:\b)(?:\d[ -]?){12,18}\d(?-u:\b)";
const IBAN_RE: &str = r"(?-u:\b)[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?-u:\b)";
const SSN_RE: &str = r"(?-u:\b)\d{3}-\d{2}-\d{4}(?-u:\b)";

/// Every candidate pattern in one automaton, indexed as [`PiiKind::ALL`]: one
/// pass over the prompt says which kinds may be present, and only those are
/// searched again for positions and checksums. Prompts without personal data,
/// the common case, pay for a single scan.
static CANDIDATES: LazyLock<RegexSet> =
    LazyLock::new(|| RegexSet::new([EMAIL_RE, PHONE_RE, CARD_RE, IBAN_RE, SSN_RE]).expect("valid PII patterns"));
static PHONE: LazyLock<Regex> = LazyLock::new(|| Regex::new(PHONE_RE).expect("valid pattern"));
static CARD: LazyLock<Regex> = LazyLock::new(|| Regex::new(CARD_RE).expect("valid pattern"));
static IBAN: LazyLock<Regex> = LazyLock::new(|| Regex::new(IBAN_RE).expect("valid pattern"));

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

/// Finds the kinds of personal data in `text`; `wanted` limits the work to what rules ask for
/// (an empty set means every kind).
pub fn detect(text: &str, wanted: PiiSet) -> PiiSet {
    let mut found = PiiSet::default();
    let want = |k: PiiKind| wanted.is_empty() || wanted.contains(k);
    if !PiiKind::ALL.iter().any(|&k| want(k)) || !text.bytes().any(|b| b.is_ascii_digit() || b == b'@') {
        return found;
    }
    let maybe = CANDIDATES.matches(text);
    let candidate = |k: PiiKind| want(k) && maybe.matched(k as usize);
    // E-mail and SSN candidates need no further check.
    for k in [PiiKind::Email, PiiKind::NationalId] {
        if candidate(k) {
            found.insert(k);
        }
    }
    if candidate(PiiKind::Iban) && IBAN.find_iter(text).any(|m| iban_valid(m.as_str())) {
        found.insert(PiiKind::Iban);
    }
    // Long digit runs are card candidates; a phone match inside one is not a phone.
    let phone = candidate(PiiKind::Phone);
    if !(phone || candidate(PiiKind::PaymentCard)) {
        return found;
    }
    let cards: Vec<regex::Match<'_>> = if maybe.matched(PiiKind::PaymentCard as usize) {
        CARD.find_iter(text).collect()
    } else {
        Vec::new()
    };
    if candidate(PiiKind::PaymentCard) && cards.iter().any(|m| luhn_valid(m.as_str())) {
        found.insert(PiiKind::PaymentCard);
    }
    let in_card = |p: &regex::Match<'_>| cards.iter().any(|c| p.start() < c.end() && c.start() < p.end());
    if phone && PHONE.find_iter(text).any(|m| !in_card(&m)) {
        found.insert(PiiKind::Phone);
    }
    found
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

    fn kinds(t: &str) -> Vec<&'static str> {
        detect(t, PiiSet::default()).kinds().map(PiiKind::name).collect()
    }

    #[test]
    fn finds_each_kind() {
        assert_eq!(kinds("mail me at jane.doe@example.co.uk please"), ["email"]);
        assert_eq!(kinds("card 4111 1111 1111 1111 exp 12/29"), ["payment_card"]);
        assert_eq!(kinds("IBAN GB82 WEST 1234 5698 7654 32"), ["iban"]);
        assert_eq!(kinds("my ssn is 123-45-6789"), ["national_id"]);
        assert_eq!(kinds("call +1 415-555-0132 today"), ["phone"]);
    }

    #[test]
    fn checksums_reject_lookalikes() {
        assert!(kinds("order 4111 1111 1111 1112").iter().all(|k| *k != "payment_card"));
        assert!(kinds("GB82 WEST 1234 5698 7654 33").iter().all(|k| *k != "iban"));
        assert!(kinds("The year 2024 had 365 days").is_empty());
    }
}
