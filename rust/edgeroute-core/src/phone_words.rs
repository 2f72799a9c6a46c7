//! National phone numbers written without a country code or separators (`03012345678`,
//! `4155550132`), which look like any other long number (an order, an account, a
//! timestamp): taken for phones only after a word that says so ("call", "phone", "tel",
//! "mobile", "WhatsApp", …) a few words before. Without the word such a number stays a
//! number: detecting every nine-digit number as a phone would send ordinary prompts (order
//! numbers, ids, timestamps) to private deployments.

/// Words that announce a phone number, lower case; each must start a word and end one.
const WORDS: [&str; 27] = [
    "call",
    "calls",
    "called",
    "calling",
    "phone",
    "phones",
    "telephone",
    "tel",
    "tél",
    "téléphone",
    "telefon",
    "telefono",
    "teléfono",
    "telefone",
    "mobile",
    "mob",
    "mobil",
    "móvil",
    "movil",
    "cell",
    "cellphone",
    "celular",
    "whatsapp",
    "sms",
    "fax",
    "dial",
    "handy",
];

/// Words in scripts without spaces between words, found anywhere.
const CJK_WORDS: [&str; 5] = ["電話", "携帯", "电话", "手机", "전화"];

/// How far before a number the word may be, in bytes ("my mobile number is …").
const REACH: usize = 40;

/// Whether a word that announces a phone number ends within [`REACH`] bytes before `at`.
pub(crate) fn announced(text: &str, at: usize) -> bool {
    let mut from = at.saturating_sub(REACH);
    while !text.is_char_boundary(from) {
        from += 1;
    }
    let before = &text[from..at];
    if !before.is_ascii() && CJK_WORDS.iter().any(|w| before.contains(w)) {
        return true;
    }
    // Words as identifiers have them too: `call_1` is not "call".
    let letter = |c: char| c.is_alphanumeric() || c == '_';
    // A word the reach cuts ("re|call") is not one.
    let cut = text[..from].chars().next_back().is_some_and(letter);
    before
        .split(|c: char| !letter(c))
        .skip(usize::from(cut))
        .any(|w| WORDS.iter().any(|k| w.eq_ignore_ascii_case(k)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phone_word_a_few_words_before() {
        for text in [
            "call 4155550132",
            "Call me tomorrow at ",
            "my mobile number is ",
            "Tel.: ",
            "WhatsApp: ",
            "電話：",
            "Téléphone ",
        ] {
            assert!(announced(text, text.len()), "{text:?}");
        }
        for text in [
            "order number ",
            "hotel room ",
            "the telemetry id ",
            "recalled id ",
            "",
            "id",
        ] {
            assert!(!announced(text, text.len()), "{text:?}");
        }
    }
}
