//! Readers of Envoy's admin `/certs` answer: the URI SANs and serials of the
//! certificates Envoy holds, its leaf certificates, and its CA certificates.

use serde_json::Value;

/// Every certificate object (`ca_cert[]` and `cert_chain[]` entries) in `/certs` output.
fn cert_details(certs_json: &Value) -> impl Iterator<Item = &Value> {
    certs_json
        .get("certificates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|c| {
            ["ca_cert", "cert_chain"]
                .into_iter()
                .filter_map(move |k| c.get(k).and_then(Value::as_array))
                .flatten()
        })
}

/// All `subject_alt_names[].uri` values in admin `/certs` output
/// (trust bundle and leaf certificates alike, in document order, with duplicates).
pub fn cert_uris(certs_json: &Value) -> Vec<String> {
    cert_details(certs_json)
        .filter_map(|d| d.get("subject_alt_names").and_then(Value::as_array))
        .flatten()
        .filter_map(|san| san.get("uri").and_then(Value::as_str))
        .map(str::to_string)
        .collect()
}

/// All `serial_number` values (lowercase hex, as Envoy prints them) in admin
/// `/certs` output, in document order, with duplicates.
pub fn cert_serials(certs_json: &Value) -> Vec<String> {
    cert_details(certs_json)
        .filter_map(|d| d.get("serial_number").and_then(Value::as_str))
        .map(str::to_string)
        .collect()
}

/// The leaf certificates (`cert_chain[0]` of each TLS context) in `/certs`
/// output: (SPIFFE URI, serial, expiration_time as Envoy prints it).
pub fn leaf_certs(certs_json: &Value) -> Vec<(String, String, String)> {
    certs_json
        .get("certificates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("cert_chain").and_then(Value::as_array)?.first())
        .map(|leaf| {
            let s = |k: &str| {
                leaf.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let uri = leaf
                .get("subject_alt_names")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter()
                        .find_map(|san| san.get("uri").and_then(Value::as_str))
                })
                .unwrap_or_default()
                .to_string();
            (uri, s("serial_number"), s("expiration_time"))
        })
        .collect()
}

/// Serials of the trusted CA certificates (`ca_cert[]`) in `/certs` output.
pub fn ca_serials(certs_json: &Value) -> Vec<String> {
    certs_json
        .get("certificates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("ca_cert").and_then(Value::as_array))
        .flatten()
        .filter_map(|d| d.get("serial_number").and_then(Value::as_str))
        .map(str::to_string)
        .collect()
}
