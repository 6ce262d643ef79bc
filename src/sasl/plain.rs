//! RFC 4616 PLAIN: `[authzid] NUL authcid NUL passwd`.

use super::SaslError;
use crate::identity::IdentityRules;
use crate::secret::Secret;

/// Splits a PLAIN payload into a validated username and the password.
///
/// Exactly two NULs; an authorization identity is accepted only when it is empty or equal to the
/// authentication identity (anything else asks to act as someone else, which only the master may).
///
/// # Errors
/// [`SaslError::Malformed`], [`SaslError::AuthzidMismatch`], [`SaslError::EmptyPassword`] or an
/// identity error for the username.
pub fn parse_plain(data: &[u8], rules: &IdentityRules) -> Result<(String, Secret), SaslError> {
    let mut parts = data.splitn(3, |&b| b == 0);
    let (Some(authzid), Some(authcid), Some(passwd)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed("PLAIN"));
    };
    if passwd.contains(&0) {
        return Err(SaslError::Malformed("PLAIN"));
    }
    let username = rules.validate(authcid)?;
    if !authzid.is_empty() && authzid != authcid {
        return Err(SaslError::AuthzidMismatch);
    }
    if passwd.is_empty() {
        return Err(SaslError::EmptyPassword);
    }
    Ok((username.to_owned(), Secret::new(passwd.to_vec())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityError;
    use proptest::prelude::*;

    fn r() -> IdentityRules {
        IdentityRules::default()
    }

    #[test]
    fn table() {
        assert_eq!(parse_plain(b"\0alice\0pw", &r()).unwrap().0, "alice");
        assert_eq!(parse_plain(b"alice\0alice\0pw", &r()).unwrap().0, "alice");
        assert_eq!(
            parse_plain(b"bob\0alice\0pw", &r()).unwrap_err(),
            SaslError::AuthzidMismatch
        );
        assert_eq!(
            parse_plain(b"\0alice\0", &r()).unwrap_err(),
            SaslError::EmptyPassword
        );
        assert_eq!(
            parse_plain(b"\0\0pw", &r()).unwrap_err(),
            SaslError::Identity(IdentityError::Empty)
        );
        assert_eq!(
            parse_plain(b"\0alice", &r()).unwrap_err(),
            SaslError::Malformed("PLAIN")
        );
        assert_eq!(
            parse_plain(b"alice", &r()).unwrap_err(),
            SaslError::Malformed("PLAIN")
        );
        assert_eq!(
            parse_plain(b"\0a\0b\0c", &r()).unwrap_err(),
            SaslError::Malformed("PLAIN")
        );
        assert_eq!(
            parse_plain(b"\0bob%master\0pw", &r()).unwrap_err(),
            SaslError::Identity(IdentityError::Separator)
        );
    }

    proptest! {
        #[test]
        fn round_trip(user in "[a-z0-9.@-]{1,64}", pw in proptest::collection::vec(1u8..=255, 1..100)) {
            let mut payload = vec![0];
            payload.extend_from_slice(user.as_bytes());
            payload.push(0);
            payload.extend_from_slice(&pw);
            let (u, s) = parse_plain(&payload, &r()).unwrap();
            prop_assert_eq!(u, user);
            prop_assert!(s.ct_eq(&pw));
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_plain(&data, &r());
        }
    }
}
