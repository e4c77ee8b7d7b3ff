//! The load balancer's configuration proven: Debian's nginx runs `deploy/nginx/nginx.conf`
//! unchanged in front of three instances (only its two included files, the upstream
//! servers and the listen address, are written here, as the file's header says). Requests
//! spread over the instances, an instance that dies is passed over without a failed
//! request, the queue's event stream is not buffered, nginx's own errors are problem+json,
//! and nginx's health location answers without an instance.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e::booking::{AsFan as _, env, sign_up};
use e2e::{Cluster, ClusterOptions, client};
use futures::StreamExt as _;
use serde_json::Value;

use super::send;

/// nginx on a free loopback port with the repository's configuration, killed when dropped.
struct Nginx {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Nginx {
    fn start(upstreams: &[&str]) -> Self {
        let binary = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|path| std::path::Path::new(path).exists())
            .expect("nginx is installed (make services installs it)");
        let dir = std::env::temp_dir().join(format!("concert-nginx-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nginx/nginx.conf");
        std::fs::copy(&config, dir.join("nginx.conf")).expect("the configuration copied");
        let servers: String = upstreams
            .iter()
            .map(|base| {
                let address = base.trim_start_matches("http://");
                format!("server {address} max_fails=1 fail_timeout=30s;\n")
            })
            .collect();
        std::fs::write(dir.join("upstreams.conf"), servers).expect("upstreams.conf");
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").expect("a port").local_addr().expect("addr").port();
        std::fs::write(dir.join("listen.conf"), format!("listen 127.0.0.1:{port};\n")).expect("listen.conf");
        let prefix = format!("{}/", dir.display());
        let globals = format!("daemon off; pid {}/nginx.pid;", dir.display());
        let test = Command::new(binary)
            .args(["-t", "-q", "-p", &prefix, "-c"])
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .args(["-g", &globals])
            .output()
            .expect("nginx -t ran");
        assert!(test.status.success(), "nginx -t: {}", String::from_utf8_lossy(&test.stderr));
        let child = Command::new(binary)
            .args(["-p", &prefix, "-c"])
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .args(["-g", &globals])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx started");
        Self { child, port, dir }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: nginx's fast shutdown, in which the master stops its workers before it
        // exits (a SIGKILLed master would leave them running). SIGKILL only if it lingers.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How many requests to the charge route instance `ops` has served.
async fn charges_served(http: &awc::Client, ops: &str) -> u64 {
    super::metrics_text(http, ops)
        .await
        .lines()
        .filter(|line| line.starts_with("http_requests_total{") && line.contains("points/charge"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[actix_web::test]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "a request count")]
async fn nginx_with_the_deployed_configuration_spreads_requests_passes_over_a_dead_instance_and_streams_events()
 {
    const CHARGES: usize = 60;
    // The instances trust nginx's X-Forwarded-For (its address is loopback).
    let mut env = env(100);
    env.push(("TRUSTED_PROXIES".into(), "127.0.0.1/32".into()));
    let cluster =
        Cluster::start_with(3, &ClusterOptions { env, ..ClusterOptions::default() }).await.expect("cluster");
    let bases: Vec<&str> = cluster.instances.iter().map(|i| i.base_url.as_str()).collect();
    let nginx = Nginx::start(&bases);
    let http = client();
    let front = nginx.url();

    // Up: nginx's own health location, then the service through it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = http.get(format!("{front}/nginx-health")).send().await.map(|r| r.status().as_u16()).ok();
        if status == Some(200) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "nginx did not answer: {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fan = sign_up(&http, &front, "behind-nginx").await.expect("signed up through nginx");
    let user = fan.id.clone();
    let charge = || {
        http.post(format!("{front}/api/v1/users/{user}/points/charge"))
            .bearer(&fan)
            .insert_header(("content-type", "application/json"))
    };

    // Spread: every instance serves some of the charges.
    for _ in 0..CHARGES {
        let status = charge().send_body(r#"{"amount": 10}"#).await.expect("answered").status().as_u16();
        assert_eq!(status, 200);
    }
    let mut served = Vec::new();
    for i in 0..3 {
        served.push(charges_served(&http, cluster.ops_url(i)).await);
    }
    assert_eq!(served.iter().sum::<u64>(), CHARGES as u64, "{served:?}");
    assert!(served.iter().all(|n| *n > 0), "some instance got nothing: {served:?}");

    // An instance dies: no request fails. A connection refused is retried on another
    // instance (nothing was sent), and the dead one is then left out for fail_timeout.
    cluster.instances[1].crash();
    for _ in 0..CHARGES {
        let status = charge().send_body(r#"{"amount": 10}"#).await.expect("answered").status().as_u16();
        assert_eq!(status, 200, "a charge failed with an instance down");
        let balance = send(http.get(format!("{front}/api/v1/users/{user}/points")).bearer(&fan), None).await;
        assert_eq!(balance.0.as_u16(), 200);
    }
    let balance = send(http.get(format!("{front}/api/v1/users/{user}/points")).bearer(&fan), None).await;
    assert_eq!(balance.2["balance"], 2 * CHARGES as i64 * 10, "every charge applied once");

    // The queue's event stream through nginx: the first event arrives at once, not when a
    // buffer fills or the stream ends.
    let issued = send(http.post(format!("{front}/api/v1/queue/tokens")).bearer(&fan), Some("{}")).await;
    assert!(matches!(issued.0.as_u16(), 200 | 201), "{issued:?}");
    let token = issued.2["token"].as_str().expect("a token").to_owned();
    let mut stream = http
        .get(format!("{front}/api/v1/queue/tokens/me/events"))
        .bearer(&fan)
        .queue(&token)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .expect("a stream");
    assert_eq!(stream.status().as_u16(), 200);
    let first = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("an event within seconds, not held in a buffer")
        .expect("a chunk")
        .expect("bytes");
    let text = String::from_utf8_lossy(&first);
    assert!(text.contains("event: "), "{text}");
    drop(stream);

    // nginx's own refusals are problem+json too: a body far past the limit.
    let big = "x".repeat(256 * 1024);
    let mut refused = charge().send_body(big).await.expect("answered");
    assert_eq!(refused.status().as_u16(), 413);
    let body: Value = refused.json().await.expect("problem+json");
    assert_eq!(body["code"], "PAYLOAD_TOO_LARGE", "{body}");

    drop(nginx);
    cluster.shut_down().await;
}
