"""Trainer events: ``Callback`` lives in ``keel.techniques`` beside the technique registry; re-exported here."""

from keel.techniques import Callback

__all__ = ["Callback"]
