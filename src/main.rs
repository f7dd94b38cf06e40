//! The `keel` command; everything it does lives in the library (`keel::cli`).

fn main() -> std::process::ExitCode {
    keel::cli::main()
}
