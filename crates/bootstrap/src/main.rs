//! `concert-server`: reads its settings from the environment and serves until stopped
//! (SIGINT or SIGTERM, after in-flight requests finish).

use bootstrap::settings::Settings;
use bootstrap::startup::Application;
use bootstrap::telemetry;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    telemetry::init_logs(&settings.log_filter, settings.log_format);
    let app = match Application::build(settings).await {
        Ok(app) => app,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "failed to start");
            return Err(error);
        }
    };
    app.run_until_stopped().await
}
