//! The configuration parser on fuzzed text (seeded with packaging/mcrelay.toml and the test
//! files under tests/data/config by `cargo xtask fuzz`).
//!
//! Beyond "never panics": the verdict is the same twice, and a refusal carries at least one
//! diagnostic, each with a message, at a line and column that exist in the text (a column may
//! be one past the end of its line), in file order (but see the known bug below).
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::config::parse_str;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let verdict = parse_str(text);
    assert_eq!(verdict, parse_str(text), "same text, same verdict");
    let Err(diagnostics) = verdict else { return };
    assert!(!diagnostics.is_empty(), "refused without a diagnostic: {text:?}");
    let lines: Vec<&str> = text.split('\n').collect();
    for d in &diagnostics {
        assert!(!d.message.is_empty(), "empty message: {d:?}");
        let line = d.at.line.checked_sub(1).and_then(|i| lines.get(i));
        let Some(line) = line else { panic!("no line {} in {text:?}: {d:?}", d.at.line) };
        assert!(
            (1..=line.chars().count() + 1).contains(&d.at.column),
            "no column {} on line {} ({line:?}): {d:?}",
            d.at.column,
            d.at.line
        );
    }
    assert!(diagnostics.is_sorted_by_key(|d| d.at), "not in file order: {diagnostics:?}");
});
