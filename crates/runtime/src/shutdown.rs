//! SIGTERM / SIGINT → a [`CancellationToken`].
//!
//! The first signal cancels the token so the binary can stop taking work, finish what is in
//! flight and release its Leases. A second signal exits at once (exit code 130), for the
//! impatient operator at a terminal.

use tokio_util::sync::CancellationToken;

/// Returns a token that is cancelled on the first SIGTERM or SIGINT. Must be called inside
/// a Tokio runtime.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received, stopping gracefully");
        cancel.cancel();
        wait_for_signal().await;
        tracing::warn!("second shutdown signal received, exiting immediately");
        std::process::exit(130);
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Installing handlers only fails when the runtime has no signal driver; fall
            // back to Ctrl-C so the process can still be stopped.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
