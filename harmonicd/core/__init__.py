"""The pure core: formats, objects, trees, diffs, packs and signatures.

Nothing in here does network I/O, waits on a clock or imports asyncio;
it works on bytes, binary streams and plain values, and is tested as such.
"""
