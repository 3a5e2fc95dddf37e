"""Analyses of schedules before anything runs: `staleness(plan)`, the delays of an update plan
(`piperc.asynchronous`), per stage in its own updates and in Randomized PipeDream's global
units; synchronous (flushed) plans have none."""

from piperc.asynchronous import Staleness, UpdatePlan, plan, staleness

__all__ = ["Staleness", "UpdatePlan", "plan", "staleness"]
