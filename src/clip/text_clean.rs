//! Text cleaning before CLIP's BPE, as open_clip's `_clean_lower` does it:
//! `ftfy.fix_text` → `html.unescape` twice → strip → collapse whitespace → lower-case.
//!
//! ftfy is reproduced for what it changes in ordinary text: NFC normalisation, curly quotes,
//! Latin ligatures, full/half-width forms, C1 controls (read as Windows-1252), line breaks,
//! terminal escapes, invisible control characters and HTML entities (numeric references and
//! the common named ones). Its mojibake repair (re-decoding text that was mis-decoded as
//! Latin-1/Windows-1252) is not reproduced: such text is tokenized as it is.
use unicode_normalization::UnicodeNormalization;

/// open_clip's `_clean_lower`.
pub fn clean_lower(text: &str) -> String {
    let t = fix_text(text);
    let t = html_unescape(&html_unescape(&t));
    whitespace_clean(t.trim()).to_lowercase()
}

/// Python's `" ".join(text.split())`: str.isspace also counts U+001C..U+001F.
pub fn whitespace_clean(text: &str) -> String {
    text.split(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// ftfy.fix_text (default config) minus mojibake repair; per line, as ftfy segments it.
pub fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    for seg in text.split_inclusive('\n') {
        if seg.contains('<') {
            // ftfy's "auto" mode: text that may be HTML keeps its entities, from here on.
            unescape = false;
        }
        let mut cur = seg.to_string();
        for _ in 0..16 {
            let next = fix_segment(&cur, unescape);
            if next == cur {
                break;
            }
            cur = next;
        }
        out.push_str(&cur);
    }
    out
}

fn fix_segment(s: &str, unescape: bool) -> String {
    let s = if unescape {
        ftfy_unescape(s)
    } else {
        s.to_string()
    };
    let s: String = s.chars().map(c1_control).collect();
    let mut t = String::with_capacity(s.len());
    for c in s.chars() {
        match ligature(c) {
            Some(r) => t.push_str(r),
            None => match c as u32 {
                0x3000 => t.push(' '),
                0xFF01..=0xFFEF => t.extend(std::iter::once(c).nfkc()),
                0x02BC | 0x2018..=0x201B => t.push('\''),
                0x201C..=0x201F => t.push('"'),
                _ => t.push(c),
            },
        }
    }
    let t = t
        .replace("\r\n", "\n")
        .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n");
    let t = remove_terminal_escapes(&t);
    let t: String = t.chars().filter(|c| !is_control(*c)).collect();
    t.nfc().collect()
}

fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}

/// U+0080..U+009F decoded as "sloppy" Windows-1252 (undefined bytes stay as they are).
fn c1_control(c: char) -> char {
    const CP1252: [u32; 32] = [
        0x20AC, 0x81, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
        0x2039, 0x0152, 0x8D, 0x017D, 0x8F, 0x90, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013,
        0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x9D, 0x017E, 0x0178,
    ];
    match c as u32 {
        v @ 0x80..=0x9F => char::from_u32(CP1252[(v - 0x80) as usize]).unwrap_or(c),
        _ => c,
    }
}

fn is_control(c: char) -> bool {
    matches!(c as u32, 0x00..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0x206A..=0x206F | 0xFEFF | 0xFFF9..=0xFFFC)
}

/// Removes ANSI sequences `ESC [ (digits|;)* letter`.
fn remove_terminal_escapes(s: &str) -> String {
    let b: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == '\u{1b}' && b.get(i + 1) == Some(&'[') {
            let mut j = i + 2;
            while j < b.len() && (b[j].is_ascii_digit() || b[j] == ';') {
                j += 1;
            }
            if j < b.len() && b[j].is_ascii_alphabetic() {
                i = j + 1;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn named_entity(name: &str) -> Option<&'static str> {
    Some(match name {
        "amp" => "&",
        "lt" => "<",
        "gt" => ">",
        "quot" => "\"",
        "apos" => "'",
        "nbsp" => "\u{a0}",
        "copy" => "©",
        "reg" => "®",
        "trade" => "™",
        "hellip" => "…",
        "mdash" => "—",
        "ndash" => "–",
        "lsquo" => "‘",
        "rsquo" => "’",
        "ldquo" => "“",
        "rdquo" => "”",
        "laquo" => "«",
        "raquo" => "»",
        "euro" => "€",
        "pound" => "£",
        "yen" => "¥",
        "cent" => "¢",
        "deg" => "°",
        "times" => "×",
        "divide" => "÷",
        "middot" => "·",
        "bull" => "•",
        "eacute" => "é",
        "egrave" => "è",
        "ecirc" => "ê",
        "aacute" => "á",
        "agrave" => "à",
        "acirc" => "â",
        "iacute" => "í",
        "oacute" => "ó",
        "uacute" => "ú",
        "auml" => "ä",
        "ouml" => "ö",
        "uuml" => "ü",
        "Auml" => "Ä",
        "Ouml" => "Ö",
        "Uuml" => "Ü",
        "Eacute" => "É",
        "szlig" => "ß",
        "ntilde" => "ñ",
        "ccedil" => "ç",
        "para" => "¶",
        "sect" => "§",
        _ => return None,
    })
}

/// Numeric character references as Python's html.unescape decodes them.
fn numeric_ref(body: &str) -> Option<char> {
    let v = if let Some(hex) = body.strip_prefix('x').or_else(|| body.strip_prefix('X')) {
        u32::from_str_radix(hex, 16).ok()?
    } else {
        body.parse::<u32>().ok()?
    };
    Some(match v {
        0 | 0xD800..=0xDFFF => '\u{fffd}',
        0x80..=0x9F => c1_control(char::from_u32(v)?),
        v if v > 0x10FFFF => '\u{fffd}',
        v => char::from_u32(v)?,
    })
}

/// Decodes `&name;` (the names above) and `&#N;` / `&#xH;` references.
fn unescape_with(s: &str, named: impl Fn(&str) -> Option<&'static str>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(p) = rest.find('&') {
        out.push_str(&rest[..p]);
        let tail = &rest[p + 1..];
        let end = tail.find(';').filter(|e| *e > 0 && *e <= 32);
        let decoded = end.and_then(|e| {
            let body = &tail[..e];
            match body.strip_prefix('#') {
                Some(num) => numeric_ref(num).map(String::from),
                None => named(body).map(String::from),
            }
            .map(|d| (d, e))
        });
        match decoded {
            Some((d, e)) => {
                out.push_str(&d);
                rest = &tail[e + 1..];
            }
            None => {
                out.push('&');
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Python's `html.unescape` (for the supported entities).
pub fn html_unescape(s: &str) -> String {
    unescape_with(s, named_entity)
}

/// ftfy's `unescape_html`: like html.unescape, also accepting all-caps names (`&EACUTE;`).
fn ftfy_unescape(s: &str) -> String {
    unescape_with(s, |n| {
        named_entity(n).or_else(|| {
            if n.len() > 1 && n.chars().all(|c| c.is_ascii_uppercase()) {
                let lower = n.to_ascii_lowercase();
                let mut cap = lower.clone();
                cap[..1].make_ascii_uppercase();
                named_entity(&cap).or_else(|| {
                    named_entity(&lower).map(|v| {
                        if v.chars().all(char::is_alphabetic) {
                            upper_static(v)
                        } else {
                            v
                        }
                    })
                })
            } else {
                None
            }
        })
    })
}

/// Upper-case forms of the accented letters above (all-caps entity names mean capitals).
fn upper_static(v: &'static str) -> &'static str {
    match v {
        "é" => "É",
        "è" => "È",
        "ê" => "Ê",
        "á" => "Á",
        "à" => "À",
        "â" => "Â",
        "í" => "Í",
        "ó" => "Ó",
        "ú" => "Ú",
        "ä" => "Ä",
        "ö" => "Ö",
        "ü" => "Ü",
        "ñ" => "Ñ",
        "ç" => "Ç",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_like_open_clip() {
        assert_eq!(clean_lower("  A  Photo\tof\n a FACE "), "a photo of a face");
        assert_eq!(clean_lower("“Curly” ‘quotes’"), "\"curly\" 'quotes'");
        assert_eq!(clean_lower("ﬁne ＦＵＬＬ　width"), "fine full width");
        assert_eq!(clean_lower("caf\u{65}\u{301}"), "café");
        assert_eq!(
            clean_lower("Tom &amp;amp; Jerry &#233; &#x41;"),
            "tom & jerry é a"
        );
        assert_eq!(clean_lower("a <b> &amp; c"), "a <b> & c");
        assert_eq!(clean_lower("\u{1b}[31mred\u{1b}[0m \u{feff}x"), "red x");
    }
}
