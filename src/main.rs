//! The `ferry` command: everything happens in `ferry::cli::run`, which returns the documented
//! exit code.

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(ferry::cli::run())
}
