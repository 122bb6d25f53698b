//! `pcache status` and `pcache set`: a running attach's figures and tuning,
//! through its control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::attach::control::default_path;
use crate::units::human;

/// Which attach to ask: its control socket, named or derived from DEVICE.
fn socket(device: Option<&Path>, control: Option<&Path>) -> Result<PathBuf, String> {
    match (control, device) {
        (Some(c), _) => Ok(c.to_path_buf()),
        (None, Some(d)) => Ok(default_path(d)),
        (None, None) => Err("name the pmem device the attach runs on, or its --control socket".into()),
    }
}

/// Sends `req` to the control socket at `path`; the reply, or why not (2:
/// no attach answers there).
fn ask(path: &Path, req: &Value) -> Result<Value, (u8, String)> {
    let mut s = UnixStream::connect(path).map_err(|e| {
        (
            2,
            format!(
                "no attach answers at {} ({e}): is `pcache attach` running on that device, with --control elsewhere?",
                path.display()
            ),
        )
    })?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    writeln!(s, "{req}").map_err(|e| (2, format!("{}: {e}", path.display())))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(|e| (2, format!("{}: {e}", path.display())))?;
    let v: Value = serde_json::from_str(&line).map_err(|e| (2, format!("{}: not a reply: {e}", path.display())))?;
    match v.get("error").and_then(Value::as_str) {
        Some(e) => Err((1, e.to_string())),
        None => Ok(v),
    }
}

/// `pcache status`: exit 0, 1 (an export is unhealthy), 2 (no attach).
pub fn status(device: Option<&Path>, control: Option<&Path>, as_json: bool, watch: Option<u64>) -> u8 {
    let path = match socket(device, control) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pcache status: {e}");
            return 64;
        }
    };
    loop {
        let v = match ask(&path, &json!({ "cmd": "status" })) {
            Ok(v) => v,
            Err((code, e)) => {
                eprintln!("pcache status: {e}");
                return code;
            }
        };
        if as_json {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else {
            print_text(&v);
        }
        let healthy = v["exports"].as_array().is_some_and(|e| e.iter().all(|x| x["health"]["ok"] == true));
        match watch.filter(|s| *s > 0) {
            Some(secs) => std::thread::sleep(Duration::from_secs(secs)),
            None => return if healthy { 0 } else { 1 },
        }
    }
}

fn print_text(v: &Value) {
    let u = |x: &Value| x.as_u64().unwrap_or(0);
    for e in v["exports"].as_array().into_iter().flatten() {
        let (hits, misses) = (u(&e["hits"]), u(&e["misses"]));
        let ratio = if hits + misses > 0 { 100.0 * hits as f64 / (hits + misses) as f64 } else { 0.0 };
        let health = if e["health"]["ok"] == true {
            "ok".to_string()
        } else {
            ["writeback_failing", "writeback_stopped", "gc_stopped"]
                .iter()
                .filter_map(|k| e["health"][k].as_str())
                .collect::<Vec<_>>()
                .join("; ")
        };
        let wb = &e["writeback"];
        let limit = wb["rate_limit"].as_u64().map_or("none".to_string(), |r| format!("{}/s", human(r)));
        println!(
            "export {}  ({})  health: {health}",
            e["name"].as_str().unwrap_or("?"),
            e["backing"].as_str().unwrap_or("?")
        );
        println!(
            "  reads     {hits} hits ({ratio:.1} %), {misses} misses; {} from cache, {} from backing",
            human(u(&e["bytes_from_cache"])),
            human(u(&e["bytes_from_backing"]))
        );
        println!(
            "  cached    {} dirty, {} clean in {} keys; {} of {} segments; {} zeroed on the backing alone",
            human(u(&e["dirty_bytes"])),
            human(u(&e["clean_bytes"])),
            u(&e["keys"]),
            u(&e["segments_used"]),
            u(&e["segments"]),
            human(u(&e["zeroed_on_backing_bytes"]))
        );
        println!(
            "  writeback {}/s, backlog {} (limit {limit}); {} written back in {} ksets, {} errors",
            human(u(&wb["rate_bytes_per_sec"])),
            human(u(&wb["backlog_bytes"])),
            human(u(&wb["bytes_written_back"])),
            u(&wb["ksets_written_back"]),
            u(&wb["errors"])
        );
        println!(
            "  gc        at {} %: {} ksets collected, {} segments freed",
            u(&e["gc"]["percent"]),
            u(&e["gc"]["ksets_collected"]),
            u(&e["gc"]["segments_freed"])
        );
    }
}

/// `pcache set EXPORT KEY VALUE`: exit 0 done, 1 refused, 2 no attach.
pub fn set(device: Option<&Path>, control: Option<&Path>, export: &str, key: &str, value: &str) -> u8 {
    let path = match socket(device, control) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pcache set: {e}");
            return 64;
        }
    };
    match ask(&path, &json!({ "cmd": "set", "export": export, "key": key, "value": value })) {
        Ok(v) => {
            println!("{}", v["ok"].as_str().unwrap_or("done"));
            0
        }
        Err((code, e)) => {
            eprintln!("pcache set: {e}");
            code
        }
    }
}
