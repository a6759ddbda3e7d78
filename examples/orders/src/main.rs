//! The orders demo: events, commands, retries and dead-letters, with every
//! consumer running the default middleware stack, on whichever broker a
//! configuration file names. With no file it runs on the in-process memory
//! transport, no broker needed:
//!
//! ```sh
//! cargo run -p example-orders
//! cargo run -p example-orders -- --config examples/config/rabbitmq.toml
//! cargo run -p example-orders -- --config examples/config/jetstream.toml
//! cargo run -p example-orders -- --config examples/config/sqs.toml
//! # and to watch the runtime's own decisions:
//! RUST_LOG=switchyard_core=debug cargo run -p example-orders
//! ```
//!
//! - An `OrderPlaced` event goes to the topic `orders-events`, which fans out
//!   to two queues; billing and shipping each consume their own copy. (On a
//!   broker without topics, SQS, the event is sent to both queues.)
//! - `ReserveInventory` commands go to the queue `inventory-commands`. Their
//!   handler publishes `InventoryReserved`; the correlation and causation
//!   ids are stamped on the event for it.
//! - Among the commands: one sent twice, one that succeeds on its third
//!   attempt, one that never does, one past its deadline and one that is not
//!   even JSON. The handlers only do the work: the middleware skips the
//!   duplicate, retries with backoff and dead-letters the rest, each with its
//!   reason. The summary shows where each of them ended up.
//!
//! The program checks its own outcome and exits non-zero if anything differs.

use std::collections::BTreeMap;
use std::error::Error;
use std::fmt::Debug;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use switchyard::config::ConsumerConfig;
use switchyard::middleware::retry::{ExponentialBackoff, RetryEvent};
use switchyard::middleware::Stack;
use switchyard::{
    AckReason, Codec, Config, Consumer, ConsumerHandle, Context, DeadLetterInfo, DeadLetterReason,
    Envelope, HandleError, Handler, JsonCodec, Message, MessageId, Outcome, Publisher, Router,
    SubscribeOptions, Transport, TransportError,
};
use tower::ServiceExt;
use tracing_subscriber::EnvFilter;

// ---- the messages ---------------------------------------------------------

/// An event: a customer placed an order.
#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    total_cents: u64,
}

impl Message for OrderPlaced {
    const TYPE: &'static str = "orders.order-placed";
}

/// A command: set stock aside for an order.
#[derive(Debug, Serialize, Deserialize)]
struct ReserveInventory {
    order_id: String,
    sku: String,
    quantity: u32,
}

impl Message for ReserveInventory {
    const TYPE: &'static str = "inventory.reserve-inventory";
}

/// An event: stock was set aside for an order.
#[derive(Debug, Serialize, Deserialize)]
struct InventoryReserved {
    order_id: String,
    sku: String,
    quantity: u32,
}

impl Message for InventoryReserved {
    const TYPE: &'static str = "inventory.inventory-reserved";
}

// ---- the topology ---------------------------------------------------------
//
// The queues are the sources of the consumers in the configuration file
// (`examples/config/*.toml`); the topics are declared there too, where the
// broker has them.

/// Topic of the orders service's events, and the consumers subscribed to it.
const ORDER_EVENTS: (&str, [&str; 2]) = ("orders-events", ["billing", "shipping"]);
/// Topic of the inventory service's events, and its subscriber.
const INVENTORY_EVENTS: (&str, [&str; 1]) = ("inventory-events", ["reservations"]);
/// The configuration used without `--config`.
const MEMORY_CONFIG: &str = include_str!("../../config/memory.toml");

/// Where an event for `topic` goes: the topic itself where the broker fans
/// out, else the queue of each subscribed consumer.
fn event_destinations(
    config: &Config,
    fan_out: bool,
    topic: &str,
    subscribers: &[&str],
) -> Vec<String> {
    if fan_out {
        vec![topic.to_owned()]
    } else {
        subscribers
            .iter()
            .filter_map(|c| config.consumers.get(*c).map(|c| c.source.clone()))
            .collect()
    }
}

// ---- the handlers ---------------------------------------------------------

/// Billing: a plain `async fn` is a handler.
async fn charge_payment(order: OrderPlaced, _cx: Context) -> Result<(), HandleError> {
    let (euros, cents) = (order.total_cents / 100, order.total_cents % 100);
    println!(
        "  billing    charged {euros}.{cents:02} EUR for {}",
        order.order_id
    );
    Ok(())
}

/// Shipping: gets its own copy of the same `OrderPlaced`.
async fn open_shipment(order: OrderPlaced, _cx: Context) -> Result<(), HandleError> {
    println!("  shipping   opened a shipment for {}", order.order_id);
    Ok(())
}

/// The inventory service's handler of `ReserveInventory`. Clones share the
/// journal, which `main` reads for the summary.
#[derive(Clone, Default)]
struct Inventory {
    journal: Arc<Mutex<Journal>>,
    /// Where `InventoryReserved` goes.
    events_to: Arc<Vec<String>>,
}

/// What happened to the inventory commands.
#[derive(Default)]
struct Journal {
    /// (order id, attempt) of each reservation made, noted by the handler.
    reserved: Vec<(String, u32)>,
    /// Message id -> the attempts that failed, noted by the retry hooks.
    failed: BTreeMap<MessageId, Vec<u32>>,
    /// Copies acknowledged by the dedupe layer without calling the handler.
    duplicates: u32,
}

impl Inventory {
    fn journal(&self) -> MutexGuard<'_, Journal> {
        self.journal
            .lock()
            .expect("nothing panics while holding the lock")
    }

    /// Notes an attempt that failed (called by the retry hooks).
    fn note_failed(&self, event: &RetryEvent<'_>) {
        let mut journal = self.journal();
        let attempts = journal.failed.entry(event.message_id.clone());
        attempts.or_default().push(event.attempt);
    }
}

impl Handler<ReserveInventory> for Inventory {
    async fn handle(&self, cmd: ReserveInventory, cx: &Context) -> Result<(), HandleError> {
        // No duplicate or deadline checks here: the middleware does those
        // before the handler is called.
        call_warehouse(&cmd.sku, cx.attempt())?;
        // Published through the context, the event continues the command's
        // conversation: same correlation id, and the command's id as its
        // causation id.
        let event = InventoryReserved {
            order_id: cmd.order_id.clone(),
            sku: cmd.sku,
            quantity: cmd.quantity,
        };
        for destination in self.events_to.iter() {
            cx.publish(destination, &event).await?;
        }
        self.journal().reserved.push((cmd.order_id, cx.attempt()));
        Ok(())
    }
}

/// Stands in for the warehouse's API: the warehouse of `sku-flaky` times out
/// twice before answering, the one of `sku-offline` never answers.
fn call_warehouse(sku: &str, attempt: u32) -> Result<(), HandleError> {
    match sku {
        "sku-flaky" if attempt < 3 => Err(HandleError::transient("warehouse timed out")),
        "sku-offline" => Err(HandleError::transient("warehouse unreachable")),
        _ => Ok(()),
    }
}

/// Shipping's handler of `InventoryReserved`; keeps what it saw for the
/// self-check.
#[derive(Clone, Default)]
struct ReservationsSeen {
    seen: Arc<Mutex<Vec<Seen>>>,
}

struct Seen {
    order_id: String,
    correlation_id: Option<String>,
    causation_id: Option<String>,
}

impl Handler<InventoryReserved> for ReservationsSeen {
    async fn handle(&self, event: InventoryReserved, cx: &Context) -> Result<(), HandleError> {
        println!(
            "  shipping   stock reserved for {}: correlation {}, causation ..{}",
            event.order_id,
            cx.correlation_id().unwrap_or("-"),
            cx.causation_id().map(short_id).unwrap_or("-"),
        );
        self.seen.lock().expect("not poisoned").push(Seen {
            order_id: event.order_id,
            correlation_id: cx.correlation_id().map(str::to_owned),
            causation_id: cx.causation_id().map(str::to_owned),
        });
        Ok(())
    }
}

// ---- the demo -------------------------------------------------------------

/// What each consumer must have done once everything settled:
/// (consumer, acked, retried, dead-lettered).
fn expected(broker_drops_duplicates: bool) -> [(&'static str, u64, u64, u64); 4] {
    // Acked: order-1001, its duplicate, order-1002 on attempt 3 (a broker
    // that deduplicates publishes never delivers the duplicate).
    // Retried: order-1002 and order-1003, twice each.
    // Dead-lettered: order-1003 (attempts), order-1004 (expired), the malformed one.
    let inventory_acked = if broker_drops_duplicates { 2 } else { 3 };
    [
        ("billing", 1, 0, 0),
        ("shipping", 1, 0, 0),
        ("inventory", inventory_acked, 4, 3),
        ("reservations", 2, 0, 0),
    ]
}

#[tokio::main]
async fn main() -> ExitCode {
    // The runtime logs a warning for every dead-letter; this demo causes
    // three on purpose and prints them in its summary instead.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let config = match load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(config).await {
        Ok(problems) if problems.is_empty() => {
            println!("ok: every message ended up where it should");
            ExitCode::SUCCESS
        }
        Ok(problems) => {
            for problem in problems {
                eprintln!("UNEXPECTED: {problem}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!(
                "the demo failed: {}",
                switchyard::config::redact(&e.to_string())
            );
            ExitCode::FAILURE
        }
    }
}

/// `--config FILE`, or the memory configuration built in.
fn load_config() -> Result<Config, String> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (None, _) => Config::from_toml(MEMORY_CONFIG).map_err(|e| e.to_string()),
        (Some("--config"), Some(path)) => Config::load(path).map_err(|e| e.to_string()),
        _ => Err("usage: orders [--config FILE]".to_owned()),
    }
}

/// The consumer `name` of the configuration.
fn consumer<'a>(config: &'a Config, name: &str) -> Result<&'a ConsumerConfig, Box<dyn Error>> {
    Ok(config.consumer(name)?)
}

/// Runs the demo; returns what differed from the expected outcome.
async fn run(config: Config) -> Result<Vec<String>, Box<dyn Error>> {
    let mut problems = Vec::new();
    let broker = config.transport().await?;
    let caps = broker.capabilities();
    let in_process = config.transport.kind.name() == "memory";
    // How long a queue must stay quiet to count as empty.
    let quiet = if in_process {
        Duration::from_millis(20)
    } else {
        Duration::from_millis(500)
    };
    println!(
        "broker: {}{}",
        config.transport.kind.name(),
        config
            .origin()
            .map(|p| format!(" ({})", p.display()))
            .unwrap_or_default()
    );
    broker.declare(&config.topology()).await?;
    let source = |name: &str| consumer(&config, name).map(|c| c.source.clone());
    let (billing, shipping, commands, reserved) = (
        source("billing")?,
        source("shipping")?,
        source("inventory")?,
        source("reservations")?,
    );
    // A broker keeps what an earlier, interrupted run left behind, and the
    // self-check would count it.
    for queue in [&billing, &shipping, &commands, &reserved] {
        for name in [queue.clone(), broker.dead_letter_of(queue)] {
            if let Ok(stats) = broker.queue_stats(&name).await {
                if let Some(n @ 1..) = stats.depth {
                    return Err(format!(
                        "{name} holds {n} message(s) from an earlier run; purge it first \
                         (switchyard --config <file> dlq purge --yes, or delete the queue)"
                    )
                    .into());
                }
            }
        }
    }

    // 1. Publish everything first; the messages wait in their queues.
    println!("publish");
    let publisher = Publisher::new(Arc::clone(&broker));
    let order = OrderPlaced {
        order_id: "order-1001".into(),
        total_cents: 4990,
    };
    let order_events = event_destinations(&config, caps.fan_out, ORDER_EVENTS.0, &ORDER_EVENTS.1);
    for destination in &order_events {
        publisher.publish(destination, &order).await?;
    }
    if caps.fan_out {
        println!(
            "  OrderPlaced order-1001 -> topic {} (-> {billing}, {shipping})",
            ORDER_EVENTS.0
        );
    } else {
        println!("  OrderPlaced order-1001 -> {billing}, {shipping} (no topics on this broker: one copy each)");
    }

    let mut command_ids = BTreeMap::new();
    for (order_id, sku, note) in [
        ("order-1001", "sku-desk", "sent twice with the same id"),
        ("order-1002", "sku-flaky", "its warehouse times out twice"),
        ("order-1003", "sku-offline", "its warehouse is down"),
    ] {
        let command = reserve_inventory(&publisher, order_id, sku)?;
        let id = short_id(command.id.as_str()).to_owned();
        command_ids.insert(order_id, command.id.clone());
        publisher
            .publish_envelope(&commands, command.clone())
            .await?;
        if order_id == "order-1001" {
            // As a broker redelivery or a retrying producer would.
            publisher.publish_envelope(&commands, command).await?;
        }
        println!("  ReserveInventory {order_id} (id ..{id}) -> {commands}: {note}");
    }

    let expired = reserve_inventory(&publisher, "order-1004", "sku-desk")?
        .with_deadline(SystemTime::now() - Duration::from_secs(1));
    publisher.publish_envelope(&commands, expired).await?;
    println!("  ReserveInventory order-1004 -> {commands}: its deadline has passed");

    // Raw envelopes bypass the typed API: this payload is not JSON at all.
    let malformed = Envelope::new(ReserveInventory::TYPE, r#"{"order_id": "order-10"#);
    broker.publish(&commands, malformed).await?;
    println!(
        "  {} with a cut-off payload -> {commands}",
        ReserveInventory::TYPE
    );

    // 2. Consume: one consumer per queue, each with its own router inside
    //    the default middleware stack.
    println!("consume");
    let inventory = Inventory {
        events_to: Arc::new(event_destinations(
            &config,
            caps.fan_out,
            INVENTORY_EVENTS.0,
            &INVENTORY_EVENTS.1,
        )),
        ..Inventory::default()
    };
    let reservations = ReservationsSeen::default();
    let start = |name: &str, router: Router| -> Result<ConsumerHandle, Box<dyn Error>> {
        let c = consumer(&config, name)?;
        Ok(Consumer::builder(Arc::clone(&broker), c.source.clone())
            .concurrency(c.concurrency)
            .max_attempts(c.max_attempts)
            .serve_default(router)
            .spawn())
    };
    let consumers: Vec<ConsumerHandle> = vec![
        start("billing", Router::builder().route(charge_payment).build())?,
        start("shipping", Router::builder().route(open_shipment).build())?,
        spawn_inventory(&broker, consumer(&config, "inventory")?, &inventory),
        start(
            "reservations",
            Router::builder().route(reservations.clone()).build(),
        )?,
    ];

    // Wait until every consumer has settled what it should (bounded: brokers
    // hold retries back for at least a second).
    let expected = expected(caps.deduplicates_publishes);
    let patience = if in_process {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(90)
    };
    let all_settled = wait_until(patience, || {
        consumers
            .iter()
            .zip(expected)
            .all(|(c, (_, acked, retried, dead))| {
                let s = c.stats();
                s.acked() >= acked && s.retried() >= retried && s.dead_lettered() >= dead
            })
    })
    .await;
    if !all_settled {
        problems.push(format!("not everything settled within {patience:?}"));
    }

    // 3. Shut down gracefully: stop pulling, finish in-flight work.
    println!("summary");
    for (handle, (name, acked, retried, dead)) in consumers.into_iter().zip(expected) {
        let r = handle.shutdown().await?;
        let source = &consumer(&config, name)?.source;
        println!(
            "  {source:<28} received {:>2}, acked {}, retried {}, dead-lettered {}",
            r.received, r.acked, r.retried, r.dead_lettered
        );
        if (r.acked, r.retried, r.dead_lettered) != (acked, retried, dead) {
            problems.push(format!("{source}: {r:?}"));
        }
        if r.received != r.acked + r.retried + r.dead_lettered || r.released + r.settle_failed != 0
        {
            problems.push(format!("{source}: unexpected report {r:?}"));
        }
    }

    report_inventory(
        &inventory,
        &command_ids,
        caps.deduplicates_publishes,
        &mut problems,
    );
    check_conversations(&reservations, &command_ids, &mut problems);

    // 4. Read the dead-letter queue: each message carries why it is there.
    report_dead_letters(&broker, &commands, quiet * 4, &mut problems).await?;

    // Nothing is left behind anywhere.
    broker.flush().await?;
    for queue in [&billing, &shipping, &commands, &reserved] {
        for name in [queue.to_string(), broker.dead_letter_of(queue)] {
            let left = drain(&broker, &name, quiet).await?;
            if !left.is_empty() {
                problems.push(format!(
                    "{name} is not empty: {} message(s) left",
                    left.len()
                ));
            }
        }
    }
    broker.flush().await?;
    Ok(problems)
}

/// Prints what happened to the inventory commands.
fn report_inventory(
    inventory: &Inventory,
    command_ids: &BTreeMap<&str, MessageId>,
    broker_drops_duplicates: bool,
    problems: &mut Vec<String>,
) {
    let journal = inventory.journal();
    for (order_id, attempt) in &journal.reserved {
        println!("  reserved   {order_id} on attempt {attempt}");
    }
    let mut failed = BTreeMap::new();
    for (order_id, id) in command_ids {
        let Some(attempts) = journal.failed.get(id) else {
            continue;
        };
        let then = match journal.reserved.iter().find(|(o, _)| o == order_id) {
            Some((_, ok)) => format!("reserved on attempt {ok}"),
            None => "gave up".to_owned(),
        };
        println!("  retried    {order_id}: attempts {attempts:?} failed, then {then}");
        failed.insert(*order_id, attempts.clone());
    }
    if broker_drops_duplicates {
        println!("  duplicate  dropped by the broker at publish (it deduplicates message ids)");
    } else {
        println!(
            "  duplicate  {} copy acked by the dedupe layer without calling the handler",
            journal.duplicates
        );
    }

    // Reserved once each: the second copy of order-1001 never reached the handler.
    let reserved = vec![("order-1001".to_owned(), 1), ("order-1002".to_owned(), 3)];
    expect(problems, "reserved", &journal.reserved, &reserved);
    let expected = BTreeMap::from([("order-1002", vec![1, 2]), ("order-1003", vec![1, 2, 3])]);
    expect(problems, "failed attempts", &failed, &expected);
    let duplicates = if broker_drops_duplicates { 0 } else { 1 };
    expect(problems, "duplicates", &journal.duplicates, &duplicates);
}

/// Checks that every `InventoryReserved` continued its command's
/// conversation: same correlation id, the command's id as causation id.
fn check_conversations(
    reservations: &ReservationsSeen,
    command_ids: &BTreeMap<&str, MessageId>,
    problems: &mut Vec<String>,
) {
    for seen in reservations.seen.lock().expect("not poisoned").iter() {
        let correlation = format!("checkout-{}", seen.order_id);
        let causation = command_ids
            .get(seen.order_id.as_str())
            .map(MessageId::as_str);
        if seen.correlation_id.as_deref() != Some(&correlation)
            || seen.causation_id.as_deref() != causation
        {
            problems.push(format!("{}: ids not stamped as expected", seen.order_id));
        }
    }
}

/// Takes every message out of the inventory's dead-letter queue and prints
/// why each one is there.
async fn report_dead_letters(
    broker: &Arc<dyn Transport>,
    commands: &str,
    quiet: Duration,
    problems: &mut Vec<String>,
) -> Result<(), Box<dyn Error>> {
    let dlq = broker.dead_letter_of(commands);
    println!("  dead-lettered to {dlq}:");
    let mut dead_letters = Vec::new();
    for envelope in drain(broker, &dlq, quiet).await? {
        let info = DeadLetterInfo::read_from(&envelope.headers).ok_or("no dead-letter headers")?;
        dead_letters.push((envelope, info));
    }
    dead_letters.sort_by(|a, b| a.1.reason.as_str().cmp(b.1.reason.as_str()));
    for (envelope, info) in &dead_letters {
        let order_id = JsonCodec
            .decode::<ReserveInventory>(&envelope.payload)
            .map_or_else(|_| "(unreadable)".to_owned(), |cmd| cmd.order_id);
        let attempts = match info.attempts {
            1 => "1 attempt ".to_owned(),
            n => format!("{n} attempts"),
        };
        let reason = info.reason.as_str();
        println!(
            "    {reason:<13} {order_id:<12} after {attempts}: {}",
            info.detail
        );
    }

    let reasons: Vec<_> = dead_letters
        .iter()
        .map(|(_, info)| (info.reason.clone(), info.attempts, info.source.clone()))
        .collect();
    let expected = vec![
        (DeadLetterReason::Expired, 1, commands.to_owned()),
        (DeadLetterReason::Malformed, 1, commands.to_owned()),
        (DeadLetterReason::MaxAttempts, 3, commands.to_owned()),
    ];
    expect(problems, "dead letters", &reasons, &expected);
    Ok(())
}

/// The inventory consumer: the default middleware stack with a short retry
/// backoff and hooks that note each failed attempt, inside one layer of our
/// own that counts the duplicates the stack acknowledged.
fn spawn_inventory(
    broker: &Arc<dyn Transport>,
    config: &ConsumerConfig,
    inventory: &Inventory,
) -> ConsumerHandle {
    let stack = Stack::new()
        .retry_policy(ExponentialBackoff::new(
            config.backoff.initial,
            config.backoff.max,
        ))
        .on_retry({
            let inventory = inventory.clone();
            move |event, _delay| inventory.note_failed(event)
        })
        .on_dead_letter({
            let inventory = inventory.clone();
            move |event, reason| {
                // Out of attempts: the last one failed too.
                if *reason == DeadLetterReason::MaxAttempts {
                    inventory.note_failed(event);
                }
            }
        })
        .build(Router::builder().route(inventory.clone()).build());
    // A duplicate never reaches the handler: only the stack's outcome shows it.
    let count_duplicates = {
        let inventory = inventory.clone();
        move |outcome: Outcome| {
            if outcome == Outcome::Ack(AckReason::Duplicate) {
                inventory.journal().duplicates += 1;
            }
            outcome
        }
    };
    Consumer::builder(Arc::clone(broker), config.source.clone())
        // One at a time in the example configurations, so that the second
        // copy of order-1001 arrives after the first is done. (A copy
        // arriving while the first still runs is held back and retried a
        // second later, which would slow the demo.)
        .concurrency(config.concurrency)
        .max_attempts(config.max_attempts)
        .serve(stack.map_response(count_duplicates))
        .spawn()
}

/// A `ReserveInventory` envelope for `order_id`, part of the conversation
/// `checkout-<order_id>`.
fn reserve_inventory(
    publisher: &Publisher,
    order_id: &str,
    sku: &str,
) -> Result<Envelope, TransportError> {
    let command = ReserveInventory {
        order_id: order_id.into(),
        sku: sku.into(),
        quantity: 1,
    };
    Ok(publisher
        .envelope_for(&command)?
        .with_correlation_id(format!("checkout-{order_id}")))
}

/// Polls `done` until it holds or `timeout` passes; returns whether it held.
async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let give_up = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= give_up {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// Takes every message out of `queue` (nothing else consumes it any more)
/// until none arrives for `quiet`.
async fn drain(
    broker: &Arc<dyn Transport>,
    queue: &str,
    quiet: Duration,
) -> Result<Vec<Envelope>, Box<dyn Error>> {
    let mut deliveries = broker.subscribe(queue, SubscribeOptions::default()).await?;
    let mut out = Vec::new();
    while let Ok(next) = tokio::time::timeout(quiet, deliveries.next()).await {
        let delivery = next.ok_or("subscription ended")??;
        out.push(delivery.envelope().clone());
        delivery.ack().await?;
    }
    broker.flush().await?;
    Ok(out)
}

/// Records a problem if `actual` is not `expected`.
fn expect<T: PartialEq + Debug>(problems: &mut Vec<String>, what: &str, actual: &T, expected: &T) {
    if actual != expected {
        problems.push(format!("{what}: got {actual:?}, expected {expected:?}"));
    }
}

/// The last 8 characters of an id: enough to tell ids apart on screen.
fn short_id(id: &str) -> &str {
    id.get(id.len().saturating_sub(8)..).unwrap_or(id)
}
