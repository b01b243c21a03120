"""Adapter records, names, versions, metadata stores, the job queue and the artifact store.

Imported by both `server/` and `trainer/`; imports neither of them.
"""
