//! What `cargo xtask fuzz` found, kept as tests. A known bug stays `#[ignore]`d (so the suite
//! passes) until it is fixed; `cargo test --test fuzz_findings -- --ignored` shows it. The fuzz
//! target that found it skips the same check and says so (look for KNOWN BUG in fuzz/).

use relay::config::parse_str;

/// `parse_str` promises "every problem found, in file order", and `mcrelay check-config`
/// prints them so; but TOML syntax errors come in the order the parser reports them: the
/// unclosed table header on line 2 before the unquoted value on line 1. Found by the
/// `config_parse` fuzz target within seconds; minimised by hand.
#[test]
#[ignore = "known bug: TOML syntax errors are not sorted by position"]
fn known_bug_toml_syntax_errors_are_not_in_file_order() {
    let errors = parse_str("a = 1x\n[t\n").expect_err("two syntax errors");
    let at: Vec<(usize, usize)> = errors.iter().map(|d| (d.at.line, d.at.column)).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(at.is_sorted(), "diagnostics at {at:?}, not in file order: {errors:?}");
}
