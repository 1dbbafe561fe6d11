//! The binary: everything is in the library (`vitscope::cli` parses and dispatches), so
//! the integration tests and the binary run the same code.

fn main() -> std::process::ExitCode {
    vitscope::cli::main()
}
