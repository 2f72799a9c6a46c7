//! The hand-written pre-tokenisers (`edgeroute_core::pretokenize`) against
//! `bpe-openai`'s regex split, which reproduces `tiktoken`'s pieces exactly.

use edgeroute_core::pretokenize;
use edgeroute_core::Encoding;
use proptest::prelude::*;

fn check(text: &str) {
    check_split(text);
    // And the whole count (splitter, single-token shortcut, BPE) against `bpe-openai`'s.
    assert_eq!(
        Encoding::O200kBase.count(text),
        bpe_openai::o200k_base().count(text),
        "o200k_base count of {text:?}"
    );
    assert_eq!(
        Encoding::Cl100kBase.count(text),
        bpe_openai::cl100k_base().count(text),
        "cl100k_base count of {text:?}"
    );
}

fn check_split(text: &str) {
    same_pieces(
        "o200k_base",
        text,
        pretokenize::o200k_base(text),
        bpe_openai::o200k_base().split(text),
    );
    same_pieces(
        "cl100k_base",
        text,
        pretokenize::cl100k_base(text),
        bpe_openai::cl100k_base().split(text),
    );
}

/// Asserts equal piece lists, showing the first difference in its context
/// (the texts of `every_code_point` are too long to print whole).
fn same_pieces<'a>(
    encoding: &str,
    text: &str,
    got: impl Iterator<Item = &'a str>,
    want: impl Iterator<Item = &'a str>,
) {
    let (got, want): (Vec<&str>, Vec<&str>) = (got.collect(), want.collect());
    if got == want {
        return;
    }
    let i = got.iter().zip(&want).take_while(|(g, w)| g == w).count();
    let from = i.saturating_sub(3);
    let at: usize = got[..i].iter().map(|p| p.len()).sum();
    let mut start = at.saturating_sub(40);
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let context: String = text[start..].chars().take(60).collect();
    panic!(
        "{encoding}: pieces differ at byte {at} of a {}-byte text, near {context:?}\n  got  {:?}\n  want {:?}",
        text.len(),
        &got[from..(i + 3).min(got.len())],
        &want[from..(i + 3).min(want.len())],
    );
}

/// Characters around which the patterns' alternatives meet, with weights.
fn tricky() -> impl Strategy<Value = String> {
    prop_oneof![
        // Contractions in both cases, and the letters that follow `'`.
        8 => prop::sample::select(vec![
            "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ve", "'M", "'LL", "'D", "'ſ", "'",
            "''", "'r", "'l", "'x",
        ]).prop_map(String::from),
        // ASCII letters, digits, spaces and punctuation.
        10 => prop::sample::select(vec![
            "a", "b", "s", "t", "d", "l", "e", "A", "B", "S", "T", "L", "hello", "World", "HTTP", "x", "Z",
        ]).prop_map(String::from),
        6 => prop::sample::select(vec!["0", "1", "9", "42", "1234", "٣", "৪", "²", "½", "Ⅻ", "𝟙"]).prop_map(String::from),
        10 => prop::sample::select(vec![
            " ", "  ", "\t", "\n", "\r", "\r\n", "\u{a0}", "\u{2028}", "\u{2029}", "\u{3000}", "\u{85}", "\u{b}",
            "\u{c}", "\u{2009}", "\u{1680}", "\u{202f}", "\u{205f}", "\u{200b}", "\u{feff}",
        ]).prop_map(String::from),
        8 => prop::sample::select(vec![
            ".", ",", "!", "?", "/", "//", "-", "_", "(", ")", "{", "}", "\"", "#", "@", "*", "\u{0}", "\u{7f}",
            "\u{1b}", "«", "—", "…", "€",
        ]).prop_map(String::from),
        // Marks, cased and uncased letters beyond ASCII.
        8 => prop::sample::select(vec![
            "\u{301}", "\u{308}", "\u{903}", "\u{20dd}", "é", "É", "ß", "ǅ", "ǈ", "ᾈ", "ʰ", "ˆ", "ー", "々", "ª",
            "ſ", "İ", "ı", "Ω", "ω", "Я", "я", "א", "ع", "ก", "東", "京", "数", "한", "カ", "𐐀", "𐐨",
        ]).prop_map(String::from),
        3 => prop::sample::select(vec!["🚀", "😀", "👩‍👩‍👧‍👦", "🇫🇷", "✅", "\u{fe0f}", "\u{200d}"]).prop_map(String::from),
        // Any character at all.
        4 => any::<char>().prop_map(String::from),
    ]
}

fn tricky_text() -> impl Strategy<Value = String> {
    prop::collection::vec(tricky(), 0..40).prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4_000))]

    #[test]
    fn tricky_strings(text in tricky_text()) {
        check(&text);
    }

    #[test]
    fn arbitrary_strings(text in any::<String>()) {
        check(&text);
    }

    #[test]
    fn arbitrary_ascii(text in "[ -~\t\r\n]{0,60}") {
        check(&text);
    }
}

#[test]
fn fixed_cases() {
    for text in [
        "",
        " ",
        "   ",
        "a ",
        "a   ",
        "  \n  x",
        "  \n  ",
        "\n",
        "\r\n",
        "\n\n \n",
        " \t x",
        "x \u{a0}y",
        "x\u{3000}\u{3000}y",
        "hello world",
        "Hello World's",
        "DON'T don't Don'T",
        "HTTPServer xmlHTTPRequest",
        "ǅungla ǅUNGLA",
        "e\u{301}\u{301}x",
        "\u{301}",
        " \u{301}1",
        "!\u{301}a",
        "東京タワーABC",
        "ʰʰA",
        "1234567",
        "٣٣٣٣",
        "a!!\n\n/b",
        "a//\n/x",
        "https://example.com/path?q=1&r=2",
        "def f(x):\n    return x ** 2\n",
        "'s",
        "x'ſ",
        "    \"key\": 1",
        "\u{85}\u{85}a",
        "\u{b}a",
    ] {
        check(text);
    }
}

#[test]
fn long_document() {
    let text = "The quick brown fox's 3 dogs — naïve café 東京 🚀!\n\n\tDON'T \u{a0} x1234 ///\r\n".repeat(500);
    check(&text);
}

/// Every assigned-or-private-use plane's code points (a sample of the empty
/// planes 4 to 13), in contexts where each character class changes the pieces:
/// after a lower-case letter, a digit and punctuation, doubled after a space,
/// inside an upper-case word.
#[test]
fn every_code_point() {
    let chars: Vec<char> = (0..=0x10_ffff_u32)
        .filter(|c| !(0x4_0000..0xe_0000).contains(c) || c % 61 == 0)
        .filter_map(char::from_u32)
        .collect();
    for chunk in chars.chunks(8192) {
        let mut text = String::new();
        for &c in chunk {
            text.extend(['a', c, '1', c, '!', c, ' ', c, c, 'A', c, 'a', '\n']);
        }
        check_split(&text);
    }
}
