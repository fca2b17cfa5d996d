//! Secrets at rest, end to end: the engine on a sled store sealed under a key file, refreshing
//! against the simulator over real sockets. The store directory's files never hold a token; a bad
//! key setup is refused clearly at open; a key rotation with rekey (interrupted, then finished)
//! keeps every grant readable and refreshable under the new key alone.

use std::path::Path;
use std::time::Duration;
use tokenwal::core::{AccessToken, ClientSecret, GrantKey, RefreshToken, ShopDomain, TokenSet};
use tokenwal::store::keys::{replace_key_file, rotate_key_file, write_new_key_file};
use tokenwal::store::{KeyError, Reseal, StoreError};
use tokenwal::{Config, Engine, Error, KeyRing, KeySource, StoreLocation};
use tokenwal_sim::{serve, SimConfig, SimHandle};
use tokenwal_testkit::now;

fn shop(i: usize) -> ShopDomain {
    ShopDomain::parse(&format!("sealed-{i}.myshopify.com")).unwrap()
}

fn config(base: &str, db: &Path, keys: KeySource) -> Config {
    let mut c =
        Config::shopify(StoreLocation::Path(db.to_path_buf()), "sim-client-id", ClientSecret::new("sim-client-secret"))
            .with_insecure_test_endpoint(url::Url::parse(base).unwrap())
            .with_store_keys(keys);
    c.proactive = false;
    c.timeouts.total = Duration::from_secs(3);
    c
}

fn seed(sim: &SimHandle, i: usize) -> TokenSet {
    let t = sim.seed_shop(shop(i).as_str());
    TokenSet {
        access_token: AccessToken::new(t.access_token.as_str()),
        access_expires_at: now(), // expired: the first access_token() refreshes
        refresh_token: RefreshToken::new(t.refresh_token.as_str()),
        refresh_expires_at: None,
        scope: Some(t.scope.clone()),
    }
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

fn assert_not_on_disk(db: &Path, secrets: &[String]) {
    let files = files(db);
    assert!(files.iter().any(|(p, b)| p.ends_with("db") && b.len() > 1000), "sled's data file was written");
    for (p, bytes) in &files {
        for s in secrets {
            assert!(!bytes.windows(s.len()).any(|w| w == s.as_bytes()), "a token is in the clear in {}", p.display());
        }
    }
}

/// Refreshes every shop once (a forced refresh: the stored access token is expired) and returns
/// every token string issued or stored so far.
async fn refresh_all(engine: &Engine, n: usize, secrets: &mut Vec<String>) {
    for i in 0..n {
        let grant = GrantKey::shopify(&shop(i));
        let before = engine.state(&grant).unwrap().unwrap();
        let old = before.tokens.as_ref().unwrap().access_token.clone();
        let t = engine.on_unauthorized(&shop(i), &old).await.unwrap();
        let after = engine.state(&grant).unwrap().unwrap();
        assert!(after.generation > before.generation, "a real refresh happened");
        let tokens = after.tokens.as_ref().unwrap();
        assert_eq!(&tokens.access_token, &t);
        secrets.push(t.expose_secret().to_owned());
        secrets.push(tokens.refresh_token.expose_secret().to_owned());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_sealed_on_disk_and_survive_a_key_rotation() {
    let sim = serve(SimConfig::default(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let base = sim.base_url();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let key_file = dir.path().join("store.key");
    let first_id = write_new_key_file(&key_file).unwrap();
    let n = 4;
    let mut secrets = Vec::new();

    // Install and refresh under the first key; every response is synced before it is used.
    {
        let (engine, _) = Engine::open(config(&base, &db, KeySource::File(key_file.clone()))).await.unwrap();
        for i in 0..n {
            let t = seed(&sim, i);
            secrets.push(t.access_token.expose_secret().to_owned());
            secrets.push(t.refresh_token.expose_secret().to_owned());
            engine.install(&shop(i), t).await.unwrap();
        }
        refresh_all(&engine, n, &mut secrets).await;
        engine.shutdown().await;
    }
    assert_not_on_disk(&db, &secrets);

    // No key, a key file others can read, the wrong key: clear errors at open, nothing opened.
    let missing = dir.path().join("nope.key");
    let err = Engine::open(config(&base, &db, KeySource::File(missing))).await.err().expect("refused");
    assert!(matches!(err, Error::Store(StoreError::Key(KeyError::Io { .. }))), "{err:?}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o604)).unwrap();
        let err = Engine::open(config(&base, &db, KeySource::File(key_file.clone()))).await.err().expect("refused");
        assert!(matches!(err, Error::Store(StoreError::Key(KeyError::UnsafePermissions { .. }))), "{err:?}");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let err = Engine::open(config(&base, &db, KeySource::Ring(KeyRing::ephemeral()))).await.err().expect("refused");
    match &err {
        Error::Store(StoreError::KeyUnavailable { key_id, .. }) => assert_eq!(*key_id, first_id),
        e => panic!("{e:?}"),
    }
    assert!(err.to_string().contains(&first_id.to_string()), "{err}");

    // Rotate: a new active key, the old one kept for reading. The first rekey pass stops half way
    // (each grant's re-seal is its own durable compare-and-swap); the engine reads the mix.
    let rotated = rotate_key_file(&key_file).unwrap();
    assert_eq!(rotated.ids()[1], first_id);
    {
        let (engine, report) = Engine::open(config(&base, &db, KeySource::File(key_file.clone()))).await.unwrap();
        assert!(report.corrupt.is_empty(), "{report:?}");
        let store = engine.store().clone();
        let done = tokio::task::spawn_blocking(move || {
            let todo = store.grants_under_old_keys().unwrap();
            assert_eq!(todo.len(), n);
            todo.iter().take(n / 2).map(|g| store.reseal_blocking(g).unwrap()).collect::<Vec<_>>()
        })
        .await
        .unwrap();
        assert_eq!(done, vec![Reseal::Resealed; n / 2]);
        refresh_all(&engine, n, &mut secrets).await; // new writes are sealed under the new key
        engine.shutdown().await;
    }
    {
        // The re-run finishes (the refreshes above already re-sealed the rest).
        let (engine, _) = Engine::open(config(&base, &db, KeySource::File(key_file.clone()))).await.unwrap();
        let store = engine.store().clone();
        let usage = tokio::task::spawn_blocking(move || {
            for g in store.grants_under_old_keys().unwrap() {
                store.reseal_blocking(&g).unwrap();
            }
            store.key_usage().unwrap()
        })
        .await
        .unwrap();
        assert_eq!(usage.remaining_under_other_keys(rotated.active_id()), 0, "{usage:?}");
        engine.shutdown().await;
    }
    // Drop the old key: everything reads and refreshes under the new key alone.
    replace_key_file(&key_file, &rotated.active_only()).unwrap();
    let (engine, report) = Engine::open(config(&base, &db, KeySource::File(key_file.clone()))).await.unwrap();
    assert!(report.corrupt.is_empty());
    refresh_all(&engine, n, &mut secrets).await;
    engine.shutdown().await;
    drop(engine);
    assert_not_on_disk(&db, &secrets);
}
