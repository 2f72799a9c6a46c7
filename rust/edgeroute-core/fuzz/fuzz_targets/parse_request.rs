//! The request parser on arbitrary bytes: a clean `BadRequest` or a request whose
//! `model` span points at a JSON string in the body; never a panic.
#![no_main]

use edgeroute_core::request::ChatRequest;
use edgeroute_core::CoreError;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match ChatRequest::parse(data) {
        Ok(req) => {
            assert!(!req.messages.is_empty());
            assert_eq!(data[req.model_span.0], b'"');
            assert_eq!(data[req.model_span.1 - 1], b'"');
        }
        Err(CoreError::BadRequest(msg)) => assert!(!msg.is_empty()),
        Err(e) => panic!("not a client error: {e:?}"),
    }
});
