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
use crate::session::{Phase, Session};

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
            Phase::Lingering if passed(d.phase_by) => {
                if !s.stream_tail(sid, &mut self.cx.fx) {
                    self.finish(sid)
                }
            }
            Phase::Lingering => {}
            Phase::Upgrading if passed(d.phase_by) => {
                // Slowloris: the upgrade request did not complete in time.
                self.refuse(sid, handshake::error_response(408, &[], "upgrade timed out"));
            }
            Phase::Open if passed(d.phase_by) => self.close(sid, Disconnect::STALE.into()),
            Phase::Upgrading | Phase::Open | Phase::Connected if passed(d.drain_at) => {
                self.close(sid, Disconnect::SHUTDOWN.into())
            }
            Phase::Upgrading | Phase::Open => {}
            Phase::Connected if passed(d.pong_due) => self.close(sid, Disconnect::NO_PONG.into()),
            Phase::Connected if passed(d.expires_at) && self.cx.cfg.proxy.refresh.is_some() => {
                self.refresh_hook(sid, now)
            }
            Phase::Connected if passed(d.expires_at) => self.close(sid, Disconnect::EXPIRED.into()),
            Phase::Connected if s.proxy.as_ref().and_then(|p| p.next_expiry()).is_some_and(passed) => {
                self.subscriptions_expired(sid, now)
            }
            Phase::Connected => {
                if passed(d.next_ping) {
                    let lim = &self.cx.cfg.limits;
                    s.deadlines.next_ping = now + lim.ping_secs.max(1) as u64 * 1000;
                    if s.deadlines.pong_due == 0 && !s.transport.is_uni() {
                        s.deadlines.pong_due = now + lim.pong_timeout_secs * 1000;
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
            s.deadlines.drain_at = at.max(1);
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

    /// Admission control: `Some(answer)` when a new connection must be refused.
    /// `held`: the sessions the core holds now (its share of
    /// `admission.max_connections` is the bound).
    pub(super) fn admit(&mut self, now: Instant, held: usize) -> Option<Vec<u8>> {
        let adm = &self.cfg.admission;
        let share =
            if adm.max_connections == 0 { usize::MAX } else { adm.max_connections.div_ceil(self.cores) };
        let ok = self.handshakes < adm.max_pending_handshakes
            && held < share
            && !self.draining
            && self.admission.try_take(1, now);
        if ok {
            return None;
        }
        let secs =
            proto::backoff::jittered_secs(adm.retry_after_min_secs, adm.retry_after_max_secs, &mut self.rng);
        Some(handshake::service_unavailable(secs))
    }
}
