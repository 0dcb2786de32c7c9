//! The demo's capacity ramp: what rate of fan-out this box sustains.
//!
//! Before its steady fan-out, `loadgen demo` publishes in short steps at
//! rising rates ([`rates`]: ×[`RampPlan::factor`] per step), waits after each
//! step until every delivery it asked for arrived (or a bound), and hands
//! the step's measures to [`judge`]. The first step the box does not keep up
//! with ends the ramp; the capacity is the highest step before it
//! ([`capacity`]), and the steady fan-out runs at [`STEADY_FRACTION`] of it.
//!
//! Pure: no IO, no clock. The demo measures, this module decides, so the
//! decision is tested on its own with steps that keep up, steps that fall
//! behind and a latency blow-up.
//!
//! ## What "keeps up" means
//!
//! - **Rate**: a step asks `asked` deliveries (the subscribers of every
//!   channel it published to) in `publish_secs`. The box took
//!   `publish_secs` plus however long the last of them lagged behind its
//!   last publish (`drain_secs`); the first step's lag is the unloaded
//!   latency tail, not a backlog, so it is subtracted. A box that keeps up
//!   delivers at the asked rate; one that does not builds a backlog that
//!   shows as a longer drain. Delivered below [`KEEP_UP`] of asked is
//!   behind.
//! - **Latency**: a step whose publish→deliver p99 is more than
//!   [`LATENCY_GROWTH`]× the best p99 of the steps before it (and more than
//!   [`LATENCY_FLOOR_MS`] above it, so that a few milliseconds of jitter on
//!   an idle box are not a blow-up) is queueing, not delivering.

use serde::Serialize;

/// Delivered below this fraction of the asked deliveries/s is "behind".
pub const KEEP_UP: f64 = 0.8;
/// A p99 above this multiple of the best earlier step's is a blow-up.
pub const LATENCY_GROWTH: f64 = 2.0;
/// …and only when it is this many milliseconds above it.
pub const LATENCY_FLOOR_MS: f64 = 100.0;
/// The steady fan-out runs at this fraction of the capacity: below the knee,
/// where the latency is the box's and not a queue's.
pub const STEADY_FRACTION: f64 = 0.7;

/// The ramp's shape. Bounded in time and publications: at most `steps`
/// steps of `step_secs` each (plus each step's drain, at most
/// `max_drain_secs`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RampPlan {
    /// Publications per second of the first step.
    pub first_rate: f64,
    /// Each step's rate is the previous one's times this.
    pub factor: f64,
    /// Steps at most.
    pub steps: usize,
    /// Seconds of publishing per step.
    pub step_secs: f64,
    /// Longest wait after a step for its deliveries.
    pub max_drain_secs: f64,
    /// Chat text per publication, as the steady fan-out's (`--payload-bytes`).
    pub payload_bytes: usize,
}

impl RampPlan {
    /// The publications of a step at `rate` (at least one).
    pub fn publications(&self, rate: f64) -> usize {
        ((rate * self.step_secs).round() as usize).max(1)
    }
}

/// The rate of each step, in publications per second.
pub fn rates(plan: &RampPlan) -> Vec<f64> {
    (0..plan.steps).map(|k| plan.first_rate * plan.factor.powi(k as i32)).collect()
}

/// What the demo measured of one step.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StepMeasure {
    /// Publications per second asked.
    pub rate: f64,
    /// Publications sent.
    pub publications: u64,
    /// Seconds the step took to publish them.
    pub publish_secs: f64,
    /// Deliveries its publications asked for (their channels' subscribers).
    pub asked: u64,
    /// Deliveries that arrived by the end of its drain.
    pub delivered: u64,
    /// Seconds after the step's last publish until its last delivery (or
    /// the bound, when some never came in time).
    pub drain_secs: f64,
    /// Publish→deliver p50 of the step's deliveries (ms).
    pub p50_ms: f64,
    /// Publish→deliver p99 of the step's deliveries (ms).
    pub p99_ms: f64,
}

/// A judged step.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Step {
    /// What was measured.
    #[serde(flatten)]
    pub measure: StepMeasure,
    /// Deliveries per second asked.
    pub asked_per_sec: f64,
    /// Deliveries per second the box delivered.
    pub delivered_per_sec: f64,
    /// The box kept up.
    pub kept_up: bool,
    /// Why not, when it did not.
    pub reason: Option<String>,
}

/// Judges step `m` after the `earlier` steps (all of which kept up: the
/// ramp stops at the first that does not).
pub fn judge(earlier: &[Step], m: StepMeasure) -> Step {
    let secs = m.publish_secs.max(1e-3);
    let asked_per_sec = m.asked as f64 / secs;
    // The unloaded latency tail: the first step's drain.
    let base_drain = earlier.first().map_or(m.drain_secs, |s| s.measure.drain_secs);
    let backlog_secs = (m.drain_secs - base_drain).max(0.0);
    let delivered_per_sec = m.delivered as f64 / (secs + backlog_secs);
    let best_p99 = earlier.iter().filter(|s| s.kept_up).map(|s| s.measure.p99_ms).reduce(f64::min);
    let reason = if delivered_per_sec < KEEP_UP * asked_per_sec {
        Some(format!(
            "behind: delivered {delivered_per_sec:.0}/s of {asked_per_sec:.0}/s asked ({:.0} %)",
            100.0 * delivered_per_sec / asked_per_sec.max(1e-9)
        ))
    } else if let Some(best) = best_p99
        && m.p99_ms > LATENCY_GROWTH * best
        && m.p99_ms - best > LATENCY_FLOOR_MS
    {
        Some(format!(
            "latency: p99 {:.0} ms, {:.1}× the best earlier step's {best:.0} ms",
            m.p99_ms,
            m.p99_ms / best
        ))
    } else {
        None
    };
    Step { measure: m, asked_per_sec, delivered_per_sec, kept_up: reason.is_none(), reason }
}

/// What the ramp found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Capacity {
    /// Publications per second of the highest step the box kept up with
    /// (when the first step already fell behind: that step's rate scaled by
    /// what it delivered of what it asked).
    pub publications_per_sec: f64,
    /// Deliveries per second of that step.
    pub deliveries_per_sec: f64,
    /// A step fell behind: this is the box's limit, not just the ramp's top.
    pub bounded: bool,
}

/// The capacity the judged `steps` show: the highest step that kept up
/// before the first that did not. `None` without steps.
pub fn capacity(steps: &[Step]) -> Option<Capacity> {
    let failed = steps.iter().position(|s| !s.kept_up);
    let kept = &steps[..failed.unwrap_or(steps.len())];
    match (kept.last(), failed) {
        (Some(s), _) => Some(Capacity {
            publications_per_sec: s.measure.rate,
            deliveries_per_sec: s.delivered_per_sec,
            bounded: failed.is_some(),
        }),
        (None, Some(i)) => {
            let s = &steps[i];
            let share = (s.delivered_per_sec / s.asked_per_sec.max(1e-9)).min(1.0);
            Some(Capacity {
                publications_per_sec: s.measure.rate * share,
                deliveries_per_sec: s.delivered_per_sec,
                bounded: true,
            })
        }
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step at `rate`/s of 2 s, each publication reaching 1,000
    /// subscribers, all delivered, drained `drain` s after its end, p99
    /// `p99` ms.
    fn step(rate: f64, drain: f64, p99: f64) -> StepMeasure {
        let publications = (rate * 2.0) as u64;
        StepMeasure {
            rate,
            publications,
            publish_secs: 2.0,
            asked: publications * 1_000,
            delivered: publications * 1_000,
            drain_secs: drain,
            p50_ms: p99 / 3.0,
            p99_ms: p99,
        }
    }

    /// Judges steps in order as the demo does, stopping at the first that
    /// does not keep up.
    fn ramp(measures: Vec<StepMeasure>) -> Vec<Step> {
        let mut steps: Vec<Step> = Vec::new();
        for m in measures {
            let s = judge(&steps, m);
            let stop = !s.kept_up;
            steps.push(s);
            if stop {
                break;
            }
        }
        steps
    }

    #[test]
    fn rates_rise_geometrically_and_steps_are_bounded() {
        let plan = RampPlan {
            first_rate: 4.0,
            factor: 1.5,
            steps: 4,
            step_secs: 2.5,
            max_drain_secs: 3.0,
            payload_bytes: 0,
        };
        assert_eq!(rates(&plan), [4.0, 6.0, 9.0, 13.5]);
        assert_eq!(plan.publications(4.0), 10);
        assert_eq!(plan.publications(0.01), 1);
    }

    #[test]
    fn steps_that_keep_up_all_pass_and_the_top_is_a_lower_bound() {
        let steps = ramp(vec![step(4.0, 0.3, 200.0), step(6.0, 0.35, 250.0), step(9.0, 0.4, 320.0)]);
        assert!(steps.iter().all(|s| s.kept_up), "{steps:?}");
        assert_eq!(steps[2].asked_per_sec, 9_000.0);
        // 0.1 s more lag than the first step: within the bound.
        assert!((steps[2].delivered_per_sec - 18_000.0 / 2.1).abs() < 1e-6);
        let c = capacity(&steps).unwrap();
        assert_eq!(
            c,
            Capacity { publications_per_sec: 9.0, deliveries_per_sec: 18_000.0 / 2.1, bounded: false }
        );
    }

    #[test]
    fn a_step_that_falls_behind_stops_the_ramp_and_the_one_before_is_the_capacity() {
        // At 13.5/s the last deliveries came 1.3 s after the usual lag: the
        // box took 3.3 s for 2 s of work (61 %).
        let steps = ramp(vec![
            step(4.0, 0.3, 200.0),
            step(6.0, 0.3, 220.0),
            step(9.0, 0.5, 260.0),
            step(13.5, 1.6, 390.0),
            step(20.0, 0.3, 200.0),
        ]);
        assert_eq!(steps.len(), 4, "the ramp stops at the first step behind");
        assert!(steps[..3].iter().all(|s| s.kept_up));
        let last = &steps[3];
        assert!(!last.kept_up);
        assert!(
            last.reason.as_deref().unwrap().starts_with("behind: delivered 8182/s of 13500/s asked (61 %)"),
            "{last:?}"
        );
        let c = capacity(&steps).unwrap();
        assert_eq!((c.publications_per_sec, c.bounded), (9.0, true));
        assert!((c.deliveries_per_sec - 18_000.0 / 2.2).abs() < 1e-6);
    }

    #[test]
    fn deliveries_that_never_came_within_the_drain_bound_are_behind() {
        let mut m = step(9.0, 3.0, 900.0);
        m.delivered = m.asked / 2;
        let steps = ramp(vec![step(4.0, 3.0, 300.0), m]);
        assert!(!steps[1].kept_up, "{:?}", steps[1]);
        assert!(steps[1].reason.as_deref().unwrap().starts_with("behind"));
    }

    #[test]
    fn a_latency_blow_up_stops_the_ramp_even_at_the_asked_rate() {
        let steps = ramp(vec![step(4.0, 0.3, 200.0), step(6.0, 0.3, 180.0), step(9.0, 0.4, 450.0)]);
        assert_eq!(steps.len(), 3);
        assert!(steps[0].kept_up && steps[1].kept_up);
        assert_eq!(
            steps[2].reason.as_deref(),
            Some("latency: p99 450 ms, 2.5× the best earlier step's 180 ms")
        );
        assert_eq!(capacity(&steps).unwrap().publications_per_sec, 6.0);
    }

    #[test]
    fn milliseconds_of_jitter_on_an_idle_box_are_not_a_blow_up() {
        // 3 ms → 9 ms is 3×, but 6 ms is noise, not a queue.
        let steps = ramp(vec![step(4.0, 0.01, 3.0), step(6.0, 0.01, 9.0), step(9.0, 0.01, 40.0)]);
        assert!(steps.iter().all(|s| s.kept_up), "{steps:?}");
    }

    #[test]
    fn a_first_step_already_behind_scales_its_rate_by_what_it_delivered() {
        let mut m = step(10.0, 3.0, 2_000.0);
        m.delivered = m.asked / 2;
        let steps = ramp(vec![m, step(15.0, 0.1, 10.0)]);
        assert_eq!(steps.len(), 1);
        // The first step is its own baseline for the lag, so only what
        // never arrived counts: half.
        assert!(!steps[0].kept_up, "{:?}", steps[0]);
        let c = capacity(&steps).unwrap();
        assert_eq!((c.publications_per_sec, c.deliveries_per_sec, c.bounded), (5.0, 5_000.0, true));
        assert_eq!(capacity(&[]), None);
    }
}
