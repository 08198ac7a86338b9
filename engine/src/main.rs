//! `reel`: the command-line face of the engine. Parsing and dispatch only; the
//! work is in the `reel_engine` library and the `cli` modules.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
