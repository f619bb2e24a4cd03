"""The store: object files, the SQLite state database and the deployments.

Synchronous and file-system bound; no asyncio. Shells call it from worker
threads.
"""
