//! Username rules applied before anyone (guard, authenticator, backend) sees a name.
//!
//! A client-supplied master separator would let a client name the master account itself
//! (`bob%master`), so it is refused here, once, for every protocol.

use std::fmt;

use thiserror::Error;

/// Longest username accepted, in bytes.
pub const MAX_USERNAME_LEN: usize = 256;

/// Why a username was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum IdentityError {
    #[error("empty username")]
    Empty,
    #[error("username longer than {MAX_USERNAME_LEN} bytes")]
    TooLong,
    #[error("username is not valid UTF-8")]
    NotUtf8,
    #[error("username contains a control character")]
    Control,
    #[error("username contains a space, quote or backslash")]
    Forbidden,
    #[error("username contains the master separator")]
    Separator,
}

/// The characters no username may contain because a backend would read them as a master login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRules {
    separators: Vec<char>,
}

impl Default for IdentityRules {
    /// `%` is Stalwart's separator and `*` Dovecot's default; both are refused unless configured
    /// otherwise, so a deployment that switches backends stays safe.
    fn default() -> Self {
        Self {
            separators: vec!['%', '*'],
        }
    }
}

impl IdentityRules {
    /// Rules that refuse `separator` plus the default separators.
    pub fn with_separator(separator: &str) -> Self {
        let mut rules = Self::default();
        for c in separator.chars() {
            if !rules.separators.contains(&c) {
                rules.separators.push(c);
            }
        }
        rules
    }

    /// Checks `raw` and returns it as a `str`.
    ///
    /// # Errors
    /// The first rule `raw` breaks.
    pub fn validate<'a>(&self, raw: &'a [u8]) -> Result<&'a str, IdentityError> {
        if raw.is_empty() {
            return Err(IdentityError::Empty);
        }
        if raw.len() > MAX_USERNAME_LEN {
            return Err(IdentityError::TooLong);
        }
        let s = std::str::from_utf8(raw).map_err(|_| IdentityError::NotUtf8)?;
        for c in s.chars() {
            if c.is_control() {
                return Err(IdentityError::Control);
            }
            if c == ' ' || c == '"' || c == '\\' || c.is_whitespace() {
                return Err(IdentityError::Forbidden);
            }
            if self.separators.contains(&c) {
                return Err(IdentityError::Separator);
            }
        }
        Ok(s)
    }
}

/// A username as given by a client, printable in a log line: control characters, quotes and
/// backslashes are escaped and the length is capped, so a name cannot forge log lines.
pub struct LogName<'a>(pub &'a [u8]);

impl fmt::Display for LogName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = &self.0[..self.0.len().min(MAX_USERNAME_LEN)];
        for chunk in shown.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c.is_control() || c == '"' || c == '\\' {
                    for e in c.escape_default() {
                        fmt::Write::write_char(f, e)?;
                    }
                } else {
                    fmt::Write::write_char(f, c)?;
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        if self.0.len() > shown.len() {
            f.write_str("…")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_ordinary_names() {
        let r = IdentityRules::default();
        assert_eq!(r.validate(b"alice"), Ok("alice"));
        assert_eq!(r.validate(b"alice@example.org"), Ok("alice@example.org"));
        assert_eq!(
            r.validate("jürgen@exämple.de".as_bytes()),
            Ok("jürgen@exämple.de")
        );
    }

    #[test]
    fn refuses_each_class() {
        let r = IdentityRules::default();
        assert_eq!(r.validate(b""), Err(IdentityError::Empty));
        assert_eq!(r.validate(&[b'a'; 257]), Err(IdentityError::TooLong));
        assert!(r.validate(&[b'a'; 256]).is_ok());
        assert_eq!(r.validate(b"\xff"), Err(IdentityError::NotUtf8));
        assert_eq!(r.validate(b"a\x00b"), Err(IdentityError::Control));
        assert_eq!(r.validate(b"a\r\nb"), Err(IdentityError::Control));
        assert_eq!(r.validate(b"a\x7fb"), Err(IdentityError::Control));
        assert_eq!(r.validate(b"a b"), Err(IdentityError::Forbidden));
        assert_eq!(r.validate(b"a\"b"), Err(IdentityError::Forbidden));
        assert_eq!(r.validate(b"a\\b"), Err(IdentityError::Forbidden));
        assert_eq!(r.validate(b"bob%master"), Err(IdentityError::Separator));
        assert_eq!(r.validate(b"bob*master"), Err(IdentityError::Separator));
        assert_eq!(
            r.validate("a\u{2028}b".as_bytes()),
            Err(IdentityError::Forbidden)
        );
    }

    #[test]
    fn configured_separator_is_refused_too() {
        let r = IdentityRules::with_separator("#");
        assert_eq!(r.validate(b"bob#m"), Err(IdentityError::Separator));
        assert_eq!(r.validate(b"bob%m"), Err(IdentityError::Separator));
    }

    #[test]
    fn log_name_escapes() {
        assert_eq!(LogName(b"a\r\nb\"").to_string(), "a\\r\\nb\\\"");
        assert_eq!(LogName(b"\xffx").to_string(), "\\xffx");
    }

    proptest! {
        #[test]
        fn accepted_names_carry_no_dangerous_byte(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let r = IdentityRules::default();
            if let Ok(s) = r.validate(&raw) {
                prop_assert!(!s.is_empty() && s.len() <= MAX_USERNAME_LEN);
                prop_assert!(!s.bytes().any(|b| b < 0x20 || b == 0x7f || b == b' ' || b == b'%' || b == b'*' || b == b'"' || b == b'\\'));
            }
        }

        #[test]
        fn log_name_has_no_line_breaks(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let s = LogName(&raw).to_string();
            prop_assert!(!s.contains('\n') && !s.contains('\r'));
        }
    }
}
