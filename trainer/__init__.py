"""Training side of metalora: data encoding, THE inner loop `adapt`, the resident engine and the worker.

Imports `adapters/`, never `server/`. Heavy imports (torch, transformers, peft) stay in the submodules so
`import trainer` is cheap.
"""
