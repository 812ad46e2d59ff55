//! Sliding-window sums for rate rules (`docs/evaluation.md`, rates).
//!
//! A rate check needs two things from the events recorded before a call: how much of a metric was used
//! after the window's start, and, when the call does not fit, at which of those events (in the order they
//! were recorded) enough has been used that the call fits once it leaves the window. Run-scope windows
//! hold one run's steps and are read event by event; tenant-scope windows hold every call of a tenant
//! (hundreds of thousands under load), so [`RateWindow`] answers both in time logarithmic in the number of
//! events, with running totals beside the events.

use std::collections::VecDeque;

use runguard_contract::{RateMetric, Timestamp};
use serde::{Deserialize, Serialize};

/// Consumption at one instant, kept for sliding-window rate rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct RateEvent {
    /// When.
    pub(crate) at: Timestamp,
    /// Steps admitted.
    pub(crate) steps: u64,
    /// Tokens reported.
    pub(crate) tokens: u64,
    /// Micro-USD reported.
    pub(crate) cost_micros: u64,
}

/// The events a rate rule is checked against.
pub(crate) trait RateEvents {
    /// The exact sum of `metric` over the events recorded after `start` (`at > start`).
    fn used_after(&self, start: Timestamp, metric: RateMetric) -> u128;

    /// Among the events after `start`, in the order they were recorded, the time of the first at which the
    /// running sum of `metric` reaches `need`.
    fn reaching(&self, start: Timestamp, metric: RateMetric, need: u128) -> Option<Timestamp>;
}

fn rate_value(event: &RateEvent, metric: RateMetric) -> u64 {
    match metric {
        RateMetric::Steps => event.steps,
        RateMetric::Tokens => event.tokens,
        RateMetric::CostMicros => event.cost_micros,
    }
}

/// A run's events, read one by one: a run records at most one event per call.
impl RateEvents for VecDeque<RateEvent> {
    fn used_after(&self, start: Timestamp, metric: RateMetric) -> u128 {
        self.iter().filter(|e| e.at > start).map(|e| u128::from(rate_value(e, metric))).sum()
    }

    fn reaching(&self, start: Timestamp, metric: RateMetric, need: u128) -> Option<Timestamp> {
        let mut sum = 0u128;
        self.iter().filter(|e| e.at > start).find_map(|e| {
            sum += u128::from(rate_value(e, metric));
            (sum >= need).then_some(e.at)
        })
    }
}

/// Running totals of the three metrics. They wrap: only differences between two totals are read, and
/// those are exact as long as the events between them sum to less than 2^128.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct RunningSums {
    steps: u128,
    tokens: u128,
    cost_micros: u128,
}

impl RunningSums {
    fn plus(self, event: &RateEvent) -> Self {
        Self {
            steps: self.steps.wrapping_add(u128::from(event.steps)),
            tokens: self.tokens.wrapping_add(u128::from(event.tokens)),
            cost_micros: self.cost_micros.wrapping_add(u128::from(event.cost_micros)),
        }
    }

    fn get(&self, metric: RateMetric) -> u128 {
        match metric {
            RateMetric::Steps => self.steps,
            RateMetric::Tokens => self.tokens,
            RateMetric::CostMicros => self.cost_micros,
        }
    }
}

/// Consecutive events of the same instant, merged.
#[derive(Clone, Debug)]
struct Slot {
    at: Timestamp,
    /// The latest `at` of this slot and of every slot recorded before it: when it is at or before a
    /// window's start, so is every slot up to here. Non-decreasing along the window.
    latest_so_far: Timestamp,
    /// The earliest `at` of this slot and of every slot recorded after it: when it is after a window's
    /// start, so is every slot from here on. Non-decreasing along the window.
    earliest_from_here: Timestamp,
    /// The sums of every event recorded up to and including this slot.
    totals: RunningSums,
}

/// Rate events in the order they were recorded, with running totals, so that the sums and the wait of a
/// rate check take a binary search rather than a pass over the events.
///
/// Events may be recorded out of time order (callers read the clock before they take the lock that
/// orders the recording). Every slot up to the last one whose `latest_so_far` is at or before a window's
/// start is outside the window, and every slot from the first one whose `earliest_from_here` is after it
/// is inside; both are found by binary search. Only the slots in between, events recorded out of time
/// order around the window's start, are read one by one. Keeping `earliest_from_here` walks back over the
/// slots recorded after an earlier event: none when events come in time order, a few for a few
/// milliseconds of disorder, and the whole window only if the clock went back by that much.
#[derive(Clone, Debug, Default)]
pub(crate) struct RateWindow {
    slots: VecDeque<Slot>,
    /// RunningSums of every event recorded before the first slot (dropped ones included).
    dropped: RunningSums,
}

impl RateWindow {
    /// Records an event after the others.
    pub(crate) fn push(&mut self, event: RateEvent) {
        let last_index = self.slots.len().saturating_sub(1);
        if let Some(last) = self.slots.back()
            && last.at == event.at
            && fits_in_one_event(self.totals_before(last_index), last.totals, &event)
            && let Some(last) = self.slots.back_mut()
        {
            // Merging changes no answer: the two events are read together (same time, adjacent in the
            // recording order) and leave the window together.
            last.totals = last.totals.plus(&event);
            return;
        }
        let (before, latest) =
            self.slots.back().map_or((self.dropped, event.at), |last| (last.totals, last.latest_so_far.max(event.at)));
        // The earliest time from a slot on only drops for the slots recorded after an earlier time than
        // this event's: walking back stops at the first slot already at or before it.
        for slot in self.slots.iter_mut().rev() {
            if slot.earliest_from_here <= event.at {
                break;
            }
            slot.earliest_from_here = event.at;
        }
        self.slots.push_back(Slot {
            at: event.at,
            latest_so_far: latest,
            earliest_from_here: event.at,
            totals: before.plus(&event),
        });
        debug_assert!(
            self.slots.iter().rev().nth(1).zip(self.slots.back()).is_none_or(|(before, last)| {
                before.latest_so_far <= last.latest_so_far && before.earliest_from_here <= last.earliest_from_here
            }),
            "both bounds stay non-decreasing along the window"
        );
    }

    /// Drops events from the front, in recording order, while they are at or before `cutoff`.
    pub(crate) fn drop_through(&mut self, cutoff: Timestamp) {
        while let Some(first) = self.slots.front()
            && first.at <= cutoff
        {
            self.dropped = first.totals;
            self.slots.pop_front();
        }
    }

    /// The totals of every event recorded before slot `index`.
    fn totals_before(&self, index: usize) -> RunningSums {
        index.checked_sub(1).and_then(|i| self.slots.get(i)).map_or(self.dropped, |slot| slot.totals)
    }

    /// What slot `index` holds of `metric`.
    fn value(&self, index: usize, metric: RateMetric) -> u128 {
        let end = self.slots.get(index).map_or(self.dropped, |slot| slot.totals);
        end.get(metric).wrapping_sub(self.totals_before(index).get(metric))
    }

    /// The slots that may or may not be after `start` (`[from, to)`, read one by one); every slot before
    /// `from` is at or before it and every slot from `to` on is after it.
    fn undecided(&self, start: Timestamp) -> (usize, usize) {
        let from = self.slots.partition_point(|slot| slot.latest_so_far <= start);
        let to = self.slots.partition_point(|slot| slot.earliest_from_here <= start);
        debug_assert!(from <= to, "a slot at or before the start is not after it");
        (from, to)
    }

    /// The recorded events, merged per instant.
    pub(crate) fn events(&self) -> impl Iterator<Item = RateEvent> + '_ {
        (0..self.slots.len()).filter_map(|index| {
            let slot = self.slots.get(index)?;
            // A slot only merges events while each of its sums fits in a `u64`.
            let value = |metric| u64::try_from(self.value(index, metric)).unwrap_or(u64::MAX);
            Some(RateEvent {
                at: slot.at,
                steps: value(RateMetric::Steps),
                tokens: value(RateMetric::Tokens),
                cost_micros: value(RateMetric::CostMicros),
            })
        })
    }
}

/// Whether `event` can join the slot spanning `before..end` with every sum still fitting a `u64`, so that
/// the slot still reads as one [`RateEvent`].
fn fits_in_one_event(before: RunningSums, end: RunningSums, event: &RateEvent) -> bool {
    let fits = |metric, add: u64| {
        u64::try_from(end.get(metric).wrapping_sub(before.get(metric)))
            .is_ok_and(|held| held.checked_add(add).is_some())
    };
    fits(RateMetric::Steps, event.steps)
        && fits(RateMetric::Tokens, event.tokens)
        && fits(RateMetric::CostMicros, event.cost_micros)
}

impl RateEvents for RateWindow {
    fn used_after(&self, start: Timestamp, metric: RateMetric) -> u128 {
        let (from, to) = self.undecided(start);
        let undecided: u128 = (from..to)
            .filter(|&i| self.slots.get(i).is_some_and(|slot| slot.at > start))
            .map(|i| self.value(i, metric))
            .sum();
        let last = self.slots.back().map_or(self.dropped, |slot| slot.totals);
        undecided + last.get(metric).wrapping_sub(self.totals_before(to).get(metric))
    }

    fn reaching(&self, start: Timestamp, metric: RateMetric, need: u128) -> Option<Timestamp> {
        let (from, to) = self.undecided(start);
        let mut sum = 0u128;
        for i in from..to {
            let Some(slot) = self.slots.get(i).filter(|slot| slot.at > start) else { continue };
            sum += self.value(i, metric);
            if sum >= need {
                return Some(slot.at);
            }
        }
        // From `to` on every slot counts, so the running sum is a difference of totals, non-decreasing.
        debug_assert!(sum < need);
        let base = self.totals_before(to).get(metric);
        let still = need - sum;
        let reached =
            |index: usize| self.slots.get(index).is_none_or(|slot| slot.totals.get(metric).wrapping_sub(base) >= still);
        let (mut low, mut high) = (to, self.slots.len());
        while low < high {
            let middle = low + (high - low) / 2;
            if reached(middle) {
                high = middle;
            } else {
                low = middle + 1;
            }
        }
        self.slots.get(low).map(|slot| slot.at)
    }
}

#[cfg(test)]
mod model;
