//! Content rules: built-in detectors, regexes and keywords, with redacted evidence.
//!
//! Matched text never leaves this module: evidence carries the detector or the index of the pattern or
//! keyword, a count, and at most three redacted samples.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use regex::{Regex, RegexBuilder};
use runguard_contract::{ContentRule, Detector, EvidenceMatch, ValidationError};

/// Compiled regexes may not exceed this many bytes, so a hostile pattern cannot exhaust memory.
pub(crate) const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Samples kept per match kind.
pub(crate) const MAX_SAMPLES: usize = 3;

/// A compiled content rule.
#[derive(Debug)]
pub(crate) struct ContentMatcher {
    detectors: Vec<(Detector, Regex)>,
    patterns: Vec<Regex>,
    /// Case-insensitive lists are compiled lower-cased and search the lower-cased text (see
    /// [`ScanText`]).
    keywords: Option<AhoCorasick>,
    keywords_folded: bool,
    keyword_count: usize,
    /// One regex source per part (each detector, each pattern, then all keywords as one alternation),
    /// for a snapshot-wide [`regex::RegexSet`] screen.
    screen_sources: Vec<String>,
}

fn build_regex(source: &str, case_insensitive: bool) -> Result<Regex, regex::Error> {
    RegexBuilder::new(source)
        .case_insensitive(case_insensitive)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
}

/// Detector regexes use ASCII classes (`[0-9]`, ASCII word boundaries): the shapes they detect are
/// ASCII, and Unicode classes would make the screen's automaton several times larger and slower.
fn detector_source(detector: Detector) -> &'static str {
    match detector {
        Detector::Email => r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
        Detector::Ssn => r"(?-u:\b)[0-9]{3}-[0-9]{2}-[0-9]{4}(?-u:\b)",
        Detector::CreditCard => r"(?-u:\b)[0-9](?:[ -]?[0-9]){12,18}(?-u:\b)",
        Detector::Phone => {
            r"(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{3}\)|(?-u:\b)[0-9]{3})[ .-]?[0-9]{3}[ .-]?[0-9]{4}(?-u:\b)"
        }
        Detector::IpAddress => {
            r"(?-u:\b)(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?-u:\b)|(?-u:\b)(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?-u:\b)"
        }
        Detector::ApiKey => {
            r"(?-u:\b)(?:sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|xox[abprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35})"
        }
    }
}

/// Whether a candidate found by a detector's regex is a real hit (Luhn for cards, reserved ranges for SSNs).
fn confirm(detector: Detector, candidate: &str) -> bool {
    match detector {
        Detector::CreditCard => luhn_valid(candidate),
        Detector::Ssn => {
            let digits: Vec<u32> = candidate.chars().filter_map(|c| c.to_digit(10)).collect();
            let area = digits.iter().take(3).fold(0, |acc, d| acc * 10 + d);
            let group = digits.iter().skip(3).take(2).fold(0, |acc, d| acc * 10 + d);
            let serial = digits.iter().skip(5).take(4).fold(0, |acc, d| acc * 10 + d);
            area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
        }
        _ => true,
    }
}

/// The Luhn checksum over the digits of `candidate` (13 to 19 digits).
pub(crate) fn luhn_valid(candidate: &str) -> bool {
    let digits: Vec<u32> = candidate.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Redacts a match: the first 2 and last 2 characters are kept only when the match has at least 8
/// characters, so that at least half of it is always hidden; shorter matches are fully masked.
pub(crate) fn redact(matched: &str) -> String {
    let chars: Vec<char> = matched.chars().collect();
    if chars.len() < 8 {
        return "***".to_owned();
    }
    let head: String = chars.iter().take(2).collect();
    let tail: String = chars.iter().skip(chars.len().saturating_sub(2)).collect();
    format!("{head}***{tail}")
}

impl ContentMatcher {
    /// Compiles a content rule. Regexes are size-limited; errors name the pattern's index.
    pub(crate) fn compile(rule: &ContentRule) -> Result<Self, ValidationError> {
        let mut detectors = Vec::with_capacity(rule.detectors.len());
        for detector in &rule.detectors {
            let regex = build_regex(detector_source(*detector), false)
                .map_err(|err| ValidationError::new("rule.detectors", format!("detector failed to compile: {err}")))?;
            detectors.push((*detector, regex));
        }
        let mut patterns = Vec::with_capacity(rule.patterns.len());
        for (i, source) in rule.patterns.iter().enumerate() {
            let regex = build_regex(source, rule.case_insensitive).map_err(|err| {
                let detail = err.to_string().lines().last().unwrap_or_default().trim().to_owned();
                ValidationError::new(format!("rule.patterns[{i}]"), format!("is not a valid regex: {detail}"))
            })?;
            patterns.push(regex);
        }
        // An ASCII-case-insensitive automaton gets no literal prefilter and walks every byte (about 7 µs
        // on 4 KiB); the same keywords lower-cased, searched case-sensitively in the lower-cased text,
        // match exactly the same spans with a prefilter (well under 1 µs). Lower-casing ASCII keeps
        // every byte offset, so spans map back to the original text unchanged.
        let folded = rule.case_insensitive;
        let keywords = if rule.keywords.is_empty() {
            None
        } else {
            let sources: Vec<String> = if folded {
                rule.keywords.iter().map(|k| k.to_ascii_lowercase()).collect()
            } else {
                rule.keywords.clone()
            };
            Some(
                AhoCorasickBuilder::new()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&sources)
                    .map_err(|err| ValidationError::new("rule.keywords", format!("cannot be compiled: {err}")))?,
            )
        };
        let flag = if rule.case_insensitive { "(?i)" } else { "" };
        let mut screen_sources: Vec<String> = rule.detectors.iter().map(|d| detector_source(*d).to_owned()).collect();
        screen_sources.extend(rule.patterns.iter().map(|p| format!("{flag}(?:{p})")));
        if !rule.keywords.is_empty() {
            let alternation: Vec<String> = rule.keywords.iter().map(|k| regex::escape(k)).collect();
            screen_sources.push(format!("{flag}(?:{})", alternation.join("|")));
        }
        Ok(Self {
            detectors,
            patterns,
            keywords,
            keywords_folded: folded,
            keyword_count: rule.keywords.len(),
            screen_sources,
        })
    }

    /// One regex source per part, in the order [`ContentMatcher::scan_screened`] expects.
    pub(crate) fn screen_sources(&self) -> &[String] {
        &self.screen_sources
    }

    /// Every match in `text`, grouped by detector, pattern and keyword, with redacted samples.
    #[cfg(test)]
    pub(crate) fn scan(&self, text: &str) -> Vec<EvidenceMatch> {
        self.scan_screened(&ScanText::new(text), |_| true)
    }

    /// Like [`ContentMatcher::scan`], running only the parts for which `may_match(part)` is true (a
    /// screen has ruled out the others).
    pub(crate) fn scan_screened(&self, text: &ScanText<'_>, may_match: impl Fn(usize) -> bool) -> Vec<EvidenceMatch> {
        let folded = text;
        let text = folded.text;
        let mut found = Vec::new();
        for (part, (detector, regex)) in self.detectors.iter().enumerate() {
            if !may_match(part) {
                continue;
            }
            let hits = regex.find_iter(text).map(|m| m.as_str()).filter(|m| confirm(*detector, m));
            push_hits(&mut found, "detector", detector.as_str().to_owned(), hits);
        }
        for (i, regex) in self.patterns.iter().enumerate() {
            if !may_match(self.detectors.len() + i) {
                continue;
            }
            push_hits(&mut found, "pattern", format!("patterns[{i}]"), regex.find_iter(text).map(|m| m.as_str()));
        }
        let keyword_part = self.detectors.len() + self.patterns.len();
        if let Some(keywords) = self.keywords.as_ref().filter(|_| may_match(keyword_part)) {
            let mut per_keyword: Vec<Vec<&str>> = vec![Vec::new(); self.keyword_count];
            let haystack = if self.keywords_folded { folded.folded() } else { text };
            for m in keywords.find_iter(haystack) {
                if let (Some(bucket), Some(matched)) =
                    (per_keyword.get_mut(m.pattern().as_usize()), text.get(m.range()))
                {
                    bucket.push(matched);
                }
            }
            for (i, hits) in per_keyword.into_iter().enumerate() {
                push_hits(&mut found, "keyword", format!("keywords[{i}]"), hits.into_iter());
            }
        }
        found
    }
}

/// A text being scanned by several content rules, with its ASCII-lower-cased copy made on first use and
/// shared by every case-insensitive keyword list.
#[derive(Debug)]
pub(crate) struct ScanText<'t> {
    text: &'t str,
    folded: std::cell::OnceCell<String>,
}

impl<'t> ScanText<'t> {
    /// Wraps `text`.
    pub(crate) fn new(text: &'t str) -> Self {
        Self { text, folded: std::cell::OnceCell::new() }
    }

    fn folded(&self) -> &str {
        let folded = self.folded.get_or_init(|| self.text.to_ascii_lowercase());
        debug_assert_eq!(folded.len(), self.text.len(), "ASCII lower-casing keeps every byte offset");
        folded
    }
}

fn push_hits<'t>(found: &mut Vec<EvidenceMatch>, kind: &str, name: String, hits: impl Iterator<Item = &'t str>) {
    let mut count = 0u64;
    let mut samples = Vec::new();
    for hit in hits {
        count = count.saturating_add(1);
        if samples.len() < MAX_SAMPLES {
            samples.push(redact(hit));
        }
    }
    if count > 0 {
        found.push(EvidenceMatch { kind: kind.to_owned(), name, count, samples });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runguard_contract::ContentTarget;

    fn rule(detectors: Vec<Detector>, patterns: Vec<&str>, keywords: Vec<&str>, ci: bool) -> ContentRule {
        ContentRule {
            target: ContentTarget::Output,
            detectors,
            patterns: patterns.into_iter().map(str::to_owned).collect(),
            keywords: keywords.into_iter().map(str::to_owned).collect(),
            case_insensitive: ci,
        }
    }

    fn names(found: &[EvidenceMatch]) -> Vec<(String, u64)> {
        found.iter().map(|m| (m.name.clone(), m.count)).collect()
    }

    #[test]
    fn each_detector_finds_its_kind() {
        let all = vec![
            Detector::Email,
            Detector::Ssn,
            Detector::CreditCard,
            Detector::Phone,
            Detector::IpAddress,
            Detector::ApiKey,
        ];
        let m = ContentMatcher::compile(&rule(all, vec![], vec![], false)).unwrap();
        let cases = [
            ("write to jane.doe@example.com", "email"),
            ("ssn 123-45-6789 here", "ssn"),
            ("card 4111 1111 1111 1111", "credit_card"),
            ("call (555) 123-4567", "phone"),
            ("host 192.168.10.20 up", "ip_address"),
            ("key sk-abcdefghijklmnopqrstuvwxyz123", "api_key"),
        ];
        for (text, expected) in cases {
            let found = m.scan(text);
            assert!(found.iter().any(|f| f.name == expected), "{expected} not found in {text:?}: {found:?}");
        }
        assert!(m.scan("nothing to see, 12 apples").is_empty());
    }

    #[test]
    fn cards_must_pass_luhn_and_ssns_must_not_be_reserved() {
        assert!(luhn_valid("4111 1111 1111 1111"));
        assert!(!luhn_valid("4111 1111 1111 1112"));
        let m =
            ContentMatcher::compile(&rule(vec![Detector::CreditCard, Detector::Ssn], vec![], vec![], false)).unwrap();
        assert!(m.scan("card 4111 1111 1111 1112").is_empty());
        assert!(m.scan("ssn 000-12-3456 and 666-12-3456").is_empty());
    }

    #[test]
    fn keywords_and_patterns_count_matches_and_respect_case() {
        let m = ContentMatcher::compile(&rule(vec![], vec![r"ord-\d+"], vec!["secret", "token"], true)).unwrap();
        let found = m.scan("SECRET ord-1 secret ord-22 Token");
        assert_eq!(
            names(&found),
            vec![("patterns[0]".into(), 2), ("keywords[0]".into(), 2), ("keywords[1]".into(), 1)]
        );
        let exact = ContentMatcher::compile(&rule(vec![], vec![], vec!["secret"], false)).unwrap();
        assert!(exact.scan("SECRET").is_empty());
    }

    #[test]
    fn samples_are_redacted_and_capped() {
        assert_eq!(redact("jane.doe@example.com"), "ja***om");
        assert_eq!(redact("short"), "***");
        let m = ContentMatcher::compile(&rule(vec![Detector::Email], vec![], vec![], false)).unwrap();
        let text = "a1@x.io b2@x.io c3@x.io d4@x.io averyl0ng@example.com";
        let found = m.scan(text);
        assert_eq!(found[0].count, 5);
        assert_eq!(found[0].samples.len(), MAX_SAMPLES);
        for sample in &found[0].samples {
            assert!(!text.contains(sample.as_str()) || sample == "***", "{sample} leaks");
        }
    }

    /// The keyword scan as it was: an ASCII-case-insensitive automaton over the original text.
    fn keyword_hits_reference(keywords: &[String], text: &str) -> Vec<EvidenceMatch> {
        let automaton = AhoCorasickBuilder::new()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::LeftmostLongest)
            .build(keywords)
            .unwrap();
        let mut per_keyword: Vec<Vec<&str>> = vec![Vec::new(); keywords.len()];
        for m in automaton.find_iter(text) {
            per_keyword[m.pattern().as_usize()].push(text.get(m.range()).unwrap());
        }
        let mut found = Vec::new();
        for (i, hits) in per_keyword.into_iter().enumerate() {
            push_hits(&mut found, "keyword", format!("keywords[{i}]"), hits.into_iter());
        }
        found
    }

    proptest::proptest! {
        /// Case-insensitive keywords search the lower-cased text with lower-cased keywords: the same
        /// keywords, spans and samples as an ASCII-case-insensitive search of the original text,
        /// including duplicate keywords that differ only in case and non-ASCII letters (which only
        /// match exactly).
        #[test]
        fn folded_keywords_match_like_case_insensitive_ones(
            keywords in proptest::collection::vec("[aAbB é É\u{212A}kK]{1,4}", 1..6),
            text in "[aAbB é É\u{212A}kKx]{0,40}",
        ) {
            let m = ContentMatcher::compile(&rule(vec![], vec![], keywords.iter().map(String::as_str).collect(), true))
                .unwrap();
            proptest::prop_assert_eq!(m.scan(&text), keyword_hits_reference(&keywords, &text));
        }
    }

    #[test]
    fn invalid_and_oversized_regexes_are_rejected_by_index() {
        let err = ContentMatcher::compile(&rule(vec![], vec!["ok", "(unclosed"], vec![], false)).unwrap_err();
        assert_eq!(err.field(), "rule.patterns[1]");
        let err = ContentMatcher::compile(&rule(vec![], vec![r"\w{1000}{1000}"], vec![], false)).unwrap_err();
        assert_eq!(err.field(), "rule.patterns[0]");
    }
}
