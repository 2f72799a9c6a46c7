//! Distinct copies of the decide bench's chat, for timing decisions on prompts not seen before.
//!
//! The rules remember what they found in recent prompts (a cache hit's body is not scanned
//! again), so deciding one body over and over would time that memory, not a new request.
//! Each copy differs in its last message; cycling through more copies than the memory holds
//! (1,024 prompts, 4 MiB) makes every decision a first sight.

/// Copies cycled through: more than the rules' memory keeps.
pub const VARIANTS: usize = 2048;

/// `VARIANTS` copies of `body` (a chat body), each with its number in its last message.
pub fn chat_variants(body: &[u8]) -> Vec<Vec<u8>> {
    let v: serde_json::Value = serde_json::from_slice(body).expect("valid body");
    (0..VARIANTS)
        .map(|i| {
            let mut copy = v.clone();
            let last = copy["messages"]
                .as_array_mut()
                .and_then(|m| m.last_mut())
                .expect("messages");
            let text = last["content"].as_str().expect("text content");
            last["content"] = format!("{text} (case {i})").into();
            serde_json::to_vec(&copy).expect("serialises")
        })
        .collect()
}

/// Hands out the copies in turn.
pub struct Cycle<'a> {
    bodies: &'a [Vec<u8>],
    next: usize,
}

impl<'a> Cycle<'a> {
    pub fn new(bodies: &'a [Vec<u8>]) -> Self {
        Self { bodies, next: 0 }
    }

    pub fn body(&mut self) -> &'a [u8] {
        let b = &self.bodies[self.next];
        self.next = (self.next + 1) % self.bodies.len();
        b
    }
}
