"""When a probe runs: every N steps, at an explicit list of steps, or log-spaced."""
from __future__ import annotations

import math
import operator
from typing import Iterable, Union

Every = Union[int, Iterable[int], str, "Schedule"]


class Schedule:
    """A set of optimizer steps (0-based: step t measures at w_t, before update t).

    ``Schedule.of(10)`` every 10 steps starting at 0; ``Schedule.of([0, 5, 100])`` those steps;
    ``Schedule.of("log")`` log-spaced (0, 1, 2, ..., about ``per_decade`` points per decade).
    """

    def __init__(self, kind: str, every: int = 1, steps: frozenset[int] = frozenset(), per_decade: int = 8, start: int = 0):
        self.kind = kind
        self.every = every
        self.steps = steps
        self.per_decade = per_decade
        self.start = start

    @classmethod
    def of(cls, every: Every, *, start: int = 0, per_decade: int = 8) -> "Schedule":
        """Parse a cadence, with an error that names the accepted forms."""
        if isinstance(every, Schedule):
            return every
        if isinstance(every, bool):
            raise TypeError("every= must be an int, a list of steps or 'log', not a bool")
        if not isinstance(every, (str, bytes)) and hasattr(every, "__index__") and not hasattr(every, "__len__"):
            every = operator.index(every)  # numpy integers from sweeps and configs
        if isinstance(every, int):
            if every < 1:
                raise ValueError(f"every= must be a positive number of steps, got {every}")
            return cls("every", every=every, start=start)
        if isinstance(every, str):
            if every.lower() in ("log", "logspaced", "log-spaced"):
                if per_decade < 1:
                    raise ValueError("per_decade must be >= 1")
                return cls("log", per_decade=per_decade, start=start)
            raise ValueError(f"every={every!r} is not a cadence: use an int (every N steps), a list of steps, or 'log'")
        try:
            steps = [operator.index(s) for s in every]
        except TypeError:
            raise TypeError(f"every= must be an int, a list of steps or 'log', got {type(every).__name__}") from None
        if not steps:
            raise ValueError("every= got an empty list of steps: the probe would never run")
        if min(steps) < 0:
            raise ValueError("every= steps must be >= 0")
        return cls("list", steps=frozenset(steps))

    def due(self, step: int) -> bool:
        """Whether the probe runs at ``step``."""
        if self.kind == "every":
            return step >= self.start and (step - self.start) % self.every == 0
        if self.kind == "list":
            return step in self.steps
        k = step - self.start
        if k < 0:
            return False
        if k < self.per_decade:
            return True
        # Log-spaced: k is due when it is the rounded value of some 10^(j/per_decade).
        j = round(math.log10(k) * self.per_decade)
        return any(round(10 ** (i / self.per_decade)) == k for i in (j - 1, j, j + 1))

    def describe(self) -> str | list[int] | int:
        """A JSON-able description, stored in the run's attrs."""
        if self.kind == "every":
            return self.every if self.start == 0 else f"every {self.every} from {self.start}"
        if self.kind == "list":
            return sorted(self.steps)
        return f"log ({self.per_decade} per decade)"

    def __repr__(self) -> str:
        return f"Schedule({self.describe()!r})"
