"""Wiring: the `metalora` CLI and the embedded supervisor. Imports server/, trainer/ and adapters/."""
