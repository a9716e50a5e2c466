"""Faults a simulated meter can be told to show, in simulated seconds after the origin.

Windows (``at_s`` .. ``at_s + duration_s``): ``timeout`` (no answer at all, like a dead RS485
device), ``exception`` (a Modbus exception response with ``code``), ``nan`` (float registers read
NaN), ``spike`` (values multiplied by ``factor``).  Steps (from ``at_s`` on): ``reset`` (the
import counter restarts at 0) and ``replace`` (a new meter with another serial number whose
counter starts at ``replacement_kwh``).  Counter wrap needs no fault: counters are served modulo
the register's rollover, as real meters do, so a meter started near it wraps on its own.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pymodbus.constants import ExcCodes


class FaultKind(StrEnum):
    TIMEOUT = "timeout"
    EXCEPTION = "exception"
    NAN = "nan"
    SPIKE = "spike"
    RESET = "reset"
    REPLACE = "replace"


STEP_KINDS = frozenset({FaultKind.RESET, FaultKind.REPLACE})


class Fault(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: FaultKind
    at_s: Annotated[float, Field(ge=0)]
    duration_s: Annotated[float, Field(gt=0)] = math.inf  # windows only
    code: ExcCodes = ExcCodes.DEVICE_FAILURE  # exception
    factor: float = 1000.0  # spike
    replacement_kwh: Annotated[float, Field(ge=0)] = 0.0  # replace

    def active(self, elapsed_s: float) -> bool:
        if self.kind in STEP_KINDS:
            return elapsed_s >= self.at_s
        return self.at_s <= elapsed_s < self.at_s + self.duration_s
