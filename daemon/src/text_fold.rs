//! Accent- and case-folding of searchable text, done in corald so search works the same on
//! the managed cluster and on any external PostgreSQL (no `unaccent` extension needed).

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// Lower-case, strip diacritics (NFKD then drop combining marks) and keep letters and digits;
/// every other character separates words. "Zoë Café-Noir" → "zoe cafe noir".
pub fn fold(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.nfkd().filter(|c| !is_combining_mark(*c)) {
        let c = match c {
            'ß' => {
                push_word_char(&mut out, &mut pending_space, 's');
                's'
            }
            'ø' | 'Ø' => 'o',
            'æ' | 'Æ' => {
                push_word_char(&mut out, &mut pending_space, 'a');
                'e'
            }
            'œ' | 'Œ' => {
                push_word_char(&mut out, &mut pending_space, 'o');
                'e'
            }
            'đ' | 'Đ' | 'ð' | 'Ð' => 'd',
            'þ' | 'Þ' => {
                push_word_char(&mut out, &mut pending_space, 't');
                'h'
            }
            'ł' | 'Ł' => 'l',
            'ı' => 'i',
            c => c,
        };
        if c.is_alphanumeric() {
            for l in c.to_lowercase() {
                push_word_char(&mut out, &mut pending_space, l);
            }
        } else {
            pending_space = !out.is_empty();
        }
    }
    out
}

fn push_word_char(out: &mut String, pending_space: &mut bool, c: char) {
    if *pending_space {
        out.push(' ');
        *pending_space = false;
    }
    out.push(c);
}

/// Build the folded search document of a track from its tags.
pub fn search_document<'a>(fields: impl IntoIterator<Item = Option<&'a str>>) -> String {
    let mut doc = String::new();
    for f in fields.into_iter().flatten() {
        let folded = fold(f);
        if !folded.is_empty() {
            if !doc.is_empty() {
                doc.push(' ');
            }
            doc.push_str(&folded);
        }
    }
    doc
}

/// Turn a user's query into a `to_tsquery('simple', …)` expression: every folded word becomes a
/// prefix term, all required. Only letters and digits survive folding, so the result cannot
/// carry tsquery syntax. `None` when the query has no words.
pub fn prefix_tsquery(query: &str) -> Option<String> {
    let folded = fold(query);
    if folded.is_empty() {
        return None;
    }
    Some(
        folded
            .split(' ')
            .map(|w| format!("{w}:*"))
            .collect::<Vec<_>>()
            .join(" & "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_accents_case_and_punctuation() {
        assert_eq!(fold("Zoë Café-Noir"), "zoe cafe noir");
        assert_eq!(fold("  BJÖRK  "), "bjork");
        assert_eq!(fold("Straße"), "strasse");
        assert_eq!(
            fold("Sigur Rós — Ágætis byrjun"),
            "sigur ros agaetis byrjun"
        );
        assert_eq!(fold("AC/DC"), "ac dc");
        assert_eq!(fold("Þór Fjörður"), "thor fjordur");
        assert_eq!(fold("!!!"), "");
    }

    #[test]
    fn query_becomes_prefix_terms_without_syntax() {
        assert_eq!(prefix_tsquery("Zoë caf").as_deref(), Some("zoe:* & caf:*"));
        assert_eq!(
            prefix_tsquery("a' | !b & (c)").as_deref(),
            Some("a:* & b:* & c:*")
        );
        assert_eq!(prefix_tsquery("  -- "), None);
    }

    #[test]
    fn search_document_skips_missing_fields() {
        assert_eq!(
            search_document([Some("Été"), None, Some(""), Some("Zoë")]),
            "ete zoe"
        );
    }
}
