//! `reel`: the command-line face of the engine; see the `reel_cli` library.

fn main() -> std::process::ExitCode {
    reel_cli::main()
}
