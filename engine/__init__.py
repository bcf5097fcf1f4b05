"""An asynchronous actor-model engine for reinforcement-learning post-training of language models."""

__version__ = "0.1.0"

from engine.quiet import quiet_upstream_notices

quiet_upstream_notices()
