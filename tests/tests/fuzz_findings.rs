//! What `cargo xtask fuzz` found, kept as tests (each fixed; the test keeps it fixed).

use relay::config::parse_str;

/// `parse_str` promises "every problem found, in file order", and `mcrelay check-config`
/// prints them so; TOML syntax errors came in the order the parser reported them: the
/// unclosed table header on line 2 before the unquoted value on line 1. Found by the
/// `config_parse` fuzz target within seconds; minimised by hand.
#[test]
fn toml_syntax_errors_are_in_file_order() {
    let errors = parse_str("a = 1x\n[t\n").expect_err("two syntax errors");
    let at: Vec<(usize, usize)> = errors.iter().map(|d| (d.at.line, d.at.column)).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(at.is_sorted(), "diagnostics at {at:?}, not in file order: {errors:?}");
}
