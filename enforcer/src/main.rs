//! The `enforcer` binary: parses the command line and hands over to the library.

// The decision path allocates a little per request (JSON, Redis arguments); mimalloc's
// thread-local free lists make that cheaper than glibc malloc under load (see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    enforcer::cli::main()
}
