//! A client for etcd's v3 JSON gateway over HTTP(S): several endpoints with failover, the
//! gateway prefix of the server's version, base64 keys and values, omitted-field defaults.
//! It knows etcd, not what the keys mean.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::auth::{self, AuthError, Credentials, Meaning, Session};
use crate::kv::{Compare, KeyValue, Kv, Op, Range, StoreError, Txn, TxnOutcome};
use crate::tls;

/// Largest answer read from etcd: a keys-only range over a /16 pool is about 6 MB.
const MAX_ANSWER_BYTES: u64 = 64 * 1024 * 1024;

/// Pause between two rounds of `GET /health` while every endpoint is down.
const PROBE_PAUSE: Duration = Duration::from_millis(200);

/// Longest that calls fail at once after every endpoint failed, even if no `/health` answers
/// (an alarm, say, keeps it unhealthy while requests would be served): then one call tries.
const LONGEST_HOLD: Duration = Duration::from_secs(5);

/// Why a call to etcd failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// No endpoint answered, and none was sent the request: each one's reason, in the order
    /// they were tried. Nothing changed.
    Unreachable(Vec<(String, String)>),
    /// No endpoint answered, and at least one was sent the request (a timeout after sending,
    /// or a 503 from a member that is stopping or has no leader): a write may have been
    /// applied, or may still be.
    Unanswered(Vec<(String, String)>),
    /// Every endpoint failed a moment ago and none has answered a health check since: the
    /// request was not sent. `tries` are the reasons of that last failure.
    Down {
        since: Duration,
        tries: Vec<(String, String)>,
    },
    /// An endpoint answered with an error status; `message` is etcd's own reason.
    Refused {
        endpoint: String,
        status: u16,
        message: String,
    },
    /// An endpoint answered with something that is not etcd's JSON.
    BadAnswer { endpoint: String, reason: String },
    /// The server is etcd 2.x, which has no v3 API.
    V2Only { endpoint: String, version: String },
    /// A certificate was refused, ours or the server's, or TLS failed otherwise: another
    /// endpoint of the same cluster would refuse it too.
    Certificate { endpoint: String, reason: String },
    /// A wrong user or password, a missing permission, or credentials needed.
    Auth(AuthError),
    /// A transaction compares a key range, which a cluster with a member of etcd 3.2 or older
    /// cannot do (that member would compare its first key alone): not sent.
    NoRangeCompares,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unreachable(tries) | Error::Unanswered(tries) => {
                write!(f, "{}", list_tries(tries))
            }
            Error::Down { since, tries } => write!(
                f,
                "no endpoint has answered for {:.1} s ({}); not retried until one does",
                since.as_secs_f64(),
                list_tries(tries)
            ),
            Error::Refused {
                endpoint,
                status,
                message,
            } => {
                write!(f, "{endpoint} answered {status}: {message}")
            }
            Error::BadAnswer { endpoint, reason } => {
                write!(f, "{endpoint} gave an answer that is not etcd's: {reason}")
            }
            Error::V2Only { endpoint, version } => write!(
                f,
                "{endpoint} is etcd {version}, which serves only the v2 API: this tool needs \
                 etcd 3.2 or later (its v3 API); upgrade etcd to 3.3-3.5, start it with \
                 --enable-v2=true and run 'oam-docker-ipam migrate-v2' to bring the original's \
                 pools over"
            ),
            Error::Certificate { endpoint, reason } => {
                write!(f, "certificate problem with {endpoint}: {reason}")
            }
            Error::Auth(e) => write!(f, "{e}"),
            Error::NoRangeCompares => write!(
                f,
                "an etcd cluster older than 3.3 cannot compare a range of keys in a transaction"
            ),
        }
    }
}

impl std::error::Error for Error {}

fn list_tries(tries: &[(String, String)]) -> String {
    let tries: Vec<String> = tries.iter().map(|(e, why)| format!("{e}: {why}")).collect();
    tries.join("; ")
}

impl Error {
    /// Whether no endpoint answered (so another try later may succeed).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Error::Unreachable(_) | Error::Unanswered(_) | Error::Down { .. }
        )
    }
}

impl From<Error> for StoreError {
    /// As the error of a write: an unanswered one may have been applied.
    fn from(e: Error) -> StoreError {
        match e {
            Error::Unanswered(_) => StoreError::OutcomeUnknown(e.to_string()),
            Error::Unreachable(_) | Error::Down { .. } => StoreError::Unreachable(e.to_string()),
            _ => StoreError::Failed(e.to_string()),
        }
    }
}

/// As the error of a read, which changes nothing whether it was answered or not.
fn read_error(e: Error) -> StoreError {
    match e {
        Error::Unanswered(_) => StoreError::Unreachable(e.to_string()),
        e => e.into(),
    }
}

/// One failed attempt on one endpoint.
enum Attempt {
    /// The request never reached etcd (refused, no route, no connection in time): try the
    /// next endpoint.
    NotSent(String),
    /// The request was sent but not answered, or etcd said it cannot serve right now (503):
    /// try the next endpoint, knowing that this one may still apply it.
    Unanswered(String),
    /// Final: another endpoint would answer the same.
    Fail(Error),
}

/// Whether every endpoint failed a moment ago, shared with the thread that watches for one
/// to answer again.
#[derive(Default)]
struct Health {
    state: Mutex<HealthState>,
}

#[derive(Default)]
struct HealthState {
    /// When every endpoint last failed, if none has answered since.
    down_since: Option<Instant>,
    /// Why each one failed then.
    tries: Vec<(String, String)>,
    /// Whether a thread is checking `/health` until an endpoint answers.
    probing: bool,
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep using it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What `Client::server_version` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerVersion {
    /// The endpoint that answered.
    pub endpoint: String,
    /// Its etcd version, e.g. `3.5.16`.
    pub version: String,
    /// The cluster's version (its oldest member's, `3.5.0`), or what etcd says before it has
    /// decided (`not_decided`).
    pub cluster: String,
    /// The gateway prefix requests use: `/v3`, `/v3beta` or `/v3alpha`.
    pub api_prefix: &'static str,
}

/// An etcd cluster reached through its JSON gateway.
pub struct Client {
    endpoints: Vec<String>,
    agent: ureq::Agent,
    /// Index of the endpoint that answered last; tried first next time.
    preferred: AtomicUsize,
    /// `/v3`, `/v3beta` or `/v3alpha`, read from the first endpoint that answers `/version`.
    api_prefix: OnceLock<&'static str>,
    /// Whether the cluster compares key ranges, read once per process (only `ip-range` and
    /// `host-range` ask).
    range_compares: OnceLock<bool>,
    health: Arc<Health>,
    /// The user and token, when etcd wants authentication.
    auth: Option<Session>,
}

/// How a client proves who it is: the TLS settings (trusted CAs, client certificate) and
/// an etcd user, if any.
#[derive(Default, Clone)]
pub struct Security {
    pub tls: ureq::tls::TlsConfig,
    pub credentials: Option<Credentials>,
}

impl Client {
    /// A client for `endpoints` (`http://host:port`; each request starts from the one that
    /// answered last) where every request,
    /// connect included, must finish within `timeout`.
    pub fn new(endpoints: Vec<String>, timeout: Duration) -> Client {
        Client::secured(endpoints, timeout, Security::default())
    }

    /// Like `new`, with TLS settings and an etcd user.
    pub fn secured(endpoints: Vec<String>, timeout: Duration, security: Security) -> Client {
        let config = ureq::Agent::config_builder()
            .tls_config(security.tls)
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            // etcd sits on the cluster network; an HTTP proxy from the environment never helps.
            .proxy(None)
            .build();
        let agent = ureq::Agent::with_parts(
            config,
            ureq::unversioned::transport::DefaultConnector::new(),
            crate::resolver::InPlace,
        );
        Client {
            endpoints: endpoints
                .into_iter()
                .map(|e| e.trim_end_matches('/').to_string())
                .collect(),
            agent,
            preferred: AtomicUsize::new(0),
            api_prefix: OnceLock::new(),
            range_compares: OnceLock::new(),
            health: Arc::default(),
            auth: security.credentials.map(Session::new),
        }
    }

    /// POSTs `body` to `<endpoint><prefix><path>` on the first endpoint that answers.
    /// POSTs `body` to the gateway's `path` on the endpoints in turn; the answer read as `T`.
    /// Typed both ways: a tree of `serde_json::Value` in between cost the plugin about a
    /// third of its own CPU time per allocation (callgrind).
    fn call<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T, Error> {
        // Serializing structs of strings cannot fail.
        let body = serde_json::to_string(body).unwrap_or_default();
        self.on_any_endpoint(path, |endpoint| self.call_one(endpoint, path, &body))
    }

    /// Runs `attempt` on each endpoint in turn, from the one that answered last, until one
    /// gives a final answer.
    ///
    /// Once every endpoint has failed, later calls fail at once with the same reasons (rather
    /// than each waiting out every endpoint's timeout behind the others) until a thread that
    /// polls `GET /health` finds an endpoint answering again.
    fn on_any_endpoint<T>(
        &self,
        what: &str,
        attempt: impl Fn(&str) -> Result<T, Attempt>,
    ) -> Result<T, Error> {
        if let Some(down) = self.down() {
            return Err(down);
        }
        let first = self.preferred.load(Ordering::Relaxed);
        let mut tries = Vec::new();
        let mut sent = false;
        for i in 0..self.endpoints.len() {
            let index = (first + i) % self.endpoints.len();
            let endpoint = &self.endpoints[index];
            let why = match attempt(endpoint) {
                Ok(answer) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(answer);
                }
                Err(Attempt::NotSent(why)) => why,
                Err(Attempt::Unanswered(why)) => {
                    sent = true;
                    why
                }
                Err(Attempt::Fail(e)) => return Err(e),
            };
            log::debug!("etcd {endpoint}{what}: {why}; trying the next endpoint");
            tries.push((endpoint.clone(), why));
        }
        self.mark_down(&tries);
        Err(if sent {
            Error::Unanswered(tries)
        } else {
            Error::Unreachable(tries)
        })
    }

    /// The error to fail with at once while every endpoint is down.
    fn down(&self) -> Option<Error> {
        let state = self.health.lock();
        let since = state.down_since.filter(|t| t.elapsed() < LONGEST_HOLD)?;
        Some(Error::Down {
            since: since.elapsed(),
            tries: state.tries.clone(),
        })
    }

    /// Notes that every endpoint just failed, and starts polling them until one answers.
    fn mark_down(&self, tries: &[(String, String)]) {
        let mut state = self.health.lock();
        state.down_since = Some(Instant::now());
        state.tries = tries.to_vec();
        if state.probing {
            return;
        }
        let health = Arc::downgrade(&self.health);
        let agent = self.agent.clone();
        let endpoints = self.endpoints.clone();
        let spawned = std::thread::Builder::new()
            .name("etcd-health".into())
            .spawn(move || probe_until_answered(&health, &agent, &endpoints));
        match spawned {
            Ok(_) => state.probing = true,
            // Without the thread, no call is held back: each tries every endpoint again.
            Err(e) => {
                log::warn!("cannot start the etcd health check: {e}");
                state.down_since = None;
            }
        }
    }

    /// Every key under `prefix` in etcd's v2 keyspace (where the original tool wrote), read
    /// with `GET /v2/keys<prefix>?recursive=true`. `mod_revision` holds v2's `modifiedIndex`.
    pub fn v2_tree(&self, prefix: &str) -> Result<V2Tree, Error> {
        let path = format!("/v2/keys{prefix}?recursive=true&sorted=true");
        self.on_any_endpoint(&path, |endpoint| self.v2_get(endpoint, &path))
    }

    fn v2_get(&self, endpoint: &str, path: &str) -> Result<V2Tree, Attempt> {
        let mut answer = self
            .agent
            .get(&format!("{endpoint}{path}"))
            .call()
            .map_err(|e| self.transport_failure(endpoint, e))?;
        let status = answer.status().as_u16();
        let index = answer
            .headers()
            .get("X-Etcd-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i64>().ok());
        let bytes = body_of(&mut answer)?;
        let bad = |reason: String| {
            Attempt::Fail(Error::BadAnswer {
                endpoint: endpoint.into(),
                reason,
            })
        };
        let json: Option<Value> = serde_json::from_slice(&bytes).ok();
        match (status, json) {
            (200, Some(json)) => {
                let mut keys = Vec::new();
                flatten_v2(&json["node"], &mut keys);
                let index =
                    index.unwrap_or_else(|| keys.iter().map(|k| k.mod_revision).max().unwrap_or(0));
                Ok(V2Tree::Keys { index, keys })
            }
            (200, None) => Err(bad(format!(
                "{path} answered {:?}",
                String::from_utf8_lossy(&bytes)
            ))),
            // etcd's "Key not found" is JSON with errorCode 100.
            (404, Some(json)) if json["errorCode"].as_i64() == Some(100) => Ok(V2Tree::Missing),
            // An etcd 3.4+ started without --enable-v2 has no such route at all.
            (404, _) => Ok(V2Tree::NotServed),
            (503, _) => Err(Attempt::Unanswered(format!(
                "unavailable: {}",
                error_message(&bytes)
            ))),
            (status, _) => Err(Attempt::Fail(Error::Refused {
                endpoint: endpoint.into(),
                status,
                message: error_message(&bytes),
            })),
        }
    }

    fn call_one<T: DeserializeOwned>(
        &self,
        endpoint: &str,
        path: &str,
        body: &str,
    ) -> Result<T, Attempt> {
        let prefix = self.api_prefix(endpoint)?;
        let url = format!("{endpoint}{prefix}{path}");
        let (status, bytes) = self.send_authorized(endpoint, prefix, &url, body)?;
        if status == 200 {
            return serde_json::from_slice(&bytes).map_err(|e| {
                Attempt::Fail(Error::BadAnswer {
                    endpoint: endpoint.into(),
                    reason: e.to_string(),
                })
            });
        }
        let message = error_message(&bytes);
        // 503: this member has no leader or is stopping; another member may serve. A write
        // it was given may still be applied ("transport is closing" comes after the fact), as
        // with the gateway's 408 "the client connection is closing" while etcd stops.
        if status == 503 || status == 408 {
            return Err(Attempt::Unanswered(format!("unavailable: {message}")));
        }
        if let Some(e) = self.refusal(endpoint, &message) {
            return Err(Attempt::Fail(e));
        }
        Err(Attempt::Fail(Error::Refused {
            endpoint: endpoint.into(),
            status,
            message,
        }))
    }

    /// The first endpoint that answers `/version`, its etcd version and the gateway prefix
    /// this client uses with it (remembered, as the first request would).
    pub fn server_version(&self) -> Result<ServerVersion, Error> {
        let mut tries = Vec::new();
        for endpoint in &self.endpoints {
            match self.read_versions(endpoint) {
                Ok((version, cluster)) => {
                    let api_prefix = *self.api_prefix.get_or_init(|| gateway_prefix(&version));
                    return Ok(ServerVersion {
                        endpoint: endpoint.clone(),
                        version,
                        cluster,
                        api_prefix,
                    });
                }
                Err(Attempt::NotSent(why) | Attempt::Unanswered(why)) => {
                    tries.push((endpoint.clone(), why))
                }
                Err(Attempt::Fail(e)) => return Err(e),
            }
        }
        Err(Error::Unreachable(tries))
    }

    /// Whether transactions may compare a range of keys: when the cluster's version is 3.3 or
    /// later. Not the endpoint's own: every member applies each transaction itself, and a 3.2
    /// member left in a cluster being upgraded would ignore `range_end` (a field it does not
    /// know) and compare the range's first key alone.
    pub fn compares_ranges(&self) -> Result<bool, Error> {
        if let Some(known) = self.range_compares.get() {
            return Ok(*known);
        }
        let found = self.server_version()?;
        let ranges = cluster_compares_ranges(&found.cluster);
        if !ranges {
            log::debug!(
                "etcd cluster version {:?}: one compare per key, not per range",
                found.cluster
            );
        }
        Ok(*self.range_compares.get_or_init(|| ranges))
    }

    /// The gateway prefix, read once per process from the first endpoint that answers.
    fn api_prefix(&self, endpoint: &str) -> Result<&'static str, Attempt> {
        if let Some(prefix) = self.api_prefix.get() {
            return Ok(prefix);
        }
        let server = self.read_version(endpoint)?;
        let prefix = gateway_prefix(&server);
        log::debug!("etcd {endpoint} is version {server:?}: using gateway prefix {prefix}");
        Ok(self.api_prefix.get_or_init(|| prefix))
    }

    /// `etcdserver` of the endpoint's `/version`.
    fn read_version(&self, endpoint: &str) -> Result<String, Attempt> {
        Ok(self.read_versions(endpoint)?.0)
    }

    /// `etcdserver` and `etcdcluster` of the endpoint's `/version`.
    fn read_versions(&self, endpoint: &str) -> Result<(String, String), Attempt> {
        let url = format!("{endpoint}/version");
        let mut answer = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| self.transport_failure(endpoint, e))?;
        let text = answer
            .body_mut()
            .read_to_string()
            .map_err(transport_reason)?;
        let version: Value = serde_json::from_str(&text).map_err(|_| {
            Attempt::Fail(Error::BadAnswer {
                endpoint: endpoint.into(),
                reason: format!("/version answered {text:?}"),
            })
        })?;
        let server = version["etcdserver"].as_str().unwrap_or_default();
        if !serves_v3(server) {
            return Err(Attempt::Fail(Error::V2Only {
                endpoint: endpoint.into(),
                version: server.into(),
            }));
        }
        let cluster = version["etcdcluster"].as_str().unwrap_or_default();
        Ok((server.to_string(), cluster.to_string()))
    }
}

/// What etcd's v2 keyspace holds under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum V2Tree {
    /// The server does not serve the v2 API (etcd 3.4+ without `--enable-v2`, or 3.6+).
    NotServed,
    /// Nothing under the prefix.
    Missing,
    /// The leaf keys under the prefix (the prefix itself if it is a leaf), in key order, and
    /// the v2 store's index when they were read.
    Keys { index: i64, keys: Vec<KeyValue> },
}

/// Collects the leaves of a v2 node (`{"key","value","dir","nodes","modifiedIndex"}`).
fn flatten_v2(node: &Value, out: &mut Vec<KeyValue>) {
    if node["dir"].as_bool() == Some(true) {
        for child in node["nodes"].as_array().into_iter().flatten() {
            flatten_v2(child, out);
        }
    } else if let Some(key) = node["key"].as_str() {
        out.push(KeyValue {
            key: key.to_string(),
            value: node["value"].as_str().unwrap_or_default().to_string(),
            mod_revision: node["modifiedIndex"].as_i64().unwrap_or(0),
        });
    }
}

/// Whether an etcd server of this version has the v3 API (2.x has only v2). An unreadable
/// version is given the benefit of the doubt: the v3 call itself will tell.
fn serves_v3(version: &str) -> bool {
    let major = version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    !major.is_some_and(|m| m < 3)
}

/// Whether a cluster of this version compares key ranges (3.3 and later). Unknown or not yet
/// decided reads as no: comparing each key is slower, never wrong.
fn cluster_compares_ranges(cluster: &str) -> bool {
    let mut parts = cluster.split('.').map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(3)), Some(Ok(minor))) => minor >= 3,
        (Some(Ok(major)), Some(Ok(_))) => major > 3,
        _ => false,
    }
}

/// Which gateway prefix an etcd server of this version serves.
fn gateway_prefix(version: &str) -> &'static str {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    match (parts.next(), parts.next()) {
        (Some(3), Some(0..=2)) => "/v3alpha",
        (Some(3), Some(3)) => "/v3beta",
        _ => "/v3",
    }
}

/// An answer's body, at most `MAX_ANSWER_BYTES`.
fn body_of(answer: &mut ureq::http::Response<ureq::Body>) -> Result<Vec<u8>, Attempt> {
    answer
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER_BYTES)
        .read_to_vec()
        .map_err(transport_reason)
}

/// A transport failure, worded for a person, as a reason to try the next endpoint. Only a
/// failure to connect proves the request was not sent; any other may come after etcd read it.
fn transport_reason(e: ureq::Error) -> Attempt {
    use std::io::ErrorKind;
    use ureq::Timeout;
    match e {
        ureq::Error::Timeout(Timeout::Resolve | Timeout::Connect) => {
            Attempt::NotSent("timed out connecting".into())
        }
        ureq::Error::Timeout(_) => Attempt::Unanswered("timed out".into()),
        ureq::Error::Io(io)
            if matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::AddrNotAvailable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::HostUnreachable
            ) =>
        {
            Attempt::NotSent(io.to_string())
        }
        ureq::Error::Io(io) => Attempt::Unanswered(io.to_string()),
        ureq::Error::HostNotFound => Attempt::NotSent("host not found".into()),
        ureq::Error::ConnectionFailed => Attempt::NotSent("connection failed".into()),
        other => Attempt::Unanswered(other.to_string()),
    }
}

/// Polls `GET /health` on every endpoint until one answers healthy, then lets calls through
/// again. Ends early if the client is gone.
fn probe_until_answered(health: &Weak<Health>, agent: &ureq::Agent, endpoints: &[String]) {
    loop {
        std::thread::sleep(PROBE_PAUSE);
        for endpoint in endpoints {
            let healthy = agent
                .get(&format!("{endpoint}/health"))
                .call()
                .is_ok_and(|answer| answer.status() == 200);
            let Some(health) = health.upgrade() else {
                return;
            };
            if healthy {
                log::info!("etcd {endpoint} answers again");
                let mut state = health.lock();
                state.down_since = None;
                state.probing = false;
                return;
            }
        }
    }
}

/// etcd's reason from an error body, whichever version's shape it has.
fn error_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return text.trim().to_string();
    };
    ["message", "error", "Error"]
        .iter()
        .find_map(|field| value[field].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| text.trim().to_string())
}

fn b64(text: &str) -> String {
    BASE64.encode(text.as_bytes())
}

fn unb64(text: &str) -> String {
    match BASE64.decode(text) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    }
}

/// etcd sends 64-bit integers as strings, and omits them when zero.
fn int64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Text(String),
        Number(i64),
    }
    match Int::deserialize(d)? {
        Int::Number(n) => Ok(n),
        Int::Text(t) => t.parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Deserialize, Default)]
struct RawKv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "int64")]
    mod_revision: i64,
}

#[derive(Deserialize, Default)]
struct RangeAnswer {
    #[serde(default)]
    kvs: Vec<RawKv>,
}

impl RangeAnswer {
    fn into_kvs(self) -> Vec<KeyValue> {
        self.kvs
            .into_iter()
            .map(|kv| KeyValue {
                key: unb64(&kv.key),
                value: unb64(&kv.value),
                mod_revision: kv.mod_revision,
            })
            .collect()
    }
}

#[derive(Deserialize, Default)]
struct OpAnswer {
    response_range: Option<RangeAnswer>,
}

#[derive(Deserialize, Default)]
struct TxnAnswer {
    // Absent when the compares failed.
    #[serde(default)]
    succeeded: bool,
    #[serde(default)]
    responses: Vec<OpAnswer>,
}

/// A range request as the gateway reads it (also a transaction's range op); int64 fields
/// are strings in its JSON.
#[derive(Serialize)]
struct RangeRequest {
    key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    range_end: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    keys_only: bool,
}

impl From<&Range> for RangeRequest {
    fn from(r: &Range) -> RangeRequest {
        RangeRequest {
            key: b64(&r.start),
            range_end: (!r.end.is_empty()).then(|| b64(&r.end)),
            limit: (r.limit > 0).then(|| r.limit.to_string()),
            keys_only: r.keys_only,
        }
    }
}

/// One compare of a transaction: `target` names which of the optional fields holds the
/// value compared.
#[derive(Serialize)]
struct CompareRequest {
    key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    range_end: Option<String>,
    result: &'static str,
    target: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    create_revision: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mod_revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
}

impl From<&Compare> for CompareRequest {
    fn from(c: &Compare) -> CompareRequest {
        let on = |key: &str, result, target| CompareRequest {
            key: b64(key),
            range_end: None,
            result,
            target,
            version: None,
            create_revision: None,
            mod_revision: None,
            value: None,
        };
        match c {
            Compare::Exists(key) => CompareRequest {
                version: Some("0"),
                ..on(key, "GREATER", "VERSION")
            },
            Compare::Absent(key) => CompareRequest {
                create_revision: Some("0"),
                ..on(key, "EQUAL", "CREATE")
            },
            Compare::Value(key, value) => CompareRequest {
                value: Some(b64(value)),
                ..on(key, "EQUAL", "VALUE")
            },
            Compare::ModRevision(key, rev) => CompareRequest {
                mod_revision: Some(rev.to_string()),
                ..on(key, "EQUAL", "MOD")
            },
            // Every key of the range was created at revision 0: none exists (an empty range
            // is compared as one absent key).
            Compare::NoKeyIn { start, end } => CompareRequest {
                range_end: Some(b64(end)),
                create_revision: Some("0"),
                ..on(start, "EQUAL", "CREATE")
            },
        }
    }
}

/// One operation of a transaction's branch: `{"request_put": {...}}` and so on.
#[derive(Serialize)]
enum OpRequest {
    #[serde(rename = "request_put")]
    Put { key: String, value: String },
    #[serde(rename = "request_delete_range")]
    Delete { key: String },
    #[serde(rename = "request_range")]
    Range(RangeRequest),
}

impl From<&Op> for OpRequest {
    fn from(op: &Op) -> OpRequest {
        match op {
            Op::Put { key, value } => OpRequest::Put {
                key: b64(key),
                value: b64(value),
            },
            Op::Delete { key } => OpRequest::Delete { key: b64(key) },
            Op::Range(r) => OpRequest::Range(r.into()),
        }
    }
}

#[derive(Serialize)]
struct TxnRequest {
    compare: Vec<CompareRequest>,
    success: Vec<OpRequest>,
    failure: Vec<OpRequest>,
}

impl Client {
    pub fn range(&self, r: &Range) -> Result<Vec<KeyValue>, Error> {
        let answer: RangeAnswer = self.call("/kv/range", &RangeRequest::from(r))?;
        Ok(answer.into_kvs())
    }

    pub fn txn(&self, txn: &Txn) -> Result<TxnOutcome, Error> {
        let ranged = |c: &Compare| matches!(c, Compare::NoKeyIn { .. });
        if txn.compares.iter().any(ranged) && !self.compares_ranges()? {
            return Err(Error::NoRangeCompares);
        }
        let body = TxnRequest {
            compare: txn.compares.iter().map(CompareRequest::from).collect(),
            success: txn.success.iter().map(OpRequest::from).collect(),
            failure: txn.failure.iter().map(OpRequest::from).collect(),
        };
        let answer: TxnAnswer = self.call("/kv/txn", &body)?;
        let ranges = answer
            .responses
            .into_iter()
            .filter_map(|r| r.response_range)
            .map(RangeAnswer::into_kvs)
            .collect();
        Ok(TxnOutcome {
            succeeded: answer.succeeded,
            ranges,
        })
    }
}

impl Kv for Client {
    fn range(&self, range: &Range) -> Result<Vec<KeyValue>, StoreError> {
        Client::range(self, range).map_err(read_error)
    }

    fn original_keys(&self, prefix: &str) -> Result<Option<Vec<KeyValue>>, StoreError> {
        Ok(match self.v2_tree(prefix).map_err(read_error)? {
            V2Tree::NotServed => None,
            V2Tree::Missing => Some(Vec::new()),
            V2Tree::Keys { keys, .. } => Some(keys),
        })
    }

    fn txn(&self, txn: &Txn) -> Result<TxnOutcome, StoreError> {
        Ok(Client::txn(self, txn)?)
    }

    fn compares_ranges(&self) -> Result<bool, StoreError> {
        Client::compares_ranges(self).map_err(read_error)
    }
}

/// Authentication and TLS refusals: kept apart from the failover and retry logic above.
impl Client {
    /// POSTs `body` to `url` on `endpoint` with the current token, authenticating first if
    /// there is none; a token etcd no longer takes (expired after `--auth-token-ttl` seconds
    /// unused, or invalidated by a change of users or roles) is renewed once and the request
    /// sent again: etcd refused it before doing anything, so sending it again is safe.
    fn send_authorized(
        &self,
        endpoint: &str,
        prefix: &str,
        url: &str,
        body: &str,
    ) -> Result<(u16, Vec<u8>), Attempt> {
        let Some(session) = &self.auth else {
            return self.post(endpoint, url, body, None);
        };
        let token = match session.current() {
            auth::Current::NotNeeded => return self.post(endpoint, url, body, None),
            auth::Current::Token(token) => token,
            auth::Current::Missing => match self.authenticate(endpoint, prefix, session)? {
                Some(token) => token,
                None => return self.post(endpoint, url, body, None),
            },
        };
        let (status, bytes) = self.post(endpoint, url, body, Some(&token))?;
        // "user name is empty" although a token went: etcd did not know the token either.
        let stale = |m| matches!(m, Meaning::RenewToken | Meaning::NeedsUser);
        if status == 200 || !stale(auth::meaning(&error_message(&bytes))) {
            return Ok((status, bytes));
        }
        log::debug!("etcd {endpoint}: the auth token expired; authenticating again");
        session.forget(&token);
        let Some(fresh) = self.authenticate(endpoint, prefix, session)? else {
            return self.post(endpoint, url, body, None);
        };
        let (status, bytes) = self.post(endpoint, url, body, Some(&fresh))?;
        let message = error_message(&bytes);
        if status != 200 && stale(auth::meaning(&message)) {
            session.forget(&fresh);
            return Err(Attempt::Fail(Error::Auth(AuthError::TokenRefused {
                endpoint: endpoint.into(),
                message,
            })));
        }
        Ok((status, bytes))
    }

    /// One POST; the answer's status and body.
    fn post(
        &self,
        endpoint: &str,
        url: &str,
        body: &str,
        token: Option<&str>,
    ) -> Result<(u16, Vec<u8>), Attempt> {
        let mut request = self
            .agent
            .post(url)
            .header("Content-Type", "application/json");
        if let Some(token) = token {
            // The bare token, as etcd's gateway takes it (no "Bearer").
            request = request.header("Authorization", token);
        }
        let mut answer = request
            .send(body)
            .map_err(|e| self.transport_failure(endpoint, e))?;
        let status = answer.status().as_u16();
        Ok((status, body_of(&mut answer)?))
    }

    /// `POST <prefix>/auth/authenticate` on `endpoint`: the new token, kept in `session`;
    /// `None` when etcd has auth disabled (requests then go without one).
    fn authenticate(
        &self,
        endpoint: &str,
        prefix: &str,
        session: &Session,
    ) -> Result<Option<Arc<str>>, Attempt> {
        #[derive(Deserialize)]
        struct Answer {
            #[serde(default)]
            token: String,
        }
        let url = format!("{endpoint}{prefix}/auth/authenticate");
        let request = session.credentials.request_body();
        let (status, bytes) = self.post(endpoint, &url, &request, None)?;
        let message = error_message(&bytes);
        match (status, auth::meaning(&message)) {
            (200, _) => {}
            // The request itself was not sent yet.
            (503, _) => return Err(Attempt::NotSent(format!("unavailable: {message}"))),
            (_, Meaning::NotEnabled) => {
                log::warn!(
                    "etcd {endpoint} has authentication disabled: sending requests without \
                     the user {:?}",
                    session.credentials.user
                );
                session.not_needed();
                return Ok(None);
            }
            (_, Meaning::BadPassword) => {
                return Err(Attempt::Fail(Error::Auth(AuthError::BadPassword {
                    endpoint: endpoint.into(),
                    user: session.credentials.user.clone(),
                    message,
                })))
            }
            _ => {
                return Err(Attempt::Fail(self.refusal(endpoint, &message).unwrap_or(
                    Error::Refused {
                        endpoint: endpoint.into(),
                        status,
                        message,
                    },
                )))
            }
        }
        match serde_json::from_slice::<Answer>(&bytes) {
            Ok(answer) if !answer.token.is_empty() => {
                log::debug!(
                    "etcd {endpoint}: authenticated as {:?}",
                    session.credentials.user
                );
                Ok(Some(session.keep(&answer.token)))
            }
            _ => Err(Attempt::Fail(Error::BadAnswer {
                endpoint: endpoint.into(),
                reason: "authenticate answered without a token".into(),
            })),
        }
    }

    /// A transport failure: a TLS failure is final and named as a certificate problem (the
    /// other endpoints of a cluster have certificates from the same CA); anything else is as
    /// `transport_reason` says.
    fn transport_failure(&self, endpoint: &str, e: ureq::Error) -> Attempt {
        let Some(text) = tls::failure(&e) else {
            return transport_reason(e);
        };
        let sent_cert = self.agent.config().tls_config().client_cert().is_some();
        Attempt::Fail(Error::Certificate {
            endpoint: endpoint.into(),
            reason: format!("{} ({text})", tls::advice(&text, sent_cert)),
        })
    }

    /// The error an etcd message names when it is about certificates or authentication.
    fn refusal(&self, endpoint: &str, message: &str) -> Option<Error> {
        let user = self.auth.as_ref().map(|s| s.credentials.user.clone());
        if message.contains("CommonName of client") {
            return Some(Error::Certificate {
                endpoint: endpoint.into(),
                reason: format!(
                    "{message}: etcd's JSON gateway refuses a client certificate whose subject \
                     has a CommonName (CN); use one whose subject has none (such as only O=) \
                     and identify with --user"
                ),
            });
        }
        let e = match auth::meaning(message) {
            Meaning::PermissionDenied => AuthError::PermissionDenied {
                endpoint: endpoint.into(),
                user,
                message: message.into(),
            },
            Meaning::NeedsUser if user.is_none() => AuthError::NeedsUser {
                endpoint: endpoint.into(),
                message: message.into(),
            },
            Meaning::BadPassword => AuthError::BadPassword {
                endpoint: endpoint.into(),
                user: user.unwrap_or_default(),
                message: message.into(),
            },
            _ => return None,
        };
        Some(Error::Auth(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_compare_is_not_sent_to_a_cluster_older_than_3_3() {
        assert!(!cluster_compares_ranges("3.2.0"));
        assert!(!cluster_compares_ranges("not_decided"));
        assert!(!cluster_compares_ranges(""));
        assert!(cluster_compares_ranges("3.3.0"));
        assert!(cluster_compares_ranges("3.4.0"));
        assert!(cluster_compares_ranges("4.0.0"));
        // No endpoint answers here: the refusal comes before any request.
        let client = Client::new(vec!["http://127.0.0.1:1".into()], Duration::from_millis(50));
        let _ = client.range_compares.set(false);
        let txn = Txn {
            compares: vec![Compare::NoKeyIn {
                start: "a".into(),
                end: "b".into(),
            }],
            ..Txn::default()
        };
        assert_eq!(client.txn(&txn), Err(Error::NoRangeCompares));
    }

    #[test]
    fn a_transaction_is_written_as_the_gateway_reads_it() {
        let txn = Txn {
            compares: vec![
                Compare::Exists("a".into()),
                Compare::Absent("b".into()),
                Compare::Value("c".into(), "v".into()),
                Compare::ModRevision("d".into(), 42),
                Compare::NoKeyIn {
                    start: "e".into(),
                    end: "f".into(),
                },
            ],
            success: vec![
                Op::put("k", ""),
                Op::delete("k"),
                Op::Range(Range::key("k")),
                Op::Range(Range::prefix("p/").limit(5).keys_only()),
            ],
            failure: vec![],
        };
        let body = TxnRequest {
            compare: txn.compares.iter().map(CompareRequest::from).collect(),
            success: txn.success.iter().map(OpRequest::from).collect(),
            failure: txn.failure.iter().map(OpRequest::from).collect(),
        };
        let written: Value = serde_json::to_value(&body).unwrap();
        let expected = serde_json::json!({
            "compare": [
                {"key": "YQ==", "result": "GREATER", "target": "VERSION", "version": "0"},
                {"key": "Yg==", "result": "EQUAL", "target": "CREATE", "create_revision": "0"},
                {"key": "Yw==", "result": "EQUAL", "target": "VALUE", "value": "dg=="},
                {"key": "ZA==", "result": "EQUAL", "target": "MOD", "mod_revision": "42"},
                {"key": "ZQ==", "range_end": "Zg==", "result": "EQUAL", "target": "CREATE",
                 "create_revision": "0"},
            ],
            "success": [
                {"request_put": {"key": "aw==", "value": ""}},
                {"request_delete_range": {"key": "aw=="}},
                {"request_range": {"key": "aw=="}},
                {"request_range": {"key": "cC8=", "range_end": "cDA=", "limit": "5",
                                   "keys_only": true}},
            ],
            "failure": [],
        });
        assert_eq!(written, expected);
    }

    #[test]
    fn picks_the_gateway_prefix_by_version() {
        assert_eq!(gateway_prefix("3.2.32"), "/v3alpha");
        assert_eq!(gateway_prefix("3.3.11"), "/v3beta");
        assert_eq!(gateway_prefix("3.4.23"), "/v3");
        assert_eq!(gateway_prefix("3.5.9"), "/v3");
        assert_eq!(gateway_prefix(""), "/v3");
        assert!(!serves_v3("2.3.8"));
        assert!(serves_v3("3.3.11") && serves_v3("3.4.23") && serves_v3(""));
    }

    #[test]
    fn reads_the_error_message_of_every_version() {
        assert_eq!(error_message(br#"{"Error":"a","Code":3}"#), "a");
        assert_eq!(error_message(br#"{"error":"b","code":3}"#), "b");
        assert_eq!(
            error_message(br#"{"error":"c","code":3,"message":"d"}"#),
            "d"
        );
        assert_eq!(error_message(b"plain"), "plain");
    }

    #[test]
    fn reads_the_leaves_of_a_v2_tree() {
        // The shape of the original's dump (shared/fixtures/original/v2-keys.json), shortened.
        let dump = r#"{"action":"get","node":{"key":"/t","dir":true,"nodes":[
            {"key":"/t/hosts","dir":true,"nodes":[
                {"key":"/t/hosts/assigned","dir":true,"nodes":[
                    {"key":"/t/hosts/assigned/192.0.2.54","value":"","modifiedIndex":55}]},
                {"key":"/t/hosts/config","value":"{\"Subnet\":\"192.0.2.0/24\"}","modifiedIndex":14}]},
            {"key":"/t/empty","dir":true}]}}"#;
        let json: Value = serde_json::from_str(dump).unwrap();
        let mut keys = Vec::new();
        flatten_v2(&json["node"], &mut keys);
        let got: Vec<(&str, &str, i64)> = keys
            .iter()
            .map(|k| (k.key.as_str(), k.value.as_str(), k.mod_revision))
            .collect();
        assert_eq!(
            got,
            [
                ("/t/hosts/assigned/192.0.2.54", "", 55),
                ("/t/hosts/config", r#"{"Subnet":"192.0.2.0/24"}"#, 14)
            ]
        );
        let leaf: Value =
            serde_json::from_str(r#"{"key":"/a","value":"v","modifiedIndex":3}"#).unwrap();
        let mut one = Vec::new();
        flatten_v2(&leaf, &mut one);
        assert_eq!(
            one,
            vec![KeyValue {
                key: "/a".into(),
                value: "v".into(),
                mod_revision: 3
            }]
        );
    }

    #[test]
    fn omitted_fields_read_as_defaults() {
        let failed: TxnAnswer = serde_json::from_str(r#"{"header":{"revision":"2"}}"#).unwrap();
        assert!(!failed.succeeded);
        let empty: RangeAnswer = serde_json::from_str(r#"{"header":{}}"#).unwrap();
        assert!(empty.kvs.is_empty());
        let kv: RawKv = serde_json::from_str(r#"{"key":"YQ==","mod_revision":"7"}"#).unwrap();
        assert_eq!((unb64(&kv.key), kv.mod_revision), ("a".to_string(), 7));
    }
}
