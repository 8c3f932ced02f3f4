//! `announce: Aws`: in a VPC the fabric delivers an address only to the network interface it is
//! assigned to, so the holder of an egress IP assigns it to its own interface as a secondary
//! private IP (taking it from the previous holder's) and, when the gateway maps it to an Elastic
//! IP, associates that Elastic IP with it; when it lets go, it unassigns it. Calls go to the EC2
//! Query API, signed with Signature Version 4, from a task per egress IP that retries until the
//! node holds the address no more: the data path never waits on the cloud.
//!
//! IAM permissions the agents need: `ec2:AssignPrivateIpAddresses`,
//! `ec2:UnassignPrivateIpAddresses` and, with Elastic IPs, `ec2:AssociateAddress`. Credentials
//! come from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use ring::{digest, hmac};
use tokio::sync::watch;

/// The EC2 Query API's version.
const API_VERSION: &str = "2016-11-15";
/// Between attempts while the address is still held here.
const RETRY: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(10);

/// This node's side of `announce: Aws` (`--aws-*`).
#[derive(Clone, Debug)]
pub struct AwsConfig {
    pub region: String,
    /// `None`: `https://ec2.<region>.amazonaws.com`.
    pub endpoint: Option<String>,
    /// This node's network interface (`eni-...`), where its egress IPs go.
    pub interface: String,
    /// Egress IP -> Elastic IP allocation (`eipalloc-...`) to associate with it.
    pub elastic_ips: BTreeMap<Ipv4Addr, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("AWS credentials: {0} is not set")]
    Credentials(&'static str),
    #[error("EC2 {action}: {source}")]
    Http {
        action: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("EC2 {action} answered {status}: {body}")]
    Refused {
        action: &'static str,
        status: u16,
        body: String,
    },
}

#[derive(Clone, Debug)]
struct Credentials {
    key_id: String,
    secret: String,
    token: Option<String>,
}

impl Credentials {
    fn from_env() -> Result<Self, AwsError> {
        let var = |name| std::env::var(name).map_err(|_| AwsError::Credentials(name));
        Ok(Self {
            key_id: var("AWS_ACCESS_KEY_ID")?,
            secret: var("AWS_SECRET_ACCESS_KEY")?,
            token: std::env::var("AWS_SESSION_TOKEN").ok(),
        })
    }
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// An EC2 client for this node's interface.
#[derive(Clone)]
pub struct Ec2 {
    config: AwsConfig,
    client: Client<Https, Full<Bytes>>,
}

impl Ec2 {
    pub fn new(config: AwsConfig) -> Result<Self, AwsError> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| AwsError::Http {
                action: "TLS roots",
                source: Box::new(e),
            })?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            config,
            client: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    /// Moves `ip` to this node's interface (from whichever had it) and its Elastic IP with it.
    pub async fn claim(&self, ip: Ipv4Addr) -> Result<(), AwsError> {
        let ip_text = ip.to_string();
        let eni = self.config.interface.as_str();
        self.call(
            "AssignPrivateIpAddresses",
            &[
                ("NetworkInterfaceId", eni),
                ("PrivateIpAddress.1", &ip_text),
                ("AllowReassignment", "true"),
            ],
        )
        .await?;
        if let Some(allocation) = self.config.elastic_ips.get(&ip) {
            self.call(
                "AssociateAddress",
                &[
                    ("AllocationId", allocation),
                    ("NetworkInterfaceId", eni),
                    ("PrivateIpAddress", &ip_text),
                    ("AllowReassociation", "true"),
                ],
            )
            .await?;
        }
        Ok(())
    }

    /// Takes `ip` off this node's interface.
    pub async fn release(&self, ip: Ipv4Addr) -> Result<(), AwsError> {
        let ip_text = ip.to_string();
        self.call(
            "UnassignPrivateIpAddresses",
            &[
                ("NetworkInterfaceId", self.config.interface.as_str()),
                ("PrivateIpAddress.1", &ip_text),
            ],
        )
        .await
    }

    async fn call(&self, action: &'static str, params: &[(&str, &str)]) -> Result<(), AwsError> {
        let http =
            |source: Box<dyn std::error::Error + Send + Sync>| AwsError::Http { action, source };
        let credentials = Credentials::from_env()?;
        let endpoint = self
            .config
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://ec2.{}.amazonaws.com", self.config.region));
        let uri: hyper::Uri = endpoint.parse().map_err(|e| http(Box::new(e)))?;
        let host = uri.authority().map(ToString::to_string).unwrap_or_default();
        let mut body = format!("Action={action}&Version={API_VERSION}");
        for (key, value) in params {
            let _ = write!(body, "&{}={}", encode(key), encode(value));
        }
        let (amz_date, _) = amz_timestamp(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
        );
        let request = SignedRequest {
            method: "POST",
            path: "/",
            query: "",
            headers: vec![
                (
                    "content-type".into(),
                    "application/x-www-form-urlencoded; charset=utf-8".into(),
                ),
                ("host".into(), host),
                ("x-amz-date".into(), amz_date.clone()),
            ]
            .into_iter()
            .chain(
                credentials
                    .token
                    .clone()
                    .map(|t| ("x-amz-security-token".to_owned(), t)),
            )
            .collect(),
            body: body.as_bytes(),
        };
        let authorization = authorization(
            &request,
            &credentials,
            &self.config.region,
            "ec2",
            &amz_date,
        );
        let mut builder = hyper::Request::post(uri);
        for (name, value) in &request.headers {
            if name != "host" {
                builder = builder.header(name.as_str(), value.as_str());
            }
        }
        let http_request = builder
            .header("authorization", authorization)
            .body(Full::new(Bytes::from(body.clone())))
            .map_err(|e| http(Box::new(e)))?;
        let response = tokio::time::timeout(TIMEOUT, self.client.request(http_request))
            .await
            .map_err(|e| http(Box::new(e)))?
            .map_err(|e| http(Box::new(e)))?;
        let status = response.status().as_u16();
        let text = response
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        if status == 200 {
            Ok(())
        } else {
            Err(AwsError::Refused {
                action,
                status,
                body: text,
            })
        }
    }
}

/// The egress IPs of `announce: Aws` gateways this node holds, as claimed in EC2.
pub struct Announced {
    /// `None` without `--aws-interface`.
    ec2: Option<Ec2>,
    claimed: BTreeSet<Ipv4Addr>,
}

impl Announced {
    pub fn new(ec2: Option<Ec2>) -> Self {
        Self {
            ec2,
            claimed: BTreeSet::new(),
        }
    }

    /// Claims the newly `held` egress IPs, each from a task of its own that retries while
    /// `held_now` says the node holds it, and gives up those it no longer holds.
    pub fn sync(
        &mut self,
        held: BTreeSet<Ipv4Addr>,
        held_now: &watch::Sender<BTreeSet<Ipv4Addr>>,
        warnings: &mut Vec<String>,
    ) {
        let Some(ec2) = &self.ec2 else {
            if !held.is_empty() {
                warnings.push(format!(
                    "egress IPs {held:?} are to be announced in AWS, but this agent has no \
                     --aws-interface: they are announced by ARP only"
                ));
            }
            return;
        };
        for ip in held.difference(&self.claimed) {
            tokio::spawn(keep_claimed(ec2.clone(), *ip, held_now.subscribe()));
        }
        for ip in self.claimed.difference(&held) {
            let (ec2, ip) = (ec2.clone(), *ip);
            tokio::spawn(async move {
                if let Err(error) = ec2.release(ip).await {
                    // The next holder's claim takes it anyway.
                    tracing::warn!(egress_ip = %ip, %error, "unassigning in EC2");
                }
            });
        }
        self.claimed = held;
    }
}

/// Claims `ip` for this node until it succeeds, or until `held` says the node let it go.
async fn keep_claimed(ec2: Ec2, ip: Ipv4Addr, mut held: watch::Receiver<BTreeSet<Ipv4Addr>>) {
    loop {
        if !held.borrow_and_update().contains(&ip) {
            return;
        }
        match ec2.claim(ip).await {
            Ok(()) => {
                tracing::info!(egress_ip = %ip, interface = %ec2.config.interface, "assigned in EC2");
                return;
            }
            Err(error) => tracing::warn!(egress_ip = %ip, %error, "assigning in EC2; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY) => {}
            changed = held.changed() => if changed.is_err() { return },
        }
    }
}

/// A request as Signature Version 4 sees it. Header names are lower case.
struct SignedRequest<'a> {
    method: &'a str,
    path: &'a str,
    /// Already in canonical form (sorted, encoded).
    query: &'a str,
    headers: Vec<(String, String)>,
    body: &'a [u8],
}

/// The `Authorization` header of `request` (Signature Version 4).
fn authorization(
    request: &SignedRequest<'_>,
    credentials: &Credentials,
    region: &str,
    service: &str,
    amz_date: &str,
) -> String {
    let mut headers: Vec<(String, String)> = request
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    headers.sort();
    let signed: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    let signed = signed.join(";");
    let mut canonical = format!("{}\n{}\n{}\n", request.method, request.path, request.query);
    for (k, v) in &headers {
        let _ = writeln!(canonical, "{k}:{v}");
    }
    let _ = write!(
        canonical,
        "\n{signed}\n{}",
        hex(sha256(request.body).as_ref())
    );
    let date = &amz_date[..8.min(amz_date.len())];
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(sha256(canonical.as_bytes()).as_ref())
    );
    let mut key = format!("AWS4{}", credentials.secret).into_bytes();
    for part in [date, region, service, "aws4_request"] {
        key = hmac_sha256(&key, part.as_bytes());
    }
    let signature = hex(&hmac_sha256(&key, to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
        credentials.key_id
    )
}

fn sha256(bytes: &[u8]) -> digest::Digest {
    digest::digest(&digest::SHA256, bytes)
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Percent-encoding as Signature Version 4 wants it: everything but unreserved characters.
fn encode(s: &str) -> String {
    s.bytes().fold(String::new(), |mut out, b| {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
        out
    })
}

/// `YYYYMMDDTHHMMSSZ` and `YYYYMMDD` of a Unix time, in UTC.
fn amz_timestamp(unix: u64) -> (String, String) {
    let days = i64::try_from(unix / 86_400).unwrap_or_default();
    let secs = unix % 86_400;
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let date = format!("{year:04}{month:02}{day:02}");
    (
        format!(
            "{date}T{:02}{:02}{:02}Z",
            secs / 3_600,
            secs % 3_600 / 60,
            secs % 60
        ),
        date,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's Signature Version 4 test suite: `get-vanilla` and `post-vanilla`.
    #[test]
    fn signs_like_the_aws_test_suite() {
        let credentials = Credentials {
            key_id: "AKIDEXAMPLE".into(),
            secret: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            token: None,
        };
        for (method, signature) in [
            (
                "GET",
                "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            ),
            (
                "POST",
                "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
            ),
        ] {
            let request = SignedRequest {
                method,
                path: "/",
                query: "",
                headers: vec![
                    ("Host".into(), "example.amazonaws.com".into()),
                    ("X-Amz-Date".into(), "20150830T123600Z".into()),
                ],
                body: b"",
            };
            let authz = authorization(
                &request,
                &credentials,
                "us-east-1",
                "service",
                "20150830T123600Z",
            );
            assert_eq!(
                authz,
                format!(
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature={signature}"
                )
            );
        }
    }

    #[test]
    fn timestamps_and_encoding() {
        assert_eq!(
            amz_timestamp(1_440_938_160),
            ("20150830T123600Z".into(), "20150830".into())
        );
        assert_eq!(amz_timestamp(951_782_400).1, "20000229");
        assert_eq!(encode("eni-0a1/b c"), "eni-0a1%2Fb%20c");
    }
}
