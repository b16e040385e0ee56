"""A user's session as reversible state (the Concurrent Prediction Optimizer idea).

The slow weights are shared and never touched here; what a session learned is its FastState,
which can be applied, snapshotted, reset to baseline, or made permanent by a consolidation hook
that the sleep provides.
"""

from __future__ import annotations

from typing import Callable

from model.fast_state import FastState
from model.generate import Generation, GenerationConfig, generate
from model.lm import ReverieLM

ConsolidationHook = Callable[[ReverieLM, FastState], None]


class Session:
    def __init__(self, model: ReverieLM, state: FastState | None = None) -> None:
        self.model = model
        self.state = self._baseline() if state is None else state
        self.apply(self.state)

    def _baseline(self) -> FastState:
        return FastState.empty(self.model.config, 1, device=next(self.model.parameters()).device)

    def apply(self, state: FastState) -> None:
        """Continue from `state` (e.g. a snapshot, or a state loaded from the store)."""
        state.validate(self.model.config)
        if state.batch_size != 1:
            raise ValueError(f"a session holds one user; got a FastState of {state.batch_size}")
        self.state = state.clone()

    def snapshot(self) -> FastState:
        return self.state.clone()

    def reset(self) -> None:
        """Back to baseline: the next output equals the slow model's, exactly."""
        self.state = self._baseline()

    def make_permanent(self, consolidate: ConsolidationHook) -> None:
        """Hand what this session learned to `consolidate` (the sleep), then start afresh."""
        consolidate(self.model, self.snapshot())
        self.reset()

    def reply(self, prompt: bytes, config: GenerationConfig = GenerationConfig()) -> Generation:
        generation, self.state = generate(self.model, prompt, self.state, config)
        return generation
