use super::*;
use crate::domain::{CustomerAccount, ShopDomain};
use crate::secret::{LegacyToken, RefreshToken, SessionToken};
use std::time::Duration;
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
    ProviderSpec::oauth2("https://auth.example.com/oauth/token", client_auth)
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
    for auth in [ClientAuth::Body, ClientAuth::Basic, ClientAuth::Public] {
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

    let spec = oauth2(ClientAuth::Body);

    let r = build_for(&spec, &c, &g, &refresh).unwrap();
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

    let spec = oauth2(ClientAuth::Basic);

    let r = build_for(&spec, &c, &g, &refresh).unwrap();
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
    for auth in [ClientAuth::Body, ClientAuth::Basic, ClientAuth::Public] {
        for (credential, _) in credentials().into_iter().skip(1) {
            let spec = oauth2(auth);
            let r = build_for(&spec, &c, &g, &credential);
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
        let specs = [
            (ProviderSpec::Shopify, &shop),
            (oauth2(ClientAuth::Body), &idp),
            (oauth2(ClientAuth::Basic), &idp),
            (oauth2(ClientAuth::Public), &idp),
        ];
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
    assert!(!generic.require_refresh_token && !generic.require_expires_in && !generic.rejected_on_400_401);
    assert_eq!(generic.default_access_lifetime, Duration::from_secs(3600));
}

/// A public client (`none`): `client_id` in the body and the client secret nowhere — not in the
/// body, not in a header — even when the configuration holds one.
#[test]
fn a_public_client_never_sends_a_secret() {
    let g = GrantKey::new("oidc", "user@example.com").unwrap();
    let c = client();
    let refresh = Credential::RefreshToken(RefreshToken::new(REFRESH));
    let spec = oauth2(ClientAuth::Public);
    let r = build_for(&spec, &c, &g, &refresh).unwrap();
    assert_eq!(r.encoding(), Encoding::Form);
    assert_eq!(
        r.expose_fields(),
        [("grant_type", "refresh_token"), ("refresh_token", REFRESH), ("client_id", "the-client-id")]
    );
    assert_eq!(r.expose_basic_auth(), None);
    assert_eq!(r.origin(), None);
    assert!(r.expose_fields().iter().all(|(_, v)| *v != SECRET));
}

/// Where the secret may go, per client authentication: exactly one place, or none.
#[test]
fn the_secret_goes_to_exactly_the_place_its_client_auth_names() {
    let g = GrantKey::new("oidc", "user@example.com").unwrap();
    let c = client();
    let refresh = Credential::RefreshToken(RefreshToken::new(REFRESH));
    for (auth, in_body, in_header) in
        [(ClientAuth::Body, true, false), (ClientAuth::Basic, false, true), (ClientAuth::Public, false, false)]
    {
        let spec = oauth2(auth);
        let r = build_for(&spec, &c, &g, &refresh).unwrap();
        let body: Vec<&str> = r.expose_fields().iter().filter(|(_, v)| v.contains(SECRET)).map(|(n, _)| *n).collect();
        assert_eq!(body, if in_body { vec!["client_secret"] } else { vec![] }, "{auth:?}");
        assert_eq!(r.expose_basic_auth().is_some_and(|(_, p)| p == SECRET), in_header, "{auth:?}");
        assert_eq!(r.expose_basic_auth().is_some(), in_header, "{auth:?}");
    }
}

/// Extra fields follow tokenwal's own, in order; one naming a field tokenwal sets is dropped (a
/// config cannot smuggle a second `client_secret` or `grant_type` in); the `Origin` is passed on.
#[test]
fn extra_fields_and_origin() {
    let g = GrantKey::new("oidc", "user@example.com").unwrap();
    let c = client();
    let refresh = Credential::RefreshToken(RefreshToken::new(REFRESH));
    let spec = ProviderSpec::OAuth2 {
        token_url: "https://auth.example.com/token".into(),
        client_auth: ClientAuth::Public,
        extra_fields: vec![
            ("audience".into(), "api".into()),
            ("client_secret".into(), "smuggled".into()),
            ("resource".into(), "https://api.example.com".into()),
        ],
        origin: Some("https://shop.example.com".into()),
        rules: ResponseRules::OAUTH2,
    };
    let r = build_for(&spec, &c, &g, &refresh).unwrap();
    assert_eq!(
        r.expose_fields(),
        [
            ("grant_type", "refresh_token"),
            ("refresh_token", REFRESH),
            ("client_id", "the-client-id"),
            ("audience", "api"),
            ("resource", "https://api.example.com"),
        ]
    );
    assert_eq!(r.origin(), Some("https://shop.example.com"));
    let d = format!("{r:?}");
    assert!(d.contains("audience") && d.contains("shop.example.com") && !d.contains(REFRESH), "{d}");
}

/// `{shop_id}` and `{shop}` come from the typed grant key only; a grant without the value is
/// refused before anything is sent.
#[test]
fn token_url_placeholders_come_from_the_typed_grant() {
    let customer = GrantKey::customer_account(&CustomerAccount::new(987, 65).unwrap());
    let shop = grant("my-shop.myshopify.com");
    let other = GrantKey::new("oidc", "user@example.com").unwrap();
    let by_id = ProviderSpec::oauth2("https://shopify.com/authentication/{shop_id}/oauth/token", ClientAuth::Public);
    assert_eq!(by_id.token_url(&customer).unwrap(), "https://shopify.com/authentication/987/oauth/token");
    assert_eq!(by_id.token_url(&shop), Err(BuildError::MissingPlaceholder("{shop_id}")));
    assert_eq!(by_id.token_url(&other), Err(BuildError::MissingPlaceholder("{shop_id}")));
    let refresh = Credential::RefreshToken(RefreshToken::new(REFRESH));
    assert!(build_for(&by_id, &client(), &other, &refresh).is_err());

    let by_shop = ProviderSpec::oauth2("https://{shop}/oauth/token", ClientAuth::Basic);
    assert_eq!(by_shop.token_url(&shop).unwrap(), "https://my-shop.myshopify.com/oauth/token");
    assert_eq!(by_shop.token_url(&customer), Err(BuildError::MissingPlaceholder("{shop}")));
    assert_eq!(
        BuildError::MissingPlaceholder("{shop}").to_string(),
        "the token URL needs {shop} and this grant has none"
    );
}

#[test]
fn templates_are_checked() {
    assert_eq!(check_template("https://x.example/{shop_id}/t").unwrap(), "https://x.example/1/t");
    assert_eq!(check_template("https://{shop}/t").unwrap(), "https://a.myshopify.com/t");
    assert_eq!(check_template("https://x.example/t").unwrap(), "https://x.example/t");
    for bad in ["https://x/{shopid}", "https://x/{", "https://x/}", "https://x/{customer_id}", "https://x/{{shop}}"] {
        assert_eq!(check_template(bad), Err(TemplateError::UnknownPlaceholder), "{bad}");
    }
    assert_eq!(check_template("https://{shop}/{shop_id}"), Err(TemplateError::BothPlaceholders));
}
