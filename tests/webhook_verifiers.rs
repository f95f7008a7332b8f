//! Our Standard Webhooks signatures, checked by verifiers written by others (PyPI
//! `standardwebhooks` and `svix`, in a Python receiver on 127.0.0.1), including signatures
//! made with several keys during a rotation and a request signed with the wrong key.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::python;
use kinsight::webhook::{AttemptOutcome, Sender, SenderConfig, generate_secret};

struct Receiver {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    url: String,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_receiver(secret: &str) -> Receiver {
    let mut child = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/receivers/verify_webhooks.py"
        ))
        .arg(secret)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the Python receiver");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let port = lines.next().expect("port line").expect("read port");
    Receiver {
        child,
        lines,
        url: format!("http://127.0.0.1:{}/hook", port.trim()),
    }
}

fn verdict(receiver: &mut Receiver) -> serde_json::Value {
    let line = receiver
        .lines
        .next()
        .expect("a verdict line")
        .expect("read verdict");
    serde_json::from_str(&line).expect("JSON verdict")
}

#[tokio::test]
async fn third_party_verifiers_accept_our_signatures() {
    kinsight::install_crypto_provider();
    let secret = generate_secret();
    let mut receiver = start_receiver(&secret);
    let guard = kinsight::net::EgressGuard::new(kinsight::net::EgressPolicy::allow_loopback());
    let sender = Sender::new(&SenderConfig::default(), guard).expect("sender");
    let body = serde_json::json!({ "type": "image.completed", "timestamp": "2026-11-29T00:00:00Z", "data": { "imageId": "0", "note": "ünïcödé" } }).to_string();

    let outcome = sender
        .attempt(
            &receiver.url,
            "msg_one",
            &body,
            std::slice::from_ref(&secret),
        )
        .await;
    assert_eq!(outcome, AttemptOutcome::Delivered { status: 204 });
    let v = verdict(&mut receiver);
    assert_eq!(v["id"], "msg_one");
    assert_eq!(v["results"]["standardwebhooks"], true, "{v}");
    assert_eq!(v["results"]["svix"], true, "{v}");

    // During a key rotation every active key signs; a receiver holding either key verifies.
    let old = generate_secret();
    let outcome = sender
        .attempt(&receiver.url, "msg_two", &body, &[old, secret.clone()])
        .await;
    assert_eq!(outcome, AttemptOutcome::Delivered { status: 204 });
    assert_eq!(verdict(&mut receiver)["results"]["svix"], true);

    // Signed with a key the receiver does not have: both verifiers refuse, we see a failure.
    let outcome = sender
        .attempt(&receiver.url, "msg_three", &body, &[generate_secret()])
        .await;
    assert!(
        matches!(
            outcome,
            AttemptOutcome::Failed {
                status: Some(401),
                ..
            }
        ),
        "{outcome:?}"
    );
    let v = verdict(&mut receiver);
    assert_ne!(v["results"]["standardwebhooks"], true, "{v}");
    assert_ne!(v["results"]["svix"], true, "{v}");
}
