//! Readings of `/proc` (Linux) for tests and benchmarks: memory, CPU time, wake-ups and
//! command lines of processes. Each returns None (or an empty result) where the process
//! or the file is gone, or on a system without `/proc`.

use std::path::Path;

/// Resident set size of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    parse_status_field(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        field,
    )
}

fn parse_status_field(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// CPU time `pid` has used so far (user + system), in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    parse_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // In USER_HZ, which Linux fixes at 100 for what it shows user space.
    Some(ticks as f64 / 100.0)
}

/// Context switches of every thread of `pid` so far (each one a wake-up).
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|s| {
            parse_status_field(&s, "voluntary_ctxt_switches:").unwrap_or(0)
                + parse_status_field(&s, "nonvoluntary_ctxt_switches:").unwrap_or(0)
        })
        .sum()
}

/// The command line of `pid`, its arguments joined by spaces.
pub fn command_line(pid: u32) -> Option<String> {
    read_command_line(&Path::new("/proc").join(pid.to_string()))
}

fn read_command_line(dir: &Path) -> Option<String> {
    let b = std::fs::read(dir.join("cmdline")).ok()?;
    Some(
        String::from_utf8_lossy(&b)
            .trim_end_matches('\0')
            .replace('\0', " "),
    )
}

/// The command lines of every process on this machine, with their process IDs.
pub fn all_command_lines() -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((pid, read_command_line(&e.path())?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_stat() {
        let status =
            "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nvoluntary_ctxt_switches:\t7\n";
        assert_eq!(parse_status_field(status, "VmRSS:"), Some(1024));
        assert_eq!(parse_status_field(status, "VmHWM:"), Some(2048));
        assert_eq!(parse_status_field(status, "VmSwap:"), None);
        // A command name with spaces and a parenthesis does not shift the fields.
        let stat = "42 (a (b) c) S 1 1 1 0 -1 0 0 0 0 0 250 150 0 0 20 0 1 0";
        assert_eq!(parse_cpu_seconds(stat), Some(4.0));
        assert_eq!(parse_cpu_seconds("garbage"), None);
    }

    #[test]
    fn this_process_can_be_read() {
        let me = std::process::id();
        assert!(rss_kib(me).is_some_and(|k| k > 0));
        assert!(cpu_seconds(me).is_some());
        assert!(context_switches(me) > 0);
        let line = command_line(me).unwrap();
        assert!(all_command_lines()
            .iter()
            .any(|(p, l)| *p == me && *l == line));
    }
}
