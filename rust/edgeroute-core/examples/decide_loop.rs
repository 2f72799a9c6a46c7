//! Decides the decide bench's 2k-token chat (200 rules, 50 deployments, tokens given)
//! `N` times, for instruction counts per decision:
//!
//! ```text
//! cargo build --release -p edgeroute-core --example decide_loop
//! valgrind --tool=callgrind --toggle-collect='*Router*decide_at*' target/release/examples/decide_loop 101
//! ```
//!
//! The first decision counts the tokens; subtract a run with `N` = 1 and divide by the difference in `N`.
//! Each decision is of a copy of the chat not seen lately (see `benches/support/chat_variants.rs`).

use std::hint::black_box;

use edgeroute_core::{RequestMeta, Router};

#[path = "../benches/support/chat_variants.rs"]
mod chat_variants;
use chat_variants::{chat_variants, Cycle};

const CONFIG: &[u8] = include_bytes!("../benches/data/router.json");
const CHAT_2K: &[u8] = include_bytes!("../benches/data/chat_2k.json");

fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let router = Router::from_json(CONFIG).expect("bench config compiles");
    router.warm_up();
    let counted = RequestMeta {
        tags: vec!["tier:free".into()],
        team: Some("web".into()),
        ..RequestMeta::default()
    };
    let tokens = router.decide(CHAT_2K, &counted).expect("decides").prompt_tokens;
    let given = RequestMeta {
        prompt_tokens: Some(tokens),
        ..counted
    };
    let chats = chat_variants(CHAT_2K);
    let mut cycle = Cycle::new(&chats);
    let mut total = 0u64;
    for _ in 0..n {
        total += u64::from(
            router
                .decide(black_box(cycle.body()), &given)
                .expect("decides")
                .prompt_tokens,
        );
    }
    println!("{n} decisions, {total} prompt tokens");
}
