//! `reel plugins [--json]`: which runner plugins load from the plugin directory, and
//! which files were refused and why.

use std::path::PathBuf;

use reel_engine::plugin;

use crate::views::{plugins_json, plugins_text};

/// List runner plugins: what loaded, and what was refused and why.
#[derive(clap::Args, Debug)]
pub struct PluginsArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The plugin directory [default: the directory of the `reel` executable].
    #[arg(long, value_name = "DIR", env = "REEL_PLUGIN_DIR")]
    pub plugin_dir: Option<PathBuf>,
}

/// Loads the plugin directory and prints the result. Refusals are reported, not
/// errors: the command fails only if the directory cannot be determined.
pub fn run(args: &PluginsArgs) -> anyhow::Result<()> {
    // The same directory `run` and `recover` would load (made absolute alike).
    let dir = crate::run::plugin_dir(&args.plugin_dir)?;
    let set = plugin::load_dir(&dir);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plugins_json(&set))?);
    } else {
        print!("{}", plugins_text(&set));
    }
    Ok(())
}
