//! Time on a core: every session's earliest deadline on one coarse timer
//! wheel (pings, pong and connect deadlines, token expiry, drain closes,
//! stalled writes, lingering closes), request deadlines, admission control
//! and the drain. A tick costs what is due, not the sessions held.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use proto::client::Disconnect;
use proto::cluster::ClusterMsg;
use proto::ws::handshake;
use rand::Rng;

use super::{Core, Ctx};
use crate::effects::Sid;
use crate::session::{Due, Phase, Session};

impl Core {
    /// The core's coarse timer, called every [`super::TIMER_TICK`].
    pub fn tick(&mut self, now: Instant) {
        let ms = self.cx.clock.ms(now);
        for req in self.cx.requests.expired(ms) {
            self.cx.fx.metrics().router_timeouts.fetch_add(1, Ordering::Relaxed);
            let e = proto::client::ReplyError::INTERNAL;
            self.answer(
                ClusterMsg::RequestError { req, code: e.code, message: "router did not answer".into() },
                ms,
            );
        }
        let mut due = Vec::new();
        self.cx.timers.expire(now, &mut due);
        for (key, tick) in due {
            let sid = Sid(key);
            let Some(s) = self.sessions.get_mut(sid) else { continue };
            if u64::from(s.timer) != tick {
                continue; // rescheduled earlier and already handled
            }
            s.timer = 0;
            self.deadlines(sid, ms);
            if let Some(s) = self.sessions.get_mut(sid) {
                self.cx.rearm(s, sid);
            }
        }
        self.settle();
    }

    /// Acts on whichever of a session's deadlines passed.
    fn deadlines(&mut self, sid: Sid, now: u64) {
        let Some(s) = self.sessions.get_mut(sid) else { return };
        let write_timeout = self.cx.cfg.limits.write_timeout_secs.max(1) * 1000;
        let d = s.deadlines;
        let passed = |t: u64| t != 0 && now >= t;
        if s.blocked_since() != 0 && now >= s.blocked_since() + write_timeout {
            // A client that stops reading cannot pin its socket and queue.
            return self.finish(sid);
        }
        match s.phase() {
            Phase::Closing => {}
            Phase::Lingering if passed(d.phase_by.ms()) => {
                if !s.stream_tail(sid, &mut self.cx.fx) {
                    self.finish(sid)
                }
            }
            Phase::Lingering => {}
            Phase::Upgrading if passed(d.phase_by.ms()) => {
                // Slowloris: the upgrade request did not complete in time.
                self.refuse(sid, handshake::error_response(408, &[], "upgrade timed out"));
            }
            Phase::Open if passed(d.phase_by.ms()) => self.close(sid, Disconnect::STALE.into()),
            Phase::Upgrading | Phase::Open | Phase::Connected if passed(d.drain_at.ms()) => {
                self.close(sid, Disconnect::SHUTDOWN.into())
            }
            Phase::Upgrading | Phase::Open => {}
            Phase::Connected if passed(d.pong_due.ms()) => self.close(sid, Disconnect::NO_PONG.into()),
            Phase::Connected if passed(d.expires_at.ms()) && self.cx.cfg.proxy.refresh.is_some() => {
                self.refresh_hook(sid, now)
            }
            Phase::Connected if passed(d.expires_at.ms()) => self.close(sid, Disconnect::EXPIRED.into()),
            Phase::Connected if s.proxy.as_ref().and_then(|p| p.next_expiry()).is_some_and(passed) => {
                self.subscriptions_expired(sid, now)
            }
            Phase::Connected => {
                if passed(d.next_ping.ms()) {
                    let lim = &self.cx.cfg.limits;
                    s.deadlines.next_ping = Due::at(now + lim.ping_secs.max(1) as u64 * 1000);
                    if !s.deadlines.pong_due.is_set() && !s.transport.is_uni() {
                        s.deadlines.pong_due = Due::at(now + lim.pong_timeout_secs * 1000);
                    }
                    let (ping, limit) = (self.cx.ping.clone(), self.cx.queue_limit());
                    s.queue(sid, ping, limit, &mut self.cx.fx);
                }
            }
        }
    }

    /// Starts draining: close every session at a random moment within the
    /// drain window, with 3001 so clients reconnect elsewhere (the shell
    /// stops accepting). New connections are refused with 503.
    pub fn drain(&mut self, now: Instant, window: Duration) {
        let ms = self.cx.clock.ms(now);
        self.cx.draining = true;
        for sid in self.sessions.ids() {
            let at = ms + (window.as_millis() as f64 * self.cx.rng.random_range(0.0..1.0)) as u64;
            let Some(s) = self.sessions.get_mut(sid) else { continue };
            s.deadlines.drain_at = Due::at(at.max(1));
            self.cx.rearm(s, sid);
        }
    }

    /// Whether the core drains and has no session left.
    pub fn drained(&self) -> bool {
        self.cx.draining && self.sessions.is_empty()
    }

    /// Whether the core is draining.
    pub fn is_draining(&self) -> bool {
        self.cx.draining
    }

    /// Closes the sessions a frame did not fit (3008 "slow"), once the
    /// event that found them is done with the tables.
    pub(super) fn settle(&mut self) {
        while let Some(sid) = self.cx.fx.overflowed.pop() {
            self.close(sid, Disconnect::SLOW.into());
        }
    }
}

/// How often the refused clients' pace is measured.
const RETRY_PACE_WINDOW: Duration = Duration::from_secs(1);

/// The slowest pace refused clients are told to come back at, per core (a
/// core that finished no handshake in a second is not a measure of one).
const MIN_RETRY_RATE: f64 = 50.0;

impl Ctx {
    /// Puts a session on the timer wheel for its earliest deadline, unless
    /// it is already there for an earlier one. Called whenever a deadline
    /// may have moved earlier; later ones are found when the earlier fires.
    pub(super) fn rearm(&mut self, s: &mut Session, sid: Sid) {
        let write_timeout = self.cfg.limits.write_timeout_secs.max(1) * 1000;
        let Some(at) = s.next_deadline(write_timeout) else { return };
        let at = self.clock.at(at);
        let scheduled = u64::from(s.timer);
        if scheduled == 0 || self.timers.tick_for(at) < scheduled {
            // Ticks of 250 ms: u32 lasts 34 years of a core's life.
            s.timer = u32::try_from(self.timers.insert(sid.0, at)).unwrap_or(u32::MAX);
        }
    }

    /// Once a second (while connections arrive): the rate the refused are
    /// told to come back at. With the pending handshakes at least half of
    /// `max_pending_handshakes`, the rate they drained at over the last
    /// second, which is what this core takes when its CPU is short (several
    /// gateways on few CPUs, a busy box), at most the admission rate;
    /// otherwise the admission rate.
    fn pace_retries(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.drain_since);
        if elapsed < RETRY_PACE_WINDOW {
            return;
        }
        let rate = self.cfg.admission.accept_rate;
        let drained = f64::from(self.drained) / elapsed.as_secs_f64();
        let queued = self.handshakes >= self.cfg.admission.max_pending_handshakes.div_ceil(2);
        let paced = if queued { drained.clamp(MIN_RETRY_RATE.min(rate), rate) } else { rate };
        self.retry_slots.set_rate(paced);
        self.drained = 0;
        self.drain_since = now;
    }

    /// Admission control: `Some(answer)` when a new connection must be refused.
    /// `held`: the sessions the core holds now (its share of
    /// `admission.max_connections` is the bound).
    pub(super) fn admit(&mut self, now: Instant, held: usize) -> Option<Vec<u8>> {
        self.pace_retries(now);
        let adm = &self.cfg.admission;
        let share =
            if adm.max_connections == 0 { usize::MAX } else { adm.max_connections.div_ceil(self.cores) };
        if held >= share || self.draining {
            // Full or leaving: no pace to come back at, only a spread.
            let secs = proto::backoff::jittered_secs(
                adm.retry_after_min_secs,
                adm.retry_after_max_secs,
                &mut self.rng,
            );
            return Some(handshake::service_unavailable(secs));
        }
        if self.handshakes < adm.max_pending_handshakes && self.admission.try_take(1, now) {
            return None;
        }
        let secs = self.retry_slots.retry_after(now, &mut self.rng);
        Some(handshake::service_unavailable(secs))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crate::auth::Verifier;
    use crate::config::GatewayConfig;
    use crate::core::{Core, CoreSpec};
    use crate::metrics::Metrics;

    fn core(cfg: GatewayConfig, now: Instant) -> Core {
        Core::new(CoreSpec {
            id: 0,
            cores: 1,
            verifier: Arc::new(Verifier::new(&cfg.auth).unwrap()),
            cfg: Arc::new(cfg),
            metrics: Arc::new(Metrics::new(1)),
            seed: 1,
            now,
            unix_now: 0,
            up_backlog: crate::core::upstream::MAX_UP_BACKLOG,
            secret_seed: [0; 32],
        })
    }

    fn retry_after(answer: &[u8]) -> u32 {
        let text = std::str::from_utf8(answer).unwrap();
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        let line = text.lines().find(|l| l.to_ascii_lowercase().starts_with("retry-after:")).unwrap();
        line["retry-after:".len()..].trim().parse().unwrap()
    }

    #[test]
    fn a_storm_past_the_burst_is_told_to_come_back_spread_at_the_admission_rate() {
        let mut cfg = GatewayConfig::default();
        cfg.admission.accept_rate = 100.0;
        cfg.admission.accept_burst = 10;
        cfg.admission.retry_after_min_secs = 1;
        cfg.admission.retry_after_max_secs = 4;
        let now = Instant::now();
        let mut gw = core(cfg, now);
        let mut per_sec = [0u32; 5];
        let mut admitted = 0;
        for _ in 0..400 {
            match gw.cx.admit(now, 0) {
                None => admitted += 1,
                Some(answer) => per_sec[retry_after(&answer) as usize] += 1,
            }
        }
        assert_eq!(admitted, 10, "the burst");
        // 300 slots 10 ms apart from 1 s on fill the window to 4 s, about
        // 100 told each of 1, 2 and 3 s; the rest land anywhere in it.
        for (k, n) in per_sec.iter().enumerate().take(4).skip(1) {
            assert!((60..=160).contains(n), "{k} s: {n} ({per_sec:?})");
        }
        assert_eq!(per_sec[0], 0);
        // Once the burst's tokens are back, a newcomer is admitted again.
        assert!(gw.cx.admit(now + Duration::from_secs(1), 0).is_none());
    }

    #[test]
    fn with_handshakes_queued_the_refused_are_paced_at_the_rate_they_drain() {
        let mut cfg = GatewayConfig::default();
        cfg.admission.accept_rate = 10_000.0;
        cfg.admission.max_pending_handshakes = 10;
        let t0 = Instant::now();
        let mut busy = core(cfg, t0);
        // The queue is full and drained 20 handshakes in the last second.
        busy.cx.handshakes = 10;
        busy.cx.drained = 20;
        let now = t0 + Duration::from_secs(1);
        let told: Vec<u32> = (0..40).map(|_| retry_after(&busy.cx.admit(now, 0).unwrap())).collect();
        // Slots 50 ms apart from 1 s: 1.0 … 2.95 s, about 20 told each of
        // 1 and 2 s (3 when rounded up), none beyond.
        assert!(told.iter().all(|r| (1..=3).contains(r)), "{told:?}");
        let ones = told.iter().filter(|r| **r == 1).count();
        assert!((10..=30).contains(&ones), "{told:?}");
        assert!(told.windows(2).filter(|w| w[1] + 1 < w[0]).count() == 0, "slots only move later: {told:?}");
        // Refused by the admission rate with no queue (10,000/s), the 40
        // slots are 0.1 ms apart: all told 1 s (2 when rounded up).
        let mut cfg = GatewayConfig::default();
        cfg.admission.accept_rate = 10_000.0;
        cfg.admission.accept_burst = 1;
        let mut calm = core(cfg, t0);
        assert!(calm.cx.admit(now, 0).is_none(), "the burst");
        let told: Vec<u32> = (0..40).map(|_| retry_after(&calm.cx.admit(now, 0).unwrap())).collect();
        assert!(told.iter().all(|r| *r <= 2), "{told:?}");
    }
}
