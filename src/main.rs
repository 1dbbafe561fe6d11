fn main() -> std::process::ExitCode {
    vitscope::cli::main()
}
