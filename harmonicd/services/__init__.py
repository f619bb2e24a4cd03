"""Services: publish, exchange (pack in, pack out), deploy, verify and gc.

They combine the pure core with the store and the file system, synchronously;
the CLI calls them directly and the daemon calls them from worker threads.
"""
