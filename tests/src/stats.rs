//! The figures the benchmarks print.

use std::time::Duration;

/// The `p`th percentile (nearest rank) of `samples`; zero for none.
#[must_use]
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a rank of a sample count"
)]
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds, with fractions.
#[must_use]
pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

/// The commit checked out (short hash, `unknown` outside git) and whether tracked files
/// have changes: what a figure was measured on.
#[must_use]
pub fn commit() -> (String, bool) {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|c| !c.is_empty());
    (commit, dirty)
}

/// The CPU's model name (`/proc/cpuinfo`), `unknown` where there is none.
#[must_use]
pub fn cpu() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Where and when a figure was made, in one line: the date (UTC), the commit (and whether
/// the work tree had changes), the cores and the CPU.
#[must_use]
pub fn machine() -> String {
    let (commit, dirty) = commit();
    let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let date = crate::booking::rfc3339(i64::try_from(now).unwrap_or(0));
    format!(
        "{date}, commit {commit}{}, {cores} cores ({})",
        if dirty { " with uncommitted changes" } else { "" },
        cpu()
    )
}

/// The MySQL server's `Com_select` counter (every SELECT it ran, all sessions), read with
/// the `mariadb` (or `mysql`) client from `TEST_DATABASE_URL`.
///
/// # Errors
/// When neither client can read it.
pub fn com_select() -> anyhow::Result<u64> {
    let url = std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
    let rest = url.trim_start_matches("mysql://");
    let (user, host) = rest.split_once('@').unwrap_or(("root", rest));
    let (user, password) = user.split_once(':').map_or((user, None), |(u, p)| (u, Some(p)));
    let host = host.split('/').next().unwrap_or(host);
    let (host, port) = host.split_once(':').unwrap_or((host, "3306"));
    for client in ["mariadb", "mysql"] {
        let mut command = std::process::Command::new(client);
        command.args(["-N", "-B", "-h", host, "-P", port, "-u", user]);
        if let Some(password) = password {
            command.arg(format!("-p{password}"));
        }
        let Ok(output) = command.args(["-e", "SHOW GLOBAL STATUS LIKE 'Com_select'"]).output() else {
            continue;
        };
        if output.status.success() {
            let text = String::from_utf8_lossy(&output.stdout);
            return text
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("no Com_select figure"));
        }
    }
    anyhow::bail!("neither mariadb nor mysql client could read Com_select")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&samples, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&samples, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
        assert!((ms(Duration::from_micros(1_500)) - 1.5).abs() < f64::EPSILON);
    }
}
