//! The sim's "inference": language detection (real, via whatlang) and a tiny
//! word-for-word translator that is deterministic, so suites can assert on it.

/// Detected language as an ISO 639-1 code where one exists, and confidence.
pub fn detect(text: &str) -> Option<(String, f64)> {
    let info = whatlang::detect(text)?;
    let code = iso639_1(info.lang()).unwrap_or(info.lang().code()).to_owned();
    Some((code, info.confidence()))
}

fn iso639_1(lang: whatlang::Lang) -> Option<&'static str> {
    use whatlang::Lang::*;
    Some(match lang {
        Eng => "en",
        Spa => "es",
        Fra => "fr",
        Deu => "de",
        Ita => "it",
        Por => "pt",
        Rus => "ru",
        Ukr => "uk",
        Jpn => "ja",
        Cmn => "zh",
        Ara => "ar",
        Hin => "hi",
        Nld => "nl",
        Pol => "pl",
        Tur => "tr",
        Kor => "ko",
        Swe => "sv",
        _ => return None,
    })
}

const LEXICON: &[(&str, &str, &str, &str)] = &[
    // english, spanish, french, german
    ("hello", "hola", "bonjour", "hallo"),
    ("world", "mundo", "monde", "welt"),
    ("good", "buenos", "bon", "guten"),
    ("morning", "días", "matin", "morgen"),
    ("thank", "gracias", "merci", "danke"),
    ("you", "", "", ""),
    ("the", "el", "le", "der"),
    ("cat", "gato", "chat", "katze"),
    ("model", "modelo", "modèle", "modell"),
    ("is", "está", "est", "ist"),
    ("ready", "listo", "prêt", "bereit"),
];

fn column(lang: &str) -> Option<usize> {
    match lang {
        "en" => Some(0),
        "es" => Some(1),
        "fr" => Some(2),
        "de" => Some(3),
        _ => None,
    }
}

/// Word-for-word translation through a small lexicon; unknown words and
/// languages pass through unchanged, so the result is never empty.
pub fn translate(text: &str, source: &str, target: &str) -> String {
    let (Some(from), Some(to)) = (column(source), column(target)) else {
        return text.to_owned();
    };
    let pick = |row: &(&'static str, &'static str, &'static str, &'static str), i: usize| match i {
        0 => row.0,
        1 => row.1,
        2 => row.2,
        _ => row.3,
    };
    let words: Vec<String> = text
        .split_whitespace()
        .filter_map(|word| {
            let bare: String = word.chars().filter(|c| c.is_alphabetic()).collect::<String>().to_lowercase();
            match LEXICON.iter().find(|row| pick(row, from) == bare) {
                Some(row) if pick(row, to).is_empty() => None,
                Some(row) => Some(pick(row, to).to_owned()),
                None => Some(word.to_owned()),
            }
        })
        .collect();
    if words.is_empty() { text.to_owned() } else { words.join(" ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_through_the_lexicon() {
        assert_eq!(translate("Hello world", "en", "es"), "hola mundo");
        assert_eq!(translate("Thank you", "en", "fr"), "merci");
        assert_eq!(translate("hola mundo", "es", "de"), "hallo welt");
        assert_eq!(translate("Hello", "en", "xx"), "Hello");
    }

    #[test]
    fn detects_common_languages() {
        let cases = [
            ("The quick brown fox jumps over the lazy dog and keeps running", "en"),
            ("El rápido zorro marrón salta sobre el perro perezoso y sigue corriendo", "es"),
            ("Le renard brun rapide saute par-dessus le chien paresseux", "fr"),
            ("Der schnelle braune Fuchs springt über den faulen Hund", "de"),
        ];
        for (text, want) in cases {
            assert_eq!(detect(text).unwrap().0, want, "{text}");
        }
    }
}
