"""Errors about a user's input: they name the file (or row) and the problem, nothing else."""

from __future__ import annotations


class InputError(ValueError):
    """A bad input file: `str(err)` is "<source>: <problem>"."""

    def __init__(self, source: str, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class ModelComponentError(ValueError):
    """A model's piece (weights, encoder, tokenizer, config) is missing or corrupt: the message names the file and
    what to do about it."""
