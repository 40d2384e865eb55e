"""Shipped to users: conformance suites for store adapters, and deterministic fakes.

- :mod:`turnbuckle.testing.conformance`: plain async functions that take a store factory and
  check every behaviour a store must have; run them against your own adapter.
- :class:`FakeClock`, :class:`LoopClock` and :class:`SeededIds`: inject time and randomness, so a
  test or a simulation replays exactly, or runs a whole runtime in virtual time.
- :class:`ScriptedModel` (with the steps :func:`say`, :func:`call`, :func:`calls`,
  :class:`Fail`, :class:`Stall`, :class:`Delay`) and :class:`RecordingTool`: a model and tools
  that answer from a script and record what the agent asked, under trio or asyncio.
"""

from turnbuckle.testing.fakes import FakeClock as FakeClock
from turnbuckle.testing.fakes import LoopClock as LoopClock
from turnbuckle.testing.fakes import SeededIds as SeededIds
from turnbuckle.testing.model import Delay as Delay
from turnbuckle.testing.model import Fail as Fail
from turnbuckle.testing.model import ModelCallError as ModelCallError
from turnbuckle.testing.model import ScriptedModel as ScriptedModel
from turnbuckle.testing.model import ScriptExhausted as ScriptExhausted
from turnbuckle.testing.model import Stall as Stall
from turnbuckle.testing.model import Step as Step
from turnbuckle.testing.model import call as call
from turnbuckle.testing.model import calls as calls
from turnbuckle.testing.model import say as say
from turnbuckle.testing.tools import RecordingTool as RecordingTool

__all__ = [
    "Delay",
    "Fail",
    "FakeClock",
    "LoopClock",
    "ModelCallError",
    "RecordingTool",
    "ScriptExhausted",
    "ScriptedModel",
    "SeededIds",
    "Stall",
    "Step",
    "call",
    "calls",
    "say",
]
