//! The `bearer-proxy` binary: everything lives in the library; see `bearer_proxy::cli`. A
//! failure is printed here, once, with its causes, and ends the process with its exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    match bearer_proxy::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("bearer-proxy: {:#}", failure.error());
            failure.exit_code()
        }
    }
}
