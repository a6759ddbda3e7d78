//! Connecting: TLS, NKey and credentials-file authentication, and the
//! durable consumer's limits. TLS and authentication use private
//! nats-servers on ports of their own; the limits use the shared server.

use switchyard_core::{
    Envelope, QueueSpec, SubscribeOptions, Topology, Transport, TransportErrorKind,
};
use switchyard_nats::{NatsConfig, NatsTransport};
use switchyard_testkit::TestCertificates;

mod common;
use common::PrivateServer;

fn port(offset: u16) -> u16 {
    15222 + offset * 1000 + (std::process::id() % 1000) as u16
}

fn store(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sy-nats-{name}-{}", std::process::id()))
}

/// Publishes one message and reads it back through `t`.
async fn round_trip(t: &NatsTransport, queue: &str) {
    t.declare(&Topology::new().queue(QueueSpec::new(queue)))
        .await
        .unwrap();
    t.publish(queue, Envelope::new("t", "hello")).await.unwrap();
    let mut deliveries = t
        .subscribe(queue, SubscribeOptions::default())
        .await
        .unwrap();
    let d = switchyard_testkit::next_delivery(&mut deliveries).await;
    assert_eq!(&d.envelope().payload[..], b"hello");
    d.ack().await.unwrap();
}

/// A private server in `dir` that authenticates clients as `conf` (a
/// server configuration file's text) says; checks that it refuses a client
/// with no credentials, and returns it with its URL.
async fn server_requiring_auth(
    dir: &std::path::Path,
    port: u16,
    conf: &str,
) -> (PrivateServer, String) {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("server.conf");
    std::fs::write(&path, conf).unwrap();
    let server = PrivateServer::start(port, &dir.join("js"), &["-c", path.to_str().unwrap()]);
    server.wait_ready().await;
    let url = format!("nats://127.0.0.1:{port}");
    let err = NatsTransport::connect(NatsConfig::new(&url))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Connection, "{err}");
    (server, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_urls_verify_the_server_against_the_configured_ca() {
    let certs = TestCertificates::generate().unwrap();
    let port = port(0);
    let (cert, key) = (certs.cert_path(), certs.key_path());
    let server = PrivateServer::start(
        port,
        &store("tls"),
        &[
            "--tls",
            "--tlscert",
            cert.to_str().unwrap(),
            "--tlskey",
            key.to_str().unwrap(),
        ],
    );
    server.wait_ready().await;
    let url = format!("tls://localhost:{port}");

    // Not trusting the CA, the handshake fails.
    let err = NatsTransport::connect(NatsConfig::new(&url))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Connection, "{err}");

    let t = NatsTransport::connect(NatsConfig::new(&url).root_certificates(certs.ca_path()))
        .await
        .expect("tls:// with the test CA trusted");
    round_trip(&t, "tls").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_authentication_works_and_the_seed_never_shows() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let dir = store("nkey");
    let (server, url) = server_requiring_auth(
        &dir,
        port(1),
        &format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n",
            user.public_key()
        ),
    )
    .await;

    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    let err = NatsTransport::connect(NatsConfig::new(&url).nkey(stranger.clone()))
        .await
        .unwrap_err();
    assert!(!format!("{err} {err:?}").contains(&stranger));

    let config = NatsConfig::new(&url).nkey(seed.clone());
    assert!(!format!("{config:?}").contains(&seed));
    let t = NatsTransport::connect(config)
        .await
        .expect("the server knows this NKey");
    round_trip(&t, "nkey").await;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A JWT as `nsc` issues them: ed25519 over `header.claims`, signed by
/// `issuer` (the operator for an account, the account for a user).
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": format!("{name}{}", std::process::id()).to_uppercase(),
        "iat": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signature = issuer
        .sign(format!("{header}.{claims}").as_bytes())
        .unwrap();
    format!("{header}.{claims}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// A `.creds` file as `nsc generate creds` writes it.
fn creds(user_jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credentials_file_authenticates_against_an_operator_mode_server() {
    // Decentralized auth as `nsc` sets it up: an operator, its system
    // account (JetStream needs one), an account it signs (with JetStream),
    // and a user the account signs.
    let operator = nkeys::KeyPair::new_operator();
    let system = nkeys::KeyPair::new_account();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "sy-operator",
        serde_json::json!({
            "system_account": system.public_key(),
            "type": "operator",
            "version": 2
        }),
    );
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({
            "limits": { "subs": -1, "data": -1, "payload": -1, "imports": -1,
                        "exports": -1, "wildcards": true, "conn": -1, "leaf": -1 },
            "default_permissions": { "pub": {}, "sub": {} },
            "type": "account",
            "version": 2
        }),
    );
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "sy-account",
        serde_json::json!({
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
            },
            "default_permissions": { "pub": {}, "sub": {} },
            "type": "account",
            "version": 2
        }),
    );
    let user_claims = serde_json::json!({
        "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
        "type": "user", "version": 2
    });
    let user_jwt = jwt(&account, &user.public_key(), "sy-user", user_claims.clone());

    let dir = store("creds");
    let (server, url) = server_requiring_auth(
        &dir,
        port(2),
        &format!(
            "operator: \"{operator_jwt}\"\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{system_jwt}\"\n  {}: \"{account_jwt}\"\n}}\n",
            system.public_key(),
            system.public_key(),
            account.public_key()
        ),
    )
    .await;
    let good = dir.join("user.creds");
    let seed = user.seed().unwrap();
    std::fs::write(&good, creds(&user_jwt, &seed)).unwrap();
    // The same user, vouched for by an account the operator never signed.
    let stranger = nkeys::KeyPair::new_account();
    let forged = dir.join("forged.creds");
    std::fs::write(
        &forged,
        creds(
            &jwt(&stranger, &user.public_key(), "sy-user", user_claims),
            &seed,
        ),
    )
    .unwrap();

    let err = NatsTransport::connect(NatsConfig::new(&url).credentials_file(&forged))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Connection, "{err}");
    assert!(!format!("{err} {err:?}").contains(&seed));

    let config = NatsConfig::new(&url).credentials_file(&good);
    assert!(!format!("{config:?}").contains(&seed));
    let t = NatsTransport::connect(config)
        .await
        .expect("the operator vouches for this user's account");
    round_trip(&t, "creds").await;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_bad_credentials_file_is_a_configuration_error_that_keeps_its_contents_private() {
    let missing = std::env::temp_dir().join("sy-no-such-file.creds");
    let err =
        NatsTransport::connect(NatsConfig::new("nats://127.0.0.1:4222").credentials_file(&missing))
            .await
            .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Config, "{err}");
    assert!(err.to_string().contains("sy-no-such-file.creds"), "{err}");

    let garbled = std::env::temp_dir().join(format!("sy-{}.creds", std::process::id()));
    std::fs::write(&garbled, "SUAM-NOT-A-REAL-SEED-hunter2\n").unwrap();
    let err =
        NatsTransport::connect(NatsConfig::new("nats://127.0.0.1:4222").credentials_file(&garbled))
            .await
            .unwrap_err();
    let _ = std::fs::remove_file(&garbled);
    assert_eq!(err.kind(), TransportErrorKind::Config, "{err}");
    assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
}

fn shared_url() -> String {
    std::env::var("SWITCHYARD_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn remove_stream(js: &async_nats::jetstream::Context, queue: &str) {
    for name in [queue.to_owned(), format!("{queue}_dlq")] {
        let _ = js.delete_stream(&name).await;
    }
}

#[tokio::test]
async fn the_durable_consumer_gets_limits_from_the_subscriber_and_a_too_low_max_deliver_is_refused()
{
    let url = shared_url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let t = NatsTransport::connect(NatsConfig::new(&url)).await.unwrap();

    // Created by a subscriber with concurrency 100 and 3 attempts.
    let q = format!("sy-test-limits-{}", std::process::id());
    t.declare(&Topology::new().queue(QueueSpec::new(&q)))
        .await
        .unwrap();
    let deliveries = t
        .subscribe(
            &q,
            SubscribeOptions::default().prefetch(100).max_attempts(3),
        )
        .await
        .unwrap();
    let stream = js.get_stream(&q).await.unwrap();
    let mut consumer = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("switchyard")
        .await
        .unwrap();
    let config = consumer.info().await.unwrap().config.clone();
    drop(deliveries);
    remove_stream(&js, &q).await;
    assert_eq!(
        config.max_ack_pending, 1600,
        "sixteen times the concurrency"
    );
    assert_eq!(
        config.max_deliver,
        2 * 3 + 1 + 49,
        "above the runtime's budget"
    );

    // A consumer that would give up before the runtime dead-letters.
    let q = format!("sy-test-low-limit-{}", std::process::id());
    t.declare(&Topology::new().queue(QueueSpec::new(&q)))
        .await
        .unwrap();
    js.get_stream(&q)
        .await
        .unwrap()
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("switchyard".into()),
            max_deliver: 5,
            ..Default::default()
        })
        .await
        .unwrap();
    let err = t
        .subscribe(&q, SubscribeOptions::default().max_attempts(3))
        .await
        .err()
        .expect("max_deliver 5 is not above 7 deliveries");
    remove_stream(&js, &q).await;
    assert_eq!(err.kind(), TransportErrorKind::Config, "{err}");
    assert!(err.to_string().contains("max_deliver 5"), "{err}");
}
