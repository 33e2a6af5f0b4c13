//! The OBJ backend's parameters (NIXL's OBJ names where they exist) and
//! the S3 client they configure.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder, Checksum};
use object_store::{BackoffConfig, Certificate, ClientOptions, RetryConfig};

use super::plan::Shape;
use crate::error::{Error, Result};
use crate::params::{ParamSpec, Params};

pub(super) const NAME: &str = "OBJ";

/// S3 allows at most this many parts in one multipart upload.
pub(super) const MAX_PARTS: u64 = 10_000;

/// The parameter table. Empty strings defer to the standard `AWS_*`
/// environment variables, as the AWS SDKs do.
pub(super) const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "bucket", default: "", doc: "bucket every object lives in (else AWS_DEFAULT_BUCKET); required" },
    ParamSpec {
        name: "endpoint_override",
        default: "",
        doc: "S3 endpoint, e.g. http://127.0.0.1:9000 for a local server (else AWS_ENDPOINT_URL, else AWS)",
    },
    ParamSpec {
        name: "scheme",
        default: "https",
        doc: "http | https: the scheme of an endpoint_override given without one; http also allows plain-HTTP endpoints",
    },
    ParamSpec { name: "region", default: "", doc: "region (else AWS_REGION / AWS_DEFAULT_REGION, else us-east-1)" },
    ParamSpec { name: "access_key", default: "", doc: "access key id (else AWS_ACCESS_KEY_ID)" },
    ParamSpec { name: "secret_key", default: "", doc: "secret access key (else AWS_SECRET_ACCESS_KEY)" },
    ParamSpec { name: "session_token", default: "", doc: "session token (else AWS_SESSION_TOKEN)" },
    ParamSpec {
        name: "use_virtual_addressing",
        default: "false",
        doc: "true: https://bucket.endpoint/key; false: https://endpoint/bucket/key (path style, what local servers want)",
    },
    ParamSpec {
        name: "req_checksum",
        default: "supported",
        doc: "supported | required: required sends a SHA-256 checksum with every upload, which the server verifies",
    },
    ParamSpec { name: "ca_bundle", default: "", doc: "PEM file of CA certificates trusted besides the system's" },
    ParamSpec {
        name: "max_in_flight",
        default: "16",
        doc: "S3 requests in flight at once per backend instance, all requests together (1..=1024)",
    },
    ParamSpec {
        name: "part_size",
        default: "8M",
        doc: "bytes per multipart part and per ranged GET (5M..=5G; K/M/G suffixes)",
    },
    ParamSpec {
        name: "multipart_threshold",
        default: "8M",
        doc: "objects larger than this are uploaded in parts, in parallel (K/M/G suffixes)",
    },
    ParamSpec {
        name: "retries",
        default: "3",
        doc: "attempts after the first for a failed S3 request (0..=10); past them the request fails",
    },
    ParamSpec {
        name: "timeout",
        default: "30",
        doc: "seconds one S3 request may take, retries included (1..=3600); also bounds a connect",
    },
    ParamSpec {
        name: "allow_rmw",
        default: "false",
        doc: "true: a WRITE inside an object (offset > 0, or a gap) reads the object, patches it and puts it back",
    },
    ParamSpec { name: "threads", default: "2", doc: "threads of the backend's I/O runtime (1..=64)" },
];

/// The parsed parameters.
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub bucket: String,
    pub shape: Shape,
    pub max_in_flight: usize,
    pub timeout: Duration,
    pub threads: usize,
}

impl Config {
    pub(super) fn from_params(p: &Params) -> Result<(Config, Arc<AmazonS3>)> {
        let bucket = text(p, "bucket").or_else(|| env("AWS_DEFAULT_BUCKET")).ok_or_else(|| {
            Error::invalid("backend OBJ: no bucket: set the parameter 'bucket' (or AWS_DEFAULT_BUCKET)")
        })?;
        let part_size = p.parse_size(NAME, "part_size")?;
        if !(5 << 20..=5 << 30).contains(&part_size) {
            return Err(Error::invalid(format!(
                "backend OBJ: part_size = {part_size} is outside 5M..=5G (S3's part sizes)"
            )));
        }
        let multipart_threshold = p.parse_size(NAME, "multipart_threshold")?;
        if multipart_threshold > 5 << 30 {
            return Err(Error::invalid(format!(
                "backend OBJ: multipart_threshold = {multipart_threshold} is over 5G, S3's largest single PUT"
            )));
        }
        let max_in_flight: usize = p.parse(NAME, "max_in_flight")?;
        let retries: usize = p.parse(NAME, "retries")?;
        let timeout_s: u64 = p.parse(NAME, "timeout")?;
        let threads: usize = p.parse(NAME, "threads")?;
        for (what, v, lo, hi) in
            [("max_in_flight", max_in_flight, 1, 1024), ("retries", retries, 0, 10), ("threads", threads, 1, 64)]
        {
            if !(lo..=hi).contains(&v) {
                return Err(Error::invalid(format!("backend OBJ: {what} = {v} is outside {lo}..={hi}")));
            }
        }
        if !(1..=3600).contains(&timeout_s) {
            return Err(Error::invalid(format!("backend OBJ: timeout = {timeout_s} is outside 1..=3600 seconds")));
        }
        let allow_rmw = p.parse_bool(NAME, "allow_rmw")?;
        let timeout = Duration::from_secs(timeout_s);
        let cfg = Config {
            bucket,
            shape: Shape { part_size, multipart_threshold, allow_rmw },
            max_in_flight,
            timeout,
            threads,
        };
        let store = cfg.client(p, retries)?;
        Ok((cfg, Arc::new(store)))
    }

    /// The S3 client: each parameter, else its `AWS_*` variable. Only the
    /// variables named here are read (a stray `AWS_ENDPOINT_URL_S3` or
    /// `AWS_SESSION_TOKEN` cannot override or mix with the parameters);
    /// without keys the client asks the instance metadata service.
    fn client(&self, p: &Params, retries: usize) -> Result<AmazonS3> {
        let scheme = p.raw("scheme").unwrap_or("https").trim().to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(Error::invalid(format!("backend OBJ: scheme = '{scheme}' is not http or https")));
        }
        let virtual_hosts = p.parse_bool(NAME, "use_virtual_addressing")?;
        let mut b = AmazonS3Builder::new().with_bucket_name(&self.bucket);
        let endpoint = text(p, "endpoint_override").or_else(|| env("AWS_ENDPOINT_URL"));
        let mut allow_http = scheme == "http" || env("AWS_ALLOW_HTTP").is_some_and(|v| v == "true" || v == "1");
        if let Some(e) = endpoint {
            let (s, host) = e.split_once("://").unwrap_or((scheme.as_str(), e.as_str()));
            allow_http |= s == "http";
            // With an endpoint the client uses it as given: a virtual-hosted
            // bucket goes into the host here.
            let host = if virtual_hosts { format!("{}.{host}", self.bucket) } else { host.to_string() };
            b = b.with_endpoint(format!("{s}://{host}"));
        }
        let region = text(p, "region").or_else(|| env("AWS_REGION")).or_else(|| env("AWS_DEFAULT_REGION"));
        b = b.with_region(region.unwrap_or_else(|| "us-east-1".into()));
        let (key, secret) = (text(p, "access_key"), text(p, "secret_key"));
        let from_env = key.is_none() && secret.is_none();
        let (key, secret, token) = if from_env {
            (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"), env("AWS_SESSION_TOKEN"))
        } else {
            (key, secret, None)
        };
        let token = text(p, "session_token").or(token);
        for (v, set) in [
            (key, AmazonS3Builder::with_access_key_id as fn(AmazonS3Builder, String) -> AmazonS3Builder),
            (secret, AmazonS3Builder::with_secret_access_key),
            (token, AmazonS3Builder::with_token),
        ] {
            if let Some(v) = v {
                b = set(b, v);
            }
        }
        b = b.with_virtual_hosted_style_request(virtual_hosts);
        match p.raw("req_checksum").unwrap_or("supported").trim().to_ascii_lowercase().as_str() {
            "supported" | "when_supported" => {}
            "required" | "when_required" => b = b.with_checksum_algorithm(Checksum::SHA256),
            other => {
                return Err(Error::invalid(format!(
                    "backend OBJ: req_checksum = '{other}' is not supported or required"
                )))
            }
        }
        // The client options carry allow_http: they replace the builder's.
        let mut opts = ClientOptions::new()
            .with_allow_http(allow_http)
            .with_timeout(self.timeout)
            .with_connect_timeout(self.timeout.min(Duration::from_secs(10)))
            .with_pool_max_idle_per_host(self.max_in_flight);
        if let Some(path) = text(p, "ca_bundle") {
            let pem = std::fs::read(&path).map_err(|e| Error::io(format!("backend OBJ: ca_bundle '{path}'"), e))?;
            let certs = Certificate::from_pem_bundle(&pem).map_err(|e| {
                Error::invalid(format!("backend OBJ: ca_bundle '{path}' holds no PEM certificates: {e}"))
            })?;
            for c in certs {
                opts = opts.with_root_certificate(c);
            }
        }
        let backoff =
            BackoffConfig { init_backoff: Duration::from_millis(50), max_backoff: Duration::from_secs(2), base: 2.0 };
        b = b.with_client_options(opts).with_retry(RetryConfig {
            backoff,
            max_retries: retries,
            retry_timeout: self.timeout,
        });
        b.build().map_err(|e| Error::invalid(format!("backend OBJ: cannot configure the S3 client: {e}")))
    }
}

/// A parameter's value, `None` when empty.
fn text(p: &Params, name: &str) -> Option<String> {
    p.raw(name).map(str::trim).filter(|v| !v.is_empty()).map(str::to_string)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}
