use std::time::Instant;
use edgeroute_core::pii;
fn t(label: &str, mut f: impl FnMut()) {
    for _ in 0..3 { f(); }
    let n = 50;
    let s = Instant::now();
    for _ in 0..n { f(); }
    println!("{label:<30} {:?}", s.elapsed() / n);
}
fn main() {
    let v: serde_json::Value = serde_json::from_slice(include_bytes!("../benches/data/chat_2k.json")).unwrap();
    let text: String = v["messages"].as_array().unwrap().iter().filter_map(|m| m["content"].as_str()).collect::<Vec<_>>().join("\n");
    let cfg: serde_json::Value = serde_json::from_slice(include_bytes!("../benches/data/router.json")).unwrap();
    let mut pats = vec![];
    for r in cfg["rules"].as_array().unwrap() { for p in r["when"]["patterns"].as_array().into_iter().flatten() { pats.push(p.as_str().unwrap().to_string()); } }
    let set = regex::RegexSet::new(&pats).unwrap();
    t("regexset", || { std::hint::black_box(set.matches(&text)); });
    t("pii all", || { std::hint::black_box(pii::detect(&text, pii::PiiSet::default())); });
    for k in pii::PiiKind::ALL { let s = pii::set_of(&[k]); t(k.name(), || { std::hint::black_box(pii::detect(&text, s)); }); }
    let ascii: String = text.chars().filter(|c| c.is_ascii()).collect();
    t("regexset ascii", || { std::hint::black_box(set.matches(&ascii)); });
    t("pii ascii", || { std::hint::black_box(pii::detect(&ascii, pii::PiiSet::default())); });
}
