use super::*;
use tokenwal::core::protocol::{build, ClientCredentials, ResponseRules};
use tokenwal::core::{
    AccessToken, AttemptRequest, ClientSecret, CodecError, CustomerAccount, Durable, DurableLog, FingerprintKey,
    GrantKey, InstallSource, Machine, RefreshToken, Retention, TokenSet, UnixMillis, WriteBatch,
};

const SECRET: &str = "client-secret-canary";
const REFRESH: &str = "refresh-canary";

fn parse(text: &str) -> Providers {
    Providers::parse(text).unwrap_or_else(|e| panic!("{e}"))
}

fn err(text: &str) -> String {
    Providers::parse(text).err().unwrap_or_else(|| panic!("accepted:\n{text}"))
}

#[test]
fn an_empty_file_has_the_two_builtins_unchanged() {
    let p = parse("");
    assert_eq!(p.get("shopify-admin").unwrap(), &ProviderProfile::shopify_admin());
    assert_eq!(p.get("shopify-customer-account").unwrap(), &ProviderProfile::shopify_customer_account());
    assert_eq!(p.profiles.len(), 2);
    let e = p.get("nope").unwrap_err().to_string();
    assert!(e.contains("\"nope\"") && e.contains("shopify-admin, shopify-customer-account"), "{e}");
}

#[test]
fn a_generic_profile_with_every_key() {
    let p = parse(
        r#"
[providers.my-idp]
provider = "idp"
token_url = "https://auth.example.com/oauth/token"
client_auth = "client_secret_basic"
rotation = "family-revoke-on-reuse"
refresh_buffer = "90s"
extra_fields = { audience = "https://api.example.com", resource = "r" }
origin = "https://shop.example.com"
require_expires_in = true
require_refresh_token = true
default_access_lifetime = 600
rejected_on_400_401 = true
"#,
    );
    let idp = p.get("my-idp").unwrap();
    assert_eq!(idp.provider, "idp");
    assert_eq!(idp.rotation, Rotation::FamilyRevokeOnReuse);
    assert_eq!(idp.retry_policy().retention, Retention::SingleUse);
    assert_eq!(idp.refresh_buffer, Duration::from_secs(90));
    assert_eq!(
        idp.spec,
        ProviderSpec::OAuth2 {
            token_url: "https://auth.example.com/oauth/token".into(),
            client_auth: ClientAuth::Basic,
            extra_fields: vec![("audience".into(), "https://api.example.com".into()), ("resource".into(), "r".into())],
            origin: Some("https://shop.example.com".into()),
            rules: ResponseRules {
                require_refresh_token: true,
                require_expires_in: true,
                default_access_lifetime: Duration::from_secs(600),
                rejected_on_400_401: true,
            },
        }
    );
}

#[test]
fn defaults_of_a_new_profile_and_each_rotation() {
    for (name, rotation) in [
        (
            "retain-until-replacement-used",
            Rotation::RetainUntilReplacementUsed { max: Duration::from_secs(30 * 86_400) },
        ),
        ("strict-single-use", Rotation::StrictSingleUse),
        ("family-revoke-on-reuse", Rotation::FamilyRevokeOnReuse),
        ("non-rotating", Rotation::NonRotating),
    ] {
        let p = parse(&format!(
            "[providers.x]\ntoken_url = \"http://127.0.0.1:9/t\"\nclient_auth = \"none\"\nrotation = \"{name}\"\n"
        ));
        let x = p.get("x").unwrap();
        assert_eq!((x.provider.as_str(), x.rotation, x.refresh_buffer), ("x", rotation, Duration::from_secs(300)));
        let ProviderSpec::OAuth2 { rules, client_auth, .. } = &x.spec else { panic!() };
        assert_eq!(*client_auth, ClientAuth::Public);
        assert!(!rules.require_refresh_token, "{name}: generic OAuth 2.0 rules");
    }
    let p = parse(
        "[providers.x]\ntoken_url = \"https://a.example/t\"\nclient_auth = \"client_secret_post\"\n\
         rotation = \"retain-until-replacement-used\"\nretain_max = \"2h\"\n",
    );
    assert_eq!(p.get("x").unwrap().rotation, Rotation::RetainUntilReplacementUsed { max: Duration::from_secs(7200) });
}

#[test]
fn builtins_take_settings_for_their_unconfirmed_points() {
    let p = parse(
        r#"
[providers.shopify-customer-account]
token_url = "https://shopify.com/{shop_id}/auth/oauth/token"
origin = "https://my-store.example"
refresh_buffer = "5m"
rotation = "retain-until-replacement-used"
retain_max = "1h"

[providers.shopify-admin]
refresh_buffer = "10m"
"#,
    );
    let c = p.get("shopify-customer-account").unwrap();
    let grant = GrantKey::customer_account(&CustomerAccount::new(1234, 99).unwrap());
    assert_eq!(c.spec.token_url(&grant).unwrap(), "https://shopify.com/1234/auth/oauth/token");
    assert_eq!(c.rotation, Rotation::RetainUntilReplacementUsed { max: Duration::from_secs(3600) });
    let ProviderSpec::OAuth2 { origin, client_auth, rules, .. } = &c.spec else { panic!() };
    assert_eq!((origin.as_deref(), *client_auth), (Some("https://my-store.example"), ClientAuth::Public));
    assert!(rules.rejected_on_400_401 && rules.require_expires_in, "unset keys keep the built-in's values");
    let a = p.get("shopify-admin").unwrap();
    assert_eq!(a.spec, ProviderSpec::Shopify);
    assert_eq!(a.refresh_buffer, Duration::from_secs(600));
}

/// Every error names the line of what is wrong, and says what would be right.
#[test]
fn every_error_names_the_line() {
    let base = "[providers.x]\ntoken_url = \"https://a.example/t\"\nclient_auth = \"none\"\nrotation = \"strict-single-use\"\n";
    let cases: &[(&str, &str, &str)] = &[
        ("not toml", "x = ", "line 1"),
        ("unknown top-level key", "[provider.x]\n", "unknown field `provider`"),
        ("unknown profile key", &format!("{base}token_uri = \"x\"\n"), "line 5"),
        ("bad client_auth", "[providers.x]\nclient_auth = \"private_key_jwt\"\n", "line 2"),
        ("bad rotation", "[providers.x]\n\nrotation = \"sometimes\"\n", "line 3"),
        ("bad duration", &format!("{base}refresh_buffer = \"soon\"\n"), "line 5"),
        ("negative duration", &format!("{base}refresh_buffer = -1\n"), "line 5"),
        ("bad origin", &format!("{base}origin = \"https://a.example/path\"\n"), "line 5"),
        ("missing keys", "\n[providers.y]\nrefresh_buffer = \"1m\"\n", "needs token_url, client_auth, rotation"),
        ("plain http", "[providers.x]\ntoken_url = \"http://a.example/t\"\nclient_auth = \"none\"\nrotation = \"non-rotating\"\n", "line 2, column 13: [providers.x]: token URL must be https"),
        ("userinfo", "[providers.x]\ntoken_url = \"https://u:p@a.example/t\"\nclient_auth = \"none\"\nrotation = \"non-rotating\"\n", "credentials"),
        ("unknown placeholder", "[providers.x]\ntoken_url = \"https://a.example/{tenant}\"\nclient_auth = \"none\"\nrotation = \"non-rotating\"\n", "placeholder"),
        ("shop_id for another provider", "[providers.x]\ntoken_url = \"https://a.example/{shop_id}\"\nclient_auth = \"none\"\nrotation = \"non-rotating\"\n", "shopify-customer-account"),
        ("bad provider id", &format!("{base}provider = \"Bad Id\"\n"), "line 5"),
        ("reserved extra field", &format!("{base}extra_fields = {{ client_secret = \"x\" }}\n"), "client_secret"),
        ("retain_max without retain", &format!("{base}retain_max = \"1d\"\n"), "retain_max"),
        ("admin wire format", "[providers.shopify-admin]\ntoken_url = \"https://x.example\"\n", "fixed"),
        ("builtin provider id", "[providers.shopify-customer-account]\nprovider = \"other\"\n", "fixed"),
        ("bad profile name", "[providers.My_IdP]\ntoken_url = \"https://a.example/t\"\nclient_auth = \"none\"\nrotation = \"non-rotating\"\n", "line 1, column 1: [providers.My_IdP]: the profile's name"),
        ("duplicate key", &format!("{base}rotation = \"non-rotating\"\n"), "line 5"),
    ];
    for (what, text, expect) in cases {
        let e = err(text);
        assert!(e.contains(expect), "{what}: {e:?} lacks {expect:?}");
        assert!(e.contains("line "), "{what}: {e:?} names no line");
    }
    // The profile-level errors point at the profile's table.
    let e = err("# a comment\n\n[providers.y]\nrefresh_buffer = \"1m\"\n");
    assert!(e.starts_with("line 3") || e.starts_with("line 4"), "{e}");
}

struct Log;
impl DurableLog for Log {
    type Error = CodecError;
    async fn apply(&self, _batch: WriteBatch) -> Result<(), CodecError> {
        Ok(())
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// The refresh the machine plans for `grant` holding [`REFRESH`] (its access token is due).
fn refresh_attempt(grant: GrantKey) -> Durable<AttemptRequest> {
    let machine = Machine::shopify(FingerprintKey::from_bytes([3; 32]));
    let now = UnixMillis(1_800_000_000_000);
    let tokens = TokenSet {
        access_token: AccessToken::new("a"),
        access_expires_at: now,
        refresh_token: RefreshToken::new(REFRESH),
        refresh_expires_at: None,
        scope: None,
    };
    let installed =
        block_on(machine.install(None, grant, tokens, InstallSource::Import, now).make_durable(&Log)).unwrap();
    let pending = machine.plan_attempt(installed.state(), now).unwrap();
    block_on(pending.make_durable(&Log)).unwrap()
}

/// The request each client authentication builds from a parsed profile: where the secret may and
/// may not go. A public client never sends one, though the app's configuration holds one.
#[test]
fn request_bodies_per_client_auth_from_a_file() {
    let client = ClientCredentials { id: "cid".into(), secret: ClientSecret::new(SECRET) };
    for (auth, body_secret, basic) in
        [("client_secret_post", true, false), ("client_secret_basic", false, true), ("none", false, false)]
    {
        let p = parse(&format!(
            "[providers.x]\ntoken_url = \"https://a.example/t\"\nclient_auth = \"{auth}\"\nrotation = \"strict-single-use\"\n\
             extra_fields = {{ scope = \"openid\" }}\n"
        ));
        let spec = &p.get("x").unwrap().spec;
        let attempt = refresh_attempt(GrantKey::new("x", "user-1").unwrap());
        let r = build(spec, &client, attempt.value()).unwrap();
        let names: Vec<&str> = r.expose_fields().iter().map(|(n, _)| *n).collect();
        let mut expected = vec!["grant_type", "refresh_token"];
        if auth != "client_secret_basic" {
            expected.push("client_id");
        }
        if body_secret {
            expected.push("client_secret");
        }
        expected.push("scope");
        assert_eq!(names, expected, "{auth}");
        assert_eq!(r.expose_fields().iter().any(|(_, v)| *v == SECRET), body_secret, "{auth}");
        assert_eq!(r.expose_basic_auth().is_some(), basic, "{auth}");
        assert!(!format!("{r:?}").contains(SECRET), "{auth}");
    }
    // The Customer Account API profile: form body with client_id, no secret, its shop's URL.
    let p = Providers::default();
    let customer = p.get("shopify-customer-account").unwrap();
    let attempt = refresh_attempt(GrantKey::customer_account(&CustomerAccount::new(777, 5).unwrap()));
    let r = build(&customer.spec, &client, attempt.value()).unwrap();
    assert_eq!(r.url(), "https://shopify.com/authentication/777/oauth/token");
    assert_eq!(r.expose_fields(), [("grant_type", "refresh_token"), ("refresh_token", REFRESH), ("client_id", "cid")]);
    assert_eq!(r.expose_basic_auth(), None);
}
