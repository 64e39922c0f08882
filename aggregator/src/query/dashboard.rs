//! The web dashboard at `GET /`: one page, its script and styles and the vendored chart library
//! (`aggregator/dashboard/`), compiled into the binary so that it works with no internet access.
//!
//! The routes are open: the files hold no data. The page reads everything it shows from the
//! stats API, with the admin token the user gives it, so the figures are the API's.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX: &str = include_str!("../../dashboard/index.html");
const APP_JS: &str = include_str!("../../dashboard/app.js");
const APP_CSS: &str = include_str!("../../dashboard/app.css");
const UPLOT_JS: &str = include_str!("../../dashboard/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../dashboard/vendor/uPlot.min.css");

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Scripts and styles come only from this server: a page that shows spend behind an admin
/// token runs no inline or third-party code.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'";

pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| asset(HTML, INDEX)))
        .route("/dashboard/app.js", get(|| asset(JS, APP_JS)))
        .route("/dashboard/app.css", get(|| asset(CSS, APP_CSS)))
        .route(
            "/dashboard/vendor/uPlot.iife.min.js",
            get(|| asset(JS, UPLOT_JS)),
        )
        .route(
            "/dashboard/vendor/uPlot.min.css",
            get(|| asset(CSS, UPLOT_CSS)),
        )
}

async fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // The files change with the binary; revalidating is cheap and never shows a page
            // from an older release.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}
