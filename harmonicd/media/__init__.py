"""USB sticks: what the kernel shows of them (devices), its events on the loop (events), and the
privileged mount helper (helper, the ``harmonicd-mount`` command). No re-exports: the helper runs
as root without pyudev or asyncio loaded, so each module is imported by its own name."""
