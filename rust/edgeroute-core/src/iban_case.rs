//! IBANs written in lower case (`de89 3704 0044 0532 0130 00`), which people type as
//! often as upper case.
//!
//! The number patterns search runs of upper-case letters and digits; widening those runs to
//! lower-case letters would send most of a prompt's prose through the patterns. Instead, a
//! run of digits that starts right after two letters at a word's start is tried: the
//! letters must name a country of the IBAN registry, the characters after them (single
//! spaces between) must be exactly as many as that country's IBANs have, and the mod-97
//! check must hold. Prose ("mp3", "h264", "in 2024") seldom passes the first test and
//! never the three.

/// IBAN lengths by country (SWIFT's IBAN registry, as python-stdnum 2.2 has it).
const LENGTHS: [([u8; 2], usize); 89] = [
    (*b"AD", 24),
    (*b"AE", 23),
    (*b"AL", 28),
    (*b"AT", 20),
    (*b"AZ", 28),
    (*b"BA", 20),
    (*b"BE", 16),
    (*b"BG", 22),
    (*b"BH", 22),
    (*b"BI", 27),
    (*b"BR", 29),
    (*b"BY", 28),
    (*b"CH", 21),
    (*b"CR", 22),
    (*b"CY", 28),
    (*b"CZ", 24),
    (*b"DE", 22),
    (*b"DJ", 27),
    (*b"DK", 18),
    (*b"DO", 28),
    (*b"EE", 20),
    (*b"EG", 29),
    (*b"ES", 24),
    (*b"FI", 18),
    (*b"FK", 18),
    (*b"FO", 18),
    (*b"FR", 27),
    (*b"GB", 22),
    (*b"GE", 22),
    (*b"GI", 23),
    (*b"GL", 18),
    (*b"GR", 27),
    (*b"GT", 28),
    (*b"HN", 28),
    (*b"HR", 21),
    (*b"HU", 28),
    (*b"IE", 22),
    (*b"IL", 23),
    (*b"IQ", 23),
    (*b"IS", 26),
    (*b"IT", 27),
    (*b"JO", 30),
    (*b"KW", 30),
    (*b"KZ", 20),
    (*b"LB", 28),
    (*b"LC", 32),
    (*b"LI", 21),
    (*b"LT", 20),
    (*b"LU", 20),
    (*b"LV", 21),
    (*b"LY", 25),
    (*b"MC", 27),
    (*b"MD", 24),
    (*b"ME", 22),
    (*b"MK", 19),
    (*b"MN", 20),
    (*b"MR", 27),
    (*b"MT", 31),
    (*b"MU", 30),
    (*b"NI", 28),
    (*b"NL", 18),
    (*b"NO", 15),
    (*b"OM", 23),
    (*b"PK", 24),
    (*b"PL", 28),
    (*b"PS", 29),
    (*b"PT", 25),
    (*b"QA", 29),
    (*b"RO", 24),
    (*b"RS", 22),
    (*b"RU", 33),
    (*b"SA", 24),
    (*b"SC", 31),
    (*b"SD", 18),
    (*b"SE", 24),
    (*b"SI", 19),
    (*b"SK", 24),
    (*b"SM", 27),
    (*b"SO", 23),
    (*b"ST", 25),
    (*b"SV", 28),
    (*b"TL", 23),
    (*b"TN", 24),
    (*b"TR", 26),
    (*b"UA", 29),
    (*b"VA", 22),
    (*b"VG", 24),
    (*b"XK", 20),
    (*b"YE", 30),
];

/// The length of an IBAN of country `cc` (upper case), if the registry knows the country.
fn length(cc: [u8; 2]) -> Option<usize> {
    LENGTHS
        .binary_search_by_key(&cc, |&(c, _)| c)
        .ok()
        .map(|i| LENGTHS[i].1)
}

/// Where an IBAN that starts at `start` of `text` (its country code in either case) ends,
/// if one does: the country's length of letters and digits, single spaces allowed between
/// them, a word boundary after, and the ISO 7064 mod-97 check.
pub(crate) fn iban_at(text: &str, start: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let cc = [
        bytes.get(start)?.to_ascii_uppercase(),
        bytes.get(start + 1)?.to_ascii_uppercase(),
    ];
    let want = length(cc)?;
    let mut count = 0;
    let mut at = start;
    while count < want {
        match bytes.get(at) {
            Some(b) if b.is_ascii_alphanumeric() => count += 1,
            Some(b' ') if count > 0 && bytes.get(at + 1).is_some_and(u8::is_ascii_alphanumeric) => {}
            _ => return None,
        }
        at += 1;
    }
    let word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_';
    if bytes.get(at).is_some_and(word) {
        return None;
    }
    crate::pii::iban_valid(&text[start..at]).then_some(at)
}

/// IBANs in any case (`de89 …`, `GB82 west …`, `Gb82 WeSt …`) that start in the window
/// `text[base..end]` of `numeric_runs` or one character before it: at each word start with
/// two letters and two digits. Every such start is in a window or just before one: the digits
/// are in a run, and upper-case letters are in it too, while a lower-case letter before them
/// is the character the window is widened by, or the one before that.
pub(crate) fn in_window(text: &str, base: usize, end: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let bytes = text.as_bytes();
    let at = |i: usize| bytes.get(i).copied().unwrap_or(0);
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    // Inside the run a country code is two upper-case letters: a run of numbers without any
    // (most are) is tried at its first two characters only.
    let upper = bytes[base.min(end)..end].iter().any(u8::is_ascii_uppercase);
    let last = if upper { end } else { (base + 1).min(end) };
    (base.saturating_sub(1)..last)
        .filter(move |&i| {
            at(i).is_ascii_alphabetic()
                && at(i + 1).is_ascii_alphabetic()
                && at(i + 2).is_ascii_digit()
                && at(i + 3).is_ascii_digit()
                && (i == 0 || !word(bytes[i - 1]))
        })
        .filter_map(move |i| iban_at(text, i).map(|e| (i, e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_is_sorted_and_knows_the_usual_countries() {
        assert!(LENGTHS.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(length(*b"DE"), Some(22));
        assert_eq!(length(*b"GB"), Some(22));
        assert_eq!(length(*b"NO"), Some(15));
        assert_eq!(length(*b"ZZ"), None);
    }

    #[test]
    fn finds_an_iban_in_any_case_with_or_without_spaces() {
        for (text, end) in [
            ("de89 3704 0044 0532 0130 00", 27),
            ("de89370400440532013000", 22),
            ("De89 3704 0044 0532 0130 00.", 27),
            ("gb82 west 1234 5698 7654 32", 27),
        ] {
            assert_eq!(iban_at(text, 0), Some(end), "{text:?}");
        }
        // One digit off, one short, one long, glued to a word, two spaces.
        for text in [
            "de89 3704 0044 0532 0130 01",
            "de89 3704 0044 0532 0130 0",
            "de89 3704 0044 0532 0130 000",
            "de89 3704 0044 0532 0130 00x",
            "de89  3704 0044 0532 0130 00",
        ] {
            assert_eq!(iban_at(text, 0), None, "{text:?}");
        }
    }

    #[test]
    fn a_word_start_with_two_letters_and_two_digits_is_tried() {
        let text = "iban: de89 3704 0044 0532 0130 00";
        assert_eq!(in_window(text, 7, text.len()).collect::<Vec<_>>(), [(6, 33)]);
        let text = "IBAN GB82 west 1234 5698 7654 32.";
        assert_eq!(in_window(text, 4, 10).collect::<Vec<_>>(), [(5, 32)]);
        // Not at a word's start, or one digit only.
        let text = "xde89 3704 0044 0532 0130 00";
        assert_eq!(in_window(text, 2, text.len()).next(), None);
        let text = "de8 93704 0044 0532 0130 00";
        assert_eq!(in_window(text, 1, text.len()).next(), None);
    }
}
