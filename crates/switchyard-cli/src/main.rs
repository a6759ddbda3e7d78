//! `switchyard`: topology, publishing, the dead-letter queue and stats, for
//! every broker switchyard runs on, from the same configuration file the
//! consumers use. See `docs/operations.md` for the dead-letter runbook.

use std::collections::{BTreeMap, HashSet};
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use switchyard::config::{redact, Config, TransportKind};
use switchyard::{
    header_names, DeadLetterInfo, Delivery, Envelope, Settlement, SubscribeOptions, Transport,
};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Operate switchyard's queues: topology, publishing, dead letters, stats"
)]
struct Cli {
    /// The configuration file the consumers use.
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_CONFIG",
        default_value = "switchyard.toml"
    )]
    config: PathBuf,
    /// Machine-readable JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Declare or show what the consumers need.
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// Publish a message (or several copies of it).
    Publish(PublishArgs),
    /// Inspect, replay or purge dead-lettered messages.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Queue depth, in-flight count, consumers and oldest message age of
    /// each consumer's source and dead-letter queue.
    Stats,
}

#[derive(Subcommand)]
enum TopologyAction {
    /// Declare every consumer's queue and dead-letter queue, and the topics.
    Apply,
    /// Show each consumer's queues and whether they exist.
    Show,
}

#[derive(Args)]
struct PublishArgs {
    /// The queue or topic.
    #[arg(long)]
    destination: String,
    /// The message type.
    #[arg(long = "type")]
    kind: String,
    /// The payload (JSON) on the command line.
    #[arg(long, conflicts_with = "file")]
    data: Option<String>,
    /// The payload from a file.
    #[arg(long)]
    file: Option<PathBuf>,
    /// A header, `name=value`; repeatable.
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// How many copies (each with its own id).
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// The partition key.
    #[arg(long)]
    partition_key: Option<String>,
    /// The correlation id.
    #[arg(long)]
    correlation_id: Option<String>,
}

#[derive(Args, Clone)]
struct Browse {
    /// Only this consumer's dead-letter queue (default: every consumer's).
    #[arg(long)]
    consumer: Option<String>,
    /// The most messages to look at per queue (they are held unsettled
    /// while the command runs, so this is also the subscription's prefetch).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    limit: u32,
    /// How long to wait for more messages once none arrive.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    wait: Duration,
}

#[derive(Subcommand)]
enum DlqAction {
    /// List dead-lettered messages: id, type, reason, attempts, when
    /// published and dead-lettered, source.
    List {
        #[command(flatten)]
        browse: Browse,
        /// Summarise by `reason` instead.
        #[arg(long, value_parser = ["reason"])]
        group_by: Option<String>,
    },
    /// One message's metadata (the payload only with --show-payload).
    Show {
        /// The message id.
        id: String,
        #[command(flatten)]
        browse: Browse,
        /// Print the payload too (it may hold personal data).
        #[arg(long)]
        show_payload: bool,
    },
    /// Republish messages to their source (or --to) at a bounded rate; each
    /// is removed from the dead-letter queue only once the republish is
    /// confirmed.
    Replay {
        /// The message to replay.
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every message.
        #[arg(long)]
        all: bool,
        /// Messages per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Another destination.
        #[arg(long)]
        to: Option<String>,
        /// Show what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        browse: Browse,
    },
    /// Delete dead-lettered messages.
    Purge {
        /// Only those dead-lettered longer ago than this.
        #[arg(long, value_parser = parse_duration)]
        older_than: Option<Duration>,
        /// Confirm: without it nothing is deleted.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        browse: Browse,
    },
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not name=value"))?;
    if k.is_empty() {
        return Err("a header needs a name".into());
    }
    Ok((k.to_owned(), v.to_owned()))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// A failure: exit code 2 for configuration and usage, 1 otherwise.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(m: impl Into<String>) -> Self {
        Failure {
            code: 2,
            message: m.into(),
        }
    }
    fn run(m: impl std::fmt::Display) -> Self {
        Failure {
            code: 1,
            message: m.to_string(),
        }
    }
}

impl From<switchyard::ConfigError> for Failure {
    fn from(e: switchyard::ConfigError) -> Self {
        Failure::usage(e.to_string())
    }
}

impl From<switchyard::TransportError> for Failure {
    fn from(e: switchyard::TransportError) -> Self {
        Failure::run(e)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", redact(&f.message));
            ExitCode::from(f.code)
        }
    }
}

struct Cx {
    config: Config,
    transport: Arc<dyn Transport>,
    json: bool,
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let config = Config::load(&cli.config)?;
    match config.transport.kind {
        TransportKind::Memory => {
            return Err(Failure::usage(format!(
                "{}: the memory transport lives inside one process; the CLI cannot reach it (use it for demos and tests, and a broker for anything you operate)",
                cli.config.display()
            )))
        }
        TransportKind::Nats if matches!(cli.command, Command::Dlq { .. }) => {
            return Err(Failure::usage(
                "core NATS is at-most-once and has no dead-letter queue; use kind = \"jetstream\"",
            ))
        }
        _ => {}
    }
    // Configuration was checked when loading: failing to connect is a
    // runtime failure (exit 1), not a usage one.
    let transport = config
        .transport()
        .await
        .map_err(|e| Failure::run(e.to_string()))?;
    let cx = Cx {
        config,
        transport,
        json: cli.json,
    };
    let result = match cli.command {
        Command::Topology { action } => topology(&cx, action).await,
        Command::Publish(args) => publish(&cx, args).await,
        Command::Stats => stats(&cx).await,
        Command::Dlq { action } => dlq(&cx, action).await,
    };
    // Settlements may be coalesced for the wire: send them before exiting,
    // or the broker would redeliver what was acknowledged or released.
    let flushed = cx.transport.flush().await;
    result?;
    flushed.map_err(Failure::from)
}

/// Prints rows as a compact table (or JSON).
fn print_table(cx: &Cx, headers: &[&str], rows: &[Vec<String>], json_value: Value) {
    if cx.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json_value).expect("json")
        );
        return;
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn dash(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// `(consumer, source, dead-letter queue)` for the consumers selected.
async fn queues(cx: &Cx, only: Option<&str>) -> Result<Vec<(String, String, String)>, Failure> {
    if let Some(name) = only {
        cx.config.consumer(name)?;
    }
    let mut out = Vec::new();
    for (name, c) in &cx.config.consumers {
        // Consumers sharing a source share its queues: one row each.
        if only.is_some_and(|o| o != name) || out.iter().any(|(_, s, _)| *s == c.source) {
            continue;
        }
        // Looking the source up first lets adapters that keep the
        // dead-letter queue on the broker (SQS tags) report it.
        let _ = cx.transport.queue_stats(&c.source).await;
        let dlq = c
            .dead_letter
            .clone()
            .unwrap_or_else(|| cx.transport.dead_letter_of(&c.source));
        out.push((name.clone(), c.source.clone(), dlq));
    }
    if out.is_empty() {
        return Err(Failure::usage("the configuration has no consumers"));
    }
    Ok(out)
}

async fn topology(cx: &Cx, action: TopologyAction) -> Result<(), Failure> {
    if let TopologyAction::Apply = action {
        cx.transport.declare(&cx.config.topology()).await?;
    }
    let mut rows = Vec::new();
    let mut items = Vec::new();
    for (name, source, dlq) in queues(cx, None).await? {
        for (role, queue) in [("source", &source), ("dead-letter", &dlq)] {
            let state = match cx.transport.queue_stats(queue).await {
                Ok(_) => "exists",
                Err(e) if e.kind() == switchyard::TransportErrorKind::NotFound => "missing",
                Err(e) if e.kind() == switchyard::TransportErrorKind::Unsupported => "unknown",
                Err(e) => return Err(e.into()),
            };
            rows.push(vec![
                name.clone(),
                role.to_owned(),
                queue.clone(),
                state.to_owned(),
            ]);
            items.push(json!({"consumer": name, "role": role, "queue": queue, "state": state}));
        }
    }
    for (topic, t) in &cx.config.topics {
        let subs = t.subscriptions.join(",");
        rows.push(vec![
            "-".into(),
            "topic".into(),
            topic.clone(),
            format!("-> {subs}"),
        ]);
        items.push(json!({"topic": topic, "subscriptions": t.subscriptions}));
    }
    print_table(
        cx,
        &["consumer", "role", "queue", "state"],
        &rows,
        json!(items),
    );
    Ok(())
}

fn progress(cx: &Cx, n: u64, what: &str) -> ProgressBar {
    if n <= 1 || cx.json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(n);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} ({per_sec}, eta {eta})")
            .expect("template"),
    );
    bar.set_message(what.to_owned());
    bar
}

async fn publish(cx: &Cx, args: PublishArgs) -> Result<(), Failure> {
    let payload: Vec<u8> = match (&args.data, &args.file) {
        (Some(d), _) => d.clone().into_bytes(),
        (None, Some(f)) => std::fs::read(f)
            .map_err(|e| Failure::usage(format!("cannot read {}: {e}", f.display())))?,
        (None, None) => {
            if std::io::stdin().is_terminal() {
                return Err(Failure::usage(
                    "no payload: give --data, --file, or pipe it on standard input",
                ));
            }
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| Failure::run(format!("cannot read standard input: {e}")))?;
            buf
        }
    };
    if args.count == 0 {
        return Err(Failure::usage("--count must be at least 1"));
    }
    let bar = progress(cx, args.count, "publishing");
    let mut ids = Vec::new();
    let mut pending = futures_util::stream::FuturesOrdered::new();
    for _ in 0..args.count {
        let mut env = Envelope::new(args.kind.clone(), payload.clone());
        env.content_type = Some("application/json".into());
        env.partition_key = args.partition_key.clone();
        env.correlation_id = args.correlation_id.clone();
        env.producer = Some("switchyard-cli".into());
        for (k, v) in &args.headers {
            env.headers.insert(k.clone(), v.clone());
        }
        ids.push(env.id.to_string());
        let t = Arc::clone(&cx.transport);
        let dest = args.destination.clone();
        pending.push_back(async move { t.publish(&dest, env).await });
        if pending.len() >= 64 {
            pending.next().await.expect("non-empty")?;
            bar.inc(1);
        }
    }
    while let Some(r) = pending.next().await {
        r?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    if cx.json {
        println!(
            "{}",
            json!({"published": args.count, "destination": args.destination, "ids": ids})
        );
    } else {
        println!(
            "published {} message(s) to {}",
            args.count, args.destination
        );
        if args.count == 1 {
            println!("id {}", ids[0]);
        }
    }
    Ok(())
}

async fn stats(cx: &Cx) -> Result<(), Failure> {
    let mut rows = Vec::new();
    let mut items = Vec::new();
    for (name, source, dlq) in queues(cx, None).await? {
        let s = cx.transport.queue_stats(&source).await;
        let d = cx.transport.queue_stats(&dlq).await;
        let (s, d) = (s.ok(), d.ok());
        let age = s
            .as_ref()
            .and_then(|s| s.oldest_age)
            .map(|a| humantime::format_duration(Duration::from_secs(a.as_secs())).to_string());
        rows.push(vec![
            name.clone(),
            source.clone(),
            dash(s.as_ref().and_then(|s| s.depth)),
            dash(s.as_ref().and_then(|s| s.in_flight)),
            dash(s.as_ref().and_then(|s| s.consumers)),
            dash(age.clone()),
            dash(d.as_ref().and_then(|d| d.depth)),
        ]);
        items.push(json!({
            "consumer": name, "source": source, "dead_letter": dlq,
            "depth": s.as_ref().and_then(|s| s.depth),
            "in_flight": s.as_ref().and_then(|s| s.in_flight),
            "consumers": s.as_ref().and_then(|s| s.consumers),
            "oldest_age_secs": s.as_ref().and_then(|s| s.oldest_age).map(|a| a.as_secs()),
            "dead_letter_depth": d.as_ref().and_then(|d| d.depth),
        }));
    }
    print_table(
        cx,
        &[
            "consumer",
            "source",
            "depth",
            "in-flight",
            "consumers",
            "oldest",
            "dead-letters",
        ],
        &rows,
        json!(items),
    );
    Ok(())
}

/// Takes up to `limit` messages from `queue` and holds them unsettled, so
/// that each is seen once; the caller settles or releases every one.
async fn browse(cx: &Cx, queue: &str, b: &Browse) -> Result<Vec<Delivery>, Failure> {
    let mut stream = cx
        .transport
        .subscribe(
            queue,
            SubscribeOptions::default().prefetch(b.limit as usize),
        )
        .await?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut copies = Vec::new();
    while out.len() < b.limit as usize {
        match tokio::time::timeout(b.wait, stream.next()).await {
            Ok(Some(Ok(d))) => {
                if seen.insert(d.envelope().id.clone()) {
                    out.push(d);
                } else {
                    // A second copy (at-least-once brokers): held too, and
                    // given back at the end; released now it would come
                    // straight back and the browse would never go quiet.
                    copies.push(d);
                }
            }
            Ok(Some(Err(e))) => {
                drop(stream);
                release_all(out).await;
                release_all(copies).await;
                return Err(e.into());
            }
            Ok(None) | Err(_) => break,
        }
    }
    drop(stream);
    release_all(copies).await;
    Ok(out)
}

async fn release_all(deliveries: Vec<Delivery>) {
    futures_util::future::join_all(
        deliveries
            .into_iter()
            .map(|d| d.settle(Settlement::Release)),
    )
    .await;
}

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn summary(d: &Delivery, consumer: &str) -> (Vec<String>, Value) {
    let env = d.envelope();
    let info = DeadLetterInfo::read_from(&env.headers);
    let reason = info.as_ref().map(|i| i.reason.as_str().to_owned());
    let row = vec![
        env.id.to_string(),
        env.kind.clone(),
        dash(reason.clone()),
        dash(info.as_ref().map(|i| i.attempts)),
        time(env.occurred_at),
        dash(info.as_ref().map(|i| time(i.at))),
        dash(info.as_ref().map(|i| i.source.clone())),
    ];
    let value = json!({
        "consumer": consumer,
        "id": env.id.as_str(),
        "type": env.kind,
        "reason": reason,
        "detail": info.as_ref().map(|i| redact(&i.detail)),
        "attempts": info.as_ref().map(|i| i.attempts),
        "published": time(env.occurred_at),
        "dead_lettered": info.as_ref().map(|i| time(i.at)),
        "source": info.as_ref().map(|i| i.source.clone()),
    });
    (row, value)
}

const LIST_HEADERS: [&str; 7] = [
    "id",
    "type",
    "reason",
    "attempts",
    "published",
    "dead-lettered",
    "source",
];

async fn dlq(cx: &Cx, action: DlqAction) -> Result<(), Failure> {
    match action {
        DlqAction::List {
            browse: b,
            group_by,
        } => {
            let mut rows = Vec::new();
            let mut items = Vec::new();
            for (name, _, dlq) in queues(cx, b.consumer.as_deref()).await? {
                let held = browse(cx, &dlq, &b).await?;
                for d in &held {
                    let (row, value) = summary(d, &name);
                    rows.push(row);
                    items.push(value);
                }
                release_all(held).await;
            }
            if group_by.is_some() {
                // reason -> (count, first, last dead-lettered)
                let mut groups: BTreeMap<String, (usize, String, String)> = BTreeMap::new();
                for row in &rows {
                    let g = groups
                        .entry(row[2].clone())
                        .or_insert_with(|| (0, row[5].clone(), row[5].clone()));
                    g.0 += 1;
                    g.1 = g.1.clone().min(row[5].clone());
                    g.2 = g.2.clone().max(row[5].clone());
                }
                let grows: Vec<Vec<String>> = groups
                    .iter()
                    .map(|(r, (n, first, last))| {
                        vec![r.clone(), n.to_string(), first.clone(), last.clone()]
                    })
                    .collect();
                let gjson: Vec<Value> = groups
                    .iter()
                    .map(|(r, (n, first, last))| json!({"reason": r, "count": n, "first_dead_lettered": first, "last_dead_lettered": last}))
                    .collect();
                print_table(
                    cx,
                    &["reason", "count", "first", "last"],
                    &grows,
                    json!(gjson),
                );
            } else {
                print_table(cx, &LIST_HEADERS, &rows, json!(items));
            }
            Ok(())
        }
        DlqAction::Show {
            id,
            browse: b,
            show_payload,
        } => {
            for (name, _, dlq) in queues(cx, b.consumer.as_deref()).await? {
                let held = browse(cx, &dlq, &b).await?;
                let found = held.iter().find(|d| d.envelope().id.as_str() == id);
                if let Some(d) = found {
                    let env = d.envelope();
                    let (_, mut value) = summary(d, &name);
                    // Handler errors and headers can quote URLs with
                    // credentials: redacted like everything else.
                    let headers: BTreeMap<&str, String> =
                        env.headers.iter().map(|(k, v)| (k, redact(v))).collect();
                    value["headers"] = json!(headers);
                    value["correlation_id"] = json!(env.correlation_id);
                    value["causation_id"] = json!(env.causation_id);
                    value["partition_key"] = json!(env.partition_key);
                    value["payload_bytes"] = json!(env.payload.len());
                    if show_payload {
                        value["payload"] = json!(String::from_utf8_lossy(&env.payload));
                    }
                    if cx.json {
                        println!("{}", serde_json::to_string_pretty(&value).expect("json"));
                    } else {
                        for (k, v) in value.as_object().expect("object") {
                            let v = match v {
                                Value::String(s) => s.clone(),
                                Value::Null => "-".into(),
                                other => other.to_string(),
                            };
                            println!("{k:<16} {v}");
                        }
                        if !show_payload {
                            println!("(payload hidden; --show-payload prints it)");
                        }
                    }
                    release_all(held).await;
                    return Ok(());
                }
                release_all(held).await;
            }
            Err(Failure::run(format!(
                "no dead-lettered message with id {id:?}"
            )))
        }
        DlqAction::Replay {
            id,
            all,
            rate,
            to,
            dry_run,
            browse: b,
        } => {
            if !rate.is_finite() || !(0.001..=10_000.0).contains(&rate) {
                return Err(Failure::usage(
                    "--rate must be between 0.001 and 10000 messages/s",
                ));
            }
            let mut replayed = Vec::new();
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            // Time spent browsing the next queue does not buy a burst.
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for (name, source, dlq) in queues(cx, b.consumer.as_deref()).await? {
                let held = browse(cx, &dlq, &b).await?;
                let (chosen, rest): (Vec<Delivery>, Vec<Delivery>) = held
                    .into_iter()
                    .partition(|d| all || id.as_deref() == Some(d.envelope().id.as_str()));
                release_all(rest).await;
                let bar = progress(cx, chosen.len() as u64, "replaying");
                let mut chosen = chosen.into_iter();
                while let Some(d) = chosen.next() {
                    // Held too long (a slow --rate): the broker may have given
                    // it to someone else. Stop; a second run replays the rest.
                    if d.lease_deadline()
                        .is_some_and(|t| t <= std::time::Instant::now() + Duration::from_secs(5))
                    {
                        let left = 1 + chosen.len();
                        release_all(std::iter::once(d).chain(chosen).collect()).await;
                        bar.finish_and_clear();
                        eprintln!(
                            "stopped: the lease of the held messages is running out; {left} message(s) of {dlq:?} not replayed (run the command again, or use a higher --rate or a lower --limit)"
                        );
                        break;
                    }
                    let info = DeadLetterInfo::read_from(&d.envelope().headers);
                    let dest = to
                        .clone()
                        .or_else(|| info.map(|i| i.source).filter(|s| !s.is_empty()))
                        .unwrap_or_else(|| source.clone());
                    let id = d.envelope().id.to_string();
                    if dry_run {
                        let _ = d.settle(Settlement::Release).await;
                    } else {
                        ticker.tick().await;
                        let mut env = d.envelope().clone();
                        // Every adapter's dead-letter metadata (reason,
                        // source, JetStream's subject and sequence, ...).
                        let dead_letter: Vec<String> = env
                            .headers
                            .iter()
                            .filter(|(name, _)| name.starts_with(header_names::DEAD_LETTER_PREFIX))
                            .map(|(name, _)| name.to_owned())
                            .collect();
                        for h in dead_letter {
                            env.headers.remove(&h);
                        }
                        env.headers.insert(
                            header_names::REPLAYED_AT,
                            humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                        );
                        // Confirmed republish first; only then is the dead
                        // letter removed.
                        if let Err(e) = cx.transport.publish(&dest, env).await {
                            let _ = d.settle(Settlement::Release).await;
                            bar.finish_and_clear();
                            return Err(Failure::run(format!(
                                "replaying {id} to {dest:?} failed; it stays in {dlq:?}: {e}"
                            )));
                        }
                        if let Err(e) = d.settle(Settlement::Ack).await {
                            bar.finish_and_clear();
                            return Err(Failure::run(format!(
                                "{id} was republished to {dest:?} but not removed from {dlq:?} (it may be replayed twice): {e}"
                            )));
                        }
                        // Sent now, not at exit: an interrupted replay must
                        // not leave replayed messages in the dead-letter queue.
                        cx.transport.flush().await?;
                    }
                    bar.inc(1);
                    replayed.push(json!({"consumer": name, "id": id, "to": dest}));
                }
                bar.finish_and_clear();
            }
            if let (Some(id), true) = (&id, replayed.is_empty()) {
                return Err(Failure::run(format!(
                    "no dead-lettered message with id {id:?}"
                )));
            }
            if cx.json {
                println!("{}", json!({"dry_run": dry_run, "replayed": replayed}));
            } else {
                let verb = if dry_run { "would replay" } else { "replayed" };
                for r in &replayed {
                    println!(
                        "{verb} {} -> {}",
                        r["id"].as_str().unwrap_or(""),
                        r["to"].as_str().unwrap_or("")
                    );
                }
                println!("{verb} {} message(s)", replayed.len());
            }
            Ok(())
        }
        DlqAction::Purge {
            older_than,
            yes,
            browse: b,
        } => {
            if !yes {
                return Err(Failure::usage(
                    "purging deletes dead-lettered messages for good; add --yes to confirm",
                ));
            }
            let now = SystemTime::now();
            let mut purged = 0usize;
            let mut kept = 0usize;
            for (_, _, dlq) in queues(cx, b.consumer.as_deref()).await? {
                let held = browse(cx, &dlq, &b).await?;
                for d in held {
                    let old_enough = match older_than {
                        None => true,
                        Some(age) => DeadLetterInfo::read_from(&d.envelope().headers)
                            .and_then(|i| now.duration_since(i.at).ok())
                            .is_some_and(|a| a >= age),
                    };
                    if old_enough {
                        d.settle(Settlement::Ack).await?;
                        purged += 1;
                    } else {
                        let _ = d.settle(Settlement::Release).await;
                        kept += 1;
                    }
                }
            }
            if cx.json {
                println!("{}", json!({"purged": purged, "kept": kept}));
            } else {
                println!("purged {purged} message(s); kept {kept}");
            }
            Ok(())
        }
    }
}
