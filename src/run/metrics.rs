//! Metrics read from the final position's logits (spec/language.md, "metric"), in f64.

use crate::ir::experiment::MetricKind;
use crate::run::readout::Logits;

/// What a prompt's metrics read besides the run's own logits.
pub struct Readout<'a> {
    pub answer: Vec<u32>,
    pub wrong: Option<Vec<u32>>,
    /// log P_clean over the vocabulary (for `kl`).
    pub clean_log_probs: &'a [f64],
}

/// log-softmax of `logits`, in f64.
pub fn log_probs(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64));
    let sum: f64 = logits.iter().map(|&z| (z as f64 - max).exp()).sum();
    let log_sum = max + sum.ln();
    logits.iter().map(|&z| z as f64 - log_sum).collect()
}

/// log(sum(exp(x))) over `values`, computed stably.
pub fn log_sum_exp(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = values.clone().fold(f64::NEG_INFINITY, f64::max);
    max + values.map(|x| (x - max).exp()).sum::<f64>().ln()
}

/// M(run) for one metric.
pub fn value(kind: MetricKind, logits: &Logits, log_probs: &[f64], r: &Readout) -> f64 {
    let logit_sum = |ids: &[u32]| ids.iter().map(|&i| logits.get(i) as f64).sum::<f64>();
    let prob_sum = |ids: &[u32]| ids.iter().map(|&i| log_probs[i as usize].exp()).sum::<f64>();
    let wrong = || r.wrong.as_deref().expect("the checker requires `wrong` for this metric");
    match kind {
        MetricKind::LogitDiff => logit_sum(&r.answer) - logit_sum(wrong()),
        MetricKind::ProbDiff => prob_sum(&r.answer) - prob_sum(wrong()),
        MetricKind::Prob => prob_sum(&r.answer),
        // log of a sum of probabilities, computed stably from the log-probabilities.
        MetricKind::LogProb => log_sum_exp(r.answer.iter().map(|&i| log_probs[i as usize])),
        // -KL(P_clean || P_run).
        MetricKind::Kl => -r
            .clean_log_probs
            .iter()
            .zip(log_probs)
            .map(|(&lp, &lq)| if lp == f64::NEG_INFINITY { 0.0 } else { lp.exp() * (lp - lq) })
            .sum::<f64>(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_values() {
        let logits = [0.0f32, (2f32).ln(), 0.0, 0.0]; // probabilities 1/5, 2/5, 1/5, 1/5
        let lp = log_probs(&logits);
        let clean = log_probs(&[0.0, 0.0, 0.0, 0.0]);
        let r = Readout { answer: vec![1], wrong: Some(vec![0, 2]), clean_log_probs: &clean };
        let full = Logits::vocabulary(logits.to_vec());
        let v = |k| value(k, &full, &lp, &r);
        assert!((v(MetricKind::Prob) - 0.4).abs() < 1e-7);
        assert!((v(MetricKind::LogProb) - 0.4f64.ln()).abs() < 1e-7);
        assert!((v(MetricKind::LogitDiff) - (2f64.ln() - 0.0)).abs() < 1e-6);
        assert!((v(MetricKind::ProbDiff) - 0.0).abs() < 1e-7);
        // KL(uniform || q) = sum 1/4 (ln 1/4 - ln q)
        let kl: f64 = [0.2, 0.4, 0.2, 0.2].iter().map(|q: &f64| 0.25 * (0.25f64.ln() - q.ln())).sum();
        assert!((v(MetricKind::Kl) + kl).abs() < 1e-7);
        let same = value(MetricKind::Kl, &Logits::vocabulary(vec![0.0; 4]), &clean, &r);
        assert_eq!(same, 0.0);
    }
}
