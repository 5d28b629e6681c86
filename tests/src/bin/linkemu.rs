//! `linkemu`: an emulated point-to-point link with delay and loss between two network
//! namespaces (two TUN devices joined in userspace), started and controlled by the lab.
//! See `tests::emulator` for the design and the control protocol.

fn main() {
    let config = match tests::emulator::EmulatorConfig::from_args(std::env::args().skip(1)) {
        Ok(config) => config,
        Err(e) => fail(&format!("{e}\nusage: linkemu --ns-a NS --dev-a DEV --ns-b NS --dev-b DEV [--delay-us N] [--loss-ppm N] [--seed N]")),
    };
    if let Err(e) = tests::emulator::run(&config) {
        fail(&e);
    }
}

#[allow(clippy::print_stderr)] // a binary's errors go to stderr
fn fail(message: &str) -> ! {
    eprintln!("linkemu: {message}");
    std::process::exit(2)
}
