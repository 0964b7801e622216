//! The etcd v3 gateway client against a real etcd: each call, the encodings, failover to a
//! second endpoint, and bounded failure when no endpoint answers.

mod common;

use common::{unique_prefix, Etcd};
use oam_docker_ipam::etcd::{Client, Error};
use oam_docker_ipam::kv::{Compare, Op, Range, Txn};
use std::time::{Duration, Instant};

/// Writes `key` unconditionally (the client itself only writes in guarded transactions).
fn put(c: &Client, key: &str, value: &str) {
    let txn = Txn {
        success: vec![Op::put(key, value)],
        ..Txn::default()
    };
    assert!(c.txn(&txn).unwrap().succeeded);
}

fn client(endpoints: &[&str]) -> Client {
    Client::new(
        endpoints.iter().map(|e| e.to_string()).collect(),
        Duration::from_secs(1),
    )
}

/// A loopback port nothing listens on.
fn dead_endpoint() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}")
}

#[test]
fn put_range_delete_and_txn_round_trip() {
    let etcd = Etcd::shared();
    let p = unique_prefix("client");
    let c = client(&[&etcd.url]);
    // Values that need base64 care: JSON, non-ASCII, empty.
    put(&c, &format!("{p}/a"), r#"{"Host":"hôte-1"}"#);
    put(&c, &format!("{p}/b"), "");
    put(&c, &format!("{p}/c"), "3");
    let all = c.range(&Range::prefix(format!("{p}/"))).unwrap();
    let seen: Vec<(String, String)> = all
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (format!("{p}/a"), r#"{"Host":"hôte-1"}"#.to_string()),
            (format!("{p}/b"), String::new()),
            (format!("{p}/c"), "3".to_string()),
        ]
    );
    assert!(all.iter().all(|kv| kv.mod_revision > 0));
    let limited = c
        .range(&Range::prefix(format!("{p}/")).limit(2).keys_only())
        .unwrap();
    assert_eq!(limited.len(), 2);
    assert!(limited.iter().all(|kv| kv.value.is_empty()));
    assert!(c
        .range(&Range::key(format!("{p}/none")))
        .unwrap()
        .is_empty());

    let swap = Txn {
        compares: vec![
            Compare::Exists(format!("{p}/a")),
            Compare::Absent(format!("{p}/d")),
        ],
        success: vec![
            Op::delete(format!("{p}/a")),
            Op::put(format!("{p}/d"), "moved"),
        ],
        failure: vec![Op::Range(Range::key(format!("{p}/d")))],
    };
    let first = c.txn(&swap).unwrap();
    assert!(first.succeeded);
    let second = c.txn(&swap).unwrap();
    assert!(
        !second.succeeded,
        "the compare must fail once the key moved"
    );
    assert_eq!(second.range(0)[0].value, "moved");

    let d = &c.range(&Range::key(format!("{p}/d"))).unwrap()[0];
    let guarded = |rev| Txn {
        compares: vec![Compare::ModRevision(format!("{p}/d"), rev)],
        success: vec![Op::put(format!("{p}/d"), "again")],
        failure: vec![],
    };
    assert!(!c.txn(&guarded(d.mod_revision - 1)).unwrap().succeeded);
    assert!(c.txn(&guarded(d.mod_revision)).unwrap().succeeded);

    let delete = Txn {
        success: vec![Op::delete(format!("{p}/d"))],
        ..Txn::default()
    };
    assert!(c.txn(&delete).unwrap().succeeded);
    assert!(c.range(&Range::key(format!("{p}/d"))).unwrap().is_empty());
}

/// `Compare::NoKeyIn` as etcd reads it (the in-memory store's unit tests assume the same):
/// from `start`, included, to `end`, excluded; a deleted key is no key.
#[test]
fn a_range_compare_sees_the_keys_from_start_to_end_exclusive() {
    let etcd = Etcd::shared();
    let p = unique_prefix("client");
    let c = client(&[&etcd.url]);
    assert!(c.compares_ranges().unwrap());
    put(&c, &format!("{p}/5"), "");
    let empty = |start: &str, end: &str| {
        let txn = Txn {
            compares: vec![Compare::NoKeyIn {
                start: format!("{p}/{start}"),
                end: format!("{p}/{end}"),
            }],
            ..Txn::default()
        };
        c.txn(&txn).unwrap().succeeded
    };
    assert!(!empty("1", "9"));
    assert!(!empty("5", "5\0"));
    assert!(empty("1", "5"));
    assert!(empty("50", "9"));
    assert!(empty("6", "9"));
    let delete = Txn {
        success: vec![Op::delete(format!("{p}/5"))],
        ..Txn::default()
    };
    assert!(c.txn(&delete).unwrap().succeeded);
    assert!(empty("1", "9"));
}

/// What etcd makes of a `NoKeyIn` whose `end` is not after `start`: a reversed range is
/// empty, but an empty `end` means the key `start` alone (etcd's `range_end` convention), which
/// is not what `Compare::NoKeyIn`'s `[start, end)` or the in-memory store say.
#[test]
fn an_empty_range_end_compares_the_start_key_alone() {
    let etcd = Etcd::shared();
    let p = unique_prefix("client");
    let c = client(&[&etcd.url]);
    put(&c, &format!("{p}/5"), "");
    let empty = |start: String, end: String| {
        let txn = Txn {
            compares: vec![Compare::NoKeyIn { start, end }],
            ..Txn::default()
        };
        c.txn(&txn).unwrap().succeeded
    };
    assert!(empty(format!("{p}/9"), format!("{p}/1")));
    assert!(empty(format!("{p}/1"), String::new()));
    assert!(!empty(format!("{p}/5"), String::new()));
}

/// An endpoint that answers every request with `/version`'s `body` and closes the
/// connection; anything else it is sent goes unanswered the same way.
fn version_only_endpoint(body: &'static str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().take(8) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

/// During a rolling upgrade from etcd 3.2, a 3.3 member answers `/version` with its own
/// version (`etcdserver`) and the cluster's (`etcdcluster`, the oldest member's). Every
/// member applies each transaction itself, and a 3.2 member ignores `range_end` (a field it
/// does not know), so it compares the range's first key alone: a range compare sent through
/// the 3.3 member would guard nothing on the 3.2 members, and their copies would diverge.
/// Whether ranges may be compared is the cluster's version, not the endpoint's.
#[test]
fn no_range_compare_while_a_member_of_the_cluster_is_still_etcd_3_2() {
    let mixed = version_only_endpoint(r#"{"etcdserver":"3.3.11","etcdcluster":"3.2.0"}"#);
    let c = client(&[&mixed]);
    assert_eq!(c.compares_ranges(), Ok(false));
    let txn = Txn {
        compares: vec![Compare::NoKeyIn {
            start: "/t/a".into(),
            end: "/t/b".into(),
        }],
        ..Txn::default()
    };
    assert_eq!(c.txn(&txn), Err(Error::NoRangeCompares));
}

#[test]
fn a_dead_first_endpoint_is_skipped() {
    let etcd = Etcd::shared();
    let dead = dead_endpoint();
    let c = client(&[&dead, &etcd.url]);
    let p = unique_prefix("failover");
    put(&c, &format!("{p}/k"), "v");
    assert_eq!(
        c.range(&Range::key(format!("{p}/k"))).unwrap()[0].value,
        "v"
    );
}

#[test]
fn no_endpoint_answering_is_an_error_naming_each_one_within_the_timeouts() {
    // One refuses connections, one accepts and never answers.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_url = format!("http://{}", hung.local_addr().unwrap());
    let dead = dead_endpoint();
    let c = client(&[&dead, &hung_url]);
    let started = Instant::now();
    let err = c.range(&Range::key("/k")).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // The hung one was sent the request: what it did with it is unknown.
    let Error::Unanswered(tries) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        tries.iter().map(|(e, _)| e.as_str()).collect::<Vec<_>>(),
        vec![dead.as_str(), hung_url.as_str()]
    );
    let text = err.to_string();
    assert!(text.contains(&dead) && text.contains("timed out"), "{text}");
}

#[test]
fn endpoints_that_refuse_connections_were_never_sent_the_request() {
    let (one, two) = (dead_endpoint(), dead_endpoint());
    let err = client(&[&one, &two]).txn(&Txn::default()).unwrap_err();
    assert!(
        matches!(err, Error::Unreachable(ref tries) if tries.len() == 2),
        "{err:?}"
    );
}

#[test]
fn once_every_endpoint_failed_calls_fail_at_once_until_one_answers_again() {
    let mut etcd = Etcd::start("fail-fast");
    let c = client(&[&etcd.url]);
    let key = format!("{}/k", unique_prefix("fail-fast"));
    put(&c, &key, "v");
    etcd.stop();
    assert!(c.range(&Range::key(&key)).unwrap_err().is_unreachable());

    // Later calls are not sent: they fail at once, with the same reason.
    let started = Instant::now();
    for _ in 0..20 {
        let err = c.range(&Range::key(&key)).unwrap_err();
        assert!(matches!(err, Error::Down { .. }), "{err:?}");
        assert!(err.to_string().contains(&etcd.url), "{err}");
    }
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );

    // A thread watching /health lets calls through again soon after etcd is back.
    etcd.restart();
    let back = Instant::now();
    let deadline = back + Duration::from_secs(10);
    loop {
        match c.range(&Range::key(&key)) {
            Ok(found) => {
                assert_eq!(found[0].value, "v");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "still failing: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        back.elapsed() < Duration::from_secs(3),
        "{:?}",
        back.elapsed()
    );
}

#[test]
fn an_error_from_etcd_carries_its_message() {
    let etcd = Etcd::shared();
    let c = client(&[&etcd.url]);
    // 129 operations: over etcd's default --max-txn-ops.
    let txn = Txn {
        success: (0..129)
            .map(|i| Op::put(format!("/too-many/{i}"), ""))
            .collect(),
        ..Txn::default()
    };
    let err = c.txn(&txn).unwrap_err();
    let Error::Refused {
        endpoint, message, ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(endpoint, &etcd.url);
    assert!(message.contains("too many operations"), "{message}");
}
