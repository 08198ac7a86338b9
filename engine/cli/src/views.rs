//! JSON and text views of engine values: the one place their shapes are
//! defined (`reel plugins`, `inspect`/`replay` states, output chunks).

use serde_json::{Value, json};

use reel_engine::lifecycle::recover::outlook;
use reel_engine::model::state::JobState;
use reel_engine::plugin::PluginSet;

/// A plugin set as JSON, for `reel plugins --json`:
/// `{"plugin_dir", "loaded": [{name, version, abi, abi_major, abi_minor,
/// capabilities, path}], "refused": [{path, reason}]}`.
pub fn plugins_json(set: &PluginSet) -> Value {
    let loaded: Vec<_> = set
        .plugins()
        .map(|p| {
            json!({
                "name": p.name,
                "version": p.version,
                "abi": format!("{}.{}", p.abi_major, p.abi_minor),
                "abi_major": p.abi_major,
                "abi_minor": p.abi_minor,
                "capabilities": p.capabilities,
                "path": p.path.display().to_string(),
            })
        })
        .collect();
    let refused: Vec<_> = set
        .refusals()
        .iter()
        .map(|r| {
            json!({
                "path": r.path.display().to_string(),
                "reason": r.reason,
            })
        })
        .collect();
    json!({
        "plugin_dir": set.dir().display().to_string(),
        "loaded": loaded,
        "refused": refused,
    })
}

/// A plugin set as text, for `reel plugins`: one line per plugin and per refusal.
pub fn plugins_text(set: &PluginSet) -> String {
    let mut out = format!("plugin directory: {}\n", set.dir().display());
    if set.plugins().next().is_none() {
        out.push_str("no runner plugins loaded\n");
    }
    for p in set.plugins() {
        out.push_str(&format!(
            "loaded   {} {} (ABI {}.{}) [{}] {}\n",
            p.name,
            p.version,
            p.abi_major,
            p.abi_minor,
            p.capabilities.join(", "),
            p.path.display()
        ));
    }
    for r in set.refusals() {
        out.push_str(&format!("refused  {r}\n"));
    }
    out
}

/// A job's folded state as JSON: its fields, plus `terminal`, what it holds
/// and what recovery would do. Each step carries `step`, its number from 1
/// (as every command numbers steps), beside its 0-based `index` in the spec.
pub fn state_json(state: &JobState) -> Value {
    let mut v = serde_json::to_value(state).unwrap_or(Value::Null);
    v["phase"] = json!(state.phase.as_str());
    v["terminal"] = json!(state.is_terminal());
    v["held_resources"] = json!(state.held_resources());
    v["recovery"] = json!(outlook(state));
    if let Some(steps) = v["steps"].as_array_mut() {
        for s in steps {
            s["step"] = json!(s["index"].as_u64().map(|i| i + 1));
        }
    }
    v
}
