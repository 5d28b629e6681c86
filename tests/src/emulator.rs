//! The link emulator's engine: the inside of the `linkemu` binary.
//!
//! This kernel has no `tc netem`, so delay and loss come from userspace: two TUN devices, one
//! in each namespace, and per direction a reader thread (TUN → queue, dropping the configured
//! share) and a writer thread (queue → other TUN, each packet released at its due time). A
//! packet's due time is `arrival + delay`, never earlier than the previous packet's, so a
//! lowered delay does not reorder packets in flight. Sleeping writers make it accurate to well
//! under a millisecond; the queue is bounded and overflows are counted.
//!
//! Control is line-based on stdin (the lab holds the other end; EOF means the lab is gone, so
//! the emulator exits — it can never outlive its test):
//!
//! | request                               | answer                                   |
//! |---------------------------------------|------------------------------------------|
//! | `set <ab\|ba\|both> <delay_us> <loss_ppm>` | `ok`                               |
//! | `stats`                               | `stats ab <rx> <fwd> <lost> <overflow> ba <rx> <fwd> <lost> <overflow>` |
//!
//! `ab` is the direction from device A to device B. Not here: the lab-side handle
//! ([`crate::link::EmuLink`]).

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tun_rs::{DeviceBuilder, SyncDevice};

/// Packets that may wait in one direction's queue; more are dropped and counted as overflow.
/// 32 Ki packets is 0.3 s at 100 kpps: far more than any delay a test sets needs.
pub const QUEUE_PACKETS: usize = 32 * 1024;

/// Largest packet read from a TUN device (its MTU is 1500; headroom for jumbo settings).
const MAX_PACKET: usize = 65_536;

/// Loss is given in parts per million.
pub const PPM: u32 = 1_000_000;

/// Settings and counters of one direction, shared between its threads and the control loop.
#[derive(Debug, Default)]
pub struct Direction {
    /// One-way delay in microseconds.
    pub delay_us: AtomicU64,
    /// Share of packets dropped, in parts per million.
    pub loss_ppm: AtomicU32,
    /// Packets read from the source device.
    pub received: AtomicU64,
    /// Packets written to the destination device.
    pub forwarded: AtomicU64,
    /// Packets dropped by the configured loss.
    pub lost: AtomicU64,
    /// Packets dropped because the queue was full.
    pub overflow: AtomicU64,
}

impl Direction {
    fn stats(&self) -> String {
        format!(
            "{} {} {} {}",
            self.received.load(Ordering::Relaxed),
            self.forwarded.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
            self.overflow.load(Ordering::Relaxed)
        )
    }

    fn set(&self, delay_us: u64, loss_ppm: u32) {
        self.delay_us.store(delay_us, Ordering::Relaxed);
        self.loss_ppm.store(loss_ppm.min(PPM), Ordering::Relaxed);
    }
}

/// What `linkemu` is asked to do.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Namespace (name under /run/netns) of device A.
    pub ns_a: String,
    /// Name of device A.
    pub dev_a: String,
    /// Namespace of device B.
    pub ns_b: String,
    /// Name of device B.
    pub dev_b: String,
    /// Initial one-way delay, both directions.
    pub delay_us: u64,
    /// Initial loss, both directions, parts per million.
    pub loss_ppm: u32,
    /// Seed of the loss generator (each direction derives its own).
    pub seed: u64,
}

impl EmulatorConfig {
    /// Parses `--ns-a N --dev-a D --ns-b N --dev-b D [--delay-us U] [--loss-ppm P] [--seed S]`.
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let mut config = EmulatorConfig {
            ns_a: String::new(),
            dev_a: String::new(),
            ns_b: String::new(),
            dev_b: String::new(),
            delay_us: 0,
            loss_ppm: 0,
            seed: 0x9e37_79b9_7f4a_7c15,
        };
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|e| format!("{flag} {value}: {e}"))
            };
            match flag.as_str() {
                "--ns-a" => config.ns_a = value.clone(),
                "--dev-a" => config.dev_a = value.clone(),
                "--ns-b" => config.ns_b = value.clone(),
                "--dev-b" => config.dev_b = value.clone(),
                "--delay-us" => config.delay_us = number()?,
                "--loss-ppm" => {
                    config.loss_ppm = u32::try_from(number()?)
                        .map_err(|_| format!("--loss-ppm {value} is out of range"))?
                }
                "--seed" => config.seed = number()?,
                other => return Err(format!("unknown flag {other}")),
            }
        }
        for (name, value) in [
            ("--ns-a", &config.ns_a),
            ("--dev-a", &config.dev_a),
            ("--ns-b", &config.ns_b),
            ("--dev-b", &config.dev_b),
        ] {
            if value.is_empty() {
                return Err(format!("{name} is required"));
            }
        }
        Ok(config)
    }
}

/// A small, fast, seeded generator for loss decisions (xorshift64*).
#[derive(Debug, Clone)]
pub struct LossRng(u64);

impl LossRng {
    /// A generator from `seed` (zero is replaced, xorshift cannot leave it).
    pub fn new(seed: u64) -> Self {
        LossRng(if seed == 0 {
            0x2545_f491_4f6c_dd1d
        } else {
            seed
        })
    }

    /// Whether to drop a packet at `loss_ppm` parts per million.
    pub fn drop_packet(&mut self, loss_ppm: u32) -> bool {
        if loss_ppm == 0 {
            return false;
        }
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32;
        (r % u64::from(PPM)) < u64::from(loss_ppm)
    }
}

/// A packet waiting for its due time.
struct Delayed {
    due: Instant,
    data: Vec<u8>,
}

/// Creates TUN device `name` inside namespace `ns`, down: the lab configures it and brings
/// it up.
fn create_tun(ns: &str, name: &str) -> Result<SyncDevice, String> {
    let name = name.to_string();
    crate::netns::in_netns(ns, move || {
        DeviceBuilder::new().name(name).enable(false).build_sync()
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot create TUN device in {ns}: {e}"))
}

/// Reads packets from `src`, drops the configured share, queues the rest with their due time.
fn read_loop(src: &SyncDevice, dir: &Direction, tx: &SyncSender<Delayed>, seed: u64) {
    let mut rng = LossRng::new(seed);
    let mut buf = vec![0u8; MAX_PACKET];
    let mut last_due = Instant::now();
    loop {
        let n = match src.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // The device is gone: the namespace was deleted. Nothing left to do.
                fatal(&format!("read from TUN failed: {e}"));
            }
        };
        dir.received.fetch_add(1, Ordering::Relaxed);
        if rng.drop_packet(dir.loss_ppm.load(Ordering::Relaxed)) {
            dir.lost.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let delay = Duration::from_micros(dir.delay_us.load(Ordering::Relaxed));
        let due = (Instant::now() + delay).max(last_due);
        last_due = due;
        let packet = Delayed {
            due,
            data: buf[..n].to_vec(),
        };
        match tx.try_send(packet) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                dir.overflow.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
}

/// Writes queued packets to `dst` at their due time.
fn write_loop(dst: &SyncDevice, dir: &Direction, rx: &Receiver<Delayed>) {
    while let Ok(packet) = rx.recv() {
        let now = Instant::now();
        if packet.due > now {
            std::thread::sleep(packet.due - now);
        }
        // A write can fail for a packet the kernel refuses (e.g. malformed); keep going.
        if dst.send(&packet.data).is_ok() {
            dir.forwarded.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Ends the process with a message on stderr (the lab captures it to the link's log).
#[allow(clippy::print_stderr)] // the binary's stderr is its log
fn fatal(message: &str) -> ! {
    eprintln!("linkemu: {message}");
    std::process::exit(1)
}

/// Starts one direction: a reader on `src` and a writer on `dst`.
fn start_direction(
    label: &'static str,
    src: Arc<SyncDevice>,
    dst: Arc<SyncDevice>,
    dir: Arc<Direction>,
    seed: u64,
) -> Result<(), String> {
    let (tx, rx) = sync_channel::<Delayed>(QUEUE_PACKETS);
    let reader_dir = Arc::clone(&dir);
    std::thread::Builder::new()
        .name(format!("{label}-read"))
        .spawn(move || read_loop(&src, &reader_dir, &tx, seed))
        .map_err(|e| format!("cannot start {label} reader: {e}"))?;
    std::thread::Builder::new()
        .name(format!("{label}-write"))
        .spawn(move || write_loop(&dst, &dir, &rx))
        .map_err(|e| format!("cannot start {label} writer: {e}"))?;
    Ok(())
}

/// Handles one control line; returns the answer.
pub fn handle_command(line: &str, ab: &Direction, ba: &Direction) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["set", which, delay, loss] => {
            let (Ok(delay), Ok(loss)) = (delay.parse::<u64>(), loss.parse::<u32>()) else {
                return format!("error bad numbers in {line:?}");
            };
            match *which {
                "ab" => ab.set(delay, loss),
                "ba" => ba.set(delay, loss),
                "both" => {
                    ab.set(delay, loss);
                    ba.set(delay, loss);
                }
                other => return format!("error unknown direction {other}"),
            }
            "ok".to_string()
        }
        ["stats"] => format!("stats ab {} ba {}", ab.stats(), ba.stats()),
        _ => format!("error unknown command {line:?}"),
    }
}

/// Runs the emulator until stdin closes. Prints `ready` once both devices exist.
pub fn run(config: &EmulatorConfig) -> Result<(), String> {
    let dev_a = Arc::new(create_tun(&config.ns_a, &config.dev_a)?);
    let dev_b = Arc::new(create_tun(&config.ns_b, &config.dev_b)?);
    let ab = Arc::new(Direction::default());
    let ba = Arc::new(Direction::default());
    ab.set(config.delay_us, config.loss_ppm);
    ba.set(config.delay_us, config.loss_ppm);
    start_direction(
        "ab",
        Arc::clone(&dev_a),
        Arc::clone(&dev_b),
        Arc::clone(&ab),
        config.seed,
    )?;
    start_direction(
        "ba",
        dev_b,
        dev_a,
        Arc::clone(&ba),
        config.seed.rotate_left(17) ^ 0x5555,
    )?;

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready").map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let answer = handle_command(&line, &ab, &ba);
        writeln!(out, "{answer}").map_err(|e| e.to_string())?;
        out.flush().map_err(|e| e.to_string())?;
    }
    // stdin closed: the lab (or its whole process) is gone.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_rng_drops_about_the_configured_share() {
        let mut rng = LossRng::new(7);
        let n = 200_000;
        let dropped = (0..n).filter(|_| rng.drop_packet(100_000)).count();
        let share = dropped as f64 / f64::from(n);
        assert!((share - 0.10).abs() < 0.005, "share {share}");
        assert!(!(0..1000).any(|_| rng.drop_packet(0)));
        assert!((0..1000).all(|_| rng.drop_packet(PPM)));
    }

    #[test]
    fn control_commands_change_settings_and_report_stats() {
        let ab = Direction::default();
        let ba = Direction::default();
        assert_eq!(handle_command("set both 20000 1000", &ab, &ba), "ok");
        assert_eq!(ab.delay_us.load(Ordering::Relaxed), 20_000);
        assert_eq!(ba.loss_ppm.load(Ordering::Relaxed), 1000);
        assert_eq!(handle_command("set ba 5 0", &ab, &ba), "ok");
        assert_eq!(ab.delay_us.load(Ordering::Relaxed), 20_000);
        assert_eq!(ba.delay_us.load(Ordering::Relaxed), 5);
        assert_eq!(
            handle_command("stats", &ab, &ba),
            "stats ab 0 0 0 0 ba 0 0 0 0"
        );
        assert!(handle_command("set sideways 1 1", &ab, &ba).starts_with("error"));
        assert!(handle_command("jump", &ab, &ba).starts_with("error"));
    }

    #[test]
    fn config_parses_flags_and_requires_devices() {
        let args = "--ns-a a --dev-a x --ns-b b --dev-b y --delay-us 300 --loss-ppm 5"
            .split(' ')
            .map(String::from);
        let config = EmulatorConfig::from_args(args).unwrap();
        assert_eq!((config.delay_us, config.loss_ppm), (300, 5));
        assert!(EmulatorConfig::from_args(["--ns-a".to_string(), "a".to_string()]).is_err());
    }
}
