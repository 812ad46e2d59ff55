//! serde's data errors in the project's words: "must be a whole number ≥ 0, not -1" instead of
//! "invalid value: integer `-1`, expected u64", and never a Rust type name ("expected struct StepCall").
//! Only serde's own fixed phrases are rewritten; anything else passes through unchanged.

/// Rewrites one serde data-error message (without its position).
pub(crate) fn in_our_words(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("invalid type: ")
        && let Some((unexpected, expected)) = rest.rsplit_once(", expected ")
    {
        return format!("must be {}, not {}", expected_words(expected), unexpected_words(unexpected));
    }
    if let Some(rest) = message.strip_prefix("invalid value: ")
        && let Some((unexpected, expected)) = rest.rsplit_once(", expected ")
    {
        return format!("is {}; it must be {}", unexpected_words(unexpected), expected_words(expected));
    }
    if let Some(rest) = message.strip_prefix("invalid length ")
        && let Some((length, expected)) = rest.split_once(", expected ")
    {
        return format!("has {length} items; it must have {}", expected_words(expected));
    }
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((_, known)) = rest.split_once("`, ")
    {
        return match known.strip_prefix("expected ") {
            Some(known) => format!("is not a known field (known: {})", list(known)),
            None => "is not a known field (none are taken here)".to_owned(),
        };
    }
    if let Some(rest) = message.strip_prefix("unknown variant `")
        && let Some((variant, known)) = rest.split_once("`, ")
    {
        return match known.strip_prefix("expected ") {
            Some(known) => format!("`{variant}` is not one of {}", list(known)),
            None => format!("`{variant}` is not allowed here"),
        };
    }
    if let Some(rest) = message.strip_prefix("duplicate field `")
        && rest.ends_with('`')
    {
        return "is given more than once".to_owned();
    }
    message.to_owned()
}

/// serde's "one of `a`, `b`" or "`a` or `b`" as "`a`, `b`".
fn list(known: &str) -> String {
    known.strip_prefix("one of ").unwrap_or(known).replace("` or `", "`, `")
}

/// What serde says it expected, in words.
fn expected_words(expected: &str) -> String {
    let words = match expected {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number ≥ 0",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "a string" | "a borrowed string" | "a character" | "a char" => "a string",
        "a boolean" => "`true` or `false`",
        "a sequence" | "a tuple" => "a list",
        "a map" | "unit" => "an object",
        other if other.starts_with("struct ") || other.starts_with("tuple struct ") => "an object",
        other if other.starts_with("internally tagged enum ") || other.starts_with("enum ") => "an object",
        other => return other.to_owned(),
    };
    words.to_owned()
}

/// What serde says it found, in words.
fn unexpected_words(unexpected: &str) -> String {
    for number in ["integer `", "floating point `"] {
        if let Some(value) = unexpected.strip_prefix(number).and_then(|rest| rest.strip_suffix('`')) {
            return value.to_owned();
        }
    }
    if let Some(value) = unexpected.strip_prefix("boolean `").and_then(|rest| rest.strip_suffix('`')) {
        return format!("`{value}`");
    }
    let words = match unexpected {
        "sequence" => "a list",
        "map" => "an object",
        "unit value" | "unit" | "null" => "null",
        other if other.starts_with("string ") => "a string",
        other => return other.to_owned(),
    };
    words.to_owned()
}

#[cfg(test)]
mod tests {
    use super::in_our_words;

    #[test]
    fn serde_phrases_are_rewritten() {
        for (serde, ours) in [
            ("invalid type: string \"x\", expected u64", "must be a whole number ≥ 0, not a string"),
            ("invalid value: integer `-1`, expected u64", "is -1; it must be a whole number ≥ 0"),
            ("invalid type: floating point `1.5`, expected u64", "must be a whole number ≥ 0, not 1.5"),
            ("invalid type: sequence, expected struct StepCall", "must be an object, not a list"),
            ("invalid type: map, expected a string", "must be a string, not an object"),
            ("invalid type: boolean `true`, expected a sequence", "must be a list, not `true`"),
            ("unknown field `x`, expected one of `index`, `phase`", "is not a known field (known: `index`, `phase`)"),
            ("unknown field `x`, expected `a` or `b`", "is not a known field (known: `a`, `b`)"),
            ("unknown field `x`, there are no fields", "is not a known field (none are taken here)"),
            ("unknown variant `later`, expected `pre` or `post`", "`later` is not one of `pre`, `post`"),
            ("unknown variant `x`, expected one of `a`, `b`, `c`", "`x` is not one of `a`, `b`, `c`"),
            ("duplicate field `usage`", "is given more than once"),
            ("invalid length 3, expected a tuple of size 2", "has 3 items; it must have a tuple of size 2"),
            ("is 0; windows are 1–86400 seconds", "is 0; windows are 1–86400 seconds"),
        ] {
            assert_eq!(in_our_words(serde), ours, "{serde}");
        }
    }
}
