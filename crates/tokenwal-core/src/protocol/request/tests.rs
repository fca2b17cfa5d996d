use super::*;
use crate::domain::ShopDomain;
use crate::secret::{LegacyToken, RefreshToken, SessionToken};
use url::Url;

const SECRET: &str = "client-secret-canary";
const REFRESH: &str = "shprt_refresh-canary";
const SESSION: &str = "session.jwt.canary";
const LEGACY: &str = "shpat_legacy-canary";

fn client() -> ClientCredentials {
    ClientCredentials { id: "the-client-id".into(), secret: ClientSecret::new(SECRET) }
}

fn grant(s: &str) -> GrantKey {
    GrantKey::shopify(&ShopDomain::parse(s).unwrap())
}

fn credentials() -> [(Credential, &'static str); 3] {
    [
        (Credential::RefreshToken(RefreshToken::new(REFRESH)), REFRESH),
        (Credential::SessionToken(SessionToken::new(SESSION)), SESSION),
        (Credential::LegacyToken(LegacyToken::new(LEGACY)), LEGACY),
    ]
}

fn oauth2(client_auth: ClientAuth) -> ProviderSpec {
    ProviderSpec::OAuth2 { token_url: "https://auth.example.com/oauth/token".into(), client_auth }
}

/// The secret's destination is built from the validated shop only: `https`, that host, the
/// default port, no userinfo, a fixed path.
#[test]
fn the_shopify_url_is_the_validated_domain_and_nothing_else() {
    for s in ["a.myshopify.com", "my-shop-1.myshopify.com", "0.myshopify.com"] {
        let raw = ProviderSpec::Shopify.token_url(&grant(s)).unwrap();
        let url = Url::parse(&raw).unwrap();
        assert_eq!(url.as_str(), raw, "the string is already in its serialized form");
        assert_eq!(url.scheme(), "https");
        assert_eq!(url.host_str(), Some(s));
        assert_eq!(url.port_or_known_default(), Some(443));
        assert_eq!(url.port(), None);
        assert!(url.username().is_empty() && url.password().is_none());
        assert_eq!(url.path(), "/admin/oauth/access_token");
        assert_eq!(url.query(), None);
        assert_eq!(url.fragment(), None);
        assert_eq!(url.as_str(), format!("https://{s}/admin/oauth/access_token"));
    }
    let other = GrantKey::new("oidc", "evil.com/x.myshopify.com@evil.com").err();
    assert!(other.is_some(), "accounts cannot hold '/'");
    let other = GrantKey::new("oidc", "user@evil.com").unwrap();
    for spec in [ProviderSpec::Shopify, ProviderSpec::ShopifyTestServer { base: "http://127.0.0.1:1/".into() }] {
        assert_eq!(
            spec.token_url(&other),
            Err(BuildError::NotAShopifyGrant),
            "a non-Shopify grant never becomes a host"
        );
        let refresh = Credential::RefreshToken(RefreshToken::new(REFRESH));
        assert_eq!(build_for(&spec, &client(), &other, &refresh).err(), Some(BuildError::NotAShopifyGrant));
    }
}

/// The test server's URL keeps the validated base's scheme, host and port and is exactly what
/// `Url::path_segments_mut` would make of it.
#[test]
fn the_test_server_url_is_the_base_with_the_shop_in_the_path() {
    let shop = "a.myshopify.com";
    for base in [
        "http://127.0.0.1:8080",
        "http://127.9.9.9",
        "http://[::1]:9",
        "http://localhost:1",
        "http://2130706433",
        "http://127.0.0.1:8080/",
        "http://127.0.0.1:8080/prefix",
        "http://127.0.0.1:8080/prefix/",
        "http://127.0.0.1:8080/a//",
        "https://localhost/x?q=1",
        "http://localhost/x/?q=1#frag",
        "http://localhost#frag",
    ] {
        let base = Url::parse(base).unwrap();
        let mut expected = base.clone();
        expected.path_segments_mut().unwrap().pop_if_empty().extend(["shops", shop, "admin", "oauth", "access_token"]);
        let spec = ProviderSpec::ShopifyTestServer { base: base.as_str().into() };
        let got = spec.token_url(&grant(shop)).unwrap();
        assert_eq!(got, expected.as_str(), "{base}");
        let got = Url::parse(&got).unwrap();
        assert_eq!((got.scheme(), got.host(), got.port()), (base.scheme(), base.host(), base.port()), "{base}");
        assert!(got.path().ends_with("/shops/a.myshopify.com/admin/oauth/access_token"), "{got}");
    }
}

#[test]
fn oauth2_uses_the_configured_url_for_every_grant() {
    let g = GrantKey::new("oidc", "user@example.com").unwrap();
    for auth in [ClientAuth::Body, ClientAuth::Basic] {
        assert_eq!(oauth2(auth).token_url(&g).unwrap(), "https://auth.example.com/oauth/token");
    }
}

/// Shopify: every kind is a JSON body with the client credentials in it and no Basic header.
#[test]
fn shopify_bodies_per_kind() {
    let g = grant("a.myshopify.com");
    for spec in [ProviderSpec::Shopify, ProviderSpec::ShopifyTestServer { base: "http://127.0.0.1:1/".into() }] {
        let c = client();
        for (credential, subject) in credentials() {
            let r = build_for(&spec, &c, &g, &credential).unwrap();
            assert_eq!(r.encoding(), Encoding::Json);
            assert_eq!(r.expose_basic_auth(), None, "Shopify never sends a Basic header");
            let mut expected = vec![("client_id", "the-client-id"), ("client_secret", SECRET)];
            match credential {
                Credential::RefreshToken(_) => {
                    expected.extend([("grant_type", "refresh_token"), ("refresh_token", REFRESH)]);
                }
                Credential::SessionToken(_) | Credential::LegacyToken(_) => {
                    let subject_type = match credential {
                        Credential::SessionToken(_) => "urn:ietf:params:oauth:token-type:id_token",
                        _ => "urn:shopify:params:oauth:token-type:offline-access-token",
                    };
                    expected.extend([
                        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
                        ("subject_token", subject),
                        ("subject_token_type", subject_type),
                        ("requested_token_type", "urn:shopify:params:oauth:token-type:offline-access-token"),
                        ("expiring", "1"),
                    ]);
                }
            }
            assert_eq!(r.expose_fields(), expected.as_slice(), "{credential:?}");
            // The presented credential appears once, under its own field name.
            let carrying: Vec<&str> =
                r.expose_fields().iter().filter(|(_, v)| *v == subject).map(|(n, _)| *n).collect();
            let field =
                if matches!(credential, Credential::RefreshToken(_)) { "refresh_token" } else { "subject_token" };
            assert_eq!(carrying, [field]);
            let secrets: Vec<&str> = r.expose_fields().iter().filter(|(_, v)| *v == SECRET).map(|(n, _)| *n).collect();
            assert_eq!(secrets, ["client_secret"]);
        }
    }
}

/// OAuth 2.0 refresh: a form body; the client secret is in the body (Body) or in the Basic header
/// and nowhere in the body (Basic).
#[test]
fn oauth2_refresh_bodies_per_client_auth() {
    let g = GrantKey::new("oidc", "user@example.com").unwrap();
    let c = client();
    let refresh = Credential::RefreshToken(RefreshToken::new(REFRESH));

    let r = build_for(&oauth2(ClientAuth::Body), &c, &g, &refresh).unwrap();
    assert_eq!(r.encoding(), Encoding::Form);
    assert_eq!(
        r.expose_fields(),
        [
            ("grant_type", "refresh_token"),
            ("refresh_token", REFRESH),
            ("client_id", "the-client-id"),
            ("client_secret", SECRET)
        ]
    );
    assert_eq!(r.expose_basic_auth(), None);

    let r = build_for(&oauth2(ClientAuth::Basic), &c, &g, &refresh).unwrap();
    assert_eq!(r.encoding(), Encoding::Form);
    assert_eq!(r.expose_fields(), [("grant_type", "refresh_token"), ("refresh_token", REFRESH)]);
    assert_eq!(r.expose_basic_auth(), Some(("the-client-id", SECRET)));
    assert_eq!(r.expose_field("client_secret"), None);
    assert_eq!(r.expose_field("client_id"), None);
    assert!(r.expose_fields().iter().all(|(_, v)| *v != SECRET), "the secret is in the header only");
}

#[test]
fn oauth2_has_no_acquisitions() {
    let g = GrantKey::new("oidc", "user@example.com").unwrap();
    let c = client();
    for auth in [ClientAuth::Body, ClientAuth::Basic] {
        for (credential, _) in credentials().into_iter().skip(1) {
            let r = build_for(&oauth2(auth), &c, &g, &credential);
            assert_eq!(r.err(), Some(BuildError::AcquisitionNotSupported), "{credential:?}");
        }
    }
    assert_eq!(BuildError::AcquisitionNotSupported.to_string(), "token exchange and migration are Shopify grants");
    assert_eq!(BuildError::NotAShopifyGrant.to_string(), "not a shopify grant");
}

#[test]
fn every_request_asks_for_json_by_post() {
    assert_eq!(Request::METHOD, "POST");
    assert_eq!(Request::HEADERS, [("accept", "application/json")]);
}

/// `Debug` of a request names fields, never values: no credential and no client secret.
#[test]
fn debug_shows_no_secret() {
    let shop = grant("a.myshopify.com");
    let idp = GrantKey::new("oidc", "user@example.com").unwrap();
    let c = client();
    for (credential, subject) in credentials() {
        let specs =
            [(ProviderSpec::Shopify, &shop), (oauth2(ClientAuth::Body), &idp), (oauth2(ClientAuth::Basic), &idp)];
        for (spec, g) in specs {
            let Ok(r) = build_for(&spec, &c, g, &credential) else { continue };
            let d = format!("{r:?}");
            assert!(!d.contains(subject) && !d.contains(SECRET), "{d}");
            assert!(d.contains("client_id") || d.contains("<redacted>"), "{d}");
        }
    }
}

#[test]
fn response_rules_per_provider() {
    assert_eq!(ProviderSpec::Shopify.response_rules(), ResponseRules::SHOPIFY);
    assert_eq!(
        ProviderSpec::ShopifyTestServer { base: "http://127.0.0.1:1/".into() }.response_rules(),
        ResponseRules::SHOPIFY
    );
    let generic = oauth2(ClientAuth::Basic).response_rules();
    assert!(!generic.require_refresh_token && !generic.require_expires_in);
    assert_eq!(generic.default_access_lifetime, Duration::from_secs(3600));
}
