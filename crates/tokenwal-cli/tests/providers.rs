//! The `tokenwal` binary with a provider profile from a TOML file: `import` and `token` for
//! Customer Account API grants (`SHOP_ID:CUSTOMER_ID`) against a hand-written token endpoint on
//! loopback, a public client with no secret configured, and a bad file refused naming its line.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokenwal_testkit::cli::Out;

const BIN: &str = env!("CARGO_BIN_EXE_tokenwal");

type Seen = Arc<Mutex<Vec<(String, Option<String>, HashMap<String, String>)>>>;

/// A Customer Account API token endpoint at `/authentication/{shop_id}/oauth/token`, rotating on
/// every request, recording the shop id, the `Authorization` header and the form. The runtime must
/// outlive the test's commands.
fn server() -> (tokio::runtime::Runtime, String, Seen) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = Arc::clone(&seen);
    let base = rt.block_on(async move {
        let app = axum::Router::new().route(
            "/authentication/{shop_id}/oauth/token",
            axum::routing::post(
                move |axum::extract::Path(shop_id): axum::extract::Path<String>,
                      headers: axum::http::HeaderMap,
                      axum::extract::Form(form): axum::extract::Form<HashMap<String, String>>| {
                    let seen = Arc::clone(&s2);
                    async move {
                        let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
                        let n = {
                            let mut g = seen.lock().unwrap();
                            g.push((shop_id, auth, form));
                            g.len()
                        };
                        axum::Json(serde_json::json!({
                            "access_token": format!("cat_SECRET_{n}"),
                            "expires_in": 3600,
                            "refresh_token": format!("crt_SECRET_{n}"),
                        }))
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        base
    });
    (rt, base, seen)
}

fn tokenwal(db: &Path, args: &[&str], stdin: Option<&str>) -> Out {
    tokenwal_testkit::cli::run(BIN, db, args, &[], stdin, true)
}

/// A JSON config serving `provider` from `providers.toml` (written with `toml`), with a client id
/// and no client secret.
fn setup(dir: &Path, provider: &str, toml: &str) -> String {
    let providers = dir.join("providers.toml");
    std::fs::write(&providers, toml).unwrap();
    let config = dir.join("config.json");
    let json = serde_json::json!({
        "client_id": "public-client",
        "providers_file": providers,
        "provider": provider,
    });
    std::fs::write(&config, json.to_string()).unwrap();
    config.to_str().unwrap().to_owned()
}

#[test]
fn import_and_token_for_a_customer_with_a_public_client() {
    let (_rt, base, seen) = server();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let config = setup(
        dir.path(),
        "shopify-customer-account",
        &format!(
            "[providers.shopify-customer-account]\ntoken_url = \"{base}/authentication/{{shop_id}}/oauth/token\"\n"
        ),
    );
    let lines = [
        r#"{"account":"4242:7","access_token":"cat_SECRET_old7","refresh_token":"crt_SECRET_old7","expires_in":1}"#,
        r#"{"account":"4242:8","access_token":"cat_SECRET_old8","refresh_token":"crt_SECRET_old8","expires_in":1}"#,
        r#"{"shop":"a.myshopify.com","access_token":"x_SECRET","refresh_token":"y_SECRET","expires_in":60}"#,
    ]
    .join("\n");
    let out = tokenwal(&db, &["--config", &config, "import"], Some(&lines));
    assert_eq!(out.code, 65, "the Admin API line is invalid here, the others are imported: {out:?}");
    assert!(out.stderr.contains("line 3: missing field `account`"), "{}", out.stderr);
    assert!(out.stderr.contains("imported 2 token set(s)"), "{}", out.stderr);
    assert!(!out.all().contains("SECRET"), "{}", out.all());

    // The access tokens expire in a second: `token` refreshes each customer at its shop.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let out = tokenwal(&db, &["--config", &config, "token", "4242:8"], None);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.trim(), "cat_SECRET_1");
    let out = tokenwal(&db, &["--config", &config, "token", "4242:gid://shopify/Customer/7"], None);
    assert_eq!(out.code, 2, "only the canonical SHOP_ID:CUSTOMER_ID names a grant: {out:?}");
    let out = tokenwal(&db, &["--config", &config, "token", "4242:7"], None);
    assert_eq!((out.code, out.stdout.trim()), (0, "cat_SECRET_2"), "{out:?}");
    // A customer not in the store: 66, and nothing is sent.
    assert_eq!(tokenwal(&db, &["--config", &config, "token", "4242:9"], None).code, 66);

    // `run --once` refreshes every due customer grant of the profile (another shop's here).
    let due =
        r#"{"account":"5151:1","access_token":"cat_SECRET_old1","refresh_token":"crt_SECRET_old1","expires_in":1}"#;
    assert_eq!(tokenwal(&db, &["--config", &config, "import"], Some(due)).code, 0);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let out = tokenwal(&db, &["--config", &config, "run", "--once"], None);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!out.all().contains("SECRET"), "{}", out.all());

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[2].0, "5151");
    assert_eq!(seen[2].2["refresh_token"], "crt_SECRET_old1");
    for ((shop_id, auth, form), rt) in seen.iter().zip(["crt_SECRET_old8", "crt_SECRET_old7"]) {
        assert_eq!(shop_id, "4242");
        assert_eq!(auth, &None, "a public client sends no Authorization");
        let mut keys: Vec<&str> = form.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["client_id", "grant_type", "refresh_token"]);
        assert_eq!((form["client_id"].as_str(), form["refresh_token"].as_str()), ("public-client", rt));
    }
}

#[test]
fn a_bad_providers_file_is_refused_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let config = setup(
        dir.path(),
        "idp",
        "[providers.idp]\ntoken_url = \"https://auth.example.com/t\"\nclient_auth = \"none\"\nrotation = \"sometimes\"\n",
    );
    let out = tokenwal(&db, &["--config", &config, "token", "user-1"], None);
    assert_eq!(out.code, 78, "{out:?}");
    assert!(out.stderr.contains("providers.toml") && out.stderr.contains("line 4"), "{}", out.stderr);
    // An unknown profile name is a configuration error too.
    let config = setup(dir.path(), "idq", "");
    let out = tokenwal(&db, &["--config", &config, "token", "user-1"], None);
    assert_eq!(out.code, 78, "{out:?}");
    assert!(out.stderr.contains("no provider profile \"idq\""), "{}", out.stderr);
}
