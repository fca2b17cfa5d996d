//! Helpers shared by the scenarios: percentiles, formatting, `/proc` readings, disk usage, fixtures.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};
use tokenwal::core::{AccessToken, CustomerAccount, GrantKey, RefreshToken, ShopDomain, TokenSet, UnixMillis};

/// The current time by the system clock.
pub fn now() -> UnixMillis {
    UnixMillis::from_system_time(SystemTime::now())
}

/// `{handle}.myshopify.com`. The handle must be `[a-z0-9-]`, at most 63 bytes.
pub fn shop(handle: &str) -> ShopDomain {
    ShopDomain::parse(&format!("{handle}.myshopify.com")).expect("bench shop handles are valid")
}

/// The grant of shop `g{i}`: the naming used by every large store the benches build.
pub fn scale_shop(i: usize) -> ShopDomain {
    shop(&format!("g{i}"))
}

/// Which grants the scale stores hold (`--grants`): Admin API shops (the default) or Customer
/// Account API customers. Child processes learn it from [`KIND_ENV`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `shopify/g{i}.myshopify.com`.
    Admin,
    /// `shopify-customer-account/{shop_id}:{customer_id}`: customer `i` of one of
    /// [`CUSTOMER_SHOPS`] shops.
    Customer,
}

/// The environment variable that hands the kind to child processes.
pub const KIND_ENV: &str = "TOKENWAL_BENCH_GRANTS";

/// How many shops the customers of a customer-account scale store belong to.
pub const CUSTOMER_SHOPS: u64 = 20;

static KIND: OnceLock<Kind> = OnceLock::new();

impl Kind {
    /// The `--grants` value.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Admin => "admin",
            Kind::Customer => "customer-account",
        }
    }

    /// Reads a `--grants` value.
    pub fn parse(s: &str) -> Option<Kind> {
        [Kind::Admin, Kind::Customer].into_iter().find(|k| k.name() == s)
    }
}

/// Sets the kind of this run (once, before anything reads it).
pub fn set_kind(kind: Kind) {
    assert_eq!(*KIND.get_or_init(|| kind), kind, "the grant kind is set once");
}

/// The kind of this run: set by `--grants`, or inherited through [`KIND_ENV`] by a child.
pub fn kind() -> Kind {
    *KIND.get_or_init(|| std::env::var(KIND_ENV).ok().and_then(|v| Kind::parse(&v)).unwrap_or(Kind::Admin))
}

/// The grant `i` of the scale stores: shop `g{i}`, or (customer-account grants) customer
/// `7 000 000 000 000 + i` of shop `68 000 000 000 + i mod 20` — ids of Shopify's usual lengths (11
/// and 13 digits), so the keys are as long as real ones.
pub fn scale_key(i: usize) -> GrantKey {
    match kind() {
        Kind::Admin => GrantKey::shopify(&scale_shop(i)),
        Kind::Customer => {
            let customer =
                CustomerAccount::new(68_000_000_000 + i as u64 % CUSTOMER_SHOPS, 7_000_000_000_000 + i as u64)
                    .expect("non-zero ids");
            GrantKey::customer_account(&customer)
        }
    }
}

/// [`fake_tokens`] shaped for this run's kind: the Customer Account API's tokens get `shcat_` /
/// `shcrt_` prefixes and an OpenID scope (same lengths: real customer tokens may be longer — not
/// confirmed, see docs/benchmarks.md §15).
pub fn scale_tokens(seed: u64, access_expires_at: UnixMillis, refresh_expires_at: UnixMillis) -> TokenSet {
    let t = fake_tokens(seed, access_expires_at, refresh_expires_at);
    match kind() {
        Kind::Admin => t,
        Kind::Customer => TokenSet {
            access_token: AccessToken::new(t.access_token.expose_secret().replacen("shpat_", "shcat_", 1)),
            refresh_token: RefreshToken::new(t.refresh_token.expose_secret().replacen("shprt_", "shcrt_", 1)),
            scope: Some("openid email customer-account-api:full".into()),
            ..t
        },
    }
}

/// splitmix64: deterministic, well-mixed fixture bytes (token strings must not compress or repeat).
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A token set shaped like Shopify's (`shpat_`/`shprt_` + 32 hex characters, a scope).
pub fn fake_tokens(seed: u64, access_expires_at: UnixMillis, refresh_expires_at: UnixMillis) -> TokenSet {
    let h = |k: u64| format!("{:016x}{:016x}", mix(seed.wrapping_mul(4).wrapping_add(k)), mix(seed ^ (k << 56)));
    TokenSet {
        access_token: AccessToken::new(format!("shpat_{}", h(1))),
        access_expires_at,
        refresh_token: RefreshToken::new(format!("shprt_{}", h(2))),
        refresh_expires_at: Some(refresh_expires_at),
        scope: Some("write_products,read_orders".into()),
    }
}

/// Nearest-rank percentile of sorted samples (`p` in 0..=100).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A duration with three significant digits and a unit that fits.
pub fn fmt_dur(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    let (v, unit) = if ns < 1e3 {
        (ns, "ns")
    } else if ns < 1e6 {
        (ns / 1e3, "µs")
    } else if ns < 1e9 {
        (ns / 1e6, "ms")
    } else {
        (ns / 1e9, "s")
    };
    format!("{} {unit}", sig3(v))
}

/// Three significant digits, no exponent.
pub fn sig3(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Bytes as KiB/MiB/GiB with three significant digits.
pub fn fmt_bytes(b: f64) -> String {
    if b < 1024.0 {
        format!("{} B", sig3(b))
    } else if b < 1024.0 * 1024.0 {
        format!("{} KiB", sig3(b / 1024.0))
    } else if b < 1024.0 * 1024.0 * 1024.0 {
        format!("{} MiB", sig3(b / (1024.0 * 1024.0)))
    } else {
        format!("{} GiB", sig3(b / (1024.0 * 1024.0 * 1024.0)))
    }
}

/// A field of `/proc/self/status` in kB (`VmRSS`, `VmHWM`).
pub fn proc_status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system, every thread) of this process, from `/proc/self/stat` (10 ms ticks:
/// `USER_HZ` is 100 on Linux).
pub fn cpu_time() -> Duration {
    try_cpu_time().unwrap_or_default()
}

/// [`cpu_time`], or `None` (with the reason on stderr) if `/proc` cannot be read, e.g. when the
/// process is out of file descriptors.
pub fn try_cpu_time() -> Option<Duration> {
    read_proc("/proc/self/stat").map(|s| stat_cpu(&s))
}

/// CPU time (user + system) of process `pid` so far, if `/proc` can be read.
pub fn process_cpu_time(pid: u32) -> Option<Duration> {
    read_proc(&format!("/proc/{pid}/stat")).map(|s| stat_cpu(&s))
}

fn read_proc(path: &str) -> Option<String> {
    std::fs::read_to_string(path).map_err(|e| eprintln!("cannot read {path}: {e}")).ok()
}

/// utime + stime from a `/proc/.../stat` line (10 ms ticks).
fn stat_cpu(stat: &str) -> Duration {
    // Fields after the command name (which may contain spaces) start at "state" (field 3).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime is field 14, stime 15; `f[0]` is field 3.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// The ids of this process's threads named `name`.
pub fn threads_named(name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
    let mut out: Vec<u32> = entries
        .flatten()
        .filter_map(|e| {
            let tid = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim() == name).then_some(tid)
        })
        .collect();
    out.sort();
    out
}

/// CPU time of one thread of this process.
pub fn thread_cpu(tid: u32) -> Option<Duration> {
    read_proc(&format!("/proc/self/task/{tid}/stat")).map(|s| stat_cpu(&s))
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// The committer thread a store opened by `open` started (threads named `tokenwal-commit` that did
/// not exist before).
pub fn new_committer<T>(open: impl FnOnce() -> T) -> (T, Option<u32>) {
    let before = threads_named("tokenwal-commit");
    let v = open();
    (v, committer_since(&before))
}

/// A thread named `tokenwal-commit` that is not in `before`. A new thread names itself after it
/// starts, so this looks again for up to a second.
pub fn committer_since(before: &[u32]) -> Option<u32> {
    for _ in 0..100 {
        if let Some(t) = threads_named("tokenwal-commit").into_iter().find(|t| !before.contains(t)) {
            return Some(t);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// The machine's CPU time by kind, in clock ticks summed over every CPU (`/proc/stat`'s `cpu` line).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MachineCpu {
    /// Every kind but idle, iowait and steal: what the guest's processes and kernel ran.
    pub busy: u64,
    /// Idle and iowait.
    pub idle: u64,
    /// Time the hypervisor ran something else while this VM had work (a shared host's noise).
    pub steal: u64,
}

impl MachineCpu {
    /// Parses the `cpu` line of `/proc/stat`.
    pub fn parse(stat: &str) -> Option<MachineCpu> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
        let get = |i: usize| v.get(i).copied().unwrap_or(0);
        Some(MachineCpu { busy: get(0) + get(1) + get(2) + get(5) + get(6), idle: get(3) + get(4), steal: get(7) })
    }

    /// What was spent between `earlier` and `self`.
    pub fn since(&self, earlier: &MachineCpu) -> MachineCpu {
        MachineCpu {
            busy: self.busy.saturating_sub(earlier.busy),
            idle: self.idle.saturating_sub(earlier.idle),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }

    fn total(&self) -> f64 {
        (self.busy + self.idle + self.steal).max(1) as f64
    }

    /// The share of the machine's time the hypervisor took.
    pub fn steal_share(&self) -> f64 {
        self.steal as f64 / self.total()
    }

    /// The share of the machine's time its own work ran.
    pub fn busy_share(&self) -> f64 {
        self.busy as f64 / self.total()
    }
}

/// The machine's CPU time now (`None` where `/proc/stat` is not readable).
pub fn machine_cpu() -> Option<MachineCpu> {
    MachineCpu::parse(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The 1-, 5- and 15-minute load averages.
pub fn load_average() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// (apparent bytes, allocated bytes) of every file under `dir`.
pub fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut apparent = 0;
    let mut allocated = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                apparent += m.len();
                allocated += m.blocks() * 512;
            }
        }
    }
    (apparent, allocated)
}

/// Copies a directory tree (regular files and directories).
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}

/// A markdown table printed row by row as measurements arrive.
pub struct Table;

impl Table {
    /// Prints a title, the load average now, and the header.
    pub fn new(title: &str, columns: &[&str]) -> Table {
        println!();
        println!("### {title}");
        println!();
        println!("load average at start: {}", load_average());
        println!();
        println!("| {} |", columns.join(" | "));
        println!("|{}", "---|".repeat(columns.len()));
        Table
    }

    /// Prints one row.
    pub fn row(&self, cells: &[String]) {
        println!("| {} |", cells.join(" | "));
    }
}

/// Parses `key=value` lines (a child process's answer).
pub fn parse_kv(text: &str) -> HashMap<String, String> {
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_cpu_splits_busy_idle_and_steal() {
        let stat = "cpu  100 5 20 300 7 1 2 9 0 0\ncpu0 50 2 10 150 3 0 1 4 0 0\n";
        let m = MachineCpu::parse(stat).expect("parsed");
        assert_eq!(m, MachineCpu { busy: 128, idle: 307, steal: 9 });
        let later = MachineCpu { busy: 228, idle: 407, steal: 59 };
        let d = later.since(&m);
        assert_eq!(d, MachineCpu { busy: 100, idle: 100, steal: 50 });
        assert!((d.steal_share() - 0.2).abs() < 1e-9);
        assert!((d.busy_share() - 0.4).abs() < 1e-9);
        assert_eq!(MachineCpu::parse("intr 1 2 3\n"), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&v, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
        assert_eq!(percentile(&v[..1], 99.0), Duration::from_millis(1));
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_dur(Duration::from_nanos(1234)), "1.23 µs");
        assert_eq!(fmt_dur(Duration::from_millis(250)), "250 ms");
        assert_eq!(fmt_bytes(2048.0), "2.00 KiB");
        assert_eq!(sig3(0.1234), "0.123");
    }

    #[test]
    fn fixtures_are_valid_and_distinct() {
        let a = fake_tokens(1, UnixMillis(0), UnixMillis(1));
        let b = fake_tokens(2, UnixMillis(0), UnixMillis(1));
        assert_eq!(a.access_token.expose_secret().len(), 38);
        assert_ne!(a.refresh_token.expose_secret(), b.refresh_token.expose_secret());
        assert_eq!(scale_key(7).account(), "g7.myshopify.com");
    }

    #[test]
    fn proc_readings() {
        assert!(proc_status_kb("VmRSS") > 0);
        let kv = parse_kv("a=1\nb = x y\nnoise");
        assert_eq!(kv["a"], "1");
        assert_eq!(kv["b"], "x y");
    }
}
