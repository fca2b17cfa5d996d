//! Domain types: shops, grants, generations, attempts, token sets and credential fingerprints.

use crate::secret::{AccessToken, LegacyToken, RefreshToken, SessionToken};
use crate::time::UnixMillis;
use serde::{Deserialize, Serialize};
use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Why a string is not a valid shop domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShopDomainError {
    /// The input is empty.
    #[error("shop domain is empty")]
    Empty,
    /// The input is longer than a DNS name may be.
    #[error("shop domain is longer than 253 bytes")]
    TooLong,
    /// The input has leading or trailing whitespace (it is never trimmed).
    #[error("shop domain has leading or trailing whitespace (it is never trimmed: remove it)")]
    Whitespace,
    /// The input contains a byte outside printable ASCII (control characters, non-ASCII look-alikes).
    #[error("shop domain contains a control or non-ASCII character (look-alikes and IDNs are refused)")]
    NotAscii,
    /// The input contains an uppercase ASCII letter (it is never lowercased).
    #[error("shop domain contains uppercase letters (it is never lowercased: write it in lowercase)")]
    Uppercase,
    /// The input does not end in `.myshopify.com`.
    #[error("shop domain must end in .myshopify.com")]
    WrongSuffix,
    /// The part before `.myshopify.com` is not one lowercase DNS label.
    #[error(
        "shop handle must be one label of lowercase ascii letters, digits and '-', \
         starting and ending with a letter or digit, at most 63 bytes, not xn-- or another ??-- form"
    )]
    BadHandle,
}

/// A validated `{handle}.myshopify.com` domain.
///
/// This is the only source of the token endpoint's host, and the client secret is sent there, so
/// validation is strict and never normalises: `Shop.myshopify.com`, ` shop.myshopify.com`,
/// `shop.myshopify.com.evil.com`, `evil.com/x.myshopify.com`, `user@shop.myshopify.com`,
/// IP literals and non-ASCII look-alikes are all errors, not silently rewritten into another host.
///
/// The rule (docs/hostile-input.md): the whole input, byte for byte, must match
/// `^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.myshopify\.com$`, and the handle must not be a reserved
/// `??--` label (RFC 5890 R-LDH: `xn--` punycode and friends). Uppercase and surrounding whitespace
/// are rejected with their own error, never lowercased or trimmed: every input (import files, the
/// engine API, CLI arguments, serde) goes through this one constructor, so no boundary normalises
/// differently from another.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ShopDomain(String);

/// The suffix every Shopify shop domain carries.
pub const MYSHOPIFY_SUFFIX: &str = ".myshopify.com";

impl ShopDomain {
    /// Validates `s` (see the type's rule). Never trims, lowercases or decodes anything.
    pub fn parse(s: &str) -> Result<ShopDomain, ShopDomainError> {
        if s.is_empty() {
            return Err(ShopDomainError::Empty);
        }
        if s.len() > 253 {
            return Err(ShopDomainError::TooLong);
        }
        if s.starts_with(|c: char| c.is_whitespace()) || s.ends_with(|c: char| c.is_whitespace()) {
            return Err(ShopDomainError::Whitespace);
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ShopDomainError::NotAscii);
        }
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ShopDomainError::Uppercase);
        }
        let handle = s.strip_suffix(MYSHOPIFY_SUFFIX).ok_or(ShopDomainError::WrongSuffix)?;
        let bytes = handle.as_bytes();
        let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        let ok = !bytes.is_empty()
            && bytes.len() <= 63
            && bytes.first().is_some_and(alnum)
            && bytes.last().is_some_and(alnum)
            && bytes.iter().all(|b| alnum(b) || *b == b'-')
            && !(bytes.len() >= 4 && &bytes[2..4] == b"--");
        if !ok {
            return Err(ShopDomainError::BadHandle);
        }
        Ok(ShopDomain(s.to_owned()))
    }

    /// The full domain, e.g. `my-shop.myshopify.com`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The handle, e.g. `my-shop` (used in admin deep links).
    pub fn handle(&self) -> &str {
        &self.0[..self.0.len() - MYSHOPIFY_SUFFIX.len()]
    }
}

impl fmt::Debug for ShopDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for ShopDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ShopDomain {
    type Err = ShopDomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ShopDomain::parse(s)
    }
}

impl<'de> Deserialize<'de> for ShopDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ShopDomain::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Why a grant key is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrantKeyError {
    /// Provider ids are 1–32 bytes of `[a-z0-9_-]`.
    #[error("provider id must be 1-32 bytes of [a-z0-9_-]")]
    BadProvider,
    /// Accounts are 1–255 bytes with no control characters and no `/`.
    #[error("account must be 1-255 bytes with no control characters and no '/'")]
    BadAccount,
    /// A Shopify account must be a valid shop domain.
    #[error(transparent)]
    Shop(#[from] ShopDomainError),
    /// A Customer Account API account must be `{shop_id}:{customer_id}`.
    #[error(transparent)]
    Customer(#[from] CustomerAccountError),
}

/// The provider id of Shopify grants.
pub const SHOPIFY: &str = "shopify";

/// The provider id of Shopify Customer Account API grants (one per customer of a shop).
pub const SHOPIFY_CUSTOMER_ACCOUNT: &str = "shopify-customer-account";

/// Why a string is not a Customer Account API account.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CustomerAccountError {
    /// Not `{shop_id}:{customer_id}` (or `{shop_id}:gid://shopify/Customer/{customer_id}`).
    #[error(
        "customer account must be SHOP_ID:CUSTOMER_ID, both positive decimal numbers without sign or leading \
         zeros (the customer may also be written gid://shopify/Customer/ID)"
    )]
    Malformed,
}

/// One customer of one shop at the Customer Account API: the typed account of a
/// [`SHOPIFY_CUSTOMER_ACCOUNT`] grant.
///
/// Both ids are numbers, so the canonical text `{shop_id}:{customer_id}` is injective: two customers
/// never share a key, and no key of one customer parses as another's. The token URL's `{shop_id}` is
/// taken from this key only, so a customer's refresh token is only ever presented to its own shop's
/// endpoint.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct CustomerAccount {
    shop_id: u64,
    customer_id: u64,
}

impl CustomerAccount {
    /// The customer `customer_id` of the shop `shop_id`; both must be non-zero.
    pub fn new(shop_id: u64, customer_id: u64) -> Result<CustomerAccount, CustomerAccountError> {
        if shop_id == 0 || customer_id == 0 {
            return Err(CustomerAccountError::Malformed);
        }
        Ok(CustomerAccount { shop_id, customer_id })
    }

    /// Parses `{shop_id}:{customer_id}`; the customer may be the GraphQL id
    /// `gid://shopify/Customer/{customer_id}`. Never trims or normalises anything else.
    pub fn parse(s: &str) -> Result<CustomerAccount, CustomerAccountError> {
        let (shop, customer) = s.split_once(':').ok_or(CustomerAccountError::Malformed)?;
        let customer = customer.strip_prefix("gid://shopify/Customer/").unwrap_or(customer);
        CustomerAccount::new(decimal(shop)?, decimal(customer)?)
    }

    /// The shop's numeric id (the `{shop_id}` of the token URL).
    pub fn shop_id(&self) -> u64 {
        self.shop_id
    }

    /// The customer's numeric id.
    pub fn customer_id(&self) -> u64 {
        self.customer_id
    }
}

/// A canonical positive decimal: digits only, no leading zero, fits a u64.
fn decimal(s: &str) -> Result<u64, CustomerAccountError> {
    let canonical = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0');
    if !canonical {
        return Err(CustomerAccountError::Malformed);
    }
    s.parse().map_err(|_| CustomerAccountError::Malformed)
}

impl fmt::Display for CustomerAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.shop_id, self.customer_id)
    }
}

impl std::str::FromStr for CustomerAccount {
    type Err = CustomerAccountError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CustomerAccount::parse(s)
    }
}

/// Identifies one grant: a provider and an account at that provider (for Shopify, the shop; for the
/// Customer Account API, one customer of one shop).
///
/// The key is generic so that non-Shopify OAuth providers fit; Shopify keys can only be built from a
/// validated [`ShopDomain`], and [`SHOPIFY_CUSTOMER_ACCOUNT`] keys only from a [`CustomerAccount`]
/// (in its canonical text, so the stored bytes `provider/account` are the same format as every
/// other key's).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GrantKey {
    provider: String,
    account: String,
}

impl GrantKey {
    /// The key of a Shopify shop's grant.
    pub fn shopify(shop: &ShopDomain) -> GrantKey {
        GrantKey { provider: SHOPIFY.to_owned(), account: shop.as_str().to_owned() }
    }

    /// The key of one customer's Customer Account API grant.
    pub fn customer_account(customer: &CustomerAccount) -> GrantKey {
        GrantKey { provider: SHOPIFY_CUSTOMER_ACCOUNT.to_owned(), account: customer.to_string() }
    }

    /// A key for any provider. A `shopify` key must name a valid shop domain; a
    /// `shopify-customer-account` key a [`CustomerAccount`] (stored in its canonical form).
    pub fn new(provider: &str, account: &str) -> Result<GrantKey, GrantKeyError> {
        let p_ok = (1..=32).contains(&provider.len())
            && provider.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !p_ok {
            return Err(GrantKeyError::BadProvider);
        }
        if provider == SHOPIFY {
            return Ok(GrantKey::shopify(&ShopDomain::parse(account)?));
        }
        if provider == SHOPIFY_CUSTOMER_ACCOUNT {
            let customer = CustomerAccount::parse(account)?;
            // Only the canonical text is a key: one customer, one key, whatever was typed.
            if customer.to_string() != account {
                return Err(CustomerAccountError::Malformed.into());
            }
            return Ok(GrantKey::customer_account(&customer));
        }
        let a_ok = (1..=255).contains(&account.len()) && !account.chars().any(|c| c.is_control() || c == '/');
        if !a_ok {
            return Err(GrantKeyError::BadAccount);
        }
        Ok(GrantKey { provider: provider.to_owned(), account: account.to_owned() })
    }

    /// The provider id.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The account at the provider (for Shopify, the shop domain).
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The shop, if this is a Shopify grant.
    pub fn shop(&self) -> Option<ShopDomain> {
        (self.provider == SHOPIFY).then(|| ShopDomain::parse(&self.account).ok()).flatten()
    }

    /// The customer, if this is a Customer Account API grant.
    pub fn customer(&self) -> Option<CustomerAccount> {
        (self.provider == SHOPIFY_CUSTOMER_ACCOUNT).then(|| CustomerAccount::parse(&self.account).ok()).flatten()
    }

    /// A byte key that sorts by provider, then account: `provider / account`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.provider.len() + 1 + self.account.len());
        v.extend_from_slice(self.provider.as_bytes());
        v.push(b'/');
        v.extend_from_slice(self.account.as_bytes());
        v
    }

    /// Parses [`GrantKey::to_bytes`] output, re-validating it.
    pub fn from_bytes(b: &[u8]) -> Result<GrantKey, GrantKeyError> {
        let s = std::str::from_utf8(b).map_err(|_| GrantKeyError::BadAccount)?;
        let (p, a) = s.split_once('/').ok_or(GrantKeyError::BadProvider)?;
        GrantKey::new(p, a)
    }
}

impl fmt::Debug for GrantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.provider, self.account)
    }
}

impl fmt::Display for GrantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.provider, self.account)
    }
}

/// A monotonically increasing counter per grant, bumped by every durable commit of a new token set
/// (refresh, install, exchange). A result computed for an older generation never overwrites a newer one.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug, Default)]
pub struct Generation(pub u64);

impl Generation {
    /// The next generation.
    pub fn next(self) -> Generation {
        Generation(self.0 + 1)
    }
}

/// Identifies one attempt (one request to the token endpoint) within a grant. Never reused.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct AttemptId(pub u64);

/// A set of tokens for one grant. Every expiry comes from a server-supplied lifetime
/// (`expires_in`, `refresh_token_expires_in`) added to the time the response was received.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TokenSet {
    /// The access token.
    pub access_token: AccessToken,
    /// When the access token expires.
    pub access_expires_at: UnixMillis,
    /// The refresh token.
    pub refresh_token: RefreshToken,
    /// When the refresh token expires, if the server said.
    pub refresh_expires_at: Option<UnixMillis>,
    /// Granted scopes as the server reported them (comma-separated for Shopify).
    pub scope: Option<String>,
}

/// A keyed fingerprint of a credential: HMAC-SHA256 under the store's fingerprint key, truncated to
/// 16 bytes. It tells two credentials apart in the journal without storing either.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 16]);

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

/// The secret key of [`Fingerprint`]s. Each store generates one at creation.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct FingerprintKey([u8; 32]);

impl FingerprintKey {
    /// Wraps 32 key bytes.
    pub fn from_bytes(b: [u8; 32]) -> FingerprintKey {
        FingerprintKey(b)
    }

    /// The key bytes (for the store to persist).
    pub fn expose_secret(&self) -> &[u8; 32] {
        &self.0
    }

    /// Fingerprints `credential`; `domain` separates credential kinds so equal strings of different
    /// kinds never collide.
    pub fn fingerprint(&self, domain: &str, credential: &str) -> Fingerprint {
        let full = crate::mac::hmac_sha256(&self.0, &[domain.as_bytes(), &[0], credential.as_bytes()]);
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        Fingerprint(out)
    }

    /// Fingerprint of a refresh token.
    pub fn refresh_token(&self, t: &RefreshToken) -> Fingerprint {
        self.fingerprint("refresh_token", t.expose_secret())
    }

    /// Fingerprint of a session token (the subject of a token exchange).
    pub fn session_token(&self, t: &SessionToken) -> Fingerprint {
        self.fingerprint("session_token", t.expose_secret())
    }

    /// Fingerprint of a legacy non-expiring token (the subject of a migration).
    pub fn legacy_token(&self, t: &LegacyToken) -> Fingerprint {
        self.fingerprint("legacy_token", t.expose_secret())
    }
}

impl fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FingerprintKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_shops() {
        for s in ["a.myshopify.com", "my-shop.myshopify.com", "0shop.myshopify.com", "a-b-c-1.myshopify.com"] {
            let d = ShopDomain::parse(s).unwrap();
            assert_eq!(d.as_str(), s);
        }
        assert_eq!(ShopDomain::parse("my-shop.myshopify.com").unwrap().handle(), "my-shop");
        let long = format!("{}.myshopify.com", "a".repeat(63));
        assert!(ShopDomain::parse(&long).is_ok());
    }

    #[test]
    fn rejects_hostile_shops() {
        for s in [
            "",
            "Shop.myshopify.com",
            " shop.myshopify.com",
            "shop.myshopify.com ",
            "shop.myshopify.com.evil.com",
            "evil.com/x.myshopify.com",
            "user@shop.myshopify.com",
            "shop.myshopify.com:443",
            ".myshopify.com",
            "-shop.myshopify.com",
            "a.b.myshopify.com",
            "127.0.0.1",
            "[::1]",
            "shop.MYSHOPIFY.com",
            "shоp.myshopify.com", // Cyrillic о
            "shop_x.myshopify.com",
            "shop.myshopify.com\n",
            "https://shop.myshopify.com",
        ] {
            assert!(ShopDomain::parse(s).is_err(), "accepted {s:?}");
        }
        let long = format!("{}.myshopify.com", "a".repeat(64));
        assert_eq!(ShopDomain::parse(&long), Err(ShopDomainError::BadHandle));
    }

    #[test]
    fn deserialize_validates() {
        assert!(serde_json::from_str::<ShopDomain>("\"x.myshopify.com\"").is_ok());
        assert!(serde_json::from_str::<ShopDomain>("\"x.evil.com\"").is_err());
    }

    #[test]
    fn grant_keys() {
        let shop = ShopDomain::parse("x.myshopify.com").unwrap();
        let k = GrantKey::shopify(&shop);
        assert_eq!(k.to_string(), "shopify/x.myshopify.com");
        assert_eq!(GrantKey::from_bytes(&k.to_bytes()).unwrap(), k);
        assert_eq!(k.shop(), Some(shop));
        assert!(GrantKey::new("shopify", "evil.com").is_err());
        assert!(GrantKey::new("Bad", "x").is_err());
        assert!(GrantKey::new("oidc", "a/b").is_err());
        assert!(GrantKey::new("oidc", "user-42").is_ok());
    }

    #[test]
    fn customer_account_keys_are_typed_and_canonical() {
        let c = CustomerAccount::new(55_555, 7).unwrap();
        let k = GrantKey::customer_account(&c);
        assert_eq!(k.to_string(), "shopify-customer-account/55555:7");
        assert_eq!(GrantKey::from_bytes(&k.to_bytes()).unwrap(), k, "the stored format round-trips");
        assert_eq!(k.customer(), Some(c));
        assert_eq!(k.shop(), None);
        assert_eq!(GrantKey::shopify(&ShopDomain::parse("x.myshopify.com").unwrap()).customer(), None);
        // Another customer of the same shop, or the same customer id at another shop, is another key.
        assert_ne!(k, GrantKey::customer_account(&CustomerAccount::new(55_555, 8).unwrap()));
        assert_ne!(k, GrantKey::customer_account(&CustomerAccount::new(5_555, 57).unwrap()));
        assert_eq!(CustomerAccount::parse("55555:gid://shopify/Customer/7"), Ok(c));
        assert_eq!(GrantKey::new(SHOPIFY_CUSTOMER_ACCOUNT, "55555:7"), Ok(k));
        for bad in [
            "",
            "55555",
            "55555:",
            ":7",
            "0:7",
            "55555:0",
            "055555:7",
            "55555:07",
            "+5:7",
            " 5:7",
            "5:7 ",
            "5:7:9",
            "5:-7",
            "5:gid://shopify/Order/7",
            "99999999999999999999:7",
            "x.myshopify.com",
        ] {
            assert!(CustomerAccount::parse(bad).is_err(), "accepted {bad:?}");
            assert!(GrantKey::new(SHOPIFY_CUSTOMER_ACCOUNT, bad).is_err(), "accepted {bad:?}");
        }
        // The gid form parses, but only the canonical text is a key.
        assert!(GrantKey::new(SHOPIFY_CUSTOMER_ACCOUNT, "55555:gid://shopify/Customer/7").is_err());
        assert!(GrantKey::from_bytes(b"shopify-customer-account/5:07").is_err());
    }

    #[test]
    fn fingerprints_are_keyed_and_separated() {
        let k1 = FingerprintKey::from_bytes([1; 32]);
        let k2 = FingerprintKey::from_bytes([2; 32]);
        let t = RefreshToken::new("shprt_abc");
        assert_eq!(k1.refresh_token(&t), k1.refresh_token(&t.clone()));
        assert_ne!(k1.refresh_token(&t), k2.refresh_token(&t));
        assert_ne!(k1.fingerprint("a", "x"), k1.fingerprint("b", "x"));
        assert!(!format!("{:?}", k1).contains("01"));
    }
}
