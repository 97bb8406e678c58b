"""The repository root, for the tests and their helper modules (one definition)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
