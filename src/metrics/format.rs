//! The exposition formats `/metrics` answers in, chosen by the scraper's
//! `Accept` header.

use prometheus_client::registry::Registry;

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`, what every Prometheus scrapes.
    Prometheus,
    /// OpenMetrics 1.0 text, chosen when the scraper asks for it.
    OpenMetrics,
}

impl Format {
    /// Picks the format a scraper's `Accept` header asks for.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// `registries` in this format, as one exposition.
    pub(super) fn encode(self, registries: &[&Registry]) -> String {
        use prometheus_client::encoding::{prometheus_text, text};
        let mut out = String::new();
        let r = registries
            .iter()
            .try_for_each(|registry| match self {
                Format::Prometheus => prometheus_text::encode(&mut out, registry),
                Format::OpenMetrics => text::encode_registry(&mut out, registry),
            })
            .and_then(|()| match self {
                Format::Prometheus => Ok(()),
                Format::OpenMetrics => text::encode_eof(&mut out),
            });
        // Writing into a String cannot fail; a collector error would be a bug.
        if let Err(e) = r {
            tracing::error!("cannot encode the metrics: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_when_asked_for() {
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(
            Format::from_accept(Some("text/plain;version=0.0.4")),
            Format::Prometheus
        );
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        let text = Format::OpenMetrics.encode(&[&Registry::default(), &Registry::default()]);
        assert_eq!(text, "# EOF\n", "one end for all registries");
    }
}
