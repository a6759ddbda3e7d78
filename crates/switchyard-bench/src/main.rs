//! Throughput of the switchyard consumer runtime against the raw transport.
//!
//! ```sh
//! cargo run -p switchyard-bench --release -- memory
//! cargo run -p switchyard-bench --release -- memory --messages 200000 --concurrency 1,8,32,128 --runs 3 --json
//! ```
//!
//! For every row the bench publishes `--messages` envelopes with a small JSON
//! payload into a fresh memory queue that holds them all (the publish rate),
//! then consumes them until the broker holds none (the consume rate, end to
//! end: pull, decode, handler, settlement). The `raw` row consumes through
//! `Transport::subscribe` and `Delivery::ack` alone, one at a time; the
//! `runtime` rows go through a `Consumer` with a `Router` and a no-op handler
//! at each concurrency, so `vs raw` is the price of the runtime.
//!
//! Every row runs in a child process of its own, on a tokio runtime with two
//! worker threads, so that its peak resident memory (`VmHWM`) is its own and
//! no allocator state carries over from one row to the next. Rates are the
//! median of `--runs` runs, peak memory the largest.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use switchyard_bench::{broker, consume_raw, consume_runtime, payload, publish, runtime};

const USAGE: &str = "\
usage: switchyard-bench memory [options]
       switchyard-bench rabbitmq [--messages N] [--payload BYTES] [--url AMQP_URL] [--runs N]
       switchyard-bench nats [--messages N] [--payload BYTES] [--url NATS_URL] [--runs N]
       switchyard-bench sqs [--messages N] [--payload BYTES] [--url ENDPOINT] [--idle SECS]

options:
  --messages N         messages per run (default 200000)
  --concurrency LIST   consumer concurrency levels, comma-separated (default 1,8,32,128)
  --payload BYTES      payload size in bytes, at least 10 (default 64)
  --runs N             runs per row; rates are the median (default 3)
  --json               print JSON instead of a table";

/// What a row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pipeline {
    /// `Transport::subscribe` + `Delivery::ack`, one delivery at a time.
    Raw,
    /// `Consumer` + `Router` + a no-op handler at this concurrency.
    Runtime(usize),
    /// The same inside the full default middleware stack.
    Stack(usize),
}

impl Pipeline {
    fn name(self) -> &'static str {
        match self {
            Pipeline::Raw => "raw",
            Pipeline::Runtime(_) => "runtime",
            Pipeline::Stack(_) => "stack",
        }
    }

    fn concurrency(self) -> Option<usize> {
        match self {
            Pipeline::Raw => None,
            Pipeline::Runtime(n) | Pipeline::Stack(n) => Some(n),
        }
    }

    fn to_arg(self) -> String {
        match self {
            Pipeline::Raw => "raw".to_owned(),
            Pipeline::Runtime(n) => n.to_string(),
            Pipeline::Stack(n) => format!("stack:{n}"),
        }
    }

    fn from_arg(s: &str) -> Option<Self> {
        match s {
            "raw" => Some(Pipeline::Raw),
            s => match s.strip_prefix("stack:") {
                Some(n) => n.parse().ok().filter(|&n| n > 0).map(Pipeline::Stack),
                None => s.parse().ok().filter(|&n| n > 0).map(Pipeline::Runtime),
            },
        }
    }
}

struct Options {
    messages: u64,
    concurrency: Vec<usize>,
    payload: usize,
    runs: usize,
    json: bool,
}

fn parse_options(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        messages: 200_000,
        concurrency: vec![1, 8, 32, 128],
        payload: 64,
        runs: 3,
        json: false,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--messages" => options.messages = parse_number(value("--messages")?)?,
            "--payload" => options.payload = parse_number(value("--payload")?)?,
            "--runs" => options.runs = parse_number(value("--runs")?)?,
            "--concurrency" => {
                options.concurrency = value("--concurrency")?
                    .split(',')
                    .map(parse_number)
                    .collect::<Result<_, _>>()?;
            }
            "--json" => options.json = true,
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if options.messages == 0 || options.runs == 0 || options.concurrency.contains(&0) {
        return Err("--messages, --runs and every --concurrency level must be at least 1".into());
    }
    if options.payload < 10 {
        return Err("--payload must be at least 10 bytes".into());
    }
    Ok(options)
}

fn parse_number<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.replace('_', "")
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))
}

fn main() -> ExitCode {
    // `SWITCHYARD_BENCH_LOG=<filter>` (e.g. `switchyard_nats=debug`) logs
    // to stderr, for looking into a stall; logging costs throughput.
    if let Ok(filter) = std::env::var("SWITCHYARD_BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("memory") => parse_options(&args[1..]).and_then(|o| run_table(&o)),
        Some("rabbitmq") => run_rabbit(&args[1..]),
        Some("nats") => run_nats(&args[1..]),
        Some("sqs") => run_sqs(&args[1..]),
        // The parent runs each row as `__row <pipeline> <messages> <payload>`.
        Some("__row") => run_child(&args[1..]),
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// One run of one row, as a child process reports it.
struct Run {
    publish: Duration,
    consume: Duration,
    peak_kib: u64,
}

struct Row {
    pipeline: Pipeline,
    publish_rate: f64,
    consume_rate: f64,
    /// Messages over publish and consume time together.
    end_to_end_rate: f64,
    peak_mib: f64,
}

fn run_table(options: &Options) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let pipelines = std::iter::once(Pipeline::Raw)
        .chain(options.concurrency.iter().map(|&n| Pipeline::Runtime(n)))
        .chain(options.concurrency.iter().map(|&n| Pipeline::Stack(n)));
    let mut rows = Vec::new();
    for pipeline in pipelines {
        let mut runs = Vec::with_capacity(options.runs);
        for _ in 0..options.runs {
            let output = Command::new(&exe)
                .args(["__row", &pipeline.to_arg()])
                .arg(options.messages.to_string())
                .arg(options.payload.to_string())
                .output()
                .map_err(|e| format!("cannot run a child: {e}"))?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            if !output.status.success() {
                return Err(format!(
                    "row {pipeline:?} failed: {}{}",
                    stdout,
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
            runs.push(
                parse_run(&stdout).ok_or_else(|| format!("cannot read child output {stdout:?}"))?,
            );
        }
        let n = options.messages as f64;
        rows.push(Row {
            pipeline,
            publish_rate: median(runs.iter().map(|r| n / r.publish.as_secs_f64()).collect()),
            consume_rate: median(runs.iter().map(|r| n / r.consume.as_secs_f64()).collect()),
            end_to_end_rate: median(
                runs.iter()
                    .map(|r| n / (r.publish + r.consume).as_secs_f64())
                    .collect(),
            ),
            peak_mib: runs.iter().map(|r| r.peak_kib).max().unwrap_or(0) as f64 / 1024.0,
        });
    }
    let raw = rows[0].consume_rate;
    if options.json {
        print_json(options, &rows, raw);
    } else {
        print_table(options, &rows, raw);
    }
    Ok(())
}

fn parse_run(stdout: &str) -> Option<Run> {
    let mut fields = stdout
        .lines()
        .find_map(|l| l.strip_prefix("run "))?
        .split_whitespace();
    let mut next = || fields.next()?.parse::<u64>().ok();
    Some(Run {
        publish: Duration::from_nanos(next()?),
        consume: Duration::from_nanos(next()?),
        peak_kib: next()?,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn print_table(options: &Options, rows: &[Row], raw: f64) {
    println!(
        "memory transport: {} messages of {} bytes, 2 worker threads, median of {} run(s)",
        options.messages, options.payload, options.runs
    );
    println!(
        "{:<9} {:>11} {:>14} {:>14} {:>7} {:>15} {:>9}",
        "pipeline",
        "concurrency",
        "publish msg/s",
        "consume msg/s",
        "vs raw",
        "end-to-end msg/s",
        "peak MiB"
    );
    for row in rows {
        let concurrency = row
            .pipeline
            .concurrency()
            .map_or("-".to_owned(), |n| n.to_string());
        println!(
            "{:<9} {:>11} {:>14.0} {:>14.0} {:>7.2} {:>16.0} {:>9.1}",
            row.pipeline.name(),
            concurrency,
            row.publish_rate,
            row.consume_rate,
            row.consume_rate / raw,
            row.end_to_end_rate,
            row.peak_mib
        );
    }
}

fn print_json(options: &Options, rows: &[Row], raw: f64) {
    let rows: Vec<String> = rows
        .iter()
        .map(|row| {
            let concurrency = row.pipeline.concurrency().map_or("null".to_owned(), |n| n.to_string());
            format!(
                r#"{{"pipeline":"{}","concurrency":{},"publish_per_sec":{:.0},"consume_per_sec":{:.0},"vs_raw":{:.3},"end_to_end_per_sec":{:.0},"peak_mib":{:.1}}}"#,
                row.pipeline.name(),
                concurrency,
                row.publish_rate,
                row.consume_rate,
                row.consume_rate / raw,
                row.end_to_end_rate,
                row.peak_mib
            )
        })
        .collect();
    println!(
        r#"{{"transport":"memory","messages":{},"payload_bytes":{},"worker_threads":2,"runs":{},"rows":[{}]}}"#,
        options.messages,
        options.payload,
        options.runs,
        rows.join(",")
    );
}

fn run_child(args: &[String]) -> Result<(), String> {
    let [pipeline, messages, payload] = args else {
        return Err("__row needs <pipeline> <messages> <payload>".into());
    };
    let pipeline = Pipeline::from_arg(pipeline).ok_or("bad pipeline")?;
    let messages: u64 = parse_number(messages)?;
    let payload: usize = parse_number(payload)?;
    let runtime = runtime().map_err(|e| e.to_string())?;
    // Everything runs on the two workers; `block_on` only waits.
    let (publish, consume) = runtime
        .block_on(async move { tokio::spawn(measure(pipeline, messages, payload)).await })
        .map_err(|e| e.to_string())??;
    drop(runtime);
    println!(
        "run {} {} {}",
        publish.as_nanos(),
        consume.as_nanos(),
        peak_kib().unwrap_or(0)
    );
    Ok(())
}

/// Publishes `messages`, then consumes them through `pipeline`; returns both
/// durations.
async fn measure(
    pipeline: Pipeline,
    messages: u64,
    payload_size: usize,
) -> Result<(Duration, Duration), String> {
    let capacity = usize::try_from(messages).map_err(|e| e.to_string())?;
    let broker = broker(capacity).await?;
    let payload = payload(payload_size);
    let started = Instant::now();
    publish(&broker, messages, &payload).await?;
    let published = started.elapsed();
    let consumed = match pipeline {
        Pipeline::Raw => consume_raw(&broker, messages).await?,
        Pipeline::Runtime(concurrency) => {
            consume_runtime(&broker, messages, concurrency, false).await?
        }
        Pipeline::Stack(concurrency) => {
            consume_runtime(&broker, messages, concurrency, true).await?
        }
    };
    Ok((published, consumed))
}

/// The peak resident set size of this process, in KiB.
fn peak_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The options of a broker workload.
struct BrokerRun {
    messages: u64,
    size: usize,
    url: String,
    /// Every workload runs this many times (interleaved); each rate is the
    /// median.
    runs: usize,
}

impl BrokerRun {
    /// `[--messages N] [--payload BYTES] [--url URL] [--runs N]`.
    fn parse(args: &[String], default_url: &str) -> Result<Self, String> {
        let mut run = BrokerRun {
            messages: 20_000,
            size: 256,
            url: default_url.to_owned(),
            runs: 1,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
            match arg.as_str() {
                "--messages" => run.messages = parse_number(value("--messages")?)?,
                "--payload" => run.size = parse_number(value("--payload")?)?,
                "--url" => run.url = value("--url")?.clone(),
                "--runs" => run.runs = parse_number::<usize>(value("--runs")?)?.max(1),
                other => return Err(format!("unknown option {other:?}\n{USAGE}")),
            }
        }
        Ok(run)
    }

    /// Runs `workload` `runs` times on a worker of the bench's runtime (not
    /// on the thread that blocks on it).
    fn measure<F, Fut>(&self, workload: F) -> Result<Measured, String>
    where
        F: Fn(String, u64, usize) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<switchyard_bench::rabbit::Rate>, String>>
            + Send
            + 'static,
    {
        let rt = runtime().map_err(|e| e.to_string())?;
        let mut runs: Vec<Vec<switchyard_bench::rabbit::Rate>> = Vec::new();
        for _ in 0..self.runs {
            let work = workload(self.url.clone(), self.messages, self.size);
            let rates =
                rt.block_on(async move { tokio::spawn(work).await.map_err(|e| e.to_string())? })?;
            if self.runs > 1 {
                let each: Vec<String> = rates.iter().map(|r| format!("{:.0}", r.per_sec)).collect();
                eprintln!("run: {}", each.join(" "));
            }
            runs.push(rates);
        }
        Ok(Measured { runs })
    }
}

/// Every run's rates, in the same order each time.
struct Measured {
    runs: Vec<Vec<switchyard_bench::rabbit::Rate>>,
}

impl Measured {
    /// The workloads, each with the median of its rates.
    fn rates(&self) -> Vec<(&'static str, f64)> {
        let first = self.runs.first().map_or(&[][..], Vec::as_slice);
        (0..first.len())
            .map(|i| {
                let each = self.runs.iter().filter_map(|r| r.get(i)).map(|r| r.per_sec);
                (first[i].name, median(each.collect()))
            })
            .collect()
    }

    /// The median over runs of workload `a`'s rate over workload `b`'s in
    /// the same run: steadier than a ratio of medians on a machine whose
    /// speed drifts between runs.
    fn ratio(&self, a: usize, b: usize) -> f64 {
        let each = self
            .runs
            .iter()
            .filter_map(|r| Some(r.get(a)?.per_sec / r.get(b)?.per_sec));
        median(each.collect())
    }
}

/// Raw lapin and switchyard against the same RabbitMQ, in one run.
fn run_rabbit(args: &[String]) -> Result<(), String> {
    let run = BrokerRun::parse(args, "amqp://guest:guest@127.0.0.1:5672/%2f")?;
    let measured = run.measure(|url, messages, size| async move {
        switchyard_bench::rabbit::run(&url, messages, size).await
    })?;
    let rates = measured.rates();
    let BrokerRun { messages, size, .. } = run;
    println!(
        "RabbitMQ: {messages} messages of {size} bytes, prefetch {}, 2 worker threads, median of {} run(s); ratios are medians of each run's ratio",
        switchyard_bench::rabbit::PREFETCH,
        measured.runs.len()
    );
    let find = |prefix: &str| {
        rates
            .iter()
            .position(|(name, _)| name.starts_with(prefix))
            .ok_or_else(|| format!("no workload {prefix:?}"))
    };
    let raw_publish = find("publish raw lapin (")?;
    let raw_multi = find("consume raw lapin, multiple-ack every")?;
    let raw_publish_same = find("publish raw lapin, same")?;
    let raw_multi_same = find("consume raw lapin, multiple-ack, same")?;
    println!(
        "{:<48} {:>10} {:>14} {:>17}",
        "", "msg/s", "vs raw (bare)", "vs raw (same msgs)"
    );
    for (i, (name, per_sec)) in rates.iter().enumerate() {
        let (bare, same) = if name.starts_with("publish") {
            (raw_publish, raw_publish_same)
        } else {
            (raw_multi, raw_multi_same)
        };
        println!(
            "{:<48} {:>10.0} {:>14.2} {:>17.2}",
            name,
            per_sec,
            measured.ratio(i, bare),
            measured.ratio(i, same)
        );
    }
    Ok(())
}

/// Raw async-nats and switchyard against the same NATS server, in one run.
fn run_nats(args: &[String]) -> Result<(), String> {
    let run = BrokerRun::parse(args, "nats://127.0.0.1:4222")?;
    let measured = run.measure(|url, messages, size| async move {
        switchyard_bench::nats::run(&url, messages, size).await
    })?;
    let rates = measured.rates();
    let BrokerRun { messages, size, .. } = run;
    println!(
        "NATS: {messages} messages of {size} bytes, window {}, prefetch {}, 2 worker threads, median of {} run(s); ratios are medians of each run's ratio",
        switchyard_bench::nats::WINDOW,
        switchyard_bench::nats::PREFETCH,
        measured.runs.len()
    );
    // Each group: raw bare, raw with the same messages, switchyard.
    for group in (0..rates.len()).collect::<Vec<_>>().chunks(3) {
        let &[bare, same, ours] = group else {
            // Part of a group (`SWITCHYARD_BENCH_ONLY=js-raw`, `js-sy`).
            for &i in group {
                println!("{:<44} {:>10.0} msg/s", rates[i].0, rates[i].1);
            }
            continue;
        };
        println!("{:<44} {:>10.0} msg/s", rates[bare].0, rates[bare].1);
        println!("{:<44} {:>10.0} msg/s", rates[same].0, rates[same].1);
        println!(
            "{:<44} {:>10.0} msg/s   {:>5.2} of raw (same messages), {:>5.2} of raw (bare)",
            rates[ours].0,
            rates[ours].1,
            measured.ratio(ours, same),
            measured.ratio(ours, bare)
        );
    }
    Ok(())
}

/// Raw aws-sdk-sqs and switchyard against the same SQS endpoint, in one
/// run, with requests per message and an idle consumer's requests.
fn run_sqs(args: &[String]) -> Result<(), String> {
    let mut idle = Duration::from_secs(60);
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--idle" {
            let v = it.next().ok_or("--idle needs a value")?;
            idle = Duration::from_secs(parse_number(v)?);
        } else {
            rest.push(a.clone());
        }
    }
    let mut run = BrokerRun::parse(&rest, "http://127.0.0.1:4566")?;
    if !rest.iter().any(|a| a == "--messages") {
        // The local server scans its whole queue on every receive.
        run.messages = 500;
    }
    let rt = runtime().map_err(|e| e.to_string())?;
    let (url, messages, size) = (run.url.clone(), run.messages, run.size);
    let report = rt.block_on(async move {
        tokio::spawn(async move { switchyard_bench::sqs::run(&url, messages, size, idle).await })
            .await
            .map_err(|e| e.to_string())?
    })?;
    println!(
        "SQS: {messages} messages of {size} bytes, switchyard concurrency {}, 2 worker threads",
        switchyard_bench::sqs::CONCURRENCY
    );
    let (raw_pub, raw_con, sy_pub, sy_con) = (
        &report.rates[0],
        &report.rates[1],
        &report.rates[2],
        &report.rates[3],
    );
    for (raw, ours) in [(raw_pub, sy_pub), (raw_con, sy_con)] {
        println!(
            "{:<48} {:>8.1} msg/s   {:.3} requests/msg",
            raw.name, raw.per_sec, raw.requests_per_message
        );
        println!(
            "{:<48} {:>8.1} msg/s   {:.3} requests/msg   {:.2} of raw",
            ours.name,
            ours.per_sec,
            ours.requests_per_message,
            ours.per_sec / raw.per_sec
        );
    }
    if let Some((requests, over)) = report.idle {
        println!("idle switchyard consumer: {requests} requests in {over:?}");
    }
    Ok(())
}
