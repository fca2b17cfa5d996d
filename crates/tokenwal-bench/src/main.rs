//! The tokenwal bench binary: the scenarios that need setup, real disks, child processes or large
//! scale. Each prints markdown tables (one row per measurement) to stdout; progress goes to stderr.
//!
//! ```text
//! cargo run --release -p tokenwal-bench -- <scenario> [--quick] [--dir DIR] [options]
//!
//! scenarios:
//!   env        the machine (cores, memory, disk, kernel, load)
//!   journal    2. refresh throughput and latency, sled journal vs in-memory store, 1/16/256/4096 shops
//!   sync       3. the sync floor of the disk, and one durable write alone
//!   recovery   4. open + recover 100k and 1M grants, with 0 and 1% open intents; memory after open
//!   recovery-intents
//!              4b. every grant of a 10k and a 100k store in flight at a crash: open against a fast
//!              simulator, and against one that holds every answer (open returns at its budget)
//!   footprint  5. bytes on disk and resident memory per grant; disk under 10M refreshes (churn)
//!   churn      5b. only the continuous-refresh part of footprint
//!   scheduler  6. the proactive scheduler over 1M grants when nothing is due
//!   per-grant  14. per-grant costs of a 100k and a 1M store: state and disk bytes, open time, RSS,
//!              token latency (first call, cached, refresh); with --grants customer-account for Customer
//!              Account API grants (not part of `all`)
//!   sink       8. the webhook sink's first look at each of 100k grants: whole history vs reverse scan
//!   soak       9. the engine against the simulator for minutes with faults on: RSS, fds, tasks over time
//!              (not part of `all`; --churn-grants N grants, default 10 000; --max-minutes M, default 10)
//!   broker     10. the token call of `tokenwal serve` over its Unix socket, 64 keep-alive clients, beside
//!              the in-process access_token (needs target/release/tokenwal: cargo build --release
//!              --workspace --bins; not part of `all`)
//!   compaction 16. refresh latency (p50/p99/p99.9/max) of the engine against the simulator at 64 and
//!              256 concurrent grants before, during and after one compaction pass (trim to the history
//!              cap, then retention) over a backlog of 1 000 grants × 201 records (not part of `all`;
//!              --churn-grants, --refreshes, --history-per-grant, --retention-hours, --compact-chunk)
//!   layout     10b. disk per grant of candidate history layouts on raw sled under hourly churn (no
//!              store code; --churn-grants, default 10 000; --refreshes, default 48 simulated hours;
//!              --history-per-grant, ring entries, default 8; not part of `all`)
//!   all        everything above (footprint before recovery: recovery also opens the churned store)
//!
//! options:
//!   --quick                tiny sizes: finishes in seconds (a CI smoke run)
//!   --grants KIND          footprint, scheduler, per-grant: the scale stores hold `admin` grants
//!                          (shopify/g{i}.myshopify.com, the default) or `customer-account` grants
//!                          (shopify-customer-account/{shop_id}:{customer_id}, 20 shops; stores named
//!                          customer-grants-N); footprint then skips the churn
//!   --dir DIR              work directory on the disk to measure (default: $TMPDIR/tokenwal-bench);
//!                          the 100k/1M stores are kept there and reused for 4 hours
//!   --refreshes N          churn: total refreshes (default 10 000 000); compaction: the backlog's
//!                          refreshes (default 100 000, spread over its grants); journal: at least
//!                          this many refreshes per cell (default 4 096)
//!   --churn-grants N       churn: fleet size (default 10 000); compaction: backlog grants (default 1 000)
//!   --retention-hours H    churn: journal retention (default 720 = 30 days, the store's default);
//!                          compaction: the store's retention (default a quarter of the history cap)
//!   --history-per-grant N  churn: also trim each grant to its newest N records, as the engine's
//!                          background compaction does (default: no cap, retention only); soak: the
//!                          engine's Compaction::history_per_grant (default 64); compaction: the
//!                          cap the pass trims to (default 64)
//!   --compact-chunk N      compaction: the store's compact_chunk, records per deletion (default 10 000)
//!   --no-pace              compaction: after each blocking task of the pass only yield, instead of
//!                          resting as long as it took (at most 1 s) as the engine's compactor does
//!   --max-minutes M        churn: stop after M minutes of wall time (the rows so far show the trend)
//!   --concurrency A,B,..   journal: concurrencies to run (default 1,16,256,4096); broker: clients (default 64);
//!                          compaction: load grants (default 64,256)
//!   --rate R               broker: also an open-loop row per concurrency, R requests/s in all on a
//!                          schedule (--arrivals); a latency counts from the request's release, or from
//!                          its scheduled time when its client was still waiting for an earlier answer
//!   --arrivals A           broker: the open loop's arrivals, uniform (default: 1/R apart) or poisson
//!                          (exponential gaps of mean 1/R); a pacer thread on the OS timer releases them
//!   --workers N            the bench process's async runtime threads (default 2): broker: the clients'
//!   --broker-workers N     broker: `tokenwal serve --workers N` (default 2, serve's default)
//!   --path engine|store    journal: run only the engine or only the store-only comparison
//!   --path inline|split|journal|state   layout: run only this layout
//!   --soak-ttl D           soak: the access tokens' lifetime (default 60s; each grant rotates every D/2)
//!   --pg URL               journal: also run the engine on a PostgreSQL store at URL (a fresh schema)
//!   --cache-mib N          soak: sled's cache capacity (default 256 MiB, the store's default)
//!   --compact-interval D   soak: the engine's Compaction::interval, time between background compaction
//!                          passes (default 10m; the first pass runs after min(D, 60s))
//!   --soak-retention-secs S soak: the store's journal retention, and also compact at every sample with
//!                          it (default: 30 days, and only the engine's background passes)
//! ```

#![forbid(unsafe_code)]

mod broker;
mod child;
mod compaction;
mod fleet;
mod journal;
mod layout;
mod populate;
mod scale;
mod sink;
mod soak;
mod util;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Command-line options.
pub struct Opts {
    /// Tiny sizes.
    pub quick: bool,
    /// Work directory.
    pub dir: PathBuf,
    /// Churn: total refreshes.
    pub refreshes: Option<u64>,
    /// Churn: grants.
    pub churn_grants: Option<usize>,
    /// Churn: retention in hours.
    pub retention_hours: Option<u64>,
    /// Churn: the per-grant history cap (the engine's `Compaction::history_per_grant`).
    pub history_per_grant: Option<usize>,
    /// Broker: also run open loop at this many requests/s in all.
    pub rate: Option<f64>,
    /// Soak: the access tokens' lifetime (a simulator duration such as `10s`; default 60 s).
    pub soak_ttl: Option<String>,
    /// Churn: wall-time budget.
    pub max_wall: Option<Duration>,
    /// Journal: the concurrencies to run (default 1, 16, 256, 4096).
    pub concurrency: Option<Vec<usize>>,
    /// Journal: only `engine` or only `store`.
    pub path: Option<String>,
    /// journal: also run the engine on a PostgreSQL store at this URL (a fresh schema per run).
    pub pg: Option<String>,
    /// Soak: sled's cache capacity in MiB (default: the store's default, 256).
    pub cache_mib: Option<u64>,
    /// Soak: compact at every sample with this retention.
    pub soak_retention: Option<Duration>,
    /// Soak: the engine's compaction interval (default: `Compaction::default`, 10 minutes).
    pub compact_interval: Option<Duration>,
    /// Fleet: engine processes on the one PostgreSQL store (default 4).
    pub processes: Option<usize>,
    /// Compaction: the store's `compact_chunk` (default: the store's default).
    pub compact_chunk: Option<usize>,
    /// Compaction: sleep after each blocking task of the pass as long as it took.
    pub pace: bool,
    /// Broker: the broker's runtime threads (`tokenwal serve --workers`).
    pub broker_workers: Option<usize>,
    /// The bench process's own runtime threads (default 2).
    pub workers: usize,
    /// Broker: the open loop's arrivals are a Poisson process (default: evenly spaced).
    pub poisson: bool,
}

const SCENARIOS: [&str; 16] = [
    "env",
    "journal",
    "sync",
    "recovery",
    "recovery-intents",
    "footprint",
    "churn",
    "scheduler",
    "per-grant",
    "sink",
    "soak",
    "broker",
    "fleet",
    "compaction",
    "layout",
    "all",
];

fn usage() -> ! {
    eprintln!(
        "usage: tokenwal-bench <{}> [--quick] [--dir DIR] [--grants admin|customer-account] [--refreshes N] [--churn-grants N] \
         [--retention-hours H] [--history-per-grant N] [--max-minutes M] [--concurrency A,B,..] [--rate R] [--path engine|store|inline|split|journal|state] [--pg URL] [--processes N] [--cache-mib N] [--soak-ttl D] [--compact-interval D] [--soak-retention-secs S] [--compact-chunk N] [--no-pace] [--workers N] [--broker-workers N] [--arrivals uniform|poisson]",
        SCENARIOS.join("|")
    );
    std::process::exit(2);
}

fn parse(args: &[String]) -> (String, Opts) {
    let mut scenario = None;
    let mut opts = Opts {
        quick: false,
        dir: std::env::temp_dir().join("tokenwal-bench"),
        refreshes: None,
        churn_grants: None,
        retention_hours: None,
        history_per_grant: None,
        rate: None,
        soak_ttl: None,
        max_wall: None,
        concurrency: None,
        path: None,
        pg: None,
        cache_mib: None,
        soak_retention: None,
        compact_interval: None,
        processes: None,
        compact_chunk: None,
        pace: true,
        broker_workers: None,
        workers: 2,
        poisson: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> String {
            it.next().cloned().unwrap_or_else(|| {
                eprintln!("{name} needs a value");
                usage()
            })
        };
        let number = |v: String| -> u64 { v.replace('_', "").parse().unwrap_or_else(|_| usage()) };
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--no-pace" => opts.pace = false,
            "--grants" => util::set_kind(util::Kind::parse(&value("--grants")).unwrap_or_else(|| usage())),
            "--dir" => opts.dir = PathBuf::from(value("--dir")),
            "--refreshes" => opts.refreshes = Some(number(value("--refreshes"))),
            "--churn-grants" => opts.churn_grants = Some(number(value("--churn-grants")) as usize),
            "--retention-hours" => opts.retention_hours = Some(number(value("--retention-hours"))),
            "--soak-ttl" => opts.soak_ttl = Some(value("--soak-ttl")),
            "--rate" => opts.rate = Some(number(value("--rate")) as f64),
            "--arrivals" => {
                opts.poisson = match value("--arrivals").as_str() {
                    "poisson" => true,
                    "uniform" => false,
                    _ => usage(),
                }
            }
            "--workers" => opts.workers = number(value("--workers")).clamp(1, 64) as usize,
            "--broker-workers" => opts.broker_workers = Some(number(value("--broker-workers")).clamp(1, 64) as usize),
            "--history-per-grant" => {
                opts.history_per_grant = Some(number(value("--history-per-grant")).max(1) as usize)
            }
            "--concurrency" => {
                opts.concurrency =
                    Some(value("--concurrency").split(',').map(|v| number(v.to_owned()) as usize).collect())
            }
            "--path" => {
                let known = ["engine", "store", "inline", "split", "journal", "state"];
                opts.path = Some(value("--path")).filter(|p| known.contains(&p.as_str())).or_else(|| usage())
            }
            "--soak-retention-secs" => {
                opts.soak_retention = Some(Duration::from_secs(number(value("--soak-retention-secs"))))
            }
            "--pg" => opts.pg = Some(value("--pg")),
            "--processes" => opts.processes = Some(value("--processes").parse().unwrap_or_else(|_| usage())),
            "--compact-interval" => {
                let v = value("--compact-interval");
                match v.parse::<tokenwal_sim::SimDuration>() {
                    Ok(d) if d.as_millis() > 0 => opts.compact_interval = Some(d.to_std()),
                    Ok(_) => {
                        eprintln!("--compact-interval must be more than 0");
                        usage()
                    }
                    Err(e) => {
                        eprintln!("--compact-interval {v}: {e}");
                        usage()
                    }
                }
            }
            "--compact-chunk" => opts.compact_chunk = Some(number(value("--compact-chunk")).max(1) as usize),
            "--cache-mib" => opts.cache_mib = Some(number(value("--cache-mib"))),
            "--max-minutes" => opts.max_wall = Some(Duration::from_secs(60 * number(value("--max-minutes")))),
            s if SCENARIOS.contains(&s) && scenario.is_none() => scenario = Some(s.to_owned()),
            _ => usage(),
        }
    }
    (scenario.unwrap_or_else(|| usage()), opts)
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn env(opts: &Opts) {
    let t = util::Table::new("Machine", &["what", "value"]);
    let dir = opts.dir.display().to_string();
    std::fs::create_dir_all(&opts.dir).expect("work dir");
    for (what, value) in [
        ("date (UTC)", sh("date -u '+%Y-%m-%d %H:%M'")),
        ("nproc", sh("nproc")),
        ("CPU", sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2")),
        ("memory (free -h)", sh("free -h | awk '/Mem:/ {print $2\" total, \"$7\" available\"}'")),
        (
            "disk of the work dir (df -h)",
            sh(&format!("df -h {dir} | awk 'NR==2 {{print $1\", \"$2\" total, \"$4\" free\"}}'")),
        ),
        ("file system", sh(&format!("df -T {dir} | awk 'NR==2 {{print $2}}'"))),
        ("kernel", sh("uname -r")),
        ("rustc", sh("rustc --version")),
        ("load average", util::load_average()),
    ] {
        t.row(&[what.to_owned(), value]);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("child") {
        return child::main(&args[1..]);
    }
    let (scenario, opts) = parse(&args);
    if util::kind() != util::Kind::Admin && !["footprint", "scheduler", "per-grant"].contains(&scenario.as_str()) {
        eprintln!("--grants {} works with footprint, scheduler and per-grant only", util::kind().name());
        std::process::exit(2);
    }
    std::fs::create_dir_all(&opts.dir).expect("work dir");
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(opts.workers).enable_all().build().expect("runtime");
    let all = scenario == "all";
    if all || scenario == "env" {
        env(&opts);
    }
    rt.block_on(async {
        if all || scenario == "journal" {
            journal::run(&opts).await;
        }
        if all || scenario == "sync" {
            journal::sync_floor(&opts).await;
        }
        // The footprint scenario builds the churned store that recovery opens as its long-history row.
        if all || scenario == "footprint" {
            scale::footprint(&opts).await;
        }
        if scenario == "churn" {
            scale::churn(&opts).await;
        }
        if all || scenario == "recovery" {
            scale::recovery(&opts).await;
        }
        if all || scenario == "recovery-intents" {
            scale::recovery_intents(&opts).await;
        }
        if all || scenario == "scheduler" {
            scale::scheduler(&opts).await;
        }
        if scenario == "per-grant" {
            scale::per_grant(&opts).await;
        }
        if all || scenario == "sink" {
            sink::run(&opts).await;
        }
        if scenario == "soak" {
            soak::run(&opts).await;
        }
        if scenario == "broker" {
            broker::run(&opts).await;
        }
        if scenario == "fleet" {
            fleet::run(&opts).await;
        }
        if scenario == "compaction" {
            compaction::run(&opts).await;
        }
        if scenario == "layout" {
            layout::run(&opts).await;
        }
    });
}
