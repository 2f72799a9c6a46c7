//! The faults a request body is refused for before it is parsed: nesting deeper than a
//! limit ([`crate::nesting_over`]) or a key repeated within one object
//! ([`crate::duplicate_key`]). Two byte scans of the whole body (~10k instructions for the
//! bench's 7 kB chat); a body found clean is remembered ([`ScanMemo`]), so the same bytes
//! sent again (a cache hit, a client's retry) are compared rather than scanned.

use std::sync::OnceLock;

use crate::scan_memo::ScanMemo;
use crate::{duplicate_key, nesting_over};

/// Bodies found clean lately, with the depth limit they were checked against (0: none).
fn clean() -> &'static ScanMemo<usize> {
    static CLEAN: OnceLock<ScanMemo<usize>> = OnceLock::new();
    CLEAN.get_or_init(ScanMemo::default)
}

/// Whether `body` nests more than `limit` deep, else the first key it repeats (if any).
pub fn body_faults(body: &[u8], limit: usize) -> (bool, Option<String>) {
    let (known, key) = clean().get(body, None);
    if known == limit && limit > 0 {
        return (false, None);
    }
    if nesting_over(body, limit) {
        return (true, None);
    }
    let repeated = duplicate_key(body);
    if repeated.is_none() && limit > 0 {
        clean().put(key, body, None, &known, limit);
    }
    (false, repeated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_judged_by_its_own_bytes_whenever_it_comes() {
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(10), "]".repeat(10));
        for _ in 0..2 {
            assert_eq!(body_faults(br#"{"model":"m","n":1}"#, 8), (false, None));
            assert_eq!(body_faults(br#"{"model":"m","m":1}"#, 8), (false, None));
            assert_eq!(
                body_faults(br#"{"model":"m","model":1}"#, 8),
                (false, Some("model".into()))
            );
            assert_eq!(body_faults(deep.as_bytes(), 8), (true, None));
            // Found clean under a higher limit, it is scanned again under a lower one.
            assert_eq!(body_faults(deep.as_bytes(), 16), (false, None));
            assert_eq!(body_faults(deep.as_bytes(), 8), (true, None));
        }
        assert_eq!(clean().get(deep.as_bytes(), None).0, 16);
    }
}
