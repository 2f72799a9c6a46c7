//! Writes the OpenAI vocabularies as two flat files per encoding, which `tokens.rs`
//! includes as static data: every token's bytes back to back (`<name>.tokens`) and
//! where each token starts (`<name>.offsets`, little-endian `u32`, one more than there
//! are tokens). Token ids are `tiktoken`'s ranks.
//!
//! Why not the `bpe-openai` tokenizer at run time: it builds three Aho-Corasick automata
//! over the whole vocabulary when first used (~73 MB resident for `o200k_base`, ~50 ms).
//! As static data the vocabulary is a few MB, read-only and shared by every process that
//! maps the library, and costs nothing to load.

use std::env;
use std::fs;
use std::path::Path;

fn main() {
    let out = env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    for (name, tokenizer) in [
        ("o200k_base", bpe_openai::o200k_base()),
        ("cl100k_base", bpe_openai::cl100k_base()),
    ] {
        let bpe = &tokenizer.bpe;
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(4 * (bpe.num_tokens() + 1));
        for id in 0..bpe.num_tokens() as u32 {
            offsets.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            bytes.extend_from_slice(bpe.token_bytes(id));
        }
        offsets.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        fs::write(Path::new(&out).join(format!("{name}.tokens")), bytes).expect("write tokens");
        fs::write(Path::new(&out).join(format!("{name}.offsets")), offsets).expect("write offsets");
    }
    println!("cargo::rerun-if-changed=build.rs");
}
