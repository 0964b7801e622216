//! etcd user/password authentication: the credentials (the password never shown), the token
//! shared by every thread of one client, and what etcd's answers mean for it: renew the
//! token, wrong password, missing permission, or credentials needed. It knows etcd's
//! messages, not HTTP.

use std::fmt;
use std::sync::{Arc, Mutex};

/// A password: printed as `***` by `Debug`, and never by `Display` (it has none).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: String) -> Secret {
        Secret(text)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// An etcd user and its password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: Secret,
}

impl Credentials {
    /// The body of `POST <prefix>/auth/authenticate`.
    pub fn request_body(&self) -> String {
        serde_json::json!({ "name": self.user, "password": self.password.expose() }).to_string()
    }
}

/// What a client holds for authentication.
#[derive(Debug)]
enum Token {
    /// Not asked for yet, or dropped because etcd no longer took it.
    None,
    Valid(Arc<str>),
    /// etcd has auth disabled: requests go without a token.
    NotNeeded,
}

/// The credentials and the current token of one client, shared by its threads (the server's
/// start-up probe runs on its own); at worst two threads authenticate at the same time.
#[derive(Debug)]
pub struct Session {
    pub credentials: Credentials,
    token: Mutex<Token>,
}

/// The token to send, from `Session::token`.
pub enum Current {
    /// Authenticate first.
    Missing,
    /// Send no token.
    NotNeeded,
    Token(Arc<str>),
}

impl Session {
    pub fn new(credentials: Credentials) -> Session {
        Session {
            credentials,
            token: Mutex::new(Token::None),
        }
    }

    pub fn current(&self) -> Current {
        match &*self.token.lock().unwrap_or_else(|e| e.into_inner()) {
            Token::None => Current::Missing,
            Token::NotNeeded => Current::NotNeeded,
            Token::Valid(t) => Current::Token(t.clone()),
        }
    }

    /// Keeps `token` from etcd's authenticate answer.
    pub fn keep(&self, token: &str) -> Arc<str> {
        let token: Arc<str> = Arc::from(token);
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Token::Valid(token.clone());
        token
    }

    /// etcd does not enable auth: send nothing from now on.
    pub fn not_needed(&self) {
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Token::NotNeeded;
    }

    /// Drops `stale` if it is still the current token (another thread may have renewed it).
    pub fn forget(&self, stale: &str) {
        let mut token = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(&*token, Token::Valid(t) if &**t == stale) {
            *token = Token::None;
        }
    }
}

/// What an error message from etcd means for authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning {
    /// The token expired (unused for `--auth-token-ttl` seconds) or was invalidated by a
    /// change of users or roles: authenticate again and retry.
    RenewToken,
    /// The user or password is wrong.
    BadPassword,
    /// The user's roles do not allow this.
    PermissionDenied,
    /// etcd requires authentication and none was sent.
    NeedsUser,
    /// etcd has auth disabled (answer to authenticate).
    NotEnabled,
    /// Something else.
    Other,
}

/// Reads etcd's error message (3.2 to 3.5 word them alike).
pub fn meaning(message: &str) -> Meaning {
    let m = message.to_ascii_lowercase();
    if m.contains("invalid auth token")
        || m.contains("revision of auth store is old")
        || m.contains("auth: revision in header is old")
    {
        Meaning::RenewToken
    } else if m.contains("authentication failed") {
        Meaning::BadPassword
    } else if m.contains("permission denied") {
        Meaning::PermissionDenied
    } else if m.contains("user name is empty") || m.contains("user name not found") {
        Meaning::NeedsUser
    } else if m.contains("authentication is not enabled") {
        Meaning::NotEnabled
    } else {
        Meaning::Other
    }
}

/// Why authentication failed or was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// etcd refused the user and password.
    BadPassword {
        endpoint: String,
        user: String,
        message: String,
    },
    /// The user may not do what was asked.
    PermissionDenied {
        endpoint: String,
        user: Option<String>,
        message: String,
    },
    /// etcd requires a user and none was configured.
    NeedsUser { endpoint: String, message: String },
    /// A fresh token was refused too.
    TokenRefused { endpoint: String, message: String },
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::BadPassword {
                endpoint,
                user,
                message,
            } => write!(
                f,
                "authentication of etcd user {user:?} failed at {endpoint}: {message} (check \
                 --user and the password)"
            ),
            AuthError::PermissionDenied {
                endpoint,
                user,
                message,
            } => {
                let who = match user {
                    Some(user) => format!("etcd user {user:?}"),
                    None => "an unauthenticated client".into(),
                };
                write!(
                    f,
                    "permission denied to {who} at {endpoint}: {message} (its role must grant \
                     readwrite on the --store-prefix and everything under it)"
                )
            }
            AuthError::NeedsUser { endpoint, message } => write!(
                f,
                "{endpoint} requires authentication: {message} (give --user and a password \
                 with --password-file or IPAM_PASSWORD)"
            ),
            AuthError::TokenRefused { endpoint, message } => write!(
                f,
                "authentication: {endpoint} refused a token it had just issued: {message}"
            ),
        }
    }
}

impl std::error::Error for AuthError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_shows() {
        let c = Credentials {
            user: "ipam".into(),
            password: Secret::new("s3cret".into()),
        };
        assert!(!format!("{c:?}").contains("s3cret"));
        let s = Session::new(c);
        assert!(!format!("{s:?}").contains("s3cret"));
        let err = AuthError::BadPassword {
            endpoint: "https://e:2379".into(),
            user: "ipam".into(),
            message: "etcdserver: authentication failed, invalid user ID or password".into(),
        };
        assert!(err.to_string().contains("authentication"));
    }

    #[test]
    fn reads_etcds_messages() {
        assert_eq!(
            meaning("etcdserver: invalid auth token"),
            Meaning::RenewToken
        );
        assert_eq!(
            meaning("etcdserver: authentication failed, invalid user ID or password"),
            Meaning::BadPassword
        );
        assert_eq!(
            meaning("etcdserver: permission denied"),
            Meaning::PermissionDenied
        );
        assert_eq!(
            meaning("etcdserver: user name is empty"),
            Meaning::NeedsUser
        );
        assert_eq!(
            meaning("etcdserver: authentication is not enabled"),
            Meaning::NotEnabled
        );
        assert_eq!(
            meaning("etcdserver: too many operations in txn request"),
            Meaning::Other
        );
    }

    #[test]
    fn a_renewed_token_is_not_forgotten_for_a_stale_one() {
        let s = Session::new(Credentials {
            user: "u".into(),
            password: Secret::new("p".into()),
        });
        assert!(matches!(s.current(), Current::Missing));
        s.keep("old");
        s.keep("new");
        s.forget("old");
        assert!(matches!(s.current(), Current::Token(t) if &*t == "new"));
        s.forget("new");
        assert!(matches!(s.current(), Current::Missing));
    }
}
