//! Memory per identity and per stream, fitted by least squares over the
//! idle point and the loaded ones.

use serde::{Deserialize, Serialize};

use super::MemPoint;

/// settled RSS ≈ base + per_identity × identities + per_stream × streams,
/// least squares over the idle point and the loaded ones. An identity here
/// is one Envoy: its cache entry, its Vault token and its connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fit {
    pub base_kib: f64,
    pub per_identity_kib: f64,
    pub per_stream_kib: f64,
    pub max_residual_kib: f64,
}

/// Least squares fit of `settled = a + b·identities + c·streams`.
pub fn fit(points: &[MemPoint]) -> Fit {
    let rows: Vec<[f64; 4]> = points
        .iter()
        .map(|p| {
            [
                1.0,
                p.identities as f64,
                p.streams as f64,
                p.settled_rss_kib as f64,
            ]
        })
        .collect();
    // Normal equations AᵀA x = Aᵀy, solved by Gaussian elimination.
    let mut m = [[0.0f64; 4]; 3];
    for r in &rows {
        for i in 0..3 {
            for j in 0..3 {
                m[i][j] += r[i] * r[j];
            }
            m[i][3] += r[i] * r[3];
        }
    }
    for col in 0..3 {
        let pivot = (col..3)
            .max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))
            .unwrap_or(col);
        m.swap(col, pivot);
        if m[col][col].abs() < 1e-12 {
            return Fit {
                base_kib: f64::NAN,
                per_identity_kib: f64::NAN,
                per_stream_kib: f64::NAN,
                max_residual_kib: f64::NAN,
            };
        }
        let pivot_row = m[col];
        for (row, r) in m.iter_mut().enumerate() {
            if row != col {
                let f = r[col] / pivot_row[col];
                for (x, p) in r.iter_mut().zip(pivot_row).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    let x: Vec<f64> = (0..3).map(|i| m[i][3] / m[i][i]).collect();
    let max_residual = rows
        .iter()
        .map(|r| (x[0] + x[1] * r[1] + x[2] * r[2] - r[3]).abs())
        .fold(0.0, f64::max);
    Fit {
        base_kib: x[0],
        per_identity_kib: x[1],
        per_stream_kib: x[2],
        max_residual_kib: max_residual,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_recovers_a_linear_model() {
        let p = |i: usize, s: usize| MemPoint {
            identities: i,
            connections: i,
            streams: s,
            settled_rss_kib: (7000 + 12 * i + 5 * s) as u64,
            peak_rss_kib: 0,
        };
        let f = fit(&[p(0, 0), p(100, 100), p(100, 200), p(500, 500), p(500, 1000)]);
        assert!((f.base_kib - 7000.0).abs() < 1e-6, "{f:?}");
        assert!((f.per_identity_kib - 12.0).abs() < 1e-6, "{f:?}");
        assert!((f.per_stream_kib - 5.0).abs() < 1e-6, "{f:?}");
        // Identities and streams moving together cannot be told apart.
        assert!(fit(&[p(0, 0), p(100, 100), p(500, 500)])
            .per_stream_kib
            .is_nan());
    }
}
