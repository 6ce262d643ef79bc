//! The `file` authenticator, the embedded default: users and password hashes in a TOML file, so
//! that Portcullis runs on a fresh machine with no other service.
//!
//! ```toml
//! [[user]]
//! account = "alice@example.org"     # canonical account: what the backend login uses
//! logins = ["alice"]                # other names that log in as this account (optional)
//! password = "$argon2id$v=19$..."   # argon2 PHC, bcrypt ($2a$/$2b$/$2y$) or SHA-512-crypt ($6$)
//! app_passwords = ["$argon2id$..."] # optional, any of the same kinds
//! disabled = false                  # optional
//! ```
//!
//! Everything that can be checked is checked at load time (unknown keys, names, duplicates, hash
//! formats), so a typo fails `check-config` or a SIGHUP reload instead of a login. Verification is
//! CPU-bound and runs on the blocking pool; an unknown user or a disabled account still costs one
//! hash of the same kind, so timing does not tell whether a name exists.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use serde::Deserialize;
use thiserror::Error;
use tokio::sync::Semaphore;

use super::{AuthRequest, Authenticator, Verdict, VerdictFuture};
use crate::identity::{IdentityRules, LogName};

/// Longest password verified. bcrypt only reads 72 bytes and SHA-512-crypt costs grow with the
/// square of the length, so a bound keeps one login from costing more than a few hashes.
pub const MAX_PASSWORD_LEN: usize = 1024;

/// Argon2 memory cost accepted at most (KiB): 1 GiB; larger is surely a typo that would make
/// every login exhaust memory.
const MAX_ARGON2_M_COST: u32 = 1024 * 1024;
/// Argon2 passes accepted at most.
const MAX_ARGON2_T_COST: u32 = 64;

/// The verdict every failure gets, whatever the cause, so that the cause cannot leak.
const INVALID: &str = "invalid credentials";

/// A users-file problem, naming the file and, where it applies, the user and key.
#[derive(Debug, Error)]
pub enum FileAuthError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: user[{index}].{key}: {message}")]
    Invalid {
        path: PathBuf,
        index: usize,
        key: String,
        message: String,
    },
    #[error("{path}: name {name:?} is used by user[{first}] and user[{second}]")]
    Duplicate {
        path: PathBuf,
        name: String,
        first: usize,
        second: usize,
    },
    #[error("cannot hash password: {0}")]
    Hash(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default, rename = "user")]
    users: Vec<UserEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    account: String,
    #[serde(default)]
    logins: Vec<String>,
    password: String,
    #[serde(default)]
    app_passwords: Vec<String>,
    #[serde(default)]
    disabled: bool,
}

/// One stored password hash, parsed and checked at load time.
#[derive(Clone)]
enum StoredHash {
    Argon2(Box<PasswordHash>),
    Bcrypt(String),
    Sha512Crypt(String),
}

impl fmt::Debug for StoredHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Argon2(_) => "Argon2(<redacted>)",
            Self::Bcrypt(_) => "Bcrypt(<redacted>)",
            Self::Sha512Crypt(_) => "Sha512Crypt(<redacted>)",
        })
    }
}

impl StoredHash {
    /// Recognises and validates a hash string; the message never quotes the hash.
    fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with("$argon2") {
            let hash = PasswordHash::new(s).map_err(|e| format!("invalid argon2 hash: {e}"))?;
            argon2::Algorithm::try_from(hash.algorithm.as_str())
                .map_err(|_| "unknown argon2 variant".to_owned())?;
            if let Some(v) = hash.version {
                argon2::Version::try_from(v)
                    .map_err(|_| "unsupported argon2 version".to_owned())?;
            }
            let params = argon2::Params::try_from(&hash)
                .map_err(|e| format!("invalid argon2 parameters: {e}"))?;
            if params.m_cost() > MAX_ARGON2_M_COST || params.t_cost() > MAX_ARGON2_T_COST {
                return Err(format!(
                    "argon2 cost too high (at most m={MAX_ARGON2_M_COST}, t={MAX_ARGON2_T_COST})"
                ));
            }
            if hash.salt.is_none() || hash.hash.is_none() {
                return Err("argon2 hash without salt or output".into());
            }
            Ok(Self::Argon2(Box::new(hash)))
        } else if ["$2a$", "$2b$", "$2y$"].iter().any(|p| s.starts_with(p)) {
            let parts =
                bcrypt::HashParts::from_str(s).map_err(|_| "invalid bcrypt hash".to_owned())?;
            // The library only checks the cost when hashing: outside 4..=31 every login would fail.
            if !(4..=31).contains(&parts.get_cost()) {
                return Err("bcrypt cost must be 4 to 31".into());
            }
            Ok(Self::Bcrypt(s.to_owned()))
        } else if let Some(rest) = s.strip_prefix("$6$") {
            validate_sha512_crypt(rest)?;
            Ok(Self::Sha512Crypt(s.to_owned()))
        } else {
            Err("unrecognised hash format (expected $argon2id$, $2b$/$2y$/$2a$ or $6$)".into())
        }
    }

    /// Whether `password` matches. Each library compares the digests in constant time.
    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Self::Argon2(hash) => Argon2::default().verify_password(password, &**hash).is_ok(),
            Self::Bcrypt(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            Self::Sha512Crypt(hash) => sha_crypt::ShaCrypt::default()
                .verify_password(password, hash.as_str())
                .is_ok(),
        }
    }

    /// A hash of a random password with the same kind and cost, so that checking it takes as
    /// long as checking a real one.
    fn dummy_like(&self) -> Result<Self, String> {
        let random: [u8; 16] = rand::random();
        let password = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, random);
        match self {
            Self::Argon2(hash) => {
                let params = argon2::Params::try_from(&**hash).map_err(|e| e.to_string())?;
                let algorithm = argon2::Algorithm::try_from(hash.algorithm.as_str())
                    .map_err(|e| e.to_string())?;
                let version = hash
                    .version
                    .map(argon2::Version::try_from)
                    .transpose()
                    .map_err(|e| e.to_string())?
                    .unwrap_or_default();
                let hash = Argon2::new(algorithm, version, params)
                    .hash_password(password.as_bytes())
                    .map_err(|e| e.to_string())?;
                Ok(Self::Argon2(Box::new(hash)))
            }
            Self::Bcrypt(hash) => {
                let cost = bcrypt::HashParts::from_str(hash)
                    .map_err(|e| e.to_string())?
                    .get_cost();
                Ok(Self::Bcrypt(
                    bcrypt::hash(password, cost).map_err(|e| e.to_string())?,
                ))
            }
            // Same rounds, different salt: verifying costs the same whatever the salt.
            Self::Sha512Crypt(hash) => {
                let rounds_field = hash
                    .strip_prefix("$6$")
                    .and_then(|r| r.split('$').next())
                    .filter(|f| f.starts_with("rounds="));
                let rounds = rounds_field.map_or(Ok(sha_crypt::Params::default()), |f| {
                    sha_crypt::Params::from_str(f).map_err(|e| e.to_string())
                })?;
                let salt: [u8; 12] = rand::random();
                let digest = sha_crypt::ShaCrypt::new(sha_crypt::Algorithm::Sha512Crypt, rounds)
                    .hash_password_with_salt(password.as_bytes(), &salt)
                    .map_err(|e| e.to_string())?;
                Ok(Self::Sha512Crypt(digest.to_string()))
            }
        }
    }
}

/// `$6$[rounds=N$]salt$digest`, with the limits glibc writes and sha-crypt reads.
fn validate_sha512_crypt(rest: &str) -> Result<(), String> {
    const CRYPT64: &[u8] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let fields: Vec<&str> = rest.split('$').collect();
    let (salt, digest) = match fields.as_slice() {
        [rounds, salt, digest] => {
            let n = rounds
                .strip_prefix("rounds=")
                .and_then(|n| n.parse::<u32>().ok())
                .ok_or("invalid SHA-512-crypt rounds field")?;
            if !(sha_crypt::Params::ROUNDS_MIN..=sha_crypt::Params::ROUNDS_MAX).contains(&n) {
                return Err("SHA-512-crypt rounds must be 1000 to 999999999".into());
            }
            (*salt, *digest)
        }
        [salt, digest] => (*salt, *digest),
        _ => return Err("invalid SHA-512-crypt hash".into()),
    };
    // glibc writes at most 16 salt characters and reads only the first 16; RustCrypto's
    // sha-crypt writes longer ones (and also reads 16), so both forms are accepted.
    if salt.len() > 64 || salt.bytes().any(|b| b == b':' || b.is_ascii_control()) {
        return Err("invalid SHA-512-crypt salt".into());
    }
    if digest.len() != 86 || !digest.bytes().all(|b| CRYPT64.contains(&b)) {
        return Err("invalid SHA-512-crypt digest".into());
    }
    sha_crypt::PasswordHashRef::new(&format!("$6${rest}"))
        .map(|_| ())
        .map_err(|_| "invalid SHA-512-crypt hash".into())
}

#[derive(Debug)]
struct User {
    account: String,
    hashes: Vec<StoredHash>,
    disabled: bool,
}

/// The loaded file: names (ASCII-lower-cased) to users, and the hash checked for unknown names.
#[derive(Debug)]
struct Table {
    by_name: HashMap<String, Arc<User>>,
    dummy: StoredHash,
}

/// Why a check failed, for the debug log only; the verdict is always [`INVALID`].
#[derive(Debug, Clone, Copy)]
enum Failure {
    UnknownUser,
    Disabled,
    WrongPassword,
    Unacceptable,
}

impl Failure {
    fn label(self) -> &'static str {
        match self {
            Self::UnknownUser => "unknown user",
            Self::Disabled => "account disabled",
            Self::WrongPassword => "wrong password",
            Self::Unacceptable => "password empty or too long",
        }
    }
}

/// The `file` authenticator.
pub struct FileAuth {
    path: PathBuf,
    table: ArcSwap<Table>,
    /// Hashes in flight at once: hashing is CPU-bound, so more than the cores only queues work
    /// on the blocking pool (and after a deadline the work would still run to its end).
    hashing: Arc<Semaphore>,
}

impl fmt::Debug for FileAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileAuth")
            .field("path", &self.path)
            .field("users", &self.table.load().by_name.len())
            .finish_non_exhaustive()
    }
}

impl FileAuth {
    /// Loads and checks the users file.
    ///
    /// # Errors
    /// [`FileAuthError`] naming the file, and the user index and key where it applies.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, FileAuthError> {
        let path = path.as_ref().to_owned();
        let table = load_table(&path)?;
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Ok(Self {
            path,
            table: ArcSwap::from_pointee(table),
            hashing: Arc::new(Semaphore::new(cores)),
        })
    }

    /// Re-reads the file and swaps the table in atomically (SIGHUP). On error the previous table
    /// stays in force.
    ///
    /// # Errors
    /// As [`FileAuth::load`].
    pub fn reload(&self) -> Result<(), FileAuthError> {
        let table = load_table(&self.path)?;
        let users = table.by_name.len();
        self.table.store(Arc::new(table));
        tracing::info!(path = %self.path.display(), names = users, "users file reloaded");
        Ok(())
    }

    /// The users file this authenticator reads (for logs and reload messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn decide(&self, req: &AuthRequest) -> Verdict {
        let table = self.table.load_full();
        let user = table
            .by_name
            .get(&req.username.to_ascii_lowercase())
            .cloned();
        let Ok(permit) = self.hashing.clone().acquire_owned().await else {
            return Verdict::temp("password hashing closed");
        };
        let secret = req.secret.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            check(user.as_deref(), &table.dummy, secret.expose())
        })
        .await;
        match outcome {
            Ok(Ok(account)) => Verdict::Accept { account },
            Ok(Err(failure)) => {
                tracing::debug!(
                    username = %LogName(req.username.as_bytes()),
                    cause = failure.label(),
                    "users file refused the login"
                );
                Verdict::reject(INVALID)
            }
            Err(_) => Verdict::temp("password verification task failed"),
        }
    }
}

/// The whole decision, on the blocking pool. An unknown or disabled name costs one hash of the
/// file's first kind and cost, like a wrong password for a user with one password; a user with
/// app passwords costs one hash per stored password (the guard's uniform failure delay hides the
/// difference). An empty or oversized password is refused before any hashing, whoever asks.
fn check(user: Option<&User>, dummy: &StoredHash, password: &[u8]) -> Result<String, Failure> {
    if password.is_empty() || password.len() > MAX_PASSWORD_LEN {
        return Err(Failure::Unacceptable);
    }
    match user {
        None => {
            std::hint::black_box(dummy.verify(password));
            Err(Failure::UnknownUser)
        }
        Some(u) if u.disabled => {
            // Never check a disabled account's real hashes: no oracle for its password.
            std::hint::black_box(dummy.verify(password));
            Err(Failure::Disabled)
        }
        Some(u) => {
            if u.hashes.iter().any(|h| h.verify(password)) {
                Ok(u.account.clone())
            } else {
                Err(Failure::WrongPassword)
            }
        }
    }
}

impl Authenticator for FileAuth {
    fn verify<'a>(&'a self, req: &'a AuthRequest) -> VerdictFuture<'a> {
        Box::pin(self.decide(req))
    }

    fn kind(&self) -> &'static str {
        "file"
    }

    fn reload(&self) -> Result<(), super::ReloadError> {
        FileAuth::reload(self).map_err(Into::into)
    }
}

fn load_table(path: &Path) -> Result<Table, FileAuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileAuthError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_table(path, &text)
}

fn parse_table(path: &Path, text: &str) -> Result<Table, FileAuthError> {
    // toml's own message quotes the offending line, which may be a password hash: report the
    // position and the message only.
    let file: UsersFile = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
        FileAuthError::Parse {
            path: path.to_owned(),
            message: match line {
                Some(l) => format!("line {l}: {}", e.message()),
                None => e.message().to_owned(),
            },
        }
    })?;
    let rules = IdentityRules::default();
    let invalid = |index: usize, key: &str, message: String| FileAuthError::Invalid {
        path: path.to_owned(),
        index,
        key: key.to_owned(),
        message,
    };
    let mut by_name: HashMap<String, (usize, Arc<User>)> = HashMap::new();
    let mut first_hash: Option<StoredHash> = None;
    for (index, entry) in file.users.into_iter().enumerate() {
        rules
            .validate(entry.account.as_bytes())
            .map_err(|e| invalid(index, "account", e.to_string()))?;
        for (i, login) in entry.logins.iter().enumerate() {
            rules
                .validate(login.as_bytes())
                .map_err(|e| invalid(index, &format!("logins[{i}]"), e.to_string()))?;
        }
        let mut hashes =
            vec![StoredHash::parse(&entry.password).map_err(|m| invalid(index, "password", m))?];
        for (i, h) in entry.app_passwords.iter().enumerate() {
            hashes.push(
                StoredHash::parse(h)
                    .map_err(|m| invalid(index, &format!("app_passwords[{i}]"), m))?,
            );
        }
        if first_hash.is_none() {
            first_hash = Some(hashes[0].clone());
        }
        let user = Arc::new(User {
            account: entry.account.clone(),
            hashes,
            disabled: entry.disabled,
        });
        for name in std::iter::once(&entry.account).chain(&entry.logins) {
            let key = name.to_ascii_lowercase();
            if let Some((first, _)) = by_name.get(&key) {
                return Err(FileAuthError::Duplicate {
                    path: path.to_owned(),
                    name: name.clone(),
                    first: *first,
                    second: index,
                });
            }
            by_name.insert(key, (index, user.clone()));
        }
    }
    let dummy = match first_hash {
        Some(h) => h.dummy_like(),
        None => hash_password(b"no users")
            .map_err(|e| e.to_string())
            .and_then(|s| StoredHash::parse(&s)),
    }
    .map_err(FileAuthError::Hash)?;
    Ok(Table {
        by_name: by_name.into_iter().map(|(k, (_, u))| (k, u)).collect(),
        dummy,
    })
}

/// Hashes `password` as an argon2id PHC string with the library's default (OWASP) parameters,
/// for `portcullis hash-password`.
///
/// # Errors
/// [`FileAuthError::Hash`] if the system RNG or the hash fails.
pub fn hash_password(password: &[u8]) -> Result<String, FileAuthError> {
    Argon2::default()
        .hash_password(password)
        .map(|h| h.to_string())
        .map_err(|e| FileAuthError::Hash(e.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::sasl::Mechanism;
    use crate::secret::Secret;
    use crate::Protocol;
    use std::io::Write as _;

    fn request(user: &str, password: &[u8]) -> AuthRequest {
        AuthRequest {
            protocol: Protocol::Imap,
            mechanism: Mechanism::Plain,
            username: user.into(),
            secret: Secret::new(password.to_vec()),
            client: "127.0.0.1:5000".parse().unwrap(),
            local: "127.0.0.1:993".parse().unwrap(),
            tls: None,
            attempt: 1,
            session_id: "s1".into(),
            client_id: None,
        }
    }

    /// Cheap argon2id hashes, so the tests stay fast.
    fn argon(password: &str) -> String {
        let params = argon2::Params::new(8, 1, 1, None).unwrap();
        Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(password.as_bytes())
            .unwrap()
            .to_string()
    }

    fn sha512(password: &str) -> String {
        sha_crypt::ShaCrypt::new(
            sha_crypt::Algorithm::Sha512Crypt,
            sha_crypt::Params::new(1000).unwrap(),
        )
        .hash_password_with_salt(password.as_bytes(), b"saltsalt")
        .unwrap()
        .to_string()
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn users() -> String {
        format!(
            r#"
[[user]]
account = "alice@example.org"
logins = ["alice", "Ally"]
password = "{}"
app_passwords = ["{}", "{}"]

[[user]]
account = "bob@example.org"
password = "{}"

[[user]]
account = "carol@example.org"
password = "{}"
disabled = true
"#,
            argon("alice-pw"),
            bcrypt::hash("alice-app-bcrypt", 4).unwrap(),
            sha512("alice-app-sha"),
            sha512("bob-pw"),
            argon("carol-pw"),
        )
    }

    async fn verdict(auth: &FileAuth, user: &str, pw: &str) -> Verdict {
        auth.verify(&request(user, pw.as_bytes())).await
    }

    fn accept(account: &str) -> Verdict {
        Verdict::Accept {
            account: account.into(),
        }
    }

    #[tokio::test]
    async fn each_hash_kind_and_name_form() {
        let f = write(&users());
        let auth = FileAuth::load(f.path()).unwrap();
        assert_eq!(
            verdict(&auth, "alice", "alice-pw").await,
            accept("alice@example.org")
        );
        assert_eq!(
            verdict(&auth, "ALICE", "alice-pw").await,
            accept("alice@example.org")
        );
        assert_eq!(
            verdict(&auth, "ally", "alice-pw").await,
            accept("alice@example.org")
        );
        assert_eq!(
            verdict(&auth, "Alice@Example.ORG", "alice-pw").await,
            accept("alice@example.org")
        );
        assert_eq!(
            verdict(&auth, "alice", "alice-app-bcrypt").await,
            accept("alice@example.org")
        );
        assert_eq!(
            verdict(&auth, "alice", "alice-app-sha").await,
            accept("alice@example.org")
        );
        assert_eq!(
            verdict(&auth, "bob@example.org", "bob-pw").await,
            accept("bob@example.org")
        );
    }

    #[tokio::test]
    async fn every_failure_looks_the_same() {
        let f = write(&users());
        let auth = FileAuth::load(f.path()).unwrap();
        let invalid = Verdict::reject(INVALID);
        assert_eq!(verdict(&auth, "alice", "wrong").await, invalid);
        assert_eq!(
            verdict(&auth, "bob", "bob-pw").await,
            invalid,
            "bob has no login 'bob'"
        );
        assert_eq!(verdict(&auth, "mallory", "alice-pw").await, invalid);
        assert_eq!(
            verdict(&auth, "carol@example.org", "carol-pw").await,
            invalid
        );
        assert_eq!(verdict(&auth, "alice", "").await, invalid);
        let long = "x".repeat(MAX_PASSWORD_LEN + 1);
        assert_eq!(verdict(&auth, "alice", &long).await, invalid);
        // Case-insensitivity is ASCII only.
        assert_eq!(verdict(&auth, "ALİCE", "alice-pw").await, invalid);
    }

    #[test]
    fn known_vectors_verify() {
        // Vectors from Drepper's SHA-crypt specification (the salt of the second is truncated
        // to 16 characters, as glibc writes it).
        for vector in [
            "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1",
            "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
        ] {
            let h = StoredHash::parse(vector).unwrap();
            assert!(h.verify(b"Hello world!"), "{vector}");
            assert!(!h.verify(b"Hello world"), "{vector}");
        }
        // Openwall's bcrypt vector, in each accepted prefix.
        for prefix in ["$2a$", "$2b$", "$2y$"] {
            let vector =
                format!("{prefix}05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW");
            let h = StoredHash::parse(&vector).unwrap();
            assert!(h.verify(b"U*U"), "{vector}");
            assert!(!h.verify(b"U*V"), "{vector}");
        }
    }

    #[test]
    fn bad_files_are_refused_with_their_place() {
        let ok = argon("x");
        for (text, want) in [
            (format!("[[user]]\naccount = \"a\"\npassword = \"{ok}\"\ncolour = 1\n"), "colour"),
            ("[[user]]\naccount = \"a\"\npassword = \"plaintext\"\n".to_string(), "user[0].password: unrecognised"),
            ("[[user]]\naccount = \"a\"\npassword = \"$1$abc$def\"\n".to_string(), "user[0].password"),
            (format!("[[user]]\naccount = \"a\"\npassword = \"{ok}\"\napp_passwords = [\"$6$x$y\"]\n"), "user[0].app_passwords[0]"),
            (format!("[[user]]\naccount = \"a\"\npassword = \"{ok}\"\napp_passwords = [\"$2b$99$L6Bc/AlTQHyd9liGgGEZyOFLPHNgyxeEPfgYfBCVxJ7JIlwxyVU3u\"]\n"), "bcrypt cost"),
            (format!("[[user]]\naccount = \"bob%master\"\npassword = \"{ok}\"\n"), "user[0].account"),
            (format!("[[user]]\naccount = \"a\"\nlogins = [\"ok\", \"b c\"]\npassword = \"{ok}\"\n"), "user[0].logins[1]"),
            (format!("[[user]]\naccount = \"a\"\npassword = \"{ok}\"\n[[user]]\naccount = \"b\"\nlogins = [\"A\"]\npassword = \"{ok}\"\n"), "is used by user[0] and user[1]"),
            (format!("[[user]]\naccount = \"a\"\nlogins = [\"a\"]\npassword = \"{ok}\"\n"), "is used by user[0] and user[0]"),
            ("[[user]]\naccount = \"a\"\npassword = \"$argon2id$v=19$m=4194304,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\"\n".to_string(), "cost too high"),
            ("[[user]]\naccount = \"a\"\n".to_string(), "password"),
        ] {
            let f = write(&text);
            let e = FileAuth::load(f.path()).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(e.contains(&f.path().display().to_string()), "{e}");
            assert!(!e.contains("$argon2id$v=19$m=8"), "hash in error message: {e}");
        }
        let e = FileAuth::load("/nonexistent/users.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/users.toml"), "{e}");
    }

    #[test]
    fn parse_error_does_not_quote_the_hash_line() {
        let text = format!(
            "[[user]]\naccount = \"a\"\npassword = \"{}\" junk\n",
            argon("x")
        );
        let e = FileAuth::load(write(&text).path()).unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
        assert!(!e.contains("$argon2id"), "{e}");
    }

    #[tokio::test]
    async fn reload_swaps_the_table_and_keeps_it_on_error() {
        let f = write(&users());
        let auth = FileAuth::load(f.path()).unwrap();
        assert_eq!(
            verdict(&auth, "dave", "dave-pw").await,
            Verdict::reject(INVALID)
        );
        std::fs::write(
            f.path(),
            format!("[[user]]\naccount = \"dave@example.org\"\nlogins = [\"dave\"]\npassword = \"{}\"\n", argon("dave-pw")),
        )
        .unwrap();
        auth.reload().unwrap();
        assert_eq!(
            verdict(&auth, "dave", "dave-pw").await,
            accept("dave@example.org")
        );
        assert_eq!(
            verdict(&auth, "alice", "alice-pw").await,
            Verdict::reject(INVALID)
        );
        std::fs::write(f.path(), "[[user]]\naccount = \"x\"\npassword = \"nope\"\n").unwrap();
        assert!(auth.reload().is_err());
        assert_eq!(
            verdict(&auth, "dave", "dave-pw").await,
            accept("dave@example.org")
        );
    }

    #[test]
    fn dummy_matches_the_first_hash_kind() {
        let f = write(&users());
        let auth = FileAuth::load(f.path()).unwrap();
        let table = auth.table.load();
        let StoredHash::Argon2(h) = &table.dummy else {
            panic!("{:?}", table.dummy)
        };
        assert_eq!(argon2::Params::try_from(&**h).unwrap().m_cost(), 8);
        for kind in [bcrypt::hash("x", 4).unwrap(), sha512("x")] {
            let stored = StoredHash::parse(&kind).unwrap();
            let dummy = stored.dummy_like().unwrap();
            assert_eq!(
                std::mem::discriminant(&dummy),
                std::mem::discriminant(&stored)
            );
            assert!(!dummy.verify(b"x"));
        }
        let empty = write("");
        assert!(matches!(
            FileAuth::load(empty.path()).unwrap().table.load().dummy,
            StoredHash::Argon2(_)
        ));
    }

    #[test]
    fn hash_password_round_trips() {
        let s = hash_password(b"correct horse").unwrap();
        assert!(s.starts_with("$argon2id$v=19$"), "{s}");
        let h = StoredHash::parse(&s).unwrap();
        assert!(h.verify(b"correct horse"));
        assert!(!h.verify(b"correct horsf"));
    }

    #[test]
    fn debug_output_has_no_hashes() {
        let f = write(&users());
        let auth = FileAuth::load(f.path()).unwrap();
        let table = auth.table.load();
        let shown = format!("{auth:?} {:?}", table);
        assert!(
            !shown.contains("$argon2") && !shown.contains("$2b$") && !shown.contains("$6$"),
            "{shown}"
        );
    }

    #[test]
    fn shipped_demo_users_load() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/users.toml");
        let auth = FileAuth::load(&path).unwrap();
        let t = auth.table.load();
        assert!(t.by_name.contains_key("alice") && t.by_name.contains_key("bob"));
        let alice = &t.by_name["alice"];
        assert_eq!(alice.account, "alice@example.org");
        assert!(alice.hashes[0].verify(b"alice-password"));
        assert!(alice.hashes.iter().any(|h| h.verify(b"alice-app-password")));
        assert!(t.by_name["bob"].hashes[0].verify(b"bob-password"));
    }
}
